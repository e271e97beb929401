//! Every metric sendgate exports: names, labels and buckets live here and
//! nowhere else. Labels are bounded sets (plan, charge, reason, kind), never
//! an account or a key.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::domain::events::EventType;
use crate::domain::plan::{Charge, Plan, Reason};

pub const JOBS_RECEIVED: &str = "sendgate_jobs_received_total";
pub const JOBS_FORWARDED: &str = "sendgate_jobs_forwarded_total";
pub const JOBS_DEAD_LETTERED: &str = "sendgate_jobs_dead_lettered_total";
pub const JOBS_DUPLICATE: &str = "sendgate_jobs_duplicate_total";
pub const JOBS_DEFERRED: &str = "sendgate_jobs_deferred_total";
pub const JOBS_WAITING: &str = "sendgate_jobs_waiting_total";
pub const JOB_DURATION: &str = "sendgate_job_duration_seconds";
pub const BATCH_SIZE: &str = "sendgate_batch_size";
pub const BATCH_DECIDE: &str = "sendgate_batch_decide_seconds";
pub const JOBS_IN_FLIGHT: &str = "sendgate_jobs_in_flight";
pub const AMQP_RECONNECTS: &str = "sendgate_amqp_reconnects_total";
pub const AMQP_CONNECTS: &str = "sendgate_amqp_connects_total";
pub const DB_PRIMARY_CHANGES: &str = "sendgate_db_primary_changes_total";
pub const DB_ERRORS: &str = "sendgate_db_errors_total";
pub const PUBLISH_FAILURES: &str = "sendgate_publish_failures_total";
pub const QUEUE_MESSAGES: &str = "sendgate_queue_messages";
pub const PARTITION_MESSAGES: &str = "sendgate_partition_messages";
pub const PARTITION_DRAWN: &str = "sendgate_partition_jobs_drawn_total";
pub const PARTITION_FORWARDED: &str = "sendgate_partition_jobs_forwarded_total";
pub const OUTCOMES: &str = "sendgate_outcomes_total";
pub const OUTCOMES_STALE: &str = "sendgate_outcomes_stale_total";
pub const HOLDS_EXPIRED: &str = "sendgate_holds_expired_total";
pub const READY: &str = "sendgate_ready";
pub const PAUSED: &str = "sendgate_paused";
pub const BUILD_INFO: &str = "sendgate_build_info";
pub const API_REQUESTS: &str = "sendgate_api_requests_total";
pub const DB_POOL_CONNECTIONS: &str = "sendgate_db_pool_connections";
pub const EVENTS_WRITTEN: &str = "sendgate_events_written_total";
pub const EVENTS_PUBLISHED: &str = "sendgate_events_published_total";
pub const EVENTS_PENDING: &str = "sendgate_events_pending";
pub const EVENTS_OLDEST_PENDING: &str = "sendgate_events_oldest_pending_seconds";
pub const EVENTS_RELAY_FAILURES: &str = "sendgate_events_relay_failures_total";
pub const DEDUP_WINDOW: &str = "sendgate_dedup_window_seconds";
pub const SLOT_AGE: &str = "sendgate_reservation_slot_age_seconds";
pub const SLOTS_EMPTIED: &str = "sendgate_reservation_slots_emptied_total";
pub const INTERNAL_ERRORS: &str = "sendgate_internal_errors_total";
pub const HTTP_CONNECTIONS_REFUSED: &str = "sendgate_http_connections_refused_total";
pub const AUDIT_VIOLATIONS: &str = "sendgate_audit_violations";
pub const AUDIT_LAST_COMPLETED: &str = "sendgate_audit_last_completed_timestamp_seconds";
pub const AUDIT_DURATION: &str = "sendgate_audit_duration_seconds";
pub const AUDIT_FAILURES: &str = "sendgate_audit_failures_total";

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One exported metric, as documented in `docs/metrics.md`.
#[derive(Debug, Clone, Copy)]
pub struct MetricDoc {
    pub name: &'static str,
    pub kind: Kind,
    /// Label names and their possible values.
    pub labels: &'static [(&'static str, &'static str)],
    pub unit: &'static str,
    pub help: &'static str,
}

