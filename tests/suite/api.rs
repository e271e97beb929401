//! The account API over real HTTP, against the real Postgres (and a gate on
//! the real RabbitMQ for traffic).

use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;
use sendgate::clock::SystemClock;
use serde_json::Value;

const TOKEN: &str = "test-token-1234-admin";

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_needs_the_token_and_health_stays_open() {
    let (env, gate) = api_gate_with(&[]).await;
    let http = gate.http;
    for (method, path, body) in [
        ("GET", "/v1/accounts/a", None),
        ("PUT", "/v1/accounts/a", Some(r#"{"plan":"free"}"#)),
        ("GET", "/v1/accounts/a/ledger", None),
        ("GET", "/v1/accounts/a/capacity", None),
        (
            "POST",
            "/v1/accounts/a/adjustments",
            Some(r#"{"credits":1,"reason":"r","idempotency_key":"k"}"#),
        ),
        ("GET", "/v1/admin/consuming", None),
        ("POST", "/v1/admin/pause", None),
    ] {
        let (status, text) = http_request(http, method, path, None, body).await;
        assert_eq!(status, 401, "{method} {path} without a token");
        assert_eq!(json(&text)["error"], "missing or invalid bearer token");
        let (status, _) = http_request(http, method, path, Some("wrong"), body).await;
        assert_eq!(status, 401, "{method} {path} with a wrong token");
    }
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            http_request(http, "GET", path, None, None).await.0,
            200,
            "{path}"
        );
    }
    gate.shutdown().await;
    env.cleanup().await;
}

/// A gate with the API on (Pro: one send a day).
async fn api_gate() -> (TestEnv, RunningGate) {
    api_gate_with(&[("SENDGATE__PLANS__PRO__DAILY_SENDS", "1")]).await
}

/// A gate with the API on under [`TOKEN`] and these settings.
async fn api_gate_with(settings: &[(&str, &str)]) -> (TestEnv, RunningGate) {
    let mut env = TestEnv::new();
    env.set("SENDGATE__API__TOKEN", TOKEN);
    for (key, value) in settings {
        env.set(key, value);
    }
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    (env, gate)
}

async fn put_account(http: std::net::SocketAddr, id: &str, body: &str) -> (u16, String) {
    http_request(
        http,
        "PUT",
        &format!("/v1/accounts/{id}"),
        Some(TOKEN),
        Some(body),
    )
    .await
}

async fn finish(env: TestEnv, gate: RunningGate) {
    gate.shutdown().await;
    env.cleanup().await;
}

/// PUT creates (201) once; the same PUT again changes nothing (200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_is_created_once_and_shown() {
    let (env, gate) = api_gate().await;
    let (http, t) = (gate.http, Some(TOKEN));

    let (status, body) = http_request(
        http,
        "PUT",
        "/v1/accounts/ann",
        t,
        Some(r#"{"plan":"free"}"#),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let created = json(&body);
    assert_eq!(created["plan"], "free");
    assert_eq!(created["credit_balance"], 20);
    let (status, _) = http_request(
        http,
        "PUT",
        "/v1/accounts/ann",
        t,
        Some(r#"{"plan":"free"}"#),
    )
    .await;
    assert_eq!(status, 200, "creating twice changes nothing");

    let (status, body) = http_request(http, "GET", "/v1/accounts/ann", t, None).await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["credit_balance"], 20);

    finish(env, gate).await;
}

/// Three sends, then the ledger a page at a time and the capacity left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_pages_newest_first_and_capacity_follows_the_sends() {
    let (env, gate) = api_gate().await;
    let (http, t) = (gate.http, Some(TOKEN));
    assert_eq!(put_account(http, "ann", r#"{"plan":"free"}"#).await.0, 201);
    let broker = env.broker().await;

    // Send three jobs, then page through the ledger, newest first.
    for i in 0..3 {
        broker
            .publish_job(&env.send_queue(), "ann", &format!("l-{i}"))
            .await;
    }
    broker.take(&env.delivery_queue(), 3, WAIT).await;
    let (status, body) =
        http_request(http, "GET", "/v1/accounts/ann/ledger?limit=2", t, None).await;
    assert_eq!(status, 200, "{body}");
    let page = json(&body);
    let entries = page["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["kind"], "send");
    assert_eq!(entries[0]["balance_after"], 17);
    let before = page["next_before"].as_i64().unwrap();
    let (_, body) = http_request(
        http,
        "GET",
        &format!("/v1/accounts/ann/ledger?limit=2&before={before}"),
        t,
        None,
    )
    .await;
    let older = json(&body);
    let older_entries = older["entries"].as_array().unwrap();
    assert_eq!(older_entries.len(), 2);
    assert_eq!(older_entries[1]["kind"], "signup_grant");
    assert!(older_entries[0]["id"].as_i64().unwrap() < before);

    let (_, body) = http_request(http, "GET", "/v1/accounts/ann/capacity", t, None).await;
    let cap = json(&body);
    assert_eq!(cap["sends_available"], 17);
    assert_eq!(cap["unlimited"], false);

    finish(env, gate).await;
}

/// Moving to pro keeps the credits on record; a spent day says when the next starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_the_balance_and_a_full_pro_day_names_the_next() {
    let (env, gate) = api_gate().await;
    let (http, t) = (gate.http, Some(TOKEN));
    assert_eq!(put_account(http, "ann", r#"{"plan":"free"}"#).await.0, 201);
    let broker = env.broker().await;

    // Upgrade: the plan changes, the balance stays on record.
    let (status, body) = http_request(
        http,
        "PUT",
        "/v1/accounts/ann",
        t,
        Some(r#"{"plan":"pro"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["plan"], "pro");
    assert_eq!(
        json(&body)["credit_balance"],
        20,
        "the free balance stays on record"
    );
    broker.publish_job(&env.send_queue(), "ann", "pro-1").await;
    broker.take(&env.delivery_queue(), 1, WAIT).await;
    let (_, body) = http_request(http, "GET", "/v1/accounts/ann/capacity", t, None).await;
    let cap = json(&body);
    assert_eq!(cap["sends_available"], 0);
    let next: chrono::DateTime<chrono::Utc> =
        cap["next_available_at"].as_str().unwrap().parse().unwrap();
    let tomorrow = chrono::Utc::now().date_naive() + chrono::Duration::days(1);
    assert_eq!(
        next.naive_utc(),
        tomorrow.and_hms_opt(0, 0, 0).unwrap(),
        "the next UTC day"
    );

    finish(env, gate).await;
}

/// Scale: no number, no limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_account_has_unlimited_capacity() {
    let (env, gate) = api_gate().await;
    let (http, t) = (gate.http, Some(TOKEN));

    let (status, body) = http_request(
        http,
        "PUT",
        "/v1/accounts/sc",
        t,
        Some(r#"{"plan":"scale","timezone":"Europe/Berlin"}"#),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (_, body) = http_request(http, "GET", "/v1/accounts/sc/capacity", t, None).await;
    assert_eq!(json(&body)["unlimited"], true);
    assert!(json(&body)["sends_available"].is_null());

    finish(env, gate).await;
}

/// A PUT without a time zone keeps the account's; one naming another zone
/// moves the account's day there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_keeps_the_time_zone_unless_it_names_another() {
    let (env, gate) = api_gate().await;
    let http = gate.http;
    let (status, body) =
        put_account(http, "tokyo", r#"{"plan":"pro","timezone":"Asia/Tokyo"}"#).await;
    assert_eq!(status, 201, "{body}");

    let (status, body) = put_account(http, "tokyo", r#"{"plan":"scale"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["plan"], "scale");
    assert_eq!(json(&body)["timezone"], "Asia/Tokyo");

    let (status, body) = put_account(
        http,
        "tokyo",
        r#"{"plan":"scale","timezone":"Europe/Lisbon"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["timezone"], "Europe/Lisbon");
    // A new account without a zone counts its days in UTC.
    let (status, body) = put_account(http, "plain", r#"{"plan":"pro"}"#).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(json(&body)["timezone"], "UTC");

    finish(env, gate).await;
}

/// Bad input: 4xx with a JSON error naming the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_error_naming_the_problem() {
    let (env, gate) = api_gate().await;
    let (http, t) = (gate.http, Some(TOKEN));
    assert_eq!(put_account(http, "ann", r#"{"plan":"free"}"#).await.0, 201);

    assert_eq!(
        put_account(http, "sc", r#"{"plan":"scale","timezone":"Europe/Berlin"}"#)
            .await
            .0,
        201
    );
    let long_id = "x".repeat(129);
    for (method, path, body, status, needle) in [
        (
            "PUT",
            "/v1/accounts/bob".to_owned(),
            Some(r#"{"plan":"gold"}"#),
            400,
            "unknown plan",
        ),
        (
            "PUT",
            "/v1/accounts/bob".to_owned(),
            Some(r#"{"plan":"free","timezone":"Mars/Base"}"#),
            400,
            "Mars/Base",
        ),
        (
            "PUT",
            "/v1/accounts/bob".to_owned(),
            Some(r#"{"plan":"free","timezone":null}"#),
            400,
            "timezone",
        ),
        (
            "PUT",
            "/v1/accounts/bob".to_owned(),
            Some("not json"),
            400,
            "",
        ),
        (
            "PUT",
            "/v1/accounts/bob".to_owned(),
            Some(r#"{"plan":"free","extra":1}"#),
            400,
            "extra",
        ),
        (
            "PUT",
            format!("/v1/accounts/{long_id}"),
            Some(r#"{"plan":"free"}"#),
            400,
            "1 to 128",
        ),
        (
            "GET",
            "/v1/accounts/nobody".to_owned(),
            None,
            404,
            "does not exist",
        ),
        (
            "GET",
            "/v1/accounts/nobody/capacity".to_owned(),
            None,
            404,
            "does not exist",
        ),
        (
            "GET",
            "/v1/accounts/nobody/ledger".to_owned(),
            None,
            404,
            "does not exist",
        ),
        (
            "GET",
            "/v1/accounts/ann/ledger?limit=0".to_owned(),
            None,
            400,
            "limit",
        ),
        (
            "GET",
            "/v1/accounts/ann/ledger?limit=many".to_owned(),
            None,
            400,
            "limit",
        ),
        (
            "GET",
            "/v1/accounts/ann/ledger?before=-3".to_owned(),
            None,
            400,
            "before",
        ),
        (
            "GET",
            "/v1/accounts/ann/ledger?page=2".to_owned(),
            None,
            400,
            "page",
        ),
        (
            "GET",
            "/v1/accounts/ann/nonsense".to_owned(),
            None,
            404,
            "no such resource",
        ),
        (
            "DELETE",
            "/v1/accounts/ann".to_owned(),
            None,
            405,
            "not allowed",
        ),
        ("GET", "/v1/accounts/%FF".to_owned(), None, 400, ""),
    ] {
        let (got, text) = http_request(http, method, &path, t, body).await;
        assert_eq!(got, status, "{method} {path} {body:?}: {text}");
        let error = json(&text)["error"].as_str().unwrap().to_owned();
        assert!(
            error.contains(needle),
            "{method} {path}: {error:?} should mention {needle:?}"
        );
    }

    finish(env, gate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_tokens_have_scopes_come_from_files_and_are_counted_by_name() {
    let mut env = TestEnv::new();
    let dir = std::env::temp_dir().join(format!("sendgate-token-{}", env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("support");
    std::fs::write(&file, "support-token-from-a-file\n").unwrap();
    env.set("SENDGATE__API__TOKENS__DASHBOARD__SCOPE", "read")
        // Numeric-looking: taken literally, never parsed as a number.
        .set(
            "SENDGATE__API__TOKENS__DASHBOARD__TOKEN",
            "0070000000000001e3",
        )
        .set("SENDGATE__API__TOKENS__SUPPORT__SCOPE", "admin")
        .set(
            "SENDGATE__API__TOKENS__SUPPORT__TOKEN_FILE",
            file.to_str().unwrap(),
        );
    let gate = env.start_gate(Arc::new(SystemClock)).await;
    let http = gate.http;
    let (read, admin) = (
        Some("0070000000000001e3"),
        Some("support-token-from-a-file"),
    );

    let body = Some(r#"{"plan":"free"}"#);
    let (status, text) = http_request(http, "PUT", "/v1/accounts/tia", read, body).await;
    assert_eq!(status, 403, "the read scope cannot create: {text}");
    assert!(json(&text)["error"].as_str().unwrap().contains("dashboard"));
    assert_eq!(
        http_request(http, "PUT", "/v1/accounts/tia", admin, body)
            .await
            .0,
        201
    );
    assert_eq!(
        http_request(http, "GET", "/v1/accounts/tia", read, None)
            .await
            .0,
        200
    );
    let (status, _) =
        http_request(http, "GET", "/v1/accounts/tia", Some("support-token"), None).await;
    assert_eq!(status, 401, "a prefix of a token is no token");

    let metrics = http_request(http, "GET", "/metrics", None, None).await.1;
    assert_eq!(
        series(
            &metrics,
            "sendgate_api_requests_total",
            &[("token", "dashboard"), ("status", "403")]
        ),
        1.0
    );
    assert_eq!(
        series(
            &metrics,
            "sendgate_api_requests_total",
            &[("token", "support"), ("status", "201")]
        ),
        1.0
    );
    for secret in ["0070000000000001e3", "support-token-from-a-file"] {
        assert!(!metrics.contains(secret), "a token in the metrics");
    }
    gate.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_read_in_any_case_and_big_bodies_are_refused() {
    let (env, gate) = api_gate().await;
    let mut stream = tokio::net::TcpStream::connect(gate.http).await.unwrap();
    let request =
        format!("GET /v1/accounts/nobody HTTP/1.0\r\nAuthorization: bearer {TOKEN}\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response)
        .await
        .unwrap();
    assert!(response.starts_with("HTTP/1.0 404"), "{response}");

    let big = format!(r#"{{"plan":"free","pad":"{}"}}"#, "x".repeat(70_000));
    let (status, _) = http_request(
        gate.http,
        "PUT",
        "/v1/accounts/big",
        Some(TOKEN),
        Some(&big),
    )
    .await;
    assert_eq!(status, 413);
    finish(env, gate).await;
}

/// A support correction: applied once per key, audited with the token's
/// name, never below 0, and never by a read token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adjustments_apply_once_per_key_and_never_take_the_balance_below_zero() {
    let (env, gate) = api_gate_with(&[
        ("SENDGATE__API__TOKENS__HELPDESK__SCOPE", "admin"),
        (
            "SENDGATE__API__TOKENS__HELPDESK__TOKEN",
            "helpdesk-token-1234",
        ),
        ("SENDGATE__API__TOKENS__AUDITOR__SCOPE", "read"),
        (
            "SENDGATE__API__TOKENS__AUDITOR__TOKEN",
            "auditor-token-1234",
        ),
    ])
    .await;
    let http = gate.http;
    let store = env.store().await;
    put_account(http, "ada", r#"{"plan":"free"}"#).await;
    let adjust = |token: &'static str, body: &'static str| async move {
        http_request(
            http,
            "POST",
            "/v1/accounts/ada/adjustments",
            Some(token),
            Some(body),
        )
        .await
    };
    let refund = r#"{"credits":5,"reason":"refund after incident 42","idempotency_key":"inc-42"}"#;

    let (status, body) = adjust("helpdesk-token-1234", refund).await;
    assert_eq!(status, 201, "{body}");
    let first = json(&body);
    assert_eq!(first["credit_balance"], 25);
    assert_eq!(first["entry"]["kind"], "adjustment");
    assert_eq!(first["entry"]["delta"], 5);
    assert_eq!(first["entry"]["actor"], "helpdesk");
    assert_eq!(first["entry"]["note"], "refund after incident 42");

    // The same request again (a retry): the same row, nothing added.
    let (status, body) = adjust("helpdesk-token-1234", refund).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["entry"]["id"], first["entry"]["id"]);
    assert_eq!(json(&body)["credit_balance"], 25);
    // The key for something else: refused.
    let (status, body) = adjust(
        TOKEN,
        r#"{"credits":7,"reason":"refund after incident 42","idempotency_key":"inc-42"}"#,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("inc-42"));
    // Never below 0.
    let (status, body) = adjust(
        TOKEN,
        r#"{"credits":-26,"reason":"clawback","idempotency_key":"claw-1"}"#,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("below 0"));
    let (status, body) = adjust(
        TOKEN,
        r#"{"credits":-25,"reason":"clawback","idempotency_key":"claw-2"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(json(&body)["credit_balance"], 0);
    assert_eq!(json(&body)["entry"]["actor"], "default");

    // A read token may not; bad input says which field.
    let (status, _) = adjust("auditor-token-1234", refund).await;
    assert_eq!(status, 403);
    for (body, field) in [
        (
            r#"{"credits":0,"reason":"x","idempotency_key":"z"}"#,
            "credits",
        ),
        (
            r#"{"credits":1,"reason":"  ","idempotency_key":"z"}"#,
            "reason",
        ),
        (
            r#"{"credits":1,"reason":"x","idempotency_key":"a b"}"#,
            "key",
        ),
        (r#"{"credits":1,"reason":"x"}"#, "idempotency_key"),
    ] {
        let (status, text) = adjust(TOKEN, body).await;
        assert_eq!(status, 400, "{body}: {text}");
        assert!(
            json(&text)["error"].as_str().unwrap().contains(field),
            "{body}: {text}"
        );
    }
    let (status, _) = http_request(
        http,
        "POST",
        "/v1/accounts/nobody/adjustments",
        Some(TOKEN),
        Some(refund),
    )
    .await;
    assert_eq!(status, 404);

    // The ledger shows both, and still sums to the balance.
    let (_, body) = http_request(http, "GET", "/v1/accounts/ada/ledger", Some(TOKEN), None).await;
    let kinds: Vec<String> = json(&body)["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["adjustment", "adjustment", "signup_grant"]);
    assert_eq!(balance_and_ledger(&store, "ada").await, (0, 0));

    // The CLI twin, as an operator.
    let out = cli(
        &env,
        &[
            "accounts",
            "adjust",
            "ada",
            "--credits",
            "3",
            "--reason",
            "goodwill",
            "--key",
            "gw-1",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let adjusted: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(adjusted["credit_balance"], 3);
    assert!(
        adjusted["entry"]["actor"]
            .as_str()
            .unwrap()
            .starts_with("cli:")
    );
    let again = cli(
        &env,
        &[
            "accounts",
            "adjust",
            "ada",
            "--credits",
            "3",
            "--reason",
            "goodwill",
            "--key",
            "gw-1",
        ],
    );
    assert!(String::from_utf8_lossy(&again.stdout).contains("applied before"));
    let below = cli(
        &env,
        &[
            "accounts",
            "adjust",
            "ada",
            "--credits",
            "-4",
            "--reason",
            "oops",
        ],
    );
    assert_eq!(below.status.code(), Some(1), "{below:?}");
    assert!(String::from_utf8_lossy(&below.stderr).contains("below 0"));
    let bad = cli(
        &env,
        &[
            "accounts",
            "adjust",
            "ada",
            "--credits",
            "0",
            "--reason",
            "x",
        ],
    );
    assert_eq!(bad.status.code(), Some(64), "{bad:?}");
    assert_eq!(balance_and_ledger(&store, "ada").await, (3, 3));

    finish(env, gate).await;
}

/// Job status: a charged key, a refused one (even for an unknown account),
/// one refused and then charged, and what retention leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_status_tells_charged_refused_and_unknown_keys_apart() {
    let (env, gate) = api_gate_with(&[("SENDGATE__PLANS__FREE__SIGNUP_CREDITS", "1")]).await;
    let (http, t) = (gate.http, Some(TOKEN));
    let store = env.store().await;
    let broker = env.broker().await;
    put_account(http, "jo", r#"{"plan":"free"}"#).await;
    let status = |path: String| async move {
        let (code, body) = http_request(http, "GET", &path, t, None).await;
        (code, json(&body))
    };

    broker.publish_job(&env.send_queue(), "jo", "c/1").await;
    let forward = broker.take(&env.delivery_queue(), 1, WAIT).await;
    broker.publish_job(&env.send_queue(), "jo", "c/2").await;
    broker.publish_job(&env.send_queue(), "ghost", "g-1").await;
    broker.take(&env.dead_queue(), 2, WAIT).await;

    // Keys are percent-encoded in the path.
    let (code, charged) = status("/v1/accounts/jo/jobs/c%2F1".to_owned()).await;
    assert_eq!(code, 200, "{charged}");
    assert_eq!(charged["status"], "charged");
    assert_eq!(charged["charge"]["state"], "held");
    assert_eq!(charged["charge"]["charge"], "credit");
    assert_eq!(
        charged["charge"]["reservation_id"].as_str(),
        header(&forward[0], "x-sendgate-reservation-id").as_deref()
    );
    assert!(charged["last_refusal"].is_null());
    let (_, refused) = status("/v1/accounts/jo/jobs/c%2F2".to_owned()).await;
    assert_eq!(refused["status"], "refused");
    assert_eq!(refused["last_refusal"]["reason"], "out_of_credits");
    assert!(refused["charge"].is_null());
    // Nothing is recorded for an account that does not exist (its job
    // was dead-lettered `unknown_account`): the account is not found.
    let (code, ghost) = status("/v1/accounts/ghost/jobs/g-1".to_owned()).await;
    assert_eq!(code, 404, "{ghost}");
    let (code, unknown) = status("/v1/accounts/jo/jobs/never-sent".to_owned()).await;
    assert_eq!((code, unknown["status"].as_str()), (200, Some("unknown")));
    let (code, _) = status("/v1/accounts/nobody/jobs/x".to_owned()).await;
    assert_eq!(code, 404);

    // A credit comes back by hand; the refused key sent again is judged
    // afresh and charged: its status follows.
    let body = r#"{"credits":1,"reason":"test","idempotency_key":"t-1"}"#;
    let (code, _) = http_request(http, "POST", "/v1/accounts/jo/adjustments", t, Some(body)).await;
    assert_eq!(code, 201);
    broker.publish_job(&env.send_queue(), "jo", "c/2").await;
    broker.take(&env.delivery_queue(), 1, WAIT).await;
    let (_, again) = status("/v1/accounts/jo/jobs/c%2F2".to_owned()).await;
    assert_eq!(again["status"], "charged");
    assert_eq!(again["last_refusal"]["reason"], "out_of_credits");

    // The CLI twin.
    let out = cli(&env, &["accounts", "job", "jo", "c/2", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["status"], "charged");
    let out = cli(&env, &["accounts", "job", "jo", "c/2"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("refused     out_of_credits"));

    // Both charges wait for their delivery reports.
    let out = cli(&env, &["accounts", "holds", "jo", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let holds: Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys: Vec<&str> = holds["holds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["idempotency_key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["c/1", "c/2"]);
    let out = cli(&env, &["accounts", "holds", "nobody"]);
    assert_eq!(out.status.code(), Some(67), "{out:?}");

    // Retention removes refusals; charges stay.
    assert_eq!(store.purge_refusals(Duration::ZERO, 1000).await.unwrap(), 1);
    let (_, after) = status("/v1/accounts/jo/jobs/c%2F2".to_owned()).await;
    assert!(after["last_refusal"].is_null());
    assert_eq!(after["status"], "charged");

    finish(env, gate).await;
}

/// Usage on every plan: charges, releases and refusals by reason, per day
/// in the account's zone and per campaign, the CLI agreeing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_every_plan_per_day_and_per_campaign() {
    let (env, gate) = api_gate_with(&[("SENDGATE__PLANS__FREE__SIGNUP_CREDITS", "1")]).await;
    let (http, t) = (gate.http, Some(TOKEN));
    let broker = env.broker().await;
    put_account(http, "sc", r#"{"plan":"scale","timezone":"Europe/Berlin"}"#).await;
    put_account(http, "fr", r#"{"plan":"free"}"#).await;
    let publish = |account: &'static str, key: &'static str, campaign: Option<&'static str>| {
        let mut job = serde_json::json!({"account_id": account, "idempotency_key": key});
        if let Some(c) = campaign {
            job["campaign_id"] = c.into();
        }
        let (broker, queue) = (&broker, env.send_queue());
        async move {
            broker
                .publish(&queue, job.to_string().as_bytes(), Some(key))
                .await;
        }
    };
    publish("sc", "s-1", Some("spring")).await;
    publish("sc", "s-2", Some("spring")).await;
    publish("sc", "s-3", Some("autumn")).await;
    publish("sc", "s-4", None).await;
    publish("fr", "f-1", Some("spring")).await;
    let forwards = broker.take(&env.delivery_queue(), 5, WAIT).await;
    publish("fr", "f-2", Some("spring")).await;
    broker.take(&env.dead_queue(), 1, WAIT).await;
    // The free send fails: released.
    let free = forwards
        .iter()
        .find(|f| f.properties.message_id().as_ref().unwrap().as_str() == "f-1")
        .unwrap();
    broker.report(&env, free, "failed").await;
    let store = env.store().await;
    eventually(WAIT, || async {
        reservation_state(&store, "fr", "f-1").await == "released"
    })
    .await;

    let usage = |path: &'static str| async move {
        let (code, body) = http_request(http, "GET", path, t, None).await;
        assert_eq!(code, 200, "{path}: {body}");
        json(&body)
    };
    let scale = usage("/v1/accounts/sc/usage").await;
    assert_eq!(scale["timezone"], "Europe/Berlin");
    assert_eq!(scale["granularity"], "day");
    assert_eq!(scale["totals"]["charged"], 4, "{scale}");
    let days = scale["rows"].as_array().unwrap();
    assert!(!days.is_empty() && days.len() <= 2, "{scale}");
    // A day starts at local midnight, with the zone's offset.
    let start = days[0]["start"].as_str().unwrap();
    assert!(start.ends_with("T00:00:00+01:00"), "{start}");
    let by_campaign = usage("/v1/accounts/sc/usage?granularity=campaign").await;
    let campaigns: Vec<(String, i64)> = by_campaign["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["campaign_id"].as_str().unwrap().to_owned(),
                r["charged"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        campaigns,
        [
            (String::new(), 1),
            ("autumn".to_owned(), 1),
            ("spring".to_owned(), 2)
        ]
    );
    assert!(by_campaign["next_after"].is_null());
    // A page at a time, in campaign order; the totals cover every campaign.
    let first = usage("/v1/accounts/sc/usage?granularity=campaign&limit=2").await;
    let names = |page: &Value| -> Vec<String> {
        page["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["campaign_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&first), ["", "autumn"]);
    assert_eq!(first["next_after"], "autumn");
    assert_eq!(first["totals"]["charged"], 4);
    let second = usage("/v1/accounts/sc/usage?granularity=campaign&limit=2&after=autumn").await;
    assert_eq!(names(&second), ["spring"]);
    assert!(second["next_after"].is_null());
    for bad in [
        "/v1/accounts/sc/usage?granularity=campaign&limit=0",
        "/v1/accounts/sc/usage?granularity=campaign&limit=1001",
        "/v1/accounts/sc/usage?granularity=day&limit=x",
    ] {
        let (code, body) = http_request(http, "GET", bad, t, None).await;
        assert_eq!(code, 400, "{bad}: {body}");
    }
    let free = usage("/v1/accounts/fr/usage?granularity=hour").await;
    assert_eq!(free["totals"]["charged"], 1, "{free}");
    assert_eq!(free["totals"]["released"], 1, "{free}");
    assert_eq!(free["totals"]["refused"]["out_of_credits"], 1, "{free}");
    // A range with nothing in it, and bad input named.
    let empty =
        usage("/v1/accounts/fr/usage?from=2020-01-01T00:00:00Z&to=2020-01-02T00:00:00Z").await;
    assert_eq!(empty["rows"].as_array().unwrap().len(), 0);
    let (code, body) = http_request(
        http,
        "GET",
        "/v1/accounts/fr/usage?granularity=week",
        t,
        None,
    )
    .await;
    assert_eq!(code, 400);
    assert!(body.contains("granularity"), "{body}");
    let (code, _) = http_request(http, "GET", "/v1/accounts/nobody/usage", t, None).await;
    assert_eq!(code, 404);

    // The CLI twin.
    let out = cli(&env, &["accounts", "usage", "fr", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["totals"], free["totals"]);
    let out = cli(&env, &["accounts", "usage", "sc", "--by", "campaign"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("spring") && text.contains("(no campaign)"),
        "{text}"
    );

    // Capacity's CLI twin agrees with the API: the released credit is back.
    let out = cli(&env, &["accounts", "capacity", "fr", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    let api = usage("/v1/accounts/fr/capacity").await;
    assert_eq!(shown, api);
    assert_eq!(shown["sends_available"], 1);
    let out = cli(&env, &["accounts", "capacity", "sc"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("unlimited"));

    finish(env, gate).await;
}
