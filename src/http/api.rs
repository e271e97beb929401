//! The account API (JSON, under `/v1`, documented in `docs/openapi.yaml`):
//! what a user sees of an account and what the scheduler asks before it
//! enqueues. Every route needs `Authorization: Bearer <[api] token>`; with no
//! token configured the API is off (404). `/metrics`, `/healthz` and
//! `/readyz` stay open.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::error::{
    ApiError, BadRequest, ErrorBody, Forbidden, NotFound, Unauthorized, Unavailable, bad_request,
};
use crate::clock::Clock;
use crate::domain::ids::AccountId;
use crate::domain::plan::{Capacity, Plan, UnknownPlan, parse_timezone};
use crate::store::{
    Adjustment, Created, DEFAULT_CAMPAIGNS_PER_PAGE, Granularity, JobStatus, LedgerEntry,
    MAX_CAMPAIGNS_PER_PAGE, Store, StoreError, UsageReport,
};

#[derive(Clone)]
pub(super) struct ApiState {
    pub store: Store,
    pub clock: Arc<dyn Clock>,
}

/// Today's usage, in the account's time zone.
#[derive(Serialize, ToSchema)]
pub(super) struct Today {
    /// The account's local date.
    #[schema(value_type = NaiveDate)]
    date: String,
    /// Sends charged today.
    #[schema(example = 3)]
    sends: i64,
    /// Pro: the daily limit; free: the credit balance; scale: null.
    #[schema(example = 20, required = true)]
    limit: Option<i64>,
}

/// An account: plan, balance and today's usage.
#[derive(Serialize, ToSchema)]
#[schema(as = Account)]
pub(super) struct AccountView {
    #[schema(example = "acme")]
    id: String,
    plan: Plan,
    /// IANA time zone of the account's calendar day.
    #[schema(example = "Europe/Berlin")]
    timezone: String,
    /// Kept on record on every plan; spent only on free.
    #[schema(example = 17)]
    credit_balance: i64,
    today: Today,
    /// When the next send slot frees up, if none is free now (pro).
    #[schema(required = true)]
    next_slot_at: Option<DateTime<Utc>>,
}

/// The account id in a path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(super) struct AccountIdParam {
    /// 1 to 128 printable characters (no control characters), compared
    /// exactly as sent: no Unicode normalisation, so look-alike ids in NFC
    /// and NFD are two accounts. At most 255 bytes in UTF-8 (so 128
    /// characters only when most are ASCII).
    #[param(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$",
        example = "acme"
    )]
    id: String,
}

/// The account id of the path, checked once: a path that is not UTF-8
/// (or not an id) is a JSON 400 like any other bad input.
fn checked_id(id: Result<Path<String>, PathRejection>) -> Result<AccountId, ApiError> {
    let Path(id) = id.map_err(|err| bad_request(err.body_text()))?;
    AccountId::parse(id).map_err(|err| bad_request(err.0))
}

async fn view(state: &ApiState, id: &AccountId) -> Result<AccountView, ApiError> {
    let now = state.clock.now();
    let summary = state.store.account_summary(id, now, 0).await?;
    let next_slot_at = summary.capacity(now).next_available_at;
    Ok(AccountView {
        id: summary.id.into(),
        plan: summary.plan,
        timezone: summary.timezone.name().to_owned(),
        credit_balance: summary.credit_balance,
        today: Today {
            date: summary.today.to_string(),
            sends: summary.sends_today,
            limit: summary.limit_today,
        },
        next_slot_at,
    })
}

/// Plan, credit balance, today's usage and limit, and when the next slot
/// frees up.
#[utoipa::path(get, path = "/v1/accounts/{id}", operation_id = "getAccount", tag = "accounts",
    params(AccountIdParam),
    responses(
        (status = 200, description = "The account", body = AccountView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    ))]
pub(super) async fn show(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<AccountView>, ApiError> {
    Ok(Json(view(&state, &checked_id(id)?).await?))
}

/// The plan of an account to create or change.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PutAccount {
    #[schema(value_type = Plan)]
    plan: String,
    #[serde(default, deserialize_with = "present_string")]
    #[schema(schema_with = iana_time_zone)]
    timezone: Option<String>,
}

/// A field that may be absent but, when present, is a string: `null` is
/// refused rather than read as "absent".
fn present_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