/// Every metric sendgate exports. `describe()` registers them from here,
/// and a test keeps `docs/metrics.md` equal to [`catalogue_markdown`].
pub const CATALOGUE: &[MetricDoc] = &[
    MetricDoc {
        name: JOBS_RECEIVED,
        kind: Kind::Counter,
        labels: &[],
        unit: "jobs",
        help: "Send jobs taken from the send queue (redeliveries included).",
    },
    MetricDoc {
        name: JOBS_FORWARDED,
        kind: Kind::Counter,
        labels: &[
            ("plan", "free, pro, scale"),
            ("charge", "credit, daily_slot, unmetered"),
        ],
        unit: "jobs",
        help: "Jobs forwarded to the delivery queue and acknowledged.",
    },
    MetricDoc {
        name: JOBS_DEAD_LETTERED,
        kind: Kind::Counter,
        labels: &[(
            "reason",
            "out_of_credits, daily_limit_reached, unknown_account, invalid_job, idempotency_conflict",
        )],
        unit: "jobs",
        help: "Jobs dead-lettered and acknowledged.",
    },
    MetricDoc {
        name: JOBS_DUPLICATE,
        kind: Kind::Counter,
        labels: &[],
        unit: "jobs",
        help: "Jobs acknowledged and dropped because the same job was already charged and forwarded.",
    },
    MetricDoc {
        name: JOBS_DEFERRED,
        kind: Kind::Counter,
        labels: &[],
        unit: "jobs",
        help: "Pro jobs over their daily limit held until the account's next day (`[plans.pro] on_limit = \"defer\"`).",
    },
    MetricDoc {
        name: JOBS_WAITING,
        kind: Kind::Counter,
        labels: &[],
        unit: "jobs",
        help: "Copies of a charged job sent to wait (`amqp.wait_queue`) because the charge's forward may still be on its way (`[gate] forward_lease_secs`); each is decided again after `amqp.copy_wait_ms`.",
    },
    MetricDoc {
        name: JOB_DURATION,
        kind: Kind::Histogram,
        labels: &[],
        unit: "seconds",
        help: "Time from receiving a job to acknowledging it.",
    },
    MetricDoc {
        name: BATCH_SIZE,
        kind: Kind::Histogram,
        labels: &[],
        unit: "jobs",
        help: "Jobs decided per database transaction.",
    },
    MetricDoc {
        name: BATCH_DECIDE,
        kind: Kind::Histogram,
        labels: &[],
        unit: "seconds",
        help: "Time to decide and record one batch in the database (retries after a database error included); the database's share of `sendgate_job_duration_seconds`.",
    },
    MetricDoc {
        name: JOBS_IN_FLIGHT,
        kind: Kind::Gauge,
        labels: &[],
        unit: "jobs",
        help: "Jobs received and not yet acknowledged.",
    },
    MetricDoc {
        name: AMQP_RECONNECTS,
        kind: Kind::Counter,
        labels: &[],
        unit: "connections",
        help: "Broker connections re-established after a failure.",
    },
    MetricDoc {
        name: AMQP_CONNECTS,
        kind: Kind::Counter,
        labels: &[
            ("node", "host:port of a node in amqp.url"),
            ("outcome", "opened, failed"),
        ],
        unit: "connections",
        help: "Connection attempts to each broker node of amqp.url: which node a process is on, and which ones refused it.",
    },
    MetricDoc {
        name: DB_PRIMARY_CHANGES,
        kind: Kind::Counter,
        labels: &[],
        unit: "changes",
        help: "Times the database's writable server was found on another host of database.url (a failover).",
    },
    MetricDoc {
        name: DB_ERRORS,
        kind: Kind::Counter,
        labels: &[(
            "kind",
            "unavailable, constraint, other, unknown_account, account_exists, invalid_account, migrate",
        )],
        unit: "errors",
        help: "Database calls that failed; `unavailable` ones (outage, timeout, lock wait) are retried.",
    },
    MetricDoc {
        name: PUBLISH_FAILURES,
        kind: Kind::Counter,
        labels: &[],
        unit: "messages",
        help: "Outcome publishes the broker nacked or returned unroutable; they are published again.",
    },
    MetricDoc {
        name: QUEUE_MESSAGES,
        kind: Kind::Gauge,
        labels: &[(
            "queue",
            "send (the send queue and every partition), delivery, dead_letter, outcomes, deferred, waiting",
        )],
        unit: "messages",
        help: "Messages ready in each queue, polled with a passive declare.",
    },
    MetricDoc {
        name: PARTITION_MESSAGES,
        kind: Kind::Gauge,
        labels: &[(
            "partition",
            "0 … `[amqp] partitions` - 1, and `unpartitioned` (the send queue)",
        )],
        unit: "messages",
        help: "Jobs ready in each partition of the send queue, polled with the queue depths; one far above the others is a hot account.",
    },
    MetricDoc {
        name: PARTITION_DRAWN,
        kind: Kind::Counter,
        labels: &[(
            "partition",
            "0 … `[amqp] partitions` - 1, and `unpartitioned`",
        )],
        unit: "jobs",
        help: "Jobs the fair draw took into batches from each partition (redeliveries included): its share of the gate is this rate over their sum.",
    },
    MetricDoc {
        name: PARTITION_FORWARDED,
        kind: Kind::Counter,
        labels: &[(
            "partition",
            "0 … `[amqp] partitions` - 1, and `unpartitioned`",
        )],
        unit: "jobs",
        help: "Jobs forwarded and acknowledged, by the partition they came from.",
    },
    MetricDoc {
        name: OUTCOMES,
        kind: Kind::Counter,
        labels: &[(
            "result",
            "committed, released, already_settled, unknown_reservation, kept_for_another_forward, invalid",
        )],
        unit: "reports",
        help: "Delivery outcome reports, by what they did to their reservation.",
    },
    MetricDoc {
        name: OUTCOMES_STALE,
        kind: Kind::Counter,
        labels: &[],
        unit: "reports",
        help: "Delivery reports on a reservation that is no longer its key's current one (released and charged afresh since): acked with no effect.",
    },
    MetricDoc {
        name: HOLDS_EXPIRED,
        kind: Kind::Counter,
        labels: &[],
        unit: "reservations",
        help: "Held reservations committed by the sweep because no outcome came within the hold time.",
    },
    MetricDoc {
        name: AUDIT_VIOLATIONS,
        kind: Kind::Gauge,
        labels: &[(
            "check",
            "ledger_balance, credits_spent, daily_limit, usage_counts, holds_expire",
        )],
        unit: "accounts",
        help: "Accounts the last completed self-audit found breaking the check (docs/runbook.md#self-audit); 0 when it found none.",
    },
    MetricDoc {
        name: AUDIT_LAST_COMPLETED,
        kind: Kind::Gauge,
        labels: &[],
        unit: "seconds",
        help: "When this process last completed a self-audit (Unix time); absent until the first.",
    },
    MetricDoc {
        name: AUDIT_DURATION,
        kind: Kind::Gauge,
        labels: &[],
        unit: "seconds",
        help: "How long the last completed self-audit took.",
    },
    MetricDoc {
        name: AUDIT_FAILURES,
        kind: Kind::Counter,
        labels: &[],
        unit: "audits",
        help: "Self-audits that could not finish (the database failed); tried again next interval.",
    },
    MetricDoc {
        name: DEDUP_WINDOW,
        kind: Kind::Gauge,
        labels: &[],
        unit: "seconds",
        help: "[reservations] dedup_window_secs: Pro and Scale charges are remembered at least this long; 0 keeps them forever.",
    },
    MetricDoc {
        name: SLOT_AGE,
        kind: Kind::Gauge,
        labels: &[],
        unit: "seconds",
        help: "How long the current reservation slot has been current; retention empties the other slot and switches once this reaches the dedup window.",
    },
    MetricDoc {
        name: SLOTS_EMPTIED,
        kind: Kind::Counter,
        labels: &[],
        unit: "slots",
        help: "Reservation slots emptied by retention (by this process): their Pro and Scale charges, all older than the dedup window, were removed.",
    },
    MetricDoc {
        name: READY,
        kind: Kind::Gauge,
        labels: &[],
        unit: "boolean",
        help: "1 when every worker is connected to the broker, the database answers and the process is not draining.",
    },
    MetricDoc {
        name: PAUSED,
        kind: Kind::Gauge,
        labels: &[],
        unit: "boolean",
        help: "1 while an operator has paused taking jobs (`sendgate ctl pause`); delivery reports are still applied.",
    },
    MetricDoc {
        name: DB_POOL_CONNECTIONS,
        kind: Kind::Gauge,
        labels: &[("state", "open, idle, max")],
        unit: "connections",
        help: "The database pool: connections open, idle among them, and the configured maximum.",
    },
    MetricDoc {
        name: API_REQUESTS,
        kind: Kind::Counter,
        labels: &[
            (
                "token",
                "the configured token names ([api] tokens, `default`), or `none`",
            ),
            ("status", "the HTTP status code"),
        ],
        unit: "requests",
        help: "Account API requests, by the name of the token presented and the response's status.",
    },
    MetricDoc {
        name: EVENTS_WRITTEN,
        kind: Kind::Counter,
        labels: &[(
            "type",
            "credits.low, credits.exhausted, daily_limit.reached, plan.changed",
        )],
        unit: "events",
        help: "Threshold events written to the outbox by this process, counted once their transaction committed.",
    },
    MetricDoc {
        name: EVENTS_PUBLISHED,
        kind: Kind::Counter,
        labels: &[(
            "type",
            "credits.low, credits.exhausted, daily_limit.reached, plan.changed",
        )],
        unit: "events",
        help: "Threshold events the broker confirmed on the events exchange, published by this process's relay.",
    },
    MetricDoc {
        name: EVENTS_PENDING,
        kind: Kind::Gauge,
        labels: &[],
        unit: "events",
        help: "Events in the outbox not yet published (all processes), read by the relay each round.",
    },
    MetricDoc {
        name: EVENTS_OLDEST_PENDING,
        kind: Kind::Gauge,
        labels: &[],
        unit: "seconds",
        help: "Age of the oldest unpublished event in the outbox; 0 when there is none.",
    },
    MetricDoc {
        name: EVENTS_RELAY_FAILURES,
        kind: Kind::Counter,
        labels: &[],
        unit: "rounds",
        help: "Relay rounds that failed (broker or database unavailable, an event nacked or unroutable); their events are published again.",
    },
    MetricDoc {
        name: BUILD_INFO,
        kind: Kind::Gauge,
        labels: &[
            ("version", "the crate version"),
            ("revision", "the git commit it was built from, or `unknown`"),
        ],
        unit: "",
        help: "Always 1; the labels name the build.",
    },
    MetricDoc {
        name: HTTP_CONNECTIONS_REFUSED,
        kind: Kind::Counter,
        labels: &[],
        unit: "connections",
        help: "HTTP connections closed as soon as accepted because `[http] max_connections` were open.",
    },
    MetricDoc {
        name: INTERNAL_ERRORS,
        kind: Kind::Counter,
        labels: &[("stage", "jobs, outcomes")],
        unit: "batches",
        help: "Batches held because of a bug of ours (the store's answers did not match the batch): never acked, delivered again after the worker reconnects. Any increase is a bug to report.",
    },
];

