//! The partitioned send queues: routing by account through the jobs
//! exchange, the fair draw against a backlog, the upgrade from the fanout
//! jobs exchange of earlier versions, and redrive into partitions. Real
//! broker and database.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{ExchangeBindOptions, ExchangeDeleteOptions, QueueBindOptions};
use lapin::types::FieldTable;
use sendgate::clock::SystemClock;
use sendgate::domain::plan::Plan;

use crate::harness::*;

const WAIT: Duration = Duration::from_secs(60);

/// Declares the topology as `sendgate run` does, without running a gate.
async fn declare(env: &TestEnv, broker: &Broker) {
    sendgate::amqp::declare_topology(&broker.channel, &env.settings().amqp)
        .await
        .unwrap();
}

/// The partition (index into the partitions) each message in them belongs
/// to, by account; takes every message out.
async fn drain_partitions(env: &TestEnv, broker: &Broker) -> HashMap<String, BTreeSet<usize>> {
    let mut seen: HashMap<String, BTreeSet<usize>> = HashMap::new();
    for (index, queue) in env.job_queues()[1..].iter().enumerate() {
        for delivery in broker.take_all(queue, Duration::ZERO).await {
            let body: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
            let account = body["account_id"].as_str().unwrap().to_owned();
            seen.entry(account).or_default().insert(index);
        }
    }
    seen
}

#[tokio::test]
async fn each_accounts_jobs_land_in_one_partition_and_the_accounts_spread() {
    let env = TestEnv::new();
    let broker = env.broker().await;
    declare(&env, &broker).await;
    for a in 0..40 {
        let account = format!("acct-{a}");
        for k in 0..5 {
            let body = job_body(&account, &format!("k{k}"));
            broker
                .publish_for(&env.jobs_exchange(), &account, &body)
                .await;
        }
    }
    assert_eq!(broker.depth_of(&env.send_queue()).await, 0);
    assert_eq!(broker.depth_of_all(&env.job_queues()).await, 200);
    let seen = drain_partitions(&env, &broker).await;
    assert_eq!(seen.len(), 40);
    for (account, partitions) in &seen {
        assert_eq!(partitions.len(), 1, "{account} landed in {partitions:?}");
    }
    let used: BTreeSet<usize> = seen.values().flatten().copied().collect();
    assert_eq!(used.len(), 4, "40 accounts over 4 partitions used {used:?}");
    env.cleanup().await;
}

