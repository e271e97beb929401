//! Delivery reports settled against reservations, and holds that never got
//! a report committed by the sweep.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgConnection;

use super::rows::{self, distinct_accounts, key_arrays};
use super::{Query, Store, StoreError, bind_changes, sql, usage};
use crate::domain::ids::{AccountId, JobKey};
use crate::domain::settle::{Report, Reservation, SettleEffects, Settled, State, settle_batch};

impl Store {
    /// Settles reservations with delivery outcomes, in one transaction;
    /// results come back in the reports' order.
    ///
    /// # Errors
    /// [`StoreError::is_transient`] when the batch should be retried.
    pub async fn settle(
        &self,
        reports: &[Report],
        now: DateTime<Utc>,
    ) -> Result<Vec<Settled>, StoreError> {
        if reports.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin_with(sql::BEGIN_PLANNED).await?;
        // Same lock order as deciding: accounts, then their reservations.
        let account_ids = distinct_accounts(reports.iter().map(|r| &r.account_id));
        let mut accounts = HashMap::with_capacity(account_ids.len());
        for row in sqlx::query(sql::LOCK_ALL)
            .bind(&account_ids)
            .fetch_all(&mut *tx)
            .await?
        {
            accounts.insert(
                rows::account_id(&row, "id")?,
                rows::account_state(&row, now)?,
            );
        }
        let (key_accounts, keys) =
            key_arrays(reports.iter().map(|r| (&r.account_id, &r.idempotency_key)));
        let mut reservations = HashMap::new();
        let mut usage = HashMap::new();
        read_held(&mut tx, &key_accounts, &keys, &mut reservations, &mut usage).await?;
        // A key charged afresh while this statement waited for its released
        // row: the re-charge took that row out and wrote a new one, which
        // this statement's snapshot (older than the re-charge's commit) does
        // not show. A new statement has a new snapshot under READ COMMITTED
        // and sees the new charge, so the report is stale, not unknown.
        let (missing_accounts, missing_keys) = key_arrays(
            reports
                .iter()
                .filter(|r| {
                    !reservations.contains_key(&JobKey::new(&r.account_id, &r.idempotency_key))
                })
                .map(|r| (&r.account_id, &r.idempotency_key)),
        );
        if !missing_keys.is_empty() {
            read_held(
                &mut tx,
                &missing_accounts,
                &missing_keys,
                &mut reservations,
                &mut usage,
            )
            .await?;
        }
        let (results, effects) = settle_batch(reports, &reservations, &accounts, &usage, now);
        if !effects.settled.is_empty() {
            settle_write(&effects)
                .bind(usage::bucket(now))
                .bind(
                    effects
                        .given_back
                        .iter()
                        .map(AccountId::as_str)
                        .collect::<Vec<_>>(),
                )
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(results)
    }

    /// Commits holds older than `max_age` that never got an outcome, at
    /// most `limit` at a time. Safe with many workers.
    ///
    /// # Errors
    /// [`StoreError::is_transient`] when it should be retried.
    pub async fn expire_holds(&self, max_age: Duration, limit: i64) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin_with(sql::BEGIN_PLANNED).await?;
        let committed = sqlx::query(sql::EXPIRE_HOLDS)
            .bind(format!("{} milliseconds", max_age.as_millis()))
            .bind(limit)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(committed)
    }
}

/// The reservations of the keys (parallel arrays), locked
/// ([`sql::HELD_READ`]), and the Pro usage of their days.
async fn read_held(
    conn: &mut PgConnection,
    accounts: &[&str],
    keys: &[&str],
    reservations: &mut HashMap<JobKey, Reservation>,
    usage: &mut HashMap<(AccountId, NaiveDate), i64>,
) -> Result<(), StoreError> {
    for row in sqlx::query(sql::HELD_READ)
        .bind(accounts)
        .bind(keys)
        .fetch_all(&mut *conn)
        .await?
    {
        let held = rows::held(&row)?;
        if let (Some(day), Some(used)) = (held.reservation.usage_day, held.used_that_day) {
            usage.insert((held.key.account_id.clone(), day), i64::from(used));
        }
        // A released Free charge may be kept beside the key's charge on
        // another plan: the one not released is the key's reservation.
        let kept_released = reservations
            .get(&held.key)
            .is_some_and(|r: &Reservation| r.state != State::Released);
        if !kept_released {
            reservations.insert(held.key, held.reservation);
        }
    }
    Ok(())
}

/// [`sql::SETTLE_WRITE`] with the effects bound.
fn settle_write(effects: &SettleEffects) -> Query<'_> {
    let (st, rl) = (&effects.settled, &effects.releases);
    let query = sqlx::query(sql::SETTLE_WRITE)
        .bind(
            st.iter()
                .map(|x| x.key.account_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            st.iter()
                .map(|x| x.key.idempotency_key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(st.iter().map(|x| x.state.as_str()).collect::<Vec<_>>())
        .bind(st.iter().map(|x| x.detail.as_deref()).collect::<Vec<_>>())
        .bind(rl.iter().map(|x| x.account_id.as_str()).collect::<Vec<_>>())
        .bind(rl.iter().map(|x| x.balance_after).collect::<Vec<_>>())
        .bind(
            rl.iter()
                .map(|x| x.idempotency_key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(rl.iter().map(|x| x.reservation_id).collect::<Vec<_>>());
    bind_changes(query, &effects.balances, &effects.usage)
}
