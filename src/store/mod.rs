//! Postgres: owns every SQL statement.
//!
//! - [`error`]: [`StoreError`], and which failures are worth retrying;
//! - [`rows`]: every row shape decoded once into the domain's types;
//! - [`sql`]: the long statements with the reasoning for them;
//! - [`decide`]: a batch of jobs decided and recorded (the hot path);
//! - [`settle`]: delivery reports settled, expired holds committed;
//! - [`marks`]: confirmed forwards recorded;
//! - [`accounts`]: creating, changing and showing accounts;
//! - [`events`]: the outbox of threshold events, and its relay's reads;
//! - [`adjust`]: credits added or taken by hand, audited;
//! - [`jobs`]: what happened to a job, and an account's held charges;
//! - [`usage`]: usage counts, rolled up and read per hour, day or campaign;
//! - [`retention`]: the sweep's removals of what outlived its window;
//! - [`audit`]: the self-audit of the money's invariants;
//! - [`primary`]: finding the writable primary among the database hosts.
//!
//! A batch of jobs is decided in one transaction: lock the batch's metered
//! accounts in one order (so workers never deadlock), read their Pro usage
//! and the earlier reservations under the batch's keys, let the pure
//! [`crate::domain::decision`] decide, and write every reservation, ledger
//! row, balance and usage change in one statement. That is a handful of
//! round trips per batch, whatever its size.

mod accounts;
mod adjust;
mod audit;
mod decide;
mod error;
mod events;
mod jobs;
mod marks;
mod primary;
mod retention;
mod rows;
mod settle;
mod sql;
mod usage;

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::Postgres;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

pub use accounts::{AccountSummary, Created};
pub use adjust::{Adjusted, Adjustment};
pub use audit::{AuditReport, AuditRules, Check, MAX_LISTED, Violation};
pub use decide::Recorded;
pub use error::StoreError;
pub use events::{Backlog, Claimed, EventRules, OutboxEvent};
pub use jobs::{ChargeStatus, Hold, JobState, JobStatus, Refusal, RefusalStatus};
pub use marks::ConfirmedForward;
pub use rows::LedgerEntry;
pub use usage::{
    DEFAULT_CAMPAIGNS_PER_PAGE, Granularity, Grouping, MAX_CAMPAIGNS_PER_PAGE, UsageReport,
    UsageRow, max_range,
};

use crate::config::DatabaseSettings;
use crate::domain::decision::{BalanceChange, UsageChange};
use crate::domain::plan::Limits;

/// A statement with its parameters bound.
type Query<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