/// The time zone names the API takes: the IANA database's, as compiled in.
fn iana_time_zone() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .description(Some(
            "IANA time zone of the account's calendar day. Absent: UTC for a new account, \
             unchanged for an existing one; another zone moves an existing account's day \
             (the day in progress keeps its count of sends). Null is refused.",
        ))
        .enum_values(Some(chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name())))
        .default(Some(serde_json::json!("UTC")))
        .examples([serde_json::json!("Europe/Berlin")])
        .build()
}

/// Creates the account, or changes its plan and time zone.
///
/// Same rules as `sendgate accounts create`, `set-plan` and `set-timezone`:
/// a new free account gets its signup credits once; a plan change applies
/// from the next job, keeps the credit balance on record and never grants
/// credits. Without `timezone` an existing account keeps its zone; with
/// another one its calendar day moves to it from now on, and the day in
/// progress keeps its count of sends.
#[utoipa::path(put, path = "/v1/accounts/{id}", operation_id = "putAccount", tag = "accounts",
    params(AccountIdParam),
    request_body(content = PutAccount,
        example = json!({"plan": "pro", "timezone": "Europe/Berlin"})),
    responses(
        (status = 200, description = "The account existed; its plan is now the one given", body = AccountView),
        (status = 201, description = "The account was created", body = AccountView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    ))]
pub(super) async fn put(
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
    if let Some(timezone) = &body.timezone {
        parse_timezone(timezone).map_err(bad_request)?;
    }
    let created = state
        .store
        .create_account(&id, plan, body.timezone.as_deref().unwrap_or("UTC"))
        .await;
    let status = match created {
        Ok(Created::New { .. }) => StatusCode::CREATED,
        Ok(Created::Existing) => StatusCode::OK,
        Err(StoreError::AccountExists { .. }) => {
            state.store.set_plan(&id, plan).await?;
            if let Some(timezone) = &body.timezone {
                state
                    .store
                    .set_timezone(&id, timezone, state.clock.now())
                    .await?;
            }
            StatusCode::OK
        }
        Err(err) => return Err(err.into()),
    };
    Ok((status, Json(view(&state, &id).await?)).into_response())
}

/// A page of the credit usage log.
#[derive(Serialize, ToSchema)]
pub(super) struct LedgerPage {
    /// Newest first.
    entries: Vec<LedgerEntry>,
    /// Pass as `before` for the next (older) page; null on the last one.
    #[schema(required = true)]
    next_before: Option<i64>,
}

/// Paging through the ledger. Parsed by hand (not by these types) so a bad
/// value gets an error that names it.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct LedgerQuery {
    /// Entries on a page.
    #[param(minimum = 1, maximum = 500, default = 50)]
    limit: Option<i64>,
    /// Only entries with a smaller id: the `next_before` of the previous page.
    #[param(minimum = 1)]
    before: Option<i64>,
}

/// The credit usage log, newest first, paged.
#[utoipa::path(get, path = "/v1/accounts/{id}/ledger", operation_id = "getLedger", tag = "accounts",
    params(AccountIdParam, LedgerQuery),
    responses(
        (status = 200, description = "A page of ledger entries", body = LedgerPage),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    ))]
pub(super) async fn ledger(
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

/// How many sends would pass right now, and when more become available.
///
/// For the scheduler, to avoid enqueuing jobs bound to be refused. Free: the
/// credit balance (it never refreshes). Pro: what is left of today's sends,
/// and when the next day starts if none is. Scale: unlimited.
#[utoipa::path(get, path = "/v1/accounts/{id}/capacity", operation_id = "getCapacity", tag = "accounts",
    params(AccountIdParam),
    responses(
        (status = 200, description = "The account's capacity", body = Capacity),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    ))]
pub(super) async fn capacity(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Capacity>, ApiError> {
    let now = state.clock.now();
    let summary = state
        .store
        .account_summary(&checked_id(id)?, now, 0)
        .await?;
    Ok(Json(summary.capacity(now)))
}

/// A support correction: credits added (or taken, negative) by hand.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"credits": 5, "reason": "refund after the 2026-11-28 delivery incident",
    "idempotency_key": "incident-2026-11-28/acme"}))]
