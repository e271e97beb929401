//! The jobs worker: consume send jobs in batches, decide each batch in one
//! database transaction, publish every outcome with publisher confirms, then
//! ack.
//!
//! Order of a batch, and why it is safe to stop at any point:
//! 1. parse every delivery (bad ones become `invalid_job` dead letters);
//! 2. decide and record the charges in one transaction ([`Store::decide`]);
//!    a crash after this leaves reservations whose forward is unconfirmed,
//!    and the redelivered job is forwarded again without a second charge;
//! 3. publish the outcomes, pipelined, and wait for all their confirms; an
//!    outcome that is nacked, returned unroutable or not confirmed in time is
//!    retried with backoff, after re-declaring the topology;
//! 4. mark the confirmed forwards (one statement), so later copies are
//!    dropped as duplicates, even after a crash right after step 5;
//! 5. ack the batch (one `multiple` ack per channel). Nothing is acked before
//!    its outcome is confirmed, and a transient failure never requeues a
//!    job: the worker holds its deliveries and retries, so it stops pulling
//!    new work.
//!
//! Deciding, publishing and acking run as three stages of a pipeline, so the
//! database and the broker work at the same time. Batches pass from stage to
//! stage in the order they were gathered, which keeps the `multiple` acks of
//! each batch exact.
//!
//! [`Store::decide`]: crate::store::Store::decide

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::{BoxStream, FuturesOrdered};
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use lapin::{Channel, Consumer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, warn};
use uuid::Uuid;

use super::batcher::{Batcher, Sizes};
use super::marks::{self, Confirmed};
use super::record::JobDecided;
use super::{InFlight, Shared, Worker, held, isolate};
use crate::amqp::confirm::{self, Confirms, Publication};
use crate::amqp::message::{self, Outgoing};
use crate::amqp::session::{Received, SessionError};
use crate::amqp::trace;
use crate::domain::decision::{DeadLetter, Decision};
use crate::domain::ids::JobKey;
use crate::domain::job::{InvalidJob, Job};
use crate::domain::plan::Reason;
use crate::metrics;
use crate::store::{ConfirmedForward, Refusal, StoreError};

/// Consumes the send queue on `[gate] consumers` channels, all feeding one
/// batcher.
pub struct JobsWorker {
    pub shared: Arc<Shared>,
    pub id: usize,
}

/// One delivery of a batch and what became of it.
struct Slot {
    received: Received,
    /// What the job is charged under, when it parsed.
    key: Option<JobKey>,
    decision: Decision,
    /// The message carrying the decision; none for a duplicate.
    outgoing: Option<Outgoing>,
    /// A deferred job taking its next step of the deferral ladder: not
    /// decided (it was counted when it was deferred).
    step: bool,
}

/// What a delivery is, before deciding.
enum Incoming {
    Job(Job),
    Invalid(InvalidJob),
    /// In the deferral ladder before its day starts.
    /// In the deferral ladder before its day starts: its key (the account
    /// routes its next step back to its partition), and when.
    Deferred(JobKey, DateTime<Utc>),
}

/// A decided batch, on its way to being published and acked.
struct DecidedBatch {
    slots: Vec<Slot>,
    decide_time: Duration,
    /// The forward batches of this batch's new charges (more than one when
    /// it had to be split to find a job the database refused).
    forward_batches: Vec<Uuid>,
    _in_flight: InFlight,
}

/// A batch whose outcomes were published, on its way to the ack stage.
struct Sent {
    done: DecidedBatch,
    confirms: Confirms,
    started: Instant,
}

impl DecidedBatch {
    fn publications(&self) -> Vec<Publication<'_>> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| {
                Some(Publication {
                    index,
                    body: &slot.received.delivery.data,
                    message: slot.outgoing.as_ref()?,
                })
            })
            .collect()
    }

    /// The forwards to mark once confirmed: new charges by their batch,
    /// forwards of earlier charges by key.
    fn confirmed(&self) -> Confirmed {
        let forwards = self
            .slots
            .iter()
            .filter_map(|slot| match (&slot.decision, &slot.key) {
                (Decision::Forward(f), Some(key)) if !f.fresh => Some(ConfirmedForward {
                    key: key.clone(),
                    reservation_id: f.reservation_id,
                }),
                _ => None,
            });
        Confirmed {
            batches: self.forward_batches.clone(),
            forwards: forwards.collect(),
        }
    }
}

impl Worker for JobsWorker {
    fn queues(&self) -> Vec<String> {
        self.shared.settings.amqp.job_queues()
    }

    fn pausable(&self) -> bool {
        true
    }

    fn channels(&self) -> usize {
        self.shared.settings.gate.consumers
    }

