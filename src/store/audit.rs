//! The self-audit: the money's invariants checked against the database as
//! it is, so drift (a hand-made UPDATE, a restore, a bug of ours) is found
//! by sendgate rather than by a customer. Read only.
//!
//! Accounts are read in pages (a keyset on the primary key), each page in
//! one read-only repeatable-read transaction, so every check of a page sees
//! one snapshot: a batch that charges while the audit runs is seen whole or
//! not at all. Every read goes through an index (the accounts' and
//! ledger's, the reservations' primary key, `daily_usage`'s and
//! `usage_counts`' primary keys, the held reservations' partial index).
//!
//! Charges of Pro and Scale accounts are kept for the deduplication window
//! only (`docs/contract.md#10-invariants`) and usage counts for `[usage]
//! retention_days`: the checks that count charges look only where both are
//! complete.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{Store, StoreError};

/// The invariants the audit checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// An account's credit balance is the sum of its ledger, and the
    /// balance its latest ledger row says.
    LedgerBalance,
    /// An account's credit charges that stand (held or committed) are its
    /// ledger's sends less its releases: every credit spent is a forwarded
    /// Free job, and every job charged a credit spent one.
    CreditsSpent,
    /// A Pro day's standing charges are the day's sends used, and within
    /// the day's limit.
    DailyLimit,
    /// Every Free and Pro charge is counted in the account's usage.
    UsageCounts,
    /// No charge is held longer than the hold time and two sweeps.
    HoldsExpire,
}

impl Check {
    pub const ALL: [Check; 5] = [
        Check::LedgerBalance,
        Check::CreditsSpent,
        Check::DailyLimit,
        Check::UsageCounts,
        Check::HoldsExpire,
    ];

    /// The name in metrics, JSON and the runbook.
    pub fn as_str(self) -> &'static str {
        match self {
            Check::LedgerBalance => "ledger_balance",
            Check::CreditsSpent => "credits_spent",
            Check::DailyLimit => "daily_limit",
            Check::UsageCounts => "usage_counts",
            Check::HoldsExpire => "holds_expire",
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One broken invariant, for one account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub check: Check,
    pub account_id: String,
    /// What differs, with the figures.
    pub detail: String,
}

/// What the audit needs to know of the configuration.
#[derive(Debug, Clone, Copy)]
pub struct AuditRules {
    /// `[reservations] hold_secs`.
    pub hold: Duration,
    /// `[reservations] sweep_interval_secs`.
    pub sweep_interval: Duration,
    /// `[usage] retention_days`.
    pub usage_retention: Duration,
}

/// One snapshot for a page's checks, read only; planned with the page's
/// own ids (as [`super::sql::BEGIN_PLANNED`]).
const BEGIN_AUDIT: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
    SET LOCAL plan_cache_mode = force_custom_plan";

/// Accounts read per page (one transaction each).
const PAGE: i64 = 500;

/// Violations listed in a report at most; the counts stay exact.
pub const MAX_LISTED: usize = 1000;

/// How far a charge's time (the database's clock) and its usage bucket
/// (the gate's clock) may be apart before [`Check::UsageCounts`] could
/// report a charge counted in a bucket just before the range it sums.
const CLOCK_MARGIN: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// The result of one audit.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// How long it took (a monotonic clock's reading).
    #[serde(skip)]
    pub took: Duration,
    /// Accounts looked at.
    pub accounts: u64,
    /// Violations found, per check (every check named, 0 included).
    pub counts: BTreeMap<Check, u64>,
    /// The violations, at most [`MAX_LISTED`], in the order found.
    pub violations: Vec<Violation>,
    /// Charges are complete from here on (the oldest charge of the ring
    /// that retention has not removed); `None`: every charge is kept.
    pub charges_complete_since: Option<DateTime<Utc>>,
}

impl AuditReport {
    /// Violations found, all checks.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    fn add(&mut self, check: Check, account_id: &str, detail: String) {
        *self.counts.entry(check).or_default() += 1;
        if self.violations.len() < MAX_LISTED {
            self.violations.push(Violation {
                check,
                account_id: account_id.to_owned(),
                detail,
            });
        }
    }
}

/// The standing of one page's accounts: balance, ledger and credit
/// charges.
const LEDGER_READ: &str = "
    SELECT a.id, a.credit_balance, l.total, l.last_balance, l.sends, l.releases, c.charges
    FROM unnest($1::text[]) AS p(id)
    JOIN accounts a ON a.id = p.id
    CROSS JOIN LATERAL (
        SELECT coalesce(sum(delta), 0)::int8 AS total,
               (array_agg(balance_after ORDER BY id DESC))[1] AS last_balance,
               count(*) FILTER (WHERE kind = 'send') AS sends,
               count(*) FILTER (WHERE kind = 'release') AS releases
        FROM credit_ledger WHERE account_id = a.id
    ) l
    CROSS JOIN LATERAL (
        SELECT count(*) AS charges FROM reservations
        WHERE account_id = a.id AND slot = 0 AND charge = 'credit' AND state <> 'released'
    ) c";

