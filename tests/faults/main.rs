//! Fault injection: real `sendgate run` processes, a few thousand jobs over a
//! mix of plans, and a fault while jobs are in flight (kill -9, broker
//! connections closed, broker restarted, database backends terminated,
//! Postgres restarted, a hot row locked, the delivery queue deleted). After
//! recovery every published job is joined with the delivery queue, the
//! dead-letter queue and the ledger, and a Jepsen-style report is printed
//! (and written to `target/fault-reports/`).
//!
//! The faults hit a RabbitMQ node and a Postgres cluster this binary starts
//! for itself (`harness::services`, on free ports, stopped when it exits),
//! never the machine's own. The tests run one at a time, since they share
//! those, and bring them back even when they fail.

#![allow(clippy::unwrap_used)]

mod ha;
#[path = "../harness/mod.rs"]
mod harness;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use chrono::Timelike;
use harness::services::{PrivatePostgres, PrivateRabbit, private_services};
use harness::*;
use lapin::options::QueueDeleteOptions;
use sendgate::domain::plan::Plan;
use sendgate::store::Store;

const FREE_CREDITS: usize = 20;
const PRO_DAILY: usize = 20;
const PREFETCH: usize = 50;

/// One fault test at a time: they restart the private services they share.
static SERIAL: LazyLock<tokio::sync::Mutex<()>> = LazyLock::new(|| tokio::sync::Mutex::new(()));

// ---------------------------------------------------------------- workload

struct Account {
    id: String,
    plan: Plan,
    jobs: usize,
}

impl Account {
    fn allowed(&self) -> usize {
        match self.plan {
            Plan::Free => self.jobs.min(FREE_CREDITS),
            Plan::Pro => self.jobs.min(PRO_DAILY),
            Plan::Scale => self.jobs,
        }
    }
}

struct Workload {
    accounts: Vec<Account>,
    /// (account, key, body), in publishing order.
    jobs: Vec<(String, String, Vec<u8>)>,
}

impl Workload {
    /// Free and pro accounts with more jobs than their plan allows, and
    /// scale accounts carrying the bulk; jobs interleaved across accounts.
    fn mixed(
        free: usize,
        pro: usize,
        scale: usize,
        metered_jobs: usize,
        scale_jobs: usize,
    ) -> Self {
        let mut accounts = Vec::new();
        for i in 0..free {
            accounts.push(Account {
                id: format!("free-{i}"),
                plan: Plan::Free,
                jobs: metered_jobs,
            });
        }
        for i in 0..pro {
            accounts.push(Account {
                id: format!("pro-{i}"),
                plan: Plan::Pro,
                jobs: metered_jobs,
            });
        }
        for i in 0..scale {
            accounts.push(Account {
                id: format!("scale-{i}"),
                plan: Plan::Scale,
                jobs: scale_jobs,
            });
        }
        let mut jobs = Vec::new();
        let longest = accounts.iter().map(|a| a.jobs).max().unwrap_or(0);
        for n in 0..longest {
            for account in accounts.iter().filter(|a| n < a.jobs) {
                let key = format!("{}-job-{n}", account.id);
                jobs.push((account.id.clone(), key.clone(), job_body(&account.id, &key)));
            }
        }
        Workload { accounts, jobs }
    }

    fn total(&self) -> usize {
        self.jobs.len()
    }

    /// The workload of only the first `n` jobs, in publishing order.
    fn first(mut self, n: usize) -> Self {
        self.jobs.truncate(n);
        for account in &mut self.accounts {
            account.jobs = self
                .jobs
                .iter()
                .filter(|(a, _, _)| *a == account.id)
                .count();
        }
        self
    }
}

/// A time zone whose local time is far from midnight now, so a pro
/// account's day cannot roll over during a test.
fn midday_timezone() -> &'static str {
    let hour = chrono::Utc::now().hour();
    if (2..22).contains(&hour) {
        "UTC"
    } else {
        "Asia/Kolkata"
    }
}

// ---------------------------------------------------------------- workers

struct Fleet {
    env: TestEnv,
    workers: Vec<Process>,
    ports: Vec<u16>,
    /// The broker node the test's own clients use to look at the queues.
    client: String,
}

impl Fleet {
    fn new(env: TestEnv, count: usize) -> Self {
        Fleet {
            env,
            workers: Vec::new(),
            ports: (0..count).map(|_| free_port()).collect(),
            client: amqp_url(),
        }
    }

    fn start(&mut self, i: usize) {
        // FAULT_LOGS=1 shows the processes' logs.
        let logs = std::env::var_os("FAULT_LOGS").is_some();
        let process = Process::spawn_on(&self.env, self.ports[i], logs);
        if i < self.workers.len() {
            self.workers[i] = process;
        } else {
            self.workers.push(process);
        }
    }

    fn start_all(&mut self) {
        for i in 0..self.ports.len() {
            self.start(i);
        }
    }

    fn kill9(&mut self, i: usize) {
        self.workers[i].kill9();
    }

    fn http(&self, i: usize) -> std::net::SocketAddr {
        self.workers[i].addr()
    }

    async fn wait_ready(&self, timeout: Duration) {
        for worker in &self.workers {
            worker.wait_ready(timeout).await;
        }
    }

