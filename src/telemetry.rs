//! Logging through `tracing`: pretty for people, JSON for pipelines; the
//! level comes from `[log] level` unless `RUST_LOG` is set. With `[telemetry]
//! otlp_endpoint`, `sendgate run` also exports its spans
//! ([`crate::amqp::trace`]) over OTLP/HTTP, whatever the log level.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Subscriber;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, LogSettings, TelemetrySettings};

/// Installs the global subscriber (once; later calls are ignored). Logs go
/// to stderr, leaving stdout to command output.
pub fn init(settings: &LogSettings) {
    let _ = tracing_subscriber::registry()
        .with(log_layer(settings))
        .try_init();
}

/// The trace exporter, flushed and shut down when dropped.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Drop for Traces {
    fn drop(&mut self) {
        if let Err(err) = self.provider.shutdown() {
            eprintln!("sendgate: cannot flush the last spans to the trace collector: {err}");
        }
    }
}

/// Why traces cannot be exported.
#[derive(Debug, thiserror::Error)]
#[error("telemetry.otlp_endpoint: cannot export traces to {url}: {source}")]
pub struct TracesError {
    url: String,
    source: opentelemetry_otlp::ExporterBuildError,
}

/// As [`init`], and exports spans to `[telemetry] otlp_endpoint` when it is
/// set (`None` when it is not). Keep the [`Traces`] until the end: dropping
/// it sends the spans not sent yet.
///
/// # Errors
/// The exporter cannot be built with these settings.
pub fn init_with_traces(
    log: &LogSettings,
    telemetry: &TelemetrySettings,
) -> Result<Option<Traces>, TracesError> {
    let Some(url) = telemetry.traces_url() else {
        init(log);
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(&url)
        .build()
        .map_err(|source| TracesError {
            url: url.clone(),
            source,
        })?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            telemetry.sample_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(telemetry.service_name.clone())
                .build(),
        )
        .build();
    // Only sendgate's own spans, at any log level.
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("sendgate"))
        .with_filter(Targets::new().with_target(crate::amqp::trace::TARGET, LevelFilter::INFO));
    let installed = tracing_subscriber::registry()
        .with(log_layer(log))
        .with(spans)
        .try_init()
        .is_ok();
    if installed {
        crate::amqp::trace::set_exporting();
        tracing::info!(url = %url, sample_ratio = telemetry.sample_ratio, "exporting traces");
    }
    Ok(Some(Traces { provider }))
}

/// The log lines' layer: the format asked for, filtered by level.
fn log_layer<S>(settings: &LogSettings) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Postgres notices ("relation already exists, skipping") are noise.
    if let Ok(quiet) = "sqlx::postgres::notice=warn".parse() {
        filter = filter.add_directive(quiet);
    }
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match settings.format {
        LogFormat::Json => layer.json().flatten_event(true).with_filter(filter).boxed(),
        LogFormat::Pretty => layer.with_filter(filter).boxed(),
    }
}
