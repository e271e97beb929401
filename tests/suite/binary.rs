//! The real `sendgate` binary as a user runs it: the account commands, the
//! metrics it exports, and a SIGTERM drain.

use std::time::{Duration, Instant};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_commands_grant_once_and_report_clear_errors() {
    let env = TestEnv::new();

    let out = cli(&env, &["accounts", "create", "zed", "--plan", "free"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("20 signup credits"));
    // Creating it twice grants nothing more.
    let out = cli(&env, &["accounts", "create", "zed", "--plan", "free"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("already exists"));

    let out = cli(&env, &["accounts", "show", "zed", "--json"]);
    assert!(out.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["plan"], "free");
    assert_eq!(shown["credit_balance"], 20);
    assert_eq!(shown["ledger_sum"], 20);
    assert_eq!(shown["recent_ledger"].as_array().unwrap().len(), 1);
    assert_eq!(shown["recent_ledger"][0]["kind"], "signup_grant");

    let out = cli(&env, &["accounts", "set-plan", "zed", "scale"]);
    assert!(out.status.success());
    let out = cli(&env, &["accounts", "show", "zed"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("scale") && table.contains("credits      20"),
        "{table}"
    );

    // Every account command speaks JSON when asked.
    let json = |args: &[&str]| -> serde_json::Value {
        let out = cli(&env, args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let created = json(&["accounts", "create", "jay", "--plan", "pro", "--json"]);
    assert_eq!(
        (
            created["created"].as_bool(),
            created["account"]["plan"].as_str()
        ),
        (Some(true), Some("pro"))
    );
    let again = json(&["accounts", "create", "jay", "--plan", "pro", "--json"]);
    assert_eq!(again["created"], false);
    let changed = json(&["accounts", "set-plan", "jay", "scale", "--json"]);
    assert_eq!(changed["plan"], "scale");

    // Errors: one clear line on stderr and a distinct exit code
    // (sysexits: 64 usage, 67 not found, 69 unavailable, 78 config).
    let out = cli(&env, &["accounts", "show", "nobody"]);
    assert_eq!(out.status.code(), Some(67));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("`nobody` does not exist"), "{stderr}");

    let out = cli(&env, &["accounts", "set-plan", "nobody", "pro"]);
    assert_eq!(out.status.code(), Some(67));

    let out = cli(&env, &["accounts", "create", "yan", "--plan", "gold"]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("gold") && stderr.contains("free, pro, scale"),
        "{stderr}"
    );

    let out = cli(
        &env,
        &[
            "accounts",
            "create",
            "yan",
            "--plan",
            "pro",
            "--timezone",
            "Mars/Base",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Mars/Base"));

    let mut bad = TestEnv::new();
    bad.set("SENDGATE__AMQP__PREFETCH", "many");
    let out = cli(&bad, &["migrate"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("amqp.prefetch"));
    // The config file may come from SENDGATE_CONFIG.
    let file = std::env::temp_dir().join(format!("sendgate-{}.toml", env.id));
    std::fs::write(&file, "[amqp]\nprefetch = 0\n").unwrap();
    let mut from_file = TestEnv::new();
    from_file.set("SENDGATE_CONFIG", file.to_str().unwrap());
    let out = cli(&from_file, &["config"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("amqp.prefetch"));
    std::fs::remove_file(&file).unwrap();

    let mut unreachable = TestEnv::new();
    unreachable.set("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none");
    unreachable.set("SENDGATE__DATABASE__ACQUIRE_TIMEOUT_MS", "1000");
    let out = cli(&unreachable, &["accounts", "show", "x"]);
    assert_eq!(out.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach the database"), "{stderr}");

    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_gates_jobs_counts_them_in_metrics_and_drains_on_sigterm() {
    let env = TestEnv::new();
    let out = cli(&env, &["accounts", "create", "alice", "--plan", "free"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&env, &["accounts", "create", "bulk", "--plan", "scale"]);
    assert!(out.status.success());

    let mut sendgate = Process::spawn(&env, true);
    let http = sendgate.addr();
    sendgate.wait_ready(WAIT).await;
    assert_eq!(http_get(http, "/healthz").await.unwrap().0, 200);

    let broker = env.broker().await;
    for i in 1..=21 {
        broker
            .publish_job(&env.send_queue(), "alice", &format!("a-{i}"))
            .await;
    }
    broker.take(&env.delivery_queue(), 20, WAIT).await;
    broker.take(&env.dead_queue(), 1, WAIT).await;
    // A repeat of a job whose forward is confirmed (recorded before its ack)
    // counts as a duplicate.
    let store = env.store().await;
    eventually(WAIT, || forward_confirmed(&store, "alice", "a-1")).await;
    broker.publish_job(&env.send_queue(), "alice", "a-1").await;

    let deadline = Instant::now() + WAIT;
    let metrics = loop {
        let text = http_get(http, "/metrics").await.unwrap().1;
        // Jobs are counted as received when their batch starts and by
        // outcome when it is decided; none in flight means all 22 are done.
        if metric_value(&text, "sendgate_jobs_received_total") == Some(22.0)
            && metric_value(&text, "sendgate_jobs_in_flight") == Some(0.0)
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never counted 22 finished jobs:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        series(
            &metrics,
            "sendgate_jobs_forwarded_total",
            &[("plan", "free"), ("charge", "credit")]
        ),
        20.0
    );
    assert_eq!(
        series(
            &metrics,
            "sendgate_jobs_dead_lettered_total",
            &[("reason", "out_of_credits")]
        ),
        1.0
    );
    assert_eq!(
        series(
            &metrics,
            "sendgate_jobs_dead_lettered_total",
            &[("reason", "invalid_job")]
        ),
        0.0
    );
    assert_eq!(series(&metrics, "sendgate_jobs_duplicate_total", &[]), 1.0);
    assert_eq!(
        series(&metrics, "sendgate_job_duration_seconds_count", &[]),
        22.0
    );
    assert_eq!(series(&metrics, "sendgate_ready", &[]), 1.0);
    assert!(metrics.contains("# TYPE sendgate_job_duration_seconds histogram"));
    assert!(!metrics.contains("alice"), "no account in metric labels");

    // SIGTERM with work queued: the process drains and exits 0, and every
    // job is either forwarded or still waiting in the send queue.
    for i in 0..500 {
        broker
            .publish_job(&env.send_queue(), "bulk", &format!("b-{i}"))
            .await;
    }
    sendgate.stop(Duration::from_secs(30)).await;

    let forwarded = broker
        .take_all(&env.delivery_queue(), Duration::from_millis(200))
        .await;
    let waiting = broker.take_all(&env.send_queue(), Duration::ZERO).await;
    let mut keys: Vec<String> = forwarded
        .iter()
        .chain(&waiting)
        .map(|d| {
            let job: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
            job["idempotency_key"].as_str().unwrap().to_owned()
        })
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 500, "I1: no job lost in the drain");

    env.cleanup().await;
}

#[test]
fn completions_and_the_manual_page_need_no_settings() {
    // A setting that would stop any other command: these do not read them.
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env("SENDGATE__AMQP__PREFETCH", "not a number")
            .output()
            .expect("the binary runs")
    };
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "completions {shell}: {out:?}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("dead-letters") && script.contains("set-plan"),
            "{shell}: {script}"
        );
    }
    let out = run(&["man"]);
    assert!(out.status.success(), "{out:?}");
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH sendgate"),
        "{page}"
    );
    assert!(page.contains("completions"), "{page}");
    let out = run(&["completions", "tcsh"]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "an unknown shell is a usage error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_and_stop_log_no_error_and_no_warning() {
    // A database and queue names never used: the first start of a new
    // deployment, which pages nobody who alerts on ERROR or WARN lines.
    let mut env = TestEnv::new();
    env.set("SENDGATE__LOG__LEVEL", "info")
        .set("SENDGATE__AMQP__DEPTH_POLL_SECS", "1");
    let mut process = Process::spawn(&env, false);
    process.wait_ready(Duration::from_secs(60)).await;
    // A round of the queue depth poll has read every queue.
    let addr = process.addr();
    eventually(Duration::from_secs(30), || async move {
        http_get(addr, "/metrics")
            .await
            .is_ok_and(|(_, text)| text.contains("sendgate_partition_messages{partition=\"3\"}"))
    })
    .await;
    process.terminate();
    let status = process.wait_for_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
    let log = process.log_text();
    assert!(log.contains("sendgate started"), "{log}");
    let loud: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("ERROR") || line.contains("WARN"))
        .collect();
    assert!(loud.is_empty(), "{loud:#?}");
    env.cleanup().await;
}
