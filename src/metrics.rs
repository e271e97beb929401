//! Every metric sendgate exports: names, labels and buckets live here and
//! nowhere else. Labels are bounded sets (plan, charge, reason, kind), never
//! an account or a key.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::plan::{Charge, Plan, Reason};

pub const JOBS_RECEIVED: &str = "sendgate_jobs_received_total";
pub const JOBS_FORWARDED: &str = "sendgate_jobs_forwarded_total";
pub const JOBS_DEAD_LETTERED: &str = "sendgate_jobs_dead_lettered_total";
pub const JOBS_DUPLICATE: &str = "sendgate_jobs_duplicate_total";
pub const JOB_DURATION: &str = "sendgate_job_duration_seconds";
pub const BATCH_SIZE: &str = "sendgate_batch_size";
pub const JOBS_IN_FLIGHT: &str = "sendgate_jobs_in_flight";
pub const AMQP_RECONNECTS: &str = "sendgate_amqp_reconnects_total";
pub const DB_ERRORS: &str = "sendgate_db_errors_total";
pub const PUBLISH_FAILURES: &str = "sendgate_publish_failures_total";
pub const READY: &str = "sendgate_ready";
pub const BUILD_INFO: &str = "sendgate_build_info";

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
    describe_counter!(JOBS_RECEIVED, "Send jobs taken from the send queue.");
    describe_counter!(
        JOBS_FORWARDED,
        "Jobs forwarded to the delivery queue, by plan and charge."
    );
    describe_counter!(JOBS_DEAD_LETTERED, "Jobs dead-lettered, by reason.");
    describe_counter!(
        JOBS_DUPLICATE,
        "Jobs dropped because the same job was already charged and forwarded."
    );
    describe_histogram!(
        JOB_DURATION,
        Unit::Seconds,
        "Time from receiving a job to acknowledging it."
    );
    describe_histogram!(BATCH_SIZE, "Jobs decided per database transaction.");
    describe_gauge!(JOBS_IN_FLIGHT, "Jobs received and not yet acknowledged.");
    describe_counter!(AMQP_RECONNECTS, "Connections to RabbitMQ re-established.");
    describe_counter!(DB_ERRORS, "Database calls that failed, by kind.");
    describe_counter!(
        PUBLISH_FAILURES,
        "Outcome publishes not confirmed by the broker (nack, returned or timed out)."
    );
    describe_gauge!(
        READY,
        "1 when connected to both the broker and the database."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the build.");
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Zero every labelled series up front so dashboards and rate() see them
    // before the first event.
    counter!(JOBS_RECEIVED).absolute(0);
    counter!(JOBS_DUPLICATE).absolute(0);
    counter!(AMQP_RECONNECTS).absolute(0);
    for plan in Plan::ALL {
        let charge = Charge::for_plan(plan);
        counter!(JOBS_FORWARDED, "plan" => plan.as_str(), "charge" => charge.as_str()).absolute(0);
    }
    for reason in Reason::ALL {
        counter!(JOBS_DEAD_LETTERED, "reason" => reason.as_str()).absolute(0);
    }
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

pub fn job_duplicate() {
    counter!(JOBS_DUPLICATE).increment(1);
}

pub fn job_done(elapsed: Duration) {
    histogram!(JOB_DURATION).record(elapsed.as_secs_f64());
}

pub fn batch_decided(size: usize) {
    histogram!(BATCH_SIZE).record(size as f64);
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

pub fn db_error(kind: &'static str) {
    counter!(DB_ERRORS, "kind" => kind).increment(1);
}

pub fn publish_failed() {
    counter!(PUBLISH_FAILURES).increment(1);
}

pub fn set_ready(ready: bool) {
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
}
