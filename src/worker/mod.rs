//! The workers: each holds a broker session and consumes one queue.
//!
//! - [`jobs`]: the send queue, through the decide/publish/ack pipeline;
//! - [`outcomes`]: delivery reports, settled in batches;
//! - [`batcher`]: when gathered jobs become a batch (pure);
//! - [`fair`]: which jobs make a batch: round-robin over the queues (pure);
//! - [`marks`]: confirmed forwards recorded before the ack;
//! - [`record`]: a decided job's log line and metrics, as one event;
//! - [`sweep`]: the database's upkeep: expired holds committed, the
//!   reservation ring rotated, rows past their retention removed;
//! - [`events`]: the outbox's threshold events relayed to the broker;
//! - [`audit`]: the self-audit of the money's invariants, every interval.
//!
//! This module is the session loop both workers share: connect, consume,
//! and reconnect with backoff whenever the session fails. A worker that
//! loses its broker connection drops its batch (the broker redelivers it).

pub mod audit;
pub mod batcher;
pub mod events;
pub mod fair;
pub mod jobs;
pub mod marks;
pub mod outcomes;
pub mod record;
pub mod sweep;

use std::ops::Range;
use std::sync::Arc;

use lapin::{Channel, Consumer};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::amqp::session::{Broker, Session, SessionError};
use crate::clock::Clock;
use crate::config::Settings;
use crate::health::Health;
use crate::metrics;
use crate::retry::{self, Backoff};
use crate::store::{Store, StoreError};
pub use jobs::JobsWorker;
pub use outcomes::OutcomesWorker;

/// What every worker of one process shares.
pub struct Shared {
    pub settings: Settings,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub health: Arc<Health>,
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
            if err.is_contention() {
                // The database answered: it is up, only busy with the
                // same rows. Readiness stays as it is.
                warn!(error = %err, retry_in = ?delay, holding,
                    "contention on the same rows; retrying the batch");
                return true;
            }
            self.health.set_database_ok(false);
            // After a failover the writable server is another host.
            self.store.find_primary();
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

/// Jobs workers per process (pausing waits for each).
pub const JOBS_WORKERS: usize = 1;

/// One kind of worker: which queue it consumes, on how many channels, and
/// what it does with a session until `stop` (then `Ok`) or a broker failure.
pub(crate) trait Worker {
    /// The queues it consumes; the session has [`Worker::channels`]
    /// channels on each, one consumer per channel.
    fn queues(&self) -> Vec<String>;
    /// Whether `sendgate ctl pause` stops this worker: the jobs worker.
    /// Delivery reports keep being applied while paused, so a hold is never
    /// committed by the sweep while its failure report waits.
    fn pausable(&self) -> bool {
        false
    }
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

/// Waits while a pause is asked for, counted as paused for readiness;
/// false when `stop` came first.
async fn wait_out_pause(
    shared: &Shared,
    id: usize,
    pause: &mut tokio::sync::watch::Receiver<bool>,
    counted_paused: &mut bool,
    stop: &CancellationToken,
) -> bool {
    if !*counted_paused {
        shared.health.worker_paused(true);
        *counted_paused = true;
    }
    info!(worker = id, "paused: taking no jobs until resumed");
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = pause.wait_for(|paused| !paused) => {}
    }
    if stop.is_cancelled() {
        return false;
    }
    info!(worker = id, "resumed");
    true
}

/// Ends a session (`session_stop`) when a pause is asked for.
fn stop_on_pause(
    mut pause: tokio::sync::watch::Receiver<bool>,
    session_stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if pause.wait_for(|paused| *paused).await.is_ok() {
            session_stop.cancel();
        }
    })
}

/// Runs `worker` until `stop` is cancelled: connect, consume, and reconnect
/// whenever the session fails.
pub(crate) async fn run(worker: impl Worker, stop: CancellationToken) {
    let (shared, id) = (worker.shared(), worker.id());
    let tag = format!("sendgate-{}-{id}", std::process::id());
    let mut backoff = Backoff::new();
    let mut connected_before = false;
    let mut pause = worker.pausable().then(|| shared.health.pause_requests());
    let queues = worker.queues();
    // Whether readiness counts this worker as paused. A paused worker is
    // ready (it is paused on purpose); it stays counted so from before its
    // session closes until its next session is open, so a pause or a
    // resume never shows as a lost broker on /readyz.
    let mut counted_paused = false;
    while !stop.is_cancelled() {
        if let Some(pause) = &mut pause
            && *pause.borrow_and_update()
            && !wait_out_pause(shared, id, pause, &mut counted_paused, &stop).await
        {
            return;
        }
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            opened = shared.broker.open_session(&queues, worker.channels(), &tag) => opened,
        };
        if opened.is_ok() {
            shared.health.broker_connected();
        }
        if counted_paused {
            shared.health.worker_paused(false);
            counted_paused = false;
        }
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
            info!(worker = id, queues = queues.len(), first = %queues[0], "consuming");
        }
        connected_before = true;
        backoff.reset();
        let consumers = std::mem::take(&mut session.consumers);
        // A pause ends the session the way a stop does: the batches in hand
        // are finished, and what is still prefetched goes back to the queue.
        let session_stop = stop.child_token();
        let pause_watch = pause
            .clone()
            .map(|pause| stop_on_pause(pause, session_stop.clone()));
        let result = worker
            .consume(&session.channels, consumers, &session_stop)
            .await;
        if let Some(watch) = pause_watch {
            watch.abort();
        }
        let paused = result.is_ok() && !stop.is_cancelled();
        if paused {
            shared.health.worker_paused(true);
            counted_paused = true;
        }
        shared.health.broker_disconnected();
        if paused {
            session.close("sendgate paused").await;
            continue;
        }
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