/// Which partition a job of `account` lands in, found by publishing one.
async fn partition_of(env: &TestEnv, broker: &Broker, account: &str, key: &str) -> usize {
    let queues = env.job_queues();
    let before: Vec<u32> =
        futures_util::future::join_all(queues[1..].iter().map(|q| broker.depth_of(q))).await;
    broker
        .publish_for(&env.jobs_exchange(), account, &job_body(account, key))
        .await;
    for (index, queue) in queues[1..].iter().enumerate() {
        if broker.depth_of(queue).await > before[index] {
            return index;
        }
    }
    panic!("the job of {account} landed in no partition");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_accounts_job_is_forwarded_long_before_another_accounts_backlog_drains() {
    const BACKLOG: usize = 3000;
    let env = TestEnv::new();
    let store = env.store().await;
    let broker = env.broker().await;
    declare(&env, &broker).await;
    create(&store, "big", Plan::Scale).await;
    let big = partition_of(&env, &broker, "big", "b0").await;
    for k in 1..BACKLOG {
        broker
            .publish_for(
                &env.jobs_exchange(),
                "big",
                &job_body("big", &format!("b{k}")),
            )
            .await;
    }
    // Twelve quiet accounts, one job each; those that share big's
    // partition wait behind its backlog, by design.
    let mut quiet = Vec::new();
    for q in 0..12 {
        let account = format!("quiet-{q}");
        create(&store, &account, Plan::Scale).await;
        let partition = partition_of(&env, &broker, &account, "only").await;
        quiet.push((account, partition != big));
    }
    assert!(quiet.iter().any(|(_, elsewhere)| *elsewhere));

    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let forwards = broker.take(&env.delivery_queue(), BACKLOG + 12, WAIT).await;
    let position: HashMap<String, usize> = forwards
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
            let account = body["account_id"].as_str().unwrap();
            (account != "big").then(|| (account.to_owned(), i))
        })
        .collect();
    assert_eq!(position.len(), 12);
    for (account, elsewhere) in &quiet {
        if *elsewhere {
            // At most a prefetch window of the backlog (and the batches in
            // hand) goes first, not the backlog.
            assert!(
                position[account] < BACKLOG / 3,
                "{account} was forwarded {}th of {}",
                position[account],
                BACKLOG + 12
            );
        }
    }
    let text = http_get(gate.http, "/metrics").await.unwrap().1;
    let drawn = series(
        &text,
        "sendgate_partition_jobs_drawn_total",
        &[("partition", &big.to_string())],
    );
    assert!(
        drawn >= BACKLOG as f64,
        "drawn from big's partition: {drawn}"
    );
    gate.shutdown().await;
    store.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanout_jobs_exchange_of_an_earlier_version_is_upgraded_without_losing_a_job() {
    let env = TestEnv::new();
    let store = env.store().await;
    create(&store, "upgrader", Plan::Scale).await;
    let broker = env.broker().await;
    // The topology of the version before partitions: the jobs exchange, a
    // fanout, bound to the send queue, and no partitions.
    declare(&env, &broker).await;
    let settings = env.settings().amqp;
    broker
        .channel
        .exchange_delete(
            settings.partitions_exchange().as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    for queue in settings.partition_queues() {
        broker
            .channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await
            .unwrap();
    }
    broker
        .channel
        .queue_bind(
            env.send_queue().as_str().into(),
            env.jobs_exchange().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for k in 0..100 {
        let body = job_body("upgrader", &format!("before-{k}"));
        broker
            .publish_for(&env.jobs_exchange(), "upgrader", &body)
            .await;
    }
    assert_eq!(broker.depth_of(&env.send_queue()).await, 100);

    // The new version starts on it (a process of its own, so its metrics
    // are its own), while the scheduler keeps publishing.
    let mut gate = Process::spawn(&env, false);
    gate.wait_ready(WAIT).await;
    for k in 0..100 {
        let body = job_body("upgrader", &format!("after-{k}"));
        broker
            .publish_for(&env.jobs_exchange(), "upgrader", &body)
            .await;
    }
    let forwards = broker.take(&env.delivery_queue(), 200, WAIT).await;
    let keys: BTreeSet<String> = forwards
        .iter()
        .map(|d| d.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(keys.len(), 200, "every job forwarded once");
    assert!(
        broker
            .take_all(&env.delivery_queue(), Duration::from_millis(500))
            .await
            .is_empty()
    );
    // The fanout now feeds the partitions only.
    broker
        .publish_for(
            &env.jobs_exchange(),
            "upgrader",
            &job_body("upgrader", "last"),
        )
        .await;
    broker.take(&env.delivery_queue(), 1, WAIT).await;
    assert_eq!(broker.depth_of(&env.send_queue()).await, 0);
    let text = http_get(gate.addr(), "/metrics").await.unwrap().1;
    let unpartitioned = series(
        &text,
        "sendgate_partition_jobs_forwarded_total",
        &[("partition", "unpartitioned")],
    );
    assert_eq!(
        unpartitioned, 100.0,
        "the 100 queued before came from the send queue"
    );
    gate.terminate();
    assert!(gate.wait_for_exit(WAIT).await.success());
    // Declaring again changes nothing (the exchange-to-exchange binding is
    // idempotent, the old binding stays gone).
    declare(&env, &broker).await;
    broker
        .channel
        .exchange_bind(
            settings.partitions_exchange().as_str().into(),
            env.jobs_exchange().as_str().into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    store.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redriven_job_goes_back_through_the_jobs_exchange_to_its_accounts_partition() {
    let env = TestEnv::new();
    let store = env.store().await;
    let broker = env.broker().await;
    declare(&env, &broker).await;
    let home = partition_of(&env, &broker, "late", "probe").await;
    let queues = env.job_queues();
    broker.take_all(&queues[1 + home], Duration::ZERO).await;

    // Dead-lettered while the account does not exist yet.
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    broker
        .publish_for(&env.jobs_exchange(), "late", &job_body("late", "k1"))
        .await;
    let dead = broker.take(&env.dead_queue(), 1, WAIT).await;
    assert_eq!(
        header(&dead[0], "x-sendgate-reason").as_deref(),
        Some("unknown_account")
    );
    gate.shutdown().await;
    // Put back in the dead-letter queue (take acked it) and redriven.
    broker
        .publish_with(&env.dead_queue(), &dead[0].data, dead[0].properties.clone())
        .await;
    let moved = sendgate::amqp::redrive::run(
        &env.settings().amqp,
        &sendgate::amqp::redrive::Filter {
            reason: Some("unknown_account".to_owned()),
            account: None,
            jobs_only: true,
        },
        10,
        true,
        |_| Ok(()),
    )
    .await
    .unwrap();
    assert_eq!(moved, 1);
    assert_eq!(
        broker.depth_of(&queues[1 + home]).await,
        1,
        "in its partition"
    );
    assert_eq!(broker.depth_of(&env.send_queue()).await, 0);

    create(&store, "late", Plan::Scale).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let forwarded = broker.take(&env.delivery_queue(), 1, WAIT).await;
    assert_eq!(
        forwarded[0]
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "k1"
    );
    gate.shutdown().await;
    store.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_and_waiting_jobs_are_held_with_their_account_and_return_to_its_partition() {
    let env = TestEnv::new();
    let broker = env.broker().await;
    declare(&env, &broker).await;
    let settings = env.settings().amqp;
    let queues = env.job_queues();
    let home = partition_of(&env, &broker, "held", "probe").await;
    broker.take_all(&queues[1 + home], Duration::ZERO).await;

    // Held as the gate holds them: through the hold exchange, the account
    // as routing key, the queue named in `sendgate-hold`.
    let now = chrono::Utc::now();
    let decisions = [
        sendgate::domain::decision::Decision::Defer(sendgate::domain::decision::DeadLetter {
            reason: sendgate::domain::plan::Reason::DailyLimitReached,
            detail: "tomorrow".to_owned(),
            retry_after: Some(now + chrono::TimeDelta::milliseconds(500)),
        }),
        sendgate::domain::decision::Decision::Wait(sendgate::domain::decision::Wait {
            reservation_id: uuid::Uuid::nil(),
        }),
    ];
    for (i, decision) in decisions.iter().enumerate() {
        let key = format!("k{i}");
        let message = sendgate::amqp::message::outgoing(
            &settings,
            &job_properties(),
            Some(&key),
            Some("held"),
            decision,
            now,
        )
        .unwrap();
        let confirmation = broker
            .channel
            .basic_publish(
                message.exchange,
                message.routing_key,
                lapin::options::BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &job_body("held", &key),
                message.properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirmation.is_ack() && confirmation.take_message().is_none());
    }
    let ladder = &settings.partition_ladder()[0].1;
    assert_eq!(broker.depth_of(ladder).await, 1, "deferred into {ladder}");
    assert_eq!(broker.depth_of(&settings.partition_wait_queue()).await, 1);

    // After the 1 s step and the copy wait (200 ms here): both in the
    // account's partition, none in the send queue.
    let partition = queues[1 + home].clone();
    eventually(WAIT, || {
        let (broker, partition) = (&broker, &partition);
        async move { broker.depth_of(partition).await == 2 }
    })
    .await;
    assert_eq!(broker.depth_of(&env.send_queue()).await, 0);
    let back = broker.take(&partition, 2, WAIT).await;
    for delivery in &back {
        assert_eq!(delivery.routing_key.as_str(), "held");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_the_consistent_hash_plugin_stops_start_up_naming_the_command() {
    // A private node with no plugin at all (the machine's own broker has
    // it enabled, and is never reconfigured by a test).
    let dir = crate::harness::services::scratch_dir("no-plugins");
    let rabbit = crate::harness::services::PrivateRabbit::prepare(&dir, "noplugins", |port| {
        format!("listeners.tcp.local = 127.0.0.1:{port}\n")
    });
    std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
    rabbit.launch();
    let mut env = TestEnv::new();
    env.set("AMQP_URL", &rabbit.url());
    let out = tokio::task::spawn_blocking({
        let env = env.env.clone();
        move || {
            std::process::Command::new(BIN)
                .arg("run")
                .envs(env)
                .env("SENDGATE__HTTP__LISTEN", "127.0.0.1:0")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stopped = std::process::Command::new("rabbitmqctl")
        .args(["-q", "-n", &rabbit.node, "stop"])
        .status();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("rabbitmq-plugins enable rabbitmq_consistent_hash_exchange"),
        "{stderr}"
    );
    assert!(stopped.is_ok_and(|s| s.success()));
    env.cleanup().await;
}