    /// Sum of `sendgate_jobs_in_flight` over the running workers.
    async fn in_flight(&self) -> f64 {
        let mut total = 0.0;
        for worker in self.workers.iter().filter(|w| w.is_running()) {
            if let Ok((200, text)) = http_get(worker.addr(), "/metrics").await {
                total += metric_value(&text, "sendgate_jobs_in_flight").unwrap_or(0.0);
            }
        }
        total
    }

    /// SIGTERM every worker and wait for a clean exit.
    async fn stop_all(&mut self) {
        for worker in self.workers.iter().filter(|w| w.is_running()) {
            worker.terminate();
        }
        for worker in self.workers.iter_mut().filter(|w| w.is_running()) {
            let status = worker.wait_for_exit(Duration::from_secs(30)).await;
            assert!(
                status.success(),
                "a worker exited with {status} on SIGTERM; {}",
                worker.log_tail()
            );
        }
    }
}

impl Fleet {
    /// Closes the test's store and removes its database and queues.
    async fn teardown(mut self, store: Store) {
        store.close().await;
        let env = std::mem::replace(&mut self.env, TestEnv::new());
        env.cleanup().await;
    }
}

/// A test's own database and queues, on the binary's private services: the
/// faults this suite injects never touch the machine's own.
async fn fault_env() -> TestEnv {
    private_services().await;
    let mut env = TestEnv::new();
    env.set("SENDGATE__AMQP__PREFETCH", &PREFETCH.to_string())
        .set("SENDGATE__GATE__BATCH_SIZE", "20")
        .set("SENDGATE__GATE__CONSUMERS", "1")
        .set("SENDGATE__AMQP__HEARTBEAT_SECS", "5")
        .set("SENDGATE__AMQP__PUBLISH_TIMEOUT_MS", "5000")
        .set("SENDGATE__GATE__FORWARD_LEASE_SECS", "10")
        .set("SENDGATE__DATABASE__STATEMENT_TIMEOUT_MS", "1000")
        .set("SENDGATE__DATABASE__ACQUIRE_TIMEOUT_MS", "2000")
        .set("SENDGATE__SHUTDOWN__GRACE_PERIOD_SECS", "10");
    env
}

async fn create_accounts(store: &Store, workload: &Workload) {
    let tz = midday_timezone();
    for account in &workload.accounts {
        store
            .create_account(&id(&account.id), account.plan, tz)
            .await
            .unwrap();
    }
}

// ---------------------------------------------------------------- broker side

/// Publishes every job through the jobs exchange (routing key = its
/// account) with confirms, reconnecting and publishing the
/// unconfirmed chunk again when the broker goes away (so a job may reach the
/// send queue twice, as with a real scheduler's retries).
async fn publish_all(exchange: String, jobs: Vec<(String, String, Vec<u8>)>) -> usize {
    let mut published = 0;
    for chunk in jobs.chunks(100) {
        loop {
            let attempt = async {
                let broker = Broker::connect_checked().await?;
                let mut confirms = Vec::new();
                for (account, _, body) in chunk {
                    confirms.push(
                        broker
                            .channel
                            .basic_publish(
                                exchange.as_str().into(),
                                account.as_str().into(),
                                lapin::options::BasicPublishOptions::default(),
                                body,
                                lapin::BasicProperties::default()
                                    .with_delivery_mode(2)
                                    .with_content_type("application/json".into()),
                            )
                            .await?,
                    );
                }
                for confirm in confirms {
                    if !confirm.await?.is_ack() {
                        return Err(lapin::Error::from(std::io::Error::other("nack")));
                    }
                }
                let _ = broker.connection.close(200, "done".into()).await;
                Ok::<(), lapin::Error>(())
            };
            match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                Ok(Ok(())) => break,
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
        published += chunk.len();
    }
    published
}

impl Broker {
    async fn connect_checked() -> Result<Broker, lapin::Error> {
        Broker::connect_checked_to(&amqp_url()).await
    }

    async fn connect_checked_to(url: &str) -> Result<Broker, lapin::Error> {
        let connection =
            lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await?;
        Ok(Broker {
            connection,
            channel,
        })
    }
}

/// Jobs waiting in the job queues right now (0 if the broker is away).
async fn backlog(fleet: &Fleet) -> u32 {
    match Broker::connect_checked_to(&fleet.client).await {
        Ok(broker) => broker.depth_of_all(&fleet.env.job_queues()).await,
        Err(_) => 0,
    }
}

/// Waits until the send queue is empty, no worker holds a job, and the
/// output queues stop growing.
async fn settle(fleet: &Fleet, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = (u32::MAX, u32::MAX);
    let mut stable = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "the gate did not settle within {timeout:?}"
        );
        let broker = match Broker::connect_checked_to(&fleet.client).await {
            Ok(b) => b,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        // Copies waiting for a forward's lease come back to the send queue.
        let send = broker.depth_of_all(&fleet.env.job_queues()).await
            + broker.depth_of(&fleet.env.wait_queue()).await
            + broker
                .depth_of(&format!("{}.p", fleet.env.wait_queue()))
                .await;
        let out = (
            broker.depth_of(&fleet.env.delivery_queue()).await,
            broker.depth_of(&fleet.env.dead_queue()).await,
        );
        let in_flight = fleet.in_flight().await;
        let _ = broker.connection.close(200, "".into()).await;
        if send == 0 && in_flight == 0.0 && out == last {
            stable += 1;
            if stable >= 3 {
                return;
            }
        } else {
            stable = 0;
        }
        last = out;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}

// ---------------------------------------------------------------- services

/// Starts the private broker's app again when dropped, however the test ends.
struct RabbitRestore(&'static PrivateRabbit);
impl Drop for RabbitRestore {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| {
            self.0.start_app();
        });
    }
}

