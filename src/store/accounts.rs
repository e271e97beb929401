//! Accounts as operators and the API see them: create, change plan, show,
//! and page through the credit ledger.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use sqlx::Row;

use super::rows::{self, LedgerEntry};
use super::{Store, StoreError, events};
use crate::domain::events::{Event, EventData};
use crate::domain::ids::AccountId;
use crate::domain::plan::{Capacity, Plan, capacity, local_day, next_day_start, parse_timezone};
use chrono_tz::Tz;

/// What `accounts create` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// A new account; `granted` signup credits were given.
    New { granted: i64 },
    /// It already existed with the same plan; nothing changed.
    Existing,
}

/// What `accounts show` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccountSummary {
    pub id: AccountId,
    pub plan: Plan,
    /// The zone of the account's calendar day (its IANA name in JSON).
    pub timezone: Tz,
    pub credit_balance: i64,
    /// Sum of the ledger; always equals `credit_balance`.
    pub ledger_sum: i64,
    pub today: NaiveDate,
    pub sends_today: i64,
    /// The daily limit on pro, the balance on free, none on scale.
    pub limit_today: Option<i64>,
    pub recent_ledger: Vec<LedgerEntry>,
}

impl AccountSummary {
    /// How many sends would pass at `now` (the API's `/capacity`, `accounts
    /// capacity`, and an account's next free slot).
    pub fn capacity(&self, now: DateTime<Utc>) -> Capacity {
        capacity(
            self.plan,
            self.credit_balance,
            self.sends_today,
            self.limit_today,
            self.timezone,
            now,
        )
    }
}

