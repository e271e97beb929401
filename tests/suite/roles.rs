//! Least privilege in the database: the shipped `deploy/postgres/roles.sql`
//! makes an owner and a runtime role; `sendgate migrate` runs as the owner,
//! `sendgate run` as the runtime role, which can do the gate's work and
//! nothing more. On the tests' own Postgres cluster (roles are cluster-wide),
//! never the machine's.

use std::time::Duration;

use crate::harness::services::{PrivatePostgres, private_postgres};
use crate::harness::*;

/// Runs `roles.sql` as shipped, for `database`.
fn create_roles(postgres: &PrivatePostgres, database: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/postgres/roles.sql");
    let out = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &postgres.port.to_string(),
            "-U",
            "postgres",
        ])
        .args([
            "-d",
            "postgres",
            "-q",
            "-v",
            &format!("database={database}"),
        ])
        .args([
            "-v",
            "owner_password=owner-pw",
            "-v",
            "app_password=app-pw",
            "-f",
            script,
        ])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "roles.sql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn url(postgres: &PrivatePostgres, role: &str, database: &str) -> String {
    format!("postgres://{role}@127.0.0.1:{}/{database}", postgres.port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_runs_as_the_runtime_role_which_can_change_nothing_but_its_rows() {
    let postgres = private_postgres().await;
    let mut env = TestEnv::new();
    let database = format!("sendgate_roles_{}", env.id);
    create_roles(postgres, &database);
    create_roles(postgres, &database); // idempotent
    let owner = url(postgres, "sendgate_owner", &database);
    let app = url(postgres, "sendgate_app", &database);

    env.set("DATABASE_URL", &owner);
    let migrated = cli(&env, &["migrate"]);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let created = cli(&env, &["accounts", "create", "rho", "--plan", "free"]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );

    env.set("DATABASE_URL", &app)
        .set("SENDGATE__DATABASE__MIGRATE_ON_START", "false");
    let mut sendgate = Process::spawn(&env, true);
    sendgate.wait_ready(WAIT).await;
    let broker = env.broker().await;
    broker.publish_job(&env.send_queue(), "rho", "r-1").await;
    broker.publish_job(&env.send_queue(), "nobody", "r-2").await;
    let forward = &broker.take(&env.delivery_queue(), 1, WAIT).await[0];
    // The CLI works as the runtime role too (it checks, never migrates).
    let shown = cli(&env, &["accounts", "show", "rho", "--json"]);
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    assert_eq!(
        header(forward, "x-sendgate-credits-remaining").as_deref(),
        Some("19")
    );
    broker.take(&env.dead_queue(), 1, WAIT).await;
    // The self-audit reads everything it checks with the runtime role's
    // grants, and finds the gate's own work in order.
    let audit = cli(&env, &["audit", "--json"]);
    assert!(audit.status.success(), "{audit:?}");
    sendgate.stop(WAIT).await;

    let pool = sqlx::PgPool::connect(&app).await.unwrap();
    for statement in [
        "CREATE TABLE intruder (x int)",
        "ALTER TABLE accounts ADD COLUMN intruder int",
        "DROP TABLE reservations",
        "TRUNCATE credit_ledger",
        "UPDATE credit_ledger SET delta = 0",
        "DELETE FROM credit_ledger",
        "DELETE FROM reservations",
        "TRUNCATE reservations_ring_1",
        "TRUNCATE reservations_kept",
        "UPDATE reservation_ring SET since = now() - interval '1 year'",
        "DELETE FROM accounts",
        "CREATE DATABASE intruder",
    ] {
        let refused = sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&pool)
            .await;
        let code = match refused {
            Err(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
            other => panic!("{statement}: {other:?}"),
        };
        assert_eq!(
            code.as_deref(),
            Some("42501"),
            "{statement} is refused for lack of privilege"
        );
    }
    let balance: i64 = sqlx::query_scalar("SELECT credit_balance FROM accounts WHERE id = 'rho'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(balance, 19);

    // Retention's authority is the owner's: the runtime role can neither
    // shorten the window nor pass one of its own, nor delete a kept (Free)
    // charge, even one it marked released.
    let refused = sqlx::query("UPDATE retention_settings SET dedup_window = interval '1 second'")
        .execute(&pool)
        .await;
    assert!(
        matches!(&refused, Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42501")),
        "{refused:?}"
    );
    let refused = sqlx::query("SELECT rotate_reservation_ring(interval '0')")
        .execute(&pool)
        .await;
    assert!(
        refused.is_err(),
        "a window of the caller's own: {refused:?}"
    );
    assert_eq!(
        sqlx::query_scalar::<_, Option<i16>>("SELECT rotate_reservation_ring()")
            .fetch_one(&pool)
            .await
            .unwrap(),
        None,
        "nothing is due within the stored window"
    );
    sqlx::query("UPDATE reservations SET state = 'released' WHERE account_id = 'rho'")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("SELECT remove_released_reservations(ARRAY['rho'], ARRAY['r-1'])")
        .execute(&pool)
        .await
        .unwrap();
    let kept: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reservations WHERE account_id = 'rho'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        kept, 1,
        "a kept charge is never deleted by the runtime role"
    );
    pool.close().await;

    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_migrating_stops_on_a_schema_behind_it_naming_the_command() {
    let postgres = private_postgres().await;
    let mut env = TestEnv::new();
    let database = format!("sendgate_behind_{}", env.id);
    create_roles(postgres, &database);
    env.set("DATABASE_URL", &url(postgres, "sendgate_app", &database))
        .set("SENDGATE__DATABASE__MIGRATE_ON_START", "false");
    let mut sendgate = Process::spawn(&env, false);
    let status = sendgate.wait_for_exit(Duration::from_secs(30)).await;
    assert!(!status.success());
    let out = cli(&env, &["run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sendgate migrate"), "{stderr}");
    env.cleanup().await;
}
