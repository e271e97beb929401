//! The one test harness: each test gets its own database and its own queue
//! names on the real Postgres and RabbitMQ ([`TestEnv`]), a client playing
//! the scheduler and the downstream ([`Broker`]), the gate in-process
//! ([`start_gate`]) or as the real binary ([`process`]), and helpers that
//! wait for an event instead of sleeping ([`eventually`]).

#![allow(dead_code, clippy::unwrap_used)]

pub mod ha;
pub mod process;
pub mod raw;
pub mod services;

#[allow(unused_imports)]
pub use process::{BIN, Process, cli, free_port};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::message::Delivery;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeleteOptions,
};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sendgate::app::App;
use sendgate::clock::{Clock, ManualClock};
use sendgate::config::Settings;
use sendgate::store::Store;
use sqlx::migrate::MigrateDatabase;
use tokio_util::sync::CancellationToken;

/// Where the tests' broker and database are, when not the defaults: the
/// private services of [`services`], once they run.
static TARGET: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();

/// Points every later `amqp_url()` and `pg_base_url()` at these.
pub fn target(amqp: String, postgres: String) {
    let _ = TARGET.set((amqp, postgres));
}

/// The broker: `AMQP_URL`, else RabbitMQ's default on localhost.
pub fn amqp_url() -> String {
    if let Some((amqp, _)) = TARGET.get() {
        return amqp.clone();
    }
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The Postgres server, without a database (each test creates its own):
/// `TEST_PG_URL`, else Postgres's default on localhost.
pub fn pg_base_url() -> String {
    if let Some((_, postgres)) = TARGET.get() {
        return postgres.clone();
    }
    std::env::var("TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432".into())
}

/// One test's isolated database and queues.
pub struct TestEnv {
    pub id: String,
    pub db_url: String,
    pub env: Vec<(String, String)>,
    /// Whether its database and queues are gone (else dropping removes them).
    cleaned: bool,
}

impl TestEnv {
    pub fn new() -> Self {
        // Logs show with `--nocapture`; RUST_LOG picks the level.
        sendgate::telemetry::init(&sendgate::config::LogSettings {
            format: sendgate::config::LogFormat::Pretty,
            level: "warn".to_owned(),
            decisions: sendgate::config::DecisionLogLevel::Debug,
        });
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let db_url = format!("{}/sendgate_test_{id}", pg_base_url());
        let env = vec![
            ("DATABASE_URL".to_owned(), db_url.clone()),
            ("AMQP_URL".to_owned(), amqp_url()),
            (
                "SENDGATE__HTTP__LISTEN".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
            (
                "SENDGATE__AMQP__SEND_QUEUE".to_owned(),
                format!("t.{id}.send"),
            ),
            (
                "SENDGATE__AMQP__DELIVERY_QUEUE".to_owned(),
                format!("t.{id}.delivery"),
            ),
            (
                "SENDGATE__AMQP__DEAD_LETTER_EXCHANGE".to_owned(),
                format!("t.{id}.dead"),
            ),
            (
                "SENDGATE__AMQP__DEAD_LETTER_QUEUE".to_owned(),
                format!("t.{id}.dead"),
            ),
            (
                "SENDGATE__AMQP__OUTCOMES_QUEUE".to_owned(),
                format!("t.{id}.outcomes"),
            ),
            (
                "SENDGATE__AMQP__DEFERRED_QUEUE".to_owned(),
                format!("t.{id}.deferred"),
            ),
            // Two steps of the deferral ladder (1 s and 4 s): fewer
            // queues to declare and delete per test.
            (
                "SENDGATE__AMQP__DEFERRAL_LONGEST_STEP_SECS".to_owned(),
                "4".to_owned(),
            ),
            (
                "SENDGATE__AMQP__WAIT_QUEUE".to_owned(),
                format!("t.{id}.wait"),
            ),
            // Short enough that a copy waiting for a crashed process's
            // forward is replayed within a test's patience.
            (
                "SENDGATE__AMQP__PUBLISH_TIMEOUT_MS".to_owned(),
                "2500".to_owned(),
            ),
            (
                "SENDGATE__GATE__FORWARD_LEASE_SECS".to_owned(),
                "5".to_owned(),
            ),
            ("SENDGATE__AMQP__COPY_WAIT_MS".to_owned(), "200".to_owned()),
            (
                "SENDGATE__AMQP__JOBS_EXCHANGE".to_owned(),
                format!("t.{id}.jobs"),
            ),
            // Four partitions: fewer queues to declare and delete per test.
            ("SENDGATE__AMQP__PARTITIONS".to_owned(), "4".to_owned()),
            (
                "SENDGATE__AMQP__EVENTS_EXCHANGE".to_owned(),
                format!("t.{id}.events"),
            ),
            (
                "SENDGATE__AMQP__EVENTS_QUEUE".to_owned(),
                format!("t.{id}.events"),
            ),
            (
                "SENDGATE__AMQP__REPORTS_EXCHANGE".to_owned(),
                format!("t.{id}.reports"),
            ),
            (
                "SENDGATE__SHUTDOWN__GRACE_PERIOD_SECS".to_owned(),
                "10".to_owned(),
            ),
            ("SENDGATE__LOG__LEVEL".to_owned(), "warn".to_owned()),
        ];
        TestEnv {
            id,
            db_url,
            env,
            cleaned: false,
        }
    }

    /// Adds or replaces a `SENDGATE__…` setting.
    pub fn set(&mut self, key: &str, value: &str) -> &mut Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn settings(&self) -> Settings {
        Settings::load_from(None, self.env.clone()).expect("test settings are valid")
    }

    /// A setting's value as this test sets it.
    fn var(&self, key: &str) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{key} is set"))
    }

    pub fn send_queue(&self) -> String {
        self.var("SENDGATE__AMQP__SEND_QUEUE")
    }
    pub fn delivery_queue(&self) -> String {
        self.var("SENDGATE__AMQP__DELIVERY_QUEUE")
    }
    pub fn dead_queue(&self) -> String {
        self.var("SENDGATE__AMQP__DEAD_LETTER_QUEUE")
    }
    pub fn outcomes_queue(&self) -> String {
        self.var("SENDGATE__AMQP__OUTCOMES_QUEUE")
    }
    pub fn deferred_queue(&self) -> String {
        self.var("SENDGATE__AMQP__DEFERRED_QUEUE")
    }
    pub fn events_queue(&self) -> String {
        self.var("SENDGATE__AMQP__EVENTS_QUEUE")
    }
    pub fn wait_queue(&self) -> String {
        self.var("SENDGATE__AMQP__WAIT_QUEUE")
    }

    /// A migrated store on this test's database.
    pub async fn store(&self) -> Store {
        let settings = self.settings();
        Store::create_database_if_missing(&self.db_url)
            .await
            .unwrap();
        let store = Store::for_settings(&settings).unwrap();
        store.locate_primary().await;
        store.migrate().await.unwrap();
        store
    }

    /// Starts a gate in this process with the given clock.
    pub async fn start_gate(&self, clock: Arc<dyn Clock>) -> RunningGate {
        start_gate(self.settings(), clock).await
    }

    pub async fn broker(&self) -> Broker {
        Broker::connect().await
    }

    /// Removes the test's queues and database (dropping it does too, so a
    /// test that fails leaves nothing behind).
    pub async fn cleanup(mut self) {
        self.remove().await;
        self.cleaned = true;
    }

    pub fn jobs_exchange(&self) -> String {
        self.var("SENDGATE__AMQP__JOBS_EXCHANGE")
    }

    /// The job queues: the send queue, then the partitions.
    pub fn job_queues(&self) -> Vec<String> {
        self.settings().amqp.job_queues()
    }

    async fn remove(&self) {
        let _ = sqlx::Postgres::force_drop_database(&self.db_url).await;
        // The queues go on the broker this test used (not reachable with a
        // plain client when it speaks TLS: a private node, dropped anyway).
        // A cluster's list of nodes: any one of them will do.
        let urls = self.var("AMQP_URL");
        let url = urls.split(',').next().unwrap_or_default();
        let Ok(connection) = Connection::connect(url, ConnectionProperties::default()).await else {
            return;
        };
        let broker = Broker::over(connection).await;
        // Not through settings(): a test may have removed a file they read.
        let longest = self
            .var("SENDGATE__AMQP__DEFERRAL_LONGEST_STEP_SECS")
            .parse()
            .unwrap();
        let held = format!("{}.p", self.deferred_queue());
        let ladder = sendgate::config::deferral_steps(&self.deferred_queue(), longest)
            .into_iter()
            .chain(sendgate::config::deferral_steps(&held, longest))
            .map(|(_, q)| q);
        let partitions: u16 = self.var("SENDGATE__AMQP__PARTITIONS").parse().unwrap();
        let send = self.send_queue();
        let partitions = (0..partitions).map(|i| format!("{send}.{i}"));
        for queue in [
            self.send_queue(),
            self.delivery_queue(),
            self.dead_queue(),
            self.outcomes_queue(),
            self.deferred_queue(),
            self.wait_queue(),
            format!("{}.p", self.wait_queue()),
            self.events_queue(),
        ]
        .into_iter()
        .chain(ladder)
        .chain(partitions)
        {
            let _ = broker
                .channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [
            self.var("SENDGATE__AMQP__DEAD_LETTER_EXCHANGE"),
            self.var("SENDGATE__AMQP__JOBS_EXCHANGE"),
            format!("{}.partitions", self.var("SENDGATE__AMQP__JOBS_EXCHANGE")),
            format!("{}.hold", self.var("SENDGATE__AMQP__JOBS_EXCHANGE")),
            self.var("SENDGATE__AMQP__REPORTS_EXCHANGE"),
            self.var("SENDGATE__AMQP__EVENTS_EXCHANGE"),
        ] {
            let _ = broker
                .channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        // A test that panicked (or returned early): its own runtime may be
        // gone, so the removal runs on a thread with one of its own.
        let env = TestEnv {
            id: self.id.clone(),
            db_url: self.db_url.clone(),
            env: self.env.clone(),
            cleaned: true,
        };
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(env.remove());
        })
        .join();
    }
}

pub struct RunningGate {
    pub stop: CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub http: SocketAddr,
}

impl RunningGate {
    pub async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("gate drains in time")
            .expect("gate task did not panic")
            .expect("gate exits cleanly");
    }
}

