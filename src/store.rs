//! Postgres: owns every SQL statement.
//!
//! A batch of jobs is decided in one transaction: lock the batch's accounts in
//! id order (so workers never deadlock), read their Pro usage and the earlier
//! reservations under the batch's keys, let [`decide_batch`] decide, and write
//! every reservation, ledger row, balance and usage change in one statement.
//! That is a handful of round trips per batch, whatever its size.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row};
use uuid::Uuid;

use crate::config::DatabaseSettings;
use crate::decision::{AccountState, Decision, NewReservation, PriorReservation, decide_batch};
use crate::job::Job;
use crate::plan::{Charge, Limits, Plan, local_day, parse_timezone};
use crate::settle::{
    Report, Reservation as SettleReservation, Settled, State as SettleState, settle_batch,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Why a store call failed, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable, restarting, or timed a statement out:
    /// retry later.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    #[error("account `{0}` does not exist")]
    UnknownAccount(String),
    #[error("account `{id}` already exists on the {plan} plan")]
    AccountExists { id: String, plan: Plan },
    #[error("invalid account: {0}")]
    InvalidAccount(String),
    /// A named constraint refused a write: a bug, never retried blindly.
    #[error("database constraint `{constraint}` violated: {message}")]
    Constraint { constraint: String, message: String },
    #[error("database migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Other(sqlx::Error),
}

impl StoreError {
    /// True when the same call may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::UnknownAccount(_) => "unknown_account",
            StoreError::AccountExists { .. } => "account_exists",
            StoreError::InvalidAccount(_) => "invalid_account",
            StoreError::Constraint { .. } => "constraint",
            StoreError::Migrate(_) => "migrate",
            StoreError::Other(_) => "other",
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(err),
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                if is_transient_sqlstate(&code) {
                    return StoreError::Unavailable(err);
                }
                if let Some(constraint) = db.constraint() {
                    return StoreError::Constraint {
                        constraint: constraint.to_owned(),
                        message: db.message().to_owned(),
                    };
                }
                StoreError::Other(err)
            }
            _ => StoreError::Other(err),
        }
    }
}

/// SQLSTATEs after which the same transaction may succeed: connection
/// failures (08), serialization failures and deadlocks (40), lock and
/// statement timeouts, resource shortages (53) and server shutdown (57P).
fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("40")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code == "55P03"
        || code == "57014"
}

/// What `accounts create` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// A new account; `granted` signup credits were given.
    New { granted: i64 },
    /// It already existed with the same plan; nothing changed.
    Existing,
}

/// One row of the credit ledger.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LedgerEntry {
    pub id: i64,
    pub delta: i64,
    pub kind: String,
    pub balance_after: i64,
    pub idempotency_key: Option<String>,
    pub reservation_id: Option<Uuid>,
    pub at: DateTime<Utc>,
}

/// What `accounts show` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccountSummary {
    pub id: String,
    pub plan: Plan,
    pub timezone: String,
    pub credit_balance: i64,
    /// Sum of the ledger; always equals `credit_balance`.
    pub ledger_sum: i64,
    pub today: NaiveDate,
    pub sends_today: i64,
    /// The daily limit on pro, the balance on free, none on scale.
    pub limit_today: Option<i64>,
    pub recent_ledger: Vec<LedgerEntry>,
}

/// The database of one sendgate process.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    /// One connection for recording broker confirms. Its commits are
    /// asynchronous: a confirm lost in a database crash only means a later
    /// copy of the job is forwarded again (never charged again), and
    /// skipping the WAL flush keeps these writes off the disk's queue. Its
    /// one statement is planned at every run (a few tenths of a ms every
    /// 25 ms): a plan cached while `reservations` was small would scan the
    /// whole table once it is large.
    marks: PgPool,
    limits: Limits,
    /// Accounts last seen on the scale plan. Only a hint for choosing how to
    /// decide a batch: the unlocked path checks every plan it reads, and a
    /// wrong hint costs one read.
    scale_hint: Arc<Mutex<HashSet<String>>>,
}

/// Begins a transaction whose statements are planned at every run, with
/// the batch's own arrays and the tables as they are now. A plan cached
/// while a table was small joins it by scanning it whole, and keeps doing so
/// as it grows (until the connection is replaced or the table analyzed).
/// Used by settling outcomes and expiring holds, whose statements join
/// `reservations`. Deciding does not use it: planning its statements for
/// batches of 250 cost 30-60% more database CPU per job in the benchmark,
/// so its reads probe the primary key instead (`reservation_lookup!`).
const BEGIN_PLANNED: &str = "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan";

/// Hinted scale accounts kept at most; the hint starts over beyond this.
const SCALE_HINT_CAPACITY: usize = 100_000;

/// How an attempt at the unlocked path ended.
enum Unlocked {
    Done(Decided),
    /// Another worker charged one of the keys first: decide again.
    Raced,
    /// A metered account or a released reservation: needs the locked path.
    NeedsLock,
}

