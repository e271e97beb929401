//! Usage counts: what the gate charged, released and refused, per account,
//! 15-minute UTC bucket, campaign and kind, and read back per hour or day in
//! the account's time zone.
//!
//! The statements that make the changes append them to `usage_pending`
//! (one row per statement, the entries as arrays: one insert however many
//! accounts a batch touches), and a rollup moves them into `usage_counts`
//! every second, one process at a time. Reads add what is still pending, in
//! one snapshot, so they are exact as of the last committed batch. They
//! touch only the buckets asked for (and the last seconds' pending rows),
//! so their cost does not grow with history.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, NaiveDateTime, TimeZone, Utc};
use serde::Serialize;
use sqlx::Row;

use super::rows;
use super::{Store, StoreError, sql};
use crate::domain::decision::NewReservation;
use crate::domain::ids::AccountId;
use crate::domain::job::Job;

/// Bucket width, in seconds: every time zone's offset is a multiple of it.
const BUCKET_SECS: i64 = 15 * 60;

/// The bucket `now` falls in.
pub(super) fn bucket(now: DateTime<Utc>) -> DateTime<Utc> {
    let secs = now.timestamp();
    DateTime::from_timestamp(secs - secs.rem_euclid(BUCKET_SECS), 0).unwrap_or(now)
}

/// The campaign of each new reservation ('' for none), from its job.
pub(super) fn campaigns(jobs: &[Job], reservations: &[NewReservation]) -> Vec<String> {
    let by_key: HashMap<(&str, &str), &str> = jobs
        .iter()
        .map(|j| {
            (
                (j.account_id.as_str(), j.idempotency_key.as_str()),
                j.campaign_id.as_deref().unwrap_or(""),
            )
        })
        .collect();
    reservations
        .iter()
        .map(|r| {
            by_key
                .get(&(r.account_id.as_str(), r.idempotency_key.as_str()))
                .copied()
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

/// The unit a usage report is grouped by (`accounts usage --by`, the API's
/// `granularity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Granularity {
    Hour,
    Day,
    Campaign,
}

impl Granularity {
    /// The API's spelling; `None` for any other.
    pub fn parse(name: &str) -> Option<Granularity> {
        <Granularity as clap::ValueEnum>::from_str(name, false).ok()
    }

    /// The grouping by this unit; `after` and `limit` page campaigns and are
    /// not used by hour or day.
    pub fn grouping(self, after: Option<String>, limit: usize) -> Grouping {
        match self {
            Granularity::Hour => Grouping::Hour,
            Granularity::Day => Grouping::Day,
            Granularity::Campaign => Grouping::Campaign { after, limit },
        }
    }
}

/// How usage is grouped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grouping {
    /// Per local hour.
    Hour,
    /// Per local day.
    Day,
    /// Per campaign, over the whole range: a page of campaigns at a time,
    /// in campaign order, those after `after` (all from the first when
    /// `None`), at most `limit`.
    Campaign { after: Option<String>, limit: usize },
}

/// Campaigns one usage page holds at most.
pub const MAX_CAMPAIGNS_PER_PAGE: usize = 1000;

/// Campaigns a usage page holds when the caller does not say.
pub const DEFAULT_CAMPAIGNS_PER_PAGE: usize = 100;

/// One bucket (or campaign) of usage.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct UsageRow {
    /// Where the bucket starts, in the account's time zone (RFC 3339 with
    /// its offset); null when grouped by campaign.
    #[schema(required = true)]
    pub start: Option<String>,
    /// The campaign (`campaign_id` of the jobs; "" for jobs without one);
    /// null unless grouped by campaign.
    #[schema(required = true)]
    pub campaign_id: Option<String>,
    /// Sends charged (a credit, a daily slot, or unmetered).
    pub charged: i64,
    /// Charges given back because the delivery failed: a free credit, or
    /// a pro daily slot while its day lasted (counted when released;
    /// releases carry no campaign). A failed Scale send, or a Pro one
    /// reported after its day, gives nothing back and is not counted.
    pub released: i64,
    /// Jobs refused, by dead-letter reason (a deferred Pro job counts under
    /// `daily_limit_reached` each time it is refused).
    #[schema(example = json!({"out_of_credits": 1}))]
    pub refused: BTreeMap<String, i64>,
}

/// An account's usage over a range.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UsageReport {
    #[schema(example = "acme")]
    pub account_id: String,
    #[schema(example = "Europe/Berlin")]
    pub timezone: String,
    /// hour, day or campaign.
    #[schema(example = "day")]
    pub granularity: String,
    /// The range, inclusive start and exclusive end (RFC 3339, UTC).
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Buckets with any usage, oldest first (or campaigns, by name: one
    /// page of them).
    pub rows: Vec<UsageRow>,
    /// Over the whole range (every campaign, whatever the page).
    pub totals: UsageRow,
    /// By campaign: pass as `after` for the next page; null on the last
    /// (and for hours and days).
    #[schema(required = true)]
    pub next_after: Option<String>,
}

