//! The message that carries each outcome (docs/contract.md#3-outcomes): where it goes, and its
//! properties and headers. The body is always the original bytes and is not
//! part of [`Outgoing`].

use chrono::{DateTime, SecondsFormat, Utc};
use std::borrow::Cow;

use cookie_factory::SerializeFn;
use lapin::BasicProperties;
use lapin::protocol::basic::gen_properties;
use lapin::types::generation::gen_field_table;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use super::{
    HEADER_CHARGE, HEADER_CREDITS_REMAINING, HEADER_DAILY_REMAINING, HEADER_DECIDED_AT,
    HEADER_DECISION, HEADER_DEFERRED_UNTIL, HEADER_DETAIL, HEADER_HOLD, HEADER_PLAN, HEADER_REASON,
    HEADER_RESERVATION_ID, HEADER_RETRY_AFTER, HEADER_SOURCE, long_string,
};
use crate::config::AmqpSettings;
use crate::domain::decision::{DeadLetter, Decision, Forward};
use crate::domain::plan::Plan;

/// Where and how to publish one outcome.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub properties: BasicProperties,
}

/// Builds the message for a decision (none for a duplicate, which is only
/// acked), from an allow-list of the original's properties and headers
/// ([`carried_properties`], [`carried_headers`]); `now` dates a deferral's
/// expiry. A held job (waiting or deferred) goes through the hold exchange
/// with `account` as routing key, so it returns to its partition.
///
/// # Panics
/// A waiting or deferred decision without an account (only a parsed job
/// is held: a bug of the caller).
pub fn outgoing(
    settings: &AmqpSettings,
    original: &BasicProperties,
    idempotency_key: Option<&str>,
    account: Option<&str>,
    decision: &Decision,
    now: DateTime<Utc>,
) -> Option<Outgoing> {
    let held = |headers: &mut FieldTable, queue: String| {
        headers.insert(HEADER_HOLD.into(), long_string(&queue));
        let account = account.expect("a held job has its account");
        (settings.hold_exchange(), account.to_owned())
    };
    let mut headers = carried_headers(original);
    let mut properties = carried_properties(original);
    let (exchange, routing_key) = match decision {
        Decision::Duplicate => return None,
        Decision::Forward(forward) => {
            forward_headers(&mut headers, forward);
            (String::new(), settings.delivery_queue.clone())
        }
        Decision::DeadLetter(dead) => {
            dead_letter_headers(&mut headers, dead);
            headers.insert(
                HEADER_DECIDED_AT.into(),
                long_string(&now.to_rfc3339_opts(SecondsFormat::Millis, true)),
            );
            (
                settings.dead_letter_exchange.clone(),
                dead.reason.as_str().to_owned(),
            )
        }
        Decision::Wait(_) => {
            // Back to the send queue after the wait, decided again there.
            headers.insert(HEADER_DECISION.into(), long_string("waiting"));
            properties = properties.with_expiration(settings.copy_wait_ms.to_string().into());
            held(&mut headers, settings.partition_wait_queue())
        }
        Decision::Defer(dead) => {
            // The longest step of the ladder that does not pass the
            // account's next day; back in the send queue after it, the job
            // takes the next step until the day has started.
            let until = dead.retry_after.unwrap_or(now);
            headers
                .insert(HEADER_DECISION.into(), long_string("deferred"))
                .insert(HEADER_RETRY_AFTER.into(), long_string(&rfc3339(until)))
                .insert(
                    HEADER_DEFERRED_UNTIL.into(),
                    long_string(&until.to_rfc3339_opts(SecondsFormat::Millis, true)),
                );
            held(&mut headers, deferral_step(settings, until - now))
        }
    };
    properties = properties.with_headers(headers);
    if original.content_type().is_none()
        && !matches!(decision, Decision::Defer(_) | Decision::Wait(_))
    {
        properties = properties.with_content_type("application/json".into());
    }
    if let Some(key) = idempotency_key {
        properties = properties.with_message_id(key.into());
    }
    Some(Outgoing {
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        properties,
    })
}

