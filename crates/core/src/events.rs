//! Threshold events: what a change of an account's credits, daily usage or
//! plan tells the product. Pure: the store computes them from the state it
//! locked and the effects it writes, and records them in the same
//! transaction (a transactional outbox), so an event exists exactly when
//! its change committed.
//!
//! One event per crossing: `credits.low` each time a free account's
//! balance falls from above a threshold to at or below it (a release that
//! lifts it back above re-arms it), `credits.exhausted` each time it falls
//! to 0, `daily_limit.reached` once per pro account and local day (the
//! store keeps the once), `plan.changed` on every change of plan.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use crate::decision::{AccountState, Effects};
use crate::ids::AccountId;
use crate::plan::{Limits, Plan, next_day_start};

/// What an event says; its routing key on the events exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum EventType {
    #[serde(rename = "credits.low")]
    CreditsLow,
    #[serde(rename = "credits.exhausted")]
    CreditsExhausted,
    #[serde(rename = "daily_limit.reached")]
    DailyLimitReached,
    #[serde(rename = "plan.changed")]
    PlanChanged,
}

impl EventType {
    pub const ALL: [EventType; 4] = [
        EventType::CreditsLow,
        EventType::CreditsExhausted,
        EventType::DailyLimitReached,
        EventType::PlanChanged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::CreditsLow => "credits.low",
            EventType::CreditsExhausted => "credits.exhausted",
            EventType::DailyLimitReached => "daily_limit.reached",
            EventType::PlanChanged => "plan.changed",
        }
    }
}

/// The event-specific fields.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum EventData {
    CreditsLow {
        plan: Plan,
        threshold: i64,
        credit_balance: i64,
    },
    CreditsExhausted {
        plan: Plan,
        credit_balance: i64,
    },
    DailyLimitReached {
        plan: Plan,
        day: NaiveDate,
        timezone: String,
        daily_limit: i64,
        used: i64,
        next_day_starts_at: DateTime<Utc>,
    },
    PlanChanged {
        from: Plan,
        to: Plan,
        credit_balance: i64,
    },
}

/// One event, as published (JSON) and as kept in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Event {
    /// Unique, time-ordered (UUIDv7): consumers deduplicate on it.
    pub id: Uuid,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub account_id: AccountId,
    pub occurred_at: DateTime<Utc>,
    pub data: EventData,
    /// The scope within which the event happens at most once, when there
    /// is one (`daily_limit.reached`: the account and day).
    #[serde(skip)]
    pub once_per: Option<String>,
}

impl Event {
    pub fn new(
        id: Uuid,
        account_id: &AccountId,
        occurred_at: DateTime<Utc>,
        data: EventData,
    ) -> Self {
        let (kind, once_per) = match &data {
            EventData::CreditsLow { .. } => (EventType::CreditsLow, None),
            EventData::CreditsExhausted { .. } => (EventType::CreditsExhausted, None),
            EventData::DailyLimitReached { day, .. } => (
                EventType::DailyLimitReached,
                Some(format!("daily_limit.reached/{account_id}/{day}")),
            ),
            EventData::PlanChanged { .. } => (EventType::PlanChanged, None),
        };
        Event {
            id,
            kind,
            account_id: account_id.clone(),
            occurred_at,
            data,
            once_per,
        }
    }

