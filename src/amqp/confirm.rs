//! Publishing with publisher confirms, and acking what was confirmed.
//!
//! Nothing is acked on a guess: a confirm that does not come in time fails
//! the session (the broker then redelivers), and a message the broker nacks
//! or returns unroutable is published again, after re-declaring the
//! topology, until it is accepted.

use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicPublishOptions};
use lapin::{Channel, Confirmation, PublisherConfirm};
use tracing::warn;

use super::Outgoing;
use super::session::{Broker, Received, SessionError};
use crate::config::AmqpSettings;
use crate::metrics;
use crate::retry::Backoff;

/// One message to publish: its place in the batch, its body and where it
/// goes.
#[derive(Clone, Copy)]
pub struct Publication<'a> {
    pub index: usize,
    pub body: &'a [u8],
    pub message: &'a Outgoing,
}

/// Publisher confirms still to come, by batch index.
pub struct Confirms {
    pending: Vec<(usize, PublisherConfirm)>,
    deadline: tokio::time::Instant,
    /// When the last of them was handed to the connection.
    pub sent: Instant,
}

/// Publishes `messages` (mandatory, so an unroutable one comes back) and
/// returns their pending confirms, due within `timeout`.
///
/// # Errors
/// The channel failed, or the messages could not be handed over in time.
pub async fn publish(
    channel: &Channel,
    messages: &[Publication<'_>],
    timeout: Duration,
) -> Result<Confirms, SessionError> {
    // Sending and confirming share one deadline: lapin can hang when the
    // broker goes away mid-publish.
    let deadline = tokio::time::Instant::now() + timeout;
    // All of the batch's messages are queued on the connection before the
    // first is written, so they go out together: awaiting each publish in
    // turn would cost a hand-off to lapin's I/O thread and back, and a
    // write, per message. The publishes are first polled in order, so the
    // messages keep the batch's order.
    let publishes = messages.iter().map(|m| {
        channel.basic_publish(
            m.message.exchange.clone(),
            m.message.routing_key.clone(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            m.body,
            m.message.properties.clone(),
        )
    });
    let handed = tokio::time::timeout_at(deadline, futures_util::future::join_all(publishes))
        .await
        .map_err(|_| SessionError::ConfirmTimeout(timeout))?;
    let mut pending = Vec::with_capacity(messages.len());
    for (m, confirm) in messages.iter().zip(handed) {
        pending.push((m.index, confirm?));
    }
    Ok(Confirms {
        pending,
        deadline,
        sent: Instant::now(),
    })
}

/// Waits for the confirms; returns the batch indices of the messages the
/// broker nacked or returned unroutable.
///
/// # Errors
/// A confirm did not come in time, or the channel failed.
pub async fn await_confirms(
    confirms: Confirms,
    timeout: Duration,
) -> Result<Vec<usize>, SessionError> {
    let mut failed = Vec::new();
    for (i, confirm) in confirms.pending {
        let confirmation = tokio::time::timeout_at(confirms.deadline, confirm)
            .await
            .map_err(|_| SessionError::ConfirmTimeout(timeout))??;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => {}
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                metrics::publish_failed();
                warn!(routing_key = %returned.delivery.routing_key,
                    reply = %returned.reply_text, "message returned unroutable");
                failed.push(i);
            }
            Confirmation::Nack(None) => {
                metrics::publish_failed();
                warn!("broker nacked a message");
                failed.push(i);
            }
        }
    }
    Ok(failed)
}

/// Publishes again, with backoff and after re-declaring the topology, the
/// messages at the batch indices `failed`, until the broker accepts them all.
///
/// Each retry goes out on a channel of its own, opened on `broker`'s
/// connection for it: a channel that published to a queue while its leader
/// died can keep a stale view of where the queue is and have every later
/// publish refused, while a new channel finds the new leader. The batch's
/// deliveries stay unacked on their own channels meanwhile, so no delivery
/// attempt is spent.
///
/// # Errors
/// The connection failed, or a confirm did not come in time.
pub async fn publish_until_accepted(
    broker: &Broker,
    settings: &AmqpSettings,
    messages: &[Publication<'_>],
    mut failed: Vec<usize>,
) -> Result<(), SessionError> {
    let mut backoff = Backoff::new();
    while !failed.is_empty() {
        let delay = backoff.next_delay();
        warn!(failed = failed.len(), retry_in = ?delay,
            "outcomes not accepted by the broker; re-declaring the topology and retrying on a new channel");
        tokio::time::sleep(delay).await;
        let channel = broker.side_channel().await?;
        let attempt = async {
            super::declare_topology(&channel, settings).await?;
            let again: Vec<Publication<'_>> = messages
                .iter()
                .filter(|m| failed.contains(&m.index))
                .copied()
                .collect();
            let confirms = publish(&channel, &again, settings.publish_timeout()).await?;
            await_confirms(confirms, settings.publish_timeout()).await
        };
        let result = attempt.await;
        let _ = channel.close(200, "retried".into()).await;
        failed = result?;
    }
    Ok(())
}

/// Publishes `messages` and waits until the broker has accepted them all.
///
/// # Errors
/// As [`publish_until_accepted`].
pub async fn publish_confirmed(
    channel: &Channel,
    broker: &Broker,
    settings: &AmqpSettings,
    messages: &[Publication<'_>],
) -> Result<(), SessionError> {
    if messages.is_empty() {
        return Ok(());
    }
    let confirms = publish(channel, messages, settings.publish_timeout()).await?;
    let failed = await_confirms(confirms, settings.publish_timeout()).await?;
    publish_until_accepted(broker, settings, messages, failed).await
}

/// Acks a whole batch: one `multiple` ack per channel its deliveries came
/// on, at its last delivery there. Batches complete in the order they were
/// gathered and the fair draw takes each channel's deliveries in order, so
/// every earlier delivery on that channel belongs to an earlier
/// batch, already acked: each ack covers exactly this batch's deliveries.
/// Nothing is ever handed back: a dependency's trouble holds the batch, and
/// what the data causes is dead-lettered alone.
///
/// # Errors
/// The channel failed.
pub async fn ack<'a>(batch: impl Iterator<Item = &'a Received>) -> Result<(), SessionError> {
    let mut last: Vec<Option<&Received>> = Vec::new();
    for received in batch {
        if last.len() <= received.channel {
            last.resize(received.channel + 1, None);
        }
        last[received.channel] = Some(received);
    }
    for received in last.into_iter().flatten() {
        let acked = received
            .delivery
            .acker
            .ack(BasicAckOptions { multiple: true })
            .await?;
        if !acked {
            return Err(SessionError::AckFailed);
        }
    }
    Ok(())
}