/// The queue of the longest deferral step no longer than `remaining` (the
/// shortest when even that is longer).
pub fn deferral_step(settings: &AmqpSettings, remaining: chrono::TimeDelta) -> String {
    let steps = settings.partition_ladder();
    let remaining = remaining.to_std().unwrap_or_default();
    steps
        .iter()
        .rev()
        .find(|(wait, _)| *wait <= remaining)
        .or(steps.first())
        .map(|(_, queue)| queue.clone())
        .expect("the ladder has a 1 s step (amqp.deferral_longest_step_secs >= 1)")
}

/// When a job in the deferral ladder may be gated again, if it is one
/// (its `x-sendgate-deferred-until` header, as sendgate wrote it).
pub fn deferred_until(properties: &BasicProperties) -> Option<DateTime<Utc>> {
    let text = header_text(properties, HEADER_DEFERRED_UNTIL)?;
    DateTime::parse_from_rfc3339(&text)
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

/// The properties an outgoing message keeps: an allow-list, never a copy.
/// Persistent, and the publisher's `content_type`, `content_encoding`,
/// `correlation_id`, `timestamp`, `type`, `app_id` and `reply_to`. Never
/// `user_id` (the broker checks it against the connection's user: a
/// scheduler's would close sendgate's channel), never `expiration` (a dead
/// letter would silently expire), never `priority` or `cluster_id`; the
/// `message_id` is set by the caller.
pub fn carried_properties(original: &BasicProperties) -> BasicProperties {
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(value) = original.content_type() {
        properties = properties.with_content_type(value.clone());
    }
    if let Some(value) = original.content_encoding() {
        properties = properties.with_content_encoding(value.clone());
    }
    if let Some(value) = original.correlation_id() {
        properties = properties.with_correlation_id(value.clone());
    }
    if let Some(value) = original.timestamp() {
        properties = properties.with_timestamp(*value);
    }
    if let Some(value) = original.kind() {
        properties = properties.with_type(value.clone());
    }
    if let Some(value) = original.app_id() {
        properties = properties.with_app_id(value.clone());
    }
    if let Some(value) = original.reply_to() {
        properties = properties.with_reply_to(value.clone());
    }
    properties
}

/// The publisher's own headers, which travel on. Never sendgate's
/// (`x-sendgate-*` and `sendgate-hold`: set afresh, a publisher's are not
/// trusted), never `CC`
/// or `BCC` (the broker would route copies to other queues), and never the
/// broker's own bookkeeping (`x-death`, `x-first-death-*`,
/// `x-last-death-*`, `x-delivery-count`).
pub fn carried_headers(original: &BasicProperties) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(original) = original.headers() {
        for (name, value) in original {
            if is_carried(name.as_str()) {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    headers
}

fn is_carried(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !(lower.starts_with("x-sendgate-")
        || lower == HEADER_HOLD
        || lower == "cc"
        || lower == "bcc"
        || lower == "x-death"
        || lower.starts_with("x-first-death")
        || lower.starts_with("x-last-death")
        || lower == "x-delivery-count")
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
            Plan::Free => HEADER_CREDITS_REMAINING,
            _ => HEADER_DAILY_REMAINING,
        };
        headers.insert(name.into(), AMQPValue::LongLongInt(remaining));
    }
}

fn dead_letter_headers(headers: &mut FieldTable, dead: &DeadLetter) {
    let source = if dead.reason.is_about_reports() {
        "report"
    } else {
        "job"
    };
    headers
        .insert(HEADER_DECISION.into(), long_string("dead_lettered"))
        .insert(HEADER_SOURCE.into(), long_string(source))
        .insert(HEADER_REASON.into(), long_string(dead.reason.as_str()))
        .insert(HEADER_DETAIL.into(), long_string(&dead.detail));
    if let Some(at) = dead.retry_after {
        headers.insert(HEADER_RETRY_AFTER.into(), long_string(&rfc3339(at)));
    }
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Why a delivery's properties are too large to pass on, or `None` when
/// they fit within `max_bytes` as encoded on the wire. sendgate adds its
/// own headers to every message it publishes; a message whose properties
/// were already near the broker's frame size would no longer fit one
/// frame, and the broker would close the connection over it (and so
/// redeliver the whole window, again and again).
pub fn oversized(properties: &BasicProperties, max_bytes: usize) -> Option<String> {
    let size = encoded_len(gen_properties(properties));
    if size.is_some_and(|n| n <= max_bytes) {
        return None;
    }
    let largest = properties.headers().as_ref().and_then(|headers| {
        headers
            .inner()
            .iter()
            .map(|(name, value)| {
                let mut one = FieldTable::default();
                one.insert(name.clone(), value.clone());
                (name.as_str(), encoded_len(gen_field_table(&one)))
            })
            .max_by_key(|(_, n)| *n)
    });
    let size = size.map_or_else(
        || "cannot be encoded".to_owned(),
        |n| format!("are {n} bytes"),
    );
    let largest = match largest {
        Some((name, Some(n))) => format!("; the largest header is `{name}` ({n} bytes)"),
        Some((name, None)) => format!("; the header `{name}` cannot be encoded"),
        None => String::new(),
    };
    Some(format!(
        "the message's properties and headers {size}, over [jobs] max_header_bytes \
         ({max_bytes}){largest}; its headers are left off this dead letter"
    ))
}

/// The properties a delivery's outcome starts from: its own, without the
/// publisher's headers when they are [`oversized`] (its dead letter must
/// fit a frame).
pub fn bounded(properties: &BasicProperties, max_bytes: usize) -> Cow<'_, BasicProperties> {
    if oversized(properties, max_bytes).is_some() {
        Cow::Owned(properties.clone().with_headers(FieldTable::default()))
    } else {
        Cow::Borrowed(properties)
    }
}

/// The bytes `generate` writes, or `None` when it cannot encode.
fn encoded_len<F: SerializeFn<Vec<u8>>>(generate: F) -> Option<usize> {
    cookie_factory::gen_simple(generate, Vec::new())
        .ok()
        .map(|bytes| bytes.len())
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

#[cfg(test)]
mod tests {
    use super::deferral_step;

    #[test]
    fn a_deferred_job_takes_the_longest_step_that_does_not_pass_its_day() {
        let mut settings = crate::config::Settings::load_from(None, [])
            .expect("defaults")
            .amqp;
        settings.deferred_queue = "d".to_owned();
        let step = |secs: i64| deferral_step(&settings, chrono::TimeDelta::seconds(secs));
        assert_eq!(step(0), "d.p.1s");
        assert_eq!(step(3), "d.p.1s");
        assert_eq!(step(4), "d.p.4s");
        assert_eq!(step(10 * 3600), "d.p.16384s");
        assert_eq!(step(30 * 3600), "d.p.65536s");
        settings.deferral_longest_step_secs = 100;
        assert_eq!(
            deferral_step(&settings, chrono::TimeDelta::hours(5)),
            "d.p.64s"
        );
    }

    use lapin::protocol::basic::parse_properties;

    /// Properties with only a `message_id`, as raw bytes on the wire.
    fn with_message_id(id: &[u8]) -> Vec<u8> {
        let mut wire = 0x0080u16.to_be_bytes().to_vec();
        wire.push(u8::try_from(id.len()).expect("a short string"));
        wire.extend(id);
        wire
    }

    // Found by the fuzzer: every bad byte read lossily becomes three bytes
    // (U+FFFD), and a 255-byte `message_id` of bad bytes panicked in the
    // AMQP reader, killing the connection's I/O thread.
    #[test]
    fn a_message_id_of_255_bad_bytes_is_read_without_a_panic() {
        let (_, properties) =
            parse_properties(with_message_id(&[0xff; 255]).as_slice()).expect("parsed");
        let id = properties.message_id().clone().expect("a message_id");
        assert!(id.as_str().len() <= 255);
        assert!(id.as_str().contains(char::REPLACEMENT_CHARACTER));
    }
}