/// Starts the private Postgres again when dropped, however the test ends.
struct PostgresRestore(&'static PrivatePostgres);
impl Drop for PostgresRestore {
    fn drop(&mut self) {
        if !self.0.is_ready() {
            let _ = std::panic::catch_unwind(|| self.0.pg_ctl(&["start"]));
        }
    }
}

// ---------------------------------------------------------------- the report

#[derive(Default)]
struct Report {
    scenario: String,
    published: usize,
    forwarded_messages: usize,
    forwarded_unique: usize,
    dead_by_reason: BTreeMap<String, usize>,
    lost: usize,
    duplicated_downstream: usize,
    double_charged: usize,
    accounts_wrong: Vec<String>,
    ledger_mismatches: Vec<String>,
    notes: Vec<String>,
}

impl Report {
    fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "### {}\n", self.scenario);
        let _ = writeln!(
            s,
            "| published | forwarded (unique) | forwarded messages | dead-lettered | lost | duplicated downstream | double-charged | balance = ledger | per-account limits |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        let dead: Vec<String> = self
            .dead_by_reason
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | **{}** | {} | **{}** | {} | {} |",
            self.published,
            self.forwarded_unique,
            self.forwarded_messages,
            if dead.is_empty() {
                "0".to_owned()
            } else {
                dead.join(", ")
            },
            self.lost,
            self.duplicated_downstream,
            self.double_charged,
            if self.ledger_mismatches.is_empty() {
                "ok".to_owned()
            } else {
                self.ledger_mismatches.join("; ")
            },
            if self.accounts_wrong.is_empty() {
                "ok".to_owned()
            } else {
                self.accounts_wrong.join("; ")
            },
        );
        for note in &self.notes {
            let _ = writeln!(s, "\n{note}");
        }
        s
    }

    fn emit(&self) {
        let text = self.render();
        eprintln!("\n{text}");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fault-reports");
        let _ = std::fs::create_dir_all(&dir);
        let name = self
            .scenario
            .split_whitespace()
            .collect::<Vec<_>>()
            .join("-");
        let _ = std::fs::write(dir.join(format!("{name}.md")), text);
    }
}

/// Published messages with no outcome, counted per message, not per key:
/// each one must be matched by a message that came out with its very body
/// (a forward or a dead letter), unless it was an identical copy of a job
/// whose forward came out (dropped as a duplicate), or a conflicting copy
/// the scenario expects.
fn lost_messages(
    workload: &Workload,
    forwarded: &[lapin::message::Delivery],
    dead: &[lapin::message::Delivery],
    extra_conflicts: &HashSet<String>,
) -> usize {
    let mut out: HashMap<&[u8], usize> = HashMap::new();
    for d in forwarded.iter().chain(dead) {
        *out.entry(d.data.as_slice()).or_default() += 1;
    }
    let forwarded_bodies: HashSet<&[u8]> = forwarded.iter().map(|d| d.data.as_slice()).collect();
    let mut lost = 0;
    for (_, key, body) in &workload.jobs {
        match out.get_mut(body.as_slice()) {
            Some(n) if *n > 0 => *n -= 1,
            _ if forwarded_bodies.contains(body.as_slice()) => {}
            _ if extra_conflicts.contains(key) => {}
            _ => lost += 1,
        }
    }
    lost
}

/// Joins what was published with what came out and with the ledger.
async fn check(
    scenario: &str,
    fleet: &Fleet,
    store: &Store,
    workload: &Workload,
    extra_conflicts: &HashSet<String>,
) -> Report {
    let broker = Broker::connect_to(&fleet.client).await;
    let forwarded = broker
        .take_all(&fleet.env.delivery_queue(), Duration::ZERO)
        .await;
    let dead = broker
        .take_all(&fleet.env.dead_queue(), Duration::ZERO)
        .await;
    judge(
        scenario,
        store,
        workload,
        &forwarded,
        &dead,
        extra_conflicts,
    )
    .await
}

