//! A model of a charge's whole life, checked against the invariants of
//! docs/contract.md#10-invariants: any interleaving of jobs (new, repeated, conflicting), delivery
//! reports (delivered or failed, on the current forward or a stale one, any
//! number of times), re-sends after a release, hold expiry, plan changes and
//! days passing, in time zones with a daylight-saving change. The model
//! applies the decision core's and the settling core's effects the way the
//! store's SQL does, and keeps its own books to check them against.

use std::collections::HashMap;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use chrono_tz::Tz;
use proptest::prelude::*;
use sendgate_core::decision::{
    AccountState, BalanceChange, Decision, PriorReservation, UsageChange, decide_batch,
};
use sendgate_core::ids::{AccountId, JobKey};
use sendgate_core::job::Job;
use sendgate_core::plan::{Limits, OnLimit, Plan, local_day};
use sendgate_core::settle::{Report, Reservation, State, settle_batch};
use uuid::Uuid;

const LIMITS: Limits = Limits {
    signup_credits: 4,
    daily_sends: 3,
    on_limit: OnLimit::DeadLetter,
};

/// Free in UTC, pro in New York (DST starts 2026-03-08), scale in Kolkata.
const ACCOUNTS: [(&str, Plan, Tz); 3] = [
    ("a0", Plan::Free, Tz::UTC),
    ("a1", Plan::Pro, Tz::America__New_York),
    ("a2", Plan::Scale, Tz::Asia__Kolkata),
];

#[derive(Debug, Clone)]
enum Op {
    Job {
        account: usize,
        key: u8,
        payload: u8,
    },
    /// A report on the `nth` forward seen so far (an old one is stale).
    Report {
        nth: usize,
        delivered: bool,
    },
    /// Confirm the forwards of the last batch (the marks landing).
    Confirm,
    /// The sweep commits every hold.
    Expire,
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
        8 => (0usize..3, 0u8..8, 0u8..2).prop_map(|(account, key, payload)| Op::Job { account, key, payload }),
        5 => (0usize..64, any::<bool>()).prop_map(|(nth, delivered)| Op::Report { nth, delivered }),
        2 => Just(Op::Confirm),
        1 => Just(Op::Expire),
        1 => (0usize..3, prop::sample::select(Plan::ALL.to_vec())).prop_map(|(account, plan)| Op::SetPlan { account, plan }),
        2 => (1i64..20).prop_map(|hours| Op::Advance { hours }),
    ]
}

fn id(account: &str) -> AccountId {
    AccountId::parse(account).expect("valid id")
}

/// A reservation as the store keeps it.
#[derive(Debug, Clone)]
struct Row {
    prior: PriorReservation,
    usage_day: Option<NaiveDate>,
    state: State,
}

/// A forward the delivery workers received.
#[derive(Debug, Clone)]
struct Sent {
    key: JobKey,
    reservation_id: Uuid,
}

struct Model {
    now: DateTime<Utc>,
    plans: HashMap<AccountId, (Plan, Tz)>,
    balances: HashMap<AccountId, i64>,
    usage: HashMap<(AccountId, NaiveDate), i64>,
    rows: HashMap<JobKey, Row>,
    /// (account, delta, balance after, reservation)
    ledger: Vec<(AccountId, i64, i64, Option<Uuid>)>,
    forwards: Vec<Sent>,
    last_batch: Vec<Uuid>,
    /// Reservations that got a `failed` report naming them.
    failed_reports: Vec<Uuid>,
    /// Charges per key, and releases per key.
    charges: HashMap<JobKey, usize>,
    releases: HashMap<JobKey, usize>,
}

impl Model {
    fn new(now: DateTime<Utc>) -> Model {
        let mut model = Model {
            now,
            plans: HashMap::new(),
            balances: HashMap::new(),
            usage: HashMap::new(),
            rows: HashMap::new(),
            ledger: Vec::new(),
            forwards: Vec::new(),
            last_batch: Vec::new(),
            failed_reports: Vec::new(),
            charges: HashMap::new(),
            releases: HashMap::new(),
        };
        for (name, plan, tz) in ACCOUNTS {
            let granted = if plan == Plan::Free {
                LIMITS.signup_credits
            } else {
                0
            };
            model.plans.insert(id(name), (plan, tz));
            model.balances.insert(id(name), granted);
            if granted > 0 {
                model.ledger.push((id(name), granted, granted, None));
            }
        }
        model
    }

