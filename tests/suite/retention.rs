//! Retention of charges: Pro and Scale charges are forgotten after the
//! dedup window (a slot emptied whole), Free charges never, usage counts
//! survive, and a key released in one slot and charged in another keeps
//! one row. Real RabbitMQ and Postgres.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sendgate::clock::SystemClock;
use sendgate::domain::plan::Plan;
use sendgate::store::{Grouping, Store};

use crate::harness::*;

const WAIT: Duration = Duration::from_secs(30);

/// The ring's current slot.
async fn current_slot(store: &Store) -> i16 {
    sqlx::query_scalar("SELECT current FROM reservation_ring")
        .fetch_one(store.pool())
        .await
        .unwrap()
}

/// Makes the ring's current slot look `age` old (as a superuser; the
/// runtime role cannot).
async fn age_current_slot(store: &Store, age: &str) {
    sqlx::query("UPDATE reservation_ring SET since = now() - $1::interval")
        .bind(age)
        .execute(store.pool())
        .await
        .unwrap();
}

async fn slot_of(store: &Store, account: &str, key: &str) -> Vec<i16> {
    sqlx::query_scalar(
        "SELECT slot FROM reservations WHERE account_id = $1 AND idempotency_key = $2",
    )
    .bind(account)
    .bind(key)
    .fetch_all(store.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_is_emptied_only_after_the_other_was_current_for_the_window() {
    let env = TestEnv::new();
    let store = env.store().await;
    create(&store, "ros", Plan::Scale).await;
    create(&store, "fen", Plan::Free).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;
    broker.publish_job(&env.send_queue(), "ros", "r-1").await;
    broker.publish_job(&env.send_queue(), "fen", "f-1").await;
    broker.take(&env.delivery_queue(), 2, WAIT).await;
    gate.shutdown().await;

    // The window the owner's `migrate` stores (as a superuser here).
    sqlx::query("UPDATE retention_settings SET dedup_window = interval '1 hour'")
        .execute(store.pool())
        .await
        .unwrap();
    let first = current_slot(&store).await;
    assert_eq!(slot_of(&store, "ros", "r-1").await, [first]);
    assert_eq!(
        slot_of(&store, "fen", "f-1").await,
        [0],
        "free charges are kept"
    );
    assert_eq!(
        store.rotate_reservations().await.unwrap(),
        None,
        "the current slot is younger than the window"
    );

    // Current for the window: the other (empty) slot becomes current; the
    // charge stays, in the slot now out of use.
    age_current_slot(&store, "61 minutes").await;
    let second = store.rotate_reservations().await.unwrap();
    assert_eq!(second, Some(3 - first));
    assert_eq!(store.rotate_reservations().await.unwrap(), None);
    assert_eq!(slot_of(&store, "ros", "r-1").await, [first]);

    // A window later the charge's slot, out of use for the window, is
    // emptied; the Free charge is not.
    age_current_slot(&store, "61 minutes").await;
    assert_eq!(store.rotate_reservations().await.unwrap(), Some(first));
    assert!(slot_of(&store, "ros", "r-1").await.is_empty());
    assert_eq!(slot_of(&store, "fen", "f-1").await, [0]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_window_a_key_is_charged_afresh_free_keys_never_and_usage_stays() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__RESERVATIONS__HOLD_SECS", "1");
    env.set("SENDGATE__RESERVATIONS__SWEEP_INTERVAL_SECS", "1");
    env.set("SENDGATE__RESERVATIONS__DEDUP_WINDOW_SECS", "2");
    let store = env.store().await;
    create(&store, "sol", Plan::Scale).await;
    create(&store, "pia", Plan::Pro).await;
    create(&store, "fay", Plan::Free).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;
    let mut first = Vec::new();
    for account in ["sol", "pia", "fay"] {
        broker.publish_job(&env.send_queue(), account, "k-1").await;
        let forward = broker.take(&env.delivery_queue(), 1, WAIT).await;
        first.push(header(&forward[0], "x-sendgate-reservation-id").unwrap());
    }

    // The sweep empties the slots in turn: the Pro and Scale charges go,
    // the Free one stays.
    eventually(WAIT, || async {
        reservation_count(&store, "sol").await == 0 && reservation_count(&store, "pia").await == 0
    })
    .await;
    assert_eq!(reservation_count(&store, "fay").await, 1);

    // The same jobs again: Pro and Scale are charged afresh (new
    // reservations), the Free one is a duplicate of a confirmed forward
    // and is dropped, its credit not taken twice.
    for account in ["sol", "pia", "fay"] {
        broker.publish_job(&env.send_queue(), account, "k-1").await;
    }
    let again = broker.take(&env.delivery_queue(), 2, WAIT).await;
    let mut accounts = Vec::new();
    for forward in &again {
        let job: serde_json::Value = serde_json::from_slice(&forward.data).unwrap();
        let account = job["account_id"].as_str().unwrap().to_owned();
        let reservation = header(forward, "x-sendgate-reservation-id").unwrap();
        assert!(!first.contains(&reservation), "{account}: a new charge");
        accounts.push(account);
    }
    accounts.sort();
    assert_eq!(accounts, ["pia", "sol"]);
    eventually(WAIT, || async {
        broker.depth_of(&env.send_queue()).await == 0
    })
    .await;
    assert!(
        broker
            .take_all(&env.delivery_queue(), Duration::from_millis(300))
            .await
            .is_empty(),
        "the Free job is not forwarded again"
    );
    assert_eq!(balance_and_ledger(&store, "fay").await.0, 19);

    // Usage outlives the charges it counted.
    let now = Utc::now();
    let usage = |account: &'static str| {
        let store = store.clone();
        async move {
            store
                .usage(
                    &id(account),
                    now - chrono::Duration::days(1),
                    now + chrono::Duration::days(1),
                    Grouping::Day,
                )
                .await
                .unwrap()
                .totals
                .charged
        }
    };
    eventually(WAIT, || async {
        usage("sol").await == 2 && usage("pia").await == 2
    })
    .await;
    assert_eq!(usage("fay").await, 1);

    let metrics = sendgate::metrics::install().render();
    assert!(
        metric_value(&metrics, "sendgate_reservation_slots_emptied_total").unwrap_or(0.0) >= 2.0,
        "{metrics}"
    );
    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_released_in_one_slot_and_charged_in_the_next_keeps_one_row() {
    let env = TestEnv::new();
    let store = env.store().await;
    create(&store, "pat", Plan::Pro).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;
    broker.publish_job(&env.send_queue(), "pat", "p-1").await;
    let forward = broker.take(&env.delivery_queue(), 1, WAIT).await;
    broker.report(&env, &forward[0], "failed").await;
    eventually(WAIT, || async {
        reservation_state(&store, "pat", "p-1").await == "released"
    })
    .await;
    let before = current_slot(&store).await;
    age_current_slot(&store, "8 days").await;
    let now_current = store.rotate_reservations().await.unwrap();
    assert_eq!(now_current, Some(3 - before));

    broker.publish_job(&env.send_queue(), "pat", "p-1").await;
    let again = broker.take(&env.delivery_queue(), 1, WAIT).await;
    assert_ne!(
        header(&again[0], "x-sendgate-reservation-id"),
        header(&forward[0], "x-sendgate-reservation-id"),
        "charged afresh"
    );
    assert_eq!(slot_of(&store, "pat", "p-1").await, [3 - before]);
    assert_eq!(reservation_state(&store, "pat", "p-1").await, "held");
    let used: i32 = sqlx::query_scalar("SELECT used FROM daily_usage WHERE account_id = 'pat'")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(
        used, 1,
        "the released slot was given back, the new charge took one"
    );
    gate.shutdown().await;
    env.cleanup().await;
}

/// Rows in the tables a refused job could write to.
async fn rows_written_for_refusals(store: &Store) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM refusals) + (SELECT count(*) FROM usage_counts)
              + (SELECT count(*) FROM usage_pending) + (SELECT count(*) FROM reservations)",
    )
    .fetch_one(store.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_for_accounts_that_do_not_exist_write_nothing() {
    let env = TestEnv::new();
    let store = env.store().await;
    let now = Utc::now();
    // 10,000 jobs for 10,000 made-up accounts, in batches as the gate
    // decides them.
    let jobs: Vec<sendgate::domain::job::Job> = (0..10_000)
        .map(|i| {
            let body = job_body(&format!("ghost-{i}"), "k");
            sendgate::domain::job::Job::parse(&body, None, 65536).unwrap()
        })
        .collect();
    for batch in jobs.chunks(250) {
        let recorded = store.decide(batch, now).await.unwrap();
        assert!(recorded.decisions.iter().all(|d| matches!(
            d,
            sendgate::domain::decision::Decision::DeadLetter(dead)
                if dead.reason == sendgate::domain::plan::Reason::UnknownAccount
        )));
    }
    // The path for jobs the database refused records refusals too.
    let refusal = sendgate::store::Refusal {
        key: jobs[0].key(),
        campaign_id: None,
        reason: "invalid_job",
        detail: "the database refused this job".into(),
    };
    store.record_refusals(&[refusal], now).await.unwrap();
    store.roll_up_usage().await.unwrap();
    assert_eq!(rows_written_for_refusals(&store).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_past_their_retention_are_removed_by_the_sweep() {
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.reservations.sweep_interval_secs = 1;
    settings.usage.retention_days = 400;
    let store = env.store().await;
    create(&store, "old-timer", Plan::Scale).await;
    for (age, n) in [("401 days", 3), ("399 days", 5), ("1 hour", 7)] {
        sqlx::query(
            "INSERT INTO usage_counts (account_id, bucket, campaign_id, kind, shard, n)
             VALUES ('old-timer', date_trunc('hour', now() - $1::interval), '', 'charged', 0, $2)",
        )
        .bind(age)
        .bind(n)
        .execute(store.pool())
        .await
        .unwrap();
    }
    let gate = start_gate(settings, Arc::new(SystemClock)).await;
    eventually(WAIT, || async {
        let left: Vec<i64> = sqlx::query_scalar("SELECT n FROM usage_counts ORDER BY bucket")
            .fetch_all(store.pool())
            .await
            .unwrap();
        left == [5, 7]
    })
    .await;
    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_free_charges_go_after_the_window_and_a_key_charged_on_another_plan_meanwhile_is_settled_right()
 {
    let env = TestEnv::new();
    let store = env.store().await;
    create(&store, "flo", Plan::Free).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;
    for key in ["gone", "kept"] {
        broker.publish_job(&env.send_queue(), "flo", key).await;
    }
    let forwards = broker.take(&env.delivery_queue(), 2, WAIT).await;
    let gone = forwards
        .iter()
        .find(|f| f.properties.message_id().as_ref().unwrap().as_str() == "gone")
        .unwrap();
    broker.report(&env, gone, "failed").await;
    eventually(WAIT, || async {
        reservation_state(&store, "flo", "gone").await == "released"
    })
    .await;

    // Upgraded, and the failed job sent again: charged on the new plan, in
    // a ring slot, while its released Free charge stays in the kept slot.
    store.set_plan(&id("flo"), Plan::Scale).await.unwrap();
    broker.publish_job(&env.send_queue(), "flo", "gone").await;
    let again = broker.take(&env.delivery_queue(), 1, WAIT).await;
    assert_eq!(
        header(&again[0], "x-sendgate-plan").as_deref(),
        Some("scale")
    );
    let mut slots = slot_of(&store, "flo", "gone").await;
    slots.sort_unstable();
    assert_eq!(slots.len(), 2);
    assert_eq!(slots[0], 0);
    // Its report settles the new charge (not stale against the old one).
    broker.report(&env, &again[0], "delivered").await;
    eventually(WAIT, || async {
        reservation_state(&store, "flo", "gone").await == "committed"
    })
    .await;
    gate.shutdown().await;

    // Within the window nothing is removed; once the released Free charge
    // is older than the window it goes, and the charge in use stays.
    assert_eq!(store.purge_released_kept(100).await.unwrap(), 0);
    sqlx::query("UPDATE retention_settings SET dedup_window = interval '1 hour'")
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::query(
        "UPDATE reservations SET settled_at = now() - interval '2 hours'
         WHERE account_id = 'flo' AND state = 'released'",
    )
    .execute(store.pool())
    .await
    .unwrap();
    assert_eq!(store.purge_released_kept(100).await.unwrap(), 1);
    assert_eq!(slot_of(&store, "flo", "gone").await.len(), 1);
    assert_eq!(reservation_state(&store, "flo", "gone").await, "committed");
    assert_eq!(reservation_state(&store, "flo", "kept").await, "held");
    assert_eq!(balance_and_ledger(&store, "flo").await, (19, 19));
    env.cleanup().await;
}
