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
//! 4. mark the confirmed forwards, so later copies are dropped as duplicates;
//! 5. ack the batch (one `multiple` ack). Nothing is acked before its outcome
//!    is confirmed, and a transient failure never requeues a job: the worker
//!    holds its deliveries and retries, so it stops pulling new work.
//!
//! A worker that loses its broker connection drops its batch (the broker
//! redelivers it) and reconnects with exponential backoff and jitter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use crate::amqp::{self, Outgoing};
use crate::clock::Clock;
use crate::config::Settings;
use crate::decision::Decision;
use crate::health::Health;
use crate::job::Job;
use crate::metrics;
use crate::plan::Reason;
use crate::store::{Store, StoreError};

/// What every worker of one process shares.
pub struct Gate {
    pub settings: Settings,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub health: Arc<Health>,
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

/// A delivery and when it arrived.
struct Received {
    delivery: Delivery,
    at: Instant,
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
    pub async fn run_worker(self: Arc<Self>, worker: usize, stop: CancellationToken) {
        let mut backoff = retry_backoff();
        let mut connected_before = false;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let opened = tokio::select! {
                _ = stop.cancelled() => return,
                opened = self.open_session(worker) => opened,
            };
            let (connection, channel, consumer) = match opened {
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
                info!(worker, queue = %self.settings.amqp.send_queue, "consuming");
            }
            connected_before = true;
            backoff.reset();
            self.health.broker_connected();
            let result = self.consume(worker, &channel, consumer, &stop).await;
            self.health.broker_disconnected();
            match result {
                Ok(()) => {
                    // Stopping: unacked deliveries still prefetched go back
                    // to the queue when the channel closes.
                    let _ = channel.close(200, "sendgate shutting down".into()).await;
                    let _ = connection.close(200, "sendgate shutting down".into()).await;
                    info!(worker, "stopped consuming");
                    return;
                }
                Err(err) => {
                    warn!(worker, error = %err, "lost the broker session; reconnecting");
                    let _ = connection.close(320, "sendgate reconnecting".into()).await;
                }
            }
        }
    }

