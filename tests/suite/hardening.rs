//! Ordinary bad input and lifecycle races, as a scheduler team and an SRE
//! meet them: properties copied from jobs, report texts Postgres cannot
//! store, reports on an earlier charge, dead letters of reports, a database
//! that turns read-only. Each runs against the real broker and database,
//! through the real binary where the case is about the process.

use std::sync::Arc;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use sendgate::clock::SystemClock;
use sendgate::domain::plan::Plan;
use sendgate::store::Store;

use crate::harness::*;

/// A `sendgate run` process on its own database and queues, with accounts.
async fn binary_gate(env: &TestEnv, accounts: &[(&str, Plan)]) -> (Store, Process, Broker) {
    let store = env.store().await;
    for (account, plan) in accounts {
        create(&store, account, *plan).await;
    }
    let sendgate = Process::spawn(env, true);
    sendgate.wait_ready(WAIT).await;
    (store, sendgate, env.broker().await)
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// A delivery worker's report on `forward`, with `detail`.
fn report_on(forward: &lapin::message::Delivery, outcome: &str, detail: &str) -> Vec<u8> {
    let job: serde_json::Value = serde_json::from_slice(&forward.data).unwrap();
    serde_json::json!({
        "account_id": job["account_id"],
        "idempotency_key": job["idempotency_key"],
        "reservation_id": header(forward, "x-sendgate-reservation-id").unwrap(),
        "outcome": outcome,
        "detail": detail,
    })
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_published_with_the_schedulers_own_user_id_are_gated_and_charged_once_each() {
    let env = TestEnv::new();
    let (store, mut sendgate, broker) = binary_gate(&env, &[("uma", Plan::Free)]).await;
    // A scheduler that publishes as its own user, with `user_id` set (the
    // broker checks it against the connection's user).
    let user = RabbitUser::create(&format!("sched-{}", env.id));
    let scheduler = Broker::connect_to(&user.url()).await;
    for i in 0..25 {
        let properties = job_properties().with_user_id(user.name.as_str().into());
        let body = job_body("uma", &format!("u-{i}"));
        scheduler
            .publish_with(&env.send_queue(), &body, properties)
            .await;
    }
    let forwards = broker.take(&env.delivery_queue(), 20, WAIT).await;
    let refused = broker.take(&env.dead_queue(), 5, WAIT).await;
    assert!(forwards.iter().all(|f| f.properties.user_id().is_none()));
    assert!(
        refused
            .iter()
            .all(|d| d.routing_key.as_str() == "out_of_credits")
    );
    assert_eq!(reservation_count(&store, "uma").await, 20);
    assert_eq!(balance_and_ledger(&store, "uma").await, (0, 0));

    sendgate.stop(WAIT).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outgoing_messages_carry_only_the_allowed_properties_and_sendgates_own_headers() {
    let env = TestEnv::new();
    let (_store, mut sendgate, broker) = binary_gate(&env, &[("vic", Plan::Free)]).await;
    let cc = format!("t.{}.cc", env.id);
    sendgate::amqp::topology::declare_quorum(
        &broker.channel,
        &cc,
        sendgate::amqp::topology::quorum_arguments(),
    )
    .await
    .unwrap();
    let mut headers = FieldTable::default();
    headers
        .insert("campaign".into(), text("spring"))
        .insert(
            "CC".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![text(&cc)])),
        )
        .insert("x-sendgate-plan".into(), text("scale"))
        .insert("x-sendgate-charge".into(), text("unmetered"));
    let properties = job_properties()
        .with_headers(headers)
        .with_expiration("600000".into())
        .with_priority(5)
        .with_app_id("scheduler".into())
        .with_correlation_id("c-1".into());
    for account in ["vic", "nobody"] {
        let body = job_body(account, "k");
        broker
            .publish_with(&env.send_queue(), &body, properties.clone())
            .await;
    }

    let forward = &broker.take(&env.delivery_queue(), 1, WAIT).await[0];
    let dead = &broker.take(&env.dead_queue(), 1, WAIT).await[0];
    for message in [forward, dead] {
        let p = &message.properties;
        assert!(p.expiration().is_none(), "a TTL would expire it silently");
        assert!(p.priority().is_none() && p.user_id().is_none());
        assert_eq!(p.app_id().as_ref().map(|v| v.as_str()), Some("scheduler"));
        assert_eq!(p.correlation_id().as_ref().map(|v| v.as_str()), Some("c-1"));
        assert_eq!(p.message_id().as_ref().map(|v| v.as_str()), Some("k"));
        assert_eq!(header(message, "campaign").as_deref(), Some("spring"));
        assert!(header(message, "CC").is_none());
    }
    assert_eq!(header(forward, "x-sendgate-plan").as_deref(), Some("free"));
    assert_eq!(
        header(forward, "x-sendgate-charge").as_deref(),
        Some("credit")
    );
    assert_eq!(dead.routing_key.as_str(), "unknown_account");
    assert!(
        header(dead, "x-sendgate-plan").is_none(),
        "forged headers are not kept"
    );
    // The scheduler's own two publishes were copied to the CC'd queue; the
    // gate's forward and dead letter (already routed) added none.
    assert_eq!(broker.take_all(&cc, Duration::ZERO).await.len(), 2);

    sendgate.stop(WAIT).await;
    let _ = broker
        .channel
        .queue_delete(cc.as_str().into(), Default::default())
        .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_whose_detail_postgres_cannot_store_is_refused_and_the_reports_behind_it_settle() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__PLANS__FREE__SIGNUP_CREDITS", "2");
    let (store, mut sendgate, broker) = binary_gate(&env, &[("nul", Plan::Free)]).await;
    broker.publish_job(&env.send_queue(), "nul", "n-1").await;
    broker.publish_job(&env.send_queue(), "nul", "n-2").await;
    let forwards = broker.take(&env.delivery_queue(), 2, WAIT).await;

    let outcomes = env.outcomes_queue();
    let carrier_text = report_on(&forwards[0], "failed", "550\u{0} mailbox unavailable");
    broker.publish(&outcomes, &carrier_text, None).await;
    broker
        .publish(&outcomes, &report_on(&forwards[1], "failed", "busy"), None)
        .await;

    let dead = &broker.take(&env.dead_queue(), 1, WAIT).await[0];
    assert_eq!(dead.routing_key.as_str(), "invalid_outcome");
    assert_eq!(header(dead, "x-sendgate-source").as_deref(), Some("report"));
    assert!(
        header(dead, "x-sendgate-detail")
            .unwrap()
            .contains("control character")
    );
    let second = header(&forwards[1], "x-sendgate-reservation-id").unwrap();
    let key_of = |f: &lapin::message::Delivery| f.properties.message_id().clone().unwrap();
    eventually(WAIT, || {
        let key = key_of(&forwards[1]);
        let store = &store;
        async move { reservation_state(store, "nul", key.as_str()).await == "released" }
    })
    .await;
    assert_eq!(
        reservation_state(&store, "nul", key_of(&forwards[0]).as_str()).await,
        "held"
    );
    assert_eq!(
        balance_and_ledger(&store, "nul").await,
        (1, 1),
        "only {second} released"
    );

    sendgate.stop(WAIT).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_moves_refused_jobs_and_never_refused_reports() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__PLANS__FREE__SIGNUP_CREDITS", "1");
    let store = env.store().await;
    create(&store, "rex", Plan::Free).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;
    broker.publish_job(&env.send_queue(), "rex", "r-1").await;
    let forward = &broker.take(&env.delivery_queue(), 1, WAIT).await[0];
    broker.publish_job(&env.send_queue(), "rex", "r-2").await;
    broker.take(&env.dead_queue(), 1, WAIT).await;
    broker.publish_job(&env.send_queue(), "rex", "r-2").await;

    // Two refused reports: one malformed, one for a key never charged; both
    // name the account, so `--account rex` matches them.
    let outcomes = env.outcomes_queue();
    let unknown = report_on(forward, "failed", "x");
    let unknown = String::from_utf8(unknown)
        .unwrap()
        .replace("r-1", "never-sent");
    broker.publish(&outcomes, unknown.as_bytes(), None).await;
    let malformed = br#"{"account_id":"rex","idempotency_key":"r-1","outcome":"lost"}"#;
    broker.publish(&outcomes, malformed, None).await;
    eventually(WAIT, || async {
        broker.depth_of(&env.dead_queue()).await == 3
    })
    .await;

    store.set_plan(&id("rex"), Plan::Scale).await.unwrap();
    let listed = cli(
        &env,
        &["dead-letters", "list", "--account", "rex", "--json"],
    );
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["listed"], 3, "{listed}");
    // Each says what it was, whose, and when it was dead-lettered.
    for dead in listed["dead_letters"].as_array().unwrap() {
        assert!(dead["reason"].is_string(), "{dead}");
        assert_eq!(dead["account_id"], "rex", "{dead}");
        let at = dead["dead_lettered_at"].as_str().unwrap_or_default();
        assert!(
            chrono::DateTime::parse_from_rfc3339(at).is_ok(),
            "dead-lettered at {at:?}: {dead}"
        );
    }
    let dry = cli(
        &env,
        &[
            "dead-letters",
            "redrive",
            "--account",
            "rex",
            "--dry-run",
            "--json",
        ],
    );
    let dry: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(dry["would_move"], 1, "only the job: {dry}");
    let listed = cli(&env, &["dead-letters", "list", "--account", "rex"]);
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert_eq!(
        listed.lines().filter(|l| l.starts_with("report")).count(),
        2,
        "{listed}"
    );
    let moved = cli(&env, &["dead-letters", "redrive", "--account", "rex"]);
    let moved = String::from_utf8_lossy(&moved.stdout).into_owned();
    assert!(moved.contains("moved 1 dead letter"), "{moved}");
    let passed = &broker.take(&env.delivery_queue(), 1, WAIT).await[0];
    assert_eq!(
        passed.properties.message_id().as_ref().unwrap().as_str(),
        "r-2"
    );
    let left = broker.take_all(&env.dead_queue(), Duration::ZERO).await;
    let mut reasons: Vec<&str> = left.iter().map(|d| d.routing_key.as_str()).collect();
    reasons.sort();
    assert_eq!(reasons, ["invalid_outcome", "unknown_reservation"]);

    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_holds_the_batch_until_it_is_writable_again() {
    let env = TestEnv::new();
    let store = env.store().await;
    create(&store, "ro", Plan::Scale).await;
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;
    let database = env.db_url.rsplit('/').next().unwrap().to_owned();
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", pg_base_url()))
        .await
        .unwrap();
    let read_only = |on: bool| {
        let (admin, database) = (admin.clone(), database.clone());
        async move {
            let setting = if on { "on" } else { "off" };
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE \"{database}\" SET default_transaction_read_only = {setting}"
            )))
            .execute(&admin)
            .await
            .unwrap();
            // Sessions take the setting when they start: end the open ones.
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(&database)
            .execute(&admin)
            .await
            .unwrap();
        }
    };
    let errors = || async {
        let text = http_get(gate.http, "/metrics").await.unwrap().1;
        metric_value(&text, "sendgate_db_errors_total{kind=\"unavailable\"}").unwrap_or(0.0)
    };

    read_only(true).await;
    let before = errors().await;
    for i in 0..10 {
        broker
            .publish_job(&env.send_queue(), "ro", &format!("ro-{i}"))
            .await;
    }
    // The gate took the jobs and keeps retrying: nothing forwarded, nothing
    // refused, nothing handed back to spend its delivery count.
    eventually(WAIT, || async { errors().await >= before + 3.0 }).await;
    assert_eq!(broker.depth_of(&env.send_queue()).await, 0);
    assert_eq!(broker.depth_of(&env.delivery_queue()).await, 0);
    assert_eq!(broker.depth_of(&env.dead_queue()).await, 0);

    read_only(false).await;
    broker.take(&env.delivery_queue(), 10, WAIT).await;
    assert!(
        broker
            .take_all(&env.dead_queue(), Duration::ZERO)
            .await
            .is_empty()
    );
    assert_eq!(reservation_count(&store, "ro").await, 10);

    gate.shutdown().await;
    admin.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_no_client_library_would_build_are_contained_and_the_queue_keeps_moving() {
    let env = TestEnv::new();
    let (store, mut sendgate, broker) = binary_gate(&env, &[("poi", Plan::Scale)]).await;
    let queue = env.send_queue();
    for i in 0..200 {
        broker
            .publish_job(&queue, "poi", &format!("before-{i}"))
            .await;
    }
    let url = amqp_url();
    let sent = {
        let queue = queue.clone();
        tokio::task::spawn_blocking(move || {
            // A key cut at 255 bytes in the middle of a character: not UTF-8.
            let cut = raw::RawMessage {
                message_id: Some(b"cut-\xe2\x82"),
                headers: None,
                body: br#"{"account_id":"poi"}"#,
            };
            raw::publish(&url, &queue, &cut);
            // 255 bad bytes: read lossily they would be 765 (a panic, found
            // by the fuzzer, before the reader cut them back).
            let bad = raw::RawMessage {
                message_id: Some(&[0xff; 255]),
                headers: None,
                body: br#"{"account_id":"poi"}"#,
            };
            raw::publish(&url, &queue, &bad);
            // A header table nested 5,000 levels deep.
            let deep = raw::RawMessage {
                message_id: None,
                headers: Some(raw::nested_table(5_000)),
                body: &job_body("poi", "deep"),
            };
            raw::publish(&url, &queue, &deep);
        })
    };
    sent.await.unwrap();
    for i in 0..200 {
        broker
            .publish_job(&queue, "poi", &format!("after-{i}"))
            .await;
    }

    let forwards = broker.take(&env.delivery_queue(), 401, WAIT).await;
    assert!(
        forwards
            .iter()
            .any(|f| header(f, "x-sendgate-decision").is_some()
                && f.properties.message_id().as_ref().map(|k| k.as_str()) == Some("deep"))
    );
    let dead = broker.take_all(&env.dead_queue(), Duration::ZERO).await;
    let reasons: Vec<&str> = dead.iter().map(|d| d.routing_key.as_str()).collect();
    assert_eq!(
        reasons,
        ["invalid_job", "invalid_job"],
        "only the unreadable jobs, never delivery_limit"
    );
    for d in &dead {
        assert!(
            header(d, "x-sendgate-detail")
                .unwrap()
                .contains("not valid UTF-8")
        );
    }
    assert_eq!(reservation_count(&store, "poi").await, 401);

    // Still up, and it drains cleanly.
    sendgate.stop(WAIT).await;
    env.cleanup().await;
}