impl Store {
    /// Creates an account; a free one gets its signup grant as a ledger row.
    /// Creating the same account again changes nothing and grants nothing.
    ///
    /// # Errors
    /// [`StoreError::AccountExists`] when it exists on another plan or time
    /// zone; [`StoreError::InvalidAccount`] for a bad time zone.
    pub async fn create_account(
        &self,
        id: &AccountId,
        plan: Plan,
        timezone: &str,
    ) -> Result<Created, StoreError> {
        parse_timezone(timezone).map_err(StoreError::InvalidAccount)?;
        let granted = if plan == Plan::Free {
            self.limits.signup_credits
        } else {
            0
        };
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO accounts (id, plan, timezone, credit_balance) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.as_str())
        .bind(plan.as_str())
        .bind(timezone)
        .bind(granted)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            let row = sqlx::query("SELECT plan, timezone FROM accounts WHERE id = $1")
                .bind(id.as_str())
                .fetch_one(&mut *tx)
                .await?;
            let existing = rows::plan(&row, "plan")?;
            let existing_tz: String = row.try_get("timezone")?;
            if existing != plan || existing_tz != timezone {
                return Err(StoreError::AccountExists {
                    id: id.to_string(),
                    plan: existing,
                });
            }
            return Ok(Created::Existing);
        }
        if plan == Plan::Free {
            sqlx::query(
                "INSERT INTO credit_ledger (account_id, delta, kind, balance_after, note)
                 VALUES ($1, $2, 'signup_grant', $2, 'signup grant')",
            )
            .bind(id.as_str())
            .bind(granted)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Created::New { granted })
    }

    /// Changes an account's plan; it applies from the next job on. Credits
    /// are kept on record and never granted by a plan change. A change
    /// writes a `plan.changed` event; setting the plan it has changes
    /// nothing.
    ///
    /// # Errors
    /// [`StoreError::UnknownAccount`].
    pub async fn set_plan(&self, id: &AccountId, plan: Plan) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let before =
            sqlx::query("SELECT plan, credit_balance FROM accounts WHERE id = $1 FOR UPDATE")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| StoreError::UnknownAccount(id.to_string()))?;
        let from = rows::plan(&before, "plan")?;
        if from == plan {
            return Ok(());
        }
        sqlx::query("UPDATE accounts SET plan = $2, updated_at = now() WHERE id = $1")
            .bind(id.as_str())
            .bind(plan.as_str())
            .execute(&mut *tx)
            .await?;
        let changed = EventData::PlanChanged {
            from,
            to: plan,
            credit_balance: before.try_get("credit_balance")?,
        };
        let event = Event::new(uuid::Uuid::now_v7(), id, Utc::now(), changed);
        let written = events::record(&mut tx, &[event]).await?;
        tx.commit().await?;
        self.events_committed(&written);
        Ok(())
    }

    /// Moves an account's calendar day to another time zone, from now on.
    ///
    /// The day in progress keeps its Pro count: the sends counted on the
    /// old zone's date now are the count of the new zone's date now, so
    /// moving the zone never resets (nor adds to) the day's sends; the new
    /// zone's next midnight starts a fresh day. (A held charge still gives
    /// its slot back, if its delivery fails, to the day it was charged on.)
    /// Setting the zone the account has changes nothing.
    ///
    /// # Errors
    /// [`StoreError::UnknownAccount`]; [`StoreError::InvalidAccount`] for
    /// a name that is not an IANA time zone.
    pub async fn set_timezone(
        &self,
        id: &AccountId,
        timezone: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let to = parse_timezone(timezone).map_err(StoreError::InvalidAccount)?;
        let mut tx = self.pool.begin().await?;
        // Locked as deciding locks a metered account: no batch counts a
        // send on either day while the count moves.
        let before: String =
            sqlx::query_scalar("SELECT timezone FROM accounts WHERE id = $1 FOR UPDATE")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| StoreError::UnknownAccount(id.to_string()))?;
        if before == timezone {
            return Ok(());
        }
        let from = parse_timezone(&before).map_err(|err| StoreError::corrupt("timezone", err))?;
        sqlx::query("UPDATE accounts SET timezone = $2, updated_at = now() WHERE id = $1")
            .bind(id.as_str())
            .bind(timezone)
            .execute(&mut *tx)
            .await?;
        let (old_day, new_day) = (local_day(now, from), local_day(now, to));
        if old_day != new_day {
            sqlx::query(
                "INSERT INTO daily_usage (account_id, day, used, daily_limit)
                 SELECT $1, $3, coalesce(o.used, 0), coalesce(o.daily_limit, $4)
                 FROM (SELECT 1) one
                 LEFT JOIN daily_usage o ON o.account_id = $1 AND o.day = $2
                 ON CONFLICT (account_id, day) DO UPDATE
                 SET used = EXCLUDED.used,
                     daily_limit = greatest(daily_usage.daily_limit, EXCLUDED.daily_limit)",
            )
            .bind(id.as_str())
            .bind(old_day)
            .bind(new_day)
            .bind(i32::try_from(self.limits.daily_sends).unwrap_or(i32::MAX))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// An account's plan, balance, usage today and recent ledger rows.
    ///
    /// # Errors
    /// [`StoreError::UnknownAccount`].
    pub async fn account_summary(
        &self,
        id: &AccountId,
        now: DateTime<Utc>,
        ledger_rows: i64,
    ) -> Result<AccountSummary, StoreError> {
        let row = sqlx::query(
            "SELECT a.plan, a.timezone, a.credit_balance,
                    (SELECT coalesce(sum(delta), 0)::int8 FROM credit_ledger WHERE account_id = a.id) AS ledger_sum
             FROM accounts a WHERE a.id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::UnknownAccount(id.to_string()))?;
        let plan = rows::plan(&row, "plan")?;
        let tz = rows::timezone(row.try_get("timezone")?)?;
        let credit_balance: i64 = row.try_get("credit_balance")?;
        let today = local_day(now, tz);
        let (sends_today, limit_today) = match plan {
            Plan::Pro => (
                self.pro_used(id, today).await?,
                Some(self.limits.daily_sends),
            ),
            Plan::Free => (self.sends_on_day(id, now, tz).await?, Some(credit_balance)),
            Plan::Scale => (self.sends_on_day(id, now, tz).await?, None),
        };
        Ok(AccountSummary {
            id: id.clone(),
            plan,
            timezone: tz,
            credit_balance,
            ledger_sum: row.try_get("ledger_sum")?,
            today,
            sends_today,
            limit_today,
            recent_ledger: self.ledger_rows(id, ledger_rows, None).await?,
        })
    }

    /// Charges of `id` on the local day of `now` in `tz`.
    async fn sends_on_day(
        &self,
        id: &AccountId,
        now: DateTime<Utc>,
        tz: chrono_tz::Tz,
    ) -> Result<i64, StoreError> {
        let end = next_day_start(now, tz);
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM reservations
             WHERE account_id = $1 AND created_at >= $2 AND created_at < $3",
        )
        .bind(id.as_str())
        .bind(end - Duration::days(1))
        .bind(end)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Pro daily slots `id` used on `day`.
    async fn pro_used(&self, id: &AccountId, day: NaiveDate) -> Result<i64, StoreError> {
        let used: Option<i32> =
            sqlx::query_scalar("SELECT used FROM daily_usage WHERE account_id = $1 AND day = $2")
                .bind(id.as_str())
                .bind(day)
                .fetch_optional(&self.pool)
                .await?;
        Ok(i64::from(used.unwrap_or(0)))
    }

    /// A page of an account's ledger, newest first, strictly before the row
    /// id `before` when given.
    ///
    /// # Errors
    /// [`StoreError::UnknownAccount`].
    pub async fn ledger_page(
        &self,
        id: &AccountId,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        self.account_must_exist(id).await?;
        self.ledger_rows(id, limit, before).await
    }

    /// # Errors
    /// [`StoreError::UnknownAccount`] when there is no account `id`.
    pub(super) async fn account_must_exist(&self, id: &AccountId) -> Result<(), StoreError> {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = $1)")
                .bind(id.as_str())
                .fetch_one(&self.pool)
                .await?;
        if exists {
            Ok(())
        } else {
            Err(StoreError::UnknownAccount(id.to_string()))
        }
    }

    async fn ledger_rows(
        &self,
        id: &AccountId,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, delta, kind, balance_after, idempotency_key, reservation_id, note, actor,
                    created_at
             FROM credit_ledger WHERE account_id = $1 AND ($2::int8 IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3",
        )
        .bind(id.as_str())
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::ledger_entry).collect()
    }
}
