//! The product vocabulary: plans, what a send costs on each, why a job is
//! refused, and the calendar day of an account in its own time zone.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

/// An account's plan (docs/contract.md#1-plans).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "openapi",
    schema(description = "free: signup credits, granted once, never refreshed; \
    pro: a number of sends per calendar day; scale: unmetered")
)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    /// Signup credits, granted once, never refreshed.
    Free,
    /// A number of sends per calendar day.
    Pro,
    /// Unmetered.
    Scale,
}

impl Plan {
    pub const ALL: [Plan; 3] = [Plan::Free, Plan::Pro, Plan::Scale];

    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Pro => "pro",
            Plan::Scale => "scale",
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown plan `{0}` (expected free, pro or scale)")]
pub struct UnknownPlan(pub String);

impl FromStr for Plan {
    type Err = UnknownPlan;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "free" => Ok(Plan::Free),
            "pro" => Ok(Plan::Pro),
            "scale" => Ok(Plan::Scale),
            other => Err(UnknownPlan(other.to_owned())),
        }
    }
}

/// What a forwarded send consumed: the `x-sendgate-charge` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Charge {
    Credit,
    DailySlot,
    Unmetered,
}

impl Charge {
    pub fn for_plan(plan: Plan) -> Charge {
        match plan {
            Plan::Free => Charge::Credit,
            Plan::Pro => Charge::DailySlot,
            Plan::Scale => Charge::Unmetered,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Charge::Credit => "credit",
            Charge::DailySlot => "daily_slot",
            Charge::Unmetered => "unmetered",
        }
    }
}

impl FromStr for Charge {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "credit" => Ok(Charge::Credit),
            "daily_slot" => Ok(Charge::DailySlot),
            "unmetered" => Ok(Charge::Unmetered),
            other => Err(format!("unknown charge `{other}`")),
        }
    }
}

/// Why a job was dead-lettered: the routing key and `x-sendgate-reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    OutOfCredits,
    DailyLimitReached,
    UnknownAccount,
    InvalidJob,
    IdempotencyConflict,
    /// An outcome report names no reservation.
    UnknownReservation,
    /// An outcome report is malformed.
    InvalidOutcome,
}

impl Reason {
    /// The reasons a send job can be refused for.
    pub const ALL: [Reason; 5] = [
        Reason::OutOfCredits,
        Reason::DailyLimitReached,
        Reason::UnknownAccount,
        Reason::InvalidJob,
        Reason::IdempotencyConflict,
    ];

    /// A refused delivery report, not a refused job.
    pub fn is_about_reports(self) -> bool {
        matches!(self, Reason::UnknownReservation | Reason::InvalidOutcome)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::OutOfCredits => "out_of_credits",
            Reason::DailyLimitReached => "daily_limit_reached",
            Reason::UnknownAccount => "unknown_account",
            Reason::InvalidJob => "invalid_job",
            Reason::IdempotencyConflict => "idempotency_conflict",
            Reason::UnknownReservation => "unknown_reservation",
            Reason::InvalidOutcome => "invalid_outcome",
        }
    }
}

/// Not one of the reasons.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown reason `{0}`")]
pub struct UnknownReason(pub String);

impl FromStr for Reason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .into_iter()
            .chain([Reason::UnknownReservation, Reason::InvalidOutcome])
            .find(|reason| reason.as_str() == s)
            .ok_or_else(|| UnknownReason(s.to_owned()))
    }
}

impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The configured limits of the metered plans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub signup_credits: i64,
    pub daily_sends: i64,
    /// What becomes of a pro job over its daily limit.
    pub on_limit: OnLimit,
}

/// What happens to a pro job over the daily limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLimit {
    /// Dead-letter it `daily_limit_reached` (the default).
    DeadLetter,
    /// Hold it until the account's next day starts, then gate it again.
    Defer,
}

/// Parses an IANA time zone name such as `Europe/Berlin`.
///
/// # Errors
/// A message naming the zone when it is unknown.
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>().map_err(|_| {
        format!("unknown time zone `{name}` (expected an IANA name such as Europe/Berlin)")
    })
}

/// How many sends would pass right now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Capacity {
    /// Sends that would pass right now; null when unlimited.
    #[cfg_attr(feature = "openapi", schema(example = 17, required = true))]
    pub sends_available: Option<i64>,
    pub unlimited: bool,
    /// When more become available, if ever; null when some are available
    /// now or none will ever come (a free account's credits never refresh).
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub next_available_at: Option<DateTime<Utc>>,
}

