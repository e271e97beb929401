//! The self-audit in the background: every `[audit] interval_secs`, each
//! process checks the money's invariants ([`Store::audit`]) and exports what
//! it found (`sendgate_audit_violations{check}`, the time of the last
//! completed audit); each violation found is logged at ERROR (the first
//! [`LOGGED`]), so a drift is found by the SREs' alerts, not by a customer.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::metrics;
use crate::store::{AuditReport, AuditRules, Store};

/// Violations logged one line each per audit; the rest are counted.
const LOGGED: usize = 20;

/// The audit's rules from the configuration.
pub fn rules(settings: &Settings) -> AuditRules {
    AuditRules {
        hold: settings.reservations.hold(),
        sweep_interval: settings.reservations.sweep_interval(),
        usage_retention: settings.usage.retention(),
    }
}

/// Audits every `interval` until `stop`, the first one interval after the
/// start.
pub async fn run(store: Store, rules: AuditRules, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // An audit in progress is dropped at shutdown: it only reads.
        let audit = tokio::select! {
            _ = stop.cancelled() => return,
            audit = store.audit(&rules) => audit,
        };
        match audit {
            Ok(report) => {
                metrics::audit_completed(&report);
                log(&report);
            }
            Err(err) => {
                metrics::db_error(err.kind());
                metrics::audit_failed();
                warn!(error = %err, "cannot finish the self-audit; trying again next interval");
            }
        }
    }
}

fn log(report: &AuditReport) {
    let total = report.total();
    if total == 0 {
        info!(
            accounts = report.accounts,
            took_ms = report.took.as_millis() as u64,
            "self-audit found no violation"
        );
        return;
    }
    for v in report.violations.iter().take(LOGGED) {
        error!(check = %v.check, account_id = %v.account_id, detail = %v.detail,
            "self-audit: invariant broken");
    }
    error!(
        violations = total,
        accounts = report.accounts,
        "self-audit found violations (`sendgate audit` lists them; runbook: self-audit)"
    );
}
