//! Why a store call failed, and whether retrying can help.

use crate::domain::plan::Plan;

/// Why a store call failed, and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable, restarting, or timed a statement out:
    /// retry later.
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
    /// A row holds a value the code cannot read: edited by hand, or written
    /// by a newer version. Not the caller's fault, and not retried.
    #[error("database row cannot be read: {0}")]
    Corrupt(String),
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
        matches!(self, StoreError::Unavailable(_) | StoreError::Contention)
    }

    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Contention => "contention",
            StoreError::UnknownAccount(_) => "unknown_account",
            StoreError::AccountExists { .. } => "account_exists",
            StoreError::InvalidAccount(_) => "invalid_account",
            StoreError::Corrupt(_) => "corrupt",
            StoreError::Constraint { .. } => "constraint",
            StoreError::Migrate(_) => "migrate",
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
