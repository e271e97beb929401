//! HTTP, on one listen address: [`ops`] serves `/metrics`, `/healthz` and
//! `/readyz`; [`api`] the account API under `/v1`.

pub mod api;
pub mod ops;

use std::sync::Arc;

use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::clock::Clock;
use crate::config::Token;
use crate::health::Health;
use crate::store::Store;

/// Every route sendgate serves.
pub fn router(
    metrics: PrometheusHandle,
    health: Arc<Health>,
    store: Store,
    clock: Arc<dyn Clock>,
    token: Token,
) -> Router {
    ops::router(metrics, health, store.clone()).merge(api::router(store, clock, token))
}
