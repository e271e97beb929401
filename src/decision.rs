//! The decision core: given a batch of valid jobs in arrival order and the
//! state of their accounts, decide each job's outcome and the state changes
//! that record it. Pure: the store loads the state under row locks, calls
//! [`decide_batch`], and writes the [`Effects`] back in the same transaction.
//!
//! Keeping this free of I/O is what lets a whole batch be decided with a few
//! set-based statements, and lets the invariants be property-tested.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use uuid::Uuid;

use crate::job::Job;
use crate::plan::{Charge, Limits, Plan, Reason, next_day_start};

/// An account as the batch finds it, locked for the transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountState {
    pub plan: Plan,
    pub timezone: Tz,
    pub credit_balance: i64,
    /// The account's local day at the batch's `now`.
    pub today: NaiveDate,
    /// Pro sends already used on `today`.
    pub used_today: i64,
}

/// A reservation recorded by an earlier attempt at the same job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorReservation {
    pub id: Uuid,
    pub payload_sha256: [u8; 32],
    pub plan: Plan,
    pub charge: Charge,
    pub remaining: Option<i64>,
    pub forward_confirmed: bool,
}

/// The job passed; forward it with these headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub reservation_id: Uuid,
    pub plan: Plan,
    pub charge: Charge,
    /// Credits (free) or daily sends (pro) left after this job.
    pub remaining: Option<i64>,
    /// False when an earlier attempt charged it and this only forwards again.
    pub fresh: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub reason: Reason,
    pub detail: String,
    /// For `daily_limit_reached`: when the account's next day starts.
    pub retry_after: Option<DateTime<Utc>>,
}

/// The one outcome of a job (SPEC §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Forward(Forward),
    DeadLetter(DeadLetter),
    /// Already charged and its forward confirmed, or a second copy within
    /// the batch: acknowledge and drop.
    Duplicate,
}

impl Decision {
    pub fn dead_letter(reason: Reason, detail: impl Into<String>) -> Self {
        Decision::DeadLetter(DeadLetter {
            reason,
            detail: detail.into(),
            retry_after: None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReservation {
    pub id: Uuid,
    pub account_id: String,
    pub idempotency_key: String,
    pub payload_sha256: [u8; 32],
    pub plan: Plan,
    pub charge: Charge,
    pub usage_day: Option<NaiveDate>,
    pub remaining: Option<i64>,
}

/// One `send` row of the credit ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerSend {
    pub account_id: String,
    pub balance_after: i64,
    pub idempotency_key: String,
    pub reservation_id: Uuid,
}

/// What the store writes to record a batch's decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    pub reservations: Vec<NewReservation>,
    pub ledger: Vec<LedgerSend>,
    /// Final credit balance of each account whose balance changed.
    pub balances: Vec<(String, i64)>,
    /// Final usage of each (pro account, day) that changed.
    pub usage: Vec<(String, NaiveDate, i64)>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.reservations.is_empty()
    }
}

/// Decides a batch. `accounts` holds every known account the jobs name;
/// `prior` every earlier reservation under the jobs' keys. Jobs are decided
/// in order, so when an account runs out mid-batch the earliest jobs win.
pub fn decide_batch(
    jobs: &[Job],
    accounts: &HashMap<String, AccountState>,
    prior: &HashMap<(String, String), PriorReservation>,
    limits: Limits,
    now: DateTime<Utc>,
    mut new_id: impl FnMut() -> Uuid,
) -> (Vec<Decision>, Effects) {
    let mut state: HashMap<&str, AccountState> = HashMap::new();
    // Keys first seen in this batch (or re-forwarded in it), with their hash.
    let mut seen: HashMap<(&str, &str), [u8; 32]> = HashMap::new();
    let mut effects = Effects::default();
    let mut decisions = Vec::with_capacity(jobs.len());

    for job in jobs {
        let key = (job.account_id.as_str(), job.idempotency_key.as_str());
        if let Some(hash) = seen.get(&key) {
            decisions.push(if *hash == job.payload_sha256 {
                Decision::Duplicate
            } else {
                conflict(job)
            });
            continue;
        }
        let prior_key = (job.account_id.clone(), job.idempotency_key.clone());
        if let Some(earlier) = prior.get(&prior_key) {
            let decision = if earlier.payload_sha256 != job.payload_sha256 {
                conflict(job)
            } else if earlier.forward_confirmed {
                Decision::Duplicate
            } else {
                Decision::Forward(Forward {
                    reservation_id: earlier.id,
                    plan: earlier.plan,
                    charge: earlier.charge,
                    remaining: earlier.remaining,
                    fresh: false,
                })
            };
            if !matches!(decision, Decision::DeadLetter(_)) {
                seen.insert(key, job.payload_sha256);
            }
            decisions.push(decision);
            continue;
        }
        let account = match state.entry(key.0) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => match accounts.get(key.0) {
                Some(loaded) => entry.insert(loaded.clone()),
                None => {
                    decisions.push(Decision::dead_letter(
                        Reason::UnknownAccount,
                        format!("account `{}` does not exist", job.account_id),
                    ));
                    continue;
                }
            },
        };
        let decision = charge(job, account, limits, now, &mut new_id, &mut effects);
        if matches!(decision, Decision::Forward(_)) {
            seen.insert(key, job.payload_sha256);
        }
        decisions.push(decision);
    }

