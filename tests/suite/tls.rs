//! TLS to Postgres and RabbitMQ, verified: the tests' own Postgres cluster
//! and a RabbitMQ node of their own (TLS only) get certificates from a CA the
//! tests make (openssl); sendgate connects with `sslmode=verify-full` and
//! that CA as `sslrootcert`, and with `amqps://` and `[amqp] ca_file`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

use crate::harness::services::{
    PrivatePostgres, PrivateRabbit, private_postgres, private_tls_rabbit, scratch_dir,
};
use crate::harness::*;

/// The tests' certificate authority.
struct Ca {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

async fn ca() -> &'static Ca {
    static CA: OnceCell<Ca> = OnceCell::const_new();
    CA.get_or_init(|| async {
        let dir = scratch_dir("tls");
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=sendgate test CA",
            "-keyout",
            &path(&key),
            "-out",
            &path(&cert),
        ]);
        Ca { dir, cert, key }
    })
    .await
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server certificate for `localhost`, signed by the CA; its key readable
/// by `owner` only.
fn server_certificate(ca: &Ca, name: &str, owner: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        ca.dir.join(format!("{name}.pem")),
        ca.dir.join(format!("{name}.key")),
    );
    let (csr, ext) = (
        ca.dir.join(format!("{name}.csr")),
        ca.dir.join(format!("{name}.ext")),
    );
    std::fs::write(&ext, "subjectAltName = DNS:localhost\n").unwrap();
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &path(&key),
        "-out",
        &path(&csr),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path(&csr),
        "-CA",
        &path(&ca.cert),
        "-CAkey",
        &path(&ca.key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &path(&ext),
        "-out",
        &path(&cert),
    ]);
    let owned = format!("{owner}:{owner}");
    let chown = Command::new("chown")
        .args([&owned, &path(&key), &path(&cert)])
        .status();
    assert!(chown.is_ok_and(|s| s.success()));
    let chmod = Command::new("chmod").args(["600", &path(&key)]).status();
    assert!(chmod.is_ok_and(|s| s.success()));
    (cert, key)
}

/// The tests' Postgres, serving TLS with a certificate for `localhost`;
/// and the CA's certificate.
async fn tls_postgres() -> (&'static PrivatePostgres, &'static Path) {
    static ON: OnceCell<()> = OnceCell::const_new();
    let (postgres, ca) = (private_postgres().await, ca().await);
    ON.get_or_init(|| async {
        let (cert, key) = server_certificate(ca, "postgres", "postgres");
        let admin = sqlx::PgPool::connect(&format!("{}/postgres", postgres.base_url()))
            .await
            .unwrap();
        for setting in [
            format!("ALTER SYSTEM SET ssl_cert_file = '{}'", cert.display()),
            format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
            "ALTER SYSTEM SET ssl = on".to_owned(),
            "SELECT pg_reload_conf()".to_owned(),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(setting))
                .execute(&admin)
                .await
                .unwrap();
        }
        admin.close().await;
    })
    .await;
    (postgres, ca.cert.as_path())
}

/// A RabbitMQ node of the tests' own that speaks only TLS, with a
/// certificate for `localhost`; and the CA's certificate.
async fn tls_rabbit() -> (&'static PrivateRabbit, &'static Path) {
    static CERTIFICATE: OnceCell<(PathBuf, PathBuf)> = OnceCell::const_new();
    let ca = ca().await;
    let (cert, key) = CERTIFICATE
        .get_or_init(|| async { server_certificate(ca, "rabbitmq", "rabbitmq") })
        .await;
    (
        private_tls_rabbit(&ca.cert, cert, key).await,
        ca.cert.as_path(),
    )
}