/// Binds the next five parameters: balances (account ids, balances) and
/// Pro usage (account ids, days, sends used), as parallel arrays.
fn bind_changes<'q>(
    query: Query<'q>,
    balances: &'q [BalanceChange],
    usage: &'q [UsageChange],
) -> Query<'q> {
    query
        .bind(
            balances
                .iter()
                .map(|x| x.account_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(balances.iter().map(|x| x.balance).collect::<Vec<_>>())
        .bind(
            usage
                .iter()
                .map(|x| x.account_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(usage.iter().map(|x| x.day).collect::<Vec<_>>())
        .bind(
            usage
                .iter()
                .map(|x| i32::try_from(x.used).unwrap_or(i32::MAX))
                .collect::<Vec<_>>(),
        )
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The database of one sendgate process.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    /// One connection for recording broker confirms. Its commits are
    /// asynchronous: a confirm lost in a database crash only means a later
    /// copy of the job is forwarded again (never charged again), and
    /// skipping the WAL flush keeps these writes off the disk's queue (they
    /// sit on the ack path). Its one statement is planned at every run (a few
    /// tenths of a ms a batch): a plan cached while `reservations` was small
    /// would scan the whole table once it is large.
    marks: PgPool,
    limits: Limits,
    /// Accounts last seen on the scale plan. Only a hint for choosing how to
    /// decide a batch: the unlocked path checks every plan it reads, and a
    /// wrong hint costs one read.
    scale_hint: Arc<Mutex<HashSet<String>>>,
    /// With several hosts in `database.url`: which one is writable.
    primary: Option<Arc<primary::Primary>>,
    /// Threshold events: the thresholds, and the relay's wake-up.
    events: Arc<EventRules>,
    /// How long a charge's forward is presumed on its way before a copy
    /// may forward it again (`[gate] forward_lease_secs`).
    forward_lease: Duration,
    /// The deduplication window `migrate` stores in the database (`None`:
    /// keep every charge).
    dedup_window: Option<Duration>,
}

/// The deduplication window of a store nobody set one on: the default of
/// `[reservations] dedup_window_secs`.
const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(7 * 86_400);

/// The forward lease of a store nobody set one on: the default of
/// `[gate] forward_lease_secs`.
const DEFAULT_FORWARD_LEASE: Duration = Duration::from_secs(60);

/// What the marks pool sets on top of the main pool's options.
const MARKS_OPTIONS: &[(&str, &str)] = &[
    ("synchronous_commit", "off"),
    ("plan_cache_mode", "force_custom_plan"),
];

impl Store {
    /// Opens a pool without touching the database yet: the gate starts even
    /// when Postgres is down, and reports not ready until it is back.
    ///
    /// # Errors
    /// An unparsable connection string.
    pub fn connect_lazy(settings: &DatabaseSettings, limits: Limits) -> Result<Self, StoreError> {
        let hosts = crate::endpoints::postgres_hosts(settings.url.expose())
            .map_err(|problem| StoreError::Other(sqlx::Error::Configuration(problem.into())))?;
        let timeout = format!("{}ms", settings.statement_timeout_ms);
        let hosts = hosts
            .iter()
            .map(|url| {
                let options = PgConnectOptions::from_str(url)
                    .map_err(StoreError::Other)?
                    .application_name("sendgate")
                    .options([("statement_timeout", timeout.as_str())]);
                Ok((crate::endpoints::node_label(url), options))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let options = hosts[0].1.clone();
        let primary = (hosts.len() > 1).then(|| Arc::new(primary::Primary::new(hosts)));
        let pool_options = |max: u32| {
            let mut pool = PgPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(settings.acquire_timeout());
            if let Some(primary) = &primary {
                let primary = primary.clone();
                pool = pool
                    .after_connect(|connection, _| {
                        Box::pin(primary::Primary::check_writable(connection))
                    })
                    .before_acquire(move |_, meta| {
                        let current = primary.still_current(meta.age);
                        Box::pin(async move { Ok(current) })
                    });
            }
            pool
        };
        let pool = pool_options(settings.max_connections).connect_lazy_with(options.clone());
        let marks =
            pool_options(1).connect_lazy_with(options.options(MARKS_OPTIONS.iter().copied()));
        Ok(Self {
            pool,
            marks,
            limits,
            scale_hint: Arc::default(),
            primary,
            events: Arc::default(),
            forward_lease: DEFAULT_FORWARD_LEASE,
            dedup_window: Some(DEFAULT_DEDUP_WINDOW),
        })
    }

    /// Sets the deduplication window `migrate` stores (`[reservations]
    /// dedup_window_secs`; `None` keeps every charge).
    #[must_use]
    pub fn with_dedup_window(mut self, window: Option<Duration>) -> Self {
        self.dedup_window = window;
        self
    }

    /// [`Store::connect_lazy`] with everything else the settings say: the
    /// plan limits, the `credits.low` thresholds, the forward lease and the
    /// deduplication window.
    ///
    /// # Errors
    /// An unparsable connection string.
    pub fn for_settings(settings: &crate::config::Settings) -> Result<Self, StoreError> {
        Ok(Self::connect_lazy(&settings.database, settings.limits())?
            .with_credit_thresholds(settings.events.thresholds())
            .with_forward_lease(settings.gate.forward_lease())
            .with_dedup_window(settings.reservations.dedup_window()))
    }

    /// Sets how long a forward is presumed on its way (`[gate]
    /// forward_lease_secs`).
    #[must_use]
    pub fn with_forward_lease(mut self, lease: Duration) -> Self {
        self.forward_lease = lease;
        self
    }

    /// The forward lease as a Postgres interval.
    pub(super) fn forward_lease_interval(&self) -> String {
        format!("{} milliseconds", self.forward_lease.as_millis())
    }

    /// After the database was unavailable: with several hosts, looks for
    /// the writable one in the background and moves both pools to it. A
    /// no-op with one host, or while a search runs.
    pub fn find_primary(&self) {
        if let Some(primary) = &self.primary {
            let (primary, pool, marks) = (primary.clone(), self.pool.clone(), self.marks.clone());
            tokio::spawn(async move {
                primary
                    .find(&[(&pool, &[]), (&marks, MARKS_OPTIONS)], false)
                    .await;
            });
        }
    }

    /// With several hosts, finds the writable one now and moves both pools
    /// to it (before a one-shot command, say). A no-op with one host.
    pub async fn locate_primary(&self) {
        if let Some(primary) = &self.primary {
            primary
                .find(&[(&self.pool, &[]), (&self.marks, MARKS_OPTIONS)], true)
                .await;
        }
    }

    /// A URL of the database's writable server, found by asking each host
    /// of `url` (the first host's when none answers): for creating the
    /// database, which needs one server.
    async fn writable_url(url: &str) -> Result<String, StoreError> {
        let hosts = crate::endpoints::postgres_hosts(url)
            .map_err(|problem| StoreError::Other(sqlx::Error::Configuration(problem.into())))?;
        if hosts.len() > 1 {
            for host in &hosts {
                if primary::is_writable(host).await {
                    return Ok(host.clone());
                }
            }
        }
        Ok(hosts[0].clone())
    }

    /// Creates the database named in `url` when it does not exist yet.
    ///
    /// # Errors
    /// The server is unreachable or refuses to create it.
    pub async fn create_database_if_missing(url: &str) -> Result<(), StoreError> {
        let url = &Self::writable_url(url).await?;
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
        })?;
        sqlx::raw_sql(sql::RUNTIME_GRANTS)
            .execute(&self.pool)
            .await?;
        // Retention's authority is the owner's: the runtime role reads the
        // window, never sets it.
        sqlx::query(sql::SET_DEDUP_WINDOW)
            .bind(
                self.dedup_window
                    .map(|w| format!("{} milliseconds", w.as_millis())),
            )
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Checks that every migration this build embeds has been applied, for
    /// a `run` that does not migrate (it may lack the privileges to).
    ///
    /// # Errors
    /// [`StoreError::NotMigrated`]; the database is unreachable.
    pub async fn check_migrated(&self) -> Result<(), StoreError> {
        let needed = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let applied: Result<Option<i64>, sqlx::Error> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await;
        let applied = match applied {
            Ok(version) => version.unwrap_or(0),
            // No migrations table: nothing was ever applied.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => 0,
            Err(err) => return Err(err.into()),
        };
        if applied < needed {
            return Err(StoreError::NotMigrated { applied, needed });
        }
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The pool's connections: open, idle, and the configured maximum.
    pub fn pool_usage(&self) -> (u32, usize, u32) {
        (
            self.pool.size(),
            self.pool.num_idle(),
            self.pool.options().get_max_connections(),
        )
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// True when a connection answers within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let probe = sqlx::query("SELECT 1").execute(&self.pool);
        let answered = matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(_)));
        if !answered {
            self.find_primary();
        }
        answered
    }

    pub async fn close(&self) {
        tokio::join!(self.pool.close(), self.marks.close());
    }
}
