//! Deciding batches against the real Postgres, without the broker: the
//! unlocked path for scale accounts, and how it hands over to the locked one.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use crate::harness::*;
use sendgate::domain::decision::{Decision, Forward};
use sendgate::domain::job::Job;
use sendgate::domain::plan::{Charge, Plan, Reason};
use sendgate::domain::settle::Report;
use sendgate::store::Store;
use uuid::Uuid;

fn jobs(account: &str, keys: &[String]) -> Vec<Job> {
    keys.iter()
        .map(|key| Job::parse(&job_body(account, key), None, 65536).unwrap())
        .collect()
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// A fresh test database with one scale account.
async fn scale_account(id: &str) -> (TestEnv, Store) {
    let env = TestEnv::new();
    let store = env.store().await;
    store
        .create_account(&self::id(id), Plan::Scale, "UTC")
        .await
        .unwrap();
    (env, store)
}

/// The forward a decision must be.
fn forward(decision: &Decision) -> &Forward {
    match decision {
        Decision::Forward(f) => f,
        other => panic!("expected a forward: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_deciding_the_same_scale_keys_at_once_charge_each_key_once() {
    let env = TestEnv::new();
    // Two stores are two sendgate processes: separate pools and plan hints.
    let (a, b) = (env.store().await, env.store().await);
    a.create_account(&id("hot"), Plan::Scale, "UTC")
        .await
        .unwrap();
    let now = utc("2026-03-02T10:00:00Z");
    // The first batch of each learns that `hot` is on the scale plan.
    for (store, warm) in [(&a, "warm-a"), (&b, "warm-b")] {
        store
            .decide(&jobs("hot", &keys(warm, 1)), now)
            .await
            .unwrap();
    }

    for round in 0..20 {
        let batch = jobs("hot", &keys(&format!("r{round}"), 40));
        let (da, db) = tokio::join!(a.decide(&batch, now), b.decide(&batch, now));
        let (da, db) = (da.unwrap(), db.unwrap());
        for (i, (x, y)) in da.decisions.iter().zip(&db.decisions).enumerate() {
            let (Decision::Forward(x), Decision::Forward(y)) = (x, y) else {
                panic!("round {round}, job {i}: a scale job must be forwarded: {x:?} / {y:?}");
            };
            assert_eq!(x.charge, Charge::Unmetered);
            assert_eq!(
                x.reservation_id, y.reservation_id,
                "round {round}, job {i}: both forwards carry the one reservation"
            );
            assert!(
                x.fresh != y.fresh,
                "round {round}, job {i}: exactly one of the two charged it"
            );
        }
    }
    assert_eq!(reservation_count(&a, "hot").await, 2 + 20 * 40);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_scale_hint_never_lets_a_downgraded_account_send_for_free() {
    let (env, store) = scale_account("dana").await;
    let now = utc("2026-03-02T10:00:00Z");
    let first = store
        .decide(&jobs("dana", &keys("a", 5)), now)
        .await
        .unwrap();
    assert!(first.decisions.iter().all(|d| matches!(
        d,
        Decision::Forward(f) if f.charge == Charge::Unmetered && f.fresh
    )));

    // Another process (here: the same store's pool) downgrades the account;
    // this store still remembers it as scale.
    store.set_plan(&id("dana"), Plan::Free).await.unwrap();
    sqlx::query("UPDATE accounts SET credit_balance = 3 WHERE id = 'dana'")
        .execute(store.pool())
        .await
        .unwrap();
    let second = store
        .decide(&jobs("dana", &keys("b", 5)), now)
        .await
        .unwrap();
    let charges: Vec<String> = second
        .decisions
        .iter()
        .map(|d| match d {
            Decision::Forward(f) => format!("{:?}", f.charge),
            Decision::DeadLetter(dead) | Decision::Defer(dead) => dead.reason.as_str().to_owned(),
            Decision::Duplicate => "duplicate".to_owned(),
        })
        .collect();
    assert_eq!(
        charges,
        [
            "Credit",
            "Credit",
            "Credit",
            "out_of_credits",
            "out_of_credits"
        ]
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_scale_charge_is_charged_afresh_and_a_repeat_is_not() {
    let (env, store) = scale_account("sam").await;
    let now = utc("2026-03-02T10:00:00Z");
    let batch = jobs("sam", &keys("k", 3));
    let first = store.decide(&batch, now).await.unwrap();
    let ids: HashMap<usize, Uuid> = first
        .decisions
        .iter()
        .enumerate()
        .map(|(i, d)| (i, forward(d).reservation_id))
        .collect();

    // The delivery of k-0 failed: its charge is released.
    let settled = store
        .settle(
            &[Report {
                account_id: id("sam"),
                idempotency_key: sendgate::domain::ids::IdempotencyKey::parse("k-0").unwrap(),
                reservation_id: ids[&0],
                delivered: false,
                detail: Some("carrier rejected".into()),
            }],
            now,
        )
        .await
        .unwrap();
    assert_eq!(settled.len(), 1);

    // Sent again: k-0 is a new attempt with a new reservation; k-1 and k-2
    // were charged and not confirmed, so they are forwarded again unchanged.
    let again = store.decide(&batch, now).await.unwrap();
    let renewed = forward(&again.decisions[0]);
    assert!(renewed.fresh, "a released charge is charged afresh");
    assert_ne!(renewed.reservation_id, ids[&0]);
    for i in 1..3 {
        let repeat = forward(&again.decisions[i]);
        assert!(!repeat.fresh, "k-{i} was charged already");
        assert_eq!(repeat.reservation_id, ids[&i]);
    }
    assert_eq!(reservation_count(&store, "sam").await, 3);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_kept_with_the_whole_sha256_still_tells_copies_from_other_payloads() {
    let (env, store) = scale_account("old").await;
    let now = utc("2026-03-02T10:00:00Z");
    let copy = jobs("old", &keys("k", 1));
    let first = store.decide(&copy, now).await.unwrap();
    let charged = forward(&first.decisions[0]).reservation_id;
    // As charges written before the digest was cut to 16 bytes are kept.
    let body = job_body("old", "k-0");
    sqlx::query("UPDATE reservations SET payload_digest = sha256($1) WHERE account_id = 'old'")
        .bind(&body)
        .execute(store.pool())
        .await
        .unwrap();

    let again = store.decide(&copy, now).await.unwrap();
    let repeat = forward(&again.decisions[0]);
    assert!(
        !repeat.fresh,
        "the same payload is a copy of the charged job"
    );
    assert_eq!(repeat.reservation_id, charged);

    let mut other: serde_json::Value = serde_json::from_slice(&body).unwrap();
    other["voice_note_url"] = "https://cdn.example.test/notes/43.ogg".into();
    let other = Job::parse(other.to_string().as_bytes(), None, 65536).unwrap();
    let conflict = store.decide(&[other], now).await.unwrap();
    match &conflict.decisions[0] {
        Decision::DeadLetter(d) => assert_eq!(d.reason, Reason::IdempotencyConflict),
        other => panic!("expected an idempotency conflict: {other:?}"),
    }
    assert_eq!(reservation_count(&store, "old").await, 1);
    env.cleanup().await;
}

fn failed(account: &str, key: &str, reservation_id: Uuid) -> Report {
    Report {
        account_id: id(account),
        idempotency_key: sendgate::domain::ids::IdempotencyKey::parse(key).unwrap(),
        reservation_id,
        delivered: false,
        detail: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_mark_of_an_earlier_attempt_never_confirms_the_charge_made_after_it() {
    let (env, store) = scale_account("mia").await;
    let now = utc("2026-03-02T10:00:00Z");
    let batch = jobs("mia", &keys("m", 1));
    let first = forward(&store.decide(&batch, now).await.unwrap().decisions[0]).clone();
    // Forwarded again (its first forward was never confirmed): this forward
    // of the earlier charge is what a late mark names.
    let again = forward(&store.decide(&batch, now).await.unwrap().decisions[0]).clone();
    assert!(!again.fresh);
    store
        .settle(&[failed("mia", "m-0", first.reservation_id)], now)
        .await
        .unwrap();
    let renewed = forward(&store.decide(&batch, now).await.unwrap().decisions[0]).clone();
    assert!(renewed.fresh && renewed.reservation_id != first.reservation_id);

    // The mark of the earlier forward lands only now.
    let late = sendgate::store::ConfirmedForward {
        key: batch[0].key(),
        reservation_id: again.reservation_id,
    };
    store.confirm_forwards(&[], &[late]).await.unwrap();
    let next = store.decide(&batch, now).await.unwrap();
    assert_eq!(
        forward(&next.decisions[0]).reservation_id,
        renewed.reservation_id,
        "the new charge's forward is unconfirmed: forwarded again, not dropped"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_and_deciding_lock_accounts_in_one_order_whatever_the_collation() {
    // A database whose collation sorts `a` before `B`; in bytes (and so in
    // the order sendgate locks in) `B` comes first.
    let env = TestEnv::new();
    let database = env.db_url.rsplit('/').next().unwrap().to_owned();
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", pg_base_url()))
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE \"{database}\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'und'"
    )))
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;
    let store = env.store().await;
    let now = utc("2026-03-02T10:00:00Z");
    let mut charged = HashMap::new();
    for account in ["a", "B"] {
        create(&store, account, Plan::Free).await;
        let decided = store
            .decide(&jobs(account, &keys("k", 1)), now)
            .await
            .unwrap();
        charged.insert(account, forward(&decided.decisions[0]).reservation_id);
    }

    // Another transaction holds `B`; settling both accounts must wait for it
    // without holding `a` (it locks `B` first), so the other can take `a`.
    let mut holder = store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM accounts WHERE id = 'B' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let settling = tokio::spawn({
        let store = store.clone();
        let reports = [
            failed("a", "k-0", charged["a"]),
            failed("B", "k-0", charged["B"]),
        ];
        async move { store.settle(&reports, now).await }
    });
    eventually(WAIT, || someone_waits_for_a_lock(&store)).await;
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *holder)
        .await
        .unwrap();
    sqlx::query("SELECT 1 FROM accounts WHERE id = 'a' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .expect("`a` is free: settling waits on `B` holding nothing");
    holder.commit().await.unwrap();
    let settled = settling.await.unwrap().expect("settling completes");
    assert_eq!(settled.len(), 2);
    assert_eq!(balance_and_ledger(&store, "a").await, (20, 20));
    env.cleanup().await;
}