    fn shared(&self) -> &Shared {
        &self.shared
    }

    fn id(&self) -> usize {
        self.id
    }

    async fn consume(
        &self,
        channels: &[Channel],
        consumers: Vec<Consumer>,
        stop: &CancellationToken,
    ) -> Result<(), SessionError> {
        let channel = &channels[0];
        let (decided_tx, decided_rx) = mpsc::channel::<DecidedBatch>(1);
        let (sent_tx, sent_rx) = mpsc::channel::<Sent>(4);
        tokio::try_join!(
            self.decide_stage(channels, consumers, decided_tx, stop),
            self.publish_stage(channel, decided_rx, sent_tx),
            self.ack_stage(sent_rx),
        )
        .map(|_| ())
    }
}

/// What a delivery is, before deciding: properties over their bound or a
/// body that does not parse are invalid; a job in the deferral ladder
/// before its day (as of `arrived`) only takes its next step.
fn classify(
    received: &Received,
    arrived: DateTime<Utc>,
    max_body: usize,
    max_headers: usize,
) -> Incoming {
    let properties = &received.delivery.properties;
    if let Some(detail) = message::oversized(properties, max_headers) {
        return Incoming::Invalid(InvalidJob(detail));
    }
    let until = message::deferred_until(properties).filter(|u| *u > arrived);
    match Job::parse(&received.delivery.data, received.message_id(), max_body) {
        Ok(job) => match until {
            Some(until) => Incoming::Deferred(job.into_key(), until),
            None => Incoming::Job(job),
        },
        Err(invalid) => Incoming::Invalid(invalid),
    }
}

/// One stream of (channel index, delivery) from every consumer; a consumer
/// that ends (cancelled by the broker, channel closed) ends the stream with
/// `None`, which ends the session.
fn merge(consumers: Vec<Consumer>) -> BoxStream<'static, Option<(usize, lapin::Result<Delivery>)>> {
    futures_util::stream::select_all(consumers.into_iter().enumerate().map(|(i, consumer)| {
        consumer
            .map(move |delivery| Some((i, delivery)))
            .chain(futures_util::stream::once(async { None }))
            .boxed()
    }))
    .boxed()
}

impl JobsWorker {
    /// Gathers deliveries into batches and decides them, up to
    /// `[gate] concurrent_batches` at once. On `stop`, consuming is
    /// cancelled and what was received is still decided, published and
    /// acked.
    async fn decide_stage(
        &self,
        channels: &[Channel],
        consumers: Vec<Consumer>,
        out: mpsc::Sender<DecidedBatch>,
        stop: &CancellationToken,
    ) -> Result<(), SessionError> {
        let tags: Vec<_> = consumers.iter().map(Consumer::tag).collect();
        let mut deliveries = merge(consumers);
        let gate = &self.shared.settings.gate;
        let mut batcher = Batcher::new(Sizes {
            batch_size: gate.batch_size,
            wait: gate.batch_wait(),
            concurrent: gate.concurrent_batches,
            sources: channels.len(),
            capacity: channels.len() * usize::from(self.shared.settings.amqp.prefetch),
        });
        let mut deciding = FuturesOrdered::new();
        let mut stopping = false;
        loop {
            while let Some(batch) = batcher.next_batch(deciding.len(), stopping, Instant::now()) {
                deciding.push_back(self.decide_batch(batch));
            }
            if stopping && batcher.is_empty() && deciding.is_empty() {
                return Ok(());
            }
            let due = batcher
                .due_at(deciding.len())
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                _ = stop.cancelled(), if !stopping => {
                    for (channel, tag) in channels.iter().zip(&tags) {
                        let _ = channel.basic_cancel(tag.clone(), BasicCancelOptions::default()).await;
                    }
                    stopping = true;
                }
                Some(decided) = deciding.next() => {
                    if out.send(decided?).await.is_err() {
                        return Ok(());
                    }
                }
                next = deliveries.next(), if !stopping && batcher.has_room() => {
                    let (channel, delivery) = next.flatten().ok_or(SessionError::ConsumerEnded)?;
                    batcher.push(Received::job(delivery?, channel));
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {}
            }
        }
    }

    /// Publishes each decided batch's outcomes and hands their confirms on.
    async fn publish_stage(
        &self,
        channel: &Channel,
        mut decided: mpsc::Receiver<DecidedBatch>,
        out: mpsc::Sender<Sent>,
    ) -> Result<(), SessionError> {
        let timeout = self.shared.settings.amqp.publish_timeout();
        while let Some(done) = decided.recv().await {
            let started = Instant::now();
            let confirms = confirm::publish(channel, &done.publications(), timeout).await?;
            let sent = Sent {
                done,
                confirms,
                started,
            };
            if out.send(sent).await.is_err() {
                break;
            }
        }
        Ok(())
    }