    /// The event as published.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// The thresholds a balance fell to or below going from `before` to
/// `after` (each `t` with `after <= t < before`), highest first.
pub fn thresholds_crossed(before: i64, after: i64, thresholds: &[i64]) -> Vec<i64> {
    let mut crossed: Vec<i64> = thresholds
        .iter()
        .copied()
        .filter(|t| after <= *t && *t < before)
        .collect();
    crossed.sort_unstable_by(|a, b| b.cmp(a));
    crossed.dedup();
    crossed
}

/// The events of a free account's balance going from `before` to `after`.
pub fn credit_events(
    account_id: &AccountId,
    plan: Plan,
    before: i64,
    after: i64,
    thresholds: &[i64],
    now: DateTime<Utc>,
    new_id: &mut impl FnMut() -> Uuid,
) -> Vec<Event> {
    if plan != Plan::Free || after >= before {
        return Vec::new();
    }
    let mut events: Vec<Event> = thresholds_crossed(before, after, thresholds)
        .into_iter()
        .map(|threshold| {
            let data = EventData::CreditsLow {
                plan,
                threshold,
                credit_balance: after,
            };
            Event::new(new_id(), account_id, now, data)
        })
        .collect();
    if before > 0 && after <= 0 {
        let data = EventData::CreditsExhausted {
            plan,
            credit_balance: after,
        };
        events.push(Event::new(new_id(), account_id, now, data));
    }
    events
}

/// The events a decided batch makes, from the state its accounts were
/// locked in and what it writes.
pub fn batch_events(
    accounts: &HashMap<AccountId, AccountState>,
    effects: &Effects,
    limits: Limits,
    thresholds: &[i64],
    now: DateTime<Utc>,
    mut new_id: impl FnMut() -> Uuid,
) -> Vec<Event> {
    let mut events = Vec::new();
    for change in &effects.balances {
        let Some(before) = accounts.get(&change.account_id) else {
            continue;
        };
        events.extend(credit_events(
            &change.account_id,
            before.plan,
            before.credit_balance,
            change.balance,
            thresholds,
            now,
            &mut new_id,
        ));
    }
    for change in &effects.usage {
        let Some(before) = accounts.get(&change.account_id) else {
            continue;
        };
        let used_before = if before.today == change.day {
            before.used_today
        } else {
            0
        };
        if used_before < limits.daily_sends && change.used >= limits.daily_sends {
            let data = EventData::DailyLimitReached {
                plan: Plan::Pro,
                day: change.day,
                timezone: before.timezone.name().to_owned(),
                daily_limit: limits.daily_sends,
                used: change.used,
                next_day_starts_at: next_day_start(now, before.timezone),
            };
            events.push(Event::new(new_id(), &change.account_id, now, data));
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{BalanceChange, UsageChange};
    use crate::plan::OnLimit;
    use proptest::prelude::*;

    fn id(s: &str) -> AccountId {
        AccountId::parse(s).expect("valid id")
    }

    fn ids() -> impl FnMut() -> Uuid {
        Uuid::now_v7
    }

    fn types(events: &[Event]) -> Vec<&'static str> {
        events.iter().map(|e| e.kind.as_str()).collect()
    }

    #[test]
    fn a_balance_falling_through_a_threshold_makes_one_low_event() {
        let a = id("acct");
        let now = Utc::now();
        let events = credit_events(&a, Plan::Free, 6, 5, &[5], now, &mut ids());
        assert_eq!(types(&events), ["credits.low"]);
        assert_eq!(
            events[0].data,
            EventData::CreditsLow {
                plan: Plan::Free,
                threshold: 5,
                credit_balance: 5
            }
        );
        // Already at or below: no new crossing.
        assert!(credit_events(&a, Plan::Free, 5, 4, &[5], now, &mut ids()).is_empty());
        // Up is never a crossing.
        assert!(credit_events(&a, Plan::Free, 4, 6, &[5], now, &mut ids()).is_empty());
    }

    #[test]
    fn falling_to_zero_through_every_threshold_makes_each_event_once() {
        let a = id("acct");
        let events = credit_events(&a, Plan::Free, 20, 0, &[10, 5, 5], Utc::now(), &mut ids());
        assert_eq!(
            types(&events),
            ["credits.low", "credits.low", "credits.exhausted"]
        );
        let ids: std::collections::HashSet<_> = events.iter().map(|e| e.id).collect();
        assert_eq!(ids.len(), 3, "every event has its own id");
    }

    #[test]
    fn only_free_balances_make_credit_events() {
        let a = id("acct");
        for plan in [Plan::Pro, Plan::Scale] {
            assert!(credit_events(&a, plan, 6, 0, &[5], Utc::now(), &mut ids()).is_empty());
        }
    }

    #[test]
    fn a_pro_day_reaching_its_limit_makes_one_event_naming_the_day() {
        let a = id("pro-1");
        let now = Utc::now();
        let tz: chrono_tz::Tz = "Europe/Berlin".parse().expect("zone");
        let today = crate::plan::local_day(now, tz);
        let limits = Limits {
            signup_credits: 20,
            daily_sends: 20,
            on_limit: OnLimit::DeadLetter,
        };
        let state = |used| AccountState {
            plan: Plan::Pro,
            timezone: tz,
            credit_balance: 0,
            today,
            used_today: used,
        };
        let effects = |used| Effects {
            usage: vec![UsageChange {
                account_id: a.clone(),
                day: today,
                used,
            }],
            ..Effects::default()
        };
        let accounts = HashMap::from([(a.clone(), state(18))]);
        assert!(batch_events(&accounts, &effects(19), limits, &[5], now, ids()).is_empty());
        let events = batch_events(&accounts, &effects(20), limits, &[5], now, ids());
        assert_eq!(types(&events), ["daily_limit.reached"]);
        assert_eq!(
            events[0].once_per.as_deref(),
            Some(format!("daily_limit.reached/pro-1/{today}").as_str())
        );
        let json = events[0].to_json();
        assert_eq!(json["type"], "daily_limit.reached");
        assert_eq!(json["data"]["daily_limit"], 20);
        assert_eq!(json["data"]["timezone"], "Europe/Berlin");
        let at_limit = HashMap::from([(a.clone(), state(20))]);
        assert!(batch_events(&at_limit, &effects(20), limits, &[5], now, ids()).is_empty());
    }

    #[test]
    fn a_batch_reports_the_crossings_of_its_balance_changes() {
        let a = id("free-1");
        let now = Utc::now();
        let accounts = HashMap::from([(
            a.clone(),
            AccountState {
                plan: Plan::Free,
                timezone: chrono_tz::UTC,
                credit_balance: 3,
                today: now.date_naive(),
                used_today: 0,
            },
        )]);
        let effects = Effects {
            balances: vec![BalanceChange {
                account_id: a,
                balance: 0,
            }],
            ..Effects::default()
        };
        let limits = Limits {
            signup_credits: 20,
            daily_sends: 20,
            on_limit: OnLimit::DeadLetter,
        };
        let events = batch_events(&accounts, &effects, limits, &[5], now, ids());
        assert_eq!(types(&events), ["credits.exhausted"]);
    }

    proptest! {
        /// However a balance moves step by step, each threshold's low
        /// events are exactly its downward crossings: never two without
        /// the balance going back above it in between.
        #[test]
        fn low_events_alternate_with_recoveries(
            steps in proptest::collection::vec(-3i64..=2, 1..60),
            threshold in 1i64..10,
        ) {
            let a = id("acct");
            let mut balance = 12i64;
            let mut armed = true;
            for step in steps {
                let after = (balance + step).max(0);
                let events = credit_events(&a, Plan::Free, balance, after, &[threshold], Utc::now(), &mut ids());
                let low = events.iter().filter(|e| e.kind == EventType::CreditsLow).count();
                let crossed = balance > threshold && after <= threshold;
                prop_assert_eq!(low, usize::from(crossed));
                let exhausted = events.iter().filter(|e| e.kind == EventType::CreditsExhausted).count();
                prop_assert_eq!(exhausted, usize::from(balance > 0 && after == 0));
                if low == 1 {
                    prop_assert!(armed, "a second low event without a recovery");
                    armed = false;
                }
                if after > threshold {
                    armed = true;
                }
                balance = after;
            }
        }
    }
}
