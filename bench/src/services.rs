//! The services a benchmark runs against: the broker (queues, preloading,
//! timing arrivals), Postgres (storage, history), `sendgate run` processes,
//! and the machine (CPU ticks, RSS).

#[allow(unused_imports)]
use super::*;

impl Bench {
    /// Bytes of every relation of the database's own tables, and the WAL
    /// position.
    pub(crate) async fn storage_now(&self) -> anyhow::Result<(i64, i64)> {
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
    pub(crate) async fn empty_old_slot(&self) -> anyhow::Result<(i64, i64, i64, f64)> {
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
        // The window is the database's own (retention_settings, 7 days by
        // default): the current slot now looks older than it.
        let emptied: Option<i16> = sqlx::query_scalar("SELECT rotate_reservation_ring()")
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
    pub(crate) async fn add_history(&self, prefix: &str, rows: u64) -> anyhow::Result<f64> {
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

    pub(crate) async fn depth(&self, queue: &str) -> anyhow::Result<u32> {
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

    pub(crate) async fn declare(&self, queue: &str) -> anyhow::Result<()> {
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

    pub(crate) async fn purge(&self, queue: &str) -> anyhow::Result<()> {
        self.channel
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await?;
        Ok(())
    }

    /// The partitions' queues, as the gate names them.
    pub(crate) fn partition_queues(&self) -> Vec<String> {
        (0..self.partitions)
            .map(|i| format!("{}.{i}", self.names.send))
            .collect()
    }

    /// Publishes `(account, body)` jobs as `route` says, with confirms, 500
    /// in flight at a time.
    pub(crate) async fn preload_routed(
        &self,
        route: Route,
        jobs: &[(String, Vec<u8>)],
    ) -> anyhow::Result<()> {
        let routed = jobs.iter().map(|(account, body)| {
            let (exchange, key) = match route {
                Route::Queue => ("", self.names.send.as_str()),
                Route::Exchange => (self.names.jobs.as_str(), account.as_str()),
            };
            (exchange, key, body.as_slice())
        });
        self.publish_confirmed(routed.collect()).await
    }

    /// Publishes bodies to `queue` with confirms, 500 in flight at a time.
    pub(crate) async fn preload(&self, queue: &str, bodies: &[Vec<u8>]) -> anyhow::Result<()> {
        let routed = bodies.iter().map(|body| ("", queue, body.as_slice()));
        self.publish_confirmed(routed.collect()).await
    }

    /// Publishes `(exchange, routing key, body)` messages persistent, with
    /// confirms, 500 in flight at a time.
    async fn publish_confirmed(&self, messages: Vec<(&str, &str, &[u8])>) -> anyhow::Result<()> {
        for chunk in messages.chunks(500) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for (exchange, key, body) in chunk {
                confirms.push(
                    self.channel
                        .basic_publish(
                            (*exchange).into(),
                            (*key).into(),
                            BasicPublishOptions::default(),
                            body,
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
    pub(crate) async fn time_arrivals(
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
    pub(crate) fn spawn_sendgate(
        &self,
        port: u16,
        daily_sends: Option<usize>,
    ) -> anyhow::Result<Child> {
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

    pub(crate) async fn wait_ready(&self, port: u16) -> anyhow::Result<()> {
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
}

/// Awaits the confirms of a group, then acks the group with one `multiple` ack.
pub(crate) async fn flush(
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

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) fn peak_rss_mib(pid: u32) -> f64 {
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

pub(crate) fn terminate(child: &mut Child) -> anyhow::Result<()> {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    let status = child.wait()?;
    ensure!(status.success(), "sendgate exited with {status}");
    Ok(())
}

pub(crate) fn machine(postgres: &str) -> String {
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

/// Lets the work of the throughput runs finish before latency is measured:
/// a checkpoint of what Postgres still has to write, then a wait (at most
/// 30 s) until the machine's CPUs are mostly idle again (the broker compacts
/// its log after the queues were drained).
pub(crate) async fn settle(bench: &Bench) {
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
pub(crate) fn cpu_times() -> (u64, u64) {
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

/// Cumulative CPU ticks of the broker's and of Postgres's processes (the
/// services run on this machine).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CpuTicks {
    pub(crate) broker: u64,
    pub(crate) postgres: u64,
}

impl CpuTicks {
    pub(crate) fn now() -> Self {
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
pub(crate) fn process_ticks(pid: u32) -> Option<(String, u64)> {
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
pub(crate) fn ticks_of(pid: u32) -> u64 {
    process_ticks(pid).map_or(0, |(_, ticks)| ticks)
}

/// Clock ticks per second of the CPU times in /proc.
pub(crate) fn clock_ticks() -> u64 {
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
