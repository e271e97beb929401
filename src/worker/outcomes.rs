//! The outcomes worker: delivery reports from the outcomes queue, settled a
//! batch at a time. Each batch settles its reservations in one transaction;
//! reports naming no reservation, and malformed ones, are dead-lettered;
//! then the batch is acked, after those dead letters are confirmed.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::BasicCancelOptions;
use lapin::{Channel, Consumer};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use super::{Shared, Worker, held, isolate};
use crate::amqp::confirm::{self, Publication};
use crate::amqp::message::{self, Outgoing};
use crate::amqp::session::{Received, SessionError};
use crate::amqp::trace;
use crate::domain::decision::Decision;
use crate::domain::plan::Reason;
use crate::domain::settle::{InvalidReport, Report, Settled};
use crate::metrics;
use crate::store::StoreError;

/// Consumes the outcomes queue on one channel.
pub struct OutcomesWorker {
    pub shared: Arc<Shared>,
    pub id: usize,
}

/// What became of one report of a batch.
struct Verdict {
    /// The report's result, for the metrics.
    result: &'static str,
    /// Its dead letter, if it was refused.
    outgoing: Option<Outgoing>,
}

impl Worker for OutcomesWorker {
    fn queues(&self) -> Vec<String> {
        vec![self.shared.settings.amqp.outcomes_queue.clone()]
    }

    fn channels(&self) -> usize {
        1
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
        mut consumers: Vec<Consumer>,
        stop: &CancellationToken,
    ) -> Result<(), SessionError> {
        let channel = &channels[0];
        let mut consumer = consumers.pop().ok_or(SessionError::ConsumerEnded)?;
        while let Some(batch) = self.gather(channel, &mut consumer, stop).await? {
            self.settle(channel, batch).await?;
        }
        Ok(())
    }
}

impl OutcomesWorker {
    /// The next batch: the first delivery, then whatever arrives within the
    /// batch wait, up to the batch size. `None` once `stop` is cancelled
    /// (the consumer is cancelled then, so no more deliveries come).
    async fn gather(
        &self,
        channel: &Channel,
        consumer: &mut Consumer,
        stop: &CancellationToken,
    ) -> Result<Option<Vec<Received>>, SessionError> {
        let gate = &self.shared.settings.gate;
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => {
                let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
                return Ok(None);
            }
            next = consumer.next() => next,
        };
        let received = |next: Option<lapin::Result<lapin::message::Delivery>>| {
            Ok::<_, SessionError>(Received::report(next.ok_or(SessionError::ConsumerEnded)??))
        };
        let mut batch = vec![received(first)?];
        let deadline = tokio::time::Instant::now() + gate.batch_wait();
        while batch.len() < gate.batch_size {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Err(_elapsed) => break,
                Ok(next) => batch.push(received(next)?),
            }
        }
        Ok(Some(batch))
    }

    /// Settles one batch of reports, publishes the dead letters of those
    /// refused, and acks the batch.
    async fn settle(&self, channel: &Channel, batch: Vec<Received>) -> Result<(), SessionError> {
        let shared = &*self.shared;
        let max_headers = shared.settings.jobs.max_header_bytes;
        let parsed: Vec<Result<Report, InvalidReport>> = batch
            .iter()
            .map(
                |r| match message::oversized(&r.delivery.properties, max_headers) {
                    Some(detail) => Err(InvalidReport(detail)),
                    None => Report::parse(&r.delivery.data),
                },
            )
            .collect();
        let reports: Vec<Report> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok())
            .cloned()
            .collect();
        let (settled, _) = isolate(reports.len(), |range| async {
            let part = &reports[range];
            let settled = shared
                .with_database("outcomes", || shared.store.settle(part, shared.clock.now()))
                .await?;
            Ok((settled, ()))
        })
        .await
        .map_err(|missing| held(self.id, "outcomes", missing))?;
        let mut settled = settled.into_iter();
        let verdicts = batch
            .iter()
            .zip(parsed)
            .map(|(received, parsed)| self.verdict(received, parsed, &mut settled))
            .collect::<Result<Vec<Verdict>, SessionError>>()?;
        let publications: Vec<Publication<'_>> = verdicts
            .iter()
            .enumerate()
            .filter_map(|(index, v)| {
                Some(Publication {
                    index,
                    body: &batch[index].delivery.data,
                    message: v.outgoing.as_ref()?,
                })
            })
            .collect();
        confirm::publish_confirmed(
            channel,
            &shared.broker,
            &shared.settings.amqp,
            &publications,
        )
        .await?;
        confirm::ack(batch.iter()).await?;
        for verdict in &verdicts {
            metrics::outcome(verdict.result);
        }
        debug!(worker = self.id, reports = batch.len(), "outcomes settled");
        Ok(())
    }

    /// What became of one report: settled, or refused with a dead letter.
    ///
    /// # Errors
    /// [`SessionError::Internal`] when the store gave no answer for a valid
    /// report (a bug): the batch is held.
    fn verdict(
        &self,
        received: &Received,
        parsed: Result<Report, InvalidReport>,
        settled: &mut impl Iterator<Item = Result<Settled, StoreError>>,
    ) -> Result<Verdict, SessionError> {
        let (result, refusal) = match parsed {
            Err(invalid) => (
                "invalid",
                Some(Decision::dead_letter(Reason::InvalidOutcome, invalid.0)),
            ),
            Ok(report) => match settled.next() {
                None => {
                    return Err(held(
                        self.id,
                        "outcomes",
                        "fewer results than valid reports",
                    ));
                }
                Some(Err(err)) => {
                    error!(worker = self.id, error = %err, "the database refused a report; dead-lettering it");
                    (
                        "invalid",
                        Some(Decision::dead_letter(
                            Reason::InvalidOutcome,
                            format!("the database refused this report: {err}"),
                        )),
                    )
                }
                Some(Ok(Settled::Unknown)) => (
                    Settled::Unknown.as_str(),
                    Some(Decision::dead_letter(
                        Reason::UnknownReservation,
                        format!(
                            "no reservation for account `{}` and key `{}`",
                            report.account_id, report.idempotency_key
                        ),
                    )),
                ),
                Some(Ok(other)) => (other.as_str(), None),
            },
        };
        let mut outgoing = refusal.and_then(|decision| {
            let (settings, now) = (&self.shared.settings.amqp, self.shared.clock.now());
            let max_headers = self.shared.settings.jobs.max_header_bytes;
            message::outgoing(
                settings,
                &message::bounded(&received.delivery.properties, max_headers),
                received.message_id(),
                None,
                &decision,
                now,
            )
        });
        if let Some(span) = &received.span {
            span.record("sendgate.result", result);
            if let Some(out) = outgoing.as_mut() {
                out.properties = trace::carry(out.properties.clone(), span);
            }
        }
        Ok(Verdict { result, outgoing })
    }
}