/// `docs/metrics.md`, generated from [`CATALOGUE`].
pub fn catalogue_markdown() -> String {
    let mut out = String::from(
        "# sendgate metrics\n\n\
         Generated from `src/metrics.rs` (`CATALOGUE`); a test fails when this file\n\
         and the code disagree. Regenerate with\n\
         `UPDATE_DOCS=1 cargo test --lib metrics`.\n\n\
         All metrics are served on `GET /metrics` in the Prometheus text format.\n\
         Labels are bounded sets; an account id or idempotency key is never a label.\n\
         Histograms also export `_bucket`, `_sum` and `_count` series.\n\n\
         | metric | type | labels | unit | meaning |\n|---|---|---|---|---|\n",
    );
    for m in CATALOGUE {
        let labels = if m.labels.is_empty() {
            "—".to_owned()
        } else {
            m.labels
                .iter()
                .map(|(name, values)| format!("`{name}`: {values}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let unit = if m.unit.is_empty() { "—" } else { m.unit };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            m.name,
            m.kind.as_str(),
            labels,
            unit,
            m.help
        ));
    }
    out
}

const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return
/// the same handle) and describes every metric.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(JOB_DURATION.to_owned()),
                    DURATION_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(BATCH_SIZE.to_owned()),
                        BATCH_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(BATCH_DECIDE.to_owned()),
                        DURATION_BUCKETS,
                    )
                });
            let recorder = match builder {
                Ok(builder) => builder.build_recorder(),
                // Only fails for empty bucket lists, which the constants are not.
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Fails only if another recorder was installed first (a host
            // program embedding the library); metrics then go there.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    for m in CATALOGUE {
        match m.kind {
            Kind::Counter => describe_counter!(m.name, m.help),
            Kind::Gauge => describe_gauge!(m.name, m.help),
            Kind::Histogram if m.unit == "seconds" => {
                describe_histogram!(m.name, Unit::Seconds, m.help)
            }
            Kind::Histogram => describe_histogram!(m.name, m.help),
        }
    }
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "revision" => env!("SENDGATE_REVISION"))
        .set(1.0);
    // Zero every labelled series up front so dashboards and rate() see them
    // before the first event.
    counter!(JOBS_RECEIVED).absolute(0);
    counter!(JOBS_DUPLICATE).absolute(0);
    counter!(JOBS_DEFERRED).absolute(0);
    counter!(JOBS_WAITING).absolute(0);
    counter!(AMQP_RECONNECTS).absolute(0);
    counter!(DB_PRIMARY_CHANGES).absolute(0);
    counter!(PUBLISH_FAILURES).absolute(0);
    counter!(HOLDS_EXPIRED).absolute(0);
    counter!(SLOTS_EMPTIED).absolute(0);
    counter!(AUDIT_FAILURES).absolute(0);
    counter!(HTTP_CONNECTIONS_REFUSED).absolute(0);
    for stage in ["jobs", "outcomes"] {
        counter!(INTERNAL_ERRORS, "stage" => stage).absolute(0);
    }
    counter!(OUTCOMES_STALE).absolute(0);
    counter!(API_REQUESTS, "token" => "none", "status" => "401").absolute(0);
    for result in [
        "committed",
        "released",
        "already_settled",
        "unknown_reservation",
        "kept_for_another_forward",
        "invalid",
    ] {
        counter!(OUTCOMES, "result" => result).absolute(0);
    }
    counter!(DB_ERRORS, "kind" => "unavailable").absolute(0);
    for plan in Plan::ALL {
        let charge = Charge::for_plan(plan);
        counter!(JOBS_FORWARDED, "plan" => plan.as_str(), "charge" => charge.as_str()).absolute(0);
    }
    for reason in Reason::ALL {
        counter!(JOBS_DEAD_LETTERED, "reason" => reason.as_str()).absolute(0);
    }
    for kind in EventType::ALL {
        counter!(EVENTS_WRITTEN, "type" => kind.as_str()).absolute(0);
        counter!(EVENTS_PUBLISHED, "type" => kind.as_str()).absolute(0);
    }
    counter!(EVENTS_RELAY_FAILURES).absolute(0);
    // Until the relay's first read of the outbox, a moment after start.
    events_backlog(0, None);
}

