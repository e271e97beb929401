//! Settings: `config/default.toml` (compiled in), then an optional file given
//! with `--config`, then `SENDGATE__SECTION__KEY` environment variables, then
//! `DATABASE_URL` and `AMQP_URL`.
//!
//! Every section denies unknown keys and [`Settings::validate`] checks ranges,
//! so a typo or a bad value stops start-up with a message naming the setting.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::domain::plan::OnLimit;
use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// The first of (setting, value, min, max) outside its range, named.
fn within_bounds(bounds: &[(&'static str, u64, u64, u64)]) -> Result<(), ConfigError> {
    for &(setting, value, min, max) in bounds {
        if value < min || value > max {
            return Err(invalid(
                setting,
                format!("is {value}; must be between {min} and {max}"),
            ));
        }
    }
    Ok(())
}

fn invalid(setting: impl Into<Cow<'static, str>>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting: setting.into(),
        problem: problem.into(),
    }
}

/// The defaults, compiled into the binary so it runs from any directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Why settings could not be loaded. The message always names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: setting `{setting}` {problem}")]
    Invalid {
        /// The setting's name, as written in the file (`section.key`).
        setting: Cow<'static, str>,
        problem: String,
    },
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub http: HttpSettings,
    pub plans: PlanSettings,
    pub jobs: JobSettings,
    pub usage: UsageSettings,
    pub gate: GateSettings,
    pub shutdown: ShutdownSettings,
    pub log: LogSettings,
    pub reservations: ReservationSettings,
    pub api: ApiSettings,
    pub events: EventSettings,
    pub audit: AuditSettings,
    pub telemetry: TelemetrySettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// The OTLP/HTTP collector's base URL (`/v1/traces` is added); empty:
    /// no traces are made or exported.
    pub otlp_endpoint: String,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// The share of traces started here (jobs published without trace
    /// context) that are sampled; a publisher's decision is followed.
    pub sample_ratio: f64,
}

impl TelemetrySettings {
    /// Where spans are exported, if anywhere.
    pub fn traces_url(&self) -> Option<String> {
        (!self.otlp_endpoint.is_empty())
            .then(|| format!("{}/v1/traces", self.otlp_endpoint.trim_end_matches('/')))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// How often each process audits the money's invariants (0: never;
    /// `sendgate audit` still does on demand).
    pub interval_secs: u64,
}

impl AuditSettings {
    /// `None`: no background audit.
    pub fn interval(&self) -> Option<Duration> {
        (self.interval_secs > 0).then(|| Duration::from_secs(self.interval_secs))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    /// A free balance falling to or below each of these makes a
    /// `credits.low` event. A list in a file; in the environment, numbers
    /// separated by commas.
    #[serde(deserialize_with = "list_or_commas")]
    pub credits_low_thresholds: Vec<u32>,
    /// How often the relay looks for events written by other processes.
    pub relay_interval_ms: u64,
    /// Days a published event is kept in the outbox.
    pub retention_days: u64,
}

/// A list of numbers, or (from the environment, where every value is text)
/// the same numbers separated by commas.
fn list_or_commas<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Numbers {
        List(Vec<u32>),
        Text(String),
    }
    match Numbers::deserialize(deserializer)? {
        Numbers::List(list) => Ok(list),
        Numbers::Text(text) if text.trim().is_empty() => Ok(Vec::new()),
        Numbers::Text(text) => text
            .split(',')
            .map(|n| {
                n.trim().parse().map_err(|_| {
                    serde::de::Error::custom(format!(
                        "`{text}` is not a list of whole numbers separated by commas"
                    ))
                })
            })
            .collect(),
    }
}

impl EventSettings {
    pub fn relay_interval(&self) -> Duration {
        Duration::from_millis(self.relay_interval_ms)
    }

    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_days * 86_400)
    }

    /// The thresholds, highest first, each once.
    pub fn thresholds(&self) -> Vec<i64> {
        let mut thresholds: Vec<i64> = self
            .credits_low_thresholds
            .iter()
            .map(|t| i64::from(*t))
            .collect();
        thresholds.sort_unstable_by(|a, b| b.cmp(a));
        thresholds.dedup();
        thresholds
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// An admin-scope token named `default`, for the one-token case.
    pub token: Token,
    /// Named tokens, each with a scope; the name appears in logs and
    /// metrics, the token never.
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenSettings>,
    pub request_timeout_ms: u64,
    pub max_body_bytes: usize,
    pub max_concurrent_requests: usize,
}

/// One named API token.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    pub scope: Scope,
    /// The token itself, or …
    #[serde(default)]
    pub token: Token,
    /// … a file holding it (a Docker or Kubernetes secret); read at start-up.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Look: accounts, ledgers, capacity.
    Read,
    /// Look and change: create accounts, change plans.
    Admin,
}

