//! Support corrections: credits added to or taken from an account by hand
//! (a refund after an incident), as `adjustment` rows in the ledger, once
//! per client-given key, never taking the balance below 0. Not a purchase
//! path: a plan's credits come only from its rules.

use sqlx::Row;

use super::rows::{self, LedgerEntry};
use super::{Store, StoreError, events};
use crate::domain::events::credit_events;
use crate::domain::ids::AccountId;

/// The most credits one adjustment may add or take.
pub const MAX_ADJUSTMENT: i64 = 1_000_000;
/// The longest reason, in characters.
pub const MAX_REASON: usize = 500;
/// The longest adjustment key, in (ASCII) characters.
pub const MAX_KEY: usize = 255;

/// A correction, checked: non-zero credits within bounds, a reason, a key.
#[derive(Debug, Clone)]
pub struct Adjustment {
    credits: i64,
    reason: String,
    key: String,
    actor: String,
}

impl Adjustment {
    /// # Errors
    /// What is wrong with the input, naming the field.
    pub fn new(credits: i64, reason: &str, key: &str, actor: &str) -> Result<Self, String> {
        if credits == 0 || credits.abs() > MAX_ADJUSTMENT {
            return Err(format!(
                "`credits` must be a non-zero integer from -{MAX_ADJUSTMENT} to {MAX_ADJUSTMENT}"
            ));
        }
        let reason = reason.trim();
        let chars = reason.chars().count();
        if chars == 0 || chars > MAX_REASON || reason.chars().any(char::is_control) {
            return Err(format!(
                "`reason` must be 1 to {MAX_REASON} printable characters: say why, for the audit"
            ));
        }
        if key.is_empty() || key.len() > MAX_KEY || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "the adjustment's key (`idempotency_key`) must be 1 to {MAX_KEY} ASCII letters, \
                 digits or punctuation, no spaces"
            ));
        }
        Ok(Self {
            credits,
            reason: reason.to_owned(),
            key: key.to_owned(),
            actor: actor.to_owned(),
        })
    }
}

/// What an adjustment did.
#[derive(Debug, Clone)]
pub struct Adjusted {
    /// The ledger row it wrote (now or before).
    pub entry: LedgerEntry,
    /// The account's balance now.
    pub balance: i64,
    /// Applied before under the same key; nothing changed this time.
    pub replayed: bool,
}

const LEDGER_COLUMNS: &str =
    "id, delta, kind, balance_after, idempotency_key, reservation_id, note, actor, created_at";

impl Store {
    /// Adds (or takes) credits by hand, under the account's lock, as one
    /// ledger row; the same key again returns the row it wrote.
    ///
    /// # Errors
    /// [`StoreError::UnknownAccount`]; [`StoreError::AdjustmentRefused`] when
    /// the balance would go below 0 or the key names another adjustment.
    pub async fn adjust_credits(
        &self,
        id: &AccountId,
        adjustment: &Adjustment,
    ) -> Result<Adjusted, StoreError> {
        let mut tx = self.pool.begin().await?;
        let account =
            sqlx::query("SELECT plan, credit_balance FROM accounts WHERE id = $1 FOR UPDATE")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| StoreError::UnknownAccount(id.to_string()))?;
        let plan = rows::plan(&account, "plan")?;
        let balance: i64 = account.try_get("credit_balance")?;
        let earlier = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {LEDGER_COLUMNS} FROM credit_ledger
             WHERE account_id = $1 AND idempotency_key = $2 AND kind = 'adjustment'"
        )))
        .bind(id.as_str())
        .bind(&adjustment.key)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = earlier {
            return replayed(rows::ledger_entry(&row)?, adjustment, balance);
        }
        let after = balance + adjustment.credits;
        if after < 0 {
            return Err(StoreError::AdjustmentRefused(format!(
                "the balance is {balance}; taking {} would leave it below 0",
                -adjustment.credits
            )));
        }
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO credit_ledger
                 (account_id, delta, kind, balance_after, idempotency_key, note, actor)
             VALUES ($1, $2, 'adjustment', $3, $4, $5, $6)
             RETURNING {LEDGER_COLUMNS}"
        )))
        .bind(id.as_str())
        .bind(adjustment.credits)
        .bind(after)
        .bind(&adjustment.key)
        .bind(&adjustment.reason)
        .bind(&adjustment.actor)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("UPDATE accounts SET credit_balance = $2, updated_at = now() WHERE id = $1")
            .bind(id.as_str())
            .bind(after)
            .execute(&mut *tx)
            .await?;
        let crossings = credit_events(
            id,
            plan,
            balance,
            after,
            &self.events.credits_low,
            chrono::Utc::now(),
            &mut uuid::Uuid::now_v7,
        );
        let written = events::record(&mut tx, &crossings).await?;
        tx.commit().await?;
        self.events_committed(&written);
        Ok(Adjusted {
            entry: rows::ledger_entry(&row)?,
            balance: after,
            replayed: false,
        })
    }
}

/// An adjustment whose key was used before: the row written then, if it was
/// the same adjustment; refused if the key named another.
fn replayed(
    entry: LedgerEntry,
    adjustment: &Adjustment,
    balance: i64,
) -> Result<Adjusted, StoreError> {
    let same = entry.delta == adjustment.credits
        && entry.note.as_deref() == Some(adjustment.reason.as_str());
    if !same {
        return Err(StoreError::AdjustmentRefused(format!(
            "key `{}` was used for another adjustment ({:+} credits: {})",
            adjustment.key,
            entry.delta,
            entry.note.unwrap_or_default()
        )));
    }
    Ok(Adjusted {
        entry,
        balance,
        replayed: true,
    })
}
