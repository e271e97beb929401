//! `sendgate-bench`: how close the gate comes to RabbitMQ's own speed.
//!
//! Against the real services, interleaved and repeated:
//! - **P**: a pass-through (consume → publish to another queue with confirms
//!   awaited per 100 → multiple ack), same prefetch, message size and queue
//!   type as the gate, no database;
//! - **G**: `sendgate run` (the real binary, a separate process) gating the
//!   same number of jobs over 1,000 accounts of mixed plans;
//! - **H**: G with every job on one hot scale account;
//! - **H_m**: G with every job on one hot pro account whose daily limit is
//!   raised above the run's jobs: every job takes the account's lock;
//! - **F**: G over 100 free accounts, most jobs refused once their credits
//!   are spent;
//! - bytes per job written to the database and its WAL, per gate run;
//! - with `--processes`, G with several `sendgate run` processes; with
//!   `--history`, G on a database holding a large history;
//! - **L**: latency from publish to arrival downstream, at a steady rate of
//!   about a quarter of P, for P and G;
//! - peak RSS of the sendgate process.
//!
//! Throughput is measured on a preloaded queue, from the first arrival
//! downstream to the last. Every G and H run is checked for correctness
//! (per-account charges and queue totals match the plans). Results go to
//! `bench/results/` as Markdown and JSON.

mod fairness;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sendgate::config::Settings;
use sendgate::domain::ids::AccountId;
use sendgate::domain::plan::Plan;
use sendgate::store::Store;
use sqlx::migrate::MigrateDatabase;

#[derive(Parser, Debug)]
#[command(about = "Benchmark sendgate against a RabbitMQ pass-through")]
struct Args {
    /// Jobs per throughput run.
    #[arg(long, default_value_t = 30_000)]
    jobs: usize,
    /// Accounts in the mixed workload (G).
    #[arg(long, default_value_t = 1_000)]
    accounts: usize,
    /// Repetitions of each throughput measurement (P, G, H).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..), default_value_t = 3)]
    runs: usize,
    /// Repetitions of the latency measurement (P, then G). More than the
    /// throughput runs: now and then the broker stalls for a few hundred ms,
    /// and a round it hits reports that stall as its p99, for P as for G;
    /// the median of 7 rounds is not moved by one or two of them.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..), default_value_t = 7)]
    latency_runs: usize,
    /// Length of each latency run, in seconds.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), default_value_t = 10)]
    latency_secs: u64,
    /// Prefetch for both the pass-through and sendgate.
    #[arg(long, default_value_t = 500)]
    prefetch: u16,
    /// The sendgate binary to run.
    #[arg(long, default_value = "target/release/sendgate")]
    sendgate: PathBuf,
    /// Where to write results.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Measure latency only, at this offered rate (msg/s), and skip the
    /// throughput runs; for tuning. Nothing is written to `--out`.
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Extra `SENDGATE__…=value` settings for the gate, repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_setting)]
    set: Vec<(String, String)>,
    /// Length of every job's idempotency key (run and job number, padded;
    /// never shorter than those: 1 gives the short keys of runs before
    /// 2026-11-30).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=255), default_value_t = 40)]
    key_length: usize,
    /// G again with this many sendgate processes on the same queue, for
    /// each number given (`--processes 2,4`); invariants checked each run.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=16))]
    processes: Vec<usize>,
    /// How the throughput runs' jobs are published: through the jobs
    /// exchange into the partitions (`exchange`), or all to the send queue
    /// (`queue`, one FIFO, as before partitions); a list runs each in turn.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "exchange")]
    route: Vec<Route>,
    /// Run only the fairness comparison, with a backlog of this many jobs
    /// (60000 for the figures in the README), and write its table.
    #[arg(long)]
    fairness: Option<usize>,
    /// G again after adding this many reservations of history to the
    /// database (generated with SQL: the G accounts' own, 40-character
    /// keys), next to G on the database as the runs left it.
    #[arg(long, default_value_t = 0)]
    history: u64,
}

/// A `--set` argument: an environment variable sendgate reads, so a typo
/// cannot silently run the gate with its defaults.
fn parse_setting(setting: &str) -> Result<(String, String), String> {
    let (key, value) = setting
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {setting:?}"))?;
    if !key.starts_with("SENDGATE__") {
        return Err(format!(
            "{key:?} is not a sendgate setting: write it as SENDGATE__<SECTION>__<KEY>, \
             for example SENDGATE__GATE__BATCH_WAIT_MS"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// How jobs reach the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
enum Route {
    /// Through the default exchange to the send queue.
    Queue,
    /// Through the jobs exchange, routing key = account: the partitions.
    Exchange,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Queue => "queue",
            Route::Exchange => "exchange",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Route::Queue => "to the send queue (one FIFO)",
            Route::Exchange => "through the jobs exchange (partitions)",
        }
    }
}

struct Names {
    send: String,
    jobs: String,
    delivery: String,
    dead: String,
    p_in: String,
    p_out: String,
    outcomes: String,
    deferred: String,
    wait: String,
    events: String,
}

struct Bench {
    args: Args,
    names: Names,
    db_url: String,
    amqp_url: String,
    channel: Channel,
    _connection: Connection,
    store: Store,
    /// The gate's `[amqp] partitions`.
    partitions: u16,
}

/// Whose jobs a gate run carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mix {
    /// G: 1,000 accounts of mixed plans.
    Mixed,
    /// H: one scale account (the unlocked path).
    HotScale,
    /// H_m: one pro account whose daily limit is raised above the run's
    /// jobs, so every job is charged through the locking (metered) path.
    HotPro,
    /// F: 100 free accounts, so most jobs are refused once their signup
    /// credits are spent (with 30,000 jobs: 2,000 pass, 28,000 refused).
    FreeHeavy,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Samples {
    p: Vec<f64>,
    g: Vec<f64>,
    h: Vec<f64>,
    h_m: Vec<f64>,
    f: Vec<f64>,
    lat_p_p50: Vec<f64>,
    lat_p_p99: Vec<f64>,
    lat_g_p50: Vec<f64>,
    lat_g_p99: Vec<f64>,
    rss_mib: Vec<f64>,
    /// CPU time per 1,000 jobs of each throughput run.
    cpu_p: Vec<Cpu>,
    cpu_g: Vec<Cpu>,
    cpu_h: Vec<Cpu>,
    cpu_h_m: Vec<Cpu>,
    /// The same during the latency runs (higher per job: batches are small
    /// there). For P the client is the whole benchmark process, so it
    /// includes publishing and timing the jobs.
    cpu_latency_p: Vec<Cpu>,
    cpu_latency_g: Vec<Cpu>,
    latency_rate: f64,
    /// Database growth and WAL per job of each G, H and H_m run.
    storage_g: Vec<Storage>,
    storage_h: Vec<Storage>,
    storage_h_m: Vec<Storage>,
    /// G with N processes: (N, rates).
    g_processes: Vec<(usize, Vec<f64>)>,
    /// G after the history was added, and how long adding it took.
    g_history: Vec<f64>,
    history_secs: f64,
    /// Retention emptying the old slot after the history runs: rows,
    /// bytes freed, WAL bytes, seconds.
    removal: Option<(i64, i64, i64, f64)>,
    /// G, H, H_m and F again for every further `--route`, same rounds.
    other_routes: Vec<RouteSamples>,
}

/// G, H, H_m and F of the rounds, for one way of publishing.
#[derive(Debug, Clone, serde::Serialize)]
struct RouteSamples {
    route: Route,
    g: Vec<f64>,
    h: Vec<f64>,
    h_m: Vec<f64>,
    f: Vec<f64>,
}

/// Bytes written per job by a run: growth of every relation (heap, indexes,
/// TOAST) and WAL.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct Storage {
    database: f64,
    wal: f64,
}

impl Storage {
    fn median(runs: &[Storage]) -> Self {
        Self {
            database: median(&runs.iter().map(|s| s.database).collect::<Vec<_>>()),
            wal: median(&runs.iter().map(|s| s.wal).collect::<Vec<_>>()),
        }
    }
}

/// One gate run's figures.
struct GateRun {
    rate: f64,
    rss: f64,
    cpu: Cpu,
    storage: Storage,
}

/// CPU time spent on a run, in ms per 1,000 jobs: by the broker, by
/// Postgres (every server process), and by the client moving the jobs
/// (sendgate for G and H, the benchmark's own process for P, where the
/// pass-through runs).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct Cpu {
    broker: f64,
    postgres: f64,
    client: f64,
}