pub fn http_connection_refused() {
    counter!(HTTP_CONNECTIONS_REFUSED).increment(1);
}

pub fn internal_error(stage: &'static str) {
    counter!(INTERNAL_ERRORS, "stage" => stage).increment(1);
}

pub fn jobs_received(n: usize) {
    counter!(JOBS_RECEIVED).increment(n as u64);
}

pub fn job_forwarded(plan: Plan, charge: Charge) {
    counter!(JOBS_FORWARDED, "plan" => plan.as_str(), "charge" => charge.as_str()).increment(1);
}

pub fn job_dead_lettered(reason: Reason) {
    counter!(JOBS_DEAD_LETTERED, "reason" => reason.as_str()).increment(1);
}

pub fn job_deferred() {
    counter!(JOBS_DEFERRED).increment(1);
}

pub fn job_waiting() {
    counter!(JOBS_WAITING).increment(1);
}

pub fn job_duplicate() {
    counter!(JOBS_DUPLICATE).increment(1);
}

pub fn job_done(elapsed: Duration) {
    histogram!(JOB_DURATION).record(elapsed.as_secs_f64());
}

pub fn batch_decided(size: usize, took: Duration) {
    histogram!(BATCH_SIZE).record(size as f64);
    histogram!(BATCH_DECIDE).record(took.as_secs_f64());
}

