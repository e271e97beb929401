//! Threshold events end to end: written with the change that made them,
//! relayed to the events exchange with confirms, once per crossing, kept in
//! the outbox while no queue takes them. Real RabbitMQ and Postgres.

use std::sync::Arc;

use crate::harness::*;
use lapin::message::Delivery;
use lapin::options::QueueBindOptions;
use lapin::types::FieldTable;
use sendgate::clock::SystemClock;
use sendgate::domain::plan::Plan;
use sendgate::store::{Adjustment, Store};
use serde_json::Value;

/// The outbox rows of `account`: (type, published).
async fn outbox(store: &Store, account: &str) -> Vec<(String, bool)> {
    sqlx::query_as(
        "SELECT type, published_at IS NOT NULL FROM events WHERE account_id = $1 ORDER BY id",
    )
    .bind(account)
    .fetch_all(store.pool())
    .await
    .unwrap()
}

/// Waits until `account` has `count` events in the outbox, all published,
/// and returns their types in order.
async fn published(store: &Store, account: &str, count: usize) -> Vec<String> {
    eventually(WAIT, || async {
        let rows = outbox(store, account).await;
        rows.len() == count && rows.iter().all(|(_, published)| *published)
    })
    .await;
    outbox(store, account)
        .await
        .into_iter()
        .map(|(kind, _)| kind)
        .collect()
}

fn body(delivery: &Delivery) -> Value {
    serde_json::from_slice(&delivery.data).unwrap()
}