/// One page's Pro days from $2 on (all with NULL): the days counted and
/// the days charged, either without the other included. Only the charges
/// of accounts on Pro now or with days counted are read (each account's
/// once): a Scale account's charges, the bulk of any history, are not.
const DAYS_READ: &str = "
    WITH metered AS (
        SELECT id FROM accounts WHERE id = ANY($1::text[]) AND plan = 'pro'
        UNION
        SELECT account_id FROM daily_usage
        WHERE account_id = ANY($1::text[]) AND ($2::date IS NULL OR day >= $2)
    ), charged AS (
        -- Counted per account inside the lateral, so the planner cannot
        -- turn it into a join over every partition's rows (it did, with
        -- parallel sequential scans, on a 50-million history).
        SELECT m.id AS account_id, c.day, c.charges
        FROM metered m
        CROSS JOIN LATERAL (
            SELECT usage_day AS day, count(*) AS charges FROM reservations
            WHERE account_id = m.id AND charge = 'daily_slot' AND state <> 'released'
              AND ($2::date IS NULL OR usage_day >= $2)
            GROUP BY usage_day
        ) c
    ), counted AS (
        SELECT account_id, day, used::int8, daily_limit::int8 FROM daily_usage
        WHERE account_id = ANY($1::text[]) AND ($2::date IS NULL OR day >= $2)
    )
    SELECT coalesce(d.account_id, c.account_id) AS account_id, coalesce(d.day, c.day) AS day,
           coalesce(d.used, 0) AS used, d.daily_limit, coalesce(c.charges, 0) AS charges
    FROM counted d FULL JOIN charged c ON c.account_id = d.account_id AND c.day = d.day
    ORDER BY 1, 2";

/// One page's Free and Pro accounts: their metered charges made from $3 on,
/// and the charges their usage counts from $2 on (rolled up or not yet).
const USAGE_READ: &str = "
    WITH pending AS (
        SELECT x.id, count(*) AS n
        FROM usage_pending p CROSS JOIN LATERAL unnest(p.account_ids) AS x(id)
        WHERE p.kind = 'charged' AND p.bucket >= $2 AND x.id = ANY($1::text[])
        GROUP BY x.id
    )
    SELECT a.id, c.charges, u.counted + coalesce(pending.n, 0) AS counted
    FROM unnest($1::text[]) AS p(id)
    JOIN accounts a ON a.id = p.id AND a.plan <> 'scale'
    CROSS JOIN LATERAL (
        SELECT count(*) AS charges FROM reservations r
        WHERE r.account_id = a.id AND r.charge <> 'unmetered' AND r.created_at >= $3
    ) c
    CROSS JOIN LATERAL (
        SELECT coalesce(sum(n), 0)::int8 AS counted FROM usage_counts
        WHERE account_id = a.id AND bucket >= $2 AND kind = 'charged'
    ) u
    LEFT JOIN pending ON pending.id = a.id";

/// Accounts with charges held past $1, through the held charges' index.
const OVERDUE_HOLDS: &str = "
    SELECT account_id, count(*) AS held, min(created_at) AS oldest
    FROM reservations
    WHERE state = 'held' AND created_at < now() - $1::interval
    GROUP BY account_id ORDER BY account_id";

impl Store {
    /// Checks every [`Check`] over every account, a page at a time.
    ///
    /// # Errors
    /// The database failed (the audit is not finished; nothing is
    /// reported).
    pub async fn audit(&self, rules: &AuditRules) -> Result<AuditReport, StoreError> {
        let (started_at, start) = (Utc::now(), std::time::Instant::now());
        let mut report = AuditReport {
            started_at,
            finished_at: started_at,
            took: Duration::ZERO,
            accounts: 0,
            counts: Check::ALL.iter().map(|&check| (check, 0)).collect(),
            violations: Vec::new(),
            charges_complete_since: self.charges_complete_since().await?,
        };
        let usage_since = {
            let retention = chrono::TimeDelta::from_std(rules.usage_retention)
                .map_err(|err| StoreError::corrupt("usage retention", err))?;
            // A day to spare: the sweep removes whole old buckets.
            let kept = started_at - retention + chrono::TimeDelta::days(1);
            report.charges_complete_since.map_or(kept, |c| c.max(kept))
        };
        // Any zone's day that starts after the charges are complete: a day
        // later, and one more for the zones ahead of UTC.
        let first_day = report
            .charges_complete_since
            .map(|since| since.date_naive() + chrono::Days::new(2));
        let mut after = String::new();
        loop {
            let page: Vec<String> =
                sqlx::query_scalar("SELECT id FROM accounts WHERE id > $1 ORDER BY id LIMIT $2")
                    .bind(&after)
                    .bind(PAGE)
                    .fetch_all(&self.pool)
                    .await?;
            let Some(last) = page.last() else { break };
            after = last.clone();
            report.accounts += page.len() as u64;
            self.audit_page(&page, first_day, usage_since, &mut report)
                .await?;
        }
        self.audit_holds(rules, &mut report).await?;
        report.finished_at = Utc::now();
        report.took = start.elapsed();
        Ok(report)
    }