pub fn in_flight_add(n: usize) {
    gauge!(JOBS_IN_FLIGHT).increment(n as f64);
}

pub fn in_flight_sub(n: usize) {
    gauge!(JOBS_IN_FLIGHT).decrement(n as f64);
}

pub fn amqp_reconnected() {
    counter!(AMQP_RECONNECTS).increment(1);
}

/// A connection attempt to broker node `node` (`host:port`).
pub fn amqp_connect(node: &str, opened: bool) {
    let outcome = if opened { "opened" } else { "failed" };
    counter!(AMQP_CONNECTS, "node" => node.to_owned(), "outcome" => outcome).increment(1);
}

pub fn db_primary_changed() {
    counter!(DB_PRIMARY_CHANGES).increment(1);
}

pub fn db_error(kind: &'static str) {
    counter!(DB_ERRORS, "kind" => kind).increment(1);
}

pub fn publish_failed() {
    counter!(PUBLISH_FAILURES).increment(1);
}

/// The database pool's connections.
pub fn db_pool(open: u32, idle: usize, max: u32) {
    gauge!(DB_POOL_CONNECTIONS, "state" => "open").set(f64::from(open));
    gauge!(DB_POOL_CONNECTIONS, "state" => "idle").set(idle as f64);
    gauge!(DB_POOL_CONNECTIONS, "state" => "max").set(f64::from(max));
}

