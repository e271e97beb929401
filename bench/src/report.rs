//! The samples a benchmark collects and the report it writes.

#[allow(unused_imports)]
use super::*;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct Samples {
    pub(crate) p: Vec<f64>,
    pub(crate) g: Vec<f64>,
    pub(crate) h: Vec<f64>,
    pub(crate) h_m: Vec<f64>,
    pub(crate) f: Vec<f64>,
    pub(crate) lat_p_p50: Vec<f64>,
    pub(crate) lat_p_p99: Vec<f64>,
    pub(crate) lat_g_p50: Vec<f64>,
    pub(crate) lat_g_p99: Vec<f64>,
    pub(crate) rss_mib: Vec<f64>,
    /// CPU time per 1,000 jobs of each throughput run.
    pub(crate) cpu_p: Vec<Cpu>,
    pub(crate) cpu_g: Vec<Cpu>,
    pub(crate) cpu_h: Vec<Cpu>,
    pub(crate) cpu_h_m: Vec<Cpu>,
    /// The same during the latency runs (higher per job: batches are small
    /// there). For P the client is the whole benchmark process, so it
    /// includes publishing and timing the jobs.
    pub(crate) cpu_latency_p: Vec<Cpu>,
    pub(crate) cpu_latency_g: Vec<Cpu>,
    pub(crate) latency_rate: f64,
    /// Database growth and WAL per job of each G, H and H_m run.
    pub(crate) storage_g: Vec<Storage>,
    pub(crate) storage_h: Vec<Storage>,
    pub(crate) storage_h_m: Vec<Storage>,
    /// G with N processes: (N, rates).
    pub(crate) g_processes: Vec<(usize, Vec<f64>)>,
    /// G after the history was added, and how long adding it took.
    pub(crate) g_history: Vec<f64>,
    pub(crate) history_secs: f64,
    /// Retention emptying the old slot after the history runs: rows,
    /// bytes freed, WAL bytes, seconds.
    pub(crate) removal: Option<(i64, i64, i64, f64)>,
    /// G, H, H_m and F again for every further `--route`, same rounds.
    pub(crate) other_routes: Vec<RouteSamples>,
}

/// G, H, H_m and F of the rounds, for one way of publishing.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct RouteSamples {
    pub(crate) route: Route,
    pub(crate) g: Vec<f64>,
    pub(crate) h: Vec<f64>,
    pub(crate) h_m: Vec<f64>,
    pub(crate) f: Vec<f64>,
}

/// Bytes written per job by a run: growth of every relation (heap, indexes,
/// TOAST) and WAL.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub(crate) struct Storage {
    pub(crate) database: f64,
    pub(crate) wal: f64,
}

impl Storage {
    pub(crate) fn median(runs: &[Storage]) -> Self {
        Self {
            database: median(&runs.iter().map(|s| s.database).collect::<Vec<_>>()),
            wal: median(&runs.iter().map(|s| s.wal).collect::<Vec<_>>()),
        }
    }
}

/// One gate run's figures.
pub(crate) struct GateRun {
    pub(crate) rate: f64,
    pub(crate) rss: f64,
    pub(crate) cpu: Cpu,
    pub(crate) storage: Storage,
}

/// CPU time spent on a run, in ms per 1,000 jobs: by the broker, by
/// Postgres (every server process), and by the client moving the jobs
/// (sendgate for G and H, the benchmark's own process for P, where the
/// pass-through runs).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub(crate) struct Cpu {
    pub(crate) broker: f64,
    pub(crate) postgres: f64,
    pub(crate) client: f64,
}

impl Cpu {
    pub(crate) fn per_thousand(
        before: CpuTicks,
        after: CpuTicks,
        client_ticks: u64,
        jobs: usize,
    ) -> Self {
        let ms = |ticks: u64| {
            ticks as f64 * 1000.0 / clock_ticks() as f64 / (jobs.max(1) as f64 / 1000.0)
        };
        Self {
            broker: ms(after.broker.saturating_sub(before.broker)),
            postgres: ms(after.postgres.saturating_sub(before.postgres)),
            client: ms(client_ticks),
        }
    }

