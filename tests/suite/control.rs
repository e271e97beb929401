//! Operator control of a running process (`sendgate ctl`, `/v1/admin`):
//! pausing stops taking jobs and resuming takes them again, while delivery
//! reports keep being applied. The real binary, Postgres and RabbitMQ.

use std::process::Output;
use std::time::Duration;

use crate::harness::*;
use sendgate::domain::plan::Plan;

const ADMIN: &str = "control-admin-token-0001";
const READER: &str = "control-read-token-0001";

fn ctl(env: &TestEnv, sendgate: &Process, token: &str, args: &[&str]) -> Output {
    let url = format!("http://{}", sendgate.addr());
    let mut all = vec!["ctl", "--url", url.as_str(), "--token", token];
    all.extend_from_slice(args);
    cli(env, &all)
}

fn state(env: &TestEnv, sendgate: &Process) -> serde_json::Value {
    let out = ctl(env, sendgate, ADMIN, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_stops_taking_jobs_until_resumed_while_reports_still_settle() {
    let mut env = TestEnv::new();
    env.set("SENDGATE__API__TOKEN", ADMIN);
    env.set("SENDGATE__API__TOKENS__VIEWER__SCOPE", "read");
    env.set("SENDGATE__API__TOKENS__VIEWER__TOKEN", READER);
    let store = env.store().await;
    create(&store, "ops", Plan::Free).await;
    let sendgate = Process::spawn(&env, false);
    sendgate.wait_ready(WAIT).await;
    let broker = env.broker().await;
    assert_eq!(state(&env, &sendgate)["state"], "consuming");

    // A job charged before the pause, its delivery report sent during it.
    broker.publish_job(&env.send_queue(), "ops", "before").await;
    let forward = broker.take(&env.delivery_queue(), 1, WAIT).await;

    // A read token may look but not pause; no token at all is a usage error.
    let out = ctl(&env, &sendgate, READER, &["pause"]);
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    env.set("SENDGATE__API__TOKEN", "");
    let url = format!("http://{}", sendgate.addr());
    let out = cli(&env, &["ctl", "--url", &url, "status"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    // The configuration's token is the default.
    env.set("SENDGATE__API__TOKEN", ADMIN);
    let out = cli(&env, &["ctl", "--url", &url, "status"]);
    assert!(out.status.success(), "{out:?}");

    let out = ctl(&env, &sendgate, ADMIN, &["pause"]);
    assert!(out.status.success(), "{out:?}");
    eventually(WAIT, || async {
        state(&env, &sendgate)["state"] == "paused"
    })
    .await;
    let status = state(&env, &sendgate);
    assert_eq!(status["paused"], true);
    assert_eq!(status["changed_by"], "default");

    // Paused: no consumer on the send queue, jobs wait there; still ready,
    // saying it is paused.
    assert_eq!(broker.consumers_of(&env.send_queue()).await, 0);
    for i in 0..5 {
        broker
            .publish_job(&env.send_queue(), "ops", &format!("paused-{i}"))
            .await;
    }
    eventually(WAIT, || async {
        broker.depth_of(&env.send_queue()).await == 5
    })
    .await;
    let (code, body) = http_get(sendgate.addr(), "/readyz").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["paused"], true);
    let metrics = http_get(sendgate.addr(), "/metrics").await.unwrap().1;
    assert_eq!(metric_value(&metrics, "sendgate_paused"), Some(1.0));

    // Delivery reports are still applied: the failed delivery refunds.
    broker.report(&env, &forward[0], "failed").await;
    eventually(WAIT, || async {
        reservation_state(&store, "ops", "before").await == "released"
    })
    .await;
    assert_eq!(broker.depth_of(&env.send_queue()).await, 5);

    // Pausing again changes nothing; resuming takes the waiting jobs.
    assert!(ctl(&env, &sendgate, ADMIN, &["pause"]).status.success());
    let out = ctl(&env, &sendgate, ADMIN, &["resume"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("consuming"));
    let forwards = broker.take(&env.delivery_queue(), 5, WAIT).await;
    assert_eq!(forwards.len(), 5);
    assert_eq!(state(&env, &sendgate)["state"], "consuming");
    let metrics = http_get(sendgate.addr(), "/metrics").await.unwrap().1;
    assert_eq!(metric_value(&metrics, "sendgate_paused"), Some(0.0));
    let (_, body) = http_get(sendgate.addr(), "/readyz").await.unwrap();
    assert_eq!(json(&body)["paused"], false);

    // Nobody listening: unavailable.
    let out = cli(
        &env,
        &[
            "ctl",
            "--url",
            &format!("http://127.0.0.1:{}", free_port()),
            "--token",
            ADMIN,
            "status",
        ],
    );
    assert_eq!(out.status.code(), Some(69), "{out:?}");

    drop(sendgate);
    env.cleanup().await;
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_holds_through_pauses_and_resumes() {
    // A pause or a resume is not a lost broker: /readyz answers 200 all
    // along, also while the jobs worker closes its session and while it
    // opens a new one on every job queue.
    let mut env = TestEnv::new();
    env.set("SENDGATE__API__TOKEN", ADMIN);
    let sendgate = Process::spawn(&env, false);
    sendgate.wait_ready(WAIT).await;
    let addr = sendgate.addr();
    let done = tokio_util::sync::CancellationToken::new();
    let watcher = tokio::spawn({
        let done = done.clone();
        async move {
            let (mut probes, mut not_ready) = (0, Vec::new());
            while !done.is_cancelled() {
                match http_get(addr, "/readyz").await {
                    Ok((200, _)) => {}
                    other => not_ready.push(format!("{other:?}")),
                }
                probes += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (probes, not_ready)
        }
    });
    for _ in 0..5 {
        for (action, expected) in [("pause", "paused"), ("resume", "consuming")] {
            let out = ctl(&env, &sendgate, ADMIN, &[action]);
            assert!(out.status.success(), "{out:?}");
            let sendgate = &sendgate;
            let env = &env;
            eventually(
                WAIT,
                || async move { state(env, sendgate)["state"] == expected },
            )
            .await;
        }
    }
    done.cancel();
    let (probes, not_ready) = watcher.await.unwrap();
    assert!(probes > 50, "only {probes} probes");
    assert!(
        not_ready.is_empty(),
        "{} of {probes}: {not_ready:?}",
        not_ready.len()
    );
    drop(sendgate);
    env.cleanup().await;
}
