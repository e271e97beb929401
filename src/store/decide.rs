//! The hot path: a batch of valid jobs decided and recorded.
//!
//! Two ways through. A batch whose accounts are all on the scale plan has
//! nothing to protect: one read and one atomic insert, no transaction. Any
//! other batch locks its metered accounts, reads their usage and the earlier
//! reservations, and writes everything in one statement, in one transaction.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::jobs::{record_refusals_on, refusals_of};
use super::rows::{self, distinct_accounts, key_arrays};
use super::{Store, StoreError, events, sql, usage};
use crate::domain::decision::{
    AccountState, Decision, Effects, Lease, NewReservation, PriorReservation, decide_batch,
};
use crate::domain::events::batch_events;
use crate::domain::ids::{AccountId, JobKey};
use crate::domain::job::Job;
use crate::domain::plan::{Limits, Plan};

/// Hinted scale accounts kept at most; the hint starts over beyond this.
const SCALE_HINT_CAPACITY: usize = 100_000;

/// How many times a batch is decided again after racing another worker
/// for the same keys, before the worker is told to retry later.
const RACE_ATTEMPTS: usize = 3;

/// The decisions of a batch, in the jobs' order, and the id of the forward
/// batch its new charges belong to (none when it charged nothing).
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    pub decisions: Vec<Decision>,
    pub batch: Option<Uuid>,
}

/// How an attempt at the unlocked path ended.
enum Unlocked {
    Done(Recorded),
    /// Another worker charged one of the keys first: decide again.
    Raced,
    /// A metered account or a released reservation: needs the locked path.
    NeedsLock,
}

/// The state a batch is decided against.
#[derive(Default)]
struct Loaded {
    accounts: HashMap<AccountId, AccountState>,
    prior: HashMap<JobKey, PriorReservation>,
}

impl Loaded {
    fn decide(&self, jobs: &[Job], limits: Limits, now: DateTime<Utc>) -> (Vec<Decision>, Effects) {
        decide_batch(jobs, &self.accounts, &self.prior, limits, now, Uuid::now_v7)
    }
}

impl Store {
    /// Decides and records a batch of valid jobs in one transaction, its
    /// refusals (for job status and usage) included; the decisions come
    /// back in the jobs' order.
    ///
    /// # Errors
    /// [`StoreError::is_transient`] when the batch should be retried;
    /// nothing was recorded then.
    pub async fn decide(&self, jobs: &[Job], now: DateTime<Utc>) -> Result<Recorded, StoreError> {
        if jobs.is_empty() {
            return Ok(Recorded::default());
        }
        // A scale account is not locked, so two workers may charge the same
        // new key at once: the second insert then finds the first one's row,
        // and deciding the batch again (now seeing that row) is the answer.
        for _ in 0..RACE_ATTEMPTS {
            if self.hinted_scale(jobs) {
                match self.try_decide_unlocked(jobs, now).await? {
                    Unlocked::Done(recorded) => return Ok(recorded),
                    Unlocked::Raced => continue,
                    Unlocked::NeedsLock => {}
                }
            }
            if let Some(recorded) = self.try_decide_locked(jobs, now).await? {
                return Ok(recorded);
            }
        }
        Err(StoreError::Contention)
    }

    /// Whether every account of the batch was on the scale plan when last
    /// seen.
    fn hinted_scale(&self, jobs: &[Job]) -> bool {
        let hint = self.scale_hint.lock().unwrap_or_else(|e| e.into_inner());
        jobs.iter().all(|j| hint.contains(j.account_id.as_str()))
    }

    fn remember_plans(&self, accounts: &HashMap<AccountId, AccountState>) {
        let mut hint = self.scale_hint.lock().unwrap_or_else(|e| e.into_inner());
        if hint.len() > SCALE_HINT_CAPACITY {
            hint.clear();
        }
        for (id, account) in accounts {
            if account.plan == Plan::Scale {
                if !hint.contains(id.as_str()) {
                    hint.insert(id.to_string());
                }
            } else {
                hint.remove(id.as_str());
            }
        }
    }

