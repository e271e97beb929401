//! RabbitMQ: connecting, the topology of SPEC §4, and the messages that carry
//! each outcome. The consume/publish/ack loop itself is in [`crate::gate`].

use std::str::FromStr;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::AmqpSettings;
use crate::decision::{DeadLetter, Decision, Forward};

pub const HEADER_DECISION: &str = "x-sendgate-decision";
pub const HEADER_PLAN: &str = "x-sendgate-plan";
pub const HEADER_CHARGE: &str = "x-sendgate-charge";
pub const HEADER_RESERVATION_ID: &str = "x-sendgate-reservation-id";
pub const HEADER_CREDITS_REMAINING: &str = "x-sendgate-credits-remaining";
pub const HEADER_DAILY_REMAINING: &str = "x-sendgate-daily-remaining";
pub const HEADER_REASON: &str = "x-sendgate-reason";
pub const HEADER_DETAIL: &str = "x-sendgate-detail";
pub const HEADER_RETRY_AFTER: &str = "x-sendgate-retry-after";
/// Routing key of jobs the broker itself dead-letters from the send queue
/// (its delivery limit, or a reject without requeue).
pub const BROKER_DEAD_LETTER_KEY: &str = "delivery_limit";

/// Opens a connection with the configured heartbeat, named `name` in the
/// management UI.
///
/// # Errors
/// An invalid URL, or the broker is unreachable or refuses the login.
pub async fn connect(settings: &AmqpSettings, name: &str) -> lapin::Result<Connection> {
    let mut uri = AMQPUri::from_str(settings.url.expose()).map_err(|err| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("amqp.url: {err}"))
    })?;
    uri.query.heartbeat = Some(settings.heartbeat_secs);
    uri.query.connection_timeout.get_or_insert(10_000);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect_uri(uri, properties).await
}

/// Declares the exchange and queues sendgate uses, idempotently. Declaring
/// them again after a broker restart or a deleted queue brings them back.
///
/// # Errors
/// The channel failed, or an existing queue has other arguments (the broker
/// then closes the channel with PRECONDITION_FAILED).
pub async fn declare_topology(channel: &Channel, settings: &AmqpSettings) -> lapin::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .exchange_declare(
            settings.dead_letter_exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            settings.dead_letter_queue.as_str().into(),
            durable,
            quorum(),
        )
        .await?;
    channel
        .queue_bind(
            settings.dead_letter_queue.as_str().into(),
            settings.dead_letter_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(settings.delivery_queue.as_str().into(), durable, quorum())
        .await?;
    channel
        .queue_declare(settings.outcomes_queue.as_str().into(), durable, quorum())
        .await?;
    let mut send_arguments = quorum();
    send_arguments
        .insert(
            "x-dead-letter-exchange".into(),
            long_string(&settings.dead_letter_exchange),
        )
        .insert(
            "x-dead-letter-routing-key".into(),
            long_string(BROKER_DEAD_LETTER_KEY),
        )
        .insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(settings.delivery_limit)),
        );
    channel
        .queue_declare(settings.send_queue.as_str().into(), durable, send_arguments)
        .await?;
    declare_deferred(channel, settings).await?;
    Ok(())
}

