//! The money path's edges, second round: one forward per charge when a
//! job is published twice, and settling a charge that was forwarded more
//! than once. Real binaries, broker and database.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use sendgate::domain::plan::Plan;

use crate::harness::*;

const WAIT: Duration = Duration::from_secs(60);

/// The sum of a counter over several processes' `/metrics`.
async fn summed(processes: &[&Process], name: &str) -> f64 {
    let mut total = 0.0;
    for process in processes {
        if let Ok((200, text)) = http_get(process.addr(), "/metrics").await {
            total += series(&text, name, &[]);
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_published_back_to_back_across_two_processes_are_forwarded_once_each() {
    let env = TestEnv::new();
    let store = env.store().await;
    create(&store, "copied", Plan::Scale).await;
    create(&store, "thrifty", Plan::Free).await;
    // Two processes, two consumers each (the default).
    let (a, b) = (Process::spawn(&env, false), Process::spawn(&env, false));
    a.wait_ready(WAIT).await;
    b.wait_ready(WAIT).await;

    // A scheduler that publishes every job twice, back to back, as one
    // that retries a publish it never saw confirmed does.
    let broker = env.broker().await;
    let mut published = 0;
    for i in 0..400 {
        let account = if i % 20 == 0 { "thrifty" } else { "copied" };
        let body = job_body(account, &format!("k-{i}"));
        for _ in 0..2 {
            broker.publish(&env.send_queue(), &body, None).await;
            published += 1;
        }
    }
    // Every job is charged and forwarded once; every copy ends as a
    // duplicate (at once, or after waiting for the forward it copies).
    let forwards = broker.take(&env.delivery_queue(), 400, WAIT).await;
    eventually(WAIT, || async {
        summed(&[&a, &b], "sendgate_jobs_duplicate_total").await == 400.0
    })
    .await;
    let late = broker.take_all(&env.delivery_queue(), Duration::ZERO).await;
    assert!(late.is_empty(), "{} keys forwarded twice", late.len());
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for forward in &forwards {
        let id = forward
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .to_string();
        *per_key.entry(id).or_default() += 1;
    }
    assert_eq!(per_key.len(), 400, "every key forwarded");
    assert!(per_key.values().all(|n| *n == 1));
    assert_eq!(published, 800);
    // Credits spent = forwards, for the free account's 20 keys.
    assert_eq!(balance_and_ledger(&store, "thrifty").await, (0, 0));
    assert_eq!(
        summed(&[&a, &b], "sendgate_jobs_received_total").await,
        800.0 + summed(&[&a, &b], "sendgate_jobs_waiting_total").await
    );

    drop((a, b));
    env.cleanup().await;
}

/// A delivery worker's report on `forward`.
fn report_on(forward: &lapin::message::Delivery, outcome: &str) -> Vec<u8> {
    let job: serde_json::Value = serde_json::from_slice(&forward.data).unwrap();
    serde_json::json!({
        "account_id": job["account_id"],
        "idempotency_key": job["idempotency_key"],
        "reservation_id": header(forward, "x-sendgate-reservation-id").unwrap(),
        "outcome": outcome,
    })
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_forwarded_twice_is_never_refunded_whichever_report_comes_first() {
    let env = TestEnv::new();
    let store = env.store().await;
    create(&store, "twice", Plan::Free).await;
    let gate = env
        .start_gate(std::sync::Arc::new(sendgate::clock::SystemClock))
        .await;
    let broker = env.broker().await;

    let mut forwards = Vec::new();
    broker
        .publish_job(&env.send_queue(), "twice", "sentinel")
        .await;
    let sentinel = broker.take(&env.delivery_queue(), 1, WAIT).await;
    for key in ["failed-first", "delivered-first"] {
        let body = broker.publish_job(&env.send_queue(), "twice", key).await;
        let first = broker.take(&env.delivery_queue(), 1, WAIT).await;
        // The forward's mark is lost (as when Postgres crashed before it
        // reached the disk) and its lease has run out: a copy forwards the
        // same charge again.
        sqlx::query(
            "UPDATE reservations SET forward_confirmed = false, batch_id = NULL,
                    created_at = created_at - interval '1 hour'
             WHERE account_id = 'twice' AND idempotency_key = $1",
        )
        .bind(key)
        .execute(store.pool())
        .await
        .unwrap();
        broker.publish(&env.send_queue(), &body, None).await;
        let second = broker.take(&env.delivery_queue(), 1, WAIT).await;
        assert_eq!(
            header(&first[0], "x-sendgate-reservation-id"),
            header(&second[0], "x-sendgate-reservation-id"),
            "the same charge, forwarded again"
        );
        forwards.push((
            first.into_iter().next().unwrap(),
            second.into_iter().next().unwrap(),
        ));
    }
    assert_eq!(balance_and_ledger(&store, "twice").await, (17, 17));

    let (a, b) = &forwards[0];
    broker
        .publish(&env.outcomes_queue(), &report_on(a, "failed"), None)
        .await;
    broker
        .publish(&env.outcomes_queue(), &report_on(b, "delivered"), None)
        .await;
    let (a, b) = &forwards[1];
    broker
        .publish(&env.outcomes_queue(), &report_on(a, "delivered"), None)
        .await;
    broker
        .publish(&env.outcomes_queue(), &report_on(b, "failed"), None)
        .await;
    // Reports are settled in the order they arrive: once the sentinel's is,
    // every report before it was.
    broker
        .publish(
            &env.outcomes_queue(),
            &report_on(&sentinel[0], "delivered"),
            None,
        )
        .await;
    eventually(WAIT, || async {
        reservation_state(&store, "twice", "sentinel").await == "committed"
    })
    .await;
    assert_eq!(
        reservation_state(&store, "twice", "failed-first").await,
        "committed"
    );
    assert_eq!(
        reservation_state(&store, "twice", "delivered-first").await,
        "committed"
    );
    // Both sends were delivered once: both credits stay spent.
    assert_eq!(balance_and_ledger(&store, "twice").await, (17, 17));
    let released: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM credit_ledger WHERE account_id = 'twice' AND kind = 'release'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(released, 0, "a delivered send refunded");
    assert!(
        broker
            .take_all(&env.dead_queue(), Duration::ZERO)
            .await
            .is_empty()
    );

    gate.shutdown().await;
    env.cleanup().await;
}