    fn states(&self) -> HashMap<AccountId, AccountState> {
        self.plans
            .iter()
            .map(|(account, (plan, tz))| {
                let today = local_day(self.now, *tz);
                let used = self
                    .usage
                    .get(&(account.clone(), today))
                    .copied()
                    .unwrap_or(0);
                let state = AccountState {
                    plan: *plan,
                    timezone: *tz,
                    credit_balance: self.balances[account],
                    today,
                    used_today: used,
                };
                (account.clone(), state)
            })
            .collect()
    }

    fn decide(&mut self, jobs: &[Job]) -> Result<(), TestCaseError> {
        let prior = self
            .rows
            .iter()
            .map(|(key, row)| {
                let mut prior = row.prior.clone();
                prior.released = row.state == State::Released;
                (key.clone(), prior)
            })
            .collect();
        let (decisions, effects) =
            decide_batch(jobs, &self.states(), &prior, LIMITS, self.now, Uuid::new_v4);
        prop_assert_eq!(decisions.len(), jobs.len());
        for new in &effects.reservations {
            let key = JobKey::new(&new.account_id, &new.idempotency_key);
            // I2: a key is charged again only after its charge was released.
            if let Some(row) = self.rows.get(&key) {
                prop_assert_eq!(row.state, State::Released, "charged twice: {:?}", key);
            }
            *self.charges.entry(key.clone()).or_default() += 1;
            let prior = PriorReservation {
                id: new.id,
                payload_digest: new.payload_digest,
                plan: new.plan,
                charge: new.charge,
                remaining: new.remaining,
                forward_confirmed: false,
                released: false,
                last_forward_at: self.now,
                // Every unconfirmed forward counts as abandoned here, so
                // copies replay it (the lease is the store's and the
                // gate's tests' business).
                lease_expired: true,
            };
            let row = Row {
                prior,
                usage_day: new.usage_day,
                state: State::Held,
            };
            self.rows.insert(key, row);
        }
        for send in &effects.ledger {
            let row = (
                send.account_id.clone(),
                -1,
                send.balance_after,
                Some(send.reservation_id),
            );
            self.ledger.push(row);
        }
        self.apply(&effects.balances, &effects.usage);
        self.last_batch.clear();
        for (job, decision) in jobs.iter().zip(&decisions) {
            if let Decision::Forward(forward) = decision {
                let key = job.key();
                prop_assert_eq!(self.rows[&key].prior.id, forward.reservation_id);
                self.forwards.push(Sent {
                    key,
                    reservation_id: forward.reservation_id,
                });
                self.last_batch.push(forward.reservation_id);
            }
        }
        self.check()
    }

    fn report(&mut self, nth: usize, delivered: bool) -> Result<(), TestCaseError> {
        if self.forwards.is_empty() {
            return Ok(());
        }
        let sent = self.forwards[nth % self.forwards.len()].clone();
        if !delivered {
            self.failed_reports.push(sent.reservation_id);
        }
        let report = Report {
            account_id: sent.key.account_id.clone(),
            idempotency_key: sent.key.idempotency_key.clone(),
            reservation_id: sent.reservation_id,
            delivered,
            detail: None,
        };
        let reservations: HashMap<JobKey, Reservation> = self
            .rows
            .iter()
            .map(|(key, row)| {
                let reservation = Reservation {
                    id: row.prior.id,
                    charge: row.prior.charge,
                    usage_day: row.usage_day,
                    state: row.state,
                    forwarded_again: self
                        .forwards
                        .iter()
                        .filter(|f| f.reservation_id == row.prior.id)
                        .count()
                        > 1,
                };
                (key.clone(), reservation)
            })
            .collect();
        let (_, effects) = settle_batch(
            &[report],
            &reservations,
            &self.states(),
            &self.usage,
            self.now,
        );
        for change in &effects.settled {
            let row = self.rows.get_mut(&change.key).expect("settled a known row");
            prop_assert_eq!(row.state, State::Held, "a reservation settles once");
            prop_assert_eq!(
                row.prior.id,
                sent.reservation_id,
                "only the charge reported on"
            );
            row.state = change.state;
            if change.state == State::Released {
                *self.releases.entry(change.key.clone()).or_default() += 1;
            }
        }
        for release in &effects.releases {
            let row = (
                release.account_id.clone(),
                1,
                release.balance_after,
                Some(release.reservation_id),
            );
            self.ledger.push(row);
        }
        self.apply(&effects.balances, &effects.usage);
        self.check()
    }