/// One class of bad input, published between valid jobs.
enum BadInput {
    Job {
        body: &'static [u8],
        properties: Box<lapin::BasicProperties>,
    },
    Report(&'static [u8]),
}

fn bad_job(body: &'static [u8], properties: lapin::BasicProperties) -> BadInput {
    BadInput::Job {
        body,
        properties: Box::new(properties),
    }
}

const NO_ACCOUNT: &[u8] = br#"{"idempotency_key":"k"}"#;
const TO_NOBODY: &[u8] = br#"{"account_id":"nobody","idempotency_key":"n"}"#;
const NUL_REPORT: &[u8] = br#"{"account_id":"bulk","idempotency_key":"x",
    "reservation_id":"0192f5a0-0000-7000-8000-000000000001","outcome":"failed","detail":"a\u0000b"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_class_of_bad_input_is_contained_with_200_valid_jobs_on_each_side() {
    let env = TestEnv::new();
    let (_store, mut sendgate, broker) = binary_gate(&env, &[("bulk", Plan::Scale)]).await;
    let mut forged = FieldTable::default();
    forged.insert("x-sendgate-decision".into(), text("forwarded"));
    let mut deep = FieldTable::default();
    for _ in 0..200 {
        let mut outer = FieldTable::default();
        outer.insert("d".into(), AMQPValue::FieldTable(deep));
        deep = outer;
    }
    let ttl = job_properties()
        .with_expiration("1000".into())
        .with_priority(9);
    let classes = [
        (
            "body: not JSON",
            bad_job(b"not json", job_properties()),
            Some("invalid_job"),
        ),
        (
            "body: no account",
            bad_job(NO_ACCOUNT, job_properties()),
            Some("invalid_job"),
        ),
        (
            "properties: a TTL, a priority",
            bad_job(TO_NOBODY, ttl),
            Some("unknown_account"),
        ),
        (
            "headers: forged x-sendgate-*",
            bad_job(TO_NOBODY, job_properties().with_headers(forged)),
            Some("unknown_account"),
        ),
        (
            "headers: nested 200 deep",
            bad_job(TO_NOBODY, job_properties().with_headers(deep)),
            Some("unknown_account"),
        ),
        (
            "report: NUL in detail",
            BadInput::Report(NUL_REPORT),
            Some("invalid_outcome"),
        ),
        (
            "report: not JSON",
            BadInput::Report(b"{"),
            Some("invalid_outcome"),
        ),
    ];
    for (n, (class, bad, reason)) in classes.into_iter().enumerate() {
        for i in 0..200 {
            broker
                .publish_job(&env.send_queue(), "bulk", &format!("{n}-before-{i}"))
                .await;
        }
        match bad {
            BadInput::Job { body, properties } => {
                broker
                    .publish_with(&env.send_queue(), body, *properties)
                    .await;
            }
            BadInput::Report(body) => broker.publish(&env.outcomes_queue(), body, None).await,
        }
        for i in 0..200 {
            broker
                .publish_job(&env.send_queue(), "bulk", &format!("{n}-after-{i}"))
                .await;
        }
        let forwards = broker.take(&env.delivery_queue(), 400, WAIT).await;
        assert!(
            forwards.iter().all(|f| f.properties.expiration().is_none()),
            "{class}"
        );
        let dead = broker
            .take(&env.dead_queue(), usize::from(reason.is_some()), WAIT)
            .await;
        let reasons: Vec<&str> = dead.iter().map(|d| d.routing_key.as_str()).collect();
        assert_eq!(reasons, reason.into_iter().collect::<Vec<_>>(), "{class}");
        for d in &dead {
            assert!(
                d.properties.expiration().is_none(),
                "{class}: the dead letter stays"
            );
            assert_ne!(
                header(d, "x-sendgate-decision").as_deref(),
                Some("forwarded"),
                "{class}"
            );
        }
    }
    assert!(
        broker
            .take_all(&env.dead_queue(), Duration::ZERO)
            .await
            .is_empty(),
        "nothing else, and nothing dead-lettered by the broker"
    );
    // Still up, and it drains cleanly.
    sendgate.stop(WAIT).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_that_would_overflow_stops_start_up_naming_it() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__GATE__BATCH_WAIT_MS", "18446744073709551615");
    let out = cli(&env, &["run"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gate.batch_wait_ms"), "{stderr}");
}

/// Messages handed out to `queue`'s consumers and not acked yet, asked of
/// the consumers' channels themselves (queue statistics lag by seconds).
fn unacked(queue: &str) -> u64 {
    // A listing taken while other tests' queues come and go can miss a
    // queue: ask again until this one's consumers show.
    let mut channels = Vec::new();
    for _ in 0..5 {
        let consumers = rabbitmqctl_output(&["list_consumers", "queue_name", "channel_pid"]);
        channels = consumers
            .lines()
            .filter_map(|line| {
                let (name, pid) = line.split_once('\t')?;
                (name == queue).then(|| pid.trim().to_owned())
            })
            .collect();
        if !channels.is_empty() {
            break;
        }
    }
    assert!(!channels.is_empty(), "{queue} has consumers");
    let listing = rabbitmqctl_output(&["list_channels", "pid", "messages_unacknowledged"]);
    let counts: Vec<(&str, u64)> = listing
        .lines()
        .filter_map(|line| {
            let (pid, count) = line.split_once('\t')?;
            channels
                .iter()
                .any(|c| c == pid)
                .then(|| Some((pid, count.trim().parse::<u64>().ok()?)))?
        })
        .collect();
    // Shown when the test fails.
    eprintln!("{queue}: consumers on {channels:?}, unacked {counts:?}");
    counts.iter().map(|(_, n)| n).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_is_marked_confirmed_before_its_job_is_acked() {
    let env = TestEnv::new();
    let store = env.store().await;
    create(&store, "mark", Plan::Scale).await;
    // Marking a batch confirmed waits for an advisory lock the test holds.
    sqlx::raw_sql(
        "CREATE FUNCTION wait_for_test() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NEW; END $$;
         CREATE TRIGGER wait_for_test BEFORE UPDATE ON forward_batches
           FOR EACH ROW EXECUTE FUNCTION wait_for_test();",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let mut holder = store.pool().acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(4242)")
        .execute(&mut *holder)
        .await
        .unwrap();
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let broker = env.broker().await;

    let job = broker.publish_job(&env.send_queue(), "mark", "m-1").await;
    broker.take(&env.delivery_queue(), 1, WAIT).await;
    eventually(WAIT, || someone_waits_for_a_lock(&store)).await;
    // Forwarded and confirmed, but its mark is not written: not acked.
    assert_eq!(unacked(&env.send_queue()), 1, "acked before its mark");

    sqlx::query("SELECT pg_advisory_unlock(4242)")
        .execute(&mut *holder)
        .await
        .unwrap();
    drop(holder);
    eventually(WAIT, || async { unacked(&env.send_queue()) == 0 }).await;
    // Once acked, a copy is a duplicate: dropped, never forwarded again.
    broker.publish(&env.send_queue(), &job, None).await;
    broker.publish_job(&env.send_queue(), "mark", "m-2").await;
    let next = broker.take(&env.delivery_queue(), 1, WAIT).await;
    assert_eq!(
        next[0].properties.message_id().as_ref().unwrap().as_str(),
        "m-2"
    );
    assert!(
        broker
            .take_all(&env.delivery_queue(), Duration::ZERO)
            .await
            .is_empty()
    );

    gate.shutdown().await;
    env.cleanup().await;
}
