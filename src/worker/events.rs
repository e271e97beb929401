//! The events relay: publishes the outbox's events to the events exchange
//! with publisher confirms, and marks them published once the broker has
//! confirmed every one of a round. A round that fails (broker or database
//! away, an event nacked or unroutable) marks nothing; its events go out
//! again, so an event is published at least once and consumers deduplicate
//! on its id. Every process relays; `SKIP LOCKED` keeps two from taking the
//! same events at once.

use std::sync::Arc;

use lapin::{BasicProperties, Channel};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::amqp::confirm::{self, Publication};
use crate::amqp::{Outgoing, declare_topology};
use crate::metrics;
use crate::retry::Backoff;
use crate::store::{OutboxEvent, StoreError};
use crate::worker::Shared;

/// Events one round publishes at most.
const ROUND: i64 = 500;

/// Relays until `stop`: at once when this process wrote events, else every
/// `[events] relay_interval_ms`; after a failure, with backoff.
pub async fn relay(shared: Arc<Shared>, stop: CancellationToken) {
    let interval = shared.settings.events.relay_interval();
    let rules = shared.store.event_rules().clone();
    let mut channel: Option<Channel> = None;
    let mut backoff = Backoff::new();
    // At once at start: events left by a process that stopped before
    // publishing them go out first.
    let mut wait = std::time::Duration::ZERO;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = rules.written.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
        wait = interval;
        loop {
            match round(&shared, &mut channel).await {
                Ok(published) => {
                    backoff = Backoff::new();
                    if published < ROUND as usize {
                        break;
                    }
                }
                Err(err) => {
                    metrics::events_relay_failed();
                    if err.downcast_ref::<StoreError>().is_some() {
                        shared.store.find_primary();
                    }
                    if let Some(failed) = channel.take() {
                        let _ = failed.close(200, "relay round failed".into()).await;
                    }
                    wait = backoff.next_delay().max(interval);
                    warn!(error = %format!("{err:#}"), retry_in = ?wait,
                        "cannot relay events; they stay in the outbox and go out later");
                    break;
                }
            }
        }
        if let Ok(backlog) = shared.store.events_backlog().await {
            metrics::events_backlog(backlog.pending, backlog.oldest);
        }
    }
    if let Some(channel) = channel {
        let _ = channel.close(200, "sendgate shutting down".into()).await;
    }
}

/// One round: claims up to [`ROUND`] events, publishes them, waits for the
/// confirms and marks them published. Returns how many it published.
async fn round(shared: &Shared, channel: &mut Option<Channel>) -> anyhow::Result<usize> {
    let claimed = shared.store.claim_events(ROUND).await?;
    if claimed.events.is_empty() {
        return Ok(0);
    }
    let settings = &shared.settings.amqp;
    let open = match channel.take().filter(|c| c.status().connected()) {
        Some(open) => open,
        None => {
            let fresh = shared.broker.side_channel().await?;
            declare_topology(&fresh, settings).await?;
            fresh
        }
    };
    let channel = channel.insert(open);
    let messages: Vec<Outgoing> = claimed
        .events
        .iter()
        .map(|event| message(&settings.events_exchange, event))
        .collect();
    let publications: Vec<Publication<'_>> = claimed
        .events
        .iter()
        .zip(&messages)
        .enumerate()
        .map(|(index, (event, message))| Publication {
            index,
            body: &event.body,
            message,
        })
        .collect();
    let confirms = confirm::publish(channel, &publications, settings.publish_timeout()).await?;
    let refused = confirm::await_confirms(confirms, settings.publish_timeout()).await?;
    if !refused.is_empty() {
        anyhow::bail!(
            "the broker refused {} of {} events (nacked, or no queue bound to exchange `{}` takes them)",
            refused.len(),
            claimed.events.len(),
            settings.events_exchange
        );
    }
    let kinds: Vec<String> = claimed.events.iter().map(|e| e.kind.clone()).collect();
    claimed.published().await?;
    for kind in &kinds {
        metrics::event_published(kind);
    }
    debug!(published = kinds.len(), "events relayed");
    Ok(kinds.len())
}

/// The message of an event: persistent JSON, its id as `message_id`, its
/// type as `type` and as the routing key.
fn message(exchange: &str, event: &OutboxEvent) -> Outgoing {
    let timestamp = u64::try_from(event.created_at.timestamp()).unwrap_or(0);
    Outgoing {
        exchange: exchange.into(),
        routing_key: event.kind.as_str().into(),
        properties: BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(event.id.to_string().into())
            .with_type(event.kind.as_str().into())
            .with_timestamp(timestamp)
            .with_app_id("sendgate".into()),
    }
}
