//! Retention of charges: the reservation ring's slots emptied in turn (see
//! `migrations/20261130000010_reservation_retention.sql`), and forward
//! batches removed once confirmed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use super::{Store, StoreError, sql};

impl Store {
    /// Empties the ring's other slot and makes it current, when the current
    /// one has been current for the stored window (`retention_settings`,
    /// written by `migrate`): every charge in the other slot is
    /// then older than the window. Returns the slot emptied, if any. Safe
    /// with many processes: the ring's row is locked, and the one that
    /// comes second finds nothing due. Waits at most 2 s for the slot's
    /// table lock (statements reading it), then fails, to be tried again.
    ///
    /// # Errors
    /// [`StoreError::is_transient`] when it should be retried (the slot's
    /// lock was not had in time, among others).
    pub async fn rotate_reservations(&self) -> Result<Option<i16>, StoreError> {
        Ok(sqlx::query_scalar(sql::ROTATE_RING)
            .fetch_one(&self.pool)
            .await?)
    }

    /// The deduplication window the database holds (`None`: keep every
    /// charge), as the last `migrate` stored it.
    ///
    /// # Errors
    /// The database failed.
    pub async fn dedup_window(&self) -> Result<Option<Duration>, StoreError> {
        let secs: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM dedup_window)::float8 FROM retention_settings",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(secs.map(Duration::from_secs_f64))
    }

    /// Removes up to `limit` released Free charges older than the stored
    /// window; returns how many.
    ///
    /// # Errors
    /// [`StoreError::is_transient`] when it should be retried.
    pub async fn purge_released_kept(&self, limit: i64) -> Result<u64, StoreError> {
        let removed: i64 = sqlx::query_scalar(sql::PURGE_RELEASED_KEPT)
            .bind(limit)
            .fetch_one(&self.pool)
            .await?;
        // A row count: never negative.
        Ok(removed.unsigned_abs())
    }

    /// How long the ring's current slot has been current.
    ///
    /// # Errors
    /// The database failed.
    pub async fn ring_slot_age(&self) -> Result<Duration, StoreError> {
        let age: f64 = sqlx::query_scalar(
            "SELECT greatest(extract(epoch FROM now() - since), 0)::float8 FROM reservation_ring",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Duration::from_secs_f64(age))
    }

    /// Removes confirmed forward batches created more than `age` ago, at
    /// most `limit`, oldest first.
    ///
    /// # Errors
    /// [`StoreError::is_transient`] when it should be retried.
    pub async fn purge_forward_batches(
        &self,
        age: Duration,
        limit: i64,
    ) -> Result<u64, StoreError> {
        Ok(sqlx::query(sql::PURGE_FORWARD_BATCHES)
            .bind(first_id_at(SystemTime::now() - age))
            .bind(limit)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}

/// The lowest UUIDv7 of the millisecond `at`: every id made before `at`
/// sorts below it.
fn first_id_at(at: SystemTime) -> Uuid {
    let millis = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    uuid::Builder::from_unix_timestamp_millis(u64::try_from(millis).unwrap_or(0), &[0; 10])
        .into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_made_before_a_time_sort_below_its_first_id() {
        let before = Uuid::now_v7();
        let bound = first_id_at(SystemTime::now() + Duration::from_millis(2));
        let after = {
            std::thread::sleep(Duration::from_millis(5));
            Uuid::now_v7()
        };
        assert!(before < bound, "{before} < {bound}");
        assert!(bound < after, "{bound} < {after}");
    }
}