pub(super) struct AdjustmentRequest {
    /// Read as any JSON number (`5.0` is an integer to JSON Schema), then
    /// checked to be whole.
    #[schema(schema_with = adjustment_credits)]
    credits: serde_json::Number,
    /// Why, for the audit trail: up to 500 printable characters, not all
    /// blank.
    #[schema(
        min_length = 1,
        max_length = 500,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    reason: String,
    /// The client's key for this correction, 1 to 255 ASCII letters, digits
    /// or punctuation: the same key again applies it once (and answers 200
    /// with the row it wrote).
    #[schema(min_length = 1, max_length = 255, pattern = "^[!-~]+$")]
    idempotency_key: String,
}

/// A JSON number that is a whole number within `i64` (`5`, `5.0`, `5e0`).
fn whole_number(number: &serde_json::Number) -> Option<i64> {
    if let Some(n) = number.as_i64() {
        return Some(n);
    }
    let f = number.as_f64()?;
    // Beyond 2^53 a float is not exact; adjustments are far below that.
    (f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0).then_some(f as i64)
}

/// Credits to add or take: from -1,000,000 to 1,000,000, never 0.
fn adjustment_credits() -> utoipa::openapi::Schema {
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type};
    let range = |min: i64, max: i64| {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(min))
            .maximum(Some(max))
    };
    OneOfBuilder::new()
        .description(Some(
            "Credits to add (positive) or take (negative), at most 1,000,000 either way; never 0.",
        ))
        .item(range(1, 1_000_000))
        .item(range(-1_000_000, -1))
        .examples([serde_json::json!(5)])
        .build()
        .into()
}

/// What an adjustment wrote.
#[derive(Serialize, ToSchema)]
pub(super) struct AdjustmentView {
    /// The ledger row (kind `adjustment`, with who made it).
    entry: LedgerEntry,
    /// The account's balance now.
    credit_balance: i64,
}

/// Adds or takes credits by hand: a support correction, audited.
///
/// One ledger row of kind `adjustment` with the reason and the token's
/// name; the balance never goes below 0. For refunds after an incident, not
/// for selling credits: a free account's credits come only from its signup
/// grant and refunds of failed deliveries.
#[utoipa::path(post, path = "/v1/accounts/{id}/adjustments", operation_id = "adjustCredits",
    tag = "accounts",
    params(AccountIdParam),
    request_body(content = AdjustmentRequest),
    responses(
        (status = 201, description = "Applied", body = AdjustmentView),
        (status = 200, description = "Applied before under this key; nothing changed", body = AdjustmentView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, description = "It would take the balance below 0, or the key was used for another adjustment", body = ErrorBody),
        (status = 503, response = Unavailable),
    ))]
pub(super) async fn adjust(
    State(state): State<ApiState>,
    Extension(Caller(caller)): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<AdjustmentRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|err| bad_request(err.body_text()))?;
    let id = checked_id(id)?;
    let credits = whole_number(&body.credits)
        .ok_or_else(|| bad_request("`credits` must be a whole number"))?;
    let adjustment = Adjustment::new(credits, &body.reason, &body.idempotency_key, &caller)
        .map_err(bad_request)?;
    let adjusted = state.store.adjust_credits(&id, &adjustment).await?;
    let status = if adjusted.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let view = AdjustmentView {
        entry: adjusted.entry,
        credit_balance: adjusted.balance,
    };
    Ok((status, Json(view)).into_response())
}

/// The range and grouping of a usage report. Parsed by hand, so a bad
/// value gets an error that names it.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct UsageQuery {
    /// Start of the range (RFC 3339); default: `to` less 7 days (24 hours
    /// by hour). A range longer than a year (a month by hour) starts that
    /// much before `to`.
    #[param(format = DateTime)]
    from: Option<String>,
    /// End of the range, exclusive (RFC 3339); default: now.
    #[param(format = DateTime)]
    to: Option<String>,
    /// `hour` or `day` buckets in the account's time zone, or totals per
    /// `campaign`; default `day`.
    #[param(inline, value_type = Option<UsageGranularity>)]
    granularity: Option<String>,
    /// By campaign: the page after this campaign (the previous page's
    /// `next_after`); default: the first page. Not used by hour or day.
    after: Option<String>,
    /// By campaign: campaigns per page, 1 to 1000; default 100. Not used
    /// by hour or day.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// How a usage report is grouped.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub(super) enum UsageGranularity {
    Hour,
    Day,
    Campaign,
}