impl Cpu {
    fn per_thousand(before: CpuTicks, after: CpuTicks, client_ticks: u64, jobs: usize) -> Self {
        let ms = |ticks: u64| {
            ticks as f64 * 1000.0 / clock_ticks() as f64 / (jobs.max(1) as f64 / 1000.0)
        };
        Self {
            broker: ms(after.broker.saturating_sub(before.broker)),
            postgres: ms(after.postgres.saturating_sub(before.postgres)),
            client: ms(client_ticks),
        }
    }

    fn median(runs: &[Cpu]) -> Self {
        let of = |f: fn(&Cpu) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        Self {
            broker: of(|c| c.broker),
            postgres: of(|c| c.postgres),
            client: of(|c| c.client),
        }
    }
}

impl std::fmt::Display for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0}/{:.0}/{:.0}",
            self.broker, self.postgres, self.client
        )
    }
}

/// Cumulative CPU ticks of the broker's and of Postgres's processes (the
/// services run on this machine).
#[derive(Debug, Default, Clone, Copy)]
struct CpuTicks {
    broker: u64,
    postgres: u64,
}

impl CpuTicks {
    fn now() -> Self {
        let mut ticks = Self::default();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return ticks;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            match process_ticks(pid) {
                Some((comm, used)) if comm == "beam.smp" => ticks.broker += used,
                Some((comm, used)) if comm == "postgres" => ticks.postgres += used,
                _ => {}
            }
        }
        ticks
    }
}

