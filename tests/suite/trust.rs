//! The money path's edges, second round: one forward per charge when a
//! job is published twice, and settling a charge that was forwarded more
//! than once. Real binaries, broker and database.

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
    broker.report(&env, a, "failed").await;
    broker.report(&env, b, "delivered").await;
    let (a, b) = &forwards[1];
    broker.report(&env, a, "delivered").await;
    broker.report(&env, b, "failed").await;
    // Reports are settled in the order they arrive: once the sentinel's is,
    // every report before it was.
    broker.report(&env, &sentinel[0], "delivered").await;
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

/// The properties' bytes in a header frame, as the broker counts them.
fn encoded_properties(properties: &lapin::BasicProperties) -> usize {
    cookie_factory::gen_simple(
        lapin::protocol::basic::gen_properties(properties),
        Vec::new(),
    )
    .unwrap()
    .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_frame_at_the_brokers_limit_is_dead_lettered_and_every_job_around_it_is_forwarded()
{
    let env = TestEnv::new();
    let store = env.store().await;
    create(&store, "small", Plan::Free).await;
    create(&store, "big", Plan::Scale).await;
    let sendgate = Process::spawn(&env, false);
    sendgate.wait_ready(WAIT).await;
    let broker = env.broker().await;

    // The largest header frame the broker takes (frame_max 131072 bytes:
    // 8 bytes of frame, 14 of class, weight and body size, the rest the
    // properties), made of one header.
    let with_big = |len: usize| {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            "x-big".into(),
            lapin::types::AMQPValue::LongString("b".repeat(len).into()),
        );
        job_properties().with_headers(headers)
    };
    let big_len = 131_072 - 8 - 14 - encoded_properties(&with_big(0));
    let big = with_big(big_len);
    assert_eq!(encoded_properties(&big), 131_050);

    let publish_valid = |from: usize| {
        let broker = &broker;
        let queue = env.send_queue();
        async move {
            for i in from..from + 200 {
                let account = if i % 20 == 0 { "small" } else { "big" };
                broker.publish_job(&queue, account, &format!("v-{i}")).await;
            }
        }
    };
    publish_valid(0).await;
    let oversized = job_body("big", "oversized");
    broker
        .publish_with(&env.send_queue(), &oversized, big)
        .await;
    publish_valid(200).await;

    let forwards = broker.take(&env.delivery_queue(), 400, WAIT).await;
    let dead = broker.take(&env.dead_queue(), 1, WAIT).await;
    assert_eq!(dead[0].routing_key.as_str(), "invalid_job");
    assert_eq!(dead[0].data, oversized, "the dead letter keeps the body");
    let detail = header(&dead[0], "x-sendgate-detail").unwrap();
    assert!(
        detail.contains("x-big") && detail.contains("max_header_bytes"),
        "{detail}"
    );
    assert!(
        header(&dead[0], "x-big").is_none(),
        "its oversized header is left off"
    );
    // Nothing else: no job went round until the delivery limit.
    assert!(
        broker
            .take_all(&env.dead_queue(), Duration::from_millis(500))
            .await
            .is_empty()
    );
    assert!(
        broker
            .take_all(&env.delivery_queue(), Duration::ZERO)
            .await
            .is_empty()
    );
    let free_forwards = forwards
        .iter()
        .filter(|f| header(f, "x-sendgate-plan").as_deref() == Some("free"))
        .count();
    assert_eq!(free_forwards, 20);
    assert_eq!(
        balance_and_ledger(&store, "small").await,
        (0, 0),
        "credits spent = forwards"
    );
    // sendgate's connection never closed over it.
    let (_, metrics) = http_get(sendgate.addr(), "/metrics").await.unwrap();
    assert_eq!(series(&metrics, "sendgate_amqp_reconnects_total", &[]), 0.0);

    drop(sendgate);
    env.cleanup().await;
}

/// Reads until the server closes the connection (or `limit` passes, which
/// fails the test); what it read.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection is still open after {limit:?}"),
        }
    }
}

