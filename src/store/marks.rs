//! Recording the broker's confirms of forwards, so a later copy of a job is
//! dropped as a duplicate instead of forwarded again.

use uuid::Uuid;

use super::{Store, StoreError, sql};
use crate::domain::ids::JobKey;

impl Store {
    /// Records confirmed forwards: whole batches by id (one row each), and
    /// forwards of earlier charges by key.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when it should be retried.
    pub async fn confirm_forwards(
        &self,
        batches: &[Uuid],
        keys: &[JobKey],
    ) -> Result<(), StoreError> {
        if batches.is_empty() && keys.is_empty() {
            return Ok(());
        }
        let (accounts, keys): (Vec<&str>, Vec<&str>) = keys
            .iter()
            .map(|k| (k.account_id.as_str(), k.idempotency_key.as_str()))
            .unzip();
        sqlx::query(sql::CONFIRM_FORWARDS)
            .bind(batches)
            .bind(&accounts)
            .bind(&keys)
            .execute(&self.marks)
            .await?;
        Ok(())
    }
}
