//! Settling reservations with delivery outcomes. Pure, like [`crate::decision`]:
//! the store loads the reservations and accounts under locks, [`settle_batch`]
//! decides, and the store writes the [`SettleEffects`] in the same
//! transaction.
//!
//! A reservation is settled once: `delivered` commits it; `failed` releases
//! it, giving a free credit back (a `release` ledger row) or a pro daily slot
//! back while its day has not ended. Later outcomes for it change nothing.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use crate::decision::{AccountState, BalanceChange, UsageChange};
use crate::ids::{AccountId, IdempotencyKey, JobKey};
use crate::json::strict_object;
use crate::plan::{Charge, local_day};

/// A delivery worker's report, as published to the outcomes queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub account_id: AccountId,
    pub idempotency_key: IdempotencyKey,
    /// The `x-sendgate-reservation-id` of the forward it reports on: a
    /// report settles that charge and no other.
    pub reservation_id: Uuid,
    pub delivered: bool,
    pub detail: Option<String>,
}

/// The longest `detail` kept, in characters; longer ones are cut.
pub const MAX_DETAIL_CHARS: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidReport(pub String);

impl Report {
    /// Parses `{account_id, idempotency_key, reservation_id, outcome:
    /// "delivered"|"failed", detail}`.
    ///
    /// # Errors
    /// [`InvalidReport`] naming what is wrong.
    pub fn parse(body: &[u8]) -> Result<Report, InvalidReport> {
        let invalid = |s: &str| InvalidReport(s.to_owned());
        let fields = strict_object(body).map_err(|err| InvalidReport(err.to_string()))?;
        let text = |name: &str| -> Result<String, InvalidReport> {
            match fields.get(name) {
                Some(serde_json::Value::String(s)) if !s.is_empty() && s.chars().count() <= 255 => {
                    Ok(s.clone())
                }
                Some(serde_json::Value::String(_)) => Err(InvalidReport(format!(
                    "`{name}` must be 1 to 255 characters"
                ))),
                Some(_) => Err(InvalidReport(format!("`{name}` must be a string"))),
                None => Err(InvalidReport(format!("`{name}` is missing"))),
            }
        };
        let account_id = AccountId::parse(text("account_id")?).map_err(|e| InvalidReport(e.0))?;
        let idempotency_key =
            IdempotencyKey::parse(text("idempotency_key")?).map_err(|e| InvalidReport(e.0))?;
        let reservation_id = Uuid::parse_str(&text("reservation_id")?)
            .map_err(|_| invalid("`reservation_id` is not a UUID"))?;
        let delivered = match text("outcome")?.as_str() {
            "delivered" => true,
            "failed" => false,
            other => {
                return Err(InvalidReport(format!(
                    "`outcome` is {other:?}; expected \"delivered\" or \"failed\""
                )));
            }
        };
        let detail = match fields.get("detail") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(checked_detail(s)?),
            Some(_) => return Err(invalid("`detail` must be a string")),
        };
        Ok(Report {
            account_id,
            idempotency_key,
            reservation_id,
            delivered,
            detail,
        })
    }
}

/// A detail the ledger can store: no NUL or other control characters
/// (tabs and line breaks are text), cut to [`MAX_DETAIL_CHARS`].
fn checked_detail(detail: &str) -> Result<String, InvalidReport> {
    if let Some(c) = detail
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Err(InvalidReport(format!(
            "`detail` contains the control character {c:?}"
        )));
    }
    Ok(detail.chars().take(MAX_DETAIL_CHARS).collect())
}

/// A reservation's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Held,
    Committed,
    Released,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Held => "held",
            State::Committed => "committed",
            State::Released => "released",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown reservation state `{0}`")]
pub struct UnknownState(pub String);

impl std::str::FromStr for State {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<State, UnknownState> {
        match s {
            "held" => Ok(State::Held),
            "committed" => Ok(State::Committed),
            "released" => Ok(State::Released),
            other => Err(UnknownState(other.to_owned())),
        }
    }
}

