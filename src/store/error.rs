//! Why a store call failed, and whether retrying can help.

use crate::domain::plan::Plan;

/// Why a store call failed, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot do the work now: unreachable, restarting,
    /// timed a statement out, read-only after a failover, refusing our login
    /// or privileges, or missing its schema. None of that is the batch's
    /// fault: hold it and retry later.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// The batch kept racing other workers charging the same keys: retry.
    #[error("the batch kept racing another worker on the same keys")]
    Contention,
    #[error("account `{0}` does not exist")]
    UnknownAccount(String),
    #[error("account `{id}` already exists on the {plan} plan")]
    AccountExists { id: String, plan: Plan },
    /// The caller's input is not acceptable (a time zone, say).
    #[error("invalid account: {0}")]
    InvalidAccount(String),
    /// A correction the account's state does not allow: it would take the
    /// balance below 0, or its key was used for a different correction.
    #[error("adjustment refused: {0}")]
    AdjustmentRefused(String),
    /// A row holds a value the code cannot read: edited by hand, or written
    /// by a newer version. Not the caller's fault, and not retried.
    #[error("database row cannot be read: {0}")]
    Corrupt(String),
    /// A named constraint refused a write: a bug, never retried blindly.
    #[error("database constraint `{constraint}` violated: {message}")]
    Constraint { constraint: String, message: String },
    #[error("database migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    /// `run` without migrating found the schema behind this build.
    #[error(
        "the database schema is at migration {applied}, this build needs {needed}: run `sendgate migrate` as the owner role first"
    )]
    NotMigrated { applied: i64, needed: i64 },
    #[error("database error: {0}")]
    Other(sqlx::Error),
}

impl StoreError {
    /// True when the same call may succeed later: a dependency's state,
    /// not the input's fault.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Contention)
    }

    /// True when the database is well and another transaction was in the
    /// way: the batch kept racing other workers, a serialization failure or
    /// deadlock (class 40), a lock not granted in time (55P03). Retried
    /// like an outage, but it says nothing about the database's health.
    pub fn is_contention(&self) -> bool {
        match self {
            StoreError::Contention => true,
            StoreError::Unavailable(sqlx::Error::Database(db)) => {
                let code = db.code().unwrap_or_default();
                code.starts_with("40") || code == "55P03"
            }
            _ => false,
        }
    }

    /// True when the database refuses who we are or where we point (a
    /// login, a missing database): waiting will not fix a bad setting at
    /// start-up, so `run` stops with it there, while a running worker holds
    /// its batch (a rotated password, a database being restored).
    pub fn is_misconfiguration(&self) -> bool {
        match self {
            StoreError::Unavailable(sqlx::Error::Database(db)) => {
                let code = db.code().unwrap_or_default();
                code.starts_with("28") || code == "3D000"
            }
            _ => false,
        }
    }

    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            _ if self.is_contention() => "contention",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Contention => "contention",
            StoreError::UnknownAccount(_) => "unknown_account",
            StoreError::AccountExists { .. } => "account_exists",
            StoreError::InvalidAccount(_) => "invalid_account",
            StoreError::AdjustmentRefused(_) => "adjustment_refused",
            StoreError::Corrupt(_) => "corrupt",
            StoreError::Constraint { .. } => "constraint",
            StoreError::Migrate(_) => "migrate",
            StoreError::NotMigrated { .. } => "not_migrated",
            StoreError::Other(_) => "other",
        }
    }

    /// A column whose value the code cannot read.
    pub(crate) fn corrupt(column: &str, problem: impl std::fmt::Display) -> Self {
        StoreError::Corrupt(format!("{column}: {problem}"))
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
            | sqlx::Error::WorkerCrashed
            // The schema is not what this build expects: a deployment's
            // state (migrations not applied yet), not the batch's fault.
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::TypeNotFound { .. } => StoreError::Unavailable(err),
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                if !blames_the_input(&code) {
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

/// SQLSTATEs that say the statement's data was at fault: data exceptions
/// (22: a value Postgres cannot store), integrity constraint violations
/// (23) and program limits (54). Retrying the same data cannot help; the
/// caller splits the batch to find the item at fault. Every other class is
/// the database's state, and the batch is held and retried: connection
/// failures (08), invalid authorization (28), read-only transactions after
/// a failover (25006), a missing database (3D000), serialization failures
/// and deadlocks (40), missing privileges or tables (42), resource
/// shortages (53), object state and lock timeouts (55), operator
/// intervention and shutdown (57), system errors (58) and internal errors
/// (XX).
fn blames_the_input(code: &str) -> bool {
    code.starts_with("22") || code.starts_with("23") || code.starts_with("54")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_data_errors_blame_the_input() {
        for code in ["22P05", "22001", "23505", "54000"] {
            assert!(blames_the_input(code), "{code}");
        }
        for code in [
            "08006", "28P01", "25006", "3D000", "40001", "40P01", "42501", "42P01", "53300",
            "55P03", "57014", "57P01", "57P03", "58030", "XX000",
        ] {
            assert!(!blames_the_input(code), "{code}");
        }
    }
}
