//! A decided job as one event: its log line and its metrics are emitted
//! together, from here, so the two never disagree.

use std::time::Duration;

use tracing::Level;

use crate::config::DecisionLogLevel;
use crate::domain::decision::Decision;
use crate::metrics;

/// One job's decision, once its outcome is confirmed and acked.
pub struct JobDecided<'a> {
    pub worker: usize,
    pub decision: &'a Decision,
    pub account: Option<&'a str>,
    pub key: Option<&'a str>,
    pub redelivered: bool,
    /// From the job's arrival to its ack.
    pub elapsed: Duration,
}

impl JobDecided<'_> {
    /// Counts the job and logs one line at the level `[log] decisions` asks
    /// for.
    pub fn emit(&self, level: DecisionLogLevel) {
        metrics::job_done(self.elapsed);
        let (outcome, plan, charge, reason, detail) = match self.decision {
            Decision::Forward(forward) => {
                metrics::job_forwarded(forward.plan, forward.charge);
                (
                    "forwarded",
                    forward.plan.as_str(),
                    forward.charge.as_str(),
                    "",
                    "",
                )
            }
            Decision::Defer(dead) => {
                metrics::job_deferred();
                (
                    "deferred",
                    "",
                    "",
                    dead.reason.as_str(),
                    dead.detail.as_str(),
                )
            }
            Decision::DeadLetter(dead) => {
                metrics::job_dead_lettered(dead.reason);
                (
                    "dead_lettered",
                    "",
                    "",
                    dead.reason.as_str(),
                    dead.detail.as_str(),
                )
            }
            Decision::Duplicate => {
                metrics::job_duplicate();
                ("duplicate", "", "", "", "")
            }
            Decision::Wait(_) => {
                metrics::job_waiting();
                ("waiting", "", "", "", "")
            }
        };
        let (worker, redelivered, duration) = (self.worker, self.redelivered, self.elapsed);
        let (account, key) = (self.account.unwrap_or(""), self.key.unwrap_or(""));
        macro_rules! decided {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    worker,
                    account,
                    key,
                    decision = outcome,
                    plan,
                    charge,
                    reason,
                    detail,
                    redelivered,
                    ?duration,
                    "job decided"
                )
            };
        }
        match level {
            DecisionLogLevel::Info => decided!(Level::INFO),
            DecisionLogLevel::Debug => decided!(Level::DEBUG),
        }
    }
}