impl Report {
    /// What the report settles.
    pub fn key(&self) -> JobKey {
        JobKey::new(&self.account_id, &self.idempotency_key)
    }
}

/// A reservation as the settling transaction finds it, locked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: Uuid,
    pub charge: Charge,
    pub usage_day: Option<NaiveDate>,
    pub state: State,
    /// Forwarded more than once (a copy replayed it after its lease ran
    /// out): one of its forwards may be delivered whatever another's report
    /// says, so a failed report does not release it.
    pub forwarded_again: bool,
}

/// What happened to one report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Committed,
    Released,
    /// The reservation was settled before; nothing changed.
    AlreadySettled,
    /// The key has another reservation now (the one reported on was
    /// released and the job charged afresh): nothing changed.
    Stale,
    /// No reservation under that account and key.
    Unknown,
    /// A failed report on a charge forwarded more than once: it stays held
    /// (another forward of it may be delivered), until a delivered report
    /// commits it or its hold expires committed. A delivered send is never
    /// refunded, whatever order the reports come in.
    KeptForAnotherForward,
}

impl Settled {
    pub fn as_str(self) -> &'static str {
        match self {
            Settled::Committed => "committed",
            Settled::Released => "released",
            Settled::AlreadySettled => "already_settled",
            Settled::Stale => "stale",
            Settled::Unknown => "unknown_reservation",
            Settled::KeptForAnotherForward => "kept_for_another_forward",
        }
    }
}

/// A `release` ledger row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub account_id: AccountId,
    pub balance_after: i64,
    pub idempotency_key: IdempotencyKey,
    pub reservation_id: Uuid,
}

/// A reservation's new state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    pub key: JobKey,
    pub state: State,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettleEffects {
    pub settled: Vec<StateChange>,
    pub releases: Vec<Release>,
    /// Final credit balance of each account that got credits back.
    pub balances: Vec<BalanceChange>,
    /// Final usage of each (pro account, day) that got slots back.
    pub usage: Vec<UsageChange>,
    /// The account of each release that gave something back (a credit, or
    /// a daily slot of a day still in progress), for the usage counts: a
    /// Scale release, or a Pro one after its day, gives nothing back.
    pub given_back: Vec<AccountId>,
}

/// What releases in a batch have given back so far.
struct Released<'a, 'r> {
    balances: &'a mut HashMap<&'r AccountId, i64>,
    used: &'a mut HashMap<(&'r AccountId, NaiveDate), i64>,
    releases: &'a mut Vec<Release>,
}

impl<'r> Released<'_, 'r> {
    /// Gives a failed send's charge back: a free credit (with a ledger row),
    /// or a pro slot while its day lasts; nothing for an unmetered send.
    /// Whether anything was given back.
    fn give_back(
        &mut self,
        report: &'r Report,
        reservation: &Reservation,
        account: &AccountState,
        usage: &HashMap<(AccountId, NaiveDate), i64>,
        now: DateTime<Utc>,
    ) -> bool {
        let account_id = &report.account_id;
        match reservation.charge {
            Charge::Credit => {
                let balance = self
                    .balances
                    .entry(account_id)
                    .or_insert(account.credit_balance);
                *balance += 1;
                self.releases.push(Release {
                    account_id: account_id.clone(),
                    balance_after: *balance,
                    idempotency_key: report.idempotency_key.clone(),
                    reservation_id: reservation.id,
                });
                true
            }
            Charge::DailySlot => {
                // A slot comes back only while its day lasts.
                let Some(day) = reservation.usage_day else {
                    return false;
                };
                if day != local_day(now, account.timezone) {
                    return false;
                }
                let slot = self
                    .used
                    .entry((account_id, day))
                    .or_insert_with(|| usage.get(&(account_id.clone(), day)).copied().unwrap_or(0));
                *slot = (*slot - 1).max(0);
                true
            }
            Charge::Unmetered => false,
        }
    }
}