    async fn open_session(
        &self,
        worker: usize,
    ) -> lapin::Result<(Connection, Channel, lapin::Consumer)> {
        let settings = &self.settings.amqp;
        let connection = amqp::connect(settings, &format!("sendgate worker {worker}")).await?;
        let channel = connection.create_channel().await?;
        amqp::declare_topology(&channel, settings).await?;
        // basic.qos is per channel: applied on every new session.
        channel
            .basic_qos(settings.prefetch, BasicQosOptions::default())
            .await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                settings.send_queue.as_str().into(),
                format!("sendgate-{}-{worker}", std::process::id()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((connection, channel, consumer))
    }

    /// Consumes until `stop` (then `Ok`) or a broker failure (then `Err`).
    async fn consume(
        &self,
        worker: usize,
        channel: &Channel,
        mut consumer: lapin::Consumer,
        stop: &CancellationToken,
    ) -> Result<(), SessionError> {
        let batch_size = self.settings.gate.batch_size;
        let batch_wait = self.settings.gate.batch_wait();
        loop {
            let first = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    let _ = channel
                        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                        .await;
                    return Ok(());
                }
                next = consumer.next() => next,
            };
            let mut batch = vec![Received {
                delivery: first.ok_or(SessionError::ConsumerEnded)??,
                at: Instant::now(),
            }];
            let deadline = tokio::time::Instant::now() + batch_wait;
            while batch.len() < batch_size {
                match tokio::time::timeout_at(deadline, consumer.next()).await {
                    Err(_elapsed) => break,
                    Ok(next) => batch.push(Received {
                        delivery: next.ok_or(SessionError::ConsumerEnded)??,
                        at: Instant::now(),
                    }),
                }
            }
            self.process(worker, channel, batch).await?;
        }
    }

    /// Takes one batch from receipt to ack.
    async fn process(
        &self,
        worker: usize,
        channel: &Channel,
        batch: Vec<Received>,
    ) -> Result<(), SessionError> {
        let _in_flight = InFlight::new(batch.len());
        metrics::jobs_received(batch.len());
        let max_body = self.settings.jobs.max_body_bytes;

        // 1. Parse.
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

        // 2. Decide and record, in one transaction.
        let decided = match self.decide(&jobs).await {
            Ok(decided) => decided,
            Err(err) => {
                return self.requeue_after_error(worker, &batch, &err).await;
            }
        };
        metrics::batch_decided(jobs.len());
        for (slot, decision) in job_slots.iter().zip(decided) {
            decisions[*slot] = Some(decision);
        }
        let decisions: Vec<Decision> = decisions
            .into_iter()
            .map(|d| d.unwrap_or(Decision::Duplicate))
            .collect();

        // 3. Publish every outcome and wait for the broker's confirms.
        let outgoing: Vec<Option<Outgoing>> = batch
            .iter()
            .zip(&decisions)
            .zip(&keys)
            .map(|((received, decision), key)| {
                amqp::outgoing(
                    &self.settings.amqp,
                    &received.delivery.properties,
                    key.1.as_deref(),
                    decision,
                )
            })
            .collect();
        self.publish_confirmed(worker, channel, &batch, &outgoing)
            .await?;

        // 4. Remember which forwards the broker confirmed.
        let confirmed: Vec<Uuid> = decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Forward(f) => Some(f.reservation_id),
                _ => None,
            })
            .collect();
        self.confirm_forwards(&confirmed).await;

        // 5. Ack the whole batch at once: on this channel every earlier
        // delivery belongs to an earlier, already acked batch.
        let last = &batch[batch.len() - 1].delivery;
        let acked = last.acker.ack(BasicAckOptions { multiple: true }).await?;
        if !acked {
            return Err(SessionError::AckFailed);
        }
        for ((received, decision), (account, key)) in batch.iter().zip(&decisions).zip(&keys) {
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

    /// Decides with retries: a database outage holds the batch (and so stops
    /// the worker pulling new work) until the database is back.
    async fn decide(&self, jobs: &[Job]) -> Result<Vec<Decision>, StoreError> {
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
    async fn requeue_after_error(
        &self,
        worker: usize,
        batch: &[Received],
        err: &StoreError,
    ) -> Result<(), SessionError> {
        error!(worker, error = %err, jobs = batch.len(),
            "cannot record the batch; returning it to the queue");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let last = &batch[batch.len() - 1].delivery;
        let nacked = last
            .acker
            .nack(BasicNackOptions {
                multiple: true,
                requeue: true,
            })
            .await?;
        if nacked {
            Ok(())
        } else {
            Err(SessionError::AckFailed)
        }
    }

    /// Publishes the outcomes and waits for every confirm; outcomes the broker
    /// refused or returned are published again after a backoff.
    async fn publish_confirmed(
        &self,
        worker: usize,
        channel: &Channel,
        batch: &[Received],
        outgoing: &[Option<Outgoing>],
    ) -> Result<(), SessionError> {
        let timeout = self.settings.amqp.publish_timeout();
        let mut pending: Vec<usize> = (0..outgoing.len())
            .filter(|i| outgoing[*i].is_some())
            .collect();
        let mut backoff = retry_backoff();
        while !pending.is_empty() {
            // Sending and confirming share one deadline: lapin can hang when
            // the broker goes away mid-publish.
            let deadline = tokio::time::Instant::now() + timeout;
            let mut confirms = Vec::with_capacity(pending.len());
            for &i in &pending {
                let Some(message) = &outgoing[i] else {
                    continue;
                };
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
                let confirm = tokio::time::timeout_at(deadline, publish)
                    .await
                    .map_err(|_| SessionError::ConfirmTimeout(timeout))??;
                confirms.push((i, confirm));
            }
            let mut failed = Vec::new();
            for (i, confirm) in confirms {
                let confirmation = tokio::time::timeout_at(deadline, confirm)
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
            if failed.is_empty() {
                return Ok(());
            }
            let delay = next_delay(&mut backoff);
            warn!(worker, failed = failed.len(), retry_in = ?delay,
                "outcomes not accepted by the broker; re-declaring the topology and retrying");
            tokio::time::sleep(delay).await;
            amqp::declare_topology(channel, &self.settings.amqp).await?;
            pending = failed;
        }
        Ok(())
    }

    /// Best effort with retries: if this never lands, a redelivered copy is
    /// forwarded once more (same `message_id`), never charged again.
    async fn confirm_forwards(&self, ids: &[Uuid]) {
        let mut backoff = retry_backoff();
        for _ in 0..5 {
            match self.store.confirm_forwards(ids).await {
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
        match decision {
            Decision::Forward(forward) => {
                metrics::job_forwarded(forward.plan, forward.charge);
                debug!(worker, account, key, decision = "forwarded", plan = %forward.plan,
                    charge = forward.charge.as_str(), remaining = forward.remaining,
                    fresh_charge = forward.fresh, redelivered, ?elapsed, "job decided");
            }
            Decision::DeadLetter(dead) => {
                metrics::job_dead_lettered(dead.reason);
                debug!(worker, account, key, decision = "dead_lettered",
                    reason = dead.reason.as_str(), detail = %dead.detail, redelivered,
                    ?elapsed, "job decided");
            }
            Decision::Duplicate => {
                metrics::job_duplicate();
                debug!(
                    worker,
                    account,
                    key,
                    decision = "duplicate",
                    redelivered,
                    ?elapsed,
                    "job decided"
                );
            }
        }
    }
}
