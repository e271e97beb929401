//! What the people on call rely on, checked with the real tools: the
//! `/metrics` output passes `promtool check metrics`, the alert rules pass
//! their unit tests, a real Prometheus scrapes sendgate and sees the jobs,
//! every metric a dashboard panel queries exists, and logs never carry a
//! password.
//!
//! `promtool` and `prometheus` come from Debian's `prometheus` package,
//! which `.ci/run` installs. Where they are missing outside CI these tests
//! say so and skip; under CI a missing tool fails them.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// True when `tool` runs; false (with a note) when it is missing outside CI.
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is required in CI (Debian package `prometheus`)"
        );
        eprintln!("skipping: {tool} not installed (apt-get install prometheus)");
    }
    found
}

/// The `queue` label values of `sendgate_queue_messages` (docs/metrics.md).
const QUEUES: [&str; 6] = [
    "send",
    "delivery",
    "dead_letter",
    "outcomes",
    "deferred",
    "waiting",
];

/// A `sendgate run` process with a free account and 21 jobs gated through it.
struct Running {
    env: TestEnv,
    sendgate: Process,
}

impl Running {
    async fn start_with_traffic() -> Running {
        let mut env = TestEnv::new();
        env.set("SENDGATE__AMQP__DEPTH_POLL_SECS", "1");
        // An audit a second, so its gauges are there to be read.
        env.set("SENDGATE__AUDIT__INTERVAL_SECS", "1");
        let store = env.store().await;
        store
            .create_account(&id("ops"), sendgate::domain::plan::Plan::Free, "UTC")
            .await
            .unwrap();
        store.close().await;
        let sendgate = Process::spawn(&env, false);
        sendgate.wait_ready(WAIT).await;
        let broker = env.broker().await;
        for i in 0..21 {
            broker
                .publish_job(&env.send_queue(), "ops", &format!("ops-{i}"))
                .await;
        }
        broker.take(&env.delivery_queue(), 20, WAIT).await;
        broker.take(&env.dead_queue(), 1, WAIT).await;
        let running = Running { env, sendgate };
        eventually(WAIT, || async {
            running
                .metrics()
                .await
                .contains("sendgate_audit_last_completed_timestamp_seconds")
        })
        .await;
        running
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.sendgate.addr()
    }