    async fn ack_stage(&self, mut sent: mpsc::Receiver<Sent>) -> Result<(), SessionError> {
        while let Some(next) = sent.recv().await {
            self.complete(next).await?;
        }
        Ok(())
    }

    /// How many of `channels` (the channels deliveries came on) came from
    /// each job queue, in the order of `AmqpSettings::job_queues`.
    fn per_queue(&self, channels: impl Iterator<Item = usize>) -> Vec<u64> {
        let settings = &self.shared.settings;
        let per_queue = settings.gate.consumers;
        let mut counts = vec![0u64; usize::from(settings.amqp.partitions) + 1];
        for channel in channels {
            counts[channel / per_queue] += 1;
        }
        counts
    }

    /// Parses a batch and decides it in one transaction (more, only when the
    /// database refuses a job and the batch is split to find it).
    ///
    /// # Errors
    /// [`SessionError::Internal`] when the store's answers do not match the
    /// batch (a bug): the batch is held, never acked with a guess.
    async fn decide_batch(&self, batch: Vec<Received>) -> Result<DecidedBatch, SessionError> {
        let in_flight = InFlight::new(batch.len());
        metrics::jobs_received(batch.len());
        metrics::partitions_drawn(&self.per_queue(batch.iter().map(|r| r.channel)));
        let shared = &*self.shared;
        let limits = &shared.settings.jobs;
        let arrived = shared.clock.now();
        let parsed: Vec<Incoming> = batch
            .iter()
            .map(|r| classify(r, arrived, limits.max_body_bytes, limits.max_header_bytes))
            .collect();
        let jobs: Vec<Job> = parsed
            .iter()
            .filter_map(|p| match p {
                Incoming::Job(job) => Some(job.clone()),
                _ => None,
            })
            .collect();
        let started = Instant::now();
        let traced = trace::batch_span(batch.iter().filter_map(|r| r.span.as_ref()), jobs.len());
        let (decisions, forward_batches) = self
            .decide_jobs(&jobs)
            .instrument(traced.unwrap_or_else(tracing::Span::none))
            .await?;
        metrics::batch_decided(jobs.len(), started.elapsed());
        let now = shared.clock.now();
        // The store records the refusals it decides; the jobs the database
        // refused are recorded here, on their own.
        let mut refused_by_database = Vec::new();
        let mut decisions = decisions.into_iter().map(|decided| match decided {
            Ok(decision) => (decision, false),
            Err(err) => (self.refused_by_database(&err), true),
        });
        let mut slots = Vec::with_capacity(batch.len());
        for (received, parsed) in batch.into_iter().zip(parsed) {
            let step = matches!(parsed, Incoming::Deferred(..));
            let (key, decision) = match parsed {
                Incoming::Job(job) => {
                    // `isolate` answered every valid job.
                    let Some((decision, by_database)) = decisions.next() else {
                        return Err(self.held("jobs", "fewer decisions than valid jobs"));
                    };
                    if let (true, Decision::DeadLetter(refused)) = (by_database, &decision) {
                        refused_by_database.push(Refusal {
                            key: job.key(),
                            campaign_id: job.campaign_id.clone(),
                            reason: refused.reason.as_str(),
                            detail: refused.detail.clone(),
                        });
                    }
                    (Some(job.into_key()), decision)
                }
                Incoming::Invalid(invalid) => {
                    (None, Decision::dead_letter(Reason::InvalidJob, invalid.0))
                }
                // Not gated again before its day: the next step.
                Incoming::Deferred(key, until) => (
                    Some(key),
                    Decision::Defer(DeadLetter {
                        reason: Reason::DailyLimitReached,
                        detail: format!("deferred until {until}"),
                        retry_after: Some(until),
                    }),
                ),
            };
            slots.push(self.slot(received, key, decision, step, now));
        }
        self.record_refusals(&refused_by_database).await;
        Ok(DecidedBatch {
            slots,
            decide_time: started.elapsed(),
            forward_batches: forward_batches.into_iter().flatten().collect(),
            _in_flight: in_flight,
        })
    }

