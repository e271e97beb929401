//! The gate: consume send jobs in batches, decide each batch in one database
//! transaction, publish every outcome with publisher confirms, then ack.
//!
//! Order of a batch, and why it is safe to stop at any point:
//! 1. parse every delivery (bad ones become `invalid_job` dead letters);
//! 2. decide and record the charges in one transaction ([`Store::decide`]);
//!    a crash after this leaves reservations whose forward is unconfirmed,
//!    and the redelivered job is forwarded again without a second charge;
//! 3. publish the outcomes, pipelined, and wait for all their confirms; an
//!    outcome that is nacked, returned unroutable or not confirmed in time is
//!    retried with backoff, after re-declaring the topology;
//! 4. ack the batch (one `multiple` ack). Nothing is acked before its outcome
//!    is confirmed, and a transient failure never requeues a job: the worker
//!    holds its deliveries and retries, so it stops pulling new work;
//! 5. mark the confirmed forwards (in the background, many batches in one
//!    statement), so later copies are dropped as duplicates.
//!
//! Deciding, publishing and acking run as three stages of a pipeline, so a
//! worker's database and broker round trips overlap.
//!
//! A worker that loses its broker connection drops its batch (the broker
//! redelivers it) and reconnects with exponential backoff and jitter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::amqp::{self, Outgoing};
use crate::clock::Clock;
use crate::config::{DecisionLogLevel, OnLimit, Settings};
use crate::decision::Decision;
use crate::health::Health;
use crate::job::Job;
use crate::metrics;
use crate::plan::Reason;
use crate::settle::{Report, Settled};
use crate::store::{Decided as StoreDecided, Store, StoreError};
use uuid::Uuid;

/// What every worker of one process shares.
pub struct Gate {
    pub settings: Settings,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub health: Arc<Health>,
    pub marks: Marks,
    /// A tokio mutex: connecting awaits while it is held, so concurrent
    /// workers wait for one connection instead of opening several.
    pub connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

/// How long confirmed forwards gather before they are marked in one
/// statement. It bounds how long after its confirm a forward still counts as
/// unconfirmed (a copy arriving then is forwarded again, never charged).
const MARK_EVERY: Duration = Duration::from_millis(25);

/// Records confirmed forwards in the background: each worker hands over a
/// confirmed batch (its forward batch id, and the keys of forwards of
/// earlier charges), and one task marks everything that piled up in one
/// statement, so a busy gate spends one transaction on many batches.
#[derive(Clone)]
pub struct Marks(mpsc::UnboundedSender<Confirmed>);

/// Forwards the broker confirmed.
#[derive(Debug, Default)]
struct Confirmed {
    batches: Vec<Uuid>,
    keys: Vec<(String, String)>,
}

impl Confirmed {
    fn is_empty(&self) -> bool {
        self.batches.is_empty() && self.keys.is_empty()
    }

    fn extend(&mut self, other: Confirmed) {
        self.batches.extend(other.batches);
        self.keys.extend(other.keys);
    }
}

impl Marks {
    /// Starts the marking task; it ends, after marking what is left, once
    /// `close` is cancelled.
    pub fn spawn(store: Store, close: CancellationToken) -> (Marks, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Marks(tx), tokio::spawn(mark_forwards(store, rx, close)))
    }

    fn confirmed(&self, confirmed: Confirmed) {
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
        let mut pending = match first {
            Some(confirmed) => confirmed,
            None => {
                // Closing: mark what is still queued, then stop.
                let mut rest = Confirmed::default();
                while let Ok(more) = rx.try_recv() {
                    rest.extend(more);
                }
                mark(&store, &rest).await;
                return;
            }
        };
        // Let more batches join this statement: a quiet gate confirms a
        // batch every few milliseconds, and one statement per batch would
        // cost the database more than the batch's own charges.
        tokio::time::sleep(MARK_EVERY).await;
        while let Ok(more) = rx.try_recv() {
            pending.extend(more);
        }
        mark(&store, &pending).await;
    }
}

