//! Trace context through the queues: a `sendgate run` exporting to an
//! OTLP/HTTP receiver of the test's own (real exports, decoded), and a gate
//! that does not export passing a publisher's trace context on untouched.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use prost::Message;
use sendgate::domain::plan::Plan;

use crate::harness::*;

const WAIT: Duration = Duration::from_secs(30);

/// Every export the receiver was sent.
type Exports = Arc<Mutex<Vec<ExportTraceServiceRequest>>>;

/// An OTLP/HTTP trace receiver on a port of its own: decodes each export
/// (protobuf, as `opentelemetry-otlp` sends it) and keeps it.
async fn receiver() -> (SocketAddr, Exports) {
    let exports = Exports::default();
    let kept = exports.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| async move {
            let export = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
            kept.lock().unwrap().push(export);
            // An empty ExportTraceServiceResponse: all spans accepted.
            (
                [("content-type", "application/x-protobuf")],
                Vec::<u8>::new(),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, exports)
}

/// The spans received so far, with the `service.name` they came under.
fn spans(exports: &Exports) -> Vec<(String, Span)> {
    let exports = exports.lock().unwrap();
    let mut spans = Vec::new();
    for export in exports.iter() {
        for resource in &export.resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| text(a.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for scope in &resource.scope_spans {
                for span in &scope.spans {
                    spans.push((service.clone(), span.clone()));
                }
            }
        }
    }
    spans
}

fn text(value: &any_value::Value) -> Option<String> {
    match value {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| text(a.value.as_ref()?.value.as_ref()?))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A W3C `traceparent`: version, trace id, parent span id, flags.
fn parse_traceparent(value: &str) -> (String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!((parts[0], parts[3]), ("00", "01"), "{value}");
    (parts[1].to_owned(), parts[2].to_owned())
}

fn traced(traceparent: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(traceparent.into()),
    );
    headers.insert(
        "tracestate".into(),
        AMQPValue::LongString("vendor=opaque".into()),
    );
    job_properties().with_headers(headers)
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PUBLISHER: &str = "00f067aa0ba902b7";
const DELIVERY_WORKER: &str = "b7ad6b7169203331";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_trace_runs_from_its_publisher_through_sendgate_to_the_forward_and_its_report() {
    let (addr, exports) = receiver().await;
    let mut env = TestEnv::new();
    env.set(
        "SENDGATE__TELEMETRY__OTLP_ENDPOINT",
        &format!("http://{addr}"),
    )
    .set("SENDGATE__TELEMETRY__SERVICE_NAME", "sendgate-under-test")
    // The batch exporter sends every 100 ms (the SDK's own variable).
    .set("OTEL_BSP_SCHEDULE_DELAY", "100");
    let store = env.store().await;
    create(&store, "tina", Plan::Free).await;
    let process = Process::spawn(&env, false);
    process.wait_ready(WAIT).await;
    let broker = env.broker().await;

    // A job published inside the publisher's span, one published with no
    // trace context, and a malformed one inside the publisher's span.
    let traceparent = format!("00-{TRACE}-{PUBLISHER}-01");
    broker
        .publish_with(
            &env.send_queue(),
            &job_body("tina", "traced"),
            traced(&traceparent),
        )
        .await;
    let forward = broker.take(&env.delivery_queue(), 1, WAIT).await.remove(0);
    broker
        .publish_with(
            &env.send_queue(),
            &job_body("tina", "untraced"),
            job_properties(),
        )
        .await;
    let untraced_forward = broker.take(&env.delivery_queue(), 1, WAIT).await.remove(0);
    broker
        .publish_with(&env.send_queue(), b"{not json", traced(&traceparent))
        .await;
    let dead = broker.take(&env.dead_queue(), 1, WAIT).await.remove(0);

    // The forward carries sendgate's span, in the publisher's trace; the
    // publisher's tracestate is kept.
    let (trace, job_span_id) = parse_traceparent(&header(&forward, "traceparent").unwrap());
    assert_eq!(trace, TRACE);
    assert_ne!(job_span_id, PUBLISHER);
    assert_eq!(
        header(&forward, "tracestate").as_deref(),
        Some("vendor=opaque")
    );
    let (dead_trace, dead_span_id) = parse_traceparent(&header(&dead, "traceparent").unwrap());
    assert_eq!(dead_trace, TRACE);
    let (untraced_trace, untraced_span_id) =
        parse_traceparent(&header(&untraced_forward, "traceparent").unwrap());
    assert_ne!(untraced_trace, TRACE);

    // The delivery worker's span continues the forward's; its report
    // carries it.
    let report = serde_json::json!({
        "account_id": "tina", "idempotency_key": "traced",
        "reservation_id": header(&forward, "x-sendgate-reservation-id").unwrap(),
        "outcome": "delivered", "detail": "test",
    });
    broker
        .publish_with(
            &env.outcomes_queue(),
            report.to_string().as_bytes(),
            traced(&format!("00-{TRACE}-{DELIVERY_WORKER}-01")),
        )
        .await;

    let by_name = |name: &str| -> Vec<(String, Span)> {
        spans(&exports)
            .into_iter()
            .filter(|(_, s)| s.name == name)
            .collect()
    };
    eventually(WAIT, || async {
        by_name("sendgate.job process").len() == 3
            && !by_name("sendgate.settle process").is_empty()
            && !by_name("sendgate.batch decide").is_empty()
    })
    .await;

    // The job's span: a consumer span, child of the publisher's, whose id
    // the forward carries, with what was decided.
    let jobs = by_name("sendgate.job process");
    let span_of = |id: &str| {
        jobs.iter()
            .find(|(_, s)| hex(&s.span_id) == id)
            .unwrap_or_else(|| panic!("no exported span {id}: {jobs:#?}"))
            .clone()
    };
    let (service, job) = span_of(&job_span_id);
    assert_eq!(service, "sendgate-under-test");
    assert_eq!(hex(&job.trace_id), TRACE);
    assert_eq!(hex(&job.parent_span_id), PUBLISHER);
    assert_eq!(job.kind, SpanKind::Consumer as i32);
    assert_eq!(
        attribute(&job, "sendgate.decision").as_deref(),
        Some("forwarded")
    );
    assert_eq!(
        attribute(&job, "sendgate.account_id").as_deref(),
        Some("tina")
    );
    assert_eq!(
        attribute(&job, "sendgate.idempotency_key").as_deref(),
        Some("traced")
    );
    assert!(job.end_time_unix_nano >= job.start_time_unix_nano);
    // The malformed job's span, also the publisher's child, names why.
    let (_, refused) = span_of(&dead_span_id);
    assert_eq!(hex(&refused.parent_span_id), PUBLISHER);
    assert_eq!(
        attribute(&refused, "sendgate.reason").as_deref(),
        Some("invalid_job")
    );
    // A job without trace context starts a trace of its own.
    let (_, root) = span_of(&untraced_span_id);
    assert_eq!(hex(&root.trace_id), untraced_trace);
    assert!(root.parent_span_id.is_empty());

    // The batch that decided the traced job links to its span.
    let linked = by_name("sendgate.batch decide")
        .into_iter()
        .any(|(_, batch)| {
            batch
                .links
                .iter()
                .any(|l| hex(&l.trace_id) == TRACE && hex(&l.span_id) == job_span_id)
        });
    assert!(linked, "a batch span links the job's span");

    // The report's settling is a child of the delivery worker's span, in
    // the same trace.
    let (_, settle) = by_name("sendgate.settle process").remove(0);
    assert_eq!(hex(&settle.trace_id), TRACE);
    assert_eq!(hex(&settle.parent_span_id), DELIVERY_WORKER);
    assert_eq!(
        attribute(&settle, "sendgate.result").as_deref(),
        Some("committed")
    );

    drop(process);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_exporter_a_publishers_trace_context_passes_through_untouched() {
    let env = TestEnv::new();
    let store = env.store().await;
    create(&store, "tom", Plan::Scale).await;
    let gate = env.start_gate(Arc::new(sendgate::clock::SystemClock)).await;
    let broker = env.broker().await;
    let traceparent = format!("00-{TRACE}-{PUBLISHER}-01");
    broker
        .publish_with(
            &env.send_queue(),
            &job_body("tom", "k"),
            traced(&traceparent),
        )
        .await;
    let forward = broker.take(&env.delivery_queue(), 1, WAIT).await.remove(0);
    assert_eq!(header(&forward, "traceparent"), Some(traceparent));
    assert_eq!(
        header(&forward, "tracestate").as_deref(),
        Some("vendor=opaque")
    );
    gate.shutdown().await;
    env.cleanup().await;
}
