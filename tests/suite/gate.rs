//! The gate end to end, against the real RabbitMQ and Postgres: each test
//! runs sendgate in-process on its own database and queues.

use std::collections::HashSet;
use std::sync::Arc;

use crate::harness::*;
use sendgate::clock::{Clock, SystemClock};
use sendgate::domain::job::Job;
use sendgate::domain::plan::Plan;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_account_forwards_20_sends_and_dead_letters_the_21st() {
    let mut env = TestEnv::new();
    // One consumer, so "the 21st" is well defined: jobs are decided in order.
    env.set("SENDGATE__GATE__CONSUMERS", "1");
    let store = env.store().await;
    create(&store, "alice", Plan::Free).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;

    let mut published = Vec::new();
    for i in 1..=21 {
        published.push(
            broker
                .publish_job(&env.send_queue(), "alice", &format!("job-{i}"))
                .await,
        );
    }

    let forwarded = broker.take(&env.delivery_queue(), 20, WAIT).await;
    let dead = broker.take(&env.dead_queue(), 1, WAIT).await;

    let mut remaining: Vec<i64> = Vec::new();
    for delivery in &forwarded {
        let key = delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .to_string();
        let n: usize = key.trim_start_matches("job-").parse().unwrap();
        assert_eq!(
            delivery.data,
            published[n - 1],
            "body forwarded byte for byte"
        );
        assert_eq!(
            header(delivery, "x-sendgate-decision").as_deref(),
            Some("forwarded")
        );
        assert_eq!(header(delivery, "x-sendgate-plan").as_deref(), Some("free"));
        assert_eq!(
            header(delivery, "x-sendgate-charge").as_deref(),
            Some("credit")
        );
        assert!(header(delivery, "x-sendgate-reservation-id").is_some());
        assert_eq!(delivery.properties.delivery_mode(), &Some(2));
        remaining.push(
            header(delivery, "x-sendgate-credits-remaining")
                .unwrap()
                .parse()
                .unwrap(),
        );
    }
    remaining.sort_unstable();
    assert_eq!(remaining, (0..20).collect::<Vec<i64>>());

    let refused = &dead[0];
    assert_eq!(refused.routing_key.as_str(), "out_of_credits");
    assert_eq!(
        header(refused, "x-sendgate-decision").as_deref(),
        Some("dead_lettered")
    );
    assert_eq!(
        header(refused, "x-sendgate-reason").as_deref(),
        Some("out_of_credits")
    );
    assert!(
        header(refused, "x-sendgate-detail")
            .unwrap()
            .contains("no credits left")
    );
    assert_eq!(refused.data, published[20]);
    assert_eq!(
        refused.properties.message_id().as_ref().unwrap().as_str(),
        "job-21"
    );

    // I3: balance 0, equal to the sum of the ledger; 20 send rows.
    assert_eq!(balance_and_ledger(&store, "alice").await, (0, 0));
    let summary = store
        .account_summary(&id("alice"), SystemClock.now(), 50)
        .await
        .unwrap();
    assert_eq!(
        summary
            .recent_ledger
            .iter()
            .filter(|e| e.kind == "send")
            .count(),
        20
    );
    assert_eq!(
        summary
            .recent_ledger
            .iter()
            .filter(|e| e.kind == "signup_grant")
            .count(),
        1
    );

    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pro_account_is_capped_per_local_day_and_gets_more_the_next_day() {
    let env = TestEnv::new();
    let store = env.store().await;
    // 23:30 UTC on 1 March is already 2 March, 08:30, in Tokyo.
    store
        .create_account(&id("tokyo"), Plan::Pro, "Asia/Tokyo")
        .await
        .unwrap();
    let clock = manual_clock("2026-03-01T23:30:00Z");
    let gate = env.start_gate(clock.clone()).await;
    let broker = env.broker().await;

    for i in 1..=21 {
        broker
            .publish_job(&env.send_queue(), "tokyo", &format!("d1-{i}"))
            .await;
    }
    let forwarded = broker.take(&env.delivery_queue(), 20, WAIT).await;
    let mut remaining: Vec<i64> = forwarded
        .iter()
        .map(|d| {
            assert_eq!(
                header(d, "x-sendgate-charge").as_deref(),
                Some("daily_slot")
            );
            header(d, "x-sendgate-daily-remaining")
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..20).collect::<Vec<i64>>());

    let dead = broker.take(&env.dead_queue(), 1, WAIT).await;
    assert_eq!(dead[0].routing_key.as_str(), "daily_limit_reached");
    // The next day in Tokyo starts at 3 March 00:00 +09:00.
    assert_eq!(
        header(&dead[0], "x-sendgate-retry-after").as_deref(),
        Some("2026-03-02T15:00:00Z")
    );

    // A new day in the account's time zone gives 20 more.
    clock.set(utc("2026-03-02T15:00:00Z"));
    for i in 1..=21 {
        broker
            .publish_job(&env.send_queue(), "tokyo", &format!("d2-{i}"))
            .await;
    }
    broker.take(&env.delivery_queue(), 20, WAIT).await;
    let dead = broker.take(&env.dead_queue(), 1, WAIT).await;
    assert_eq!(
        header(&dead[0], "x-sendgate-retry-after").as_deref(),
        Some("2026-03-03T15:00:00Z")
    );
    assert!(
        broker
            .take_all(&env.delivery_queue(), std::time::Duration::from_millis(300))
            .await
            .is_empty()
    );

    let used: Vec<(chrono::NaiveDate, i32)> =
        sqlx::query_as("SELECT day, used FROM daily_usage WHERE account_id = 'tokyo' ORDER BY day")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), vec![20, 20]);
    assert_eq!(used[0].0.to_string(), "2026-03-02");

    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_account_is_never_refused_and_its_usage_is_recorded() {
    let env = TestEnv::new();
    let store = env.store().await;
    create(&store, "bigco", Plan::Scale).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;

    for i in 0..60 {
        broker
            .publish_job(&env.send_queue(), "bigco", &format!("s-{i}"))
            .await;
    }
    let forwarded = broker.take(&env.delivery_queue(), 60, WAIT).await;
    for d in &forwarded {
        assert_eq!(header(d, "x-sendgate-charge").as_deref(), Some("unmetered"));
        assert_eq!(header(d, "x-sendgate-plan").as_deref(), Some("scale"));
        assert!(header(d, "x-sendgate-credits-remaining").is_none());
    }
    assert!(
        broker
            .take_all(&env.dead_queue(), std::time::Duration::from_millis(200))
            .await
            .is_empty()
    );
    assert_eq!(reservation_count(&store, "bigco").await, 60);
    assert_eq!(balance_and_ledger(&store, "bigco").await, (0, 0));

    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_job_twice_is_charged_once_and_another_payload_conflicts() {
    let env = TestEnv::new();
    let store = env.store().await;
    create(&store, "bob", Plan::Free).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;

    let body = broker.publish_job(&env.send_queue(), "bob", "once").await;
    broker.take(&env.delivery_queue(), 1, WAIT).await;
    // Once sendgate has recorded the broker's confirm of that forward, the
    // scheduler retries the very same job, in a burst. (A copy decided before
    // the confirm is recorded is forwarded again, same reservation, no
    // charge: see README, Guarantees.)
    eventually(WAIT, || forward_confirmed(&store, "bob", "once")).await;
    broker.publish(&env.send_queue(), &body, None).await;
    broker.publish(&env.send_queue(), &body, Some("once")).await;
    // Same key, different payload.
    let other = br#"{"account_id":"bob","idempotency_key":"once","recipient":"someone else"}"#;
    broker.publish(&env.send_queue(), other, None).await;

    let dead = broker.take(&env.dead_queue(), 1, WAIT).await;
    assert_eq!(dead[0].routing_key.as_str(), "idempotency_conflict");
    assert!(
        header(&dead[0], "x-sendgate-detail")
            .unwrap()
            .contains("different payload")
    );
    assert_eq!(dead[0].data, other.to_vec());
    let extra = broker
        .take_all(&env.delivery_queue(), std::time::Duration::from_millis(500))
        .await;
    assert!(extra.is_empty(), "a duplicate was forwarded again");

    assert_eq!(balance_and_ledger(&store, "bob").await, (19, 19));
    assert_eq!(reservation_count(&store, "bob").await, 1);

    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_charged_before_a_crash_is_forwarded_again_without_a_second_charge() {
    let env = TestEnv::new();
    let store = env.store().await;
    create(&store, "carol", Plan::Free).await;
    let body = job_body("carol", "crashy");

    // A worker charged the job, then died before its forward was confirmed.
    let job = Job::parse(&body, None, 65536).unwrap();
    let decisions = store
        .decide(&[job], SystemClock.now())
        .await
        .unwrap()
        .decisions;
    let sendgate::domain::decision::Decision::Forward(first) = &decisions[0] else {
        panic!("expected a forward, got {decisions:?}");
    };
    assert_eq!(balance_and_ledger(&store, "carol").await, (19, 19));

    // The broker redelivers it to a fresh worker.
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;
    broker.publish(&env.send_queue(), &body, None).await;
    let forwarded = broker.take(&env.delivery_queue(), 1, WAIT).await;
    assert_eq!(forwarded[0].data, body);
    assert_eq!(
        header(&forwarded[0], "x-sendgate-reservation-id"),
        Some(first.reservation_id.to_string())
    );
    assert_eq!(
        header(&forwarded[0], "x-sendgate-credits-remaining").as_deref(),
        Some("19")
    );
    assert_eq!(balance_and_ledger(&store, "carol").await, (19, 19));

    // Once sendgate has recorded the broker's confirm of that forward, one
    // more copy is only a duplicate.
    eventually(WAIT, || async {
        let confirmed: bool = sqlx::query_scalar(
            "SELECT forward_confirmed FROM reservations WHERE account_id = 'carol'",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        confirmed
    })
    .await;
    broker.publish(&env.send_queue(), &body, None).await;
    assert!(
        broker
            .take_all(&env.delivery_queue(), std::time::Duration::from_millis(500))
            .await
            .is_empty()
    );
    assert_eq!(balance_and_ledger(&store, "carol").await, (19, 19));

    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_unknown_accounts_are_dead_lettered_and_the_gate_keeps_moving() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__JOBS__MAX_BODY_BYTES", "1024");
    let store = env.store().await;
    create(&store, "dave", Plan::Scale).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;
    let queue = env.send_queue();

    let oversized = format!(
        r#"{{"account_id":"dave","idempotency_key":"big","pad":"{}"}}"#,
        "x".repeat(2000)
    );
    let long_key = "k".repeat(256);
    let too_long_key = format!(r#"{{"account_id":"dave","idempotency_key":"{long_key}"}}"#);
    let cases: Vec<(Vec<u8>, Option<&str>, &str)> = vec![
        (b"this is not json".to_vec(), None, "not JSON"),
        (b"[1,2,3]".to_vec(), None, "not an object"),
        (b"\"just a string\"".to_vec(), None, "not an object"),
        (b"\xff\xfe\x00garbage".to_vec(), None, "not valid UTF-8"),
        (
            br#"{"idempotency_key":"k1"}"#.to_vec(),
            None,
            "`account_id` is missing",
        ),
        (
            br#"{"account_id":42,"idempotency_key":"k2"}"#.to_vec(),
            None,
            "must be a string",
        ),
        (
            br#"{"account_id":"","idempotency_key":"k3"}"#.to_vec(),
            None,
            "is empty",
        ),
        (
            br#"{"account_id":"dave"}"#.to_vec(),
            None,
            "`idempotency_key` is missing",
        ),
        (
            br#"{"account_id":"dave","idempotency_key":""}"#.to_vec(),
            None,
            "is empty",
        ),
        (too_long_key.into_bytes(), None, "over the limit of 255"),
        (
            br#"{"account_id":"dave","idempotency_key":"a"}"#.to_vec(),
            Some("b"),
            "differs from the message_id",
        ),
        (oversized.into_bytes(), None, "over the limit of 1024 bytes"),
        (br#"{}"#.to_vec(), None, "`account_id` is missing"),
    ];
    for (body, message_id, _) in &cases {
        broker.publish(&queue, body, *message_id).await;
    }
    broker.publish_job(&queue, "nobody", "n1").await;
    let good = broker.publish_job(&queue, "dave", "after-the-storm").await;

    let dead = broker.take(&env.dead_queue(), cases.len() + 1, WAIT).await;
    let forwarded = broker.take(&env.delivery_queue(), 1, WAIT).await;
    assert_eq!(
        forwarded[0].data, good,
        "the gate still forwards after bad input"
    );

    let unknown: Vec<_> = dead
        .iter()
        .filter(|d| d.routing_key.as_str() == "unknown_account")
        .collect();
    assert_eq!(unknown.len(), 1);
    assert!(
        header(unknown[0], "x-sendgate-detail")
            .unwrap()
            .contains("`nobody` does not exist")
    );

    let invalid: Vec<_> = dead
        .iter()
        .filter(|d| d.routing_key.as_str() == "invalid_job")
        .collect();
    assert_eq!(invalid.len(), cases.len());
    for (body, _, expected) in &cases {
        let got = invalid
            .iter()
            .find(|d| &d.data == body)
            .unwrap_or_else(|| panic!("no dead letter for {expected}"));
        let detail = header(got, "x-sendgate-detail").unwrap();
        assert!(
            detail.contains(expected),
            "detail {detail:?} should mention {expected:?}"
        );
        assert_eq!(
            header(got, "x-sendgate-reason").as_deref(),
            Some("invalid_job")
        );
    }
    assert_eq!(reservation_count(&store, "dave").await, 1);

    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_workers_never_give_an_account_more_than_its_plan_allows() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__GATE__CONSUMERS", "2");
    env.set("SENDGATE__GATE__BATCH_SIZE", "7");
    env.set("SENDGATE__AMQP__PREFETCH", "10");
    let store = env.store().await;
    create(&store, "hot-free", Plan::Free).await;
    create(&store, "hot-pro", Plan::Pro).await;
    // Three gate processes on the same queues and database.
    let gates = vec![
        env.start_gate(Arc::new(SystemClock)).await,
        env.start_gate(Arc::new(SystemClock)).await,
        env.start_gate(Arc::new(SystemClock)).await,
    ];
    let broker = env.broker().await;

    for i in 0..100 {
        broker
            .publish_job(&env.send_queue(), "hot-free", &format!("f-{i}"))
            .await;
        broker
            .publish_job(&env.send_queue(), "hot-pro", &format!("p-{i}"))
            .await;
    }
    let forwarded = broker.take(&env.delivery_queue(), 40, WAIT).await;
    let dead = broker.take(&env.dead_queue(), 160, WAIT).await;
    assert!(
        broker
            .take_all(&env.delivery_queue(), std::time::Duration::from_millis(500))
            .await
            .is_empty()
    );

    let count = |account: &str| {
        forwarded
            .iter()
            .filter(|d| {
                d.data
                    .windows(account.len())
                    .any(|w| w == account.as_bytes())
            })
            .count()
    };
    assert_eq!(count("hot-free"), 20, "I3: exactly the signup credits");
    assert_eq!(count("hot-pro"), 20, "I4: exactly the daily limit");
    let keys: HashSet<String> = forwarded
        .iter()
        .map(|d| d.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(keys.len(), 40, "I2: no job forwarded twice");
    assert_eq!(
        dead.iter()
            .filter(|d| d.routing_key.as_str() == "out_of_credits")
            .count(),
        80
    );
    assert_eq!(
        dead.iter()
            .filter(|d| d.routing_key.as_str() == "daily_limit_reached")
            .count(),
        80
    );
    assert_eq!(balance_and_ledger(&store, "hot-free").await, (0, 0));
    assert_eq!(reservation_count(&store, "hot-free").await, 20);
    assert_eq!(reservation_count(&store, "hot-pro").await, 20);

    for gate in gates {
        gate.shutdown().await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_lets_a_refused_job_pass_when_it_is_published_again() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__PLANS__FREE__SIGNUP_CREDITS", "1");
    let store = env.store().await;
    create(&store, "erin", Plan::Free).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;

    broker.publish_job(&env.send_queue(), "erin", "first").await;
    broker.take(&env.delivery_queue(), 1, WAIT).await;
    let refused_body = broker
        .publish_job(&env.send_queue(), "erin", "second")
        .await;
    let dead = broker.take(&env.dead_queue(), 1, WAIT).await;
    assert_eq!(dead[0].routing_key.as_str(), "out_of_credits");

    // Denials are not stored: after the upgrade the same job is judged afresh.
    store.set_plan(&id("erin"), Plan::Pro).await.unwrap();
    broker.publish(&env.send_queue(), &refused_body, None).await;
    let forwarded = broker.take(&env.delivery_queue(), 1, WAIT).await;
    assert_eq!(
        header(&forwarded[0], "x-sendgate-plan").as_deref(),
        Some("pro")
    );
    assert_eq!(
        header(&forwarded[0], "x-sendgate-daily-remaining").as_deref(),
        Some("19")
    );
    // Credits are kept on record, and a downgrade grants none.
    store.set_plan(&id("erin"), Plan::Free).await.unwrap();
    assert_eq!(balance_and_ledger(&store, "erin").await, (0, 0));
    broker.publish_job(&env.send_queue(), "erin", "third").await;
    let dead = broker.take(&env.dead_queue(), 1, WAIT).await;
    assert_eq!(dead[0].routing_key.as_str(), "out_of_credits");

    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_send_queue_dead_letters_rejected_and_endlessly_redelivered_jobs() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__AMQP__DELIVERY_LIMIT", "2");
    // Start once to declare the topology, then stop: a raw consumer plays a
    // worker that keeps failing on a job.
    env.start_gate(Arc::new(SystemClock)).await.shutdown().await;
    let broker = env.broker().await;
    let queue = env.send_queue();

    let poison = job_body("whoever", "poison");
    broker.publish(&queue, &poison, None).await;
    let mut attempts = 0;
    loop {
        let Some(message) = broker
            .channel
            .basic_get(
                queue.as_str().into(),
                lapin::options::BasicGetOptions::default(),
            )
            .await
            .unwrap()
        else {
            break;
        };
        attempts += 1;
        message
            .delivery
            .nack(lapin::options::BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(attempts < 10, "the delivery limit never took effect");
    }
    let dead = broker.take(&env.dead_queue(), 1, WAIT).await;
    assert_eq!(dead[0].routing_key.as_str(), "delivery_limit");
    assert_eq!(dead[0].data, poison);
    assert!(
        attempts <= 3,
        "dead-lettered after the limit: {attempts} attempts"
    );

    // A reject without requeue goes the same way.
    broker.publish(&queue, b"rejected", None).await;
    let message = broker
        .channel
        .basic_get(
            queue.as_str().into(),
            lapin::options::BasicGetOptions::default(),
        )
        .await
        .unwrap()
        .unwrap();
    message
        .delivery
        .reject(lapin::options::BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let dead = broker.take(&env.dead_queue(), 1, WAIT).await;
    assert_eq!(dead[0].data, b"rejected".to_vec());

    env.cleanup().await;
}