    pub(crate) fn median(runs: &[Cpu]) -> Self {
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

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// G, H, H_m and F for each way the jobs were published, against P, from
/// the same rounds.
pub(crate) fn routes_table(bench: &Bench, s: &Samples) -> String {
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

pub(crate) async fn write_results(bench: &Bench, s: &Samples) -> anyhow::Result<()> {
    let postgres: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(bench.store.pool())
        .await
        .unwrap_or_default();
    let machine = machine(&postgres);
    let (p, g, h, h_m) = (median(&s.p), median(&s.g), median(&s.h), median(&s.h_m));
    let rss = s.rss_mib.iter().copied().fold(0.0, f64::max);
    let lat_diff = median(&s.lat_g_p99) - median(&s.lat_p_p99);
    let (cpu_p, cpu_g, cpu_h, cpu_h_m, cpu_lp, cpu_l) = cpu_medians(s);
    let cpu_rows = cpu_rows(s);
    let (st_g, st_h, st_h_m) = (
        Storage::median(&s.storage_g),
        Storage::median(&s.storage_h),
        Storage::median(&s.storage_h_m),
    );
    let f = median(&s.f);
    let extra = extra_rows(bench, s, p, g);
    let storage_rows: String = [("G", st_g), ("H (scale)", st_h), ("H_m (pro)", st_h_m)]
        .iter()
        .map(|(run, st)| format!("| {run} | {:.0} | {:.0} |\n", st.database, st.wal))
        .collect();
    let when = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
    let mut table = main_table(bench, s, &machine, &when, &extra, &storage_rows, &cpu_rows);
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
    write_json(bench, &stamp, &json)?;
    let mut stdout = std::io::stdout().lock();
    std::io::Write::write_all(&mut stdout, table.as_bytes())?;
    Ok(())
}

/// The CPU table's rows, medians per 1,000 jobs.
fn cpu_rows(s: &Samples) -> String {
    let (cpu_p, cpu_g, cpu_h, cpu_h_m, cpu_lp, cpu_l) = cpu_medians(s);
    let rate = s.latency_rate;
    [
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
    .collect()
}

/// The rows after the main figures: F, G with more processes, G with a
/// history, retention.
fn extra_rows(bench: &Bench, s: &Samples, p: f64, g: f64) -> String {
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
    extra
}

/// The results as JSON, stamped and as `latest.json`.
fn write_json(bench: &Bench, stamp: &str, json: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::write(
        bench.args.out.join(format!("{stamp}.json")),
        serde_json::to_string_pretty(json)?,
    )?;
    std::fs::write(
        bench.args.out.join("latest.json"),
        serde_json::to_string_pretty(json)?,
    )?;
    Ok(())
}

/// The report's first part: the main figures, storage and CPU.
fn main_table(
    bench: &Bench,
    s: &Samples,
    machine: &str,
    when: &str,
    extra: &str,
    storage_rows: &str,
    cpu_rows: &str,
) -> String {
    let (p, g, h, h_m) = (median(&s.p), median(&s.g), median(&s.h), median(&s.h_m));
    let rss = s.rss_mib.iter().copied().fold(0.0, f64::max);
    let lat_diff = median(&s.lat_g_p99) - median(&s.lat_p_p99);
    let rate = s.latency_rate;
    format!(
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
    )
}

/// The medians of CPU per 1,000 jobs: P, G, H, H_m at full load, then P and
/// G in the latency runs.
fn cpu_medians(s: &Samples) -> (Cpu, Cpu, Cpu, Cpu, Cpu, Cpu) {
    (
        Cpu::median(&s.cpu_p),
        Cpu::median(&s.cpu_g),
        Cpu::median(&s.cpu_h),
        Cpu::median(&s.cpu_h_m),
        Cpu::median(&s.cpu_latency_p),
        Cpu::median(&s.cpu_latency_g),
    )
}