/// Asks the store about `len` items, in order, through `call` (which is
/// given a range of them, and holds the batch while the database is
/// unavailable). When the store refuses a range for a reason retrying
/// cannot fix, the range is split in two and each half asked again, so the
/// items at fault are found and come back as their own `Err`, and every
/// other item gets its answer. Each successful call's `X` is returned too.
///
/// # Errors
/// [`AnswerMissing`] when the store answered a range with another number
/// of results than it was asked for: a bug of ours, never guessed around.
pub async fn isolate<R, X, F, Fut>(
    len: usize,
    mut call: F,
) -> Result<(Vec<Result<R, StoreError>>, Vec<X>), AnswerMissing>
where
    F: FnMut(Range<usize>) -> Fut,
    Fut: Future<Output = Result<(Vec<R>, X), StoreError>>,
{
    let mut answers = Vec::with_capacity(len);
    let mut extras = Vec::new();
    // Ranges still to ask, the leftmost on top: items are answered in
    // order, so each answer is pushed after the one before it.
    let mut ranges = Vec::new();
    if len > 0 {
        ranges.push(0..len);
    }
    while let Some(range) = ranges.pop() {
        match call(range.clone()).await {
            Ok((results, extra)) => {
                if results.len() != range.len() {
                    return Err(AnswerMissing {
                        asked: range.len(),
                        answered: results.len(),
                    });
                }
                extras.push(extra);
                answers.extend(results.into_iter().map(Ok));
            }
            Err(err) if range.len() == 1 => answers.push(Err(err)),
            Err(err) => {
                warn!(error = %err, items = range.len(), "the database refused a batch; splitting it to find the items at fault");
                let middle = range.start + range.len() / 2;
                ranges.push(middle..range.end);
                ranges.push(range.start..middle);
            }
        }
    }
    Ok((answers, extras))
}

/// The store answered a batch with another number of results than it was
/// asked for. The batch is held (never acked, never given a made-up
/// answer): its session ends and the broker delivers it again.
#[derive(Debug, thiserror::Error)]
#[error("the store answered {answered} of {asked} items: a bug, the batch is held")]
pub struct AnswerMissing {
    pub asked: usize,
    pub answered: usize,
}

/// Logs and counts a bug of ours found while handling a batch of `stage`
/// (`jobs`, `outcomes`); the error that ends the worker's session, so the
/// batch is held (never acked) and the broker delivers it again.
pub fn held(worker: usize, stage: &'static str, bug: impl std::fmt::Display) -> SessionError {
    error!(worker, stage, error = %bug, "internal error; holding the batch for redelivery");
    metrics::internal_error(stage);
    SessionError::Internal(bug.to_string())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn contention_is_retried_without_calling_the_database_down() {
        let settings = Settings::load_from(None, []).expect("defaults");
        let store = Store::for_settings(&settings).expect("a lazy pool");
        let health = Arc::new(Health::new(1));
        health.set_database_ok(true);
        let shared = Shared {
            broker: Broker::new(settings.amqp.clone()),
            settings,
            store,
            clock: Arc::new(crate::clock::SystemClock),
            health: health.clone(),
        };
        let mut calls = 0;
        let answer = shared
            .with_database("test", || {
                calls += 1;
                let first = calls == 1;
                let ok_then = health.database_ok();
                async move {
                    if first {
                        Err(StoreError::Contention)
                    } else {
                        Ok(ok_then)
                    }
                }
            })
            .await;
        assert!(
            answer.expect("retried"),
            "the database stayed ready while the batch was retried"
        );
        assert_eq!(calls, 2);
    }

    /// A store that refuses any range holding an odd number.
    async fn refuse_odd(
        items: &[u32],
        range: Range<usize>,
    ) -> Result<(Vec<u32>, usize), StoreError> {
        let part = &items[range.clone()];
        if part.iter().any(|n| n % 2 == 1) {
            return Err(StoreError::Corrupt(format!("odd in {range:?}")));
        }
        Ok((part.iter().map(|n| n * 10).collect(), part.len()))
    }

    #[tokio::test]
    async fn only_the_items_at_fault_are_refused_and_the_rest_answered_in_order() {
        let items = [2, 4, 7, 6, 8, 9, 10];
        let (answers, extras) = isolate(items.len(), |r| refuse_odd(&items, r))
            .await
            .expect("every range answered in full");
        let shown: Vec<Option<u32>> = answers.iter().map(|a| a.as_ref().ok().copied()).collect();
        assert_eq!(
            shown,
            vec![
                Some(20),
                Some(40),
                None,
                Some(60),
                Some(80),
                None,
                Some(100)
            ]
        );
        assert_eq!(
            extras.iter().sum::<usize>(),
            5,
            "every good item answered once"
        );
        let (answers, extras) = isolate(0, |r| refuse_odd(&items, r))
            .await
            .expect("nothing to answer");
        assert!(answers.is_empty() && extras.is_empty());
    }

    #[tokio::test]
    async fn a_store_that_answers_too_few_items_is_an_error_not_a_guess() {
        let short = |range: Range<usize>| async move { Ok((vec![0; range.len() - 1], ())) };
        let missing = isolate::<u32, (), _, _>(3, short)
            .await
            .expect_err("two answers for three items");
        assert_eq!((missing.asked, missing.answered), (3, 2));
    }
}