/// The capacity at `now` of an account on `plan` with `credit_balance`, that
/// has made `sends_today` sends of its day in `tz` and may make
/// `limit_today` (pro).
pub fn capacity(
    plan: Plan,
    credit_balance: i64,
    sends_today: i64,
    limit_today: Option<i64>,
    tz: Tz,
    now: DateTime<Utc>,
) -> Capacity {
    match plan {
        Plan::Scale => Capacity {
            sends_available: None,
            unlimited: true,
            next_available_at: None,
        },
        Plan::Free => Capacity {
            sends_available: Some(credit_balance),
            unlimited: false,
            next_available_at: None,
        },
        Plan::Pro => {
            let limit = limit_today.expect("a pro account has a daily limit");
            let left = (limit - sends_today).max(0);
            Capacity {
                sends_available: Some(left),
                unlimited: false,
                next_available_at: (left == 0).then(|| next_day_start(now, tz)),
            }
        }
    }
}

/// The calendar day that `now` falls on in `tz`.
pub fn local_day(now: DateTime<Utc>, tz: Tz) -> NaiveDate {
    now.with_timezone(&tz).date_naive()
}

/// The instant the day after `now`'s local day starts in `tz`. Where a
/// daylight-saving jump skips local midnight, the day starts at the first
/// local time that exists.
pub fn next_day_start(now: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
    let tomorrow = local_day(now, tz) + Duration::days(1);
    let midnight = tomorrow.and_hms_opt(0, 0, 0).unwrap_or_default();
    let mut candidate = midnight;
    // A gap is at most a few hours; minutes keep this exact for odd offsets.
    for _ in 0..(24 * 60) {
        if let Some(start) = tz.from_local_datetime(&candidate).earliest() {
            return start.with_timezone(&Utc);
        }
        candidate += Duration::minutes(1);
    }
    // Unreachable for real zones; a day later is a safe answer regardless.
    now + Duration::days(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("valid timestamp")
            .with_timezone(&Utc)
    }

    #[test]
    fn plans_round_trip_through_their_names() {
        for plan in Plan::ALL {
            assert_eq!(plan.as_str().parse::<Plan>(), Ok(plan));
        }
        assert!("gold".parse::<Plan>().is_err());
    }

    #[test]
    fn reasons_round_trip_through_their_names() {
        for reason in Reason::ALL
            .into_iter()
            .chain([Reason::UnknownReservation, Reason::InvalidOutcome])
        {
            assert_eq!(reason.as_str().parse::<Reason>(), Ok(reason));
        }
        assert!("bored".parse::<Reason>().is_err());
    }

    #[test]
    fn the_local_day_follows_the_time_zone() {
        let now = utc("2026-03-01T23:30:00Z");
        assert_eq!(local_day(now, Tz::UTC).to_string(), "2026-03-01");
        assert_eq!(local_day(now, Tz::Asia__Tokyo).to_string(), "2026-03-02");
        assert_eq!(
            local_day(now, Tz::America__New_York).to_string(),
            "2026-03-01"
        );
    }

    #[test]
    fn the_next_day_starts_at_local_midnight() {
        let now = utc("2026-03-01T23:30:00Z");
        assert_eq!(next_day_start(now, Tz::UTC), utc("2026-03-02T00:00:00Z"));
        assert_eq!(
            next_day_start(now, Tz::Asia__Tokyo),
            utc("2026-03-02T15:00:00Z")
        );
        assert_eq!(
            next_day_start(now, Tz::America__New_York),
            utc("2026-03-02T05:00:00Z")
        );
    }

    #[test]
    fn a_day_whose_midnight_is_skipped_starts_at_the_first_real_minute() {
        // America/Santiago moved clocks from 00:00 to 01:00 on 2022-09-11.
        let now = utc("2022-09-10T12:00:00Z");
        let start = next_day_start(now, Tz::America__Santiago);
        assert_eq!(start, utc("2022-09-11T04:00:00Z"));
    }

    #[test]
    fn unknown_time_zones_are_named() {
        assert!(
            parse_timezone("Mars/Olympus")
                .expect_err("unknown zone")
                .contains("Mars/Olympus")
        );
        assert_eq!(parse_timezone("Europe/Berlin"), Ok(Tz::Europe__Berlin));
    }
}