pub async fn start_gate(settings: Settings, clock: Arc<dyn Clock>) -> RunningGate {
    let stop = CancellationToken::new();
    let app = App::build(settings, clock, &stop)
        .await
        .expect("gate starts");
    let http = app.http_addr().unwrap();
    let handle = tokio::spawn(app.run(stop.clone()));
    // Ready means every worker is consuming.
    eventually(Duration::from_secs(20), || async move {
        http_get(http, "/readyz")
            .await
            .map(|(status, _)| status == 200)
            .unwrap_or(false)
    })
    .await;
    RunningGate { stop, handle, http }
}

pub fn manual_clock(at: &str) -> Arc<ManualClock> {
    Arc::new(ManualClock::new(utc(at)))
}

pub fn utc(at: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(at)
        .unwrap()
        .with_timezone(&Utc)
}

/// A client of the real broker, playing the scheduler and the downstream.
pub struct Broker {
    pub connection: Connection,
    pub channel: Channel,
}

/// What a scheduler's job carries: persistent JSON.
pub fn job_properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

impl Broker {
    pub async fn connect() -> Self {
        Broker::connect_to(&amqp_url()).await
    }

    /// A client on an open connection (a TLS one, say).
    pub async fn over(connection: Connection) -> Self {
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Broker {
            connection,
            channel,
        }
    }

