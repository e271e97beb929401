//! Reservations after the forward: delivery outcomes commit or release
//! them, and holds without an outcome expire. Real RabbitMQ and Postgres.

use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;
use lapin::message::Delivery;
use sendgate::clock::SystemClock;
use sendgate::domain::plan::Plan;
use sendgate::store::Store;

/// The forward of `key` among `forwards`.
fn forward_of<'a>(forwards: &'a [Delivery], key: &str) -> &'a Delivery {
    forwards
        .iter()
        .find(|d| d.properties.message_id().as_ref().map(|id| id.as_str()) == Some(key))
        .unwrap_or_else(|| panic!("no forward of {key}"))
}

async fn ledger_kinds(store: &Store, account: &str) -> Vec<(String, i64, i64)> {
    sqlx::query_as(
        "SELECT kind, delta, balance_after FROM credit_ledger WHERE account_id = $1 ORDER BY id",
    )
    .bind(account)
    .fetch_all(store.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delivery_gives_a_free_credit_back_and_a_delivered_one_keeps_it() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__PLANS__FREE__SIGNUP_CREDITS", "2");
    let store = env.store().await;
    create(&store, "fay", Plan::Free).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;

    let first = broker.publish_job(&env.send_queue(), "fay", "one").await;
    broker.publish_job(&env.send_queue(), "fay", "two").await;
    let forwards = broker.take(&env.delivery_queue(), 2, WAIT).await;
    let (one, two) = (forward_of(&forwards, "one"), forward_of(&forwards, "two"));
    assert_eq!(balance_and_ledger(&store, "fay").await, (0, 0));
    assert_eq!(reservation_state(&store, "fay", "one").await, "held");

    broker.report(&env, one, "failed").await;
    broker.report(&env, two, "delivered").await;
    eventually(WAIT, || async {
        reservation_state(&store, "fay", "one").await == "released"
            && reservation_state(&store, "fay", "two").await == "committed"
    })
    .await;
    assert_eq!(balance_and_ledger(&store, "fay").await, (1, 1));
    let ledger = ledger_kinds(&store, "fay").await;
    assert_eq!(ledger.last().unwrap(), &("release".to_owned(), 1, 1));

    // Duplicate and late outcomes change nothing.
    broker.report(&env, one, "failed").await;
    broker.report(&env, one, "delivered").await;
    broker.report(&env, two, "failed").await;
    // Outcomes for no reservation, and malformed ones, are dead-lettered.
    let rid = header(one, "x-sendgate-reservation-id").unwrap();
    broker
        .report_raw(&env, "fay", "never-sent", &rid, "failed")
        .await;
    broker
        .publish(&env.outcomes_queue(), b"{\"outcome\":\"failed\"}", None)
        .await;
    let dead = broker.take(&env.dead_queue(), 2, WAIT).await;
    let mut reasons: Vec<String> = dead.iter().map(|d| d.routing_key.to_string()).collect();
    reasons.sort();
    assert_eq!(reasons, vec!["invalid_outcome", "unknown_reservation"]);
    assert_eq!(balance_and_ledger(&store, "fay").await, (1, 1));
    assert_eq!(
        ledger_kinds(&store, "fay").await.len(),
        4,
        "grant, two sends, one release"
    );
    assert_eq!(reservation_state(&store, "fay", "two").await, "committed");

    // The failed send, sent again, is a new attempt: charged afresh.
    broker.publish(&env.send_queue(), &first, None).await;
    let again = broker.take(&env.delivery_queue(), 1, WAIT).await;
    assert_eq!(
        header(&again[0], "x-sendgate-credits-remaining").as_deref(),
        Some("0")
    );
    assert_eq!(balance_and_ledger(&store, "fay").await, (0, 0));
    assert_eq!(reservation_state(&store, "fay", "one").await, "held");

    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pro_delivery_gives_its_daily_slot_back() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__PLANS__PRO__DAILY_SENDS", "1");
    let store = env.store().await;
    create(&store, "pat", Plan::Pro).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;

    broker.publish_job(&env.send_queue(), "pat", "a").await;
    let a = broker.take(&env.delivery_queue(), 1, WAIT).await;
    broker.publish_job(&env.send_queue(), "pat", "b").await;
    let dead = broker.take(&env.dead_queue(), 1, WAIT).await;
    assert_eq!(dead[0].routing_key.as_str(), "daily_limit_reached");

    broker.report(&env, &a[0], "failed").await;
    eventually(WAIT, || async {
        reservation_state(&store, "pat", "a").await == "released"
    })
    .await;
    // The slot is back: the refused job passes now.
    broker.publish_job(&env.send_queue(), "pat", "b").await;
    let forwarded = broker.take(&env.delivery_queue(), 1, WAIT).await;
    assert_eq!(
        header(&forwarded[0], "x-sendgate-daily-remaining").as_deref(),
        Some("0")
    );

    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_failed_report_never_refunds_the_charge_made_after_it() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__PLANS__FREE__SIGNUP_CREDITS", "2");
    let store = env.store().await;
    create(&store, "gil", Plan::Free).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;

    // The send fails and its credit comes back.
    let job = broker.publish_job(&env.send_queue(), "gil", "k").await;
    let first = broker.take(&env.delivery_queue(), 1, WAIT).await;
    broker.report(&env, &first[0], "failed").await;
    eventually(WAIT, || async {
        reservation_state(&store, "gil", "k").await == "released"
    })
    .await;
    assert_eq!(balance_and_ledger(&store, "gil").await, (2, 2));

    // Sent again: charged afresh, under a new reservation.
    broker.publish(&env.send_queue(), &job, None).await;
    let second = broker.take(&env.delivery_queue(), 1, WAIT).await;
    assert_ne!(
        header(&first[0], "x-sendgate-reservation-id"),
        header(&second[0], "x-sendgate-reservation-id")
    );
    assert_eq!(balance_and_ledger(&store, "gil").await, (1, 1));

    // The first report comes again (a delivery worker's retry): stale. The
    // report on the second forward, behind it, shows it was handled.
    broker.report(&env, &first[0], "failed").await;
    broker.report(&env, &second[0], "delivered").await;
    eventually(WAIT, || async {
        reservation_state(&store, "gil", "k").await == "committed"
    })
    .await;
    assert_eq!(
        balance_and_ledger(&store, "gil").await,
        (1, 1),
        "no refund of the new charge"
    );
    let releases = ledger_kinds(&store, "gil")
        .await
        .iter()
        .filter(|l| l.0 == "release")
        .count();
    assert_eq!(releases, 1, "one release, for the failed first forward");
    assert!(
        broker
            .take_all(&env.dead_queue(), Duration::from_millis(200))
            .await
            .is_empty(),
        "a stale report is acked, not dead-lettered"
    );

    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_commits_expired_holds_once_with_two_workers_running() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__RESERVATIONS__HOLD_SECS", "1");
    env.set("SENDGATE__RESERVATIONS__SWEEP_INTERVAL_SECS", "1");
    let store = env.store().await;
    create(&store, "sam", Plan::Scale).await;
    let before = expired_so_far();
    let gates = vec![
        env.start_gate(Arc::new(SystemClock)).await,
        env.start_gate(Arc::new(SystemClock)).await,
    ];
    let broker = env.broker().await;
    for i in 0..40 {
        broker
            .publish_job(&env.send_queue(), "sam", &format!("h-{i}"))
            .await;
    }
    broker.take(&env.delivery_queue(), 40, WAIT).await;
    eventually(WAIT, || async {
        let held: i64 =
            sqlx::query_scalar("SELECT count(*) FROM reservations WHERE state = 'held'")
                .fetch_one(store.pool())
                .await
                .unwrap();
        held == 0
    })
    .await;
    let committed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reservations WHERE state = 'committed' AND settle_detail LIKE 'no outcome%'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(committed, 40);
    // Both processes swept; together they committed each hold exactly once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(expired_so_far() - before, 40.0);
    for gate in gates {
        gate.shutdown().await;
    }
    env.cleanup().await;
}

fn expired_so_far() -> f64 {
    let text = sendgate::metrics::install().render();
    metric_value(&text, "sendgate_holds_expired_total").unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_moves_exactly_the_matching_jobs_and_they_pass_after_an_upgrade() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__PLANS__FREE__SIGNUP_CREDITS", "1");
    let store = env.store().await;
    create(&store, "up", Plan::Free).await;
    create(&store, "stay", Plan::Free).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;

    // Each account spends its credit, then has jobs refused; one bad job too.
    for (account, n) in [("up", 4), ("stay", 3)] {
        for i in 0..n {
            broker
                .publish_job(&env.send_queue(), account, &format!("{account}-{i}"))
                .await;
        }
    }
    broker.publish(&env.send_queue(), b"garbage", None).await;
    broker.take(&env.delivery_queue(), 2, WAIT).await;
    eventually(WAIT, || async {
        let out = cli(&env, &["dead-letters", "list"]);
        String::from_utf8_lossy(&out.stdout).contains("6 dead letter(s)")
    })
    .await;
    gate.shutdown().await;

    let listed = cli(&env, &["dead-letters", "list", "--account", "up"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("3 dead letter(s)"), "{text}");
    let order_before = cli(&env, &["dead-letters", "list"]);

    let dry = cli(
        &env,
        &["dead-letters", "redrive", "--account", "up", "--dry-run"],
    );
    assert!(String::from_utf8_lossy(&dry.stdout).contains("3 dead letter(s) would be moved"));
    assert_eq!(
        String::from_utf8_lossy(&cli(&env, &["dead-letters", "list"]).stdout),
        String::from_utf8_lossy(&order_before.stdout),
        "a dry run and a listing move nothing and keep the order"
    );

    // The account upgrades; its refused jobs are replayed and now pass.
    store.set_plan(&id("up"), Plan::Pro).await.unwrap();
    let moved = cli(
        &env,
        &[
            "dead-letters",
            "redrive",
            "--reason",
            "out_of_credits",
            "--account",
            "up",
        ],
    );
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    assert!(String::from_utf8_lossy(&moved.stdout).contains("moved 3 dead letter(s)"));
    let left = cli(&env, &["dead-letters", "list"]);
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(left.contains("3 dead letter(s)"), "{left}");
    assert!(!left.contains("up-"), "only matching jobs moved: {left}");
    // Those left keep their relative order.
    let rows = |t: &str| {
        t.lines()
            .filter(|l| l.contains("stay-") || l.contains("invalid_job"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        rows(left.as_ref()),
        rows(&String::from_utf8_lossy(&order_before.stdout))
    );

    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let passed = broker.take(&env.delivery_queue(), 3, WAIT).await;
    for d in &passed {
        assert_eq!(header(d, "x-sendgate-plan").as_deref(), Some("pro"));
        assert!(
            header(d, "x-sendgate-reason").is_none(),
            "stale headers were removed"
        );
    }
    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_pro_jobs_come_back_on_the_next_day_and_pass() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__PLANS__PRO__DAILY_SENDS", "1");
    env.set("SENDGATE__PLANS__PRO__ON_LIMIT", "defer");
    let store = env.store().await;
    create(&store, "dee", Plan::Pro).await;
    // A short day: the next one starts 1.5 s after "now".
    let clock = manual_clock("2026-03-01T23:59:58.500Z");
    let gate = env.start_gate(clock.clone()).await;
    let broker = env.broker().await;

    broker.publish_job(&env.send_queue(), "dee", "today").await;
    broker.take(&env.delivery_queue(), 1, WAIT).await;
    let later = broker
        .publish_job(&env.send_queue(), "dee", "tomorrow")
        .await;
    // Held, not dead-lettered: it steps through the deferral ladder.
    eventually(WAIT, || async {
        broker
            .depth_of(&format!("t.{}.deferred.p.1s", env.id))
            .await
            == 1
    })
    .await;
    clock.set(utc("2026-03-02T00:00:00.500Z"));
    let next_day = broker.take(&env.delivery_queue(), 1, WAIT).await;
    assert_eq!(next_day[0].data, later);
    assert_eq!(
        header(&next_day[0], "x-sendgate-daily-remaining").as_deref(),
        Some("0")
    );
    assert!(
        broker
            .take_all(&env.dead_queue(), Duration::from_millis(200))
            .await
            .is_empty(),
        "nothing was dead-lettered"
    );
    let days: Vec<(chrono::NaiveDate, i32)> =
        sqlx::query_as("SELECT day, used FROM daily_usage WHERE account_id = 'dee' ORDER BY day")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(days.iter().map(|d| d.1).collect::<Vec<_>>(), vec![1, 1]);
    gate.shutdown().await;
    env.cleanup().await;
}