/// Settles a batch of reports in order.
pub fn settle_batch(
    reports: &[Report],
    reservations: &HashMap<JobKey, Reservation>,
    accounts: &HashMap<AccountId, AccountState>,
    usage: &HashMap<(AccountId, NaiveDate), i64>,
    now: DateTime<Utc>,
) -> (Vec<Settled>, SettleEffects) {
    let mut balances: HashMap<&AccountId, i64> = HashMap::new();
    let mut used: HashMap<(&AccountId, NaiveDate), i64> = HashMap::new();
    let mut settled_now: HashMap<JobKey, State> = HashMap::new();
    let mut effects = SettleEffects::default();
    let mut results = Vec::with_capacity(reports.len());

    for report in reports {
        let key = report.key();
        let Some(reservation) = reservations.get(&key) else {
            results.push(Settled::Unknown);
            continue;
        };
        if reservation.id != report.reservation_id {
            results.push(Settled::Stale);
            continue;
        }
        if reservation.state != State::Held || settled_now.contains_key(&key) {
            results.push(Settled::AlreadySettled);
            continue;
        }
        if !report.delivered && reservation.forwarded_again {
            results.push(Settled::KeptForAnotherForward);
            continue;
        }
        let state = if report.delivered {
            State::Committed
        } else {
            State::Released
        };
        settled_now.insert(key.clone(), state);
        effects.settled.push(StateChange {
            key,
            state,
            detail: report.detail.clone(),
        });
        if state == State::Committed {
            results.push(Settled::Committed);
            continue;
        }
        results.push(Settled::Released);
        if let Some(account) = accounts.get(&report.account_id) {
            let mut released = Released {
                balances: &mut balances,
                used: &mut used,
                releases: &mut effects.releases,
            };
            if released.give_back(report, reservation, account, usage, now) {
                effects.given_back.push(report.account_id.clone());
            }
        }
    }
    effects.balances = balances
        .into_iter()
        .map(|(id, balance)| BalanceChange {
            account_id: id.clone(),
            balance,
        })
        .collect();
    effects.balances.sort();
    effects.usage = used
        .into_iter()
        .map(|((id, day), used)| UsageChange {
            account_id: id.clone(),
            day,
            used,
        })
        .collect();
    effects.usage.sort();
    (results, effects)
}

#[cfg(test)]
mod tests {
    use chrono_tz::Tz;