    pub async fn connect_to(url: &str) -> Self {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("RabbitMQ is reachable");
        Broker::over(connection).await
    }

    /// Publishes a job as the scheduler does: persistent JSON through the
    /// default exchange, waiting for the broker's confirm.
    pub async fn publish(&self, queue: &str, body: &[u8], message_id: Option<&str>) {
        let mut properties = job_properties();
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.into());
        }
        self.publish_with(queue, body, properties).await;
    }

    /// Publishes a job as the scheduler does since partitions: through the
    /// jobs `exchange` with its account as routing key, waiting for the
    /// broker's confirm.
    pub async fn publish_for(&self, exchange: &str, account: &str, body: &[u8]) {
        self.publish_through(exchange, account, body, job_properties())
            .await;
    }

    /// Publishes with the given properties, waiting for the broker's confirm.
    pub async fn publish_with(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        self.publish_through("", queue, body, properties).await;
    }

    /// Publishes mandatory to `exchange` with `routing_key`, waiting for
    /// the broker's confirm; panics when it is refused or unroutable.
    async fn publish_through(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let confirmation = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirmation.is_ack(), "job was not accepted by the broker");
        assert!(confirmation.take_message().is_none(), "job was unroutable");
    }

    pub async fn publish_job(&self, queue: &str, account: &str, key: &str) -> Vec<u8> {
        let body = job_body(account, key);
        self.publish(queue, &body, None).await;
        body
    }

    /// Takes exactly `count` messages from `queue` (acking them), waiting up
    /// to `timeout`; panics with what it got if fewer arrive.
    pub async fn take(&self, queue: &str, count: usize, timeout: Duration) -> Vec<Delivery> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < count {
            match self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                Some(message) => got.push(message.delivery),
                None if Instant::now() > deadline => panic!(
                    "expected {count} messages in {queue}, got {} within {timeout:?}",
                    got.len()
                ),
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        got
    }

    /// Everything currently in `queue`, after waiting `settle` for stragglers.
    pub async fn take_all(&self, queue: &str, settle: Duration) -> Vec<Delivery> {
        tokio::time::sleep(settle).await;
        let mut got = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            got.push(message.delivery);
        }
        got
    }
}

