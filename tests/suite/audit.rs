//! The self-audit: a real workload leaves it nothing to report; each
//! invariant broken by hand (as the schema's owner, the way a manual fix or
//! a bad restore would) is named with its account and check, by `sendgate
//! audit` and by the running process's metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;
use sendgate::clock::SystemClock;
use sendgate::domain::plan::Plan;
use sendgate::store::Store;

const WAIT: Duration = Duration::from_secs(30);

/// Every account's jobs forwarded, some reported failed or delivered, a
/// support correction; the usage rolled up. Returns nothing: the database
/// is the result.
async fn workload(env: &TestEnv, store: &Store) {
    let accounts = [
        ("free-a", Plan::Free),
        ("free-b", Plan::Free),
        ("pro-a", Plan::Pro),
        ("pro-b", Plan::Pro),
        ("scale-a", Plan::Scale),
    ];
    for (account, plan) in accounts {
        create(store, account, plan).await;
    }
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;
    for (account, _) in accounts {
        for n in 0..4 {
            let body = job_body(account, &format!("k{n}"));
            broker
                .publish_for(&env.jobs_exchange(), account, &body)
                .await;
        }
    }
    let forwards = broker.take(&env.delivery_queue(), 20, WAIT).await;
    assert_eq!(forwards.len(), 20);
    // The first forward of each account fails (a credit or a day's slot
    // given back), the second is delivered, the others stay held.
    let mut reported: BTreeMap<String, usize> = BTreeMap::new();
    for forward in &forwards {
        let job: serde_json::Value = serde_json::from_slice(&forward.data).unwrap();
        let n = reported
            .entry(job["account_id"].as_str().unwrap().to_owned())
            .or_default();
        let outcome = match *n {
            0 => "failed",
            1 => "delivered",
            _ => continue,
        };
        *n += 1;
        broker.report(env, forward, outcome).await;
    }
    eventually(WAIT, || async {
        let released: i64 =
            sqlx::query_scalar("SELECT count(*) FROM reservations WHERE state = 'released'")
                .fetch_one(store.pool())
                .await
                .unwrap();
        let committed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM reservations WHERE state = 'committed'")
                .fetch_one(store.pool())
                .await
                .unwrap();
        (released, committed) == (5, 5)
    })
    .await;
    let out = cli(
        env,
        &[
            "accounts",
            "adjust",
            "free-a",
            "--credits",
            "3",
            "--reason",
            "goodwill",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    // The roll-up has counted every charge into usage_counts.
    eventually(WAIT, || async {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_pending")
            .fetch_one(store.pool())
            .await
            .unwrap();
        pending == 0
    })
    .await;
    gate.shutdown().await;
}

fn audit_json(env: &TestEnv) -> (Option<i32>, serde_json::Value) {
    let out = cli(env, &["audit", "--json"]);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|err| panic!("{err}: {out:?}"));
    (out.status.code(), report)
}

fn found(report: &serde_json::Value) -> BTreeSet<(String, String)> {
    report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["check"].as_str().unwrap().to_owned(),
                v["account_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn owner_runs(store: &Store, statement: &'static str) {
    let changed = sqlx::query(statement)
        .execute(store.pool())
        .await
        .unwrap()
        .rows_affected();
    assert!(changed > 0, "{statement} changed nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_passes_a_real_workload_and_names_each_broken_invariant() {
    let env = TestEnv::new();
    let store = env.store().await;
    workload(&env, &store).await;

    let (code, report) = audit_json(&env);
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["accounts"], 5);
    assert_eq!(found(&report), BTreeSet::new(), "{report:#}");
    for check in [
        "ledger_balance",
        "credits_spent",
        "daily_limit",
        "usage_counts",
        "holds_expire",
    ] {
        assert_eq!(report["counts"][check], 0, "{report:#}");
    }

    // Each invariant broken once, for one account each.
    owner_runs(
        &store,
        "UPDATE accounts SET credit_balance = credit_balance + 1 WHERE id = 'free-a'",
    )
    .await;
    owner_runs(
        &store,
        "DELETE FROM reservations WHERE account_id = 'free-b' AND state = 'held'
         AND idempotency_key = (SELECT min(idempotency_key) FROM reservations
                                WHERE account_id = 'free-b' AND state = 'held')",
    )
    .await;
    owner_runs(
        &store,
        "UPDATE daily_usage SET used = used - 1 WHERE account_id = 'pro-a'",
    )
    .await;
    owner_runs(
        &store,
        "DELETE FROM usage_counts WHERE account_id = 'pro-b'",
    )
    .await;
    owner_runs(
        &store,
        "UPDATE reservations SET created_at = now() - interval '3 days'
         WHERE account_id = 'scale-a' AND state = 'held'",
    )
    .await;

    let (code, report) = audit_json(&env);
    assert_eq!(code, Some(1), "{report:#}");
    let expected: BTreeSet<(String, String)> = [
        ("ledger_balance", "free-a"),
        ("credits_spent", "free-b"),
        ("daily_limit", "pro-a"),
        ("usage_counts", "pro-b"),
        ("holds_expire", "scale-a"),
    ]
    .into_iter()
    .map(|(c, a)| (c.to_owned(), a.to_owned()))
    .collect();
    assert_eq!(found(&report), expected, "{report:#}");
    assert_eq!(report["counts"]["ledger_balance"], 1);
    let detail = |check: &str| {
        report["violations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["check"] == check)
            .unwrap()["detail"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        detail("ledger_balance"),
        "balance 21, but the ledger sums to 20"
    );
    assert!(detail("credits_spent").starts_with("2 credit charges stand, but the ledger spent 3"));
    assert!(
        detail("daily_limit").contains("but the day counts 2 used"),
        "{}",
        detail("daily_limit")
    );

    // The table names them too, and the exit code says so.
    let out = cli(&env, &["audit"]);
    assert_eq!(out.status.code(), Some(1));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("ledger_balance") && table.contains("free-a") && table.contains("scale-a"),
        "{table}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the audit found 5 violation(s)"),
        "{out:?}"
    );

    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_sendgate_audits_every_interval_and_exports_what_it_found() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__AUDIT__INTERVAL_SECS", "1");
    let store = env.store().await;
    create(&store, "free-a", Plan::Free).await;
    let process = Process::spawn(&env, false);
    process.wait_ready(WAIT).await;
    let metrics = || async {
        let (status, text) = http_get(process.addr(), "/metrics").await.unwrap();
        assert_eq!(status, 200);
        text
    };
    let violations =
        |text: &str, check: &str| series(text, "sendgate_audit_violations", &[("check", check)]);
    let last_audit =
        |text: &str| series(text, "sendgate_audit_last_completed_timestamp_seconds", &[]);
    // The ledger check's finding, once an audit reports exactly `n`.
    let ledger_finds = |n: f64| {
        eventually(WAIT, move || async move {
            violations(&metrics().await, "ledger_balance") == n
        })
    };
    // A first audit finds nothing.
    eventually(WAIT, || async {
        metrics()
            .await
            .contains("sendgate_audit_last_completed_timestamp_seconds")
    })
    .await;
    let text = metrics().await;
    assert_eq!(violations(&text, "ledger_balance"), 0.0);
    let first = last_audit(&text);

    owner_runs(
        &store,
        "UPDATE accounts SET credit_balance = 7 WHERE id = 'free-a'",
    )
    .await;
    ledger_finds(1.0).await;
    let text = metrics().await;
    assert!(last_audit(&text) > first);
    for check in [
        "credits_spent",
        "daily_limit",
        "usage_counts",
        "holds_expire",
    ] {
        assert_eq!(violations(&text, check), 0.0, "{check}");
    }
    // Put right, the next audit clears it.
    owner_runs(
        &store,
        "UPDATE accounts SET credit_balance = 20 WHERE id = 'free-a'",
    )
    .await;
    ledger_finds(0.0).await;
    drop(process);
    env.cleanup().await;
}