    /// Decides the valid jobs of a batch in one transaction (more, only
    /// when the database refuses a job and the batch is split to find it):
    /// a decision or the database's refusal for each, in order, and the
    /// forward batches of the new charges.
    async fn decide_jobs(
        &self,
        jobs: &[Job],
    ) -> Result<(Vec<Result<Decision, StoreError>>, Vec<Option<Uuid>>), SessionError> {
        let shared = &*self.shared;
        isolate(jobs.len(), |range| async {
            let part = &jobs[range];
            let recorded = shared
                .with_database("jobs", || shared.store.decide(part, shared.clock.now()))
                .await?;
            Ok((recorded.decisions, recorded.batch))
        })
        .await
        .map_err(|missing| self.held("jobs", missing))
    }

    /// The dead letter for a job the database refused (a value it cannot
    /// store): logged, and recorded by the caller on its own.
    fn refused_by_database(&self, err: &impl std::fmt::Display) -> Decision {
        error!(worker = self.id, error = %err, "the database refused a job; dead-lettering it");
        Decision::dead_letter(
            Reason::InvalidJob,
            format!("the database refused this job: {err}"),
        )
    }

    /// A decided delivery with the message that carries its decision.
    fn slot(
        &self,
        received: Received,
        key: Option<JobKey>,
        decision: Decision,
        step: bool,
        now: DateTime<Utc>,
    ) -> Slot {
        let message_id = key
            .as_ref()
            .map(|k| k.idempotency_key.as_str())
            .or(received.message_id());
        let max_headers = self.shared.settings.jobs.max_header_bytes;
        let account = key.as_ref().map(|k| k.account_id.as_str());
        let mut outgoing = message::outgoing(
            &self.shared.settings.amqp,
            &message::bounded(&received.delivery.properties, max_headers),
            message_id,
            account,
            &decision,
            now,
        );
        if let Some(span) = &received.span {
            trace::decided(span, account, message_id, &decision);
            if let Some(out) = outgoing.as_mut() {
                out.properties = trace::carry(out.properties.clone(), span);
            }
        }
        Slot {
            received,
            key,
            decision,
            outgoing,
            step,
        }
    }

    /// Logs and counts a bug found in handling a batch; the error that
    /// ends the session and holds the batch.
    fn held(&self, stage: &'static str, bug: impl std::fmt::Display) -> SessionError {
        held(self.id, stage, bug)
    }

    /// Records the refusals of jobs the database refused (the store
    /// records those it decides itself), before the batch is published and
    /// acked (a crash in between refuses and records them again). Holds the
    /// batch while the database is unavailable; any other failure only
    /// costs the status its latest refusal.
    async fn record_refusals(&self, refusals: &[Refusal]) {
        if refusals.is_empty() {
            return;
        }
        let shared = &self.shared;
        let now = shared.clock.now();
        let recorded =
            shared.with_database("refusals", || shared.store.record_refusals(refusals, now));
        if let Err(err) = recorded.await {
            warn!(worker = self.id, error = %err, "cannot record refusals for job status");
        }
    }

    /// Waits for a published batch's confirms (publishing again what the
    /// broker refused), marks the confirmed forwards and acks the batch.
    async fn complete(&self, sent: Sent) -> Result<(), SessionError> {
        let Sent {
            done,
            confirms,
            started,
        } = sent;
        let settings = &self.shared.settings.amqp;
        let send_time = confirms.sent.saturating_duration_since(started);
        let failed = confirm::await_confirms(confirms, settings.publish_timeout()).await?;
        confirm::publish_until_accepted(
            &self.shared.broker,
            settings,
            &done.publications(),
            failed,
        )
        .await?;
        let publish_time = started.elapsed();
        // Marked before the ack, so no later copy is forwarded again.
        marks::record(&self.shared, &done.confirmed()).await;
        confirm::ack(done.slots.iter().map(|s| &s.received)).await?;
        let forwarded = done
            .slots
            .iter()
            .filter(|slot| matches!(slot.decision, Decision::Forward(_)))
            .map(|slot| slot.received.channel);
        metrics::partitions_forwarded(&self.per_queue(forwarded));
        let waited = done.slots[0]
            .received
            .at
            .elapsed()
            .saturating_sub(done.decide_time + publish_time);
        debug!(worker = self.id, jobs = done.slots.len(), ?waited, decide = ?done.decide_time,
            publish = ?publish_time, send = ?send_time, "batch done");
        let level = self.shared.settings.log.decisions;
        for slot in done.slots.iter().filter(|slot| !slot.step) {
            JobDecided {
                worker: self.id,
                decision: &slot.decision,
                account: slot.key.as_ref().map(|k| k.account_id.as_str()),
                key: slot
                    .key
                    .as_ref()
                    .map(|k| k.idempotency_key.as_str())
                    .or(slot.received.message_id()),
                redelivered: slot.received.delivery.redelivered,
                elapsed: slot.received.at.elapsed(),
            }
            .emit(level);
        }
        Ok(())
    }
}