/// Best effort with retries: if this never lands, a later copy of a job is
/// forwarded once more (same `message_id` and reservation), never charged.
async fn mark(store: &Store, confirmed: &Confirmed) {
    if confirmed.is_empty() {
        return;
    }
    let keys: Vec<(&str, &str)> = confirmed
        .keys
        .iter()
        .map(|(a, k)| (a.as_str(), k.as_str()))
        .collect();
    let mut backoff = retry_backoff();
    for _ in 0..5 {
        match store.confirm_forwards(&confirmed.batches, &keys).await {
            Ok(()) => return,
            Err(err) => {
                metrics::db_error(err.kind());
                let delay = next_delay(&mut backoff);
                warn!(error = %err, retry_in = ?delay, "cannot mark forwards as confirmed");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// What a worker consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Send jobs from the send queue.
    Jobs,
    /// Delivery outcomes from the outcomes queue.
    Outcomes,
}

/// Why a worker must drop its broker session and start a new one.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the consumer stream ended (consumer cancelled or channel closed)")]
    ConsumerEnded,
    #[error("an ack could not be sent: the channel has failed")]
    AckFailed,
    #[error("a publish was not confirmed within {0:?}")]
    ConfirmTimeout(Duration),
}

/// A delivery, when it arrived, and which of the session's channels it
/// came on.
struct Received {
    delivery: Delivery,
    at: Instant,
    channel: usize,
}

/// A batch on its way from the deciding stage to the publishing stage.
enum Decided {
    Outcomes(Outcomes),
    /// The database refused the batch for a reason retrying cannot fix.
    Requeue {
        batch: Vec<Received>,
        in_flight: InFlight,
    },
}

struct Outcomes {
    batch: Vec<Received>,
    decisions: Vec<Decision>,
    /// (account, key) of each delivery, as far as it could be read.
    keys: Vec<(Option<String>, Option<String>)>,
    outgoing: Vec<Option<Outgoing>>,
    decide_time: Duration,
    /// The forward batch of this batch's new charges, if it made any.
    forward_batch: Option<Uuid>,
    _in_flight: InFlight,
}

/// A batch whose outcomes were published, on its way to the ack stage.
enum Sent {
    Outcomes {
        done: Outcomes,
        confirms: Confirms,
        started: Instant,
    },
    Requeue {
        batch: Vec<Received>,
        in_flight: InFlight,
    },
}

/// Publisher confirms still to come, by outcome index.
struct Confirms {
    pending: Vec<(usize, lapin::PublisherConfirm)>,
    deadline: tokio::time::Instant,
    /// When the last of them was handed to the connection.
    sent: Instant,
}

/// The jobs-in-flight gauge follows a batch's life, however it ends.
struct InFlight(usize);

impl InFlight {
    fn new(n: usize) -> Self {
        metrics::in_flight_add(n);
        Self(n)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::in_flight_sub(self.0);
    }
}

fn retry_backoff() -> ExponentialBackoff {
    backoff::ExponentialBackoffBuilder::new()
        .with_initial_interval(Duration::from_millis(100))
        .with_max_interval(Duration::from_secs(5))
        .with_max_elapsed_time(None)
        .build()
}

fn next_delay(backoff: &mut ExponentialBackoff) -> Duration {
    backoff.next_backoff().unwrap_or(Duration::from_secs(5))
}

impl Gate {
    /// Runs one worker until `stop` is cancelled: connect, consume, and
    /// reconnect whenever the session fails.
    pub async fn run_worker(self: Arc<Self>, worker: usize, role: Role, stop: CancellationToken) {
        let mut backoff = retry_backoff();
        let mut connected_before = false;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let opened = tokio::select! {
                _ = stop.cancelled() => return,
                opened = self.open_session(worker, role) => opened,
            };
            let (connection, channels, mut consumers) = match opened {
                Ok(session) => session,
                Err(err) => {
                    let delay = next_delay(&mut backoff);
                    warn!(worker, error = %err, retry_in = ?delay,
                        url = %self.settings.amqp.url.redacted(), "cannot reach the broker");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            if connected_before {
                metrics::amqp_reconnected();
                info!(worker, "reconnected to the broker");
            } else {
                info!(worker, ?role, "consuming");
            }
            connected_before = true;
            backoff.reset();
            self.health.broker_connected();
            let result = match role {
                Role::Jobs => self.consume(worker, &channels, consumers, &stop).await,
                Role::Outcomes => match consumers.pop() {
                    Some(consumer) => {
                        self.consume_outcomes(worker, &channels[0], consumer, &stop)
                            .await
                    }
                    None => Err(SessionError::ConsumerEnded),
                },
            };
            self.health.broker_disconnected();
            match result {
                Ok(()) => {
                    // Stopping: unacked deliveries still prefetched go back
                    // to the queue when the channel closes.
                    close_channels(&channels, "sendgate shutting down").await;
                    info!(worker, "stopped consuming");
                    return;
                }
                Err(err) => {
                    warn!(worker, error = %err, "lost the broker session; reconnecting");
                    close_channels(&channels, "sendgate reconnecting").await;
                    // A hung or broken connection is replaced for every worker.
                    if matches!(err, SessionError::ConfirmTimeout(_))
                        || !connection.status().connected()
                    {
                        self.drop_connection(&connection).await;
                    }
                }
            }
        }
    }

    /// The process's broker connection, shared by every worker (each on its
    /// own channel): one connection means one I/O thread, not one per worker.
    /// Opens it when there is none or the last one broke.
    async fn connection(&self) -> lapin::Result<Arc<Connection>> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(connection.clone());
        }
        let connection = Arc::new(amqp::connect(&self.settings.amqp, "sendgate").await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Forgets (and closes) `connection` if it is still the shared one.
    async fn drop_connection(&self, connection: &Arc<Connection>) {
        let mut slot = self.connection.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, connection)) {
            *slot = None;
            drop(slot);
            let _ = connection.close(320, "sendgate reconnecting".into()).await;
        }
    }

    /// Closes the shared connection, once every worker has stopped.
    pub async fn close_connection(&self) {
        if let Some(connection) = self.connection.lock().await.take() {
            let _ = connection.close(200, "sendgate shutting down".into()).await;
        }
    }

    /// A session of `worker`: on the shared connection, one channel (with
    /// its consumer) for the outcomes worker, `[gate] consumers` of them for
    /// the jobs worker, all feeding its one batcher.
    async fn open_session(
        &self,
        worker: usize,
        role: Role,
    ) -> lapin::Result<(Arc<Connection>, Vec<Channel>, Vec<lapin::Consumer>)> {
        let settings = &self.settings.amqp;
        let connection = self.connection().await?;
        let (queue, count) = match role {
            Role::Jobs => (&settings.send_queue, self.settings.gate.consumers),
            Role::Outcomes => (&settings.outcomes_queue, 1),
        };
        let mut channels = Vec::with_capacity(count);
        let mut consumers = Vec::with_capacity(count);
        for i in 0..count {
            let tag = format!("sendgate-{}-{worker}-{i}", std::process::id());
            match self.open_channel(&connection, queue, tag, i == 0).await {
                Ok((channel, consumer)) => {
                    channels.push(channel);
                    consumers.push(consumer);
                }
                Err(err) => {
                    // No consumer may be left behind on a half-open session.
                    close_channels(&channels, "sendgate reconnecting").await;
                    if !connection.status().connected() {
                        self.drop_connection(&connection).await;
                    }
                    return Err(err);
                }
            }
        }
        Ok((connection, channels, consumers))
    }

    async fn open_channel(
        &self,
        connection: &Connection,
        queue: &str,
        tag: String,
        declare: bool,
    ) -> lapin::Result<(Channel, lapin::Consumer)> {
        let settings = &self.settings.amqp;
        let channel = connection.create_channel().await?;
        if declare {
            amqp::declare_topology(&channel, settings).await?;
        }
        // basic.qos is per channel: applied on every new session.
        channel
            .basic_qos(settings.prefetch, BasicQosOptions::default())
            .await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((channel, consumer))
    }

    /// Consumes until `stop` (then `Ok`) or a broker failure (then `Err`).
    ///
    /// Three stages run side by side, so the database and the broker work
    /// at the same time: one gathers and decides the next batches, one
    /// publishes batch N+1, and one waits for batch N's confirms and acks it.
    /// Batches pass from stage to stage in the order they were gathered,
    /// which keeps the `multiple` acks of each batch exact.
    ///
    /// Every channel of the session feeds the one batcher (each channel has
    /// its own prefetch window, so more jobs can be on their way through the
    /// pipeline); outcomes are published on the first channel.
    async fn consume(
        &self,
        worker: usize,
        channels: &[Channel],
        consumers: Vec<lapin::Consumer>,
        stop: &CancellationToken,
    ) -> Result<(), SessionError> {
        let channel = &channels[0];
        let tags: Vec<_> = consumers.iter().map(lapin::Consumer::tag).collect();
        // One stream of (channel, delivery); a consumer that ends (cancelled
        // by the broker, channel closed) ends the session.
        let mut deliveries = futures_util::stream::select_all(
            consumers.into_iter().enumerate().map(|(i, consumer)| {
                consumer
                    .map(move |delivery| Some((i, delivery)))
                    .chain(futures_util::stream::once(async { None }))
                    .boxed()
            }),
        );
        let (decided_tx, mut decided_rx) = mpsc::channel::<Decided>(1);
        let (sent_tx, mut sent_rx) = mpsc::channel::<Sent>(4);
        let decide_stage = async move {
            let gate = &self.settings.gate;
            let (batch_size, wait) = (gate.batch_size, gate.batch_wait());
            // Jobs received and not yet in a batch, oldest first.
            let mut waiting: Vec<Received> = Vec::with_capacity(batch_size);
            // Batches being decided, handed on in the order they started.
            let mut deciding = FuturesOrdered::new();
            let mut stopping = false;
            loop {
                // A full batch starts whenever fewer than `concurrent_batches`
                // are being decided; a partial one only when none is, once
                // its oldest job has waited `batch_wait` (at once when
                // stopping). So a second transaction runs only when jobs
                // back up, and no job waits for company longer than it must.
                while !waiting.is_empty() && deciding.len() < gate.concurrent_batches {
                    let full = waiting.len() >= batch_size;
                    let due = deciding.is_empty() && (stopping || waiting[0].at.elapsed() >= wait);
                    if !(full || due) {
                        break;
                    }
                    let batch: Vec<Received> =
                        waiting.drain(..waiting.len().min(batch_size)).collect();
                    deciding.push_back(self.decide_batch(worker, batch));
                }
                if stopping && waiting.is_empty() && deciding.is_empty() {
                    return Ok::<(), SessionError>(());
                }
                let linger = (deciding.is_empty() && !waiting.is_empty())
                    .then(|| tokio::time::Instant::from_std(waiting[0].at + wait));
                tokio::select! {
                    biased;
                    _ = stop.cancelled(), if !stopping => {
                        // No more deliveries come; what was received is
                        // still decided, published and acked.
                        for (channel, tag) in channels.iter().zip(&tags) {
                            let _ = channel
                                .basic_cancel(tag.clone(), BasicCancelOptions::default())
                                .await;
                        }
                        stopping = true;
                    }
                    Some(decided) = deciding.next() => {
                        if decided_tx.send(decided).await.is_err() {
                            return Ok(());
                        }
                    }
                    next = deliveries.next(), if !stopping && waiting.len() < batch_size => {
                        let (channel, delivery) =
                            next.flatten().ok_or(SessionError::ConsumerEnded)?;
                        waiting.push(Received {
                            delivery: delivery?,
                            at: Instant::now(),
                            channel,
                        });
                    }
                    _ = tokio::time::sleep_until(linger.unwrap_or_else(tokio::time::Instant::now)),
                        if linger.is_some() => {}
                }
            }
        };
        let publish_stage = async move {
            while let Some(decided) = decided_rx.recv().await {
                let sent = match decided {
                    Decided::Requeue { batch, in_flight } => Sent::Requeue { batch, in_flight },
                    Decided::Outcomes(done) => {
                        let pending: Vec<usize> = (0..done.outgoing.len())
                            .filter(|i| done.outgoing[*i].is_some())
                            .collect();
                        let started = Instant::now();
                        let confirms = self
                            .send_outcomes(channel, &done.batch, &done.outgoing, &pending)
                            .await?;
                        Sent::Outcomes {
                            done,
                            confirms,
                            started,
                        }
                    }
                };
                if sent_tx.send(sent).await.is_err() {
                    break;
                }
            }
            Ok::<(), SessionError>(())
        };
        let ack_stage = async {
            while let Some(sent) = sent_rx.recv().await {
                self.complete(worker, channel, sent).await?;
            }
            Ok::<(), SessionError>(())
        };
        tokio::try_join!(decide_stage, publish_stage, ack_stage).map(|_| ())
    }

    /// The next batch for the outcomes consumer: the first delivery, then
    /// whatever arrives within the batch wait, up to the batch size. `None`
    /// once `stop` is cancelled (the consumer is cancelled then, so no more
    /// deliveries come).
    async fn gather(
        &self,
        channel: &Channel,
        consumer: &mut lapin::Consumer,
        stop: &CancellationToken,
    ) -> Result<Option<Vec<Received>>, SessionError> {
        let batch_size = self.settings.gate.batch_size;
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => {
                let _ = channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await;
                return Ok(None);
            }
            next = consumer.next() => next,
        };
        let mut batch = vec![Received {
            delivery: first.ok_or(SessionError::ConsumerEnded)??,
            at: Instant::now(),
            channel: 0,
        }];
        let deadline = tokio::time::Instant::now() + self.settings.gate.batch_wait();
        while batch.len() < batch_size {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Err(_elapsed) => break,
                Ok(next) => batch.push(Received {
                    delivery: next.ok_or(SessionError::ConsumerEnded)??,
                    at: Instant::now(),
                    channel: 0,
                }),
            }
        }
        Ok(Some(batch))
    }

    /// Parses a batch and decides it in one transaction.
    async fn decide_batch(&self, worker: usize, batch: Vec<Received>) -> Decided {
        let in_flight = InFlight::new(batch.len());
        metrics::jobs_received(batch.len());
        let max_body = self.settings.jobs.max_body_bytes;

        let mut decisions: Vec<Option<Decision>> = Vec::with_capacity(batch.len());
        // (account, key) of each delivery, as far as it could be read.
        let mut keys: Vec<(Option<String>, Option<String>)> = Vec::with_capacity(batch.len());
        let mut jobs = Vec::new();
        let mut job_slots = Vec::new();
        for (slot, received) in batch.iter().enumerate() {
            let delivery = &received.delivery;
            let message_id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str());
            match Job::parse(&delivery.data, message_id, max_body) {
                Ok(job) => {
                    keys.push((
                        Some(job.account_id.clone()),
                        Some(job.idempotency_key.clone()),
                    ));
                    decisions.push(None);
                    jobs.push(job);
                    job_slots.push(slot);
                }
                Err(invalid) => {
                    keys.push((None, message_id.map(str::to_owned)));
                    decisions.push(Some(Decision::dead_letter(Reason::InvalidJob, invalid.0)));
                }
            }
        }

        let started = Instant::now();
        let StoreDecided {
            decisions: decided,
            batch: forward_batch,
        } = match self.decide(&jobs).await {
            Ok(decided) => decided,
            Err(err) => {
                error!(worker, error = %err, jobs = batch.len(),
                    "cannot record the batch; returning it to the queue");
                return Decided::Requeue { batch, in_flight };
            }
        };
        metrics::batch_decided(jobs.len(), started.elapsed());
        for (slot, decision) in job_slots.iter().zip(decided) {
            decisions[*slot] = Some(decision);
        }
        let decisions: Vec<Decision> = decisions
            .into_iter()
            .map(|d| d.unwrap_or(Decision::Duplicate))
            .collect();
        let now = self.clock.now();
        let outgoing: Vec<Option<Outgoing>> = batch
            .iter()
            .zip(&decisions)
            .zip(&keys)
            .map(
                |((received, decision), key)| match self.deferral(decision) {
                    // Opt-in: a pro job over its daily limit waits for the next day.
                    Some(until) => Some(amqp::deferred(
                        &self.settings.amqp,
                        &received.delivery.properties,
                        key.1.as_deref(),
                        until,
                        now,
                    )),
                    None => amqp::outgoing(
                        &self.settings.amqp,
                        &received.delivery.properties,
                        key.1.as_deref(),
                        decision,
                    ),
                },
            )
            .collect();
        Decided::Outcomes(Outcomes {
            batch,
            decisions,
            keys,
            outgoing,
            decide_time: started.elapsed(),
            forward_batch,
            _in_flight: in_flight,
        })
    }

    /// Waits for a published batch's confirms (publishing again what the
    /// broker refused), marks the confirmed forwards and acks the batch.
    async fn complete(
        &self,
        worker: usize,
        channel: &Channel,
        sent: Sent,
    ) -> Result<(), SessionError> {
        let (done, confirms, started) = match sent {
            Sent::Requeue { batch, in_flight } => {
                let result = self.requeue_after_error(&batch).await;
                drop(in_flight);
                return result;
            }
            Sent::Outcomes {
                done,
                confirms,
                started,
            } => (done, confirms, started),
        };
        let send_time = confirms.sent.saturating_duration_since(started);
        let failed = self.await_outcomes(worker, confirms).await?;
        self.republish_until_accepted(worker, channel, &done.batch, &done.outgoing, failed)
            .await?;
        let publish_time = started.elapsed();

        // The confirmed forwards are marked in the background, off the ack
        // path; if a mark is lost, a later copy is forwarded again (same
        // reservation), never charged again.
        // New charges are confirmed by their batch; forwards of earlier
        // charges by key.
        let confirmed = Confirmed {
            batches: done.forward_batch.into_iter().collect(),
            keys: done
                .decisions
                .iter()
                .zip(&done.keys)
                .filter_map(|(d, (account, key))| match (d, account, key) {
                    (Decision::Forward(f), Some(account), Some(key)) if !f.fresh => {
                        Some((account.clone(), key.clone()))
                    }
                    _ => None,
                })
                .collect(),
        };
        acknowledge(&done.batch, Acknowledge::Ack).await?;
        self.marks.confirmed(confirmed);
        debug!(
            worker,
            jobs = done.batch.len(),
            waited = ?done.batch[0].at.elapsed().saturating_sub(done.decide_time + publish_time),
            decide = ?done.decide_time,
            publish = ?publish_time,
            send = ?send_time,
            "batch done"
        );
        for ((received, decision), (account, key)) in
            done.batch.iter().zip(&done.decisions).zip(&done.keys)
        {
            self.record(
                worker,
                received,
                decision,
                account.as_deref(),
                key.as_deref(),
            );
        }
        Ok(())
    }

    /// When the job is to be deferred rather than dead-lettered: a pro
    /// daily-limit refusal, with `[plans.pro] on_limit = "defer"`.
    fn deferral(&self, decision: &Decision) -> Option<chrono::DateTime<chrono::Utc>> {
        match decision {
            Decision::DeadLetter(dead)
                if dead.reason == Reason::DailyLimitReached
                    && self.settings.plans.pro.on_limit == OnLimit::Defer =>
            {
                dead.retry_after
            }
            _ => None,
        }
    }

    /// Decides with retries: a database outage holds the batch (and so stops
    /// the worker pulling new work) until the database is back.
    async fn decide(&self, jobs: &[Job]) -> Result<StoreDecided, StoreError> {
        let mut backoff = retry_backoff();
        loop {
            match self.store.decide(jobs, self.clock.now()).await {
                Ok(decisions) => {
                    self.health.set_database_ok(true);
                    return Ok(decisions);
                }
                Err(err) if err.is_transient() => {
                    metrics::db_error(err.kind());
                    self.health.set_database_ok(false);
                    let delay = next_delay(&mut backoff);
                    warn!(error = %err, retry_in = ?delay, jobs = jobs.len(),
                        "database unavailable; holding the batch and retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(err) => {
                    metrics::db_error(err.kind());
                    return Err(err);
                }
            }
        }
    }

    /// A permanent database error is a bug, not bad input: give the jobs back
    /// to the broker after a pause (never in a hot loop). The send queue's
    /// delivery limit dead-letters a job that keeps failing.
    async fn requeue_after_error(&self, batch: &[Received]) -> Result<(), SessionError> {
        tokio::time::sleep(Duration::from_secs(1)).await;
        acknowledge(batch, Acknowledge::Requeue).await
    }

    /// Publishes the outcomes at `indices` (mandatory, so an unroutable one
    /// comes back) and returns their pending confirms with a deadline.
    async fn send_outcomes(
        &self,
        channel: &Channel,
        batch: &[Received],
        outgoing: &[Option<Outgoing>],
        indices: &[usize],
    ) -> Result<Confirms, SessionError> {
        let timeout = self.settings.amqp.publish_timeout();
        // Sending and confirming share one deadline: lapin can hang when the
        // broker goes away mid-publish.
        let deadline = tokio::time::Instant::now() + timeout;
        // All of the batch's messages are queued on the connection before
        // the first is written, so they go out together: awaiting each
        // publish in turn would cost a hand-off to lapin's I/O thread and
        // back, and a write, per message. The publishes are first polled in
        // order, so the messages keep the batch's order.
        let (sending, publishes): (Vec<usize>, Vec<_>) = indices
            .iter()
            .filter_map(|&i| {
                let message = outgoing[i].as_ref()?;
                let publish = channel.basic_publish(
                    message.exchange.clone(),
                    message.routing_key.clone(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &batch[i].delivery.data,
                    message.properties.clone(),
                );
                Some((i, publish))
            })
            .unzip();
        let handed = tokio::time::timeout_at(deadline, futures_util::future::join_all(publishes))
            .await
            .map_err(|_| SessionError::ConfirmTimeout(timeout))?;
        let mut pending = Vec::with_capacity(sending.len());
        for (i, confirm) in sending.into_iter().zip(handed) {
            pending.push((i, confirm?));
        }
        Ok(Confirms {
            pending,
            deadline,
            sent: Instant::now(),
        })
    }

    /// Publishes again, with backoff and after re-declaring the topology,
    /// the outcomes the broker refused, until it accepts them all.
    async fn republish_until_accepted(
        &self,
        worker: usize,
        channel: &Channel,
        batch: &[Received],
        outgoing: &[Option<Outgoing>],
        mut failed: Vec<usize>,
    ) -> Result<(), SessionError> {
        let mut backoff = retry_backoff();
        while !failed.is_empty() {
            let delay = next_delay(&mut backoff);
            warn!(worker, failed = failed.len(), retry_in = ?delay,
                "outcomes not accepted by the broker; re-declaring the topology and retrying");
            tokio::time::sleep(delay).await;
            amqp::declare_topology(channel, &self.settings.amqp).await?;
            let confirms = self
                .send_outcomes(channel, batch, outgoing, &failed)
                .await?;
            failed = self.await_outcomes(worker, confirms).await?;
        }
        Ok(())
    }

    /// Consumes delivery outcome reports until `stop`: each batch settles its
    /// reservations in one transaction; reports naming no reservation, and
    /// malformed ones, are dead-lettered; then the batch is acked.
    async fn consume_outcomes(
        &self,
        worker: usize,
        channel: &Channel,
        mut consumer: lapin::Consumer,
        stop: &CancellationToken,
    ) -> Result<(), SessionError> {
        while let Some(batch) = self.gather(channel, &mut consumer, stop).await? {
            let mut reports = Vec::new();
            let mut slots = Vec::new();
            let mut dead: Vec<Option<Decision>> = Vec::with_capacity(batch.len());
            let mut results: Vec<&'static str> = Vec::with_capacity(batch.len());
            for (slot, received) in batch.iter().enumerate() {
                match Report::parse(&received.delivery.data) {
                    Ok(report) => {
                        reports.push(report);
                        slots.push(slot);
                        dead.push(None);
                        results.push("");
                    }
                    Err(invalid) => {
                        dead.push(Some(Decision::dead_letter(
                            Reason::InvalidOutcome,
                            invalid.0,
                        )));
                        results.push("invalid");
                    }
                }
            }
            let settled = {
                let mut backoff = retry_backoff();
                loop {
                    match self.store.settle(&reports, self.clock.now()).await {
                        Ok(settled) => break Ok(settled),
                        Err(err) if err.is_transient() => {
                            metrics::db_error(err.kind());
                            let delay = next_delay(&mut backoff);
                            warn!(worker, error = %err, retry_in = ?delay,
                                "database unavailable; holding the outcomes and retrying");
                            tokio::time::sleep(delay).await;
                        }
                        Err(err) => break Err(err),
                    }
                }
            };
            let settled = match settled {
                Ok(settled) => settled,
                Err(err) => {
                    metrics::db_error(err.kind());
                    error!(worker, error = %err, "cannot settle outcomes; returning them to the queue");
                    self.requeue_after_error(&batch).await?;
                    continue;
                }
            };
            for ((slot, report), result) in slots.iter().zip(&reports).zip(settled) {
                results[*slot] = result.as_str();
                if result == Settled::Unknown {
                    dead[*slot] = Some(Decision::dead_letter(
                        Reason::UnknownReservation,
                        format!(
                            "no reservation for account `{}` and key `{}`",
                            report.account_id, report.idempotency_key
                        ),
                    ));
                }
            }
            let outgoing: Vec<Option<Outgoing>> = batch
                .iter()
                .zip(&dead)
                .map(|(received, decision)| {
                    decision.as_ref().and_then(|d| {
                        let key = received
                            .delivery
                            .properties
                            .message_id()
                            .as_ref()
                            .map(|k| k.as_str());
                        amqp::outgoing(&self.settings.amqp, &received.delivery.properties, key, d)
                    })
                })
                .collect();
            let pending: Vec<usize> = (0..outgoing.len())
                .filter(|i| outgoing[*i].is_some())
                .collect();
            if !pending.is_empty() {
                let confirms = self
                    .send_outcomes(channel, &batch, &outgoing, &pending)
                    .await?;
                let failed = self.await_outcomes(worker, confirms).await?;
                self.republish_until_accepted(worker, channel, &batch, &outgoing, failed)
                    .await?;
            }
            let last = &batch[batch.len() - 1].delivery;
            if !last.acker.ack(BasicAckOptions { multiple: true }).await? {
                return Err(SessionError::AckFailed);
            }
            for result in results {
                metrics::outcome(result);
            }
            debug!(worker, reports = batch.len(), "outcomes settled");
        }
        Ok(())
    }

    /// Waits for the confirms; returns the outcomes the broker nacked or
    /// returned unroutable. A confirm that does not come in time fails the
    /// session: nothing is acked on a guess.
    async fn await_outcomes(
        &self,
        worker: usize,
        confirms: Confirms,
    ) -> Result<Vec<usize>, SessionError> {
        let timeout = self.settings.amqp.publish_timeout();
        let mut failed = Vec::new();
        for (i, confirm) in confirms.pending {
            let confirmation = tokio::time::timeout_at(confirms.deadline, confirm)
                .await
                .map_err(|_| SessionError::ConfirmTimeout(timeout))??;
            match confirmation {
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                    metrics::publish_failed();
                    warn!(worker, routing_key = %returned.delivery.routing_key,
                        reply = %returned.reply_text, "outcome returned unroutable");
                    failed.push(i);
                }
                Confirmation::Nack(None) => {
                    metrics::publish_failed();
                    warn!(worker, "broker nacked an outcome");
                    failed.push(i);
                }
            }
        }
        Ok(failed)
    }

    fn record(
        &self,
        worker: usize,
        received: &Received,
        decision: &Decision,
        account: Option<&str>,
        key: Option<&str>,
    ) {
        let elapsed = received.at.elapsed();
        metrics::job_done(elapsed);
        let (account, key) = (account.unwrap_or(""), key.unwrap_or(""));
        let redelivered = received.delivery.redelivered;
        let (outcome, plan, charge, reason, detail) = match decision {
            Decision::Forward(forward) => {
                metrics::job_forwarded(forward.plan, forward.charge);
                (
                    "forwarded",
                    forward.plan.as_str(),
                    forward.charge.as_str(),
                    "",
                    "",
                )
            }
            Decision::DeadLetter(dead) if self.deferral(decision).is_some() => {
                metrics::job_deferred();
                (
                    "deferred",
                    "",
                    "",
                    dead.reason.as_str(),
                    dead.detail.as_str(),
                )
            }
            Decision::DeadLetter(dead) => {
                metrics::job_dead_lettered(dead.reason);
                (
                    "dead_lettered",
                    "",
                    "",
                    dead.reason.as_str(),
                    dead.detail.as_str(),
                )
            }
            Decision::Duplicate => {
                metrics::job_duplicate();
                ("duplicate", "", "", "", "")
            }
        };
        // One line per decision, at the level `[log] decisions` asks for.
        macro_rules! decided {
            ($level:expr) => {
                tracing::event!($level, worker, account, key, decision = outcome, plan,
                    charge, reason, detail, redelivered, duration = ?elapsed, "job decided")
            };
        }
        match self.settings.log.decisions {
            DecisionLogLevel::Info => decided!(tracing::Level::INFO),
            DecisionLogLevel::Debug => decided!(tracing::Level::DEBUG),
        }
    }
}

