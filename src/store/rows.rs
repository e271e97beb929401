//! Rows decode here, once per row shape, into the domain's types. A column
//! whose value the code cannot read is [`StoreError::Corrupt`], never a
//! guess and never the caller's fault.

use std::str::FromStr;

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::StoreError;
use crate::domain::decision::{AccountState, PriorReservation};
use crate::domain::ids::{AccountId, IdempotencyKey, JobKey};
use crate::domain::plan::{Charge, Plan, Reason, local_day, parse_timezone};
use crate::domain::settle::{Reservation, State};

pub(super) fn plan(row: &PgRow, column: &str) -> Result<Plan, StoreError> {
    let name: String = row.try_get(column)?;
    Plan::from_str(&name).map_err(|err| StoreError::corrupt(column, err))
}

fn charge(row: &PgRow) -> Result<Charge, StoreError> {
    let name: String = row.try_get("charge")?;
    Charge::from_str(&name).map_err(|err| StoreError::corrupt("charge", err))
}

pub(super) fn account_id(row: &PgRow, column: &str) -> Result<AccountId, StoreError> {
    let id: String = row.try_get(column)?;
    AccountId::parse(id).map_err(|err| StoreError::corrupt(column, err))
}

pub(super) fn job_key(row: &PgRow) -> Result<JobKey, StoreError> {
    let key: String = row.try_get("idempotency_key")?;
    Ok(JobKey {
        account_id: account_id(row, "account_id")?,
        idempotency_key: IdempotencyKey::parse(key)
            .map_err(|err| StoreError::corrupt("idempotency_key", err))?,
    })
}

/// An account's time zone. Validated on the way in, so a name that does not
/// parse is a row edited by hand: an error that names it, never a quiet
/// change of the account's day.
pub(super) fn timezone(name: &str) -> Result<Tz, StoreError> {
    parse_timezone(name).map_err(|err| StoreError::corrupt("accounts.timezone", err))
}

/// An account row (`plan`, `timezone`, `credit_balance`) as a batch sees it
/// at `now`; Pro usage is filled in later.
pub(super) fn account_state(row: &PgRow, now: DateTime<Utc>) -> Result<AccountState, StoreError> {
    let zone: String = row.try_get("timezone")?;
    let tz = timezone(&zone)?;
    Ok(AccountState {
        plan: plan(row, "plan")?,
        timezone: tz,
        credit_balance: row.try_get("credit_balance")?,
        today: local_day(now, tz),
        used_today: 0,
    })
}

/// A reservation as deciding reads it (the columns of
/// [`super::sql::reservation_lookup!`]).
pub(super) fn prior_reservation(row: &PgRow) -> Result<PriorReservation, StoreError> {
    // 16 bytes, or the whole SHA-256 of a charge from before the digest was
    // cut to 16 (its first 16 bytes are the digest).
    let hash: Vec<u8> = row.try_get("payload_digest")?;
    let state: Option<String> = row.try_get("state")?;
    Ok(PriorReservation {
        id: row.try_get("id")?,
        payload_digest: match hash.len() {
            16 | 32 => hash[..16].try_into().expect("16 bytes"),
            n => return Err(StoreError::corrupt("payload_digest", format!("{n} bytes"))),
        },
        plan: plan(row, "plan")?,
        charge: charge(row)?,
        remaining: row.try_get("remaining")?,
        forward_confirmed: row.try_get("forward_confirmed")?,
        released: state.as_deref() == Some(State::Released.as_str()),
        last_forward_at: row.try_get("last_forward_at")?,
        lease_expired: row.try_get("lease_expired")?,
    })
}

/// A reservation as settling reads it, with its day's Pro usage.
pub(super) struct HeldRow {
    pub key: JobKey,
    pub reservation: Reservation,
    pub used_that_day: Option<i32>,
}

pub(super) fn held(row: &PgRow) -> Result<HeldRow, StoreError> {
    let state: String = row.try_get("state")?;
    Ok(HeldRow {
        key: job_key(row)?,
        reservation: Reservation {
            id: row.try_get::<Uuid, _>("id")?,
            charge: charge(row)?,
            usage_day: row.try_get::<Option<NaiveDate>, _>("usage_day")?,
            state: State::from_str(&state).map_err(|err| StoreError::corrupt("state", err))?,
            forwarded_again: row.try_get("forwarded_again")?,
        },
        used_that_day: row.try_get("used")?,
    })
}