    for (account_id, account) in &state {
        let original = &accounts[*account_id];
        if account.credit_balance != original.credit_balance {
            effects
                .balances
                .push(((*account_id).to_owned(), account.credit_balance));
        }
        if account.used_today != original.used_today {
            effects
                .usage
                .push(((*account_id).to_owned(), account.today, account.used_today));
        }
    }
    // A stable order keeps the store's row locks and writes deterministic.
    effects.balances.sort();
    effects.usage.sort();
    (decisions, effects)
}

/// Charges one fresh job against its account's plan, or refuses it.
fn charge(
    job: &Job,
    account: &mut AccountState,
    limits: Limits,
    now: DateTime<Utc>,
    new_id: &mut impl FnMut() -> Uuid,
    effects: &mut Effects,
) -> Decision {
    let remaining = match account.plan {
        Plan::Free => {
            if account.credit_balance < 1 {
                return Decision::dead_letter(
                    Reason::OutOfCredits,
                    format!(
                        "account `{}` on the free plan has no credits left; upgrade to keep sending",
                        job.account_id
                    ),
                );
            }
            account.credit_balance -= 1;
            Some(account.credit_balance)
        }
        Plan::Pro => {
            if account.used_today >= limits.daily_sends {
                let retry_after = next_day_start(now, account.timezone);
                return Decision::DeadLetter(DeadLetter {
                    reason: Reason::DailyLimitReached,
                    detail: format!(
                        "account `{}` on the pro plan used its {} sends for {} ({}); the next day starts at {}",
                        job.account_id,
                        limits.daily_sends,
                        account.today,
                        account.timezone,
                        retry_after.to_rfc3339()
                    ),
                    retry_after: Some(retry_after),
                });
            }
            account.used_today += 1;
            Some(limits.daily_sends - account.used_today)
        }
        Plan::Scale => None,
    };
    let id = new_id();
    let charge = Charge::for_plan(account.plan);
    if account.plan == Plan::Free {
        effects.ledger.push(LedgerSend {
            account_id: job.account_id.clone(),
            balance_after: account.credit_balance,
            idempotency_key: job.idempotency_key.clone(),
            reservation_id: id,
        });
    }
    effects.reservations.push(NewReservation {
        id,
        account_id: job.account_id.clone(),
        idempotency_key: job.idempotency_key.clone(),
        payload_sha256: job.payload_sha256,
        plan: account.plan,
        charge,
        usage_day: (account.plan == Plan::Pro).then_some(account.today),
        remaining,
    });
    Decision::Forward(Forward {
        reservation_id: id,
        plan: account.plan,
        charge,
        remaining,
        fresh: true,
    })
}

fn conflict(job: &Job) -> Decision {
    Decision::dead_letter(
        Reason::IdempotencyConflict,
        format!(
            "idempotency key `{}` of account `{}` was already used for a different payload",
            job.idempotency_key, job.account_id
        ),
    )
}