/// An API request, under its token's name (never the token).
pub fn api_request(token: &str, status: u16) {
    counter!(API_REQUESTS, "token" => token.to_owned(), "status" => status.to_string())
        .increment(1);
}

/// A settled report; a stale one has its own counter.
pub fn outcome(result: &'static str) {
    if result == "stale" {
        counter!(OUTCOMES_STALE).increment(1);
    } else {
        counter!(OUTCOMES, "result" => result).increment(1);
    }
}

pub fn holds_expired(n: u64) {
    counter!(HOLDS_EXPIRED).increment(n);
}

/// A completed self-audit: its findings per check, when and how long.
pub fn audit_completed(report: &crate::store::AuditReport) {
    for (check, n) in &report.counts {
        gauge!(AUDIT_VIOLATIONS, "check" => check.as_str()).set(*n as f64);
    }
    let finished = report.finished_at.timestamp_millis() as f64 / 1000.0;
    gauge!(AUDIT_LAST_COMPLETED).set(finished);
    gauge!(AUDIT_DURATION).set(report.took.as_secs_f64());
}

/// A self-audit that could not finish.
pub fn audit_failed() {
    counter!(AUDIT_FAILURES).increment(1);
}

/// The dedup window in force (`None`: charges are kept forever).
pub fn set_dedup_window(window: Option<Duration>) {
    gauge!(DEDUP_WINDOW).set(window.map_or(0.0, |w| w.as_secs_f64()));
}