fn verified_url(postgres: &PrivatePostgres, host: &str, database: &str, ca: &Path) -> String {
    format!(
        "postgres://postgres@{host}:{}/{database}?sslmode=verify-full&sslrootcert={}",
        postgres.port,
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_the_gate_works_end_to_end_over_verified_tls() {
    let (postgres, ca) = tls_postgres().await;
    let mut env = TestEnv::new();
    let database = format!("sendgate_tls_{}", env.id);
    env.set(
        "DATABASE_URL",
        &verified_url(postgres, "localhost", &database, ca),
    );
    let created = cli(&env, &["accounts", "create", "tess", "--plan", "scale"]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let mut sendgate = Process::spawn(&env, true);
    sendgate.wait_ready(WAIT).await;
    let broker = env.broker().await;
    broker.publish_job(&env.send_queue(), "tess", "t-1").await;
    broker.take(&env.delivery_queue(), 1, WAIT).await;

    // Every connection sendgate holds is encrypted.
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", postgres.base_url()))
        .await
        .unwrap();
    let (connections, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a
         JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1 AND a.application_name = 'sendgate'",
    )
    .bind(&database)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert!(
        connections > 0 && encrypted == connections,
        "{encrypted} of {connections}"
    );
    sendgate.stop(WAIT).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE \"{database}\" WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_certificate_for_another_host_is_refused_naming_the_setting() {
    let (postgres, ca) = tls_postgres().await;
    let mut env = TestEnv::new();
    // The certificate names localhost; 127.0.0.1 is not it.
    let url = verified_url(postgres, "127.0.0.1", "postgres", ca);
    env.set("DATABASE_URL", &url);
    let out = cli(&env, &["migrate"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("database.url"), "{stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_with_tls_required_nothing_is_sent_in_plain_text_to_a_server_without_it() {
    // A listener that answers Postgres's SSLRequest with "no" and records
    // every byte the client sends.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 8];
        socket.read_exact(&mut request).await.unwrap();
        socket.write_all(b"N").await.unwrap();
        let mut rest = Vec::new();
        let _ = socket.read_to_end(&mut rest).await;
        (request, rest)
    });
    let mut env = TestEnv::new();
    env.set(
        "DATABASE_URL",
        &format!("postgres://secret-user:hunter2@127.0.0.1:{port}/x?sslmode=require"),
    );
    let out = cli(&env, &["migrate"]);
    assert!(!out.status.success());
    let (request, rest) = server.await.unwrap();
    // The SSLRequest: length 8, code 80877103.
    assert_eq!(request, [0, 0, 0, 8, 4, 210, 22, 47]);
    assert!(
        rest.is_empty(),
        "nothing after the refused SSLRequest: {rest:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("hunter2"), "{stderr}");
    env.cleanup().await;
}

/// The broker settings for `url` with the tests' CA, and a client over them.
async fn tls_broker(env: &TestEnv) -> Broker {
    let settings = env.settings();
    let connection = sendgate::amqp::connect(&settings.amqp, "test")
        .await
        .unwrap();
    Broker::over(connection).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_the_gate_works_end_to_end_over_verified_tls() {
    let (rabbit, ca) = tls_rabbit().await;
    let mut env = TestEnv::new();
    env.set(
        "AMQP_URL",
        &format!("amqps://guest:guest@localhost:{}/%2f", rabbit.port),
    )
    .set("SENDGATE__AMQP__CA_FILE", ca.to_str().unwrap());
    let store = env.store().await;
    create(&store, "amy", sendgate::domain::plan::Plan::Scale).await;
    let mut sendgate = Process::spawn(&env, true);
    sendgate.wait_ready(WAIT).await;
    let broker = tls_broker(&env).await;
    broker.publish_job(&env.send_queue(), "amy", "a-1").await;
    let forward = &broker.take(&env.delivery_queue(), 1, WAIT).await[0];
    assert_eq!(
        header(forward, "x-sendgate-charge").as_deref(),
        Some("unmetered")
    );
    sendgate.stop(WAIT).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_a_certificate_for_another_host_is_refused_naming_the_setting() {
    let (rabbit, ca) = tls_rabbit().await;
    let mut env = TestEnv::new();
    // The certificate names localhost; 127.0.0.1 is not it.
    env.set(
        "AMQP_URL",
        &format!("amqps://guest:guest@127.0.0.1:{}/%2f", rabbit.port),
    )
    .set("SENDGATE__AMQP__CA_FILE", ca.to_str().unwrap());
    let out = cli(&env, &["dead-letters", "list"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("amqp.url"), "{stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    assert!(!stderr.contains("guest:guest"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_over_tls_nothing_is_sent_in_plain_text_to_a_plain_server() {
    // A plain AMQP listener: it answers with the protocol header, and
    // records what the client sent first.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut first = vec![0u8; 5];
        socket.read_exact(&mut first).await.unwrap();
        socket.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut rest)).await;
        first.extend(rest);
        first
    });
    let (_, ca) = tls_rabbit().await;
    let mut env = TestEnv::new();
    env.set(
        "AMQP_URL",
        &format!("amqps://secret-user:hunter2@localhost:{port}/%2f"),
    )
    .set("SENDGATE__AMQP__CA_FILE", ca.to_str().unwrap());
    let out = cli(&env, &["dead-letters", "list"]);
    assert!(!out.status.success());
    let sent = server.await.unwrap();
    assert_eq!(sent[0], 0x16, "a TLS handshake record first");
    let text = String::from_utf8_lossy(&sent);
    assert!(!text.contains("AMQP") && !text.contains("hunter2") && !text.contains("secret-user"));
}