/// A process's name and its user plus system CPU ticks so far.
fn process_ticks(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let comm = stat[open + 1..close].to_owned();
    // After the name come the state (field 3) ... utime and stime (14, 15).
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// CPU ticks of one process so far (0 once it is gone).
fn ticks_of(pid: u32) -> u64 {
    process_ticks(pid).map_or(0, |(_, ticks)| ticks)
}

/// Clock ticks per second of the CPU times in /proc.
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn body(account: &str, key: &str, sent_ns: u128) -> Vec<u8> {
    serde_json::json!({
        "account_id": account,
        "idempotency_key": key,
        "campaign_id": "bench",
        "recipient": "+4915112345678",
        "voice_note_url": "https://cdn.example.com/notes/42.ogg",
        "sent_ns": sent_ns.to_string(),
    })
    .to_string()
    .into_bytes()
}

/// Accounts of the free-heavy mix (F).
const FREE_HEAVY_ACCOUNTS: usize = 100;

/// Job `i`'s key in `run`, padded to `length` characters.
fn job_key(run: &str, i: usize, length: usize) -> String {
    let key = format!("{run}-{i}");
    let pad = length.saturating_sub(key.len() + 1);
    if pad == 0 {
        key
    } else {
        format!("{run}-{}-{i}", "0".repeat(pad))
    }
}

fn persistent() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

fn account_id(id: &str) -> anyhow::Result<AccountId> {
    Ok(AccountId::parse(id)?)
}

impl Bench {
    /// Bytes of every relation of the database's own tables, and the WAL
    /// position.
    async fn storage_now(&self) -> anyhow::Result<(i64, i64)> {
        let row: (i64, i64) = sqlx::query_as(
            "SELECT (SELECT sum(pg_total_relation_size(c.oid))::int8 FROM pg_class c
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'm')),
                    pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8",
        )
        .fetch_one(self.store.pool())
        .await?;
        Ok(row)
    }

    /// Retention's removal, measured: makes the ring's current slot look a
    /// window old and empties the other one, as the sweep does (the same
    /// function). Returns (rows removed, bytes freed, WAL bytes written,
    /// seconds taken).
    async fn empty_old_slot(&self) -> anyhow::Result<(i64, i64, i64, f64)> {
        let pool = self.store.pool();
        let other: i16 = sqlx::query_scalar("SELECT (3 - current)::int2 FROM reservation_ring")
            .fetch_one(pool)
            .await?;
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations WHERE slot = $1")
            .bind(other)
            .fetch_one(pool)
            .await?;
        sqlx::query("UPDATE reservation_ring SET since = now() - interval '8 days'")
            .execute(pool)
            .await?;
        let (db_before, wal_before) = self.storage_now().await?;
        let started = Instant::now();
        let emptied: Option<i16> =
            sqlx::query_scalar("SELECT rotate_reservation_ring(interval '7 days')")
                .fetch_one(pool)
                .await?;
        let secs = started.elapsed().as_secs_f64();
        ensure!(emptied == Some(other), "slot {other} was not emptied");
        let (db_after, wal_after) = self.storage_now().await?;
        Ok((rows, db_before - db_after, wal_after - wal_before, secs))
    }

    /// Adds `rows` reservations of history for the accounts `prefix-0` ..
    /// `prefix-{accounts - 1}`, settled long ago, with keys as long as the
    /// runs' own; then VACUUM ANALYZE. Returns how long it took.
    async fn add_history(&self, prefix: &str, rows: u64) -> anyhow::Result<f64> {
        let started = Instant::now();
        let chunk = 1_000_000u64;
        let mut done = 0;
        // One connection with no statement timeout: a chunk and the vacuum
        // take longer than the gate's statements may.
        let mut conn = self.store.pool().acquire().await?;
        sqlx::query("SET statement_timeout = 0")
            .execute(&mut *conn)
            .await?;
        while done < rows {
            let n = chunk.min(rows - done);
            sqlx::query(
                "INSERT INTO reservations
                     (id, account_id, idempotency_key, payload_digest, plan, charge, usage_day,
                      remaining, forward_confirmed, created_at, confirmed_at, state, settled_at,
                      slot)
                 SELECT gen_random_uuid(), $1 || '-' || (i % $2),
                        'hist-' || lpad(i::text, $3 - 5, '0'),
                        substr(sha256(i::text::bytea), 1, 16),
                        CASE WHEN i % $2 % 10 < 2 THEN 'free'
                             WHEN i % $2 % 10 < 5 THEN 'pro' ELSE 'scale' END,
                        CASE WHEN i % $2 % 10 < 2 THEN 'credit'
                             WHEN i % $2 % 10 < 5 THEN 'daily_slot' ELSE 'unmetered' END,
                        CASE WHEN i % $2 % 10 BETWEEN 2 AND 4
                             THEN (now() - interval '1 day' - interval '1 second' * i / 100)::date END,
                        NULL, true,
                        now() - interval '1 day' - interval '1 second' * i / 100,
                        now() - interval '1 day', 'committed',
                        now() - interval '1 day',
                        -- As retention keeps them: Free charges in the
                        -- kept slot, the others over both ring slots
                        -- (the window before and the current one).
                        CASE WHEN i % $2 % 10 < 2 THEN 0 ELSE 1 + i % 2 END
                 FROM generate_series($4::int8, $5::int8) AS i",
            )
            .bind(prefix)
            .bind(self.args.accounts as i64)
            .bind(self.args.key_length as i32)
            .bind(done as i64 + 1)
            .bind((done + n) as i64)
            .execute(&mut *conn)
            .await?;
            done += n;
            eprintln!("  history: {done} of {rows} reservations");
        }
        sqlx::raw_sql("VACUUM ANALYZE reservations")
            .execute(&mut *conn)
            .await?;
        sqlx::query("RESET statement_timeout")
            .execute(&mut *conn)
            .await?;
        Ok(started.elapsed().as_secs_f64())
    }

    async fn depth(&self, queue: &str) -> anyhow::Result<u32> {
        let q = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(q.message_count())
    }

    async fn declare(&self, queue: &str) -> anyhow::Result<()> {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                sendgate::amqp::topology::quorum_arguments(),
            )
            .await?;
        Ok(())
    }

    async fn purge(&self, queue: &str) -> anyhow::Result<()> {
        self.channel
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await?;
        Ok(())
    }

    /// The partitions' queues, as the gate names them.
    fn partition_queues(&self) -> Vec<String> {
        (0..self.partitions)
            .map(|i| format!("{}.{i}", self.names.send))
            .collect()
    }

    /// Publishes `(account, body)` jobs as `route` says, with confirms, 500
    /// in flight at a time.
    async fn preload_routed(&self, route: Route, jobs: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
        for chunk in jobs.chunks(500) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for (account, b) in chunk {
                let (exchange, key) = match route {
                    Route::Queue => ("", self.names.send.as_str()),
                    Route::Exchange => (self.names.jobs.as_str(), account.as_str()),
                };
                confirms.push(
                    self.channel
                        .basic_publish(
                            exchange.into(),
                            key.into(),
                            BasicPublishOptions::default(),
                            b,
                            persistent(),
                        )
                        .await?,
                );
            }
            for c in confirms {
                ensure!(c.await?.is_ack(), "preload publish was nacked");
            }
        }
        Ok(())
    }

    /// Publishes bodies with confirms, 500 in flight at a time.
    async fn preload(&self, queue: &str, bodies: &[Vec<u8>]) -> anyhow::Result<()> {
        for chunk in bodies.chunks(500) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for b in chunk {
                confirms.push(
                    self.channel
                        .basic_publish(
                            "".into(),
                            queue.into(),
                            BasicPublishOptions::default(),
                            b,
                            persistent(),
                        )
                        .await?,
                );
            }
            for c in confirms {
                ensure!(c.await?.is_ack(), "preload publish was nacked");
            }
        }
        Ok(())
    }

    /// Seconds from the first arrival in `queues` to `total` arrivals.
    async fn time_arrivals(
        &self,
        queues: &[&str],
        total: u32,
        limit: Duration,
    ) -> anyhow::Result<f64> {
        let deadline = Instant::now() + limit;
        let mut first: Option<Instant> = None;
        loop {
            let mut sum = 0;
            for q in queues {
                sum += self.depth(q).await?;
            }
            if sum > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            if sum >= total {
                let start = first.unwrap_or_else(Instant::now);
                return Ok(start.elapsed().as_secs_f64().max(1e-6));
            }
            if Instant::now() > deadline {
                bail!("only {sum} of {total} messages arrived within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// `sendgate run` on `port`; `daily_sends` replaces the pro plan's
    /// daily limit.
    fn spawn_sendgate(&self, port: u16, daily_sends: Option<usize>) -> anyhow::Result<Child> {
        let mut command = Command::new(&self.args.sendgate);
        command
            .arg("run")
            .env("DATABASE_URL", &self.db_url)
            .env("AMQP_URL", &self.amqp_url)
            .env("SENDGATE__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("SENDGATE__AMQP__SEND_QUEUE", &self.names.send)
            .env("SENDGATE__AMQP__JOBS_EXCHANGE", &self.names.jobs)
            .env("SENDGATE__AMQP__DELIVERY_QUEUE", &self.names.delivery)
            .env("SENDGATE__AMQP__DEAD_LETTER_EXCHANGE", &self.names.dead)
            .env("SENDGATE__AMQP__DEAD_LETTER_QUEUE", &self.names.dead)
            .env("SENDGATE__AMQP__OUTCOMES_QUEUE", &self.names.outcomes)
            .env("SENDGATE__AMQP__DEFERRED_QUEUE", &self.names.deferred)
            .env("SENDGATE__AMQP__WAIT_QUEUE", &self.names.wait)
            .env("SENDGATE__AMQP__EVENTS_EXCHANGE", &self.names.events)
            .env("SENDGATE__AMQP__EVENTS_QUEUE", &self.names.events)
            .env("SENDGATE__AMQP__PREFETCH", self.args.prefetch.to_string())
            .env("SENDGATE__LOG__LEVEL", "warn")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (key, value) in &self.args.set {
            command.env(key, value);
        }
        if let Some(daily) = daily_sends {
            command.env("SENDGATE__PLANS__PRO__DAILY_SENDS", daily.to_string());
        }
        command
            .spawn()
            .with_context(|| format!("cannot start {}", self.args.sendgate.display()))
    }

    async fn wait_ready(&self, port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                stream.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await?;
                let mut response = String::new();
                stream.read_to_string(&mut response).await?;
                if response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200") {
                    return Ok(());
                }
            }
            ensure!(Instant::now() < deadline, "sendgate did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates this run's accounts: plan by index, so the mix is fixed.
    async fn create_accounts(
        &self,
        prefix: &str,
        count: usize,
    ) -> anyhow::Result<Vec<(String, Plan)>> {
        let mut accounts = Vec::with_capacity(count);
        for i in 0..count {
            let plan = match i % 10 {
                0 | 1 => Plan::Free,
                2..=4 => Plan::Pro,
                _ => Plan::Scale,
            };
            let id = format!("{prefix}-{i}");
            self.store
                .create_account(&account_id(&id)?, plan, "UTC")
                .await?;
            accounts.push((id, plan));
        }
        Ok(accounts)
    }

    /// P: consume `p_in`, publish to `p_out` with confirms per 100, ack
    /// with `multiple`. Runs until `stop`.
    async fn pass_through(
        amqp_url: String,
        from: String,
        to: String,
        prefetch: u16,
        stop: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<()> {
        let connection = Connection::connect(&amqp_url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                from.as_str().into(),
                "bench-pass-through".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut pending = Vec::with_capacity(100);
        let mut last = None;
        loop {
            let next = if pending.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    next = consumer.next() => next,
                }
            } else {
                // A partial group is flushed when the queue goes quiet.
                match tokio::time::timeout(Duration::from_millis(1), consumer.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        flush(&mut pending, &mut last).await?;
                        continue;
                    }
                }
            };
            match next {
                Some(Ok(delivery)) => {
                    let confirm = channel
                        .basic_publish(
                            "".into(),
                            to.as_str().into(),
                            BasicPublishOptions::default(),
                            &delivery.data,
                            delivery.properties.clone(),
                        )
                        .await?;
                    pending.push(confirm);
                    last = Some(delivery);
                    if pending.len() >= 100 {
                        flush(&mut pending, &mut last).await?;
                    }
                }
                Some(Err(err)) => return Err(err.into()),
                None => break,
            }
        }
        let _ = connection.close(200, "done".into()).await;
        Ok(())
    }

    async fn run_p(&self) -> anyhow::Result<(f64, Cpu)> {
        let n = self.args.jobs;
        let bodies: Vec<Vec<u8>> = (0..n).map(|i| body("p", &format!("p-{i}"), 0)).collect();
        self.preload(&self.names.p_in, &bodies).await?;
        let (before, own) = (CpuTicks::now(), ticks_of(std::process::id()));
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(Self::pass_through(
            self.amqp_url.clone(),
            self.names.p_in.clone(),
            self.names.p_out.clone(),
            self.args.prefetch,
            stop.clone(),
        ));
        let secs = self
            .time_arrivals(&[&self.names.p_out], n as u32, Duration::from_secs(300))
            .await?;
        let (after, own) = (
            CpuTicks::now(),
            ticks_of(std::process::id()).saturating_sub(own),
        );
        stop.cancel();
        task.await??;
        self.purge(&self.names.p_out).await?;
        Ok((n as f64 / secs, Cpu::per_thousand(before, after, own, n)))
    }

    /// G or H: preload, start sendgate (`processes` of them on the same
    /// queue), time, check, stop.
    async fn run_gate(&self, run: &str, mix: Mix, processes: usize) -> anyhow::Result<GateRun> {
        self.run_gate_via(self.args.route[0], run, mix, processes)
            .await
    }

    /// A gate run whose jobs are published as `route` says.
    async fn run_gate_via(
        &self,
        route: Route,
        run: &str,
        mix: Mix,
        processes: usize,
    ) -> anyhow::Result<GateRun> {
        let n = self.args.jobs;
        let hot = |plan: Plan| async move {
            self.store
                .create_account(&account_id(&format!("{run}-hot"))?, plan, "UTC")
                .await?;
            anyhow::Ok(vec![(format!("{run}-hot"), plan)])
        };
        let accounts = match mix {
            Mix::Mixed => self.create_accounts(run, self.args.accounts).await?,
            Mix::HotScale => hot(Plan::Scale).await?,
            Mix::HotPro => hot(Plan::Pro).await?,
            Mix::FreeHeavy => {
                let mut free = Vec::with_capacity(FREE_HEAVY_ACCOUNTS);
                for i in 0..FREE_HEAVY_ACCOUNTS {
                    let id = format!("{run}-{i}");
                    self.store
                        .create_account(&account_id(&id)?, Plan::Free, "UTC")
                        .await?;
                    free.push((id, Plan::Free));
                }
                free
            }
        };
        let mut per_account: HashMap<&str, usize> = HashMap::new();
        let jobs: Vec<(String, Vec<u8>)> = (0..n)
            .map(|i| {
                let (id, _) = &accounts[i % accounts.len()];
                *per_account.entry(id.as_str()).or_default() += 1;
                (
                    id.clone(),
                    body(id, &job_key(run, i, self.args.key_length), 0),
                )
            })
            .collect();
        self.preload_routed(route, &jobs).await?;

        let (bytes_before, wal_before) = self.storage_now().await?;
        let before = CpuTicks::now();
        // H_m: a daily limit above the run's jobs (the check below expects it).
        let daily_sends = (mix == Mix::HotPro).then_some(n + 1);
        let mut children = Vec::with_capacity(processes);
        for _ in 0..processes {
            children.push(self.spawn_sendgate(free_port()?, daily_sends)?);
        }
        let timed = self
            .time_arrivals(
                &[&self.names.delivery, &self.names.dead],
                n as u32,
                Duration::from_secs(300),
            )
            .await;
        // sendgate's time includes its start-up, a few ms.
        let ticks = children.iter().map(|c| ticks_of(c.id())).sum();
        let cpu = Cpu::per_thousand(before, CpuTicks::now(), ticks, n);
        let rss = children
            .iter()
            .map(|c| peak_rss_mib(c.id()))
            .fold(0.0, f64::max);
        for child in &mut children {
            terminate(child)?;
        }
        let secs = timed?;
        let (bytes_after, wal_after) = self.storage_now().await?;
        let storage = Storage {
            database: (bytes_after - bytes_before) as f64 / n as f64,
            wal: (wal_after - wal_before) as f64 / n as f64,
        };

        // Correctness: charges per account and the queue totals match the plans.
        let limits = self.store.limits();
        let (mut expect_forwarded, mut expect_dead) = (0usize, 0usize);
        for (id, plan) in &accounts {
            let jobs = per_account.get(id.as_str()).copied().unwrap_or(0);
            let daily = daily_sends.unwrap_or(limits.daily_sends as usize);
            let allowed = match plan {
                Plan::Free => jobs.min(limits.signup_credits as usize),
                Plan::Pro => jobs.min(daily),
                Plan::Scale => jobs,
            };
            expect_forwarded += allowed;
            expect_dead += jobs - allowed;
            // This run's charges (not the history's).
            let charges: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM reservations
                 WHERE account_id = $1 AND idempotency_key LIKE $2 || '-%'",
            )
            .bind(id)
            .bind(run)
            .fetch_one(self.store.pool())
            .await?;
            ensure!(
                charges as usize == allowed,
                "{id} ({plan}) was charged {charges} times, allowed {allowed}"
            );
        }
        let forwarded = self.depth(&self.names.delivery).await? as usize;
        let dead = self.depth(&self.names.dead).await? as usize;
        ensure!(
            forwarded == expect_forwarded && dead == expect_dead,
            "forwarded {forwarded} (expected {expect_forwarded}), dead-lettered {dead} (expected {expect_dead})"
        );
        self.purge(&self.names.delivery).await?;
        self.purge(&self.names.dead).await?;
        Ok(GateRun {
            rate: n as f64 / secs,
            rss,
            cpu,
            storage,
        })
    }

    /// L: publish at `rate`/s for the configured time into `into`, measure
    /// publish-to-arrival latency in `out`. Returns (p50, p99) in ms.
    async fn latency(
        &self,
        into: &str,
        out: &str,
        account: &str,
        rate: f64,
    ) -> anyhow::Result<(f64, f64)> {
        let connection =
            Connection::connect(&self.amqp_url, ConnectionProperties::default()).await?;
        let consume = connection.create_channel().await?;
        consume.basic_qos(1000, BasicQosOptions::default()).await?;
        let mut consumer = consume
            .basic_consume(
                out.into(),
                "bench-latency".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let publish = connection.create_channel().await?;
        let total = (rate * self.args.latency_secs as f64) as usize;
        let collector = tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(total);
            while latencies.len() < total {
                let Ok(Some(Ok(delivery))) =
                    tokio::time::timeout(Duration::from_secs(30), consumer.next()).await
                else {
                    break;
                };
                let arrived = now_ns();
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&delivery.data)
                    && let Some(sent) = v["sent_ns"].as_str().and_then(|s| s.parse::<u128>().ok())
                {
                    latencies.push(arrived.saturating_sub(sent) as f64 / 1e6);
                }
            }
            latencies
        });
        let start = Instant::now();
        let key_prefix = format!("lat-{}", uuid::Uuid::new_v4().simple());
        for i in 0..total {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
            publish
                .basic_publish(
                    "".into(),
                    into.into(),
                    BasicPublishOptions::default(),
                    &body(account, &format!("{key_prefix}-{i}"), now_ns()),
                    persistent(),
                )
                .await?;
        }
        let mut latencies = collector.await?;
        let _ = connection.close(200, "done".into()).await;
        ensure!(
            latencies.len() == total,
            "latency run: {} of {total} arrived",
            latencies.len()
        );
        latencies.sort_by(f64::total_cmp);
        let pct =
            |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        Ok((pct(0.50), pct(0.99)))
    }
}

