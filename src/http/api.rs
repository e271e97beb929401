//! The account API (JSON, under `/v1`, documented in `docs/openapi.yaml`):
//! what a user sees of an account and what the scheduler asks before it
//! enqueues. Every route needs `Authorization: Bearer <[api] token>`; with no
//! token configured the API is off (404). `/metrics`, `/healthz` and
//! `/readyz` stay open.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::auth::{Tokens, require_token};
use crate::clock::Clock;
use crate::domain::ids::AccountId;
use crate::domain::plan::{Plan, UnknownPlan, next_day_start, parse_timezone};
use crate::store::{AccountSummary, Created, LedgerEntry, Store, StoreError};

#[derive(Clone)]
struct ApiState {
    store: Store,
    clock: Arc<dyn Clock>,
}

/// The `/v1` routes, or none when no token is configured.
pub fn router(store: Store, clock: Arc<dyn Clock>, tokens: Tokens) -> Router {
    if tokens.is_empty() {
        return Router::new();
    }
    Router::new()
        .route("/v1/accounts/{id}", get(show).put(put))
        .route("/v1/accounts/{id}/ledger", get(ledger))
        .route("/v1/accounts/{id}/capacity", get(capacity))
        .layer(axum::middleware::from_fn_with_state(tokens, require_token))
        .with_state(ApiState { store, clock })
}

/// An error as the API returns it: a status and `{"error": "..."}`.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::UnknownAccount(_) => ApiError(StatusCode::NOT_FOUND, err.to_string()),
            StoreError::InvalidAccount(_) => ApiError(StatusCode::BAD_REQUEST, err.to_string()),
            StoreError::AccountExists { .. } => ApiError(StatusCode::CONFLICT, err.to_string()),
            StoreError::Unavailable(_) | StoreError::Contention => ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "database unavailable; try again".to_owned(),
            ),
            _ => {
                tracing::error!(error = %err, "account API failed");
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error".to_owned(),
                )
            }
        }
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

#[derive(Serialize)]
struct Today {
    date: String,
    sends: i64,
    /// Pro: the daily limit; free: the credit balance; scale: none.
    limit: Option<i64>,
}

#[derive(Serialize)]
struct AccountView {
    id: String,
    plan: Plan,
    timezone: String,
    credit_balance: i64,
    today: Today,
    /// When the next send slot frees up, if none is free now.
    next_slot_at: Option<DateTime<Utc>>,
}

#[derive(Serialize)]
struct Capacity {
    /// Sends that would pass right now; `null` when unlimited.
    sends_available: Option<i64>,
    unlimited: bool,
    /// When more become available, if ever; `null` when some are available
    /// now or none will ever come (a free account's credits never refresh).
    next_available_at: Option<DateTime<Utc>>,
}

fn capacity_of(summary: &AccountSummary, now: DateTime<Utc>) -> Capacity {
    let tz = parse_timezone(&summary.timezone).unwrap_or(chrono_tz::Tz::UTC);
    match summary.plan {
        Plan::Scale => Capacity {
            sends_available: None,
            unlimited: true,
            next_available_at: None,
        },
        Plan::Free => Capacity {
            sends_available: Some(summary.credit_balance),
            unlimited: false,
            next_available_at: None,
        },
        Plan::Pro => {
            let left = (summary.limit_today.unwrap_or(0) - summary.sends_today).max(0);
            Capacity {
                sends_available: Some(left),
                unlimited: false,
                next_available_at: (left == 0).then(|| next_day_start(now, tz)),
            }
        }
    }
}

/// The account id of the path, checked once: a path that is not UTF-8
/// (or not an id) is a JSON 400 like any other bad input.
fn checked_id(id: Result<Path<String>, PathRejection>) -> Result<AccountId, ApiError> {
    let Path(id) = id.map_err(|err| bad_request(err.body_text()))?;
    AccountId::parse(id).map_err(|err| bad_request(err.0))
}

/// Any path the API does not serve: a JSON 404.
pub async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such resource".to_owned())
}

/// A method the path does not take: a JSON 405.
pub async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed here".to_owned(),
    )
}

async fn view(state: &ApiState, id: &AccountId) -> Result<AccountView, ApiError> {
    let now = state.clock.now();
    let summary = state.store.account_summary(id, now, 0).await?;
    let next_slot_at = capacity_of(&summary, now).next_available_at;
    Ok(AccountView {
        id: summary.id.into(),
        plan: summary.plan,
        timezone: summary.timezone,
        credit_balance: summary.credit_balance,
        today: Today {
            date: summary.today.to_string(),
            sends: summary.sends_today,
            limit: summary.limit_today,
        },
        next_slot_at,
    })
}

async fn show(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<AccountView>, ApiError> {
    Ok(Json(view(&state, &checked_id(id)?).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutAccount {
    plan: String,
    /// Absent means UTC; `null` is refused like any other non-string.
    #[serde(default = "utc")]
    timezone: String,
}

fn utc() -> String {
    "UTC".to_owned()
}

/// Creates the account (201), or changes its plan (200).
async fn put(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<PutAccount>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|err| bad_request(err.body_text()))?;
    let id = checked_id(id)?;
    let plan: Plan = body
        .plan
        .parse()
        .map_err(|err: UnknownPlan| bad_request(err.to_string()))?;
    let timezone = body.timezone;
    parse_timezone(&timezone).map_err(bad_request)?;
    let status = match state.store.create_account(&id, plan, &timezone).await {
        Ok(Created::New { .. }) => StatusCode::CREATED,
        Ok(Created::Existing) => StatusCode::OK,
        Err(StoreError::AccountExists { .. }) => {
            let current = state
                .store
                .account_summary(&id, state.clock.now(), 0)
                .await?;
            if current.timezone != timezone {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    format!(
                        "account `{id}` has time zone {}; it cannot be changed here",
                        current.timezone
                    ),
                ));
            }
            state.store.set_plan(&id, plan).await?;
            StatusCode::OK
        }
        Err(err) => return Err(err.into()),
    };
    Ok((status, Json(view(&state, &id).await?)).into_response())
}

#[derive(Serialize)]
struct LedgerPage {
    entries: Vec<LedgerEntry>,
    /// Pass as `before` for the next (older) page; `null` on the last one.
    next_before: Option<i64>,
}

async fn ledger(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<LedgerPage>, ApiError> {
    let limit = match query.get("limit") {
        None => 50,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=500).contains(n))
            .ok_or_else(|| bad_request("`limit` must be an integer from 1 to 500"))?,
    };
    let before = match query.get("before") {
        None => None,
        Some(v) => Some(
            v.parse::<i64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| bad_request("`before` must be a positive ledger entry id"))?,
        ),
    };
    if let Some(unknown) = query.keys().find(|k| *k != "limit" && *k != "before") {
        return Err(bad_request(format!("unknown query parameter `{unknown}`")));
    }
    let entries = state
        .store
        .ledger_page(&checked_id(id)?, limit, before)
        .await?;
    let next_before = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(Json(LedgerPage {
        entries,
        next_before,
    }))
}

async fn capacity(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Capacity>, ApiError> {
    let now = state.clock.now();
    let summary = state
        .store
        .account_summary(&checked_id(id)?, now, 0)
        .await?;
    Ok(Json(capacity_of(&summary, now)))
}
