//! Exit codes, as sysexits(3) names them, and which error gets which.

use sendgate::ctl::CtlError;
use sendgate::store::StoreError;

/// The command line is wrong.
pub const USAGE: u8 = 64;
/// The account (or other thing named) does not exist.
pub const NOT_FOUND: u8 = 67;
/// The database or the broker cannot be reached or refuses the work.
pub const UNAVAILABLE: u8 = 69;
/// The API refused the token (missing, wrong, or too narrow a scope).
pub const NO_PERMISSION: u8 = 77;
/// A setting is unknown or invalid.
pub const CONFIG: u8 = 78;

/// A command line that cannot work as given (exit code [`USAGE`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadCommandLine(pub String);

/// The exit code for a command that failed with `err`.
pub fn code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(store) = cause.downcast_ref::<StoreError>() {
            return match store {
                StoreError::UnknownAccount(_) => NOT_FOUND,
                StoreError::NotMigrated { .. } => CONFIG,
                e if e.is_transient() => UNAVAILABLE,
                _ => 1,
            };
        }
        if cause.downcast_ref::<lapin::Error>().is_some() {
            return UNAVAILABLE;
        }
        if cause.downcast_ref::<BadCommandLine>().is_some() {
            return USAGE;
        }
        if let Some(ctl) = cause.downcast_ref::<CtlError>() {
            return match ctl {
                CtlError::Unreachable { .. } => UNAVAILABLE,
                CtlError::Unauthorized { .. } => NO_PERMISSION,
                CtlError::Failed { .. } => 1,
            };
        }
    }
    1
}
