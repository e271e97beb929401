//! HTTP, on one listen address: [`ops`] serves `/metrics`, `/healthz` and
//! `/readyz`, [`runbook`] `/runbook`; [`api`] the account API under `/v1`
//! and [`admin`] its operator calls, behind [`auth`]'s tokens, answering
//! errors as [`error`] says; [`openapi`] documents them all; [`server`]
//! the listener and its connection limits. The routes are put together
//! here, so no module below needs another's handlers.

pub mod admin;
pub mod api;
pub mod auth;
pub mod error;
pub mod openapi;
pub mod ops;
pub mod runbook;
pub mod server;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;

use axum::http::StatusCode;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::clock::Clock;
use crate::config::ApiSettings;
use crate::health::Health;
use crate::store::Store;
use auth::{Tokens, require_token};

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
        .merge(v1(store, clock, health, tokens))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            settings.request_timeout(),
        ))
        .layer(RequestBodyLimitLayer::new(settings.max_body_bytes))
        .layer(GlobalConcurrencyLimitLayer::new(
            settings.max_concurrent_requests,
        ))
}

/// The `/v1` routes, or none when no token is configured.
fn v1(store: Store, clock: Arc<dyn Clock>, health: Arc<Health>, tokens: Tokens) -> Router {
    if tokens.is_empty() {
        return Router::new();
    }
    let admin = Router::new()
        .route("/v1/admin/consuming", get(admin::consuming))
        .route("/v1/admin/pause", post(admin::pause))
        .route("/v1/admin/resume", post(admin::resume))
        .with_state(admin::AdminState {
            health,
            clock: clock.clone(),
        });
    Router::new()
        .route("/v1/accounts/{id}", get(api::show).put(api::put))
        .route("/v1/accounts/{id}/ledger", get(api::ledger))
        .route("/v1/accounts/{id}/capacity", get(api::capacity))
        .route("/v1/accounts/{id}/adjustments", post(api::adjust))
        .route("/v1/accounts/{id}/jobs/{key}", get(api::job))
        .route("/v1/accounts/{id}/usage", get(api::usage))
        .with_state(api::ApiState { store, clock })
        .merge(admin)
        .layer(axum::middleware::from_fn_with_state(tokens, require_token))
}
