//! What happened to one job key, for a scheduler reconciling its sends:
//! its charge (held, committed or released) and its latest refusal. The
//! refusals are recorded as the gate refuses jobs, one row per key, and
//! removed after their retention.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::rows::{self, distinct_accounts};
use super::{Query, Store, StoreError, sql, usage};
use crate::domain::decision::Decision;
use crate::domain::ids::{AccountId, JobKey};
use crate::domain::job::Job;
use crate::domain::plan::{Charge, Plan, Reason};
use crate::domain::settle::State;

/// A job the gate refused: its key, why, and the detail.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub key: JobKey,
    /// The job's `campaign_id`, for usage by campaign.
    pub campaign_id: Option<String>,
    pub reason: &'static str,
    pub detail: String,
}

/// A key's charge.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ChargeStatus {
    pub reservation_id: Uuid,
    /// held (forwarded, awaiting its delivery report), committed or
    /// released (the delivery failed; the credit or slot came back).
    #[schema(value_type = String, example = "held")]
    pub state: State,
    #[schema(value_type = String, example = "free")]
    pub plan: Plan,
    /// credit, daily_slot or unmetered.
    #[schema(value_type = String, example = "credit")]
    pub charge: Charge,
    pub charged_at: DateTime<Utc>,
    #[schema(required = true)]
    pub settled_at: Option<DateTime<Utc>>,
    /// Why it settled so ("delivered", a failure's detail, "no outcome
    /// within the hold time").
    #[schema(required = true)]
    pub settle_detail: Option<String>,
}

/// A key's latest refusal.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RefusalStatus {
    /// The dead-letter reason (`out_of_credits`, `daily_limit_reached`, …).
    #[schema(value_type = String, example = "out_of_credits")]
    pub reason: Reason,
    #[schema(example = "free plan: no credits left (20 granted at signup, none refresh)")]
    pub detail: String,
    pub refused_at: DateTime<Utc>,
}

/// What became of a key, all told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Charged (see the charge's state), and not refused since.
    Charged,
    /// Its latest judgement was a refusal.
    Refused,
    /// Nothing recorded, or a refusal past retention.
    Unknown,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Charged => "charged",
            JobState::Refused => "refused",
            JobState::Unknown => "unknown",
        }
    }
}

/// Everything recorded about a key.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobStatus {
    #[schema(example = "acme")]
    pub account_id: String,
    #[schema(example = "campaign-7/recipient-21")]
    pub idempotency_key: String,
    /// charged (see `charge.state`), refused (its latest judgement was a
    /// refusal) or unknown (nothing recorded, or a refusal past retention).
    #[schema(value_type = String, example = "refused")]
    pub status: JobState,
    #[schema(required = true)]
    pub charge: Option<ChargeStatus>,
    #[schema(required = true)]
    pub last_refusal: Option<RefusalStatus>,
}

/// A charge waiting for its delivery report.
#[derive(Debug, Clone, Serialize)]
pub struct Hold {
    pub idempotency_key: String,
    pub reservation_id: Uuid,
    pub plan: Plan,
    pub charge: Charge,
    pub charged_at: DateTime<Utc>,
}

impl Store {
    /// An account's held charges (forwarded, no delivery report yet),
    /// oldest first, at most `limit`. Holds are bounded by the hold time,
    /// so this reads the held-reservations index, not the account's history.
    ///
    /// # Errors
    /// [`StoreError::UnknownAccount`].
    pub async fn holds(&self, account: &AccountId, limit: i64) -> Result<Vec<Hold>, StoreError> {
        self.account_must_exist(account).await?;
        let rows = sqlx::query(
            "SELECT idempotency_key, id, plan, charge, created_at FROM reservations
             WHERE state = 'held' AND account_id = $1 ORDER BY created_at LIMIT $2",
        )
        .bind(account.as_str())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let holds = rows.iter().map(rows::hold).collect::<Result<_, _>>()?;
        Ok(holds)
    }

    /// Records the latest refusal of each key (the last one of a key that
    /// appears twice), and counts every refusal in the usage at `now`.
    ///
    /// # Errors
    /// [`StoreError::is_transient`] when it should be retried.
    pub async fn record_refusals(
        &self,
        refusals: &[Refusal],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if refusals.is_empty() {
            return Ok(());
        }
        let mut conn = self.pool.acquire().await?;
        // Only for accounts that exist: a publisher that makes ids up must
        // not grow the database (they are counted in metrics only).
        let accounts = distinct_accounts(refusals.iter().map(|r| &r.key.account_id));
        let known: HashSet<String> =
            sqlx::query_scalar("SELECT id FROM accounts WHERE id = ANY($1)")
                .bind(&accounts)
                .fetch_all(&mut *conn)
                .await?
                .into_iter()
                .collect();
        let refusals: Vec<Refusal> = refusals
            .iter()
            .filter(|r| known.contains(r.key.account_id.as_str()))
            .cloned()
            .collect();
        record_refusals_on(&mut conn, &refusals, now).await
    }