    async fn metrics(&self) -> String {
        // Wait until the 21 jobs are done and the depth poller has set the
        // gauge of every queue (it sets them one by one, so a scrape can fall
        // between two). A depth that never shows fails here.
        let deadline = Instant::now() + WAIT;
        loop {
            let text = http_get(self.addr(), "/metrics").await.unwrap().1;
            // Received when its batch starts, done (and so in the duration
            // histogram) once acked: wait for none in flight.
            if metric_value(&text, "sendgate_jobs_received_total") == Some(21.0)
                && metric_value(&text, "sendgate_jobs_in_flight") == Some(0.0)
                && QUEUES.iter().all(|queue| {
                    metric_value(
                        &text,
                        &format!("sendgate_queue_messages{{queue=\"{queue}\"}}"),
                    )
                    .is_some()
                })
            {
                return text;
            }
            assert!(Instant::now() < deadline, "metrics incomplete:\n{text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(mut self) {
        self.sendgate.stop(WAIT).await;
        self.env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_output_passes_promtool_and_shows_queue_depths() {
    if !have("promtool") {
        return;
    }
    let running = Running::start_with_traffic().await;
    let text = running.metrics().await;
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every catalogued metric is exported, so docs/metrics.md is complete.
    for m in sendgate::metrics::CATALOGUE {
        assert!(
            text.contains(&format!("# TYPE {} ", m.name)),
            "{} missing",
            m.name
        );
    }
    running.stop().await;
}

#[test]
fn the_alert_rules_pass_their_unit_tests() {
    if !have("promtool") {
        return;
    }
    for args in [
        vec!["check", "rules", "config/prometheus/alerts.yml"],
        vec!["test", "rules", "tests/prometheus/alerts_test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(ROOT)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_jobs_sendgate_received() {
    if !have("prometheus") {
        return;
    }
    let running = Running::start_with_traffic().await;
    // The shipped scrape config, pointed at this sendgate, scraping fast.
    let shipped =
        std::fs::read_to_string(format!("{ROOT}/config/prometheus/prometheus.yml")).unwrap();
    let dir = std::env::temp_dir().join(format!("sendgate-prom-{}", running.env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let config = shipped
        .replace(
            "sendgate:9400",
            &format!("127.0.0.1:{}", running.sendgate.port),
        )
        .replace("rabbitmq:15692", "127.0.0.1:15692")
        // No Alertmanager here: alerts are only evaluated.
        .replace("alertmanager:9093", "127.0.0.1:9")
        .replace(
            "/etc/prometheus/alerts.yml",
            &format!("{ROOT}/config/prometheus/alerts.yml"),
        )
        .replace("15s", "1s");
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let prom_port = free_port();
    let mut prometheus = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{prom_port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let value = loop {
        if let Ok((200, body)) =
            http_get(addr, "/api/v1/query?query=sendgate_jobs_received_total").await
        {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            if let Some(v) = json["data"]["result"][0]["value"][1].as_str() {
                break v.to_owned();
            }
        }
        if Instant::now() > deadline {
            let _ = prometheus.kill();
            panic!("Prometheus never scraped sendgate");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // The per-queue RabbitMQ job sees this test's send queue, so the
    // dashboard's filtered RabbitMQ panels have series.
    let per_queue = format!(
        "/api/v1/query?query=rabbitmq_detailed_queue_consumers%7Bqueue%3D%22{}%22%7D",
        running.env.send_queue()
    );
    let plugin_enabled = http_get("127.0.0.1:15692".parse().unwrap(), "/metrics")
        .await
        .is_ok();
    if plugin_enabled {
        // Until the per-queue job has scraped this test's queue.
        loop {
            if let Ok((200, body)) = http_get(addr, &per_queue).await {
                let json: serde_json::Value = serde_json::from_str(&body).unwrap();
                if json["data"]["result"][0]["value"][1].as_str().is_some() {
                    break;
                }
            }
            if Instant::now() > deadline {
                let _ = prometheus.kill();
                panic!("Prometheus never scraped the send queue's per-queue RabbitMQ series");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(value, "21", "Prometheus sees what the test published");
    running.stop().await;
}

/// The per-queue endpoint of RabbitMQ's Prometheus plugin, with the
/// parameters `config/prometheus/prometheus.yml` scrapes it with.
const RABBIT_PER_QUEUE: &str =
    "/metrics/detailed?family=queue_coarse_metrics&family=queue_consumer_count&vhost=%2F";

/// Metric names in a PromQL expression (identifiers that are not functions,
/// keywords or label names).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut chars = expr.char_indices().peekable();
    let mut in_braces = false;
    while let Some((i, c)) = chars.next() {
        match c {
            '{' => in_braces = true,
            '}' => in_braces = false,
            '"' => {
                for (_, c) in chars.by_ref() {
                    if c == '"' {
                        break;
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut end = i + c.len_utf8();
                while let Some(&(j, d)) = chars.peek() {
                    if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                        end = j + d.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                let word = &expr[i..end];
                if !in_braces
                    && (word.starts_with("sendgate_")
                        || word.starts_with("rabbitmq_")
                        || word == "up")
                {
                    names.insert(word.to_owned());
                }
            }
            _ => {}
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_a_dashboard_panel_queries_exists() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{ROOT}/config/grafana/dashboards/sendgate.json"))
            .unwrap(),
    )
    .unwrap();
    let mut wanted = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            wanted.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    assert!(
        wanted.len() >= 10,
        "the dashboard queries sendgate's metrics: {wanted:?}"
    );

    let running = Running::start_with_traffic().await;
    let ours = running.metrics().await;
    let exported = |text: &str, name: &str| {
        text.lines().any(|line| {
            !line.starts_with('#')
                && line
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
    };
    // Both of the plugin's endpoints the shipped scrape config reads: the
    // aggregated one and the per-queue one, which lists a new queue once
    // the broker has emitted its statistics (every few seconds).
    let plugin: std::net::SocketAddr = "127.0.0.1:15692".parse().unwrap();
    let rabbit_names: Vec<&String> = wanted
        .iter()
        .filter(|n| n.starts_with("rabbitmq_"))
        .collect();
    let deadline = Instant::now() + WAIT;
    let rabbit = loop {
        let text = match (
            http_get(plugin, "/metrics").await,
            http_get(plugin, RABBIT_PER_QUEUE).await,
        ) {
            (Ok((_, aggregated)), Ok((_, per_queue))) => aggregated + &per_queue,
            _ => break None,
        };
        if rabbit_names.iter().all(|name| exported(&text, name)) || Instant::now() > deadline {
            break Some(text);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for name in &wanted {
        if name == "up" {
            continue; // Prometheus' own series.
        }
        if name.starts_with("rabbitmq_") {
            let Some(rabbit) = &rabbit else {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "RabbitMQ's prometheus plugin is not reachable"
                );
                eprintln!("skipping {name}: rabbitmq_prometheus plugin not enabled");
                continue;
            };
            assert!(exported(rabbit, name), "RabbitMQ does not export {name}");
        } else {
            assert!(
                exported(&ours, name),
                "sendgate does not export {name}, which a panel queries"
            );
        }
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logged_and_dumped_connection_strings_have_no_password() {
    let mut env = TestEnv::new();
    env.set(
        "DATABASE_URL",
        "postgres://sendgate:hunter2-secret@127.0.0.1:1/sendgate",
    );
    env.set("AMQP_URL", "amqp://guest:rabbit-secret@127.0.0.1:1/%2f");
    env.set("SENDGATE__LOG__FORMAT", "json");
    env.set("SENDGATE__LOG__LEVEL", "info");
    env.set(
        "SENDGATE__HTTP__LISTEN",
        &format!("127.0.0.1:{}", free_port()),
    );
    let child = Command::new(BIN)
        .arg("run")
        .envs(env.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It waits for the unreachable database and says so, with the URL.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(
        logs.contains("postgres://sendgate:***@127.0.0.1:1/sendgate"),
        "{logs}"
    );
    assert!(!logs.contains("hunter2"), "{logs}");
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|_| panic!("not JSON: {line}"));
    }

    let dump = Command::new(BIN)
        .arg("config")
        .envs(env.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(dump.status.success());
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(
        !text.contains("hunter2") && !text.contains("rabbit-secret"),
        "{text}"
    );
    assert!(text.contains("amqp://guest:***@127.0.0.1:1/%2f"), "{text}");
}