/// Joins what was published with what came out (`forwarded` and `dead`)
/// and with the ledger.
async fn judge(
    scenario: &str,
    store: &Store,
    workload: &Workload,
    forwarded: &[lapin::message::Delivery],
    dead: &[lapin::message::Delivery],
    extra_conflicts: &HashSet<String>,
) -> Report {
    let mut report = Report {
        scenario: scenario.to_owned(),
        published: workload.total(),
        ..Report::default()
    };

    let mut forwarded_keys: HashMap<String, Vec<String>> = HashMap::new();
    let mut per_account: HashMap<String, usize> = HashMap::new();
    for d in forwarded {
        let key = d
            .properties
            .message_id()
            .as_ref()
            .map(|k| k.to_string())
            .unwrap_or_default();
        let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(
            body["idempotency_key"].as_str(),
            Some(key.as_str()),
            "message_id is the key"
        );
        let reservation = header(d, "x-sendgate-reservation-id").unwrap_or_default();
        let copies = forwarded_keys.entry(key).or_default();
        if copies.is_empty() {
            *per_account
                .entry(body["account_id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        copies.push(reservation);
    }
    report.forwarded_messages = forwarded.len();
    report.forwarded_unique = forwarded_keys.len();
    report.duplicated_downstream = forwarded.len() - forwarded_keys.len();
    // A duplicate forward must carry the same charge (same reservation).
    report.double_charged += forwarded_keys
        .values()
        .filter(|ids| ids.iter().collect::<HashSet<_>>().len() > 1)
        .count();

    let mut dead_keys = HashSet::new();
    for d in dead {
        let reason = header(d, "x-sendgate-reason").unwrap_or_else(|| d.routing_key.to_string());
        *report.dead_by_reason.entry(reason).or_default() += 1;
        if let Ok(body) = serde_json::from_slice::<serde_json::Value>(&d.data)
            && let Some(key) = body["idempotency_key"].as_str()
        {
            dead_keys.insert(key.to_owned());
        }
    }
    report.lost = lost_messages(workload, forwarded, dead, extra_conflicts);

    let double: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM credit_ledger WHERE kind IN ('send', 'release')
         GROUP BY account_id, idempotency_key HAVING sum(delta) < -1) d",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    report.double_charged += double as usize;

    for account in &workload.accounts {
        let got = per_account.get(&account.id).copied().unwrap_or(0);
        if got != account.allowed() {
            report.accounts_wrong.push(format!(
                "{} forwarded {got}, allowed {}",
                account.id,
                account.allowed()
            ));
        }
        let (balance, ledger) = balance_and_ledger(store, &account.id).await;
        let expected_balance = match account.plan {
            Plan::Free => (FREE_CREDITS - got) as i64,
            _ => 0,
        };
        if balance != ledger || balance != expected_balance {
            report.ledger_mismatches.push(format!(
                "{}: balance {balance}, ledger {ledger}, expected {expected_balance}",
                account.id
            ));
        }
        let charges = reservation_count(store, &account.id).await;
        if charges as usize != got {
            report.accounts_wrong.push(format!(
                "{} has {charges} charges for {got} forwarded jobs",
                account.id
            ));
        }
    }
    report
}

fn assert_sound(report: &Report, allowed_reasons: &[&str]) {
    report.emit();
    assert_eq!(report.lost, 0, "I1: jobs lost");
    assert_eq!(report.double_charged, 0, "I2: jobs charged twice");
    assert!(
        report.ledger_mismatches.is_empty(),
        "I3: {:?}",
        report.ledger_mismatches
    );
    assert!(
        report.accounts_wrong.is_empty(),
        "I3/I4: {:?}",
        report.accounts_wrong
    );
    for reason in report.dead_by_reason.keys() {
        assert!(
            allowed_reasons.contains(&reason.as_str()),
            "unexpected dead-letter reason {reason}"
        );
    }
}

const PLAN_REASONS: &[&str] = &["out_of_credits", "daily_limit_reached"];

/// Sets up a workload and a fleet, with the jobs already publishing.
async fn begin(
    workers: usize,
    workload: &Workload,
) -> (Fleet, Store, tokio::task::JoinHandle<usize>) {
    begin_with_consumers(workers, 1, workload).await
}

/// [`begin`] with `consumers` channels on the send queue per process.
async fn begin_with_consumers(
    workers: usize,
    consumers: usize,
    workload: &Workload,
) -> (Fleet, Store, tokio::task::JoinHandle<usize>) {
    let (fleet, store) = ready_fleet_with_consumers(workers, consumers, workload).await;
    let publisher = tokio::spawn(publish_all(
        fleet.env.jobs_exchange(),
        workload.jobs.clone(),
    ));
    (fleet, store, publisher)
}

/// A fresh database with the workload's accounts and `workers` ready
/// sendgate processes, nothing published yet.
async fn ready_fleet(workers: usize, workload: &Workload) -> (Fleet, Store) {
    ready_fleet_with_consumers(workers, 1, workload).await
}

async fn ready_fleet_with_consumers(
    workers: usize,
    consumers: usize,
    workload: &Workload,
) -> (Fleet, Store) {
    let mut env = fault_env().await;
    env.set("SENDGATE__GATE__CONSUMERS", &consumers.to_string());
    let store = env.store().await;
    create_accounts(&store, workload).await;
    let mut fleet = Fleet::new(env, workers);
    fleet.start_all();
    fleet.wait_ready(WAIT).await;
    (fleet, store)
}

async fn finish(
    mut fleet: Fleet,
    store: Store,
    publisher: tokio::task::JoinHandle<usize>,
    scenario: &str,
    workload: &Workload,
    reasons: &[&str],
) {
    publisher.await.unwrap();
    settle(&fleet, Duration::from_secs(90)).await;
    fleet.stop_all().await;
    let report = check(scenario, &fleet, &store, workload, &HashSet::new()).await;
    assert_sound(&report, reasons);
    fleet.teardown(store).await;
}

// ---------------------------------------------------------------- scenarios

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_and_charges_nothing_twice() {
    let _serial = SERIAL.lock().await;
    let workload = Workload::mixed(3, 3, 4, 60, 1500);
    let (mut fleet, store, publisher) = begin(2, &workload).await;

    // Kill while jobs are in flight: the victim holds unacked deliveries, and
    // maybe a charged batch whose forwards are not confirmed yet.
    let mut kills = 0;
    let mut under_load = 0;
    for round in 0..5u64 {
        tokio::time::sleep(Duration::from_millis(100 + (round * 97) % 300)).await;
        let victim = (round % 2) as usize;
        let in_flight = match http_get(fleet.http(victim), "/metrics").await {
            Ok((200, text)) => metric_value(&text, "sendgate_jobs_in_flight").unwrap_or(0.0),
            _ => 0.0,
        };
        if in_flight > 0.0 || !publisher.is_finished() || backlog(&fleet).await > 0 {
            under_load += 1;
        }
        fleet.kill9(victim);
        kills += 1;
        fleet.start(victim);
        fleet.wait_ready(WAIT).await;
    }
    assert!(
        under_load >= 2,
        "only {under_load} kills hit a worker with jobs in flight"
    );
    fleet.wait_ready(WAIT).await;
    publisher.await.unwrap();
    settle(&fleet, Duration::from_secs(90)).await;
    fleet.stop_all().await;
    let mut report = check(
        "kill -9 a worker 5 times",
        &fleet,
        &store,
        &workload,
        &HashSet::new(),
    )
    .await;
    report.notes.push(format!(
        "{kills} kills, {under_load} of them while jobs were arriving or in flight; each worker holds at most {PREFETCH} unacked jobs, so at most {} downstream duplicates are allowed.",
        kills * PREFETCH
    ));
    assert!(
        report.duplicated_downstream <= kills * PREFETCH,
        "more duplicates than jobs in flight"
    );
    assert_sound(&report, PLAN_REASONS);
    fleet.teardown(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connections_closed_and_broker_restarted_mid_run() {
    let _serial = SERIAL.lock().await;
    let rabbit = private_services().await.rabbit;
    let _restore = RabbitRestore(rabbit);
    let workload = Workload::mixed(3, 3, 4, 60, 1500);
    // Two processes with two channels each on the send queue (the default),
    // all of which must come back.
    let (fleet, store, publisher) = begin_with_consumers(2, 2, &workload).await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !publisher.is_finished(),
        "the fault must hit a running gate"
    );
    rabbit.close_all_connections();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    rabbit.stop_app();
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbit.start_app();
    fleet.wait_ready(Duration::from_secs(60)).await;

    // The prefetch is applied again on every new channel.
    let listing = rabbit.ctl_output(&["list_consumers", "queue_name", "prefetch_count"]);
    let ours: Vec<&str> = listing
        .lines()
        .filter(|l| l.starts_with(&fleet.env.send_queue()))
        .collect();
    let settings = fleet.env.settings();
    let channels = 2 * settings.amqp.job_queues().len() * settings.gate.consumers;
    assert_eq!(
        ours.len(),
        channels,
        "both processes consume every job queue again: {listing}"
    );
    for line in ours {
        assert!(
            line.trim_end().ends_with(&PREFETCH.to_string()),
            "prefetch restored: {line}"
        );
    }
    let reconnects: f64 = {
        let mut total = 0.0;
        for i in 0..2 {
            let text = http_get(fleet.http(i), "/metrics").await.unwrap().1;
            total += metric_value(&text, "sendgate_amqp_reconnects_total").unwrap_or(0.0);
        }
        total
    };
    assert!(reconnects >= 2.0, "reconnects counted: {reconnects}");
    finish(
        fleet,
        store,
        publisher,
        "broker connections closed, then broker app restarted",
        &workload,
        PLAN_REASONS,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_backends_terminated_and_postgres_restarted_mid_run() {
    let _serial = SERIAL.lock().await;
    let postgres = private_services().await.postgres;
    let _restore = PostgresRestore(postgres);
    let workload = Workload::mixed(3, 3, 4, 60, 1500);
    let (fleet, store, publisher) = begin(2, &workload).await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !publisher.is_finished(),
        "the fault must hit a running gate"
    );
    let db = fleet.env.db_url.rsplit('/').next().unwrap().to_owned();
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'sendgate' AND pid <> pg_backend_pid()",
    )
    .bind(&db)
    .fetch_all(store.pool())
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    postgres.restart();
    eventually(Duration::from_secs(60), || async { postgres.is_ready() }).await;
    fleet.wait_ready(Duration::from_secs(60)).await;
    eprintln!("terminated {} sendgate backends", terminated.len());
    // Only plan refusals: nothing is dead-lettered because the database was down.
    finish(
        fleet,
        store,
        publisher,
        "database backends terminated, then Postgres restarted",
        &workload,
        PLAN_REASONS,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_row_locked_past_the_statement_timeout_only_delays_work() {
    let _serial = SERIAL.lock().await;
    let workload = Workload::mixed(3, 3, 4, 60, 600);
    let env = fault_env().await;
    let store = env.store().await;
    create_accounts(&store, &workload).await;

    // Another session holds the hot free account's row for 4 seconds, well
    // past sendgate's 1 s statement timeout.
    let mut locker = store.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL statement_timeout = 0")
        .execute(&mut *locker)
        .await
        .unwrap();
    sqlx::query("SELECT 1 FROM accounts WHERE id = 'free-0' FOR UPDATE")
        .execute(&mut *locker)
        .await
        .unwrap();

    let mut fleet = Fleet::new(env, 2);
    fleet.start_all();
    fleet.wait_ready(WAIT).await;
    let publisher = tokio::spawn(publish_all(
        fleet.env.jobs_exchange(),
        workload.jobs.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let timeouts: f64 = {
        let mut total = 0.0;
        for i in 0..2 {
            let text = http_get(fleet.http(i), "/metrics").await.unwrap().1;
            total += metric_value(&text, "sendgate_db_errors_total{kind=\"unavailable\"}")
                .unwrap_or(0.0);
        }
        total
    };
    locker.rollback().await.unwrap();
    assert!(
        timeouts >= 1.0,
        "the lock wait hit the statement timeout and was retried"
    );
    finish(
        fleet,
        store,
        publisher,
        "a hot row locked past the statement timeout",
        &workload,
        PLAN_REASONS,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_on_three_hot_accounts_forward_exactly_what_is_allowed() {
    let _serial = SERIAL.lock().await;
    // One free, one pro and one scale account carry nearly every job.
    let mut workload = Workload::mixed(1, 1, 1, 700, 1200);
    let cold = Workload::mixed(2, 2, 2, 10, 10);
    for (i, account) in cold.accounts.into_iter().enumerate() {
        let id = format!("cold-{i}-{}", account.id);
        for n in 0..account.jobs {
            let key = format!("{id}-job-{n}");
            workload
                .jobs
                .push((id.clone(), key.clone(), job_body(&id, &key)));
        }
        workload.accounts.push(Account { id, ..account });
    }
    let (fleet, store, publisher) = begin(4, &workload).await;
    finish(
        fleet,
        store,
        publisher,
        "4 workers, 3 hot accounts",
        &workload,
        PLAN_REASONS,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_delivery_queue_is_recreated_and_nothing_is_acked_unrouted() {
    let _serial = SERIAL.lock().await;
    let workload = Workload::mixed(2, 2, 2, 30, 200);
    let (mut fleet, store) = ready_fleet(2, &workload).await;

    // Delete the (still empty) delivery queue while the workers run, then
    // publish: the first forwards come back unroutable and are retried.
    let broker = Broker::connect().await;
    let removed = broker
        .channel
        .queue_delete(
            fleet.env.delivery_queue().as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(removed, 0);
    let publisher = tokio::spawn(publish_all(
        fleet.env.jobs_exchange(),
        workload.jobs.clone(),
    ));
    publisher.await.unwrap();
    settle(&fleet, Duration::from_secs(90)).await;
    let mut failures = 0.0;
    for i in 0..2 {
        let text = http_get(fleet.http(i), "/metrics").await.unwrap().1;
        failures += metric_value(&text, "sendgate_publish_failures_total").unwrap_or(0.0);
    }
    fleet.stop_all().await;
    let mut report = check(
        "delivery queue deleted while running",
        &fleet,
        &store,
        &workload,
        &HashSet::new(),
    )
    .await;
    report.notes.push(format!(
        "{failures} forwards came back unroutable and were published again."
    ));
    assert!(failures >= 1.0, "some forwards hit the missing queue");
    assert_sound(&report, PLAN_REASONS);
    fleet.teardown(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_published_twice_and_with_changed_payloads_are_charged_once() {
    let _serial = SERIAL.lock().await;
    let workload = Workload::mixed(3, 3, 4, 40, 300);
    let (mut fleet, store) = ready_fleet(2, &workload).await;

    // Every job twice, and every 10th key a third time with another payload.
    let mut jobs = workload.jobs.clone();
    jobs.extend(workload.jobs.iter().cloned());
    let mut changed = HashSet::new();
    for (i, (account, key, _)) in workload.jobs.iter().enumerate() {
        if i % 10 == 0 {
            let body = serde_json::json!({"account_id": account, "idempotency_key": key, "recipient": "changed"});
            jobs.push((account.clone(), key.clone(), body.to_string().into_bytes()));
            changed.insert(key.clone());
        }
    }
    publish_all(fleet.env.jobs_exchange(), jobs).await;
    settle(&fleet, Duration::from_secs(90)).await;
    fleet.stop_all().await;
    let report = check(
        "the same keys published twice, some with changed payloads",
        &fleet,
        &store,
        &workload,
        &HashSet::new(),
    )
    .await;
    // A changed payload is a conflict when its key was charged, and judged
    // afresh (a plan refusal) when the key was refused.
    let conflicts = report
        .dead_by_reason
        .get("idempotency_conflict")
        .copied()
        .unwrap_or(0);
    assert!(
        conflicts >= 1 && conflicts <= changed.len(),
        "conflicts: {conflicts}"
    );
    assert_sound(
        &report,
        &[
            "out_of_credits",
            "daily_limit_reached",
            "idempotency_conflict",
        ],
    );
    // A copy decided while another worker's forward of the same key is still
    // unconfirmed is forwarded again (same reservation, no charge): at least
    // once downstream, bounded by the repeated keys.
    assert!(report.duplicated_downstream <= workload.total());
    fleet.teardown(store).await;
}

// ------------------------------------------------- the lifecycle under faults

/// What the delivery workers saw and said.
#[derive(Default)]
struct Downstream {
    forwards: Vec<lapin::message::Delivery>,
    /// Reservations they reported `failed`.
    failed: HashSet<String>,
    stale_sent: usize,
}

/// Plays the delivery workers until `done`: takes every forward, reports
/// every fifth `failed` (and publishes that job again, as a scheduler's
/// retry, so it is charged afresh), leaves some without a report (the sweep
/// commits those), the rest `delivered`; every failed report is sent once
/// more later, by then stale.
async fn deliver(
    env_queues: (String, String, String),
    done: tokio_util::sync::CancellationToken,
) -> Downstream {
    let (delivery, outcomes, send) = env_queues;
    let broker = Broker::connect().await;
    let mut seen = Downstream::default();
    let mut stale: Vec<Vec<u8>> = Vec::new();
    loop {
        let got = broker
            .channel
            .basic_get(
                delivery.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap();
        let Some(message) = got else {
            if done.is_cancelled() {
                break;
            }
            if let Some(report) = stale.pop() {
                broker.publish(&outcomes, &report, None).await;
                seen.stale_sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let forward = message.delivery;
        let job: serde_json::Value = serde_json::from_slice(&forward.data).unwrap();
        let reservation = header(&forward, "x-sendgate-reservation-id").unwrap();
        let n = seen.forwards.len();
        if n % 7 == 3 {
            // No report at all: the hold expires and the sweep commits it.
            seen.forwards.push(forward);
            continue;
        }
        let failed = n % 5 == 0;
        let report = serde_json::json!({
            "account_id": job["account_id"], "idempotency_key": job["idempotency_key"],
            "reservation_id": reservation, "outcome": if failed { "failed" } else { "delivered" },
            "detail": "fault suite",
        })
        .to_string()
        .into_bytes();
        broker.publish(&outcomes, &report, None).await;
        if failed && seen.failed.insert(reservation) {
            stale.push(report);
            broker.publish(&send, &forward.data, None).await;
        }
        seen.forwards.push(forward);
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_the_sweep_and_redrive_run_while_workers_are_killed() {
    let _serial = SERIAL.lock().await;
    let workload = Workload::mixed(3, 3, 2, 40, 400);
    let mut env = fault_env().await;
    env.set("SENDGATE__RESERVATIONS__HOLD_SECS", "3")
        .set("SENDGATE__RESERVATIONS__SWEEP_INTERVAL_SECS", "1");
    let store = env.store().await;
    create_accounts(&store, &workload).await;
    let mut fleet = Fleet::new(env, 2);
    fleet.start_all();
    fleet.wait_ready(WAIT).await;
    let done = tokio_util::sync::CancellationToken::new();
    let queues = (
        fleet.env.delivery_queue(),
        fleet.env.outcomes_queue(),
        fleet.env.send_queue(),
    );
    let downstream = tokio::spawn(deliver(queues, done.clone()));
    let publisher = tokio::spawn(publish_all(
        fleet.env.jobs_exchange(),
        workload.jobs.clone(),
    ));

    // Kill a worker twice while jobs, reports and the sweep are all moving;
    // between the kills, upgrade a free account and redrive its refusals.
    for round in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        fleet.kill9(round);
        if round == 0 {
            eventually(WAIT, || async {
                Broker::connect()
                    .await
                    .depth_of(&fleet.env.dead_queue())
                    .await
                    > 0
            })
            .await;
            store.set_plan(&id("free-0"), Plan::Scale).await.unwrap();
            let moved = cli(
                &fleet.env,
                &["dead-letters", "redrive", "--account", "free-0"],
            );
            assert!(
                moved.status.success(),
                "{}",
                String::from_utf8_lossy(&moved.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        fleet.start(round);
    }
    fleet.wait_ready(WAIT).await;
    publisher.await.unwrap();
    settle(&fleet, Duration::from_secs(90)).await;
    eventually(Duration::from_secs(60), || async {
        let broker = Broker::connect().await;
        broker.depth_of(&fleet.env.outcomes_queue()).await == 0
            && broker.depth_of(&fleet.env.delivery_queue()).await == 0
            && fleet.in_flight().await == 0.0
    })
    .await;
    done.cancel();
    let seen = downstream.await.unwrap();
    fleet.stop_all().await;

    let broker = Broker::connect().await;
    let dead = broker
        .take_all(&fleet.env.dead_queue(), Duration::ZERO)
        .await;
    let lost = lost_messages(&workload, &seen.forwards, &dead, &HashSet::new());
    let released: Vec<(String, i64)> = sqlx::query_as(
        "SELECT reservation_id::text, count(*) FROM credit_ledger WHERE kind = 'release'
         GROUP BY reservation_id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let unearned: Vec<&(String, i64)> = released
        .iter()
        .filter(|(id, n)| *n != 1 || !seen.failed.contains(id))
        .collect();
    let mut mismatched = Vec::new();
    for account in &workload.accounts {
        let (balance, ledger) = balance_and_ledger(&store, &account.id).await;
        if balance != ledger || balance < 0 {
            mismatched.push(format!(
                "{}: balance {balance}, ledger {ledger}",
                account.id
            ));
        }
    }
    let refused: Vec<String> = dead
        .iter()
        .map(|d| d.routing_key.to_string())
        .filter(|r| !PLAN_REASONS.contains(&r.as_str()))
        .collect();
    eprintln!(
        "\n### outcomes, the sweep and redrive under kill -9\n\n\
         | published | forwards seen | reported failed (jobs sent again) | stale reports | releases | dead letters | lost |\n\
         |---|---|---|---|---|---|---|\n| {} | {} | {} | {} | {} | {} | **{lost}** |\n",
        workload.total(),
        seen.forwards.len(),
        seen.failed.len(),
        seen.stale_sent,
        released.len(),
        dead.len(),
    );
    assert_eq!(lost, 0, "I1: messages lost");
    assert!(
        unearned.is_empty(),
        "I6: refunds not earned by a failed report, or twice: {unearned:?}"
    );
    assert!(mismatched.is_empty(), "I3: {mismatched:?}");
    assert!(
        refused.is_empty(),
        "only plan refusals, no report dead letters: {refused:?}"
    );
    assert!(seen.stale_sent > 0 && !seen.failed.is_empty());
    let swept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reservations WHERE settle_detail = 'no outcome within the hold time'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert!(
        swept > 0,
        "the sweep committed the holds nobody reported on"
    );
    fleet.teardown(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_midnight_passes_while_postgres_restarts() {
    let _serial = SERIAL.lock().await;
    let postgres = private_services().await.postgres;
    let _restore = PostgresRestore(postgres);
    let env = fault_env().await;
    let store = env.store().await;
    // Pro accounts in Kolkata (UTC+5:30), ten seconds before their midnight;
    // two gates in this process share the clock the test moves.
    let accounts = ["pro-in-0", "pro-in-1", "pro-in-2"];
    for account in accounts {
        store
            .create_account(&id(account), Plan::Pro, "Asia/Kolkata")
            .await
            .unwrap();
    }
    let clock = manual_clock("2026-03-02T18:29:50Z");
    let gates = [
        start_gate(env.settings(), clock.clone()).await,
        start_gate(env.settings(), clock.clone()).await,
    ];
    let mut workload = Workload {
        accounts: Vec::new(),
        jobs: Vec::new(),
    };
    for n in 0..60 {
        for account in accounts {
            let key = format!("{account}-night-{n}");
            workload
                .jobs
                .push((account.to_owned(), key.clone(), job_body(account, &key)));
        }
    }
    // The first half is decided before midnight; then midnight passes and
    // Postgres restarts at that moment, while the second half arrives.
    let (before, after) = workload.jobs.split_at(90);
    publish_all(env.jobs_exchange(), before.to_vec()).await;
    let broker = Broker::connect().await;
    let decided = || async {
        broker.depth_of(&env.delivery_queue()).await + broker.depth_of(&env.dead_queue()).await
    };
    eventually(WAIT, || async { decided().await >= 90 }).await;
    clock.set(utc("2026-03-02T18:30:05Z"));
    let publisher = tokio::spawn(publish_all(env.jobs_exchange(), after.to_vec()));
    postgres.restart();
    publisher.await.unwrap();
    eventually(Duration::from_secs(90), || async { decided().await >= 180 }).await;
    for gate in gates {
        gate.shutdown().await;
    }

    let forwards = broker.take_all(&env.delivery_queue(), Duration::ZERO).await;
    let dead = broker.take_all(&env.dead_queue(), Duration::ZERO).await;
    let lost = lost_messages(&workload, &forwards, &dead, &HashSet::new());
    let per_day: Vec<(String, chrono::NaiveDate, i64)> = sqlx::query_as(
        "SELECT account_id, usage_day, count(*) FROM reservations GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let next_day = utc("2026-03-02T18:30:00Z");
    let retry_after_ok = dead.iter().all(|d| {
        header(d, "x-sendgate-retry-after").is_some_and(|at| {
            utc(&at) == next_day || utc(&at) == next_day + chrono::Duration::days(1)
        })
    });
    eprintln!(
        "\n### an account's midnight while Postgres restarts\n\n\
         | published | forwarded | daily_limit_reached | lost | charges per account and local day |\n\
         |---|---|---|---|---|\n| {} | {} | {} | **{lost}** | {per_day:?} |\n",
        workload.jobs.len(),
        forwards.len(),
        dead.len(),
    );
    assert_eq!(lost, 0, "I1: messages lost");
    assert!(
        dead.iter()
            .all(|d| d.routing_key.as_str() == "daily_limit_reached")
    );
    assert!(
        retry_after_ok,
        "each refusal names the start of the account's next day"
    );
    for (account, day, charges) in &per_day {
        assert!(
            *charges <= PRO_DAILY as i64,
            "I4: {account} charged {charges} on {day}"
        );
    }
    let days: HashSet<chrono::NaiveDate> = per_day.iter().map(|(_, day, _)| *day).collect();
    assert_eq!(days.len(), 2, "charges on both local days: {per_day:?}");
    for account in accounts {
        let total: i64 = per_day
            .iter()
            .filter(|(a, _, _)| a == account)
            .map(|r| r.2)
            .sum();
        assert_eq!(total, 40, "{account}: 20 on each day");
    }
    store.close().await;
    env.cleanup().await;
}
