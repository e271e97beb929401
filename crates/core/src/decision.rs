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

use crate::ids::{AccountId, IdempotencyKey, JobKey};
use crate::job::{Job, PayloadDigest};
use crate::plan::{Charge, Limits, OnLimit, Plan, Reason, next_day_start};

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
    pub payload_digest: PayloadDigest,
    pub plan: Plan,
    pub charge: Charge,
    pub remaining: Option<i64>,
    pub forward_confirmed: bool,
    /// Its delivery failed and the charge was given back: the same job
    /// sent again is a new attempt, charged afresh.
    pub released: bool,
    /// When its latest forward was decided (the charge, or the last
    /// replay), by the database's clock: the forward lease's start.
    pub last_forward_at: DateTime<Utc>,
    /// Whether the latest forward's lease has run out unconfirmed, by the
    /// database's clock: that forward is presumed abandoned (its process
    /// died before the broker confirmed it), so a copy may forward again.
    pub lease_expired: bool,
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

/// The one outcome of a job (docs/contract.md#3-outcomes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Forward(Forward),
    DeadLetter(DeadLetter),
    /// A pro job over its daily limit, with `on_limit = "defer"`: held
    /// until `retry_after` (the account's next day), then gated again.
    Defer(DeadLetter),
    /// Already charged and its forward confirmed, or a second copy within
    /// the batch: acknowledge and drop.
    Duplicate,
    /// Already charged, and a forward of the charge may still be on its way
    /// (its lease has not run out): neither forwarded nor dropped. The copy
    /// waits a moment and is decided again, when it is a duplicate (the
    /// forward was confirmed) or forwarded again (the lease ran out).
    Wait(Wait),
}

/// A copy of a charged job that waits for the charge's forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait {
    /// The charge whose forward it waits for.
    pub reservation_id: Uuid,
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
    pub account_id: AccountId,
    pub idempotency_key: IdempotencyKey,
    pub payload_digest: PayloadDigest,
    pub plan: Plan,
    pub charge: Charge,
    pub usage_day: Option<NaiveDate>,
    pub remaining: Option<i64>,
}

/// One `send` row of the credit ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerSend {
    pub account_id: AccountId,
    pub balance_after: i64,
    pub idempotency_key: IdempotencyKey,
    pub reservation_id: Uuid,
}

/// An account's credit balance after a batch.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BalanceChange {
    pub account_id: AccountId,
    pub balance: i64,
}

/// A pro account's sends used on one of its days, after a batch.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct UsageChange {
    pub account_id: AccountId,
    pub day: NaiveDate,
    pub used: i64,
}

/// A forward lease taken by a replay: the store writes it only if the
/// charge's latest forward is still the one read (`last_forward_at`), so
/// two copies never both take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub account_id: AccountId,
    pub idempotency_key: IdempotencyKey,
    pub reservation_id: Uuid,
    pub last_forward_at: DateTime<Utc>,
}

/// What the store writes to record a batch's decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    pub reservations: Vec<NewReservation>,
    /// Replays of earlier charges whose lease ran out.
    pub leases: Vec<Lease>,
    pub ledger: Vec<LedgerSend>,
    /// Final credit balance of each account whose balance changed.
    pub balances: Vec<BalanceChange>,
    /// Final usage of each (pro account, day) that changed.
    pub usage: Vec<UsageChange>,
}

impl Effects {
    /// No new charge (leases are written on their own).
    pub fn is_empty(&self) -> bool {
        self.reservations.is_empty()
    }
}