    use super::*;
    use crate::plan::Plan;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("valid timestamp")
            .with_timezone(&Utc)
    }

    fn id(account: &str) -> AccountId {
        AccountId::parse(account).expect("valid account id")
    }

    fn key(account: &str, key: &str) -> JobKey {
        JobKey {
            account_id: id(account),
            idempotency_key: IdempotencyKey::parse(key).expect("valid key"),
        }
    }

    fn report(account: &str, key: &str, delivered: bool) -> Report {
        let key = self::key(account, key);
        Report {
            account_id: key.account_id,
            idempotency_key: key.idempotency_key,
            reservation_id: Uuid::nil(),
            delivered,
            detail: None,
        }
    }

    fn held(charge: Charge, day: Option<&str>) -> Reservation {
        Reservation {
            id: Uuid::nil(),
            charge,
            usage_day: day.map(|d| d.parse().expect("date")),
            state: State::Held,
            forwarded_again: false,
        }
    }

    fn account(plan: Plan, balance: i64) -> AccountState {
        AccountState {
            plan,
            timezone: Tz::UTC,
            credit_balance: balance,
            today: "2026-01-01".parse().expect("date"),
            used_today: 0,
        }
    }

    #[test]
    fn a_failed_free_send_gives_its_credit_back_once() {
        let now = at("2026-01-01T12:00:00Z");
        let reservations = HashMap::from([(key("a", "k"), held(Charge::Credit, None))]);
        let accounts = HashMap::from([(id("a"), account(Plan::Free, 3))]);
        let reports = [
            report("a", "k", false),
            report("a", "k", false),
            report("a", "x", true),
        ];
        let (results, effects) =
            settle_batch(&reports, &reservations, &accounts, &HashMap::new(), now);
        assert_eq!(
            results,
            vec![Settled::Released, Settled::AlreadySettled, Settled::Unknown]
        );
        assert_eq!(
            effects.balances,
            vec![BalanceChange {
                account_id: id("a"),
                balance: 4
            }]
        );
        assert_eq!(effects.releases.len(), 1);
        assert_eq!(effects.releases[0].balance_after, 4);
    }

    #[test]
    fn a_charge_forwarded_twice_is_never_refunded_whatever_order_its_reports_come_in() {
        let now = at("2026-01-01T12:00:00Z");
        let twice = Reservation {
            forwarded_again: true,
            ..held(Charge::Credit, None)
        };
        let reservations = HashMap::from([(key("a", "k"), twice)]);
        let accounts = HashMap::from([(id("a"), account(Plan::Free, 3))]);
        let settle = |reports: &[Report]| {
            settle_batch(reports, &reservations, &accounts, &HashMap::new(), now)
        };
        let (failed, delivered) = (report("a", "k", false), report("a", "k", true));

        let (results, effects) = settle(&[failed.clone(), delivered.clone()]);
        assert_eq!(
            results,
            vec![Settled::KeptForAnotherForward, Settled::Committed]
        );
        assert!(effects.releases.is_empty() && effects.balances.is_empty());

        let (results, effects) = settle(&[delivered, failed.clone()]);
        assert_eq!(results, vec![Settled::Committed, Settled::AlreadySettled]);
        assert!(effects.releases.is_empty() && effects.balances.is_empty());

        // Failed alone: held until a delivered report or the hold's expiry.
        let (results, effects) = settle(&[failed]);
        assert_eq!(results, vec![Settled::KeptForAnotherForward]);
        assert!(effects.settled.is_empty());
    }

    #[test]
    fn only_a_release_that_gives_something_back_counts_as_given_back() {
        let now = at("2026-01-02T12:00:00Z");
        let reservations = HashMap::from([
            (key("f", "k"), held(Charge::Credit, None)),
            (key("s", "k"), held(Charge::Unmetered, None)),
            (
                key("p", "today"),
                held(Charge::DailySlot, Some("2026-01-02")),
            ),
            (
                key("p", "yesterday"),
                held(Charge::DailySlot, Some("2026-01-01")),
            ),
        ]);
        let accounts = HashMap::from([
            (id("f"), account(Plan::Free, 3)),
            (id("s"), account(Plan::Scale, 0)),
            (id("p"), account(Plan::Pro, 0)),
        ]);
        let reports = [
            report("f", "k", false),
            report("s", "k", false),
            report("p", "today", false),
            report("p", "yesterday", false),
        ];
        let (results, effects) =
            settle_batch(&reports, &reservations, &accounts, &HashMap::new(), now);
        assert!(results.iter().all(|r| *r == Settled::Released));
        assert_eq!(effects.given_back, vec![id("f"), id("p")]);
    }

    #[test]
    fn a_delivered_send_is_committed_and_keeps_its_charge() {
        let now = at("2026-01-01T12:00:00Z");
        let reservations = HashMap::from([(key("a", "k"), held(Charge::Credit, None))]);
        let accounts = HashMap::from([(id("a"), account(Plan::Free, 3))]);
        let (results, effects) = settle_batch(
            &[report("a", "k", true)],
            &reservations,
            &accounts,
            &HashMap::new(),
            now,
        );
        assert_eq!(results, vec![Settled::Committed]);
        assert!(effects.balances.is_empty() && effects.releases.is_empty());
        assert_eq!(effects.settled[0].state, State::Committed);
    }

    #[test]
    fn a_pro_slot_comes_back_only_on_its_own_day() {
        let reservations = HashMap::from([
            (
                key("p", "today"),
                held(Charge::DailySlot, Some("2026-01-01")),
            ),
            (
                key("p", "yesterday"),
                held(Charge::DailySlot, Some("2025-12-31")),
            ),
        ]);
        let accounts = HashMap::from([(id("p"), account(Plan::Pro, 0))]);
        let usage = HashMap::from([((id("p"), "2026-01-01".parse().expect("date")), 20)]);
        let (results, effects) = settle_batch(
            &[report("p", "today", false), report("p", "yesterday", false)],
            &reservations,
            &accounts,
            &usage,
            at("2026-01-01T12:00:00Z"),
        );
        assert_eq!(results, vec![Settled::Released, Settled::Released]);
        assert_eq!(
            effects.usage,
            vec![UsageChange {
                account_id: id("p"),
                day: "2026-01-01".parse().expect("date"),
                used: 19
            }]
        );
    }

    const RID: &str = "0192f5a0-0000-7000-8000-000000000001";

    fn report_json(fields: &str) -> Vec<u8> {
        format!(r#"{{"account_id":"a","idempotency_key":"k","reservation_id":"{RID}"{fields}}}"#)
            .into_bytes()
    }

    #[test]
    fn reports_are_validated() {
        let refused = |body: &[u8]| Report::parse(body).expect_err("refused").0;
        assert!(refused(b"nope").contains("not JSON"));
        assert!(refused(&report_json("")).contains("`outcome` is missing"));
        assert!(refused(&report_json(r#","outcome":"lost""#)).contains("expected"));
        assert!(
            refused(br#"{"account_id":"a","idempotency_key":"k","outcome":"failed"}"#)
                .contains("`reservation_id` is missing")
        );
        assert!(
            refused(
                br#"{"account_id":"a","idempotency_key":"k","reservation_id":"r1","outcome":"failed"}"#
            )
            .contains("not a UUID")
        );
        let ok =
            Report::parse(&report_json(r#","outcome":"failed","detail":"busy""#)).expect("valid");
        assert!(!ok.delivered);
        assert_eq!(ok.detail.as_deref(), Some("busy"));
        assert_eq!(ok.reservation_id.to_string(), RID);
        // A report that says two things is neither of them.
        assert_eq!(
            refused(&report_json(r#","outcome":"failed","outcome":"delivered""#)),
            "body has the key `outcome` more than once"
        );
    }

    #[test]
    fn a_detail_the_ledger_cannot_store_is_refused_and_a_long_one_is_cut() {
        let nul = Report::parse(&report_json(r#","outcome":"failed","detail":"550\u0000x""#));
        assert!(nul.expect_err("NUL").0.contains("control character"));
        let lines = Report::parse(&report_json(r#","outcome":"failed","detail":"a\nb\tc""#));
        assert_eq!(lines.expect("text").detail.as_deref(), Some("a\nb\tc"));
        let long = "x".repeat(MAX_DETAIL_CHARS + 5);
        let cut = Report::parse(&report_json(&format!(
            r#","outcome":"failed","detail":"{long}""#
        )));
        assert_eq!(
            cut.expect("valid").detail.map(|d| d.len()),
            Some(MAX_DETAIL_CHARS)
        );
    }

    #[test]
    fn a_report_on_an_earlier_reservation_of_the_key_is_stale_and_changes_nothing() {
        let now = at("2026-01-01T12:00:00Z");
        let mut current = held(Charge::Credit, None);
        current.id = Uuid::from_u128(2);
        let reservations = HashMap::from([(key("a", "k"), current)]);
        let accounts = HashMap::from([(id("a"), account(Plan::Free, 3))]);
        let (results, effects) = settle_batch(
            &[report("a", "k", false)],
            &reservations,
            &accounts,
            &HashMap::new(),
            now,
        );
        assert_eq!(results, vec![Settled::Stale]);
        assert_eq!(effects, SettleEffects::default());
    }
}
