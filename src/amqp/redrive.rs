//! `sendgate dead-letters list|redrive`: look at the dead-letter queue and
//! move chosen jobs back to the send queue (after an upgrade, say), where
//! they are judged afresh.
//!
//! Only refused jobs are ever moved: refused delivery reports (their own
//! reasons, `x-sendgate-source: report`, or dead-lettered by the broker from
//! the outcomes queue) are listed but never sent to the send queue, where
//! they would parse as jobs.
//!
//! Messages are taken with `basic.get` and left unacknowledged. A matching
//! one is published to the send queue, and acked from the dead-letter queue
//! only after the broker confirmed that publish. The others are never acked:
//! closing the channel returns them to the dead-letter queue, in their order.
//! Each one is described as it is read and then dropped: the command's
//! memory does not grow with the queue.

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};

use super::message::{carried_headers, carried_properties};
use lapin::message::Delivery;
use lapin::{BasicProperties, Channel, Confirmation};

use crate::amqp::{
    self, HEADER_DECIDED_AT, HEADER_DETAIL, HEADER_REASON, HEADER_SOURCE, header_text,
};
use crate::config::AmqpSettings;
use crate::domain::plan::Reason;

/// Which dead letters to act on; `None` matches all.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub reason: Option<String>,
    pub account: Option<String>,
    /// Only refused jobs, never refused delivery reports (redrive).
    pub jobs_only: bool,
}

/// One dead letter, as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetterInfo {
    pub reason: String,
    /// `job` or `report`: what was refused.
    pub source: &'static str,
    pub account_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub detail: Option<String>,
    /// When it was dead-lettered (RFC 3339): sendgate's
    /// `x-sendgate-decided-at`, or the broker's `x-death` time.
    pub dead_lettered_at: Option<String>,
}

impl Filter {
    fn matches(&self, info: &DeadLetterInfo) -> bool {
        (!self.jobs_only || info.source == "job")
            && self.reason.as_ref().is_none_or(|r| *r == info.reason)
            && self
                .account
                .as_ref()
                .is_none_or(|a| info.account_id.as_deref() == Some(a.as_str()))
    }
}

/// Whether a dead letter is a refused delivery report: sendgate marks its
/// own (`x-sendgate-source`, or a report's reason), and the broker's carry
/// the queue they came from in `x-death`.
fn is_report(delivery: &lapin::message::Delivery, reason: &str, outcomes_queue: &str) -> bool {
    let properties = &delivery.properties;
    header_text(properties, HEADER_SOURCE).as_deref() == Some("report")
        || reason == Reason::UnknownReservation.as_str()
        || reason == Reason::InvalidOutcome.as_str()
        || died_in(properties).as_deref() == Some(outcomes_queue)
}

/// The broker's record of a message's first death (`x-death`).
fn first_death(properties: &BasicProperties) -> Option<&FieldTable> {
    let deaths = properties.headers().as_ref()?.inner().get("x-death")?;
    let AMQPValue::FieldArray(deaths) = deaths else {
        return None;
    };
    match deaths.as_slice().first()? {
        AMQPValue::FieldTable(first) => Some(first),
        _ => None,
    }
}

