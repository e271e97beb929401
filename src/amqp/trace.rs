//! W3C trace context across the queues (docs/contract.md#7-observability):
//! a message's `traceparent` and `tracestate` AMQP headers are continued by
//! the span sendgate makes for it, and what sendgate publishes for it
//! carries that span's `traceparent`.
//!
//! - a job's span (`sendgate.job`) is a child of its publisher's span, from
//!   its arrival to its ack; its forward, dead letter or hold carries it;
//! - a batch's span (`sendgate.batch`) is the database transaction that
//!   decided it, linked to each of its jobs' publishers (a batch has many
//!   parents, so it has links, as OpenTelemetry's messaging conventions
//!   say);
//! - a delivery report's span (`sendgate.settle`) is a child of the
//!   report's trace context: a delivery worker that continues the forward's
//!   `traceparent` puts it in the send's trace.
//!
//! Only when traces are exported (`[telemetry] otlp_endpoint`): otherwise
//! no span is made and the headers pass through as they came, so a trace
//! goes on from the publisher to the delivery worker without sendgate.

use std::sync::atomic::{AtomicBool, Ordering};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::long_string;
use crate::domain::decision::Decision;

/// The target of sendgate's spans: the trace exporter's layer takes these,
/// whatever `[log] level` says.
pub const TARGET: &str = "sendgate::trace";

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are made and exported (set once, when the exporter is
/// installed).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Called by the exporter's installation only.
pub(crate) fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// The span of a job taken from a job queue, a child of its publisher's
/// trace context (a root when it has none); `None` when not exporting.
pub fn job_span(properties: &BasicProperties) -> Option<Span> {
    exporting().then(|| {
        let span = tracing::info_span!(
            target: TARGET,
            "sendgate.job",
            otel.name = "sendgate.job process",
            otel.kind = "consumer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "process",
            sendgate.account_id = Empty,
            sendgate.idempotency_key = Empty,
            sendgate.decision = Empty,
            sendgate.reason = Empty,
        );
        continue_from(&span, properties);
        span
    })
}

/// The span of a delivery report, a child of the report's trace context;
/// `None` when not exporting.
pub fn settle_span(properties: &BasicProperties) -> Option<Span> {
    exporting().then(|| {
        let span = tracing::info_span!(
            target: TARGET,
            "sendgate.settle",
            otel.name = "sendgate.settle process",
            otel.kind = "consumer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "process",
            sendgate.result = Empty,
        );
        continue_from(&span, properties);
        span
    })
}

/// The span of one batch's decision, linked to each of its jobs' spans;
/// `None` when not exporting.
pub fn batch_span<'a>(jobs: impl Iterator<Item = &'a Span>, size: usize) -> Option<Span> {
    exporting().then(|| {
        let span = tracing::info_span!(
            target: TARGET,
            "sendgate.batch",
            otel.name = "sendgate.batch decide",
            otel.kind = "internal",
            sendgate.batch.size = size,
        );
        for job in jobs {
            span.add_link(job.context().span().span_context().clone());
        }
        span
    })
}

/// Records what was decided for a job on its span.
pub fn decided(span: &Span, account: Option<&str>, key: Option<&str>, decision: &Decision) {
    let (name, reason) = match decision {
        Decision::Forward(_) => ("forwarded", None),
        Decision::Duplicate => ("duplicate", None),
        Decision::Wait(_) => ("waiting", None),
        Decision::Defer(dead) => ("deferred", Some(dead.reason.as_str())),
        Decision::DeadLetter(dead) => ("dead_lettered", Some(dead.reason.as_str())),
    };
    span.record("sendgate.decision", name);
    if let Some(account) = account {
        span.record("sendgate.account_id", account);
    }
    if let Some(key) = key {
        span.record("sendgate.idempotency_key", key);
    }
    if let Some(reason) = reason {
        span.record("sendgate.reason", reason);
    }
}

/// `properties` with `span`'s trace context as its `traceparent` (and
/// `tracestate`), in place of the ones it came with.
pub fn carry(properties: BasicProperties, span: &Span) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeadersOut(&mut headers));
    properties.with_headers(headers)
}

/// Sets `span`'s parent to the trace context in `properties`, if any.
fn continue_from(span: &Span, properties: &BasicProperties) {
    let Some(headers) = properties.headers() else {
        return;
    };
    let parent = TraceContextPropagator::new().extract(&HeadersIn(headers));
    if !parent.span().span_context().is_valid() {
        return;
    }
    if let Err(err) = span.set_parent(parent) {
        tracing::debug!(error = %err, "cannot continue a message's trace context");
    }
}

/// AMQP headers, read as a carrier of trace context.
struct HeadersIn<'a>(&'a FieldTable);

impl Extractor for HeadersIn<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

/// AMQP headers, written as a carrier of trace context.
struct HeadersOut<'a>(&'a mut FieldTable);

impl Injector for HeadersOut<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.into(), long_string(&value));
    }
}