enum Acknowledge {
    Ack,
    Requeue,
}

/// Acks (or returns to the queue) a whole batch: one `multiple` ack per
/// channel its jobs came on, at its last delivery there. Batches complete in
/// the order they were gathered, so every earlier delivery on that channel
/// belongs to an earlier batch, already acked: each ack covers exactly this
/// batch's deliveries.
async fn acknowledge(batch: &[Received], how: Acknowledge) -> Result<(), SessionError> {
    let mut last: Vec<Option<&Delivery>> = Vec::new();
    for received in batch {
        if last.len() <= received.channel {
            last.resize(received.channel + 1, None);
        }
        last[received.channel] = Some(&received.delivery);
    }
    for delivery in last.into_iter().flatten() {
        let done = match how {
            Acknowledge::Ack => {
                delivery
                    .acker
                    .ack(BasicAckOptions { multiple: true })
                    .await?
            }
            Acknowledge::Requeue => {
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    })
                    .await?
            }
        };
        if !done {
            return Err(SessionError::AckFailed);
        }
    }
    Ok(())
}

/// Closes a session's channels; unacked deliveries go back to their queue.
async fn close_channels(channels: &[Channel], reason: &str) {
    for channel in channels {
        let _ = channel.close(200, reason.into()).await;
    }
}
