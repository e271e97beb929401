//! The workers: each holds a broker session and consumes one queue.
//!
//! - [`jobs`]: the send queue, through the decide/publish/ack pipeline;
//! - [`outcomes`]: delivery reports, settled in batches;
//! - [`batcher`]: when gathered jobs become a batch (pure);
//! - [`marks`]: confirmed forwards recorded in the background;
//! - [`record`]: a decided job's log line and metrics, as one event;
//! - [`sweep`]: holds that never got a report, committed.
//!
//! This module is the session loop both workers share: connect, consume,
//! and reconnect with backoff whenever the session fails. A worker that
//! loses its broker connection drops its batch (the broker redelivers it).

pub mod batcher;
pub mod jobs;
pub mod marks;
pub mod outcomes;
pub mod record;
pub mod sweep;

use std::sync::Arc;

use lapin::{Channel, Consumer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::amqp::confirm::{Acknowledge, acknowledge};
use crate::amqp::session::{Broker, Received, Session, SessionError};
use crate::clock::Clock;
use crate::config::Settings;
use crate::health::Health;
use crate::metrics;
use crate::retry::{self, Backoff};
use crate::store::{Store, StoreError};
pub use jobs::JobsWorker;
pub use marks::Marks;
pub use outcomes::OutcomesWorker;

/// What every worker of one process shares.
pub struct Shared {
    pub settings: Settings,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub health: Arc<Health>,
    pub marks: Marks,
    pub broker: Broker,
}

impl Shared {
    /// Calls the store until it answers. While the database is unavailable
    /// the caller's batch is held (so the worker stops pulling new work),
    /// never requeued; an error retrying cannot fix is returned.
    ///
    /// # Errors
    /// The first error that is not [`StoreError::is_transient`].
    pub async fn with_database<T, F>(
        &self,
        holding: &'static str,
        attempt: impl FnMut() -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        let result = retry::until_ok(attempt, |err, delay| {
            metrics::db_error(err.kind());
            if !err.is_transient() {
                return false;
            }
            self.health.set_database_ok(false);
            warn!(error = %err, retry_in = ?delay, holding,
                "database unavailable; holding the batch and retrying");
            true
        })
        .await;
        if result.is_ok() {
            self.health.set_database_ok(true);
        }
        result
    }
}

/// One kind of worker: which queue it consumes, on how many channels, and
/// what it does with a session until `stop` (then `Ok`) or a broker failure.
pub(crate) trait Worker {
    fn queue(&self) -> &str;
    fn channels(&self) -> usize;
    fn shared(&self) -> &Shared;
    fn id(&self) -> usize;
    async fn consume(
        &self,
        channels: &[Channel],
        consumers: Vec<Consumer>,
        stop: &CancellationToken,
    ) -> Result<(), SessionError>;
}

/// Runs `worker` until `stop` is cancelled: connect, consume, and reconnect
/// whenever the session fails.
pub(crate) async fn run(worker: impl Worker, stop: CancellationToken) {
    let (shared, id) = (worker.shared(), worker.id());
    let tag = format!("sendgate-{}-{id}", std::process::id());
    let mut backoff = Backoff::new();
    let mut connected_before = false;
    while !stop.is_cancelled() {
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            opened = shared.broker.open_session(worker.queue(), worker.channels(), &tag) => opened,
        };
        let mut session = match opened {
            Ok(session) => session,
            Err(err) => {
                let delay = backoff.next_delay();
                warn!(worker = id, error = %err, retry_in = ?delay,
                    url = %shared.settings.amqp.url.redacted(), "cannot reach the broker");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        if connected_before {
            metrics::amqp_reconnected();
            info!(worker = id, "reconnected to the broker");
        } else {
            info!(worker = id, queue = worker.queue(), "consuming");
        }
        connected_before = true;
        backoff.reset();
        shared.health.broker_connected();
        let consumers = std::mem::take(&mut session.consumers);
        let result = worker.consume(&session.channels, consumers, &stop).await;
        shared.health.broker_disconnected();
        if end_session(shared, id, &session, result).await {
            return;
        }
    }
}

/// Closes a finished session; true when the worker is done (it stopped),
/// false when it should reconnect.
async fn end_session(
    shared: &Shared,
    id: usize,
    session: &Session,
    result: Result<(), SessionError>,
) -> bool {
    match result {
        Ok(()) => {
            // Stopping: unacked deliveries still prefetched go back to the
            // queue when the channel closes.
            session.close("sendgate shutting down").await;
            info!(worker = id, "stopped consuming");
            true
        }
        Err(err) => {
            warn!(worker = id, error = %err, "lost the broker session; reconnecting");
            session.close("sendgate reconnecting").await;
            // A hung or broken connection is replaced for every worker.
            if matches!(err, SessionError::ConfirmTimeout(_))
                || !session.connection.status().connected()
            {
                shared.broker.drop_connection(&session.connection).await;
            }
            false
        }
    }
}

/// A batch the database refused for a reason retrying cannot fix (a bug,
/// not bad input) goes back to the broker after a pause, never in a hot
/// loop. The queue's delivery limit dead-letters a delivery that keeps
/// failing.
///
/// # Errors
/// The channel failed.
pub async fn requeue_after_error(batch: &[Received]) -> Result<(), SessionError> {
    tokio::time::sleep(REQUEUE_PAUSE).await;
    acknowledge(batch.iter(), Acknowledge::Requeue).await
}

/// How long a batch the database refused waits before it is requeued.
const REQUEUE_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// The jobs-in-flight gauge follows a batch's life, however it ends.
pub struct InFlight(usize);

impl InFlight {
    pub fn new(n: usize) -> Self {
        metrics::in_flight_add(n);
        Self(n)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::in_flight_sub(self.0);
    }
}