/// A token ready for use: its name, scope and value.
#[derive(Debug, Clone)]
pub struct ApiToken {
    pub name: String,
    pub scope: Scope,
    pub token: Token,
}

/// The shortest token accepted.
pub const MIN_TOKEN_CHARS: usize = 16;

impl ApiSettings {
    /// Every configured token; none means the API is off.
    pub fn tokens(&self) -> Vec<ApiToken> {
        let default = (!self.token.is_empty()).then(|| ApiToken {
            name: "default".to_owned(),
            scope: Scope::Admin,
            token: self.token.clone(),
        });
        let named = self.tokens.iter().map(|(name, t)| ApiToken {
            name: name.clone(),
            scope: t.scope,
            token: t.token.clone(),
        });
        default.into_iter().chain(named).collect()
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Reads every `token_file` into its token.
    fn read_token_files(&mut self) -> Result<(), ConfigError> {
        for (name, t) in &mut self.tokens {
            let Some(path) = &t.token_file else { continue };
            let setting = format!("api.tokens.{name}.token_file");
            if !t.token.is_empty() {
                return Err(invalid(setting, "is set together with the token; set one"));
            }
            let text = std::fs::read_to_string(path).map_err(|err| {
                invalid(
                    setting,
                    format!("cannot be read ({}): {err}", path.display()),
                )
            })?;
            t.token = Token::new(text.trim_end_matches(['\n', '\r']));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let short = |token: &Token| token.len() < MIN_TOKEN_CHARS;
        if !self.token.is_empty() && short(&self.token) {
            return Err(invalid(
                "api.token",
                format!("must be at least {MIN_TOKEN_CHARS} characters"),
            ));
        }
        for (name, t) in &self.tokens {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(invalid(
                    format!("api.tokens.{name}"),
                    "names are letters, digits, `-` and `_`",
                ));
            }
            if short(&t.token) {
                let setting = format!("api.tokens.{name}.token");
                return Err(invalid(
                    setting,
                    format!("must be at least {MIN_TOKEN_CHARS} characters (or set token_file)"),
                ));
            }
        }
        let bounds = [
            (
                "api.request_timeout_ms",
                self.request_timeout_ms,
                1,
                600_000,
            ),
            (
                "api.max_body_bytes",
                self.max_body_bytes as u64,
                1,
                16 << 20,
            ),
            (
                "api.max_concurrent_requests",
                self.max_concurrent_requests as u64,
                1,
                10_000,
            ),
        ];
        within_bounds(&bounds)
    }
}

/// The account API's bearer token: never printed, compared in constant time.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Token(SecretString);

impl Token {
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.expose_secret().is_empty()
    }

    fn len(&self) -> usize {
        self.0.expose_secret().chars().count()
    }

    /// The token itself, to present it (`sendgate ctl`); never to log.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// True when `presented` is the token; takes the same time wherever the
    /// two differ.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.expose_secret().as_bytes(), presented.as_bytes());
        let mut diff = a.len() ^ b.len();
        for (i, x) in a.iter().enumerate() {
            diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
        }
        !self.is_empty() && diff == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_empty() { "<none>" } else { "***" })
    }
}

impl Serialize for Token {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.is_empty() { "" } else { "***" })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationSettings {
    pub hold_secs: u64,
    pub sweep_interval_secs: u64,
    /// How long a Pro or Scale charge at least is remembered (0: forever).
    pub dedup_window_secs: u64,
}

impl ReservationSettings {
    pub fn hold(&self) -> Duration {
        Duration::from_secs(self.hold_secs)
    }

    pub fn sweep_interval(&self) -> Duration {
        Duration::from_secs(self.sweep_interval_secs.max(1))
    }