pub fn slot_age(age: Duration) {
    gauge!(SLOT_AGE).set(age.as_secs_f64());
}

pub fn slot_emptied() {
    counter!(SLOTS_EMPTIED).increment(1);
}

/// A queue's depth; `role` is `send`, `delivery` or `dead_letter`.
pub fn queue_messages(role: &'static str, messages: u32) {
    gauge!(QUEUE_MESSAGES, "queue" => role).set(f64::from(messages));
}

/// The label of the job queue at `index` of [`AmqpSettings::job_queues`]:
/// the send queue, then the partitions.
///
/// [`AmqpSettings::job_queues`]: crate::config::AmqpSettings::job_queues
pub fn partition_label(index: usize) -> String {
    match index {
        0 => "unpartitioned".to_owned(),
        n => (n - 1).to_string(),
    }
}

pub fn partition_messages(index: usize, messages: u32) {
    gauge!(PARTITION_MESSAGES, "partition" => partition_label(index)).set(f64::from(messages));
}

/// `counts[i]`: jobs of the job queue at index `i` drawn into a batch.
pub fn partitions_drawn(counts: &[u64]) {
    for (index, n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
        counter!(PARTITION_DRAWN, "partition" => partition_label(index)).increment(*n);
    }
}

/// `counts[i]`: jobs of the job queue at index `i` forwarded.
pub fn partitions_forwarded(counts: &[u64]) {
    for (index, n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
        counter!(PARTITION_FORWARDED, "partition" => partition_label(index)).increment(*n);
    }
}

pub fn set_ready(ready: bool) {
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
}

pub fn event_written(kind: &str) {
    counter!(EVENTS_WRITTEN, "type" => kind.to_owned()).increment(1);
}

pub fn event_published(kind: &str) {
    counter!(EVENTS_PUBLISHED, "type" => kind.to_owned()).increment(1);
}

pub fn events_relay_failed() {
    counter!(EVENTS_RELAY_FAILURES).increment(1);
}

pub fn events_backlog(pending: i64, oldest: Option<Duration>) {
    gauge!(EVENTS_PENDING).set(pending as f64);
    gauge!(EVENTS_OLDEST_PENDING).set(oldest.map_or(0.0, |d| d.as_secs_f64()));
}

pub fn set_paused(paused: bool) {
    gauge!(PAUSED).set(if paused { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_document_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md");
        let expected = catalogue_markdown();
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::write(path, &expected).expect("docs/metrics.md is writable");
        }
        let actual = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            actual == expected,
            "docs/metrics.md is out of date: run UPDATE_DOCS=1 cargo test --lib metrics"
        );
    }

    #[test]
    fn every_metric_name_follows_the_conventions() {
        for m in CATALOGUE {
            assert!(m.name.starts_with("sendgate_"), "{}", m.name);
            match m.kind {
                Kind::Counter => assert!(m.name.ends_with("_total"), "{}", m.name),
                _ => assert!(!m.name.ends_with("_total"), "{}", m.name),
            }
            if m.unit == "seconds" {
                assert!(m.name.ends_with("_seconds"), "{}", m.name);
            }
        }
    }
}
