//! The writable server among the hosts of `database.url`, found again
//! after a failover.
//!
//! With one host there is nothing to choose. With several (libpq's
//! `postgres://u@h1:5432,h2:5433/db`), the pools open connections to the
//! host last found writable, and every new connection checks that its
//! server takes writes: a standby, or an old primary come back read-only,
//! refuses the connection instead of failing a batch later. When the
//! database becomes unavailable, [`Primary::find`] asks each host in turn
//! whether it is writable, points both pools at the first that is, and
//! retires every connection opened before the switch. The failed batch is
//! held meanwhile (the database's state, not the batch's fault) and
//! retried on the new primary; nothing spends a delivery attempt.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use sqlx::{ConnectOptions, Connection};
use tracing::{info, warn};

/// How long asking one host may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// True when the server on `connection` takes writes: not a standby in
/// recovery, and not read-only by default.
const WRITABLE: &str =
    "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'";

pub(crate) struct Primary {
    /// Each host's options, in the order `database.url` names them.
    hosts: Vec<(String, PgConnectOptions)>,
    state: Mutex<State>,
    /// One search at a time.
    searching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Primary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Primary")
            .field(
                "hosts",
                &self.hosts.iter().map(|(l, _)| l).collect::<Vec<_>>(),
            )
            .field("current", &self.current())
            .finish()
    }
}

struct State {
    /// The host both pools connect to.
    current: usize,
    /// When `current` last changed: connections older than that are on a
    /// server that stopped being the primary, and are closed.
    switched: Option<Instant>,
}

impl Primary {
    /// `hosts`: each host's label (`host:port`) and options.
    pub(crate) fn new(hosts: Vec<(String, PgConnectOptions)>) -> Self {
        Primary {
            hosts,
            state: Mutex::new(State {
                current: 0,
                switched: None,
            }),
            searching: tokio::sync::Mutex::const_new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The host the pools use now.
    pub(crate) fn current(&self) -> &str {
        &self.hosts[self.state().current].0
    }

    /// True when a pooled connection of this `age` may still be used: it
    /// was opened after the last switch.
    pub(crate) fn still_current(&self, age: Duration) -> bool {
        match self.state().switched {
            Some(at) => age < at.elapsed(),
            None => true,
        }
    }

    /// Checks a new connection: an error when its server does not take
    /// writes, so the pool never hands one out.
    pub(crate) async fn check_writable(connection: &mut PgConnection) -> Result<(), sqlx::Error> {
        let writable: bool = sqlx::query_scalar(WRITABLE)
            .fetch_one(&mut *connection)
            .await?;
        if writable {
            Ok(())
        } else {
            Err(sqlx::Error::Protocol(
                "the server is read-only (a standby, or a demoted primary)".into(),
            ))
        }
    }

    /// Asks each host, starting with the current one, whether it is
    /// writable, and points `pools` (each with its extra options) at the
    /// first that is. Does nothing when no host is writable (the next
    /// failure searches again), nor when another search is running and
    /// `wait` is false (it will do).
    pub(crate) async fn find(&self, pools: &[(&PgPool, &[(&str, &str)])], wait: bool) {
        let _searching = if wait {
            self.searching.lock().await
        } else {
            match self.searching.try_lock() {
                Ok(guard) => guard,
                Err(_) => return,
            }
        };
        let start = self.state().current;
        let mut found = None;
        for offset in 0..self.hosts.len() {
            let index = (start + offset) % self.hosts.len();
            let (label, options) = &self.hosts[index];
            match tokio::time::timeout(PROBE_TIMEOUT, probe(options)).await {
                Ok(Ok(true)) => {
                    found = Some(index);
                    break;
                }
                Ok(Ok(false)) => info!(host = %label, "database host is read-only"),
                Ok(Err(err)) => warn!(host = %label, error = %err, "database host unreachable"),
                Err(_) => warn!(host = %label, "database host did not answer in time"),
            }
        }
        if let Some(index) = found
            && index != start
        {
            let (label, options) = &self.hosts[index];
            for (pool, extra) in pools {
                pool.set_connect_options(options.clone().options(extra.iter().copied()));
            }
            let mut state = self.state();
            state.current = index;
            state.switched = Some(Instant::now());
            drop(state);
            crate::metrics::db_primary_changed();
            warn!(host = %label, "the database's writable server moved; using it from now on");
        }
    }
}

/// Whether the server behind `options` takes writes.
async fn probe(options: &PgConnectOptions) -> Result<bool, sqlx::Error> {
    let mut connection = options.connect().await?;
    let writable = sqlx::query_scalar(WRITABLE)
        .fetch_one(&mut connection)
        .await;
    let _ = connection.close().await;
    writable
}

/// Whether the server at `url` answers and takes writes.
pub(crate) async fn is_writable(url: &str) -> bool {
    let Ok(options) = url.parse::<PgConnectOptions>() else {
        return false;
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe(&options)).await,
        Ok(Ok(true))
    )
}
