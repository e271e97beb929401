//! The workloads: the pass-through P, the gate runs (G, H, H_m, F) with
//! their correctness checks, and the latency runs.

#[allow(unused_imports)]
use super::*;

impl Bench {
    /// Creates this run's accounts: plan by index, so the mix is fixed.
    pub(crate) async fn create_accounts(
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
    pub(crate) async fn pass_through(
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

    pub(crate) async fn run_p(&self) -> anyhow::Result<(f64, Cpu)> {
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
    pub(crate) async fn run_gate(
        &self,
        run: &str,
        mix: Mix,
        processes: usize,
    ) -> anyhow::Result<GateRun> {
        self.run_gate_via(self.args.route[0], run, mix, processes)
            .await
    }

    /// A gate run whose jobs are published as `route` says.
    pub(crate) async fn run_gate_via(
        &self,
        route: Route,
        run: &str,
        mix: Mix,
        processes: usize,
    ) -> anyhow::Result<GateRun> {
        let n = self.args.jobs;
        let accounts = self.accounts_of(mix, run).await?;
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

        self.check_run(run, &accounts, &per_account, daily_sends)
            .await?;
        self.purge(&self.names.delivery).await?;
        self.purge(&self.names.dead).await?;
        Ok(GateRun {
            rate: n as f64 / secs,
            rss,
            cpu,
            storage,
        })
    }

    /// The accounts of a run of `mix`, created.
    async fn accounts_of(&self, mix: Mix, run: &str) -> anyhow::Result<Vec<(String, Plan)>> {
        let hot = |plan: Plan| async move {
            self.store
                .create_account(&account_id(&format!("{run}-hot"))?, plan, "UTC")
                .await?;
            anyhow::Ok(vec![(format!("{run}-hot"), plan)])
        };
        Ok(match mix {
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
        })
    }

    /// Correctness of a run: charges per account and the queue totals
    /// match the plans.
    async fn check_run(
        &self,
        run: &str,
        accounts: &[(String, Plan)],
        per_account: &HashMap<&str, usize>,
        daily_sends: Option<usize>,
    ) -> anyhow::Result<()> {
        let limits = self.store.limits();
        let (mut expect_forwarded, mut expect_dead) = (0usize, 0usize);
        for (id, plan) in accounts {
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
        Ok(())
    }

    /// L: publish at `rate`/s for the configured time into `into`, measure
    /// publish-to-arrival latency in `out`. Returns (p50, p99) in ms.
    pub(crate) async fn latency(
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

/// Whose jobs a gate run carries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mix {
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

pub(crate) fn body(account: &str, key: &str, sent_ns: u128) -> Vec<u8> {
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
pub(crate) const FREE_HEAVY_ACCOUNTS: usize = 100;

/// Job `i`'s key in `run`, padded to `length` characters.
pub(crate) fn job_key(run: &str, i: usize, length: usize) -> String {
    let key = format!("{run}-{i}");
    let pad = length.saturating_sub(key.len() + 1);
    if pad == 0 {
        key
    } else {
        format!("{run}-{}-{i}", "0".repeat(pad))
    }
}

pub(crate) fn persistent() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

pub(crate) fn account_id(id: &str) -> anyhow::Result<AccountId> {
    Ok(AccountId::parse(id)?)
}

pub(crate) fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// G, H, H_m and F of one round, published as `route` says.
pub(crate) async fn other_routes(
    bench: &Bench,
    route: Route,
    round: usize,
) -> anyhow::Result<[f64; 4]> {
    let name = route.name();
    let mut rates = [0.0; 4];
    let mixes = [Mix::Mixed, Mix::HotScale, Mix::HotPro, Mix::FreeHeavy];
    for (i, (mix, letter)) in mixes.into_iter().zip(["g", "h", "m", "f"]).enumerate() {
        let run = format!("{letter}{round}{name}");
        rates[i] = bench.run_gate_via(route, &run, mix, 1).await?.rate;
    }
    Ok(rates)
}