/// Usage of an account on any plan: sends charged, released and refused
/// by reason, per hour or day in the account's time zone, or per campaign.
///
/// Counted by the same statements that charge, release and refuse, so a
/// figure is as fresh as the last decided batch. Refused jobs of an account
/// that does not exist are counted under that id too.
#[utoipa::path(get, path = "/v1/accounts/{id}/usage", operation_id = "getUsage", tag = "accounts",
    params(AccountIdParam, UsageQuery),
    responses(
        (status = 200, description = "The account's usage over the range", body = UsageReport),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    ))]
pub(super) async fn usage(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<UsageReport>, ApiError> {
    if let Some(unknown) = query
        .keys()
        .find(|k| !["from", "to", "granularity", "after", "limit"].contains(&k.as_str()))
    {
        return Err(bad_request(format!("unknown query parameter `{unknown}`")));
    }
    let limit = match query.get("limit") {
        None => DEFAULT_CAMPAIGNS_PER_PAGE,
        Some(v) => v
            .parse()
            .ok()
            .filter(|n| (1..=MAX_CAMPAIGNS_PER_PAGE).contains(n))
            .ok_or_else(|| {
                bad_request(format!(
                    "`limit` must be a number from 1 to {MAX_CAMPAIGNS_PER_PAGE}"
                ))
            })?,
    };
    // `after` and `limit` page campaigns; hours and days need no pages
    // (a range holds at most a month of hours, a year of days).
    let granularity = match query.get("granularity") {
        None => Granularity::Day,
        Some(name) => Granularity::parse(name)
            .ok_or_else(|| bad_request("`granularity` must be hour, day or campaign"))?,
    };
    let grouping = granularity.grouping(query.get("after").cloned(), limit);
    let instant = |name: &str| -> Result<Option<DateTime<Utc>>, ApiError> {
        query
            .get(name)
            .map(|v| {
                DateTime::parse_from_rfc3339(v)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| bad_request(format!("`{name}` must be an RFC 3339 date-time")))
            })
            .transpose()
    };
    let (to, from) = (instant("to")?, instant("from")?);
    let (from, to) = grouping.range(from, to, state.clock.now());
    let id = checked_id(id)?;
    Ok(Json(state.store.usage(&id, from, to, grouping).await?))
}

/// A job key in a path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(super) struct JobKeyParam {
    /// 1 to 255 printable characters, percent-encoded (`/` as `%2F`).
    #[param(
        min_length = 1,
        max_length = 255,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$",
        example = "campaign-7/recipient-21"
    )]
    key: String,
}

/// What happened to a job: its charge (held, committed or released) and
/// its latest refusal.
///
/// For a scheduler reconciling its sends. A refusal is kept for `[jobs]
/// refusal_retention_days`; a refused job sent again is judged afresh, and
/// `status` follows whichever came last.
#[utoipa::path(get, path = "/v1/accounts/{id}/jobs/{key}", operation_id = "getJob", tag = "accounts",
    params(AccountIdParam, JobKeyParam),
    responses(
        (status = 200, description = "What is recorded about the key (`unknown` when nothing is)", body = JobStatus),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    ))]
pub(super) async fn job(
    State(state): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<JobStatus>, ApiError> {
    let Path((id, key)) = path.map_err(|err| bad_request(err.body_text()))?;
    let id = AccountId::parse(id).map_err(|err| bad_request(err.0))?;
    let chars = key.chars().count();
    if chars == 0 || chars > 255 || key.chars().any(char::is_control) {
        return Err(bad_request(
            "the job key must be 1 to 255 printable characters",
        ));
    }
    Ok(Json(state.store.job_status(&id, &key).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_are_any_json_number_that_is_whole() {
        let n = |text: &str| whole_number(&serde_json::from_str(text).expect("a JSON number"));
        assert_eq!(n("5"), Some(5));
        assert_eq!(n("-3"), Some(-3));
        assert_eq!(n("1883.0"), Some(1883));
        assert_eq!(n("5e2"), Some(500));
        assert_eq!(n("1.5"), None);
        assert_eq!(n("1e300"), None);
    }
}