/// The deferred queue holds pro jobs over their daily limit until the
/// account's next day (per-message TTL), then dead-letters them back into the
/// send queue, at least once.
async fn declare_deferred(channel: &Channel, settings: &AmqpSettings) -> lapin::Result<()> {
    let mut arguments = quorum();
    arguments
        .insert("x-dead-letter-exchange".into(), long_string(""))
        .insert(
            "x-dead-letter-routing-key".into(),
            long_string(&settings.send_queue),
        )
        .insert(
            "x-dead-letter-strategy".into(),
            long_string("at-least-once"),
        )
        .insert("x-overflow".into(), long_string("reject-publish"));
    channel
        .queue_declare(
            settings.deferred_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    Ok(())
}

/// The message that defers a job until `until`: the original body to the
/// deferred queue, expiring (and so returning to the send queue) then.
pub fn deferred(
    settings: &AmqpSettings,
    original: &BasicProperties,
    idempotency_key: Option<&str>,
    until: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
) -> Outgoing {
    let mut headers = FieldTable::default();
    if let Some(original_headers) = original.headers() {
        for (name, value) in original_headers {
            if !name.as_str().starts_with("x-sendgate-") {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    headers
        .insert(HEADER_DECISION.into(), long_string("deferred"))
        .insert(
            HEADER_RETRY_AFTER.into(),
            long_string(&until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        );
    let wait_ms = (until - now).num_milliseconds().max(1);
    let mut properties = original
        .clone()
        .with_delivery_mode(2)
        .with_headers(headers)
        .with_expiration(wait_ms.to_string().into());
    if let Some(key) = idempotency_key {
        properties = properties.with_message_id(key.into());
    }
    Outgoing {
        exchange: ShortString::from(""),
        routing_key: settings.deferred_queue.as_str().into(),
        properties,
    }
}

fn quorum() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), long_string("quorum"));
    arguments
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// Where and how to publish one outcome.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub properties: BasicProperties,
}

/// Builds the message for a forward or dead-letter decision. The body is
/// always the original bytes; the original properties and headers are kept,
/// minus any stale `x-sendgate-*` headers (a replayed dead letter has some).
pub fn outgoing(
    settings: &AmqpSettings,
    original: &BasicProperties,
    idempotency_key: Option<&str>,
    decision: &Decision,
) -> Option<Outgoing> {
    let mut headers: FieldTable = FieldTable::default();
    if let Some(original_headers) = original.headers() {
        for (name, value) in original_headers {
            if !name.as_str().starts_with("x-sendgate-") {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    let (exchange, routing_key) = match decision {
        Decision::Duplicate => return None,
        Decision::Forward(forward) => {
            forward_headers(&mut headers, forward);
            (
                ShortString::from(""),
                settings.delivery_queue.as_str().into(),
            )
        }
        Decision::DeadLetter(dead) => {
            dead_letter_headers(&mut headers, dead);
            (
                settings.dead_letter_exchange.as_str().into(),
                dead.reason.as_str().into(),
            )
        }
    };
    let mut properties = original.clone().with_delivery_mode(2).with_headers(headers);
    if original.content_type().is_none() {
        properties = properties.with_content_type("application/json".into());
    }
    if let Some(key) = idempotency_key {
        properties = properties.with_message_id(key.into());
    }
    Some(Outgoing {
        exchange,
        routing_key,
        properties,
    })
}

fn forward_headers(headers: &mut FieldTable, forward: &Forward) {
    headers
        .insert(HEADER_DECISION.into(), long_string("forwarded"))
        .insert(HEADER_PLAN.into(), long_string(forward.plan.as_str()))
        .insert(HEADER_CHARGE.into(), long_string(forward.charge.as_str()))
        .insert(
            HEADER_RESERVATION_ID.into(),
            long_string(&forward.reservation_id.to_string()),
        );
    if let Some(remaining) = forward.remaining {
        let name = match forward.plan {
            crate::plan::Plan::Free => HEADER_CREDITS_REMAINING,
            _ => HEADER_DAILY_REMAINING,
        };
        headers.insert(name.into(), AMQPValue::LongLongInt(remaining));
    }
}

fn dead_letter_headers(headers: &mut FieldTable, dead: &DeadLetter) {
    headers
        .insert(HEADER_DECISION.into(), long_string("dead_lettered"))
        .insert(HEADER_REASON.into(), long_string(dead.reason.as_str()))
        .insert(HEADER_DETAIL.into(), long_string(&dead.detail));
    if let Some(at) = dead.retry_after {
        headers.insert(
            HEADER_RETRY_AFTER.into(),
            long_string(&at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        );
    }
}

/// A header's value as text, for tests and tools reading outcomes.
pub fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    let value = properties.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::ShortInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        other => Some(format!("{other:?}")),
    }
}