/// Decides a batch. `accounts` holds every known account the jobs name;
/// `prior` every earlier reservation under the jobs' keys. Jobs are decided
/// in order, so when an account runs out mid-batch the earliest jobs win.
pub fn decide_batch(
    jobs: &[Job],
    accounts: &HashMap<AccountId, AccountState>,
    prior: &HashMap<JobKey, PriorReservation>,
    limits: Limits,
    now: DateTime<Utc>,
    mut new_id: impl FnMut() -> Uuid,
) -> (Vec<Decision>, Effects) {
    let mut state: HashMap<&AccountId, AccountState> = HashMap::new();
    // Keys first seen in this batch (or re-forwarded in it), with their hash.
    let mut seen: HashMap<(&str, &str), PayloadDigest> = HashMap::new();
    let mut effects = Effects::default();
    let mut decisions = Vec::with_capacity(jobs.len());

    for job in jobs {
        let key = (job.account_id.as_str(), job.idempotency_key.as_str());
        if let Some(hash) = seen.get(&key) {
            decisions.push(if *hash == job.payload_digest {
                Decision::Duplicate
            } else {
                conflict(job)
            });
            continue;
        }
        let earlier = prior.get(&job.key());
        if let Some(earlier) =
            earlier.filter(|e| !e.released || e.payload_digest != job.payload_digest)
        {
            let decision = replay(job, earlier, &mut effects);
            if !matches!(decision, Decision::DeadLetter(_)) {
                seen.insert(key, job.payload_digest);
            }
            decisions.push(decision);
            continue;
        }
        let account = match state.entry(&job.account_id) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => match accounts.get(&job.account_id) {
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
            seen.insert(key, job.payload_digest);
        }
        decisions.push(decision);
    }

    changes(&state, accounts, &mut effects);
    (decisions, effects)
}

/// A job an earlier attempt charged: a conflict if its payload differs, a
/// duplicate if its forward was confirmed, a wait while that forward may
/// still be on its way (its lease), else forwarded again uncharged under a
/// new lease. One forward of a charge at a time.
fn replay(job: &Job, earlier: &PriorReservation, effects: &mut Effects) -> Decision {
    if earlier.payload_digest != job.payload_digest {
        conflict(job)
    } else if earlier.forward_confirmed {
        Decision::Duplicate
    } else if !earlier.lease_expired {
        Decision::Wait(Wait {
            reservation_id: earlier.id,
        })
    } else {
        effects.leases.push(Lease {
            account_id: job.account_id.clone(),
            idempotency_key: job.idempotency_key.clone(),
            reservation_id: earlier.id,
            last_forward_at: earlier.last_forward_at,
        });
        Decision::Forward(Forward {
            reservation_id: earlier.id,
            plan: earlier.plan,
            charge: earlier.charge,
            remaining: earlier.remaining,
            fresh: false,
        })
    }
}