    /// The deduplication window of Pro and Scale charges; `None` keeps
    /// every charge forever.
    pub fn dedup_window(&self) -> Option<Duration> {
        (self.dedup_window_secs > 0).then(|| Duration::from_secs(self.dedup_window_secs))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: Secret,
    /// Whether `run` creates the database and applies migrations itself.
    /// Off when `run` connects as the runtime role, which may not.
    pub migrate_on_start: bool,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
    pub statement_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    pub url: Secret,
    /// A PEM file of CA certificates to verify an `amqps://` broker with
    /// (empty: the system's roots).
    pub ca_file: String,
    /// Jobs published through the default exchange (the older way).
    pub send_queue: String,
    /// Jobs in: a fanout exchange feeding the consistent-hash exchange
    /// `{jobs_exchange}.partitions`, which spreads accounts (the routing
    /// key) over the partitions.
    pub jobs_exchange: String,
    /// How many partitions: quorum queues `{send_queue}.0` … `.{n-1}`.
    pub partitions: u16,
    pub delivery_queue: String,
    /// A fanout exchange bound to the outcomes queue, for delivery workers
    /// likewise.
    pub reports_exchange: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    /// Threshold events: a topic exchange, and the queue bound to it (none
    /// when empty).
    pub events_exchange: String,
    pub events_queue: String,
    pub prefetch: u16,
    pub delivery_limit: u32,
    pub heartbeat_secs: u16,
    pub publish_timeout_ms: u64,
    pub depth_poll_secs: u64,
    pub outcomes_queue: String,
    pub deferred_queue: String,
    /// The longest a deferred job waits in one step of the deferral ladder.
    pub deferral_longest_step_secs: u64,
    /// Copies whose charge's forward may still be on its way wait here.
    pub wait_queue: String,
    /// How long a waiting copy waits before it is decided again.
    pub copy_wait_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    /// A request's header must be complete this long after the connection
    /// began waiting for it (idle keep-alive connections included).
    pub header_read_timeout_secs: u64,
    /// Connections open at once; more are closed when accepted.
    pub max_connections: usize,
}

impl HttpSettings {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSettings {
    pub free: FreePlanSettings,
    pub pro: ProPlanSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FreePlanSettings {
    pub signup_credits: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProPlanSettings {
    pub daily_sends: u32,
    pub on_limit: OnLimit,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobSettings {
    pub max_body_bytes: usize,
    /// Largest properties and headers of a job or report, encoded.
    pub max_header_bytes: usize,
    /// How long a key's latest refusal is kept for job status.
    pub refusal_retention_days: u64,
}

impl JobSettings {
    pub fn refusal_retention(&self) -> Duration {
        Duration::from_secs(self.refusal_retention_days * 86_400)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UsageSettings {
    /// How long usage counts are kept, in days.
    pub retention_days: u64,
}

impl UsageSettings {
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_days * 86_400)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GateSettings {
    pub batch_size: usize,
    pub batch_wait_ms: u64,
    pub concurrent_batches: usize,
    pub consumers: usize,
    /// How long a charge's forward is presumed on its way: a copy of the
    /// job waits that long for its confirmation before forwarding again.
    pub forward_lease_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    pub grace_period_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
    pub decisions: DecisionLogLevel,
}

/// The level of the one log line each job's decision gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionLogLevel {
    Debug,
    Info,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// A connection string that never prints its credentials: `Debug` and
/// `Serialize` (config dumps) both show it redacted.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(SecretString);

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

/// Query parameters that carry credentials in a connection string.
const SECRET_PARAMETERS: [&str; 3] = ["password", "sslpassword", "passfile"];

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// The full value, credentials included: only for opening connections.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// The value with its password and credential parameters (`?password=`
    /// and the like) replaced by `***`, fit for logs; a list of servers as
    /// one redacted URL per server.
    pub fn redacted(&self) -> String {
        crate::endpoints::servers(self.expose())
            .iter()
            .map(|server| redact(server))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// One server's URL with its password and credential parameters hidden.
fn redact(value: &str) -> String {
    let Ok(mut url) = url::Url::parse(value) else {
        return "<unparsable connection string>".to_owned();
    };
    if url.password().is_some() {
        // Setting a password only fails for URLs that cannot have one,
        // and this one just had one.
        let _ = url.set_password(Some("***"));
    }
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let hidden = SECRET_PARAMETERS.contains(&k.to_ascii_lowercase().as_str());
            (
                k.into_owned(),
                if hidden {
                    "***".to_owned()
                } else {
                    v.into_owned()
                },
            )
        })
        .collect();
    if !pairs.is_empty() {
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Settings {
    /// Loads the layered settings: defaults, `file`, `SENDGATE__…`, then
    /// `DATABASE_URL` and `AMQP_URL`.
    ///
    /// # Errors
    /// A missing or unreadable file, an unknown key, a value of the wrong type
    /// or out of range; the message names the setting.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        // A variable that is not UTF-8 cannot be a setting of ours; skipping
        // it keeps one stray variable from stopping start-up.
        let vars = std::env::vars_os()
            .filter_map(|(key, value)| Some((key.into_string().ok()?, value.into_string().ok()?)));
        Self::load_from(file, vars)
    }

    /// [`Settings::load`] with the environment passed in, for tests.
    ///
    /// # Errors
    /// As [`Settings::load`].
    pub fn load_from(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        let vars: config::Map<String, String> = vars.into_iter().collect();
        let var = |name: &str| vars.get(name).cloned();
        let env: config::Map<String, String> = vars
            .iter()
            .filter(|(key, _)| key.starts_with("SENDGATE__"))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix("SENDGATE")
                .prefix_separator("__")
                .separator("__")
                // Taken literally: a token such as `007` or `1e3` stays text;
                // numeric settings still read numbers from text.
                .try_parsing(false)
                .source(Some(env)),
        );
        if let Some(url) = var("DATABASE_URL") {
            builder = builder.set_override("database.url", url)?;
        }
        if let Some(url) = var("AMQP_URL") {
            builder = builder.set_override("amqp.url", url)?;
        }
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        settings.api.read_token_files()?;
        settings.validate()?;
        Ok(settings)
    }

    /// The plan rules a batch is decided by.
    pub fn limits(&self) -> crate::domain::plan::Limits {
        crate::domain::plan::Limits {
            signup_credits: i64::from(self.plans.free.signup_credits),
            daily_sends: i64::from(self.plans.pro.daily_sends),
            on_limit: self.plans.pro.on_limit,
        }
    }

    /// Checks what the types alone cannot.
    ///
    /// # Errors
    /// The first setting out of its range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_connections()?;
        self.validate_amqp()?;
        self.validate_durations()?;
        self.validate_telemetry()?;
        let r = &self.reservations;
        if r.dedup_window_secs > 0
            && r.dedup_window_secs < r.hold_secs.saturating_add(r.sweep_interval_secs)
        {
            // A charge still held (or not yet committed by a sweep) must
            // never be removed.
            return Err(invalid(
                "reservations.dedup_window_secs",
                format!(
                    "must be 0 (keep every charge) or at least reservations.hold_secs + \
                     reservations.sweep_interval_secs ({} s)",
                    r.hold_secs.saturating_add(r.sweep_interval_secs)
                ),
            ));
        }
        self.api.validate()?;
        if self.jobs.max_body_bytes == 0 {
            return Err(invalid("jobs.max_body_bytes", "must be at least 1"));
        }
        // Room under RabbitMQ's smallest usual frame_max (128 KiB) for the
        // headers sendgate adds.
        if !(1024..=65_536).contains(&self.jobs.max_header_bytes) {
            return Err(invalid(
                "jobs.max_header_bytes",
                "must be between 1024 and 65536 (the broker's frame_max must hold it and \
                 the headers sendgate adds)",
            ));
        }
        let thresholds = &self.events.credits_low_thresholds;
        if thresholds.len() > 10 || thresholds.iter().any(|t| *t == 0 || *t > 1_000_000) {
            return Err(invalid(
                "events.credits_low_thresholds",
                "must be at most 10 numbers from 1 to 1000000 (0 is credits.exhausted)",
            ));
        }
        if self.gate.batch_size == 0 || self.gate.batch_size > 10_000 {
            return Err(invalid("gate.batch_size", "must be between 1 and 10000"));
        }
        if self.gate.concurrent_batches == 0 || self.gate.concurrent_batches > 16 {
            return Err(invalid(
                "gate.concurrent_batches",
                "must be between 1 and 16",
            ));
        }
        if self.http.max_connections == 0 || self.http.max_connections > 100_000 {
            return Err(invalid(
                "http.max_connections",
                "must be between 1 and 100000",
            ));
        }
        if self.gate.consumers == 0 || self.gate.consumers > 64 {
            return Err(invalid("gate.consumers", "must be between 1 and 64"));
        }
        if self.gate.forward_lease_secs.saturating_mul(1000) < 2 * self.amqp.publish_timeout_ms {
            return Err(invalid(
                "gate.forward_lease_secs",
                format!(
                    "must be at least twice amqp.publish_timeout_ms ({} ms): a forward still \
                     waiting for its confirmation must not be presumed abandoned",
                    self.amqp.publish_timeout_ms
                ),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!("`{}` is not a level filter", self.log.level),
            ));
        }
        Ok(())
    }

    /// Every duration within a range that makes sense, so none can
    /// overflow a deadline (`Instant + Duration`) at run time.
    fn validate_durations(&self) -> Result<(), ConfigError> {
        const MINUTE_MS: u64 = 60_000;
        const DAY_SECS: u64 = 86_400;
        #[rustfmt::skip]
        let bounds: [(&'static str, u64, u64, u64); 19] = [
            ("audit.interval_secs", self.audit.interval_secs, 0, DAY_SECS),
            ("events.relay_interval_ms", self.events.relay_interval_ms, 10, 10 * MINUTE_MS),
            // At least two days: a day's `daily_limit.reached` is kept (and
            // so not made again) until the day is over everywhere.
            ("events.retention_days", self.events.retention_days, 2, 3_650),
            ("gate.batch_wait_ms", self.gate.batch_wait_ms, 0, MINUTE_MS),
            ("http.header_read_timeout_secs", self.http.header_read_timeout_secs, 1, 600),
            ("gate.forward_lease_secs", self.gate.forward_lease_secs, 1, DAY_SECS),
            ("amqp.copy_wait_ms", self.amqp.copy_wait_ms, 10, MINUTE_MS),
            ("amqp.deferral_longest_step_secs", self.amqp.deferral_longest_step_secs, 1, DAY_SECS),
            ("amqp.publish_timeout_ms", self.amqp.publish_timeout_ms, 1, 10 * MINUTE_MS),
            ("amqp.heartbeat_secs", u64::from(self.amqp.heartbeat_secs), 0, 3_600),
            ("amqp.depth_poll_secs", self.amqp.depth_poll_secs, 0, DAY_SECS),
            ("database.acquire_timeout_ms", self.database.acquire_timeout_ms, 1, 10 * MINUTE_MS),
            ("database.statement_timeout_ms", self.database.statement_timeout_ms, 0, 60 * MINUTE_MS),
            ("reservations.hold_secs", self.reservations.hold_secs, 1, 365 * DAY_SECS),
            ("jobs.refusal_retention_days", self.jobs.refusal_retention_days, 1, 3_650),
            ("usage.retention_days", self.usage.retention_days, 1, 36_500),
            ("reservations.sweep_interval_secs", self.reservations.sweep_interval_secs, 1, DAY_SECS),
            ("reservations.dedup_window_secs", self.reservations.dedup_window_secs, 0, 100 * 365 * DAY_SECS),
            ("shutdown.grace_period_secs", self.shutdown.grace_period_secs, 0, 3_600),
        ];
        within_bounds(&bounds)
    }

    fn validate_telemetry(&self) -> Result<(), ConfigError> {
        let telemetry = &self.telemetry;
        if !telemetry.otlp_endpoint.is_empty() {
            match url::Url::parse(&telemetry.otlp_endpoint) {
                Ok(url) if ["http", "https"].contains(&url.scheme()) => {}
                Ok(url) => {
                    return Err(invalid(
                        "telemetry.otlp_endpoint",
                        format!(
                            "has scheme `{}`, expected http or https (OTLP over HTTP)",
                            url.scheme()
                        ),
                    ));
                }
                Err(err) => {
                    return Err(invalid(
                        "telemetry.otlp_endpoint",
                        format!("is not a URL: {err}"),
                    ));
                }
            }
        }
        if telemetry.service_name.trim().is_empty() {
            return Err(invalid("telemetry.service_name", "must not be empty"));
        }
        if !(0.0..=1.0).contains(&telemetry.sample_ratio) {
            return Err(invalid("telemetry.sample_ratio", "must be between 0 and 1"));
        }
        Ok(())
    }

    fn validate_connections(&self) -> Result<(), ConfigError> {
        let url_scheme =
            |value: &str, setting: &'static str, schemes: &[&str]| match url::Url::parse(value) {
                Ok(url) if schemes.contains(&url.scheme()) => Ok(url),
                Ok(url) => Err(invalid(
                    setting,
                    format!(
                        "has scheme `{}`, expected one of {}",
                        url.scheme(),
                        schemes.join(", ")
                    ),
                )),
                Err(err) => Err(invalid(setting, format!("is not a URL: {err}"))),
            };
        let hosts = crate::endpoints::postgres_hosts(self.database.url.expose())
            .map_err(|problem| invalid("database.url", problem))?;
        for host in &hosts {
            url_scheme(host, "database.url", &["postgres", "postgresql"])?;
        }
        let nodes = crate::endpoints::amqp_nodes(self.amqp.url.expose());
        if nodes.is_empty() {
            return Err(invalid("amqp.url", "names no broker node"));
        }
        let mut vhost = None;
        for node in nodes {
            let url = url_scheme(node, "amqp.url", &["amqp", "amqps"])?;
            // Every node must lead to the same queues.
            match vhost {
                None => vhost = Some(url.path().to_owned()),
                Some(ref first) if *first != url.path() => {
                    return Err(invalid(
                        "amqp.url",
                        format!(
                            "lists nodes with different vhosts ({first} and {}): \
                             every node of a cluster must name the same vhost",
                            url.path()
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        Ok(())
    }

    fn validate_amqp(&self) -> Result<(), ConfigError> {
        if !self.amqp.ca_file.is_empty() {
            std::fs::read_to_string(&self.amqp.ca_file)
                .map_err(|err| invalid("amqp.ca_file", format!("cannot be read: {err}")))?;
        }
        for (setting, name) in [
            ("amqp.send_queue", &self.amqp.send_queue),
            ("amqp.delivery_queue", &self.amqp.delivery_queue),
            ("amqp.dead_letter_exchange", &self.amqp.dead_letter_exchange),
            ("amqp.jobs_exchange", &self.amqp.jobs_exchange),
            ("amqp.reports_exchange", &self.amqp.reports_exchange),
            ("amqp.dead_letter_queue", &self.amqp.dead_letter_queue),
            ("amqp.outcomes_queue", &self.amqp.outcomes_queue),
            ("amqp.deferred_queue", &self.amqp.deferred_queue),
            ("amqp.wait_queue", &self.amqp.wait_queue),
            ("amqp.events_exchange", &self.amqp.events_exchange),
        ] {
            if name.is_empty() || name.len() > 255 {
                return Err(invalid(setting, "must be 1 to 255 bytes long"));
            }
        }
        if self.amqp.events_queue.len() > 255 {
            return Err(invalid(
                "amqp.events_queue",
                "must be at most 255 bytes long",
            ));
        }
        // Room for the partitions' suffixes (`.partitions`, `.1023`).
        for (setting, name) in [
            ("amqp.send_queue", &self.amqp.send_queue),
            ("amqp.jobs_exchange", &self.amqp.jobs_exchange),
        ] {
            if name.len() > 240 {
                return Err(invalid(setting, "must be at most 240 bytes long"));
            }
        }
        if !(1..=1024).contains(&self.amqp.partitions) {
            return Err(invalid("amqp.partitions", "must be 1 to 1024"));
        }
        if self.amqp.send_queue == self.amqp.delivery_queue {
            return Err(invalid(
                "amqp.delivery_queue",
                "must differ from amqp.send_queue",
            ));
        }
        if self.amqp.prefetch == 0 {
            return Err(invalid("amqp.prefetch", "must be at least 1"));
        }
        if self.amqp.delivery_limit == 0 {
            return Err(invalid("amqp.delivery_limit", "must be at least 1"));
        }
        Ok(())
    }
}

impl DatabaseSettings {
    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.acquire_timeout_ms)
    }
}

/// The deferral ladder of `[amqp] deferred_queue` = `prefix` and
/// `deferral_longest_step_secs` = `longest` (see
/// [`AmqpSettings::deferral_steps`]).
pub fn deferral_steps(prefix: &str, longest: u64) -> Vec<(Duration, String)> {
    std::iter::successors(Some(1u64), |secs| secs.checked_mul(4))
        .take_while(|secs| *secs <= longest)
        .map(|secs| (Duration::from_secs(secs), format!("{prefix}.{secs}s")))
        .collect()
}

impl AmqpSettings {
    /// The steps of the deferral ladder, shortest first: queues named
    /// `{deferred_queue}.{secs}s` whose messages all wait the same time (1
    /// s, then 4 times longer each, up to `deferral_longest_step_secs`).
    pub fn deferral_steps(&self) -> Vec<(Duration, String)> {
        deferral_steps(&self.deferred_queue, self.deferral_longest_step_secs)
    }

    /// `None` when polling queue depths is switched off.
    pub fn depth_poll(&self) -> Option<Duration> {
        (self.depth_poll_secs > 0).then(|| Duration::from_secs(self.depth_poll_secs))
    }

    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    /// The partitions' queues, in partition order.
    pub fn partition_queues(&self) -> Vec<String> {
        (0..self.partitions)
            .map(|i| format!("{}.{i}", self.send_queue))
            .collect()
    }

    /// Every queue jobs are taken from: the send queue (jobs published the
    /// older way, and jobs coming back from the wait queue and the deferral
    /// ladder), then the partitions.
    pub fn job_queues(&self) -> Vec<String> {
        std::iter::once(self.send_queue.clone())
            .chain(self.partition_queues())
            .collect()
    }

    /// The deferral ladder jobs take now: queues `{deferred_queue}.p.{secs}s`
    /// that return each job through the jobs exchange to its account's
    /// partition. ([`AmqpSettings::deferral_steps`] are the ladder of
    /// versions before partitions, which returns to the send queue: still
    /// declared, so what waits there comes back.)
    pub fn partition_ladder(&self) -> Vec<(Duration, String)> {
        deferral_steps(
            &format!("{}.p", self.deferred_queue),
            self.deferral_longest_step_secs,
        )
    }

    /// Where copies wait now: returns them to their account's partition
    /// (`wait_queue` itself returns to the send queue, as before
    /// partitions).
    pub fn partition_wait_queue(&self) -> String {
        format!("{}.p", self.wait_queue)
    }

    /// The headers exchange that puts a job into the wait queue or a step
    /// of the ladder (header `sendgate-hold` = the queue) while keeping
    /// its account as routing key, which the queue's dead-lettering keeps
    /// when it returns the job through the jobs exchange.
    pub fn hold_exchange(&self) -> String {
        format!("{}.hold", self.jobs_exchange)
    }

    /// The consistent-hash exchange behind `jobs_exchange`.
    pub fn partitions_exchange(&self) -> String {
        format!("{}.partitions", self.jobs_exchange)
    }
}

impl GateSettings {
    pub fn batch_wait(&self) -> Duration {
        Duration::from_millis(self.batch_wait_ms)
    }

    pub fn forward_lease(&self) -> Duration {
        Duration::from_secs(self.forward_lease_secs)
    }
}

impl ShutdownSettings {
    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::load_from(None, env)
    }

    #[test]
    fn the_compose_env_file_turns_the_api_on_with_an_admin_and_a_read_token() {
        let file = include_str!("../config/compose.env");
        let env: Vec<(String, String)> = file
            .lines()
            .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
            .map(|line| {
                let (key, value) = line.split_once('=').expect("KEY=value");
                (key.to_owned(), value.to_owned())
            })
            .collect();
        let settings = Settings::load_from(None, env).expect("compose's tokens are valid");
        let mut tokens: Vec<(String, Scope)> = settings
            .api
            .tokens()
            .into_iter()
            .map(|t| (t.name, t.scope))
            .collect();
        tokens.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            tokens,
            [
                ("dashboard".to_owned(), Scope::Read),
                ("default".to_owned(), Scope::Admin)
            ]
        );
    }

    #[test]
    fn defaults_load_and_match_the_contract() {
        let settings = load(&[]).expect("defaults are valid");
        assert_eq!(settings.http.listen.to_string(), "0.0.0.0:9400");
        assert_eq!(settings.amqp.send_queue, "sendgate.send");
        assert_eq!(settings.amqp.prefetch, 500);
        assert_eq!(settings.plans.free.signup_credits, 20);
        assert_eq!(settings.plans.pro.daily_sends, 20);
        assert_eq!(settings.jobs.max_body_bytes, 65536);
    }

    #[test]
    fn environment_overrides_nested_settings() {
        let settings = load(&[
            ("SENDGATE__AMQP__PREFETCH", "42"),
            ("SENDGATE__PLANS__FREE__SIGNUP_CREDITS", "3"),
            ("SENDGATE__HTTP__LISTEN", "127.0.0.1:1234"),
            ("DATABASE_URL", "postgres://u:p@db:5432/x"),
        ])
        .expect("valid overrides");
        assert_eq!(settings.amqp.prefetch, 42);
        assert_eq!(settings.plans.free.signup_credits, 3);
        assert_eq!(settings.http.listen.to_string(), "127.0.0.1:1234");
        assert_eq!(settings.database.url.expose(), "postgres://u:p@db:5432/x");
    }

    #[test]
    fn an_unknown_setting_is_named() {
        let err = load(&[("SENDGATE__AMQP__PREFECTH", "1")]).expect_err("typo is refused");
        assert!(err.to_string().contains("prefecth"), "{err}");
    }

    #[test]
    fn credit_thresholds_are_a_list_in_files_and_commas_in_the_environment() {
        let settings = load(&[]).expect("defaults");
        assert_eq!(settings.events.thresholds(), [5]);
        let settings =
            load(&[("SENDGATE__EVENTS__CREDITS_LOW_THRESHOLDS", "5, 10,5")]).expect("a list");
        assert_eq!(settings.events.thresholds(), [10, 5]);
        let none = load(&[("SENDGATE__EVENTS__CREDITS_LOW_THRESHOLDS", "")]).expect("none");
        assert!(none.events.thresholds().is_empty());
        for bad in ["ten", "0", "5,-1", "2000000"] {
            let err =
                load(&[("SENDGATE__EVENTS__CREDITS_LOW_THRESHOLDS", bad)]).expect_err("refused");
            assert!(
                err.to_string().contains("events.credits_low_thresholds"),
                "{bad}: {err}"
            );
        }
        let err = load(&[("SENDGATE__EVENTS__RETENTION_DAYS", "1")]).expect_err("refused");
        assert!(err.to_string().contains("events.retention_days"), "{err}");
    }

    #[test]
    fn the_dedup_window_outlasts_a_hold_or_is_off() {
        let settings = load(&[]).expect("defaults");
        assert_eq!(
            settings.reservations.dedup_window(),
            Some(Duration::from_secs(7 * 86_400))
        );
        let off = load(&[("SENDGATE__RESERVATIONS__DEDUP_WINDOW_SECS", "0")]).expect("off");
        assert_eq!(off.reservations.dedup_window(), None);
        let err = load(&[("SENDGATE__RESERVATIONS__DEDUP_WINDOW_SECS", "86400")])
            .expect_err("shorter than a hold and a sweep");
        assert!(
            err.to_string().contains("reservations.dedup_window_secs"),
            "{err}"
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named() {
        let err = load(&[("SENDGATE__AMQP__PREFETCH", "lots")]).expect_err("refused");
        assert!(err.to_string().contains("amqp.prefetch"), "{err}");
    }

    #[test]
    fn an_out_of_range_value_is_named() {
        let err = load(&[("SENDGATE__GATE__BATCH_SIZE", "0")]).expect_err("refused");
        assert!(err.to_string().contains("gate.batch_size"), "{err}");
    }

    #[test]
    fn durations_that_would_overflow_a_deadline_are_refused_by_name() {
        for (variable, setting) in [
            ("SENDGATE__GATE__BATCH_WAIT_MS", "gate.batch_wait_ms"),
            (
                "SENDGATE__AMQP__PUBLISH_TIMEOUT_MS",
                "amqp.publish_timeout_ms",
            ),
            (
                "SENDGATE__SHUTDOWN__GRACE_PERIOD_SECS",
                "shutdown.grace_period_secs",
            ),
            (
                "SENDGATE__RESERVATIONS__HOLD_SECS",
                "reservations.hold_secs",
            ),
        ] {
            let err = load(&[(variable, "18446744073709551615")]).expect_err("refused");
            assert!(err.to_string().contains(setting), "{variable}: {err}");
        }
    }

    #[test]
    fn a_config_dump_redacts_passwords() {
        let settings = load(&[("DATABASE_URL", "postgres://u:hunter2@db/x")]).expect("valid");
        let dump = serde_json::to_string(&settings).expect("serializable");
        assert!(!dump.contains("hunter2"), "{dump}");
        assert!(dump.contains("postgres://u:***@db/x"), "{dump}");
    }

    #[test]
    fn server_lists_are_accepted_and_redacted_per_server() {
        let settings = load(&[
            (
                "DATABASE_URL",
                "postgres://u:hunter2@h1:5432,h2:5433/x?target_session_attrs=read-write",
            ),
            (
                "AMQP_URL",
                "amqp://u:secret@r1:5672/%2f,amqp://u:secret@r2:5672/%2f",
            ),
        ])
        .expect("valid lists");
        let dump = serde_json::to_string(&settings).expect("serializable");
        assert!(
            !dump.contains("hunter2") && !dump.contains("secret"),
            "{dump}"
        );
        assert!(
            dump.contains("postgres://u:***@h1:5432/x,postgres://u:***@h2:5433/x"),
            "{dump}"
        );
        assert!(
            dump.contains("amqp://u:***@r1:5672/%2f,amqp://u:***@r2:5672/%2f"),
            "{dump}"
        );
    }

    #[test]
    fn server_lists_that_cannot_work_are_named() {
        let cases = [
            (
                "AMQP_URL",
                "amqp://r1/%2f,amqp://r2/other",
                "amqp.url",
                "same vhost",
            ),
            ("AMQP_URL", "amqp://r1/%2f,http://r2/", "amqp.url", "scheme"),
            ("AMQP_URL", ",", "amqp.url", "no broker node"),
            (
                "DATABASE_URL",
                "postgres://h1,h2/x?target_session_attrs=read-only",
                "database.url",
                "writable",
            ),
            (
                "DATABASE_URL",
                "postgres://h1,,h2/x",
                "database.url",
                "empty host",
            ),
        ];
        for (variable, value, setting, problem) in cases {
            let err = load(&[(variable, value)]).expect_err("refused").to_string();
            assert!(
                err.contains(setting) && err.contains(problem),
                "{value}: {err}"
            );
        }
    }

    #[test]
    fn environment_values_are_taken_literally_and_numbers_still_read() {
        let settings = load(&[
            ("SENDGATE__API__TOKEN", "0070000000000001e3"),
            ("SENDGATE__AMQP__PREFETCH", "321"),
        ])
        .expect("valid");
        assert!(settings.api.token.matches("0070000000000001e3"));
        assert_eq!(settings.amqp.prefetch, 321);
    }

    #[test]
    fn short_tokens_unreadable_token_files_and_bad_scopes_are_named() {
        let err = load(&[("SENDGATE__API__TOKEN", "short")]).expect_err("refused");
        assert!(err.to_string().contains("api.token"), "{err}");
        let err = load(&[
            ("SENDGATE__API__TOKENS__OPS__SCOPE", "read"),
            (
                "SENDGATE__API__TOKENS__OPS__TOKEN_FILE",
                "/nonexistent/token",
            ),
        ])
        .expect_err("refused");
        assert!(
            err.to_string().contains("api.tokens.ops.token_file"),
            "{err}"
        );
        let err = load(&[
            ("SENDGATE__API__TOKENS__OPS__SCOPE", "root"),
            ("SENDGATE__API__TOKENS__OPS__TOKEN", "a-long-enough-token"),
        ])
        .expect_err("refused");
        assert!(err.to_string().contains("scope"), "{err}");
    }

    #[test]
    fn credentials_in_query_parameters_are_redacted_too() {
        let secret = Secret::new("postgres://u@db/x?sslmode=require&password=hunter2");
        let shown = secret.redacted();
        assert!(
            !shown.contains("hunter2") && shown.contains("sslmode=require"),
            "{shown}"
        );
    }

    #[test]
    fn the_api_token_matches_only_itself_and_never_prints() {
        let token = Token::new("s3cret");
        assert!(token.matches("s3cret"));
        assert!(!token.matches("s3cre") && !token.matches("s3cretx") && !token.matches(""));
        assert!(!Token::default().matches(""));
        assert_eq!(format!("{token:?}"), "***");
    }

    #[test]
    fn secrets_are_redacted_when_printed() {
        let secret = Secret::new("postgres://user:hunter2@db:5432/sendgate");
        assert_eq!(
            format!("{secret:?}"),
            "postgres://user:***@db:5432/sendgate"
        );
        assert!(!secret.redacted().contains("hunter2"));
    }
}
