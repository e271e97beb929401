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
mod report;
mod services;
mod workloads;

use report::*;
use services::*;
use workloads::*;

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

    declare(&bench, &settings).await?;
    let result = run_all(&bench).await;
    remove(&bench, &settings).await;
    bench.store.close().await;
    let _ = sqlx::Postgres::force_drop_database(&bench.db_url).await;
    result
}

/// sendgate declares its own topology; it is declared once up front so the
/// queues exist for preloading, with the pass-through's two queues.
async fn declare(bench: &Bench, settings: &Settings) -> anyhow::Result<()> {
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
    Ok(())
}

/// Deletes the benchmark's queues and exchanges.
async fn remove(bench: &Bench, settings: &Settings) {
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
        throughput_round(bench, &mut s, round).await?;
    }
    if bench.args.history > 0 && throughput_runs > 0 {
        history_rounds(bench, &mut s, throughput_runs).await?;
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
        latency_round(bench, &mut s, round, scale_account).await?;
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

/// One round of the throughput runs: P, then G, H, H_m and F (for every
/// `--route`), then G with more processes.
async fn throughput_round(bench: &Bench, s: &mut Samples, round: usize) -> anyhow::Result<()> {
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
    Ok(())
}

/// G on a database holding `--history` reservations.
async fn history_rounds(
    bench: &Bench,
    s: &mut Samples,
    throughput_runs: usize,
) -> anyhow::Result<()> {
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
    Ok(())
}

/// One round of the latency runs: P, then G, at the same offered rate.
async fn latency_round(
    bench: &Bench,
    s: &mut Samples,
    round: usize,
    scale_account: &str,
) -> anyhow::Result<()> {
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
    Ok(())
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
