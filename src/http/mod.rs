//! HTTP, on one listen address: [`ops`] serves `/metrics`, `/healthz` and
//! `/readyz`, [`runbook`] `/runbook`; [`api`] the account API under `/v1`;
//! [`server`] the listener and its connection limits.

pub mod admin;
pub mod api;
pub mod auth;
pub mod openapi;
pub mod ops;
pub mod runbook;
pub mod server;

use std::sync::Arc;

use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use axum::http::StatusCode;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::clock::Clock;
use crate::config::ApiSettings;
use crate::health::Health;
use crate::store::Store;
use auth::Tokens;

/// Every route sendgate serves, behind the server's limits: a request
/// timeout (408), a body limit (413) and a cap on requests served at once.
pub fn router(
    metrics: PrometheusHandle,
    health: Arc<Health>,
    store: Store,
    clock: Arc<dyn Clock>,
    settings: &ApiSettings,
) -> Router {
    let tokens = Tokens::new(settings.tokens());
    ops::router(metrics, health.clone())
        .merge(api::router(store, clock, health, tokens))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            settings.request_timeout(),
        ))
        .layer(RequestBodyLimitLayer::new(settings.max_body_bytes))
        .layer(GlobalConcurrencyLimitLayer::new(
            settings.max_concurrent_requests,
        ))
}