    /// The unlocked path, for a batch whose accounts are all on the scale
    /// plan: one statement reads the accounts and earlier reservations, one
    /// records the new charges (atomically: a key another worker charged in
    /// between fails the whole statement, and the batch is decided again).
    /// Two round trips instead of five.
    async fn try_decide_unlocked(
        &self,
        jobs: &[Job],
        now: DateTime<Utc>,
    ) -> Result<Unlocked, StoreError> {
        let account_ids = distinct_accounts(jobs.iter().map(|j| &j.account_id));
        let (key_accounts, keys) =
            key_arrays(jobs.iter().map(|j| (&j.account_id, &j.idempotency_key)));
        // Both statements on one connection: each return to the pool costs
        // a round trip (sqlx checks the connection with a Sync).
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::query(sql::UNLOCKED_READ)
            .bind(&account_ids)
            .bind(&key_accounts)
            .bind(&keys)
            .bind(self.forward_lease_interval())
            .fetch_all(&mut *conn)
            .await?;
        let mut loaded = Loaded::default();
        for row in &rows {
            if row.try_get::<&str, _>("kind")? == "account" {
                loaded.accounts.insert(
                    rows::account_id(row, "account_id")?,
                    rows::account_state(row, now)?,
                );
                continue;
            }
            let reservation = rows::prior_reservation(row)?;
            if reservation.released {
                // Charged afresh through the locked path's upsert.
                return Ok(Unlocked::NeedsLock);
            }
            loaded.prior.insert(rows::job_key(row)?, reservation);
        }
        if loaded.accounts.values().any(|a| a.plan != Plan::Scale) {
            self.remember_plans(&loaded.accounts);
            return Ok(Unlocked::NeedsLock);
        }
        let (decisions, effects) = loaded.decide(jobs, self.limits, now);
        // Balances, usage and lease take-overs are written in a transaction.
        if !(effects.ledger.is_empty()
            && effects.balances.is_empty()
            && effects.usage.is_empty()
            && effects.leases.is_empty())
        {
            return Ok(Unlocked::NeedsLock);
        }
        let refusals = refusals_of(jobs, &decisions);
        if effects.is_empty() {
            record_refusals_on(&mut conn, &refusals, now).await?;
            return Ok(Unlocked::Done(Recorded {
                decisions,
                batch: None,
            }));
        }
        let batch = Uuid::now_v7();
        let insert = sql::RecordUnmetered {
            reservations: &effects.reservations,
            batch,
            bucket: usage::bucket(now),
            campaigns: usage::campaigns(jobs, &effects.reservations),
            refusals: &refusals,
        };
        match insert.bind().execute(&mut *conn).await {
            Ok(_) => Ok(Unlocked::Done(Recorded {
                decisions,
                batch: Some(batch),
            })),
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505") => {
                Ok(Unlocked::Raced)
            }
            Err(err) => Err(err.into()),
        }
    }

    /// One attempt at the locked path; `None` when a concurrent charge of
    /// the same key won and the batch must be decided again.
    async fn try_decide_locked(
        &self,
        jobs: &[Job],
        now: DateTime<Utc>,
    ) -> Result<Option<Recorded>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut loaded = Loaded {
            accounts: lock_accounts(&mut tx, jobs, now).await?,
            prior: HashMap::new(),
        };
        read_prior(&mut tx, jobs, self.forward_lease_interval(), &mut loaded).await?;
        self.remember_plans(&loaded.accounts);
        let (decisions, effects) = loaded.decide(jobs, self.limits, now);
        if !take_leases(&mut tx, &effects.leases).await? {
            tx.rollback().await?;
            return Ok(None);
        }
        let refusals = refusals_of(jobs, &decisions);
        let batch = (!effects.is_empty()).then(Uuid::now_v7);
        let mut written = Vec::new();
        if batch.is_none() {
            record_refusals_on(&mut tx, &refusals, now).await?;
        }
        if let Some(batch) = batch {
            remove_released(&mut tx, &effects.reservations, &loaded.prior).await?;
            let record = sql::RecordMetered {
                effects: &effects,
                daily_limit: i32::try_from(self.limits.daily_sends).unwrap_or(i32::MAX),
                batch,
                bucket: usage::bucket(now),
                campaigns: usage::campaigns(jobs, &effects.reservations),
                refusals: &refusals,
            };
            let inserted: i64 = record.bind().fetch_one(&mut *tx).await?.try_get(0)?;
            if inserted != effects.reservations.len() as i64 {
                tx.rollback().await?;
                return Ok(None);
            }
            // Threshold events, in the same transaction: they exist exactly
            // when the batch's charges do. Most batches have none, and then
            // cost nothing.
            let crossings = batch_events(
                &loaded.accounts,
                &effects,
                self.limits,
                &self.events.credits_low,
                now,
                Uuid::now_v7,
            );
            written = events::record(&mut tx, &crossings).await?;
        }
        tx.commit().await?;
        self.events_committed(&written);
        Ok(Some(Recorded { decisions, batch }))
    }
}