/// Checks what every event message carries, and returns its body.
fn event_of(delivery: &Delivery) -> Value {
    let event = body(delivery);
    let id = event["id"].as_str().unwrap();
    assert_eq!(
        delivery.properties.message_id().as_ref().unwrap().as_str(),
        id,
        "message_id is the event id"
    );
    assert_eq!(
        delivery.routing_key.as_str(),
        event["type"].as_str().unwrap()
    );
    assert_eq!(
        delivery.properties.kind().as_ref().unwrap().as_str(),
        event["type"].as_str().unwrap()
    );
    assert_eq!(delivery.properties.delivery_mode(), &Some(2));
    assert_eq!(
        delivery
            .properties
            .content_type()
            .as_ref()
            .unwrap()
            .as_str(),
        "application/json"
    );
    assert!(event["occurred_at"].as_str().is_some());
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_account_running_out_makes_each_crossing_one_event() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__PLANS__FREE__SIGNUP_CREDITS", "8");
    env.set("SENDGATE__EVENTS__CREDITS_LOW_THRESHOLDS", "5,2");
    let store = env.store().await;
    create(&store, "fay", Plan::Free).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;

    for i in 1..=10 {
        broker
            .publish_job(&env.send_queue(), "fay", &format!("job-{i}"))
            .await;
    }
    let forwards = broker.take(&env.delivery_queue(), 8, WAIT).await;
    broker.take(&env.dead_queue(), 2, WAIT).await;

    let kinds = published(&store, "fay", 3).await;
    assert_eq!(
        kinds,
        ["credits.low", "credits.low", "credits.exhausted"],
        "8 -> 0 crosses 5, 2 and 0 once each, however the jobs were batched"
    );
    let events: Vec<Value> = broker
        .take(&env.events_queue(), 3, WAIT)
        .await
        .iter()
        .map(event_of)
        .collect();
    assert_eq!(broker.depth_of(&env.events_queue()).await, 0);
    let low: Vec<i64> = events
        .iter()
        .filter(|e| e["type"] == "credits.low")
        .map(|e| e["data"]["threshold"].as_i64().unwrap())
        .collect();
    assert_eq!(low, [5, 2]);
    let exhausted = events
        .iter()
        .find(|e| e["type"] == "credits.exhausted")
        .unwrap();
    assert_eq!(exhausted["account_id"], "fay");
    assert_eq!(exhausted["data"]["credit_balance"], 0);
    assert_eq!(exhausted["data"]["plan"], "free");

    // A failed delivery gives a credit back (0 -> 1) and the next job
    // spends it (1 -> 0): a new crossing of 0, and only of 0.
    broker.report(&env, &forwards[0], "failed").await;
    eventually(WAIT, || async {
        balance_and_ledger(&store, "fay").await.0 == 1
    })
    .await;
    broker.publish_job(&env.send_queue(), "fay", "job-11").await;
    broker.take(&env.delivery_queue(), 1, WAIT).await;
    let kinds = published(&store, "fay", 4).await;
    assert_eq!(kinds[3], "credits.exhausted");
    let again = event_of(&broker.take(&env.events_queue(), 1, WAIT).await[0]);
    assert_eq!(again["type"], "credits.exhausted");
    assert_ne!(again["id"], exhausted["id"]);

    let metrics = http_get(gate.http, "/metrics").await.unwrap().1;
    assert!(
        series(
            &metrics,
            "sendgate_events_published_total",
            &[("type", "credits.low")]
        ) >= 2.0
    );
    assert!(
        series(
            &metrics,
            "sendgate_events_written_total",
            &[("type", "credits.exhausted")]
        ) >= 2.0
    );
    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pro_day_reaches_its_limit_once_and_plan_changes_are_told() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__PLANS__PRO__DAILY_SENDS", "2");
    env.set("SENDGATE__EVENTS__RELAY_INTERVAL_MS", "50");
    let store = env.store().await;
    create(&store, "pia", Plan::Pro).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;

    broker.publish_job(&env.send_queue(), "pia", "a").await;
    broker.publish_job(&env.send_queue(), "pia", "b").await;
    let forwards = broker.take(&env.delivery_queue(), 2, WAIT).await;
    assert_eq!(published(&store, "pia", 1).await, ["daily_limit.reached"]);
    let reached = event_of(&broker.take(&env.events_queue(), 1, WAIT).await[0]);
    assert_eq!(reached["data"]["daily_limit"], 2);
    assert_eq!(reached["data"]["used"], 2);
    assert_eq!(reached["data"]["timezone"], "UTC");
    assert!(reached["data"]["day"].as_str().is_some());
    assert!(reached["data"]["next_day_starts_at"].as_str().is_some());

    // A slot given back and used again the same day reaches the limit a
    // second time, but the day's event was made already.
    let forward = &forwards[0];
    broker.report(&env, forward, "failed").await;
    eventually(WAIT, || async {
        reservation_state(
            &store,
            "pia",
            body(forward)["idempotency_key"].as_str().unwrap(),
        )
        .await
            == "released"
    })
    .await;
    broker.publish_job(&env.send_queue(), "pia", "c").await;
    broker.take(&env.delivery_queue(), 1, WAIT).await;

    // The plan change is written by another process (an operator's
    // command here): the gate's relay finds it on its interval.
    store.set_plan(&id("pia"), Plan::Scale).await.unwrap();
    store.set_plan(&id("pia"), Plan::Scale).await.unwrap();
    let kinds = published(&store, "pia", 2).await;
    assert_eq!(kinds, ["daily_limit.reached", "plan.changed"]);
    let changed = event_of(&broker.take(&env.events_queue(), 1, WAIT).await[0]);
    assert_eq!(changed["data"]["from"], "pro");
    assert_eq!(changed["data"]["to"], "scale");
    assert_eq!(broker.depth_of(&env.events_queue()).await, 0);

    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_no_queue_takes_stay_in_the_outbox_until_one_does() {
    let mut env = TestEnv::new();
    // No events queue: the operator binds their own, later.
    env.set("SENDGATE__AMQP__EVENTS_QUEUE", "");
    env.set("SENDGATE__EVENTS__RELAY_INTERVAL_MS", "50");
    let store = env.store().await;
    create(&store, "ada", Plan::Free).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;

    // A support correction taking 16 of 20 credits crosses 5.
    let correction = Adjustment::new(-16, "duplicate grant", "fix-1", "support").unwrap();
    store.adjust_credits(&id("ada"), &correction).await.unwrap();
    assert_eq!(
        outbox(&store, "ada").await,
        [("credits.low".to_owned(), false)]
    );
    // The relay tries, and the broker returns it unroutable: it stays.
    eventually(WAIT, || async {
        let metrics = http_get(gate.http, "/metrics").await.unwrap().1;
        series(&metrics, "sendgate_events_relay_failures_total", &[]) >= 2.0
    })
    .await;
    assert_eq!(
        outbox(&store, "ada").await,
        [("credits.low".to_owned(), false)]
    );
    // The backlog the relay reports (`sendgate_events_pending`), read from
    // the store: the gauge itself is shared by every gate this test binary
    // runs at once, so another test's relay may have set it last.
    assert_eq!(store.events_backlog().await.unwrap().pending, 1);
    let metrics = http_get(gate.http, "/metrics").await.unwrap().1;
    assert!(metrics.contains("sendgate_events_pending"), "{metrics}");

    // A consumer binds a queue for credits.* and the event arrives.
    let queue = format!("t.{}.mine", env.id);
    sendgate::amqp::topology::declare_quorum(
        &broker.channel,
        &queue,
        sendgate::amqp::topology::quorum_arguments(),
    )
    .await
    .unwrap();
    broker
        .channel
        .queue_bind(
            queue.as_str().into(),
            format!("t.{}.events", env.id).as_str().into(),
            "credits.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(published(&store, "ada", 1).await, ["credits.low"]);
    let low = event_of(&broker.take(&queue, 1, WAIT).await[0]);
    assert_eq!(low["data"]["threshold"], 5);
    assert_eq!(low["data"]["credit_balance"], 4);

    gate.shutdown().await;
    let _ = broker
        .channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_rolls_back_at_commit_leaves_no_event() {
    let env = TestEnv::new();
    let store = env.store().await;
    create(&store, "doomed", Plan::Free).await;
    // Fails every transaction that touched the account's row, at commit:
    // after the change and its event were both written.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_doomed() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'refused at commit'; END $$;
         CREATE CONSTRAINT TRIGGER refuse_doomed AFTER UPDATE ON accounts
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
         WHEN (NEW.id = 'doomed') EXECUTE FUNCTION refuse_doomed();",
    )
    .execute(store.pool())
    .await
    .unwrap();

    let correction = Adjustment::new(-18, "test", "rollback-1", "support").unwrap();
    let err = store
        .adjust_credits(&id("doomed"), &correction)
        .await
        .expect_err("the commit is refused");
    assert!(err.to_string().contains("refused at commit"), "{err}");
    let err = store
        .set_plan(&id("doomed"), Plan::Pro)
        .await
        .expect_err("the commit is refused");
    assert!(err.to_string().contains("refused at commit"), "{err}");
    assert_eq!(outbox(&store, "doomed").await, []);
    assert_eq!(balance_and_ledger(&store, "doomed").await, (20, 20));

    // The same changes, committed, make their events.
    sqlx::raw_sql("DROP TRIGGER refuse_doomed ON accounts")
        .execute(store.pool())
        .await
        .unwrap();
    store
        .adjust_credits(&id("doomed"), &correction)
        .await
        .unwrap();
    store.set_plan(&id("doomed"), Plan::Pro).await.unwrap();
    let kinds: Vec<String> = outbox(&store, "doomed")
        .await
        .into_iter()
        .map(|(kind, _)| kind)
        .collect();
    assert_eq!(kinds, ["credits.low", "plan.changed"]);
    env.cleanup().await;
}
