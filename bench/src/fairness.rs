//! The fairness run: one account's backlog queued first, then one job each
//! for 20 other accounts, then the gate started. For the 20: the median and
//! largest time from the gate's start to their forward, and how many were
//! forwarded before a quarter of the backlog was; against the backlog's own
//! drain time. Once with every job in the send queue (one FIFO, as before
//! partitions), once through the jobs exchange into the partitions.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use sendgate::domain::plan::Plan;

use crate::report::median;
use crate::services::{free_port, terminate};
use crate::workloads::{account_id, body, persistent};
use crate::{Bench, Route};

/// Accounts with one job each.
const QUIET: usize = 20;

/// What one fairness run measured.
pub struct Fairness {
    pub route: Route,
    pub backlog: usize,
    /// Seconds from the gate's start to each quiet job's forward.
    pub quiet_secs: Vec<f64>,
    /// Quiet jobs forwarded before a quarter of the backlog was.
    pub before_quarter: usize,
    /// Quiet accounts whose partition is the backlog's.
    pub sharing: usize,
    pub quarter_secs: f64,
    pub drain_secs: f64,
}

impl Bench {
    /// Publishes one job, as `route` says.
    async fn publish_one(&self, route: Route, account: &str, body: &[u8]) -> anyhow::Result<()> {
        let (exchange, key) = match route {
            Route::Queue => ("", self.names.send.as_str()),
            Route::Exchange => (self.names.jobs.as_str(), account),
        };
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                persistent(),
            )
            .await?
            .await?;
        ensure!(confirm.is_ack(), "a fairness job was nacked");
        Ok(())
    }

    /// The job queue (index into the partitions) holding the most jobs.
    async fn fullest_partition(&self) -> anyhow::Result<Vec<u32>> {
        let mut depths = Vec::new();
        for queue in self.partition_queues() {
            depths.push(self.depth(&queue).await?);
        }
        Ok(depths)
    }

    /// Publishes one job for each quiet account; returns how many of them
    /// landed in the backlog's partition (the fullest).
    async fn publish_quiet(&self, route: Route, run: &str) -> anyhow::Result<usize> {
        let before = self.fullest_partition().await?;
        let mut sharing = 0;
        for q in 0..QUIET {
            let account = format!("{run}-q{q}");
            self.store
                .create_account(&account_id(&account)?, Plan::Scale, "UTC")
                .await?;
            let depths = self.fullest_partition().await?;
            self.publish_one(route, &account, &body(&account, &format!("{run}-only"), 0))
                .await?;
            let after = self.fullest_partition().await?;
            // The backlog's partition is the one that held it.
            let home = (0..before.len()).max_by_key(|i| before[*i]);
            if route == Route::Exchange && home.is_some_and(|h| after[h] > depths[h]) {
                sharing += 1;
            }
        }
        Ok(sharing)
    }

    pub async fn fairness(&self, route: Route, backlog: usize) -> anyhow::Result<Fairness> {
        let run = format!("fair-{}", route.name());
        let big = format!("{run}-big");
        self.store
            .create_account(&account_id(&big)?, Plan::Scale, "UTC")
            .await?;
        let jobs: Vec<(String, Vec<u8>)> = (0..backlog)
            .map(|i| (big.clone(), body(&big, &format!("{run}-b{i}"), 0)))
            .collect();
        self.preload_routed(route, &jobs).await?;
        let sharing = self.publish_quiet(route, &run).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let consumer = self
            .channel
            .basic_consume(
                self.names.delivery.as_str().into(),
                format!("{run}-downstream").into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let forwards = tokio::spawn(async move {
            let mut consumer = consumer;
            while let Some(Ok(delivery)) = consumer.next().await {
                let body: serde_json::Value =
                    serde_json::from_slice(&delivery.data).unwrap_or_default();
                let account = body["account_id"].as_str().unwrap_or_default().to_owned();
                if tx.send((Instant::now(), account)).is_err() {
                    break;
                }
            }
        });
        let started = Instant::now();
        let mut child = self.spawn_sendgate(free_port()?, None)?;
        let deadline = started + Duration::from_secs(600);
        let (mut big_done, mut quarter, mut drained) = (0usize, None, None);
        let mut quiet_at: HashMap<String, f64> = HashMap::new();
        let mut before_quarter = 0;
        while big_done < backlog || quiet_at.len() < QUIET {
            let next = tokio::time::timeout_at(deadline.into(), rx.recv()).await;
            let (at, account) = next
                .context("the fairness run did not finish in 10 minutes")?
                .context("the downstream consumer ended")?;
            let secs = at.duration_since(started).as_secs_f64();
            if account == big {
                big_done += 1;
                if big_done == backlog / 4 {
                    quarter = Some(secs);
                }
                if big_done == backlog {
                    drained = Some(secs);
                }
            } else if quiet_at.insert(account, secs).is_none() && quarter.is_none() {
                before_quarter += 1;
            }
        }
        terminate(&mut child)?;
        forwards.abort();
        let _ = self
            .channel
            .basic_cancel(format!("{run}-downstream").into(), Default::default())
            .await;
        Ok(Fairness {
            route,
            backlog,
            quiet_secs: quiet_at.into_values().collect(),
            before_quarter,
            sharing,
            quarter_secs: quarter.context("a quarter of the backlog")?,
            drain_secs: drained.context("the whole backlog")?,
        })
    }
}

/// The fairness table, Markdown.
pub fn report(runs: &[Fairness]) -> String {
    let mut table = String::from(
        "| jobs published | backlog | 20 quiet accounts: median to forward | max | forwarded before 1/4 of the backlog | sharing the backlog's partition | 1/4 of the backlog drained | whole backlog drained |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let max = r.quiet_secs.iter().copied().fold(0.0, f64::max);
        table.push_str(&format!(
            "| {} | {} | {:.2} s | {:.2} s | {} of {QUIET} | {} | {:.2} s | {:.2} s |\n",
            r.route.describe(),
            r.backlog,
            median(&r.quiet_secs),
            max,
            r.before_quarter,
            match r.route {
                Route::Queue => "-".to_owned(),
                Route::Exchange => r.sharing.to_string(),
            },
            r.quarter_secs,
            r.drain_secs,
        ));
    }
    table
}