pub fn job_body(account: &str, key: &str) -> Vec<u8> {
    serde_json::json!({
        "account_id": account,
        "idempotency_key": key,
        "campaign_id": "spring-launch",
        "recipient": "+4915112345678",
        "voice_note_url": "https://cdn.example.test/notes/42.ogg",
    })
    .to_string()
    .into_bytes()
}

pub fn header(delivery: &Delivery, name: &str) -> Option<String> {
    sendgate::amqp::header_text(&delivery.properties, name)
}

/// Polls `probe` until it holds, or panics after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if probe().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A GET: status code and body, or the error that kept it from answering.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    try_http_request(addr, "GET", path, None, None).await
}

/// The value of a series in Prometheus text output, named as PromQL would
/// (`name` or `name{label="value",…}`, labels in any order, all of them).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    let (name, wanted) = match series.split_once('{') {
        None => (series, Vec::new()),
        Some((name, labels)) => {
            let labels = labels.strip_suffix('}').expect("a series ends with }");
            let pairs = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (label, value) = pair.split_once('=').expect("label=\"value\"");
                    (
                        label.trim().to_owned(),
                        value.trim().trim_matches('"').to_owned(),
                    )
                })
                .collect();
            (name, pairs)
        }
    };
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text format");
    scrape.samples.iter().find_map(|sample| {
        let same = sample.metric == name
            && sample.labels.len() == wanted.len()
            && wanted
                .iter()
                .all(|(k, v)| sample.labels.get(k) == Some(v.as_str()));
        match (same, &sample.value) {
            (true, prometheus_parse::Value::Counter(v))
            | (true, prometheus_parse::Value::Gauge(v))
            | (true, prometheus_parse::Value::Untyped(v)) => Some(*v),
            _ => None,
        }
    })
}

/// Sum of a free account's ledger and its balance, which must agree.
pub async fn balance_and_ledger(store: &Store, account: &str) -> (i64, i64) {
    let row: (i64, i64) = sqlx::query_as(
        "SELECT a.credit_balance, (SELECT coalesce(sum(delta),0)::int8 FROM credit_ledger l WHERE l.account_id = a.id)
         FROM accounts a WHERE a.id = $1",
    )
    .bind(account)
    .fetch_one(store.pool())
    .await
    .unwrap();
    row
}

pub async fn reservation_count(store: &Store, account: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM reservations WHERE account_id = $1")
        .bind(account)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

pub const WAIT: Duration = Duration::from_secs(20);

/// A request with optional bearer token and JSON body: status code and
/// body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    try_http_request(addr, method, path, token, body)
        .await
        .expect("the HTTP listener answers")
}

async fn try_http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("an HTTP method");
    let mut request = reqwest::Client::new()
        .request(method, format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(30));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_owned());
    }
    let response = request.send().await.map_err(std::io::Error::other)?;
    let status = response.status().as_u16();
    let text = response.text().await.map_err(std::io::Error::other)?;
    Ok((status, text))
}

impl Broker {
    /// A delivery worker's report on `forward` (`delivered` or `failed`).
    pub async fn report(&self, env: &TestEnv, forward: &Delivery, outcome: &str) {
        let job: serde_json::Value = serde_json::from_slice(&forward.data).unwrap();
        let reservation = header(forward, "x-sendgate-reservation-id").unwrap();
        let (account, key) = (
            job["account_id"].as_str().unwrap(),
            job["idempotency_key"].as_str().unwrap(),
        );
        self.report_raw(env, account, key, &reservation, outcome)
            .await;
    }

    /// A report on `account`'s `key` and `reservation`, as given.
    pub async fn report_raw(
        &self,
        env: &TestEnv,
        account: &str,
        key: &str,
        reservation: &str,
        outcome: &str,
    ) {
        let body = serde_json::json!({
            "account_id": account, "idempotency_key": key, "reservation_id": reservation,
            "outcome": outcome, "detail": "test",
        });
        self.publish(&env.outcomes_queue(), body.to_string().as_bytes(), None)
            .await;
    }