impl Store {
    /// Opens a pool without touching the database yet: the gate starts even
    /// when Postgres is down, and reports not ready until it is back.
    ///
    /// # Errors
    /// An unparsable connection string.
    pub fn connect_lazy(settings: &DatabaseSettings, limits: Limits) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(settings.url.expose())
            .map_err(StoreError::Other)?
            .application_name("sendgate")
            .options([(
                "statement_timeout",
                format!("{}ms", settings.statement_timeout_ms),
            )]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout())
            .connect_lazy_with(options.clone());
        let marks = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(settings.acquire_timeout())
            .connect_lazy_with(options.options([
                ("synchronous_commit", "off"),
                ("plan_cache_mode", "force_custom_plan"),
            ]));
        Ok(Self {
            pool,
            marks,
            limits,
            scale_hint: Arc::default(),
        })
    }

    /// Creates the database named in `url` when it does not exist yet.
    ///
    /// # Errors
    /// The server is unreachable or refuses to create it.
    pub async fn create_database_if_missing(url: &str) -> Result<(), StoreError> {
        if Postgres::database_exists(url).await? {
            return Ok(());
        }
        match Postgres::create_database(url).await {
            Ok(()) => Ok(()),
            // Another process created it between the check and here.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// Applies pending migrations (embedded in the binary).
    ///
    /// # Errors
    /// The database is unreachable or a migration fails.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await.map_err(|err| match err {
            sqlx::migrate::MigrateError::Execute(inner) => StoreError::from(inner),
            other => StoreError::Migrate(other),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// True when a connection answers within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let probe = sqlx::query("SELECT 1").execute(&self.pool);
        matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(_)))
    }

    pub async fn close(&self) {
        tokio::join!(self.pool.close(), self.marks.close());
    }

    /// Creates an account; a free one gets its signup grant as a ledger row.
    /// Creating the same account again changes nothing and grants nothing.
    ///
    /// # Errors
    /// [`StoreError::AccountExists`] when it exists on another plan or time
    /// zone; [`StoreError::InvalidAccount`] for a bad id or time zone.
    pub async fn create_account(
        &self,
        id: &str,
        plan: Plan,
        timezone: &str,
    ) -> Result<Created, StoreError> {
        validate_account_id(id)?;
        parse_timezone(timezone).map_err(StoreError::InvalidAccount)?;
        let granted = if plan == Plan::Free {
            self.limits.signup_credits
        } else {
            0
        };
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO accounts (id, plan, timezone, credit_balance) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(plan.as_str())
        .bind(timezone)
        .bind(granted)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            let row = sqlx::query("SELECT plan, timezone FROM accounts WHERE id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
            let existing: Plan = parse_plan(row.try_get("plan")?)?;
            let existing_tz: String = row.try_get("timezone")?;
            if existing != plan || existing_tz != timezone {
                return Err(StoreError::AccountExists {
                    id: id.to_owned(),
                    plan: existing,
                });
            }
            return Ok(Created::Existing);
        }
        if plan == Plan::Free {
            sqlx::query(
                "INSERT INTO credit_ledger (account_id, delta, kind, balance_after, note)
                 VALUES ($1, $2, 'signup_grant', $2, 'signup grant')",
            )
            .bind(id)
            .bind(granted)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Created::New { granted })
    }

    /// Changes an account's plan; it applies from the next job on. Credits
    /// are kept on record and never granted by a plan change.
    ///
    /// # Errors
    /// [`StoreError::UnknownAccount`].
    pub async fn set_plan(&self, id: &str, plan: Plan) -> Result<(), StoreError> {
        let updated =
            sqlx::query("UPDATE accounts SET plan = $2, updated_at = now() WHERE id = $1")
                .bind(id)
                .bind(plan.as_str())
                .execute(&self.pool)
                .await?
                .rows_affected();
        if updated == 0 {
            return Err(StoreError::UnknownAccount(id.to_owned()));
        }
        Ok(())
    }

    /// An account's plan, balance, usage today and recent ledger rows.
    ///
    /// # Errors
    /// [`StoreError::UnknownAccount`].
    pub async fn account_summary(
        &self,
        id: &str,
        now: DateTime<Utc>,
        ledger_rows: i64,
    ) -> Result<AccountSummary, StoreError> {
        let row = sqlx::query(
            "SELECT a.plan, a.timezone, a.credit_balance,
                    (SELECT coalesce(sum(delta), 0)::int8 FROM credit_ledger WHERE account_id = a.id) AS ledger_sum
             FROM accounts a WHERE a.id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::UnknownAccount(id.to_owned()))?;
        let plan = parse_plan(row.try_get("plan")?)?;
        let timezone: String = row.try_get("timezone")?;
        let tz = parse_timezone(&timezone).map_err(StoreError::InvalidAccount)?;
        let credit_balance: i64 = row.try_get("credit_balance")?;
        let today = local_day(now, tz);
        let sends_today: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM reservations
             WHERE account_id = $1 AND created_at >= $2 AND created_at < $3",
        )
        .bind(id)
        .bind(crate::plan::next_day_start(now, tz) - chrono::Duration::days(1))
        .bind(crate::plan::next_day_start(now, tz))
        .fetch_one(&self.pool)
        .await?;
        let pro_used: Option<i32> =
            sqlx::query_scalar("SELECT used FROM daily_usage WHERE account_id = $1 AND day = $2")
                .bind(id)
                .bind(today)
                .fetch_optional(&self.pool)
                .await?;
        let (sends_today, limit_today) = match plan {
            Plan::Pro => (
                i64::from(pro_used.unwrap_or(0)),
                Some(self.limits.daily_sends),
            ),
            Plan::Free => (sends_today, Some(credit_balance)),
            Plan::Scale => (sends_today, None),
        };
        let recent_ledger = sqlx::query(
            "SELECT id, delta, kind, balance_after, idempotency_key, reservation_id, created_at
             FROM credit_ledger WHERE account_id = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(id)
        .bind(ledger_rows)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|row| {
            Ok(LedgerEntry {
                id: row.try_get("id")?,
                delta: row.try_get("delta")?,
                kind: row.try_get("kind")?,
                balance_after: row.try_get("balance_after")?,
                idempotency_key: row.try_get("idempotency_key")?,
                reservation_id: row.try_get("reservation_id")?,
                at: row.try_get("created_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(AccountSummary {
            id: id.to_owned(),
            plan,
            timezone,
            credit_balance,
            ledger_sum: row.try_get("ledger_sum")?,
            today,
            sends_today,
            limit_today,
            recent_ledger,
        })
    }

    /// Decides and records a batch of valid jobs in one transaction; the
    /// decisions come back in the jobs' order.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the batch should be retried; nothing
    /// was recorded then.
    pub async fn decide(&self, jobs: &[Job], now: DateTime<Utc>) -> Result<Decided, StoreError> {
        if jobs.is_empty() {
            return Ok(Decided::default());
        }
        // A scale account is not locked, so two workers may charge the same
        // new key at once: the second insert then finds the first one's row,
        // and deciding the batch again (now seeing that row) is the answer.
        for _ in 0..3 {
            if self.hinted_scale(jobs) {
                match self.try_decide_unlocked(jobs, now).await? {
                    Unlocked::Done(decided) => return Ok(decided),
                    Unlocked::Raced => continue,
                    Unlocked::NeedsLock => {}
                }
            }
            if let Some(decisions) = self.try_decide(jobs, now).await? {
                return Ok(decisions);
            }
        }
        Err(StoreError::Unavailable(sqlx::Error::Protocol(
            "the batch kept racing another worker on the same keys".to_owned(),
        )))
    }

    /// Whether every account of the batch was on the scale plan when last
    /// seen.
    fn hinted_scale(&self, jobs: &[Job]) -> bool {
        let hint = self.scale_hint.lock().unwrap_or_else(|e| e.into_inner());
        jobs.iter().all(|j| hint.contains(&j.account_id))
    }

    fn remember_plans(&self, accounts: &HashMap<String, AccountState>) {
        let mut hint = self.scale_hint.lock().unwrap_or_else(|e| e.into_inner());
        if hint.len() > SCALE_HINT_CAPACITY {
            hint.clear();
        }
        for (id, account) in accounts {
            if account.plan == Plan::Scale {
                if !hint.contains(id) {
                    hint.insert(id.clone());
                }
            } else {
                hint.remove(id);
            }
        }
    }

    /// The unlocked path, for a batch whose accounts are all on the scale
    /// plan: scale has no balance or daily count to protect, so nothing is
    /// locked and no transaction is needed. One statement reads the accounts
    /// and earlier reservations, one records the new charges (atomically: a
    /// key another worker charged in between fails the whole statement, and
    /// the batch is decided again). Two round trips instead of five.
    async fn try_decide_unlocked(
        &self,
        jobs: &[Job],
        now: DateTime<Utc>,
    ) -> Result<Unlocked, StoreError> {
        let mut account_ids: Vec<&str> = jobs.iter().map(|j| j.account_id.as_str()).collect();
        account_ids.sort_unstable();
        account_ids.dedup();
        let (key_accounts, keys) = batch_keys(jobs);
        // Both statements on one connection: each return to the pool costs
        // a round trip (sqlx checks the connection with a Sync).
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::query(UNLOCKED_READ)
            .bind(&account_ids)
            .bind(&key_accounts)
            .bind(&keys)
            .fetch_all(&mut *conn)
            .await?;
        let mut accounts = HashMap::with_capacity(account_ids.len());
        let mut prior = HashMap::new();
        for row in rows {
            let kind: &str = row.try_get("kind")?;
            let account_id: String = row.try_get("account_id")?;
            if kind == "account" {
                let plan = parse_plan(row.try_get("plan")?)?;
                let timezone: String = row.try_get("timezone")?;
                let tz = parse_timezone(&timezone).unwrap_or(Tz::UTC);
                accounts.insert(
                    account_id,
                    AccountState {
                        plan,
                        timezone: tz,
                        credit_balance: row.try_get("credit_balance")?,
                        today: local_day(now, tz),
                        used_today: 0,
                    },
                );
            } else {
                let reservation = prior_reservation(&row)?;
                if reservation.released {
                    // Charged afresh through the locked path's upsert.
                    return Ok(Unlocked::NeedsLock);
                }
                prior.insert((account_id, row.try_get("idempotency_key")?), reservation);
            }
        }
        if accounts.values().any(|a| a.plan != Plan::Scale) {
            self.remember_plans(&accounts);
            return Ok(Unlocked::NeedsLock);
        }
        let (decisions, effects) =
            decide_batch(jobs, &accounts, &prior, self.limits, now, Uuid::now_v7);
        if !(effects.ledger.is_empty() && effects.balances.is_empty() && effects.usage.is_empty()) {
            return Ok(Unlocked::NeedsLock);
        }
        if effects.is_empty() {
            return Ok(Unlocked::Done(Decided {
                decisions,
                batch: None,
            }));
        }
        let batch = Uuid::now_v7();
        let query = sqlx::query(
            "WITH forward_batch AS (
                 INSERT INTO forward_batches (id) VALUES ($9)
             )
             INSERT INTO reservations
                 (id, account_id, idempotency_key, payload_sha256, plan, charge, usage_day,
                  remaining, batch_id)
             SELECT *, $9::uuid FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[],
                                            $5::text[], $6::text[], $7::date[], $8::int8[])",
        );
        match bind_reservations(query, &effects.reservations)
            .bind(batch)
            .execute(&mut *conn)
            .await
        {
            Ok(_) => Ok(Unlocked::Done(Decided {
                decisions,
                batch: Some(batch),
            })),
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505") => {
                Ok(Unlocked::Raced)
            }
            Err(err) => Err(err.into()),
        }
    }

    /// One attempt at [`Store::decide`]; `None` when a concurrent charge of
    /// the same key won and the batch must be decided again.
    async fn try_decide(
        &self,
        jobs: &[Job],
        now: DateTime<Utc>,
    ) -> Result<Option<Decided>, StoreError> {
        let mut account_ids: Vec<&str> = jobs.iter().map(|j| j.account_id.as_str()).collect();
        account_ids.sort_unstable();
        account_ids.dedup();

        let mut tx = self.pool.begin().await?;

        // Metered accounts (free, pro) are locked, in id order so workers never
        // deadlock (the ids are sorted, and each is probed in turn through the
        // primary key, like the keys in `reservation_lookup!`); rows read
        // after waiting for a lock are the committed ones. Scale accounts have
        // no balance to protect and stay unlocked, so a hot scale account does
        // not serialize its workers.
        let rows = sqlx::query(
            "SELECT k.id, coalesce(m.plan, a.plan) AS plan,
                    coalesce(m.timezone, a.timezone) AS timezone,
                    coalesce(m.credit_balance, a.credit_balance) AS credit_balance,
                    (m.plan IS NOT NULL) AS locked
             FROM unnest($1::text[]) AS k(id)
             CROSS JOIN LATERAL (
                 SELECT plan, timezone, credit_balance FROM accounts
                 WHERE id = k.id OFFSET 0
             ) a
             LEFT JOIN LATERAL (
                 SELECT plan, timezone, credit_balance FROM accounts
                 WHERE id = k.id AND plan <> 'scale' OFFSET 0 FOR UPDATE
             ) m ON true",
        )
        .bind(&account_ids)
        .fetch_all(&mut *tx)
        .await?;
        // Rows the lock waited for come back as committed after the wait (the
        // `metered` columns); the outer scan's snapshot may be older, so only
        // locked values are trusted for metered accounts.
        let mut accounts: HashMap<String, AccountState> = HashMap::with_capacity(rows.len());
        let mut unlocked_metered = Vec::new();
        for row in rows {
            let id: String = row.try_get("id")?;
            let plan = parse_plan(row.try_get("plan")?)?;
            if plan != Plan::Scale && !row.try_get::<bool, _>("locked")? {
                // It changed plan while we waited: read it again, locked.
                unlocked_metered.push(id.clone());
            }
            let timezone: String = row.try_get("timezone")?;
            // Time zones are validated on the way in; UTC is the safe fallback
            // for a row edited by hand.
            let tz = parse_timezone(&timezone).unwrap_or(Tz::UTC);
            accounts.insert(
                id,
                AccountState {
                    plan,
                    timezone: tz,
                    credit_balance: row.try_get("credit_balance")?,
                    today: local_day(now, tz),
                    used_today: 0,
                },
            );
        }
        if !unlocked_metered.is_empty() {
            unlocked_metered.sort_unstable();
            let fresh: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT k.id, a.plan, a.credit_balance
                 FROM unnest($1::text[]) AS k(id)
                 CROSS JOIN LATERAL (
                     SELECT plan, credit_balance FROM accounts
                     WHERE id = k.id OFFSET 0 FOR UPDATE
                 ) a",
            )
            .bind(&unlocked_metered)
            .fetch_all(&mut *tx)
            .await?;
            for (id, plan, balance) in fresh {
                if let Some(account) = accounts.get_mut(&id) {
                    account.plan = parse_plan(plan)?;
                    account.credit_balance = balance;
                }
            }
        }

        // Pro usage and earlier reservations, read after the locks are held.
        let (pro_ids, pro_days): (Vec<&str>, Vec<NaiveDate>) = accounts
            .iter()
            .filter(|(_, a)| a.plan == Plan::Pro)
            .map(|(id, a)| (id.as_str(), a.today))
            .unzip();
        let (key_accounts, keys) = batch_keys(jobs);
        let rows = sqlx::query(PRIOR_READ)
            .bind(&pro_ids)
            .bind(&pro_days)
            .bind(&key_accounts)
            .bind(&keys)
            .fetch_all(&mut *tx)
            .await?;
        let mut prior = HashMap::new();
        for row in rows {
            let kind: &str = row.try_get("kind")?;
            let account_id: String = row.try_get("account_id")?;
            if kind == "usage" {
                if let Some(account) = accounts.get_mut(&account_id) {
                    account.used_today = row.try_get::<i64, _>("used")?;
                }
                continue;
            }
            prior.insert(
                (account_id, row.try_get("idempotency_key")?),
                prior_reservation(&row)?,
            );
        }

        self.remember_plans(&accounts);
        let (decisions, effects) =
            decide_batch(jobs, &accounts, &prior, self.limits, now, Uuid::now_v7);
        let batch = (!effects.is_empty()).then(Uuid::now_v7);

        if let Some(batch) = batch {
            let r = &effects.reservations;
            let l = &effects.ledger;
            let query = sqlx::query(
                "WITH forward_batch AS (
                     INSERT INTO forward_batches (id) VALUES ($19)
                 ), new_reservations AS (
                     INSERT INTO reservations
                         (id, account_id, idempotency_key, payload_sha256, plan, charge, usage_day,
                          remaining, batch_id)
                     SELECT *, $19::uuid FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[],
                                          $5::text[], $6::text[], $7::date[], $8::int8[])
                     -- A released reservation is charged afresh; any other
                     -- existing row means another worker won the race.
                     ON CONFLICT (account_id, idempotency_key) DO UPDATE SET
                         id = EXCLUDED.id, payload_sha256 = EXCLUDED.payload_sha256,
                         plan = EXCLUDED.plan, charge = EXCLUDED.charge,
                         usage_day = EXCLUDED.usage_day, remaining = EXCLUDED.remaining,
                         forward_confirmed = false, confirmed_at = NULL, created_at = now(),
                         batch_id = EXCLUDED.batch_id,
                         state = 'held', settled_at = NULL, settle_detail = NULL
                     WHERE reservations.state = 'released'
                     RETURNING 1
                 ), ledger AS (
                     INSERT INTO credit_ledger
                         (account_id, delta, kind, balance_after, idempotency_key, reservation_id)
                     SELECT account_id, -1, 'send', balance_after, idempotency_key, reservation_id
                     FROM unnest($9::text[], $10::int8[], $11::text[], $12::uuid[])
                          AS t(account_id, balance_after, idempotency_key, reservation_id)
                 ), balances AS (
                     UPDATE accounts a SET credit_balance = b.balance, updated_at = now()
                     FROM unnest($13::text[], $14::int8[]) AS b(id, balance)
                     WHERE a.id = b.id
                 ), usage AS (
                     INSERT INTO daily_usage (account_id, day, used, daily_limit)
                     SELECT account_id, day, used, $18
                     FROM unnest($15::text[], $16::date[], $17::int4[]) AS u(account_id, day, used)
                     ON CONFLICT (account_id, day)
                     DO UPDATE SET used = EXCLUDED.used, daily_limit = EXCLUDED.daily_limit
                 )
                 SELECT count(*) FROM new_reservations",
            );
            let inserted: i64 = bind_reservations(query, r)
                .bind(l.iter().map(|x| x.account_id.as_str()).collect::<Vec<_>>())
                .bind(l.iter().map(|x| x.balance_after).collect::<Vec<_>>())
                .bind(
                    l.iter()
                        .map(|x| x.idempotency_key.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(l.iter().map(|x| x.reservation_id).collect::<Vec<_>>())
                .bind(
                    effects
                        .balances
                        .iter()
                        .map(|x| x.0.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(effects.balances.iter().map(|x| x.1).collect::<Vec<_>>())
                .bind(
                    effects
                        .usage
                        .iter()
                        .map(|x| x.0.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(effects.usage.iter().map(|x| x.1).collect::<Vec<_>>())
                .bind(
                    effects
                        .usage
                        .iter()
                        .map(|x| i32::try_from(x.2).unwrap_or(i32::MAX))
                        .collect::<Vec<_>>(),
                )
                .bind(i32::try_from(self.limits.daily_sends).unwrap_or(i32::MAX))
                .bind(batch)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
            if inserted != r.len() as i64 {
                tx.rollback().await?;
                return Ok(None);
            }
        }
        tx.commit().await?;
        Ok(Some(Decided { decisions, batch }))
    }

    /// Settles reservations with delivery outcomes, in one transaction;
    /// results come back in the reports' order.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the batch should be retried.
    pub async fn settle(
        &self,
        reports: &[Report],
        now: DateTime<Utc>,
    ) -> Result<Vec<Settled>, StoreError> {
        if reports.is_empty() {
            return Ok(Vec::new());
        }
        let mut account_ids: Vec<&str> = reports.iter().map(|r| r.account_id.as_str()).collect();
        account_ids.sort_unstable();
        account_ids.dedup();
        let mut tx = self.pool.begin_with(BEGIN_PLANNED).await?;
        // Same lock order as deciding: accounts by id, then their rows.
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT id, plan, timezone, credit_balance FROM accounts
             WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        )
        .bind(&account_ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut accounts = HashMap::with_capacity(rows.len());
        for (id, plan, timezone, credit_balance) in rows {
            let tz = parse_timezone(&timezone).unwrap_or(Tz::UTC);
            accounts.insert(
                id,
                AccountState {
                    plan: parse_plan(plan)?,
                    timezone: tz,
                    credit_balance,
                    today: local_day(now, tz),
                    used_today: 0,
                },
            );
        }
        let (key_accounts, keys): (Vec<&str>, Vec<&str>) = reports
            .iter()
            .map(|r| (r.account_id.as_str(), r.idempotency_key.as_str()))
            .unzip();
        let rows: Vec<HeldRow> = sqlx::query_as(
            "SELECT r.account_id, r.idempotency_key, r.id, r.charge, r.usage_day, r.state, u.used
                 FROM reservations r
                 LEFT JOIN daily_usage u ON u.account_id = r.account_id AND u.day = r.usage_day
                 WHERE (r.account_id, r.idempotency_key) IN
                       (SELECT * FROM unnest($1::text[], $2::text[]))
                 FOR UPDATE OF r",
        )
        .bind(&key_accounts)
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await?;
        let mut reservations = HashMap::with_capacity(rows.len());
        let mut usage = HashMap::new();
        for (account_id, key, id, charge, usage_day, state, used) in rows {
            if let (Some(day), Some(used)) = (usage_day, used) {
                usage.insert((account_id.clone(), day), i64::from(used));
            }
            reservations.insert(
                (account_id, key),
                SettleReservation {
                    id,
                    charge: Charge::from_str(&charge).map_err(StoreError::InvalidAccount)?,
                    usage_day,
                    state: SettleState::parse(&state),
                },
            );
        }
        let (results, effects) = settle_batch(reports, &reservations, &accounts, &usage, now);
        if !effects.settled.is_empty() {
            let st = &effects.settled;
            let rl = &effects.releases;
            sqlx::query(
                "WITH settled AS (
                     UPDATE reservations r
                     SET state = s.state, settled_at = now(), settle_detail = s.detail
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                          AS s(account_id, idempotency_key, state, detail)
                     WHERE r.account_id = s.account_id AND r.idempotency_key = s.idempotency_key
                 ), releases AS (
                     INSERT INTO credit_ledger
                         (account_id, delta, kind, balance_after, idempotency_key, reservation_id, note)
                     SELECT account_id, 1, 'release', balance_after, idempotency_key, reservation_id,
                            'delivery failed'
                     FROM unnest($5::text[], $6::int8[], $7::text[], $8::uuid[])
                          AS t(account_id, balance_after, idempotency_key, reservation_id)
                 ), balances AS (
                     UPDATE accounts a SET credit_balance = b.balance, updated_at = now()
                     FROM unnest($9::text[], $10::int8[]) AS b(id, balance)
                     WHERE a.id = b.id
                 )
                 UPDATE daily_usage d SET used = u.used
                 FROM unnest($11::text[], $12::date[], $13::int4[]) AS u(account_id, day, used)
                 WHERE d.account_id = u.account_id AND d.day = u.day",
            )
            .bind(st.iter().map(|x| x.0.as_str()).collect::<Vec<_>>())
            .bind(st.iter().map(|x| x.1.as_str()).collect::<Vec<_>>())
            .bind(st.iter().map(|x| x.2.as_str()).collect::<Vec<_>>())
            .bind(st.iter().map(|x| x.3.as_deref()).collect::<Vec<_>>())
            .bind(rl.iter().map(|x| x.account_id.as_str()).collect::<Vec<_>>())
            .bind(rl.iter().map(|x| x.balance_after).collect::<Vec<_>>())
            .bind(rl.iter().map(|x| x.idempotency_key.as_str()).collect::<Vec<_>>())
            .bind(rl.iter().map(|x| x.reservation_id).collect::<Vec<_>>())
            .bind(effects.balances.iter().map(|x| x.0.as_str()).collect::<Vec<_>>())
            .bind(effects.balances.iter().map(|x| x.1).collect::<Vec<_>>())
            .bind(effects.usage.iter().map(|x| x.0.as_str()).collect::<Vec<_>>())
            .bind(effects.usage.iter().map(|x| x.1).collect::<Vec<_>>())
            .bind(
                effects
                    .usage
                    .iter()
                    .map(|x| i32::try_from(x.2).unwrap_or(0))
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(results)
    }

    /// Commits holds older than `max_age` that never got an outcome, at
    /// most `limit` at a time. Safe with many workers: rows another sweep is
    /// committing are skipped, never done twice.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when it should be retried.
    pub async fn expire_holds(&self, max_age: Duration, limit: i64) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_PLANNED).await?;
        let committed = sqlx::query(
            "UPDATE reservations r SET state = 'committed', settled_at = now(),
                    settle_detail = 'no outcome within the hold time'
             FROM (SELECT account_id, idempotency_key FROM reservations
                   WHERE state = 'held' AND created_at < now() - $1::interval
                   ORDER BY created_at LIMIT $2
                   FOR UPDATE SKIP LOCKED) old
             WHERE r.account_id = old.account_id AND r.idempotency_key = old.idempotency_key
               AND r.state = 'held'",
        )
        .bind(format!("{} milliseconds", max_age.as_millis()))
        .bind(limit)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(committed)
    }

    /// A page of an account's ledger, newest first, strictly before the row
    /// id `before` when given.
    ///
    /// # Errors
    /// [`StoreError::UnknownAccount`].
    pub async fn ledger_page(
        &self,
        id: &str,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = $1)")
                .bind(id)
                .fetch_one(&self.pool)
                .await?;
        if !exists {
            return Err(StoreError::UnknownAccount(id.to_owned()));
        }
        let rows = sqlx::query(
            "SELECT id, delta, kind, balance_after, idempotency_key, reservation_id, created_at
             FROM credit_ledger WHERE account_id = $1 AND ($2::int8 IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3",
        )
        .bind(id)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(LedgerEntry {
                    id: row.try_get("id")?,
                    delta: row.try_get("delta")?,
                    kind: row.try_get("kind")?,
                    balance_after: row.try_get("balance_after")?,
                    idempotency_key: row.try_get("idempotency_key")?,
                    reservation_id: row.try_get("reservation_id")?,
                    at: row.try_get("created_at")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Records that the broker confirmed forwards, so a later copy of a job
    /// is dropped as a duplicate instead of forwarded again: whole batches
    /// by id (one row each), and forwards of earlier charges by key.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when it should be retried.
    pub async fn confirm_forwards(
        &self,
        batches: &[Uuid],
        keys: &[(&str, &str)],
    ) -> Result<(), StoreError> {
        if batches.is_empty() && keys.is_empty() {
            return Ok(());
        }
        let (accounts, keys): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        sqlx::query(
            "WITH batches AS (
                 UPDATE forward_batches SET confirmed_at = now()
                 WHERE id = ANY($1) AND confirmed_at IS NULL
             )
             UPDATE reservations r SET forward_confirmed = true, confirmed_at = now()
             FROM unnest($2::text[], $3::text[]) AS k(account_id, idempotency_key)
             WHERE r.account_id = k.account_id AND r.idempotency_key = k.idempotency_key
               AND NOT r.forward_confirmed",
        )
        .bind(batches)
        .bind(&accounts)
        .bind(&keys)
        .execute(&self.marks)
        .await?;
        Ok(())
    }
}

/// The distinct (account, key) pairs of a batch, as two parallel arrays.
fn batch_keys(jobs: &[Job]) -> (Vec<&str>, Vec<&str>) {
    let mut pairs: Vec<(&str, &str)> = jobs
        .iter()
        .map(|j| (j.account_id.as_str(), j.idempotency_key.as_str()))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    pairs.into_iter().unzip()
}

/// Binds new reservations as parameters $1 to $8 (parallel arrays).
fn bind_reservations<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    r: &'q [NewReservation],
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(r.iter().map(|x| x.id).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.account_id.as_str()).collect::<Vec<_>>())
        .bind(
            r.iter()
                .map(|x| x.idempotency_key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            r.iter()
                .map(|x| x.payload_sha256.to_vec())
                .collect::<Vec<_>>(),
        )
        .bind(r.iter().map(|x| x.plan.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.charge.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.usage_day).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.remaining).collect::<Vec<_>>())
}

/// A reservation row as the decision reads it (the columns of
/// [`RESERVATION_LOOKUP`]).
fn prior_reservation(row: &PgRow) -> Result<PriorReservation, StoreError> {
    let hash: Vec<u8> = row.try_get("payload_sha256")?;
    let charge: String = row.try_get("charge")?;
    Ok(PriorReservation {
        id: row.try_get("id")?,
        payload_sha256: hash.try_into().unwrap_or([0; 32]),
        plan: parse_plan(row.try_get("plan")?)?,
        charge: Charge::from_str(&charge).map_err(StoreError::InvalidAccount)?,
        remaining: row.try_get("remaining")?,
        forward_confirmed: row.try_get("forward_confirmed")?,
        released: row.try_get::<Option<String>, _>("state")?.as_deref() == Some("released"),
    })
}

/// SQL text (a literal, for `concat!`): the earlier reservations of a
/// batch's keys (`$accounts`, `$keys`: two parallel text arrays), as
/// `kind = 'reservation'` rows in the column order of [`prior_reservation`].
///
/// Each key is looked up on its own through the primary key (a LATERAL
/// subquery, fenced by OFFSET 0 so the planner cannot turn it into a join).
/// A statement's plan is prepared once per connection, often while the
/// tables are still small and without statistics; a join the planner chose
/// then would scan the whole table for every batch once it has grown, until
/// the next ANALYZE.
macro_rules! reservation_lookup {
    ($accounts:literal, $keys:literal) => {
        concat!(
            "SELECT 'reservation', k.account_id, k.idempotency_key, NULL::int8, r.id,
                    r.payload_sha256, r.plan, r.charge, r.remaining, r.forward_confirmed,
                    r.state, NULL::text, NULL::int8
             FROM unnest(",
            $accounts,
            "::text[], ",
            $keys,
            "::text[])
                  AS k(account_id, idempotency_key)
             CROSS JOIN LATERAL (
                 SELECT r.id, r.payload_sha256, r.plan, r.charge, r.remaining,
                        r.forward_confirmed OR b.confirmed_at IS NOT NULL AS forward_confirmed,
                        r.state
                 FROM reservations r LEFT JOIN forward_batches b ON b.id = r.batch_id
                 WHERE r.account_id = k.account_id AND r.idempotency_key = k.idempotency_key
                 OFFSET 0
             ) r"
        )
    };
}

/// Pro usage ($1 accounts, $2 days) and earlier reservations ($3, $4), read
/// once the batch's metered accounts are locked.
const PRIOR_READ: &str = concat!(
    "SELECT 'usage' AS kind, k.account_id, NULL::text AS idempotency_key,
            u.used::int8 AS used, NULL::uuid AS id, NULL::bytea AS payload_sha256,
            NULL::text AS plan, NULL::text AS charge, NULL::int8 AS remaining,
            NULL::bool AS forward_confirmed, NULL::text AS state,
            NULL::text AS timezone, NULL::int8 AS credit_balance
     FROM unnest($1::text[], $2::date[]) AS k(account_id, day)
     CROSS JOIN LATERAL (
         SELECT u.used FROM daily_usage u
         WHERE u.account_id = k.account_id AND u.day = k.day OFFSET 0
     ) u
     UNION ALL ",
    reservation_lookup!("$3", "$4")
);

/// Accounts ($1) and earlier reservations ($2, $3) in one unlocked read,
/// for a batch of scale accounts.
const UNLOCKED_READ: &str = concat!(
    "SELECT 'account' AS kind, a.id AS account_id, NULL::text AS idempotency_key,
            NULL::int8 AS used, NULL::uuid AS id, NULL::bytea AS payload_sha256,
            a.plan, NULL::text AS charge, NULL::int8 AS remaining,
            NULL::bool AS forward_confirmed, NULL::text AS state,
            a.timezone, a.credit_balance
     FROM accounts a WHERE a.id = ANY($1)
     UNION ALL ",
    reservation_lookup!("$2", "$3")
);

/// The decisions of a batch, and the id of the forward batch its new
/// charges belong to (none when it charged nothing).
#[derive(Debug, Clone, Default)]
pub struct Decided {
    pub decisions: Vec<Decision>,
    pub batch: Option<Uuid>,
}

/// A reservation row as settling reads it: account, key, id, charge,
/// usage day, state, and that day's Pro usage.
type HeldRow = (
    String,
    String,
    Uuid,
    String,
    Option<NaiveDate>,
    String,
    Option<i32>,
);

fn parse_plan(name: String) -> Result<Plan, StoreError> {
    name.parse()
        .map_err(|err: crate::plan::UnknownPlan| StoreError::InvalidAccount(err.to_string()))
}

fn validate_account_id(id: &str) -> Result<(), StoreError> {
    let chars = id.chars().count();
    if chars == 0 || chars > crate::job::MAX_ACCOUNT_ID_CHARS || id.chars().any(char::is_control) {
        return Err(StoreError::InvalidAccount(format!(
            "account id {id:?} must be 1 to {} printable characters",
            crate::job::MAX_ACCOUNT_ID_CHARS
        )));
    }
    Ok(())
}