/// Awaits the confirms of a group, then acks the group with one `multiple` ack.
async fn flush(
    pending: &mut Vec<lapin::PublisherConfirm>,
    last: &mut Option<lapin::message::Delivery>,
) -> anyhow::Result<()> {
    for confirm in pending.drain(..) {
        ensure!(confirm.await?.is_ack(), "pass-through publish nacked");
    }
    if let Some(delivery) = last.take() {
        delivery.ack(BasicAckOptions { multiple: true }).await?;
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn terminate(child: &mut Child) -> anyhow::Result<()> {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    let status = child.wait()?;
    ensure!(status.success(), "sendgate exited with {status}");
    Ok(())
}

fn machine(postgres: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let rabbit = Command::new("rabbitmqctl")
        .args(["-q", "version"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), RabbitMQ {rabbit}, PostgreSQL {postgres}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings::load(None)?;
    let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let base = settings
        .database
        .url
        .expose()
        .rsplit_once('/')
        .map(|(b, _)| b.to_owned())
        .unwrap_or_default();
    let db_url = format!("{base}/sendgate_bench_{id}");
    let amqp_url = settings.amqp.url.expose().to_owned();
    let names = Names {
        send: format!("bench.{id}.send"),
        jobs: format!("bench.{id}.jobs"),
        delivery: format!("bench.{id}.delivery"),
        dead: format!("bench.{id}.dead"),
        p_in: format!("bench.{id}.p-in"),
        p_out: format!("bench.{id}.p-out"),
        outcomes: format!("bench.{id}.outcomes"),
        deferred: format!("bench.{id}.deferred"),
        wait: format!("bench.{id}.wait"),
        events: format!("bench.{id}.events"),
    };
    Store::create_database_if_missing(&db_url).await?;
    let mut db_settings = settings.database.clone();
    db_settings.url = sendgate::config::Secret::new(db_url.clone());
    let store = Store::connect_lazy(&db_settings, settings.limits())?;
    store.migrate().await?;
    let connection = Connection::connect(&amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // The gate's partitions: its own setting, unless `--set` changes it.
    let partitions = match args
        .set
        .iter()
        .find(|(k, _)| k == "SENDGATE__AMQP__PARTITIONS")
    {
        Some((_, value)) => value.parse().context("SENDGATE__AMQP__PARTITIONS")?,
        None => settings.amqp.partitions,
    };
    let bench = Bench {
        args,
        names,
        db_url,
        amqp_url,
        channel,
        _connection: connection,
        store,
        partitions,
    };

    // sendgate declares its own topology; declare it once up front so the
    // send queue exists for preloading.
    sendgate::amqp::declare_topology(&bench.channel, &{
        let mut a = settings.amqp.clone();
        a.send_queue = bench.names.send.clone();
        a.jobs_exchange = bench.names.jobs.clone();
        a.partitions = bench.partitions;
        a.delivery_queue = bench.names.delivery.clone();
        a.dead_letter_exchange = bench.names.dead.clone();
        a.dead_letter_queue = bench.names.dead.clone();
        a.outcomes_queue = bench.names.outcomes.clone();
        a.deferred_queue = bench.names.deferred.clone();
        a.wait_queue = bench.names.wait.clone();
        a.events_exchange = bench.names.events.clone();
        a.events_queue = bench.names.events.clone();
        a
    })
    .await?;
    bench.declare(&bench.names.p_in).await?;
    bench.declare(&bench.names.p_out).await?;

    let result = run_all(&bench).await;

    let ladder: Vec<String> = settings
        .amqp
        .deferral_steps()
        .into_iter()
        .map(|(_, q)| q.replace(&settings.amqp.deferred_queue, &bench.names.deferred))
        .collect();
    for q in ladder.iter().chain([
        &bench.names.send,
        &bench.names.delivery,
        &bench.names.dead,
        &bench.names.p_in,
        &bench.names.p_out,
        &bench.names.outcomes,
        &bench.names.deferred,
        &bench.names.wait,
        &bench.names.events,
    ]) {
        let _ = bench
            .channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for q in bench.partition_queues() {
        let _ = bench
            .channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let partitions = format!("{}.partitions", bench.names.jobs);
    for exchange in [
        &bench.names.dead,
        &bench.names.events,
        &bench.names.jobs,
        &partitions,
    ] {
        let _ = bench
            .channel
            .exchange_delete(
                exchange.as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
    }
    bench.store.close().await;
    let _ = sqlx::Postgres::force_drop_database(&bench.db_url).await;
    result
}

async fn run_all(bench: &Bench) -> anyhow::Result<()> {
    if let Some(backlog) = bench.args.fairness {
        return run_fairness(bench, backlog).await;
    }
    let mut s = Samples::default();
    let runs = bench.args.runs;
    let throughput_runs = if bench.args.latency_rate.is_some() {
        0
    } else {
        runs
    };
    eprintln!(
        "throughput: {throughput_runs} rounds of P, G, H, H_m with {} jobs each",
        bench.args.jobs
    );
    for round in 0..throughput_runs {
        let (p, cpu_p) = bench.run_p().await?;
        let g_run = bench.run_gate(&format!("g{round}"), Mix::Mixed, 1).await?;
        let h_run = bench
            .run_gate(&format!("h{round}"), Mix::HotScale, 1)
            .await?;
        let m_run = bench.run_gate(&format!("m{round}"), Mix::HotPro, 1).await?;
        let f_run = bench
            .run_gate(&format!("f{round}"), Mix::FreeHeavy, 1)
            .await?;
        s.f.push(f_run.rate);
        let (g, rss_g, cpu_g) = (g_run.rate, g_run.rss, g_run.cpu);
        let (h, rss_h, cpu_h) = (h_run.rate, h_run.rss, h_run.cpu);
        let (h_m, rss_h_m, cpu_h_m) = (m_run.rate, m_run.rss, m_run.cpu);
        s.storage_g.push(g_run.storage);
        s.storage_h.push(h_run.storage);
        s.storage_h_m.push(m_run.storage);
        eprintln!(
            "  round {}: P {p:.0}/s  G {g:.0}/s  H {h:.0}/s  H_m {h_m:.0}/s  F {:.0}/s  RSS {rss_g:.1}/{rss_h:.1}/{rss_h_m:.1} MiB",
            round + 1,
            f_run.rate
        );
        eprintln!(
            "    CPU ms per 1k jobs, broker/Postgres/client: P {cpu_p}  G {cpu_g}  H {cpu_h}  H_m {cpu_h_m}"
        );
        s.cpu_p.push(cpu_p);
        s.cpu_g.push(cpu_g);
        s.cpu_h.push(cpu_h);
        s.cpu_h_m.push(cpu_h_m);
        s.p.push(p);
        s.g.push(g);
        s.h.push(h);
        s.h_m.push(h_m);
        s.rss_mib.push(rss_g.max(rss_h).max(rss_h_m));
        for (i, &route) in bench.args.route.iter().enumerate().skip(1) {
            let rates = other_routes(bench, route, round).await?;
            eprintln!(
                "    {}: G {:.0}/s  H {:.0}/s  H_m {:.0}/s  F {:.0}/s",
                route.describe(),
                rates[0],
                rates[1],
                rates[2],
                rates[3]
            );
            if s.other_routes.len() < i {
                s.other_routes.push(RouteSamples {
                    route,
                    g: Vec::new(),
                    h: Vec::new(),
                    h_m: Vec::new(),
                    f: Vec::new(),
                });
            }
            let samples = &mut s.other_routes[i - 1];
            samples.g.push(rates[0]);
            samples.h.push(rates[1]);
            samples.h_m.push(rates[2]);
            samples.f.push(rates[3]);
        }
        for &processes in &bench.args.processes {
            let run = bench
                .run_gate(&format!("g{round}x{processes}"), Mix::Mixed, processes)
                .await?;
            eprintln!("    G with {processes} processes: {:.0}/s", run.rate);
            match s.g_processes.iter_mut().find(|(p, _)| *p == processes) {
                Some((_, rates)) => rates.push(run.rate),
                None => s.g_processes.push((processes, vec![run.rate])),
            }
        }
    }
    if bench.args.history > 0 && throughput_runs > 0 {
        eprintln!("history: adding {} reservations", bench.args.history);
        // The history belongs to the accounts of the runs that follow.
        for round in 0..throughput_runs {
            let prefix = format!("gh{round}");
            let share = bench.args.history / throughput_runs as u64;
            s.history_secs += bench.add_history(&prefix, share).await?;
        }
        // A database that grew to this size over days has long been
        // checkpointed: the runs should not pay for writing the history out.
        settle(bench).await;
        for round in 0..throughput_runs {
            let run = bench.run_gate(&format!("gh{round}"), Mix::Mixed, 1).await?;
            eprintln!("  round {}: G with history {:.0}/s", round + 1, run.rate);
            s.g_history.push(run.rate);
        }
        s.removal = Some(bench.empty_old_slot().await?);
        eprintln!("  retention: {:?}", s.removal);
    }
    settle(bench).await;
    s.latency_rate = bench
        .args
        .latency_rate
        .unwrap_or_else(|| (median(&s.p) / 4.0).round());
    eprintln!(
        "latency: {} rounds at {} msg/s for {} s",
        bench.args.latency_runs, s.latency_rate, bench.args.latency_secs
    );
    let scale_account = "lat-scale";
    bench
        .store
        .create_account(&account_id(scale_account)?, Plan::Scale, "UTC")
        .await?;
    for round in 0..bench.args.latency_runs {
        // P
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(Bench::pass_through(
            bench.amqp_url.clone(),
            bench.names.p_in.clone(),
            bench.names.p_out.clone(),
            bench.args.prefetch,
            stop.clone(),
        ));
        let jobs = (s.latency_rate * bench.args.latency_secs as f64) as usize;
        let (before, own) = (CpuTicks::now(), ticks_of(std::process::id()));
        let (p50, p99) = bench
            .latency(
                &bench.names.p_in,
                &bench.names.p_out,
                scale_account,
                s.latency_rate,
            )
            .await?;
        stop.cancel();
        task.await??;
        let own = ticks_of(std::process::id()).saturating_sub(own);
        let cpu_p = Cpu::per_thousand(before, CpuTicks::now(), own, jobs);
        // G
        let port = free_port()?;
        let mut child = bench.spawn_sendgate(port, None)?;
        bench.wait_ready(port).await?;
        let (before, own) = (CpuTicks::now(), ticks_of(child.id()));
        let lat = bench
            .latency(
                &bench.names.send,
                &bench.names.delivery,
                scale_account,
                s.latency_rate,
            )
            .await;
        let own = ticks_of(child.id()).saturating_sub(own);
        let cpu = Cpu::per_thousand(before, CpuTicks::now(), own, jobs);
        s.rss_mib.push(peak_rss_mib(child.id()));
        terminate(&mut child)?;
        let (g50, g99) = lat?;
        eprintln!(
            "  round {}: P p50 {p50:.2} ms p99 {p99:.2} ms | G p50 {g50:.2} ms p99 {g99:.2} ms | CPU ms per 1k jobs P {cpu_p} G {cpu}",
            round + 1
        );
        s.cpu_latency_p.push(cpu_p);
        s.cpu_latency_g.push(cpu);
        s.lat_p_p50.push(p50);
        s.lat_p_p99.push(p99);
        s.lat_g_p50.push(g50);
        s.lat_g_p99.push(g99);
    }
    if bench.args.latency_rate.is_some() {
        eprintln!(
            "latency medians: P p50 {:.2} p99 {:.2} ms | G p50 {:.2} p99 {:.2} ms | p99 G-P {:.2} ms",
            median(&s.lat_p_p50),
            median(&s.lat_p_p99),
            median(&s.lat_g_p50),
            median(&s.lat_g_p99),
            median(&s.lat_g_p99) - median(&s.lat_p_p99),
        );
        return Ok(());
    }
    write_results(bench, &s).await
}

/// G, H, H_m and F for each way the jobs were published, against P, from
/// the same rounds.
fn routes_table(bench: &Bench, s: &Samples) -> String {
    let p = median(&s.p);
    let mut rows = vec![(bench.args.route[0], &s.g, &s.h, &s.h_m, &s.f)];
    rows.extend(
        s.other_routes
            .iter()
            .map(|r| (r.route, &r.g, &r.h, &r.h_m, &r.f)),
    );
    let mut table = format!(
        "\n## By way of publishing ({} partitions)\n\n| jobs published | G | G/P | H | H/P | H_m | H_m/P | F |\n|---|---|---|---|---|---|---|---|\n",
        bench.partitions
    );
    for (route, g, h, h_m, f) in rows {
        let (g, h, h_m, f) = (median(g), median(h), median(h_m), median(f));
        table.push_str(&format!(
            "| {} | {g:.0} | {:.2} | {h:.0} | {:.2} | {h_m:.0} | {:.2} | {f:.0} |\n",
            route.describe(),
            g / p,
            h / p,
            h_m / p
        ));
    }
    table
}

/// The fairness comparison: both ways of publishing, one after the other.
async fn run_fairness(bench: &Bench, backlog: usize) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for route in [Route::Queue, Route::Exchange] {
        eprintln!("fairness: backlog of {backlog}, {}", route.describe());
        let run = bench.fairness(route, backlog).await?;
        bench.purge(&bench.names.delivery).await?;
        runs.push(run);
    }
    let postgres: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(bench.store.pool())
        .await?;
    let table = format!(
        "# sendgate fairness\n\n{}\n\nOne scale account's backlog queued first, then one job each for 20 other \
         scale accounts, then `sendgate run` started ({} partitions, prefetch {}); times from the \
         gate's start (its start-up included) to each forward's arrival downstream.\n\n{}",
        machine(&postgres),
        bench.partitions,
        bench.args.prefetch,
        fairness::report(&runs)
    );
    eprintln!("{table}");
    std::fs::create_dir_all(&bench.args.out)?;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    std::fs::write(bench.args.out.join(format!("{stamp}-fairness.md")), &table)?;
    Ok(())
}

/// G, H, H_m and F of one round, published as `route` says.
async fn other_routes(bench: &Bench, route: Route, round: usize) -> anyhow::Result<[f64; 4]> {
    let name = route.name();
    let mut rates = [0.0; 4];
    let mixes = [Mix::Mixed, Mix::HotScale, Mix::HotPro, Mix::FreeHeavy];
    for (i, (mix, letter)) in mixes.into_iter().zip(["g", "h", "m", "f"]).enumerate() {
        let run = format!("{letter}{round}{name}");
        rates[i] = bench.run_gate_via(route, &run, mix, 1).await?.rate;
    }
    Ok(rates)
}

/// Lets the work of the throughput runs finish before latency is measured:
/// a checkpoint of what Postgres still has to write, then a wait (at most
/// 30 s) until the machine's CPUs are mostly idle again (the broker compacts
/// its log after the queues were drained).
async fn settle(bench: &Bench) {
    if let Err(err) = sqlx::query("CHECKPOINT").execute(bench.store.pool()).await {
        eprintln!("settle: CHECKPOINT failed ({err}); going on");
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let before = cpu_times();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = cpu_times();
        let (busy, total) = (after.0 - before.0, after.1 - before.1);
        if total > 0 && (busy as f64) < 0.1 * total as f64 {
            break;
        }
    }
    eprintln!("settled for {:.1} s", started.elapsed().as_secs_f64());
}

/// (busy, total) jiffies of all CPUs, from /proc/stat; zeros where it is
/// not available.
fn cpu_times() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle and iowait are the 4th and 5th fields.
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

async fn write_results(bench: &Bench, s: &Samples) -> anyhow::Result<()> {
    let postgres: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(bench.store.pool())
        .await
        .unwrap_or_default();
    let machine = machine(&postgres);
    let (p, g, h, h_m) = (median(&s.p), median(&s.g), median(&s.h), median(&s.h_m));
    let rss = s.rss_mib.iter().copied().fold(0.0, f64::max);
    let lat_diff = median(&s.lat_g_p99) - median(&s.lat_p_p99);
    let (cpu_p, cpu_g, cpu_h, cpu_h_m, cpu_lp, cpu_l) = (
        Cpu::median(&s.cpu_p),
        Cpu::median(&s.cpu_g),
        Cpu::median(&s.cpu_h),
        Cpu::median(&s.cpu_h_m),
        Cpu::median(&s.cpu_latency_p),
        Cpu::median(&s.cpu_latency_g),
    );
    let rate = s.latency_rate;
    let cpu_rows: String = [
        ("P, full load".to_owned(), cpu_p, false),
        ("G, full load".to_owned(), cpu_g, true),
        ("H, full load".to_owned(), cpu_h, true),
        ("H_m, full load".to_owned(), cpu_h_m, true),
        (
            format!("P, latency run at {rate:.0} msg/s (client: the whole benchmark, publisher included)"),
            cpu_lp,
            false,
        ),
        (format!("G, latency run at {rate:.0} msg/s"), cpu_l, true),
    ]
    .iter()
    .map(|(run, cpu, database)| {
        let postgres = if *database {
            format!("{:.0}", cpu.postgres)
        } else {
            "—".to_owned()
        };
        format!("| {run} | {:.0} | {postgres} | {:.0} |\n", cpu.broker, cpu.client)
    })
    .collect();
    let (st_g, st_h, st_h_m) = (
        Storage::median(&s.storage_g),
        Storage::median(&s.storage_h),
        Storage::median(&s.storage_h_m),
    );
    let f = median(&s.f);
    let mut extra = format!(
        "| F: sendgate, 100 free accounts, most jobs refused once credits run out | {f:.0} msg/s, F/P {:.2} | — |\n",
        f / p
    );
    for (processes, rates) in &s.g_processes {
        let rate = median(rates);
        extra.push_str(&format!(
            "| G with {processes} sendgate processes on the queue (same machine) | {rate:.0} msg/s, G/P {:.2} | — |\n",
            rate / p
        ));
    }
    if !s.g_history.is_empty() {
        let gh = median(&s.g_history);
        extra.push_str(&format!(
            "| G after {} reservations of history were added (in {:.0} s) | {gh:.0} msg/s, G/P {:.2}, {:.2} × G | ≥ 0.9 × G |\n",
            bench.args.history,
            s.history_secs,
            gh / p,
            gh / g
        ));
    }
    if let Some((rows, freed, wal, secs)) = s.removal {
        extra.push_str(&format!(
            "| Retention: the old ring slot emptied ({rows} Pro and Scale charges) | {:.0} ms, {:.0} MB freed, {wal} bytes of WAL | — |\n",
            secs * 1000.0,
            freed as f64 / 1e6
        ));
    }
    let storage_rows: String = [("G", st_g), ("H (scale)", st_h), ("H_m (pro)", st_h_m)]
        .iter()
        .map(|(run, st)| format!("| {run} | {:.0} | {:.0} |\n", st.database, st.wal))
        .collect();
    let when = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
    let table = format!(
        "Measured {when} on {machine}; {jobs} jobs per run, {accounts} accounts (G), {key_length}-character keys, prefetch {prefetch}; medians of {runs} throughput runs and of {latency_runs} latency runs of {latency_secs} s.\n\n\
| figure | result | target |\n|---|---|---|\n\
| P: pass-through | {p:.0} msg/s | — |\n\
| G: sendgate, 1,000 accounts, mixed plans | {g:.0} msg/s | — |\n\
| H: sendgate, one hot scale account | {h:.0} msg/s | — |\n\
| H_m: sendgate, one hot pro account (every job takes the account lock) | {h_m:.0} msg/s | — |\n\
| G / P | {gp:.2} | ≥ 0.8 |\n\
| H / P | {hp:.2} | ≥ 0.6 |\n\
| H_m / P | {hmp:.2} | ≥ 0.8 |\n\
| latency at {rate:.0} msg/s, P p50 / p99 | {pl50:.2} / {pl99:.2} ms | — |\n\
| latency at {rate:.0} msg/s, G p50 / p99 | {gl50:.2} / {gl99:.2} ms | — |\n\
| p99 latency, G minus P | {lat_diff:.2} ms | ≤ 10 ms |\n\
| peak RSS of sendgate | {rss:.1} MiB | ≤ 64 MiB |\n\
{extra}\n\
Bytes written per job, medians (database: growth of every table, index and TOAST relation; WAL: write-ahead log), before any retention:\n\n\
| run | database | WAL |\n|---|---|---|\n\
{storage_rows}\n\
CPU time per 1,000 jobs, medians, in ms, summed over the machine's cores:\n\n\
| run | broker | Postgres | client (P: the pass-through; G, H, H_m: sendgate) |\n|---|---|---|---|\n\
{cpu_rows}",
        machine = machine,
        jobs = bench.args.jobs,
        accounts = bench.args.accounts,
        key_length = bench.args.key_length,
        prefetch = bench.args.prefetch,
        runs = bench.args.runs,
        latency_runs = bench.args.latency_runs,
        latency_secs = bench.args.latency_secs,
        gp = g / p,
        hp = h / p,
        hmp = h_m / p,
        pl50 = median(&s.lat_p_p50),
        pl99 = median(&s.lat_p_p99),
        gl50 = median(&s.lat_g_p50),
        gl99 = median(&s.lat_g_p99),
    );
    let mut table = table;
    table.push_str(&routes_table(bench, s));
    std::fs::create_dir_all(&bench.args.out)?;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let md = bench.args.out.join(format!("{stamp}.md"));
    std::fs::write(&md, &table)?;
    std::fs::write(bench.args.out.join("latest.md"), &table)?;
    let json = serde_json::json!({
        "measured_at": when,
        "machine": machine,
        "jobs": bench.args.jobs,
        "accounts": bench.args.accounts,
        "key_length": bench.args.key_length,
        "history": bench.args.history,
        "prefetch": bench.args.prefetch,
        "runs": bench.args.runs,
        "latency_runs": bench.args.latency_runs,
        "latency_secs": bench.args.latency_secs,
        "samples": s,
        "medians": {"p": p, "g": g, "h": h, "h_m": h_m, "f": f, "g_over_p": g / p, "h_over_p": h / p,
                    "h_m_over_p": h_m / p,
                    "latency_p99_diff_ms": lat_diff, "peak_rss_mib": rss,
                    "bytes_per_job": {"g": st_g, "h": st_h, "h_m": st_h_m},
                    "cpu_ms_per_1000_jobs": {"p": cpu_p, "g": cpu_g, "h": cpu_h, "h_m": cpu_h_m,
                                             "p_latency": cpu_lp, "g_latency": cpu_l}},
    });
    std::fs::write(
        bench.args.out.join(format!("{stamp}.json")),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(
        bench.args.out.join("latest.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let mut stdout = std::io::stdout().lock();
    std::io::Write::write_all(&mut stdout, table.as_bytes())?;
    Ok(())
}