/// The balances and usage the batch changed, in a stable order (which
/// keeps the store's row locks and writes deterministic).
fn changes(
    state: &HashMap<&AccountId, AccountState>,
    accounts: &HashMap<AccountId, AccountState>,
    effects: &mut Effects,
) {
    for (account_id, account) in state {
        let original = &accounts[*account_id];
        if account.credit_balance != original.credit_balance {
            effects.balances.push(BalanceChange {
                account_id: (*account_id).clone(),
                balance: account.credit_balance,
            });
        }
        if account.used_today != original.used_today {
            effects.usage.push(UsageChange {
                account_id: (*account_id).clone(),
                day: account.today,
                used: account.used_today,
            });
        }
    }
    effects.balances.sort();
    effects.usage.sort();
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
                let refuse = match limits.on_limit {
                    OnLimit::DeadLetter => Decision::DeadLetter,
                    OnLimit::Defer => Decision::Defer,
                };
                return refuse(DeadLetter {
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
        payload_digest: job.payload_digest,
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use chrono::Duration;
    use proptest::prelude::*;

    use super::*;
    use crate::plan::local_day;

    const LIMITS: Limits = Limits {
        signup_credits: 5,
        daily_sends: 3,
        on_limit: OnLimit::DeadLetter,
    };

    fn id(account: &str) -> AccountId {
        AccountId::parse(account).expect("valid account id")
    }

    fn key(account: &str, key: &str) -> JobKey {
        JobKey {
            account_id: id(account),
            idempotency_key: IdempotencyKey::parse(key).expect("valid key"),
        }
    }

    fn balance(account: &str, balance: i64) -> BalanceChange {
        BalanceChange {
            account_id: id(account),
            balance,
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("valid timestamp")
            .with_timezone(&Utc)
    }

    fn job(account: &str, key: &str, payload: u8) -> Job {
        let key = self::key(account, key);
        Job {
            account_id: key.account_id,
            idempotency_key: key.idempotency_key,
            payload_digest: [payload; 16],
            campaign_id: None,
        }
    }

    fn account(plan: Plan, balance: i64, used_today: i64, now: DateTime<Utc>) -> AccountState {
        AccountState {
            plan,
            timezone: Tz::UTC,
            credit_balance: balance,
            today: local_day(now, Tz::UTC),
            used_today,
        }
    }

    fn decide(
        jobs: &[Job],
        accounts: &[(&str, AccountState)],
        prior: &HashMap<JobKey, PriorReservation>,
        now: DateTime<Utc>,
    ) -> (Vec<Decision>, Effects) {
        let accounts = accounts
            .iter()
            .map(|(account, a)| (id(account), a.clone()))
            .collect();
        decide_batch(jobs, &accounts, prior, LIMITS, now, Uuid::new_v4)
    }

    fn reason(decision: &Decision) -> Option<Reason> {
        match decision {
            Decision::DeadLetter(dead) => Some(dead.reason),
            _ => None,
        }
    }

    #[test]
    fn a_free_account_runs_out_mid_batch_and_the_earliest_jobs_win() {
        let now = at("2026-01-01T12:00:00Z");
        let jobs: Vec<Job> = (0..4).map(|i| job("a", &format!("k{i}"), 1)).collect();
        let (decisions, effects) = decide(
            &jobs,
            &[("a", account(Plan::Free, 2, 0, now))],
            &HashMap::new(),
            now,
        );
        assert!(matches!(
            decisions[0],
            Decision::Forward(Forward {
                remaining: Some(1),
                ..
            })
        ));
        assert!(matches!(
            decisions[1],
            Decision::Forward(Forward {
                remaining: Some(0),
                ..
            })
        ));
        assert_eq!(reason(&decisions[2]), Some(Reason::OutOfCredits));
        assert_eq!(reason(&decisions[3]), Some(Reason::OutOfCredits));
        assert_eq!(effects.balances, vec![balance("a", 0)]);
        assert_eq!(effects.ledger.len(), 2);
        assert_eq!(effects.ledger[1].balance_after, 0);
    }

    #[test]
    fn a_pro_account_at_its_limit_is_told_when_the_next_day_starts() {
        let now = at("2026-01-01T12:00:00Z");
        let (decisions, effects) = decide(
            &[job("p", "k", 1)],
            &[("p", account(Plan::Pro, 0, 3, now))],
            &HashMap::new(),
            now,
        );
        let Decision::DeadLetter(dead) = &decisions[0] else {
            panic!("expected a refusal, got {decisions:?}");
        };
        assert_eq!(dead.reason, Reason::DailyLimitReached);
        assert_eq!(dead.retry_after, Some(at("2026-01-02T00:00:00Z")));
        assert!(effects.is_empty());
    }

    #[test]
    fn a_second_copy_in_one_batch_is_a_duplicate_or_a_conflict() {
        let now = at("2026-01-01T12:00:00Z");
        let jobs = [job("a", "k", 1), job("a", "k", 1), job("a", "k", 2)];
        let (decisions, effects) = decide(
            &jobs,
            &[("a", account(Plan::Free, 5, 0, now))],
            &HashMap::new(),
            now,
        );
        assert!(matches!(decisions[0], Decision::Forward(_)));
        assert_eq!(decisions[1], Decision::Duplicate);
        assert_eq!(reason(&decisions[2]), Some(Reason::IdempotencyConflict));
        assert_eq!(effects.reservations.len(), 1);
    }

    #[test]
    fn an_earlier_charge_is_forwarded_again_or_dropped_but_never_charged_again() {
        let now = at("2026-01-01T12:00:00Z");
        let earlier = |confirmed, lease_expired| PriorReservation {
            id: Uuid::nil(),
            payload_digest: [1; 16],
            plan: Plan::Free,
            charge: Charge::Credit,
            remaining: Some(4),
            forward_confirmed: confirmed,
            released: false,
            last_forward_at: at("2026-01-01T11:59:00Z"),
            lease_expired,
        };
        let key = key("a", "k");
        let accounts = [("a", account(Plan::Free, 4, 0, now))];

        // Its forward may still be on its way: the copy waits.
        let prior = HashMap::from([(key.clone(), earlier(false, false))]);
        let (decisions, effects) = decide(&[job("a", "k", 1)], &accounts, &prior, now);
        assert_eq!(
            decisions[0],
            Decision::Wait(Wait {
                reservation_id: Uuid::nil()
            })
        );
        assert_eq!(effects, Effects::default());

        // Its forward's lease ran out unconfirmed: forwarded again under a
        // new lease, taken from the forward read.
        let prior = HashMap::from([(key.clone(), earlier(false, true))]);
        let (decisions, effects) = decide(&[job("a", "k", 1)], &accounts, &prior, now);
        assert_eq!(
            decisions[0],
            Decision::Forward(Forward {
                reservation_id: Uuid::nil(),
                plan: Plan::Free,
                charge: Charge::Credit,
                remaining: Some(4),
                fresh: false,
            })
        );
        assert_eq!(
            effects,
            Effects {
                leases: vec![Lease {
                    account_id: key.account_id.clone(),
                    idempotency_key: key.idempotency_key.clone(),
                    reservation_id: Uuid::nil(),
                    last_forward_at: at("2026-01-01T11:59:00Z"),
                }],
                ..Effects::default()
            }
        );

        let prior = HashMap::from([(key.clone(), earlier(true, true))]);
        let (decisions, _) = decide(&[job("a", "k", 1)], &accounts, &prior, now);
        assert_eq!(decisions[0], Decision::Duplicate);

        let (decisions, _) = decide(&[job("a", "k", 2)], &accounts, &prior, now);
        assert_eq!(reason(&decisions[0]), Some(Reason::IdempotencyConflict));
    }

    #[test]
    fn a_released_charge_is_charged_afresh_when_the_job_comes_again() {
        let now = at("2026-01-01T12:00:00Z");
        let released = PriorReservation {
            id: Uuid::nil(),
            payload_digest: [1; 16],
            plan: Plan::Free,
            charge: Charge::Credit,
            remaining: Some(4),
            forward_confirmed: true,
            released: true,
            last_forward_at: now,
            lease_expired: true,
        };
        let prior = HashMap::from([(key("a", "k"), released)]);
        let accounts = [("a", account(Plan::Free, 5, 0, now))];
        let (decisions, effects) = decide(&[job("a", "k", 1)], &accounts, &prior, now);
        let Decision::Forward(forward) = &decisions[0] else {
            panic!("expected a forward, got {decisions:?}");
        };
        assert!(forward.fresh);
        assert_ne!(forward.reservation_id, Uuid::nil());
        assert_eq!(effects.balances, vec![balance("a", 4)]);
        // Another payload under the released key is still a conflict.
        let (decisions, _) = decide(&[job("a", "k", 2)], &accounts, &prior, now);
        assert_eq!(reason(&decisions[0]), Some(Reason::IdempotencyConflict));
    }

    #[test]
    fn an_unknown_account_is_refused_by_name() {
        let now = at("2026-01-01T12:00:00Z");
        let (decisions, _) = decide(&[job("ghost", "k", 1)], &[], &HashMap::new(), now);
        let Decision::DeadLetter(dead) = &decisions[0] else {
            panic!("expected a refusal");
        };
        assert_eq!(dead.reason, Reason::UnknownAccount);
        assert!(dead.detail.contains("ghost"));
    }

    /// What the model below can do between batches.
    #[derive(Debug, Clone)]
    enum Op {
        Job {
            account: usize,
            key: u8,
            payload: u8,
        },
        SetPlan {
            account: usize,
            plan: Plan,
        },
        Advance {
            hours: i64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0usize..4, 0u8..12, 0u8..2).prop_map(|(account, key, payload)| Op::Job { account, key, payload }),
            1 => (0usize..3, prop::sample::select(Plan::ALL.to_vec())).prop_map(|(account, plan)| Op::SetPlan { account, plan }),
            1 => (1i64..30).prop_map(|hours| Op::Advance { hours }),
        ]
    }

    /// An in-memory store that applies [`Effects`] as the SQL does, and
    /// checks the invariants of docs/contract.md#10-invariants after every batch.
    struct Model {
        accounts: HashMap<String, (Plan, Tz, i64)>,
        usage: HashMap<(String, NaiveDate), i64>,
        reservations: HashMap<JobKey, (PriorReservation, Option<NaiveDate>)>,
        ledger: Vec<(String, i64, i64)>,
    }

    impl Model {
        fn new() -> Self {
            let mut accounts = HashMap::new();
            accounts.insert(
                "a0".to_owned(),
                (Plan::Free, Tz::UTC, LIMITS.signup_credits),
            );
            accounts.insert("a1".to_owned(), (Plan::Pro, Tz::America__New_York, 0));
            accounts.insert("a2".to_owned(), (Plan::Scale, Tz::Asia__Kolkata, 0));
            let ledger = vec![(
                "a0".to_owned(),
                LIMITS.signup_credits,
                LIMITS.signup_credits,
            )];
            Model {
                accounts,
                usage: HashMap::new(),
                reservations: HashMap::new(),
                ledger,
            }
        }

        fn run(
            &mut self,
            jobs: &[Job],
            now: DateTime<Utc>,
            confirm: bool,
        ) -> Result<(), TestCaseError> {
            let states: HashMap<AccountId, AccountState> = self
                .accounts
                .iter()
                .map(|(id, (plan, tz, balance))| {
                    let today = local_day(now, *tz);
                    let used = self.usage.get(&(id.clone(), today)).copied().unwrap_or(0);
                    (
                        self::id(id),
                        AccountState {
                            plan: *plan,
                            timezone: *tz,
                            credit_balance: *balance,
                            today,
                            used_today: used,
                        },
                    )
                })
                .collect();
            let prior: HashMap<_, _> = self
                .reservations
                .iter()
                .map(|(k, (r, _))| (k.clone(), r.clone()))
                .collect();
            let (decisions, effects) =
                decide_batch(jobs, &states, &prior, LIMITS, now, Uuid::new_v4);
            prop_assert_eq!(decisions.len(), jobs.len());

            for (job, decision) in jobs.iter().zip(&decisions) {
                let key = job.key();
                match decision {
                    Decision::Duplicate => {
                        let earlier_same = prior
                            .get(&key)
                            .is_some_and(|r| r.payload_digest == job.payload_digest);
                        let in_batch = effects.reservations.iter().any(|r| {
                            r.account_id == key.account_id
                                && r.idempotency_key == key.idempotency_key
                        }) || prior.contains_key(&key);
                        prop_assert!(earlier_same || in_batch);
                    }
                    Decision::Forward(f) if !f.fresh => {
                        prop_assert!(prior.get(&key).is_some_and(|r| !r.forward_confirmed
                            && r.lease_expired
                            && r.id == f.reservation_id));
                        // Forwarded again only under a lease taken from the
                        // forward it replaces.
                        prop_assert!(effects.leases.iter().any(|l| l.account_id == key.account_id
                            && l.idempotency_key == key.idempotency_key
                            && l.reservation_id == f.reservation_id));
                    }
                    Decision::Wait(w) => {
                        prop_assert!(prior.get(&key).is_some_and(|r| !r.forward_confirmed
                            && !r.lease_expired
                            && r.id == w.reservation_id));
                    }
                    _ => {}
                }
            }
            // I2: a key is charged at most once, ever.
            for r in &effects.reservations {
                let key = JobKey::new(&r.account_id, &r.idempotency_key);
                prop_assert!(
                    !self.reservations.contains_key(&key),
                    "charged twice: {:?}",
                    key
                );
                self.reservations.insert(
                    key,
                    (
                        PriorReservation {
                            id: r.id,
                            payload_digest: r.payload_digest,
                            plan: r.plan,
                            charge: r.charge,
                            remaining: r.remaining,
                            forward_confirmed: false,
                            released: false,
                            last_forward_at: now,
                            // Some forwards still in their lease, some
                            // whose process is presumed dead.
                            lease_expired: r.idempotency_key.as_str().len() % 2 == 0,
                        },
                        r.usage_day,
                    ),
                );
            }
            for l in &effects.ledger {
                self.ledger
                    .push((l.account_id.to_string(), -1, l.balance_after));
            }
            for change in &effects.balances {
                if let Some(account) = self.accounts.get_mut(change.account_id.as_str()) {
                    account.2 = change.balance;
                }
            }
            for change in &effects.usage {
                self.usage
                    .insert((change.account_id.to_string(), change.day), change.used);
            }
            if confirm {
                let forwarded: HashSet<Uuid> = decisions
                    .iter()
                    .filter_map(|d| match d {
                        Decision::Forward(f) => Some(f.reservation_id),
                        _ => None,
                    })
                    .collect();
                for (r, _) in self.reservations.values_mut() {
                    if forwarded.contains(&r.id) {
                        r.forward_confirmed = true;
                    }
                }
            }
            self.check()
        }

        fn check(&self) -> Result<(), TestCaseError> {
            for (id, (_, _, balance)) in &self.accounts {
                // I3: never below zero, equal to the ledger, one send row per credit charge.
                prop_assert!(*balance >= 0);
                let sum: i64 = self.ledger.iter().filter(|l| &l.0 == id).map(|l| l.1).sum();
                prop_assert_eq!(sum, *balance);
                let sends = self
                    .ledger
                    .iter()
                    .filter(|l| &l.0 == id && l.1 == -1)
                    .count();
                let credit_charges = self
                    .reservations
                    .iter()
                    .filter(|(k, (r, _))| k.account_id.as_str() == id && r.charge == Charge::Credit)
                    .count();
                prop_assert_eq!(sends, credit_charges);
            }
            // I4: per pro account and day, charges within the limit and equal to the usage row.
            for ((id, day), used) in &self.usage {
                prop_assert!(*used <= LIMITS.daily_sends);
                let charged = self
                    .reservations
                    .iter()
                    .filter(|(k, (_, d))| k.account_id.as_str() == id && *d == Some(*day))
                    .count() as i64;
                prop_assert_eq!(charged, *used);
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn invariants_hold_for_any_interleaving_of_jobs_plan_changes_and_days(
            ops in prop::collection::vec(op(), 1..120),
            batch_sizes in prop::collection::vec(1usize..8, 1..40),
            confirms in prop::collection::vec(any::<bool>(), 1..40),
        ) {
            let mut model = Model::new();
            let mut now = at("2026-03-08T03:00:00Z");
            let mut pending: Vec<Job> = Vec::new();
            let mut batch_no = 0usize;
            let flush = |model: &mut Model, pending: &mut Vec<Job>, now, batch_no: &mut usize| -> Result<(), TestCaseError> {
                let mut rest = std::mem::take(pending);
                while !rest.is_empty() {
                    let size = batch_sizes[*batch_no % batch_sizes.len()].min(rest.len());
                    let batch: Vec<Job> = rest.drain(..size).collect();
                    model.run(&batch, now, confirms[*batch_no % confirms.len()])?;
                    *batch_no += 1;
                }
                Ok(())
            };
            for op in ops {
                match op {
                    Op::Job { account, key, payload } => pending.push(job(&format!("a{account}"), &format!("k{key}"), payload)),
                    Op::SetPlan { account, plan } => {
                        flush(&mut model, &mut pending, now, &mut batch_no)?;
                        if let Some(a) = model.accounts.get_mut(&format!("a{account}")) {
                            a.0 = plan;
                        }
                    }
                    Op::Advance { hours } => {
                        flush(&mut model, &mut pending, now, &mut batch_no)?;
                        now += Duration::hours(hours);
                    }
                }
            }
            flush(&mut model, &mut pending, now, &mut batch_no)?;
        }
    }
}
