//! Records confirmed forwards in the background: each jobs batch hands over
//! what the broker confirmed (its forward batch id, and the keys of forwards
//! of earlier charges), and one task marks everything that piled up in one
//! statement, so a busy gate spends one transaction on many batches.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use uuid::Uuid;

use crate::metrics;
use crate::retry;
use crate::store::{ConfirmedForward, Store};

/// How long confirmed forwards gather before they are marked in one
/// statement. It bounds how long after its confirm a forward still counts as
/// unconfirmed (a copy arriving then is forwarded again, never charged).
const MARK_EVERY: Duration = Duration::from_millis(25);

/// Tries for a mark while the process stops, or for an error retrying
/// cannot fix, before it is given up:
/// a later copy of its jobs is then forwarded once more (same `message_id`
/// and reservation), never charged again. While running, a mark is retried
/// until it lands; confirms that arrive meanwhile join the next statement.
const MARK_TRIES_WHEN_CLOSING: usize = 5;

/// The handle workers report confirmed forwards to.
#[derive(Clone)]
pub struct Marks(mpsc::UnboundedSender<Confirmed>);

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

    fn extend(&mut self, other: Confirmed) {
        self.batches.extend(other.batches);
        self.forwards.extend(other.forwards);
    }
}

impl Marks {
    /// Starts the marking task; it ends, after marking what is left, once
    /// `close` is cancelled.
    pub fn spawn(store: Store, close: CancellationToken) -> (Marks, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Marks(tx), tokio::spawn(mark_forwards(store, rx, close)))
    }

    pub fn confirmed(&self, confirmed: Confirmed) {
        if !confirmed.is_empty() {
            // Only fails once the task is gone, at the very end of shutdown.
            let _ = self.0.send(confirmed);
        }
    }
}

async fn mark_forwards(
    store: Store,
    mut rx: mpsc::UnboundedReceiver<Confirmed>,
    close: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            biased;
            confirmed = rx.recv() => confirmed,
            _ = close.cancelled() => None,
        };
        let Some(mut pending) = first else {
            // Closing: mark what is still queued, then stop.
            let mut rest = Confirmed::default();
            while let Ok(more) = rx.try_recv() {
                rest.extend(more);
            }
            mark(&store, &rest, true).await;
            return;
        };
        // Let more batches join this statement: a quiet gate confirms a
        // batch every few milliseconds, and one statement per batch would
        // cost the database more than the batch's own charges.
        tokio::time::sleep(MARK_EVERY).await;
        while let Ok(more) = rx.try_recv() {
            pending.extend(more);
        }
        mark(&store, &pending, false).await;
    }
}

/// Retries until the mark lands: while running, for as long as the
/// database's trouble lasts; when closing, or for an error retrying cannot
/// fix, [`MARK_TRIES_WHEN_CLOSING`] times.
async fn mark(store: &Store, confirmed: &Confirmed, closing: bool) {
    if confirmed.is_empty() {
        return;
    }
    let mut tries = 0;
    let _ = retry::until_ok(
        || store.confirm_forwards(&confirmed.batches, &confirmed.forwards),
        |err, delay| {
            tries += 1;
            metrics::db_error(err.kind());
            warn!(error = %err, retry_in = ?delay, "cannot mark forwards as confirmed");
            (err.is_transient() && !closing) || tries < MARK_TRIES_WHEN_CLOSING
        },
    )
    .await;
}