/// When the broker dead-lettered a message, from `x-death`.
fn death_time(properties: &BasicProperties) -> Option<String> {
    match first_death(properties)?.inner().get("time")? {
        AMQPValue::Timestamp(secs) => {
            let at = chrono::DateTime::from_timestamp(i64::try_from(*secs).ok()?, 0)?;
            Some(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        }
        _ => None,
    }
}

/// The queue a broker-dead-lettered message first died in.
fn died_in(properties: &BasicProperties) -> Option<String> {
    match first_death(properties)?.inner().get("queue")? {
        AMQPValue::LongString(queue) => {
            Some(String::from_utf8_lossy(queue.as_bytes()).into_owned())
        }
        AMQPValue::ShortString(queue) => Some(queue.to_string()),
        _ => None,
    }
}

fn describe(delivery: &lapin::message::Delivery, outcomes_queue: &str) -> DeadLetterInfo {
    let body: Option<serde_json::Value> = serde_json::from_slice(&delivery.data).ok();
    let field = |name: &str| {
        body.as_ref()
            .and_then(|b| b.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let reason = header_text(&delivery.properties, HEADER_REASON)
        .unwrap_or_else(|| delivery.routing_key.to_string());
    let source = if is_report(delivery, &reason, outcomes_queue) {
        "report"
    } else {
        "job"
    };
    DeadLetterInfo {
        reason,
        source,
        account_id: field("account_id"),
        idempotency_key: field("idempotency_key").or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
        }),
        detail: header_text(&delivery.properties, HEADER_DETAIL),
        dead_lettered_at: header_text(&delivery.properties, HEADER_DECIDED_AT)
            .or_else(|| death_time(&delivery.properties)),
    }
}

/// The job's properties as a scheduler would publish it: the allow-list of
/// [`carried_properties`] and [`carried_headers`] (sendgate's and the
/// broker's dead-letter headers removed, so it is judged afresh) and its
/// `message_id`.
fn as_sent(properties: &BasicProperties) -> BasicProperties {
    let mut sent = carried_properties(properties).with_headers(carried_headers(properties));
    if let Some(id) = properties.message_id() {
        sent = sent.with_message_id(id.clone());
    }
    sent
}

/// Publishes a dead-lettered job back through the jobs exchange to its
/// account's partition (a job whose account could not be read goes to the
/// send queue), then acks it from the dead-letter queue once the broker
/// confirmed the publish.
///
/// # Errors
/// The broker refused or returned the publish (the job stays where it
/// is), or the channel failed.
async fn move_back(
    channel: &Channel,
    settings: &AmqpSettings,
    delivery: &Delivery,
    info: &DeadLetterInfo,
) -> anyhow::Result<()> {
    let account = info.account_id.as_ref().filter(|a| a.len() <= 255);
    let (exchange, routing_key, to) = match account {
        Some(account) => (
            settings.jobs_exchange.as_str(),
            account.as_str(),
            &settings.jobs_exchange,
        ),
        None => ("", settings.send_queue.as_str(), &settings.send_queue),
    };
    let confirmation = channel
        .basic_publish(
            ShortString::from(exchange),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &delivery.data,
            as_sent(&delivery.properties),
        )
        .await?
        .await?;
    if !matches!(confirmation, Confirmation::Ack(None)) {
        anyhow::bail!(
            "the broker did not accept a job for {to}; it stays in {}",
            settings.dead_letter_queue
        );
    }
    delivery.ack(BasicAckOptions::default()).await?;
    Ok(())
}

/// Lists (`move_them` false) or moves the dead letters matching `filter`,
/// at most `limit`, handing each to `each` as it goes; returns how many.
///
/// # Errors
/// The broker is unreachable, refused a publish (nothing is acked then), or
/// `each` failed.
pub async fn run(
    settings: &AmqpSettings,
    filter: &Filter,
    limit: usize,
    move_them: bool,
    mut each: impl FnMut(&DeadLetterInfo) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let connection = amqp::connect(settings, "sendgate dead-letters").await?;
    let channel = connection.create_channel().await?;
    amqp::declare_topology(&channel, settings).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let waiting = channel
        .queue_declare(
            settings.dead_letter_queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count();

    let mut chosen = 0;
    for _ in 0..waiting {
        if chosen >= limit {
            break;
        }
        let Some(message) = channel
            .basic_get(
                settings.dead_letter_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        let info = describe(&delivery, &settings.outcomes_queue);
        if !filter.matches(&info) {
            // Left unacked: it goes back when the channel closes.
            continue;
        }
        if move_them {
            move_back(&channel, settings, &delivery, &info).await?;
        }
        each(&info)?;
        chosen += 1;
    }
    // Everything not moved goes back when the channel closes.
    channel.close(200, "done".into()).await?;
    connection.close(200, "done".into()).await?;
    Ok(chosen)
}
