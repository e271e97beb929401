//! Recording the broker's confirms of forwards, so a later copy of a job is
//! dropped as a duplicate instead of forwarded again.

use uuid::Uuid;

use super::{Store, StoreError, sql};
use crate::domain::ids::JobKey;

/// A forward of a charge an earlier attempt made, confirmed by the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfirmedForward {
    pub key: JobKey,
    pub reservation_id: Uuid,
}

impl Store {
    /// Records confirmed forwards: whole batches by id (one row each), and
    /// forwards of earlier charges by key and reservation.
    ///
    /// # Errors
    /// [`StoreError::is_transient`] when it should be retried.
    pub async fn confirm_forwards(
        &self,
        batches: &[Uuid],
        forwards: &[ConfirmedForward],
    ) -> Result<(), StoreError> {
        if batches.is_empty() && forwards.is_empty() {
            return Ok(());
        }
        let accounts: Vec<&str> = forwards.iter().map(|f| f.key.account_id.as_str()).collect();
        let keys: Vec<&str> = forwards
            .iter()
            .map(|f| f.key.idempotency_key.as_str())
            .collect();
        let ids: Vec<Uuid> = forwards.iter().map(|f| f.reservation_id).collect();
        sqlx::query(sql::CONFIRM_FORWARDS)
            .bind(batches)
            .bind(&accounts)
            .bind(&keys)
            .bind(&ids)
            .execute(&self.marks)
            .await?;
        Ok(())
    }
}
