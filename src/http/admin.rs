//! `/v1/admin`: operator control of this process. Pausing stops taking
//! jobs from the send queue (the batches in hand finish; what is prefetched
//! goes back to the queue) until resumed; delivery reports keep being
//! applied. The pause holds for this process only and ends with it: a
//! restarted process takes jobs again.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, State};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Caller;
use super::error::{Forbidden, Unauthorized};
use crate::clock::Clock;
use crate::health::{ConsumingState, Health};
use crate::worker::JOBS_WORKERS;

#[derive(Clone)]
pub(super) struct AdminState {
    pub health: Arc<Health>,
    pub clock: Arc<dyn Clock>,
}

/// Whether this process takes jobs, and the last pause or resume.
#[derive(Serialize, ToSchema)]
pub struct Consuming {
    /// Whether an operator has paused taking jobs.
    pub paused: bool,
    pub state: ConsumingState,
    /// Who paused or resumed last (the token's name, or `cli` … as the
    /// CLI reports it); null if nobody has since the process started.
    #[schema(example = "default", required = true)]
    pub changed_by: Option<String>,
    #[schema(required = true)]
    pub changed_at: Option<DateTime<Utc>>,
}

fn status(health: &Health) -> Consuming {
    let last = health.last_pause_change();
    Consuming {
        paused: health.pause_asked(),
        state: health.consuming_state(JOBS_WORKERS),
        changed_by: last.as_ref().map(|c| c.by.clone()),
        changed_at: last.map(|c| c.at),
    }
}

/// Whether this process takes jobs.
#[utoipa::path(get, path = "/v1/admin/consuming", operation_id = "getConsuming", tag = "admin",
    responses(
        (status = 200, description = "Where taking jobs stands", body = Consuming),
        (status = 401, response = Unauthorized),
    ))]
pub(super) async fn consuming(State(state): State<AdminState>) -> Json<Consuming> {
    Json(status(&state.health))
}

/// Pauses taking jobs (idempotent).
///
/// The batches in hand finish and are acked; jobs prefetched but not started
/// go back to the send queue. `state` is `pausing` until then, `paused`
/// after. Delivery reports keep being applied. This process only, until it
/// is resumed or restarts.
#[utoipa::path(post, path = "/v1/admin/pause", operation_id = "pause", tag = "admin",
    responses(
        (status = 200, description = "Paused (or pausing)", body = Consuming),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
    ))]
pub(super) async fn pause(
    State(state): State<AdminState>,
    Extension(Caller(caller)): Extension<Caller>,
) -> Json<Consuming> {
    state.health.set_paused(true, &caller, state.clock.now());
    Json(status(&state.health))
}

/// Resumes taking jobs (idempotent).
#[utoipa::path(post, path = "/v1/admin/resume", operation_id = "resume", tag = "admin",
    responses(
        (status = 200, description = "Taking jobs again", body = Consuming),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
    ))]
pub(super) async fn resume(
    State(state): State<AdminState>,
    Extension(Caller(caller)): Extension<Caller>,
) -> Json<Consuming> {
    state.health.set_paused(false, &caller, state.clock.now());
    Json(status(&state.health))
}