/// The batch's accounts, metered ones locked ([`sql::LOCK_METERED`]). An
/// account that moved from scale to a metered plan while the batch waited
/// is read again, locked.
async fn lock_accounts(
    conn: &mut PgConnection,
    jobs: &[Job],
    now: DateTime<Utc>,
) -> Result<HashMap<AccountId, AccountState>, StoreError> {
    let account_ids = distinct_accounts(jobs.iter().map(|j| &j.account_id));
    let rows = sqlx::query(sql::LOCK_METERED)
        .bind(&account_ids)
        .fetch_all(&mut *conn)
        .await?;
    let mut accounts = HashMap::with_capacity(rows.len());
    let mut unlocked_metered = Vec::new();
    for row in &rows {
        let id = rows::account_id(row, "id")?;
        let account = rows::account_state(row, now)?;
        if account.plan != Plan::Scale && !row.try_get::<bool, _>("locked")? {
            unlocked_metered.push(id.clone());
        }
        accounts.insert(id, account);
    }
    if unlocked_metered.is_empty() {
        return Ok(accounts);
    }
    let ids = distinct_accounts(unlocked_metered.iter());
    for row in sqlx::query(sql::LOCK_ALL)
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?
    {
        let fresh = rows::account_state(&row, now)?;
        if let Some(account) = accounts.get_mut(rows::account_id(&row, "id")?.as_str()) {
            account.plan = fresh.plan;
            account.credit_balance = fresh.credit_balance;
        }
    }
    Ok(accounts)
}

/// Pro usage and earlier reservations (their forward leases judged by
/// `lease`), read after the locks are held.
async fn read_prior(
    conn: &mut PgConnection,
    jobs: &[Job],
    lease: String,
    loaded: &mut Loaded,
) -> Result<(), StoreError> {
    let (pro_ids, pro_days): (Vec<&str>, Vec<NaiveDate>) = loaded
        .accounts
        .iter()
        .filter(|(_, a)| a.plan == Plan::Pro)
        .map(|(id, a)| (id.as_str(), a.today))
        .unzip();
    let (key_accounts, keys) = key_arrays(jobs.iter().map(|j| (&j.account_id, &j.idempotency_key)));
    let rows: Vec<PgRow> = sqlx::query(sql::PRIOR_READ)
        .bind(&pro_ids)
        .bind(&pro_days)
        .bind(&key_accounts)
        .bind(&keys)
        .bind(lease)
        .fetch_all(&mut *conn)
        .await?;
    for row in &rows {
        if row.try_get::<&str, _>("kind")? == "usage" {
            let id: &str = row.try_get("account_id")?;
            if let Some(account) = loaded.accounts.get_mut(id) {
                account.used_today = row.try_get::<i64, _>("used")?;
            }
            continue;
        }
        loaded
            .prior
            .insert(rows::job_key(row)?, rows::prior_reservation(row)?);
    }
    Ok(())
}

/// Takes out the released rows of keys charged afresh ([`sql::REMOVE_RELEASED`]),
/// when the batch has any: a charge only follows an earlier reservation of
/// its key when that one was released.
async fn remove_released(
    conn: &mut PgConnection,
    charges: &[NewReservation],
    prior: &HashMap<JobKey, PriorReservation>,
) -> Result<(), StoreError> {
    let (accounts, keys): (Vec<&str>, Vec<&str>) = charges
        .iter()
        .filter(|r| prior.contains_key(&JobKey::new(&r.account_id, &r.idempotency_key)))
        .map(|r| (r.account_id.as_str(), r.idempotency_key.as_str()))
        .unzip();
    if accounts.is_empty() {
        return Ok(());
    }
    sqlx::query(sql::REMOVE_RELEASED)
        .bind(&accounts)
        .bind(&keys)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Takes over the forward leases of a batch's replays
/// ([`sql::TAKE_LEASES`]); false when another copy took one first (the
/// batch is decided again, and that copy now waits).
async fn take_leases(conn: &mut PgConnection, leases: &[Lease]) -> Result<bool, StoreError> {
    if leases.is_empty() {
        return Ok(true);
    }
    let taken = sqlx::query(sql::TAKE_LEASES)
        .bind(
            leases
                .iter()
                .map(|l| l.account_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            leases
                .iter()
                .map(|l| l.idempotency_key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(leases.iter().map(|l| l.reservation_id).collect::<Vec<_>>())
        .bind(leases.iter().map(|l| l.last_forward_at).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(taken == leases.len() as u64)
}