    /// Messages ready in `queue` (0 when it does not exist).
    /// The depths of `queues`, summed.
    pub async fn depth_of_all(&self, queues: &[String]) -> u32 {
        let mut total = 0;
        for queue in queues {
            total += self.depth_of(queue).await;
        }
        total
    }

    pub async fn depth_of(&self, queue: &str) -> u32 {
        self.declared(queue).await.map_or(0, |q| q.message_count())
    }

    /// Consumers on `queue` (0 when it does not exist).
    pub async fn consumers_of(&self, queue: &str) -> u32 {
        self.declared(queue).await.map_or(0, |q| q.consumer_count())
    }

    async fn declared(&self, queue: &str) -> Option<lapin::Queue> {
        let channel = self.connection.create_channel().await.ok()?;
        channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .ok()
    }
}

/// Whether sendgate has recorded the broker's confirm of a job's forward.
pub async fn forward_confirmed(store: &Store, account: &str, key: &str) -> bool {
    sqlx::query_scalar(
        "SELECT r.forward_confirmed OR b.confirmed_at IS NOT NULL
                OR (r.batch_id IS NOT NULL AND b.id IS NULL)
         FROM reservations r LEFT JOIN forward_batches b ON b.id = r.batch_id
         WHERE r.account_id = $1 AND r.idempotency_key = $2",
    )
    .bind(account)
    .bind(key)
    .fetch_optional(store.pool())
    .await
    .unwrap()
    .unwrap_or(false)
}

/// A series' value, whatever the order of its labels.
pub fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let found: Vec<&str> = series_labels.split(',').filter(|l| !l.is_empty()).collect();
            let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            (found.len() == wanted.len() && wanted.iter().all(|w| found.contains(&w.as_str())))
                .then(|| value.parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no series {name}{labels:?} in:\n{text}"))
}

/// An account id the test knows is valid.
pub fn id(account: &str) -> sendgate::domain::ids::AccountId {
    sendgate::domain::ids::AccountId::parse(account).unwrap()
}

/// Creates an account in UTC, as the test's setup.
pub async fn create(store: &Store, account: &str, plan: sendgate::domain::plan::Plan) {
    store
        .create_account(&id(account), plan, "UTC")
        .await
        .unwrap();
}

/// A RabbitMQ user of the test's own, removed when dropped.
pub struct RabbitUser {
    pub name: String,
    password: String,
}

impl RabbitUser {
    /// Creates the user with full permissions on the default vhost.
    pub fn create(name: &str) -> RabbitUser {
        RabbitUser::with_permissions(name, ".*", ".*", ".*")
    }

    /// Creates the user with these configure, write and read permissions
    /// (regular expressions) on the default vhost.
    pub fn with_permissions(name: &str, configure: &str, write: &str, read: &str) -> RabbitUser {
        let user = RabbitUser {
            name: name.to_owned(),
            password: format!("pw-{name}"),
        };
        rabbitmqctl(&["add_user", &user.name, &user.password]);
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            "/",
            &user.name,
            configure,
            write,
            read,
        ]);
        user
    }

    /// The broker's URL with this user's login.
    pub fn url(&self) -> String {
        let mut url = url::Url::parse(&amqp_url()).unwrap();
        url.set_username(&self.name).unwrap();
        url.set_password(Some(&self.password)).unwrap();
        url.to_string()
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.name])
            .output();
    }
}

fn rabbitmqctl(args: &[&str]) {
    rabbitmqctl_output(args);
}

/// `rabbitmqctl -q ARGS`, its output. A listing fails now and then while
/// other tests delete their queues and close their channels under it, so a
/// failed run is tried again a few times before the test fails with its error.
pub fn rabbitmqctl_output(args: &[&str]) -> String {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let out = std::process::Command::new("rabbitmqctl")
            .arg("-q")
            .args(args)
            .output()
            .expect("rabbitmqctl runs");
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            attempts < 5,
            "rabbitmqctl {args:?} failed {attempts} times: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether a session on the test's database waits for a lock right now.
pub async fn someone_waits_for_a_lock(store: &Store) -> bool {
    waiting_for_locks(store).await > 0
}

/// How many sessions of the test's database wait for a lock now.
pub async fn waiting_for_locks(store: &Store) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap()
}

/// The state of the reservation under (account, key).
pub async fn reservation_state(store: &Store, account: &str, key: &str) -> String {
    sqlx::query_scalar(
        "SELECT state FROM reservations WHERE account_id = $1 AND idempotency_key = $2
         ORDER BY state = 'released' LIMIT 1",
    )
    .bind(account)
    .bind(key)
    .fetch_one(store.pool())
    .await
    .unwrap()
}