    /// Removes refusals older than `retention`, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError::is_transient`] when it should be retried.
    pub async fn purge_refusals(&self, retention: Duration, limit: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(sql::PURGE_REFUSALS)
            .bind(format!("{} seconds", retention.as_secs()))
            .bind(limit)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// Removes up to `limit` usage counts of buckets older than
    /// `retention`, oldest first; returns how many.
    ///
    /// # Errors
    /// [`StoreError::is_transient`] when it should be retried.
    pub async fn purge_usage_counts(
        &self,
        retention: Duration,
        limit: i64,
    ) -> Result<u64, StoreError> {
        Ok(sqlx::query(sql::PURGE_USAGE_COUNTS)
            .bind(format!("{} seconds", retention.as_secs()))
            .bind(limit)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// What is recorded about `key` of `account`.
    ///
    /// # Errors
    /// [`StoreError::UnknownAccount`] when the account does not exist and
    /// nothing is recorded about the key.
    pub async fn job_status(
        &self,
        account: &AccountId,
        key: &str,
    ) -> Result<JobStatus, StoreError> {
        let charge = sqlx::query(
            "SELECT id, state, plan, charge, created_at, settled_at, settle_detail
             FROM reservations WHERE account_id = $1 AND idempotency_key = $2
             ORDER BY state = 'released' LIMIT 1",
        )
        .bind(account.as_str())
        .bind(key)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(rows::charge_status)
        .transpose()?;
        let last_refusal = sqlx::query(
            "SELECT reason, detail, refused_at FROM refusals
             WHERE account_id = $1 AND idempotency_key = $2",
        )
        .bind(account.as_str())
        .bind(key)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(rows::refusal_status)
        .transpose()?;
        if charge.is_none() && last_refusal.is_none() {
            self.account_must_exist(account).await?;
        }
        // Whichever came last: a key refused, then charged on a later
        // attempt (or charged, released, then refused) shows its latest fate.
        let status = match (&charge, &last_refusal) {
            (Some(c), Some(r)) if r.refused_at > c.charged_at => JobState::Refused,
            (Some(_), _) => JobState::Charged,
            (None, Some(_)) => JobState::Refused,
            (None, None) => JobState::Unknown,
        };
        Ok(JobStatus {
            account_id: account.to_string(),
            idempotency_key: key.to_owned(),
            status,
            charge,
            last_refusal,
        })
    }
}

/// [`sql::RECORD_REFUSALS`] on `conn` (in the caller's transaction, if
/// any); nothing when there are none.
pub(super) async fn record_refusals_on(
    conn: &mut sqlx::PgConnection,
    refusals: &[Refusal],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if refusals.is_empty() {
        return Ok(());
    }
    bind_refusals(
        sqlx::query(sql::RECORD_REFUSALS).bind(usage::bucket(now)),
        refusals,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Binds a batch's refusals as seven parallel arrays (see
/// `record_refusals!` in [`sql`]): the latest of each key (accounts, keys,
/// reasons, details; a statement may not update a row twice), then every
/// refusal, repeated keys too, for the usage counts (accounts, campaigns,
/// reasons).
pub(super) fn bind_refusals<'q>(query: Query<'q>, refusals: &'q [Refusal]) -> Query<'q> {
    let mut latest: HashMap<&JobKey, &'q Refusal> = HashMap::new();
    for refusal in refusals {
        latest.insert(&refusal.key, refusal);
    }
    let rows: Vec<&Refusal> = latest.into_values().collect();
    query
        .bind(
            rows.iter()
                .map(|r| r.key.account_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.key.idempotency_key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.reason).collect::<Vec<_>>())
        // Postgres text cannot hold NUL.
        .bind(
            rows.iter()
                .map(|r| r.detail.replace('\0', ""))
                .collect::<Vec<_>>(),
        )
        .bind(
            refusals
                .iter()
                .map(|r| r.key.account_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            refusals
                .iter()
                .map(|r| r.campaign_id.as_deref().unwrap_or(""))
                .collect::<Vec<_>>(),
        )
        .bind(refusals.iter().map(|r| r.reason).collect::<Vec<_>>())
}

/// The refusals among a batch's decisions (in the jobs' order), for job
/// status and usage. A job for an account that does not exist writes
/// nothing: whoever publishes made-up ids must not grow the database
/// (`sendgate_jobs_dead_lettered_total{reason="unknown_account"}` counts
/// them).
pub(super) fn refusals_of(jobs: &[Job], decisions: &[Decision]) -> Vec<Refusal> {
    jobs.iter()
        .zip(decisions)
        .filter_map(|(job, decision)| {
            let (Decision::DeadLetter(refused) | Decision::Defer(refused)) = decision else {
                return None;
            };
            if refused.reason == Reason::UnknownAccount {
                return None;
            }
            Some(Refusal {
                key: job.key(),
                campaign_id: job.campaign_id.clone(),
                reason: refused.reason.as_str(),
                detail: refused.detail.clone(),
            })
        })
        .collect()
}