/// One row of the credit ledger.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct LedgerEntry {
    /// Increasing; pages are asked for by it.
    #[schema(example = 42)]
    pub id: i64,
    /// Credits added (positive) or taken (negative).
    #[schema(example = -1)]
    pub delta: i64,
    /// What the entry records.
    #[schema(schema_with = ledger_kind)]
    pub kind: String,
    /// The credit balance after this entry.
    #[schema(example = 17)]
    pub balance_after: i64,
    /// The job's key, for `send` and `release`.
    #[schema(example = "campaign-7/contact-311", required = true)]
    pub idempotency_key: Option<String>,
    /// The charge, for `send` and `release`.
    #[schema(required = true)]
    pub reservation_id: Option<Uuid>,
    /// Why: the reason given for an adjustment, "signup grant", "delivery
    /// failed"; null on sends.
    #[schema(
        example = "refund after the 2026-11-28 delivery incident",
        required = true
    )]
    pub note: Option<String>,
    /// Who made an adjustment: the API token's name, or `cli:<user>`.
    #[schema(example = "support", required = true)]
    pub actor: Option<String>,
    pub at: DateTime<Utc>,
}

/// The kinds of ledger entry, as the `kind` column holds them.
fn ledger_kind() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(["signup_grant", "send", "release", "adjustment"]))
        .examples([serde_json::json!("send")])
        .build()
}

pub(super) fn ledger_entry(row: &PgRow) -> Result<LedgerEntry, StoreError> {
    Ok(LedgerEntry {
        id: row.try_get("id")?,
        delta: row.try_get("delta")?,
        kind: row.try_get("kind")?,
        balance_after: row.try_get("balance_after")?,
        idempotency_key: row.try_get("idempotency_key")?,
        reservation_id: row.try_get("reservation_id")?,
        note: row.try_get("note")?,
        actor: row.try_get("actor")?,
        at: row.try_get("created_at")?,
    })
}

/// The distinct account ids of a batch, sorted: the order every statement
/// locks accounts in.
pub(super) fn distinct_accounts<'a>(ids: impl Iterator<Item = &'a AccountId>) -> Vec<&'a str> {
    let mut ids: Vec<&str> = ids.map(AccountId::as_str).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The distinct (account, key) pairs of a batch, as the two parallel text
/// arrays the SQL unnests.
pub(super) fn key_arrays<'a>(
    keys: impl Iterator<Item = (&'a AccountId, &'a IdempotencyKey)>,
) -> (Vec<&'a str>, Vec<&'a str>) {
    let mut pairs: Vec<(&str, &str)> = keys.map(|(a, k)| (a.as_str(), k.as_str())).collect();
    pairs.sort_unstable();
    pairs.dedup();
    pairs.into_iter().unzip()
}

/// A key's charge ([`super::jobs::ChargeStatus`]): `id, state, plan,
/// charge, created_at, settled_at, settle_detail`.
pub(super) fn charge_status(row: &PgRow) -> Result<super::ChargeStatus, StoreError> {
    let state: String = row.try_get("state")?;
    Ok(super::ChargeStatus {
        reservation_id: row.try_get("id")?,
        state: State::from_str(&state).map_err(|err| StoreError::corrupt("state", err))?,
        plan: plan(row, "plan")?,
        charge: charge(row)?,
        charged_at: row.try_get("created_at")?,
        settled_at: row.try_get("settled_at")?,
        settle_detail: row.try_get("settle_detail")?,
    })
}

/// A key's latest refusal: `reason, detail, refused_at`.
pub(super) fn refusal_status(row: &PgRow) -> Result<super::RefusalStatus, StoreError> {
    let reason: String = row.try_get("reason")?;
    Ok(super::RefusalStatus {
        reason: Reason::from_str(&reason).map_err(|err| StoreError::corrupt("reason", err))?,
        detail: row.try_get("detail")?,
        refused_at: row.try_get("refused_at")?,
    })
}

/// A held charge: `idempotency_key, id, plan, charge, created_at`.
pub(super) fn hold(row: &PgRow) -> Result<super::Hold, StoreError> {
    Ok(super::Hold {
        idempotency_key: row.try_get("idempotency_key")?,
        reservation_id: row.try_get("id")?,
        plan: plan(row, "plan")?,
        charge: charge(row)?,
        charged_at: row.try_get("created_at")?,
    })
}
