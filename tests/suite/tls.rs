//! TLS to Postgres, verified: the tests' own Postgres cluster gets a
//! certificate from a CA the test makes (openssl), and sendgate connects with
//! `sslmode=verify-full` and that CA as `sslrootcert`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

use crate::harness::services::{PrivatePostgres, private_postgres};
use crate::harness::*;

/// The CA's certificate, once the cluster serves TLS with a certificate
/// for `localhost` that it signed.
async fn tls_postgres() -> (&'static PrivatePostgres, &'static Path) {
    static CA: OnceCell<PathBuf> = OnceCell::const_new();
    let postgres = private_postgres().await;
    let ca = CA
        .get_or_init(|| async {
            let dir = std::env::temp_dir().join(format!("sendgate-tls-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let (ca, cert, key) = (
                dir.join("ca.pem"),
                dir.join("server.pem"),
                dir.join("server.key"),
            );
            make_certificates(&dir, &ca, &cert, &key);
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
            ca
        })
        .await;
    (postgres, ca.as_path())
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

/// A CA, and a server certificate for `localhost` it signed; the key is
/// readable by the server only.
fn make_certificates(dir: &Path, ca: &Path, cert: &Path, key: &Path) {
    let path = |p: &Path| p.display().to_string();
    let ca_key = dir.join("ca.key");
    let csr = dir.join("server.csr");
    let ext = dir.join("server.ext");
    std::fs::write(&ext, "subjectAltName = DNS:localhost\n").unwrap();
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
        &path(&ca_key),
        "-out",
        &path(ca),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &path(key),
        "-out",
        &path(&csr),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path(&csr),
        "-CA",
        &path(ca),
        "-CAkey",
        &path(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &path(&ext),
        "-out",
        &path(cert),
    ]);
    let chown = Command::new("chown")
        .args(["postgres:postgres", &path(key), &path(cert)])
        .status();
    assert!(chown.is_ok_and(|s| s.success()));
    let chmod = Command::new("chmod").args(["600", &path(key)]).status();
    assert!(chmod.is_ok_and(|s| s.success()));
}

fn verified_url(postgres: &PrivatePostgres, host: &str, database: &str, ca: &Path) -> String {
    format!(
        "postgres://postgres@{host}:{}/{database}?sslmode=verify-full&sslrootcert={}",
        postgres.port,
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_works_end_to_end_over_verified_tls() {
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
async fn a_certificate_for_another_host_is_refused_naming_the_setting() {
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
async fn with_tls_required_nothing_is_sent_in_plain_text_to_a_server_without_it() {
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
