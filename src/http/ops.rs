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

use crate::health::Health;

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
}

pub fn router(metrics: PrometheusHandle, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health })
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let database = state.health.database_ok();
    let broker = state.health.broker_ok();
    let draining = state.health.draining();
    let body = serde_json::json!({
        "ready": broker && database && !draining,
        "broker": broker,
        "database": database,
        "draining": draining,
    });
    let status = if broker && database && !draining {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body))
}
