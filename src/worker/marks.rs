//! Confirmed forwards are recorded before their jobs are acked: a copy of a
//! job that arrives later, even after a crash right after the ack, finds its
//! forward confirmed and is dropped as a duplicate.
//!
//! The write is cheap: one statement per batch on a connection of its own
//! that commits without waiting for the disk. A mark lost in a crash of
//! Postgres itself only means a later copy is forwarded again, with the same
//! `message_id` and reservation, never charged again.

use tracing::warn;
use uuid::Uuid;

use super::Shared;
use crate::store::ConfirmedForward;

/// Forwards the broker confirmed.
#[derive(Debug, Default)]
pub struct Confirmed {
    /// Batches whose new charges were all forwarded.
    pub batches: Vec<Uuid>,
    /// Forwards of charges made by earlier attempts.
    pub forwards: Vec<ConfirmedForward>,
}

impl Confirmed {
    fn is_empty(&self) -> bool {
        self.batches.is_empty() && self.forwards.is_empty()
    }
}

/// Records `confirmed`, holding (and so holding the batch's ack) while the
/// database is unavailable.
pub async fn record(shared: &Shared, confirmed: &Confirmed) {
    if confirmed.is_empty() {
        return;
    }
    let marked = shared.with_database("marks", || {
        shared
            .store
            .confirm_forwards(&confirmed.batches, &confirmed.forwards)
    });
    if let Err(err) = marked.await {
        // Retrying cannot fix it: a later copy is forwarded again (same
        // reservation), never charged again.
        warn!(error = %err, "cannot mark forwards as confirmed");
    }
}
