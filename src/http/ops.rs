//! HTTP: `/metrics` (Prometheus text), `/healthz` (the process is alive) and
//! `/readyz` (connected to the broker and the database, and not draining).
//! `/readyz` reads what the workers and a background probe last saw: an
//! unauthenticated caller never makes it do a database round trip.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use utoipa::ToSchema;

use crate::health::Health;

#[derive(Clone)]
pub(super) struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
}

pub fn router(metrics: PrometheusHandle, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/runbook", get(super::runbook::runbook))
        .with_state(AppState { metrics, health })
}

/// Prometheus metrics, in the text exposition format (`docs/metrics.md`).
#[utoipa::path(get, path = "/metrics", operation_id = "getMetrics", tag = "operations", security(()),
    responses((status = 200, description = "The metrics",
        content_type = "text/plain; version=0.0.4; charset=utf-8", body = String)))]
pub(super) async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", operation_id = "getHealth", tag = "operations", security(()),
    responses((status = 200, description = "Alive", content_type = "text/plain", body = String,
        example = "ok\n")))]
pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

/// Whether the process takes work, and what it waits for if not.
#[derive(Serialize, ToSchema)]
pub(super) struct Readiness {
    /// Connected to the broker and the database, and not draining.
    ready: bool,
    /// A broker node answers.
    broker: bool,
    /// The database answers (and is writable).
    database: bool,
    /// Shutting down: finishing the jobs in hand, taking no new ones.
    draining: bool,
    /// An operator paused taking jobs (`sendgate ctl pause`); the process
    /// stays ready: it is doing what it was told.
    paused: bool,
}

/// Ready to take work: connected to the broker and the database, and not
/// draining.
#[utoipa::path(get, path = "/readyz", operation_id = "getReadiness", tag = "operations", security(()),
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready; the body says what is missing", body = Readiness),
    ))]
pub(super) async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let database = state.health.database_ok();
    let broker = state.health.broker_ok();
    let draining = state.health.draining();
    let body = Readiness {
        ready: broker && database && !draining,
        broker,
        database,
        draining,
        paused: state.health.pause_asked(),
    };
    let status = if broker && database && !draining {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body))
}