impl Store {
    /// An account's usage from `from` to `to`, grouped as asked.
    ///
    /// # Errors
    /// [`StoreError::UnknownAccount`].
    pub async fn usage(
        &self,
        account: &AccountId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        grouping: Grouping,
    ) -> Result<UsageReport, StoreError> {
        let timezone: String = sqlx::query_scalar("SELECT timezone FROM accounts WHERE id = $1")
            .bind(account.as_str())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::UnknownAccount(account.to_string()))?;
        let tz = rows::timezone(&timezone)?;
        let (unit, campaigns) = match &grouping {
            Grouping::Hour => ("hour", None),
            Grouping::Day => ("day", None),
            Grouping::Campaign { after, limit } => ("day", Some((after.clone(), *limit))),
        };
        // Buckets summed per local hour or day (the zone's wall clock), or
        // per campaign; the primary key serves the account and range. The
        // entries not rolled up yet are added from the same snapshot. By
        // campaign, one page of campaigns is read (the database sums the
        // rest for the totals), never every campaign of a year.
        let (after, limit) = campaigns.clone().unwrap_or((None, 0));
        let fetched = sqlx::query(sql::USAGE_READ)
            .bind(account.as_str())
            .bind(from)
            .bind(to)
            .bind(unit)
            .bind(campaigns.is_some())
            .bind(&timezone)
            .bind(after)
            .bind(i64::try_from(limit + 1).expect("a page of at most 1000 campaigns"))
            .fetch_all(&self.pool)
            .await?;
        let (grouped, totals) = group(&fetched, tz)?;
        let mut rows: Vec<UsageRow> = grouped.into_values().collect();
        // One campaign more than the page was read: there is a next page.
        let next_after = match campaigns {
            Some((_, limit)) if rows.len() > limit => {
                rows.truncate(limit);
                rows.last().and_then(|r| r.campaign_id.clone())
            }
            _ => None,
        };
        Ok(UsageReport {
            account_id: account.to_string(),
            timezone,
            granularity: match grouping {
                Grouping::Hour => "hour",
                Grouping::Day => "day",
                Grouping::Campaign { .. } => "campaign",
            }
            .to_owned(),
            from,
            to,
            rows,
            totals,
            next_after,
        })
    }
}

impl Store {
    /// Moves pending usage into the counts, [`ROLLUP_CHUNK`] rows a
    /// statement, until none is left; returns how many rows it moved. Does
    /// nothing while another process is at it.
    ///
    /// # Errors
    /// [`StoreError::is_transient`] when it should be retried.
    pub async fn roll_up_usage(&self) -> Result<u64, StoreError> {
        let mut moved = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            let ours: bool = sqlx::query_scalar(sql::USAGE_ROLLUP_LOCK)
                .fetch_one(&mut *tx)
                .await?;
            if !ours {
                return Ok(moved);
            }
            let n: i64 = sqlx::query_scalar(sql::ROLL_UP_USAGE)
                .bind(ROLLUP_CHUNK)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            moved += u64::try_from(n).unwrap_or(0);
            if n < ROLLUP_CHUNK {
                return Ok(moved);
            }
        }
    }
}

/// Pending rows (statements) one rollup statement moves at most.
const ROLLUP_CHUNK: i64 = 500;

impl Grouping {
    /// The range a report covers: `to` defaults to `now`, `from` to a week
    /// (a day by hour) before it, and no range is longer than [`max_range`].
    pub fn range(
        &self,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> (DateTime<Utc>, DateTime<Utc>) {
        let to = to.unwrap_or(now);
        let default_span = match self {
            Grouping::Hour => Duration::days(1),
            Grouping::Day | Grouping::Campaign { .. } => Duration::days(7),
        };
        let from = from.unwrap_or(to - default_span).max(to - max_range(self));
        (from, to)
    }
}

/// The widest range one report covers: a year of days, a month of hours.
pub fn max_range(grouping: &Grouping) -> Duration {
    match grouping {
        Grouping::Hour => Duration::days(31),
        Grouping::Day | Grouping::Campaign { .. } => Duration::days(366),
    }
}

/// Usage rows by their local start (hour or day) and campaign.
type Grouped = BTreeMap<(Option<NaiveDateTime>, Option<String>), UsageRow>;

/// The rows of [`sql::USAGE_READ`] summed per local start and campaign,
/// and the totals row.
fn group(
    fetched: &[sqlx::postgres::PgRow],
    tz: chrono_tz::Tz,
) -> Result<(Grouped, UsageRow), StoreError> {
    let mut grouped: BTreeMap<(Option<NaiveDateTime>, Option<String>), UsageRow> = BTreeMap::new();
    let mut totals = UsageRow::default();
    for row in fetched {
        let start: Option<NaiveDateTime> = row.try_get("local_start")?;
        let campaign: Option<String> = row.try_get("campaign_id")?;
        let kind: String = row.try_get("kind")?;
        let n: i64 = row.try_get("n")?;
        let target = if row.try_get::<bool, _>("total")? {
            &mut totals
        } else {
            grouped
                .entry((start, campaign.clone()))
                .or_insert_with(|| UsageRow {
                    start: start.map(|local| {
                        // The first instant of that wall-clock time (a
                        // repeated hour of a DST change: its earlier one).
                        tz.from_local_datetime(&local)
                            .earliest()
                            .map_or_else(|| local.to_string(), |at| at.to_rfc3339())
                    }),
                    campaign_id: campaign,
                    ..UsageRow::default()
                })
        };
        match kind.as_str() {
            "charged" => target.charged += n,
            "released" => target.released += n,
            reason => *target.refused.entry(reason.to_owned()).or_default() += n,
        }
    }
    Ok((grouped, totals))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_quarter_hours_that_every_time_zone_offset_divides() {
        let at = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .expect("a time")
                .with_timezone(&Utc)
        };
        assert_eq!(
            bucket(at("2026-11-30T06:44:59Z")),
            at("2026-11-30T06:30:00Z")
        );
        assert_eq!(
            bucket(at("2026-11-30T06:45:00Z")),
            at("2026-11-30T06:45:00Z")
        );
        // Kathmandu is UTC+05:45: its midnight is a bucket boundary.
        assert_eq!(
            bucket(at("2026-11-29T18:15:00Z")),
            at("2026-11-29T18:15:00Z")
        );
    }
}