    /// Since when every charge is still on record: the ring's slots hold
    /// the charges of at least the stored window before the current slot
    /// became current (`None`: retention is off, every charge is kept).
    async fn charges_complete_since(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT r.since - s.dedup_window
             FROM reservation_ring r CROSS JOIN retention_settings s
             WHERE s.dedup_window IS NOT NULL",
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn audit_page(
        &self,
        page: &[String],
        first_day: Option<NaiveDate>,
        usage_since: DateTime<Utc>,
        report: &mut AuditReport,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_AUDIT).await?;
        let ledgers = sqlx::query(LEDGER_READ).bind(page).fetch_all(&mut *tx);
        check_ledgers(&ledgers.await?, report)?;
        let days = sqlx::query(DAYS_READ).bind(page).bind(first_day);
        check_days(&days.fetch_all(&mut *tx).await?, report)?;
        let usage = sqlx::query(USAGE_READ)
            .bind(page)
            .bind(usage_since)
            .bind(usage_since + CLOCK_MARGIN);
        check_usage(&usage.fetch_all(&mut *tx).await?, usage_since, report)?;
        tx.commit().await?;
        Ok(())
    }

    async fn audit_holds(
        &self,
        rules: &AuditRules,
        report: &mut AuditReport,
    ) -> Result<(), StoreError> {
        let overdue = rules.hold + 2 * rules.sweep_interval;
        let rows = sqlx::query(OVERDUE_HOLDS)
            .bind(format!("{} milliseconds", overdue.as_millis()))
            .fetch_all(&self.pool)
            .await?;
        for row in rows {
            let id: String = row.try_get("account_id")?;
            let held: i64 = row.try_get("held")?;
            let oldest: DateTime<Utc> = row.try_get("oldest")?;
            let detail = format!(
                "{held} charges held past the hold time and two sweeps ({} s), the oldest since {}",
                overdue.as_secs(),
                oldest.to_rfc3339()
            );
            report.add(Check::HoldsExpire, &id, detail);
        }
        Ok(())
    }
}

/// [`Check::LedgerBalance`] and [`Check::CreditsSpent`] over
/// [`LEDGER_READ`]'s rows.
fn check_ledgers(rows: &[PgRow], report: &mut AuditReport) -> Result<(), StoreError> {
    for row in rows {
        let id: String = row.try_get("id")?;
        let balance: i64 = row.try_get("credit_balance")?;
        let total: i64 = row.try_get("total")?;
        let last: Option<i64> = row.try_get("last_balance")?;
        let (sends, releases): (i64, i64) = (row.try_get("sends")?, row.try_get("releases")?);
        let charges: i64 = row.try_get("charges")?;
        if total != balance {
            let detail = format!("balance {balance}, but the ledger sums to {total}");
            report.add(Check::LedgerBalance, &id, detail);
        } else if let Some(last) = last.filter(|&last| last != balance) {
            let detail = format!("balance {balance}, but the latest ledger row says {last}");
            report.add(Check::LedgerBalance, &id, detail);
        }
        if charges != sends - releases {
            let detail = format!(
                "{charges} credit charges stand, but the ledger spent {} credits \
                 ({sends} sends, {releases} releases)",
                sends - releases
            );
            report.add(Check::CreditsSpent, &id, detail);
        }
    }
    Ok(())
}

/// [`Check::DailyLimit`] over [`DAYS_READ`]'s rows.
fn check_days(rows: &[PgRow], report: &mut AuditReport) -> Result<(), StoreError> {
    for row in rows {
        let id: String = row.try_get("account_id")?;
        let day: NaiveDate = row.try_get("day")?;
        let used: i64 = row.try_get("used")?;
        let limit: Option<i64> = row.try_get("daily_limit")?;
        let charges: i64 = row.try_get("charges")?;
        let Some(limit) = limit else {
            let detail = format!("{charges} sends charged on {day}, but the day is not counted");
            report.add(Check::DailyLimit, &id, detail);
            continue;
        };
        if charges > limit {
            let detail = format!("{charges} sends charged on {day}, over its limit of {limit}");
            report.add(Check::DailyLimit, &id, detail);
        } else if charges != used {
            let detail =
                format!("{charges} sends charged on {day}, but the day counts {used} used");
            report.add(Check::DailyLimit, &id, detail);
        }
    }
    Ok(())
}

/// [`Check::UsageCounts`] over [`USAGE_READ`]'s rows.
fn check_usage(
    rows: &[PgRow],
    usage_since: DateTime<Utc>,
    report: &mut AuditReport,
) -> Result<(), StoreError> {
    for row in rows {
        let id: String = row.try_get("id")?;
        let charges: i64 = row.try_get("charges")?;
        let counted: i64 = row.try_get("counted")?;
        if charges > counted {
            let detail = format!(
                "{charges} Free and Pro charges made since {}, but usage counts {counted}",
                (usage_since + CLOCK_MARGIN).to_rfc3339()
            );
            report.add(Check::UsageCounts, &id, detail);
        }
    }
    Ok(())
}