    /// Balances and usage as the store writes them.
    fn apply(&mut self, balances: &[BalanceChange], usage: &[UsageChange]) {
        for change in balances {
            self.balances
                .insert(change.account_id.clone(), change.balance);
        }
        for change in usage {
            self.usage
                .insert((change.account_id.clone(), change.day), change.used);
        }
    }

    fn confirm(&mut self) {
        for row in self.rows.values_mut() {
            if self.last_batch.contains(&row.prior.id) {
                row.prior.forward_confirmed = true;
            }
        }
    }

    fn expire(&mut self) {
        for row in self.rows.values_mut() {
            if row.state == State::Held {
                row.state = State::Committed;
            }
        }
    }

    fn check(&self) -> Result<(), TestCaseError> {
        for (account, balance) in &self.balances {
            // I3: never below zero, and equal to the ledger.
            prop_assert!(*balance >= 0);
            let sum: i64 = self
                .ledger
                .iter()
                .filter(|l| &l.0 == account)
                .map(|l| l.1)
                .sum();
            prop_assert_eq!(sum, *balance, "{} ledger", account);
        }
        // I3: every credit charge is one send row; I6: every release row
        // answers a `failed` report naming that reservation, once.
        let mut refunded: HashMap<Uuid, usize> = HashMap::new();
        for (_, delta, _, reservation) in &self.ledger {
            if *delta == 1
                && let Some(reservation) = reservation
            {
                prop_assert!(self.failed_reports.contains(reservation), "unearned refund");
                *refunded.entry(*reservation).or_default() += 1;
            }
        }
        prop_assert!(refunded.values().all(|n| *n == 1), "refunded twice");
        // I2: charges of a key = 1 + its releases (or fewer).
        for (key, charges) in &self.charges {
            let released = self.releases.get(key).copied().unwrap_or(0);
            prop_assert!(
                *charges <= released + 1,
                "{:?} charged {} times",
                key,
                charges
            );
        }
        // I4: per pro account and day, the slots used stay within the limit.
        for ((account, day), used) in &self.usage {
            prop_assert!(
                *used <= LIMITS.daily_sends && *used >= 0,
                "{} {} {}",
                account,
                day,
                used
            );
        }
        Ok(())
    }
}

fn job(account: usize, key: u8, payload: u8) -> Job {
    let body = format!(
        r#"{{"account_id":"{}","idempotency_key":"k{key}","p":{payload}}}"#,
        ACCOUNTS[account].0
    );
    Job::parse(body.as_bytes(), None, 1024).expect("a valid job")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn every_charge_is_made_once_and_refunded_only_for_a_failed_forward(
        ops in prop::collection::vec(op(), 1..150),
        batch in 1usize..6,
    ) {
        // Across the spring-forward night of New York.
        let mut model = Model::new("2026-03-07T12:00:00Z".parse().expect("a time"));
        let mut pending = Vec::new();
        for op in ops {
            if !matches!(op, Op::Job { .. }) && !pending.is_empty() {
                for jobs in std::mem::take(&mut pending).chunks(batch) {
                    model.decide(jobs)?;
                }
            }
            match op {
                Op::Job { account, key, payload } => pending.push(job(account, key, payload)),
                Op::Report { nth, delivered } => model.report(nth, delivered)?,
                Op::Confirm => model.confirm(),
                Op::Expire => model.expire(),
                Op::SetPlan { account, plan } => {
                    if let Some(entry) = model.plans.get_mut(&id(ACCOUNTS[account].0)) {
                        entry.0 = plan;
                    }
                }
                Op::Advance { hours } => model.now += Duration::hours(hours),
            }
        }
        for jobs in pending.chunks(batch) {
            model.decide(jobs)?;
        }
    }
}
