//! The events outbox: threshold events written in the transaction of the
//! change that made them, claimed by the relay, marked published once the
//! broker confirmed them, and removed after their retention.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, Row, Transaction};
use tokio::sync::Notify;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::events::{Event, EventType};

/// What deciding, settling and adjusting need to know to write events, and
/// how the relay is woken when they did.
#[derive(Debug)]
pub struct EventRules {
    /// `credits.low` thresholds of a free balance.
    pub credits_low: Vec<i64>,
    /// Woken after a commit that wrote events.
    pub written: Notify,
}

impl Default for EventRules {
    fn default() -> Self {
        Self {
            credits_low: vec![5],
            written: Notify::new(),
        }
    }
}

/// An unpublished event, as the relay publishes it.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub id: Uuid,
    pub kind: String,
    pub body: Vec<u8>,
    pub created_at: DateTime<Utc>,
}

/// Events claimed by one relay round: locked (others skip them) until
/// [`Claimed::published`] or drop, which hands them back.
pub struct Claimed {
    tx: Transaction<'static, Postgres>,
    pub events: Vec<OutboxEvent>,
}

impl Claimed {
    /// Marks the claimed events published.
    ///
    /// # Errors
    /// The database failed; the events stay unpublished and are relayed
    /// again (consumers deduplicate on the id).
    pub async fn published(mut self) -> Result<(), StoreError> {
        let ids: Vec<Uuid> = self.events.iter().map(|e| e.id).collect();
        sqlx::query("UPDATE events SET published_at = now() WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *self.tx)
            .await?;
        self.tx.commit().await?;
        Ok(())
    }
}

/// The outbox's backlog: unpublished events and the age of the oldest.
#[derive(Debug, Clone, Copy, Default)]
pub struct Backlog {
    pub pending: i64,
    pub oldest: Option<Duration>,
}

/// Writes `events` to the outbox on `conn` (inside the caller's
/// transaction). An event whose once-per scope already has one is skipped.
/// Returns the types of the events written.
pub(super) async fn record(
    conn: &mut PgConnection,
    events: &[Event],
) -> Result<Vec<EventType>, StoreError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let written: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO events (id, type, account_id, body, once_per, created_at)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::text[],
                              $6::timestamptz[])
         ON CONFLICT (once_per) DO NOTHING
         RETURNING id",
    )
    .bind(events.iter().map(|e| e.id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>())
    .bind(
        events
            .iter()
            .map(|e| e.account_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(events.iter().map(Event::to_json).collect::<Vec<_>>())
    .bind(
        events
            .iter()
            .map(|e| e.once_per.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(events.iter().map(|e| e.occurred_at).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    Ok(events
        .iter()
        .filter(|e| written.contains(&e.id))
        .map(|e| e.kind)
        .collect())
}

impl Store {
    pub fn event_rules(&self) -> &Arc<EventRules> {
        &self.events
    }

    /// Sets the `credits.low` thresholds (the configured ones; 5 unless
    /// set).
    #[must_use]
    pub fn with_credit_thresholds(mut self, thresholds: Vec<i64>) -> Self {
        self.events = Arc::new(EventRules {
            credits_low: thresholds,
            written: Notify::new(),
        });
        self
    }

    /// Counts events written by a committed transaction and wakes the relay.
    pub(super) fn events_committed(&self, written: &[EventType]) {
        if written.is_empty() {
            return;
        }
        for kind in written {
            crate::metrics::event_written(kind.as_str());
        }
        self.events.written.notify_one();
    }

    /// Claims up to `limit` unpublished events, oldest first; events
    /// another relay holds are skipped.
    ///
    /// # Errors
    /// The database failed.
    pub async fn claim_events(&self, limit: i64) -> Result<Claimed, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, type, body::text AS body, created_at FROM events
             WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let events = rows
            .iter()
            .map(|row| {
                Ok(OutboxEvent {
                    id: row.try_get("id")?,
                    kind: row.try_get("type")?,
                    body: row.try_get::<String, _>("body")?.into_bytes(),
                    created_at: row.try_get("created_at")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Claimed { tx, events })
    }

    /// How many events wait to be published, and for how long the oldest
    /// has.
    ///
    /// # Errors
    /// The database failed.
    pub async fn events_backlog(&self) -> Result<Backlog, StoreError> {
        let row = sqlx::query(
            "SELECT count(*) AS pending,
                    extract(epoch FROM now() - min(created_at))::float8 AS oldest
             FROM events WHERE published_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        let oldest: Option<f64> = row.try_get("oldest")?;
        Ok(Backlog {
            pending: row.try_get("pending")?,
            oldest: oldest.map(|s| Duration::from_secs_f64(s.max(0.0))),
        })
    }

    /// Removes events published more than `retention` ago, at most `limit`
    /// at a time, oldest first.
    ///
    /// # Errors
    /// The database failed.
    pub async fn purge_events(&self, retention: Duration, limit: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM events WHERE id IN (
                 SELECT id FROM events
                 WHERE published_at IS NOT NULL AND published_at < now() - $1::interval
                 ORDER BY published_at LIMIT $2)",
        )
        .bind(format!("{} seconds", retention.as_secs()))
        .bind(limit)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// The events of an account, newest first (for support and tests).
    ///
    /// # Errors
    /// The database failed.
    pub async fn account_events(
        &self,
        account: &str,
        limit: i64,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let bodies: Vec<serde_json::Value> = sqlx::query_scalar(
            "SELECT body FROM events WHERE account_id = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(account)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(bodies)
    }
}
