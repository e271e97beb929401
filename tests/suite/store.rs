//! Deciding batches against the real Postgres, without the broker: the
//! unlocked path for scale accounts, and how it hands over to the locked one.

use std::collections::HashMap;

use crate::harness::*;
use sendgate::domain::decision::{Decision, Forward};
use sendgate::domain::job::Job;
use sendgate::domain::plan::{Charge, Plan, Reason};
use sendgate::domain::settle::{Report, Settled};
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

/// Makes every forward of `account`'s charges look an hour old (as a
/// superuser): their leases have run out, as after a crash.
async fn expire_forward_leases(store: &Store, account: &str) {
    sqlx::query(
        "UPDATE reservations SET created_at = created_at - interval '1 hour',
                forwarded_at = forwarded_at - interval '1 hour'
         WHERE account_id = $1",
    )
    .bind(account)
    .execute(store.pool())
    .await
    .unwrap();
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
        for (i, pair) in da.decisions.iter().zip(&db.decisions).enumerate() {
            // One forward per charge: one process charges and forwards the
            // job, the other's copy waits for that forward.
            let (charged, waiting) = match pair {
                (Decision::Forward(f), Decision::Wait(w))
                | (Decision::Wait(w), Decision::Forward(f)) => (f, w),
                other => panic!("round {round}, job {i}: one forward and one wait: {other:?}"),
            };
            assert_eq!(charged.charge, Charge::Unmetered);
            assert!(charged.fresh, "round {round}, job {i}: charged once");
            assert_eq!(
                charged.reservation_id, waiting.reservation_id,
                "round {round}, job {i}: the copy waits for that charge's forward"
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
            Decision::Wait(_) => "waiting".to_owned(),
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
    // were charged and their forwards are not confirmed: while those may
    // still be on their way the copies wait, and once their leases ran out
    // they are forwarded again unchanged.
    let again = store.decide(&batch, now).await.unwrap();
    let renewed = forward(&again.decisions[0]);
    assert!(renewed.fresh, "a released charge is charged afresh");
    assert_ne!(renewed.reservation_id, ids[&0]);
    for i in 1..3 {
        assert!(
            matches!(&again.decisions[i], Decision::Wait(w) if w.reservation_id == ids[&i]),
            "k-{i}: {:?}",
            again.decisions[i]
        );
    }
    expire_forward_leases(&store, "sam").await;
    let later = store.decide(&batch[1..], now).await.unwrap();
    for i in 1..3 {
        let repeat = forward(&later.decisions[i - 1]);
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

    expire_forward_leases(&store, "old").await;
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
    store
        .settle(&[failed("mia", "m-0", first.reservation_id)], now)
        .await
        .unwrap();
    let renewed = forward(&store.decide(&batch, now).await.unwrap().decisions[0]).clone();
    assert!(renewed.fresh && renewed.reservation_id != first.reservation_id);

    // The mark of the earlier charge's forward lands only now.
    let late = sendgate::store::ConfirmedForward {
        key: batch[0].key(),
        reservation_id: first.reservation_id,
    };
    store.confirm_forwards(&[], &[late]).await.unwrap();
    expire_forward_leases(&store, "mia").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_settled_while_its_key_is_charged_afresh_is_stale_not_unknown() {
    let (env, store) = scale_account("ray").await;
    let now = utc("2026-03-02T10:00:00Z");
    let batch = jobs("ray", &keys("r", 1));
    let first = forward(&store.decide(&batch, now).await.unwrap().decisions[0]).clone();
    let report = failed("ray", "r-0", first.reservation_id);
    store
        .settle(std::slice::from_ref(&report), now)
        .await
        .unwrap();

    // Hold the re-charge after it took the released row out and before it
    // writes the new one: its insert into forward_batches waits for us.
    let mut holder = store.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE forward_batches IN SHARE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let recharge = tokio::spawn({
        let (store, batch) = (store.clone(), batch.clone());
        async move { store.decide(&batch, now).await }
    });
    eventually(WAIT, || async { waiting_for_locks(&store).await == 1 }).await;
    // The same failed report again (a redelivery): it waits for the row
    // the re-charge took out.
    let settling = tokio::spawn({
        let store = store.clone();
        async move { store.settle(&[report], now).await }
    });
    eventually(WAIT, || async { waiting_for_locks(&store).await == 2 }).await;
    holder.commit().await.unwrap();

    let renewed = forward(&recharge.await.unwrap().unwrap().decisions[0]).clone();
    assert!(renewed.fresh && renewed.reservation_id != first.reservation_id);
    let settled = settling.await.unwrap().unwrap();
    assert_eq!(
        settled,
        [Settled::Stale],
        "the key has another charge now: the report is stale"
    );
    assert_eq!(reservation_state(&store, "ray", "r-0").await, "held");
    env.cleanup().await;
}

/// How many of `decided` were forwarded.
fn forwarded(decided: &sendgate::store::Recorded) -> usize {
    decided
        .decisions
        .iter()
        .filter(|d| matches!(d, Decision::Forward(_)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_the_time_zone_keeps_the_count_of_the_day_in_progress() {
    let env = TestEnv::new();
    let store = env.store().await;
    store
        .create_account(&id("nomad"), Plan::Pro, "Pacific/Kiritimati")
        .await
        .unwrap();
    // 10:00 UTC: March 3 in Kiritimati (UTC+14), March 1 in Pago Pago
    // (UTC-11), where an earlier day already counted 20 sends.
    let now = utc("2026-03-02T10:00:00Z");
    let sent = store
        .decide(&jobs("nomad", &keys("a", 7)), now)
        .await
        .unwrap();
    assert_eq!(forwarded(&sent), 7);
    sqlx::query(
        "INSERT INTO daily_usage (account_id, day, used, daily_limit)
         VALUES ('nomad', '2026-03-01', 20, 20)",
    )
    .execute(store.pool())
    .await
    .unwrap();

    store
        .set_timezone(&id("nomad"), "Pacific/Pago_Pago", now)
        .await
        .unwrap();
    let more = store
        .decide(&jobs("nomad", &keys("b", 20)), now)
        .await
        .unwrap();
    assert_eq!(
        forwarded(&more),
        13,
        "the day in progress kept its 7 sends: neither reset nor the old day's 20"
    );
    // Pago Pago's next midnight starts a fresh day.
    let tomorrow = store
        .decide(&jobs("nomad", &keys("c", 20)), utc("2026-03-02T11:00:01Z"))
        .await
        .unwrap();
    assert_eq!(forwarded(&tomorrow), 20);
    assert!(matches!(
        store.set_timezone(&id("nomad"), "Mars/Base", now).await,
        Err(sendgate::store::StoreError::InvalidAccount(_))
    ));
    assert!(matches!(
        store.set_timezone(&id("nobody"), "UTC", now).await,
        Err(sendgate::store::StoreError::UnknownAccount(_))
    ));
    env.cleanup().await;
}