/// A request on a new connection; what came back before the server
/// closed it (nothing: refused at accept).
async fn answer_on_new_connection(addr: std::net::SocketAddr) -> Vec<u8> {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    read_until_closed(&mut stream, Duration::from_secs(30)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_http_clients_are_cut_off_and_connections_are_capped() {
    use tokio::io::AsyncWriteExt;
    let mut env = TestEnv::new();
    env.set("SENDGATE__HTTP__HEADER_READ_TIMEOUT_SECS", "5")
        .set("SENDGATE__HTTP__MAX_CONNECTIONS", "4");
    let gate = env
        .start_gate(std::sync::Arc::new(sendgate::clock::SystemClock))
        .await;
    let addr = gate.http;

    // Half a request header, never finished: closed after the timeout.
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    assert!(
        read_until_closed(&mut half, Duration::from_secs(60))
            .await
            .is_empty()
    );
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // A keep-alive connection idle after its request: closed too.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answered = read_until_closed(&mut idle, Duration::from_secs(60)).await;
    assert!(String::from_utf8_lossy(&answered).starts_with("HTTP/1.1 200"));

    // Four silent connections take every place: a fifth is closed at once,
    // unanswered; once the four are cut off the port answers again.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    eventually(WAIT, || async {
        answer_on_new_connection(addr).await.is_empty()
    })
    .await;
    eventually(WAIT, || async {
        !answer_on_new_connection(addr).await.is_empty()
    })
    .await;
    let (_, text) = http_get(addr, "/metrics").await.unwrap();
    assert!(series(&text, "sendgate_http_connections_refused_total", &[]) >= 1.0);
    drop(held);

    gate.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_jobs_return_at_their_own_day_start_whatever_was_deferred_before_them() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__PLANS__PRO__DAILY_SENDS", "1")
        .set("SENDGATE__PLANS__PRO__ON_LIMIT", "defer")
        // Steps of a second, so the test moves its clock instead of
        // waiting for hours: every step ends back at the gate, which asks
        // its clock whether the job's day has started.
        .set("SENDGATE__AMQP__DEFERRAL_LONGEST_STEP_SECS", "1");
    let store = env.store().await;
    // Deferred first, its day starts last; and the other way round.
    store
        .create_account(&id("pago"), Plan::Pro, "Pacific/Pago_Pago")
        .await
        .unwrap();
    store
        .create_account(&id("kiri"), Plan::Pro, "Pacific/Kiritimati")
        .await
        .unwrap();
    // 09:30 UTC: 22:30 the day before in Pago Pago (UTC-11), whose next day
    // starts at 11:00 UTC; 23:30 in Kiritimati (UTC+14), next day at 10:00.
    let clock = manual_clock("2026-03-02T09:30:00Z");
    let gate = env.start_gate(clock.clone()).await;
    let broker = env.broker().await;
    for account in ["pago", "kiri"] {
        broker
            .publish_job(&env.send_queue(), account, "today")
            .await;
        broker.take(&env.delivery_queue(), 1, WAIT).await;
        broker
            .publish_job(&env.send_queue(), account, "tomorrow")
            .await;
        eventually(WAIT, || async {
            let refused: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM refusals WHERE account_id = $1 AND reason = 'daily_limit_reached'",
            )
            .bind(account)
            .fetch_one(store.pool())
            .await
            .unwrap();
            refused == 1
        })
        .await;
    }

    // Kiritimati's day starts: its job comes back, Pago Pago's waits on.
    clock.set(utc("2026-03-02T10:00:01Z"));
    let first = broker.take(&env.delivery_queue(), 1, WAIT).await;
    let job: serde_json::Value = serde_json::from_slice(&first[0].data).unwrap();
    assert_eq!(job["account_id"], "kiri");
    assert!(
        broker
            .take_all(&env.delivery_queue(), Duration::from_secs(3))
            .await
            .is_empty(),
        "Pago Pago's day has not started"
    );
    clock.set(utc("2026-03-02T11:00:01Z"));
    let second = broker.take(&env.delivery_queue(), 1, WAIT).await;
    let job: serde_json::Value = serde_json::from_slice(&second[0].data).unwrap();
    assert_eq!(job["account_id"], "pago");
    assert!(
        broker
            .take_all(&env.dead_queue(), Duration::ZERO)
            .await
            .is_empty()
    );

    gate.shutdown().await;
    env.cleanup().await;
}
