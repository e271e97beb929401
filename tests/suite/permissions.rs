//! Least privilege on the broker: the three users of
//! `deploy/rabbitmq/definitions.json`, with those permissions, on the test's
//! own queue names. The scheduler may only publish jobs, a delivery worker
//! may only read forwards and publish reports, sendgate owns its topology.

use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use sendgate::domain::plan::Plan;

use crate::harness::services::private_rabbit_with_definitions;
use crate::harness::*;

/// Publishes through `exchange` as `broker`'s user; `Err` when the broker
/// refuses it (the channel is closed then, so use a fresh client).
async fn publish(
    broker: &Broker,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
) -> Result<(), String> {
    let publish = broker.channel.basic_publish(
        exchange.into(),
        routing_key.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default().with_delivery_mode(2),
    );
    match publish.await {
        Ok(confirm) => match confirm.await {
            Ok(c) if c.is_ack() => Ok(()),
            other => Err(format!("{other:?}")),
        },
        Err(err) => Err(err.to_string()),
    }
}

/// The broker URLs of the three users, and the names they are confined to.
struct Users {
    sendgate: String,
    scheduler: String,
    delivery: String,
    jobs: String,
    reports: String,
}

/// Runs sendgate as its user and shows each user doing its part, and being
/// refused anything else.
async fn each_does_its_part_and_nothing_else(mut env: TestEnv, users: &Users) {
    let store = env.store().await;
    create(&store, "perm", Plan::Free).await;
    env.set("AMQP_URL", &users.sendgate);
    let mut sendgate = Process::spawn(&env, true);
    sendgate.wait_ready(WAIT).await;

    // The scheduler publishes a job through its exchange; it is gated.
    let as_scheduler = Broker::connect_to(&users.scheduler).await;
    let job = job_body("perm", "p-1");
    publish(&as_scheduler, &users.jobs, "", &job).await.unwrap();
    // The delivery worker reads the forward and reports on it.
    let as_delivery = Broker::connect_to(&users.delivery).await;
    let forward = eventually_get(&as_delivery, &env.delivery_queue()).await;
    let report = serde_json::json!({
        "account_id": "perm", "idempotency_key": "p-1",
        "reservation_id": header(&forward, "x-sendgate-reservation-id").unwrap(),
        "outcome": "delivered",
    });
    let report = report.to_string().into_bytes();
    publish(&as_delivery, &users.reports, "", &report)
        .await
        .unwrap();
    eventually(WAIT, || async {
        let state: Option<String> = sqlx::query_scalar(
            "SELECT state FROM reservations WHERE account_id = 'perm' AND idempotency_key = 'p-1'",
        )
        .fetch_optional(store.pool())
        .await
        .unwrap();
        state.as_deref() == Some("committed")
    })
    .await;

    // And nothing else.
    let refused = |what: &str, result: Result<(), String>| {
        let err = result.expect_err(what);
        assert!(
            err.contains("ACCESS_REFUSED") || err.contains("403"),
            "{what}: {err}"
        );
    };
    let scheduler = Broker::connect_to(&users.scheduler).await;
    refused(
        "the scheduler publishes a report",
        publish(&scheduler, &users.reports, "", b"{}").await,
    );
    let scheduler = Broker::connect_to(&users.scheduler).await;
    let outcomes = env.outcomes_queue();
    refused(
        "the scheduler uses the default exchange",
        publish(&scheduler, "", &outcomes, b"{}").await,
    );
    let delivery = Broker::connect_to(&users.delivery).await;
    refused(
        "a delivery worker publishes a job",
        publish(&delivery, &users.jobs, "", b"{}").await,
    );
    let delivery = Broker::connect_to(&users.delivery).await;
    let read = delivery
        .channel
        .basic_get(
            env.send_queue().as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await;
    refused(
        "a delivery worker reads the send queue",
        read.map(|_| ()).map_err(|e| e.to_string()),
    );

    sendgate.stop(WAIT).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_broker_user_can_do_its_part_and_nothing_else() {
    let env = TestEnv::new();
    let ours = format!(r"^t\.{}\..*", env.id);
    let (jobs, reports) = (
        format!("t.{}.jobs", env.id),
        format!("t.{}.reports", env.id),
    );
    let sendgate_user = RabbitUser::with_permissions(
        &format!("sendgate-{}", env.id),
        &ours,
        &format!(r"^(t\.{}\..*|amq\.default)$", env.id),
        &ours,
    );
    let scheduler = RabbitUser::with_permissions(
        &format!("scheduler-{}", env.id),
        "^$",
        &format!("^{}$", regex_escape(&jobs)),
        "^$",
    );
    let delivery = RabbitUser::with_permissions(
        &format!("delivery-{}", env.id),
        "^$",
        &format!("^{}$", regex_escape(&reports)),
        &format!("^{}$", regex_escape(&env.delivery_queue())),
    );
    let users = Users {
        sendgate: sendgate_user.url(),
        scheduler: scheduler.url(),
        delivery: delivery.url(),
        jobs,
        reports,
    };
    each_does_its_part_and_nothing_else(env, &users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_broker_definitions_give_each_user_its_part_and_no_more() {
    let definitions = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/rabbitmq/definitions.json"
    );
    let rabbit = private_rabbit_with_definitions(std::path::Path::new(definitions)).await;
    // The node is this test's alone: sendgate's own default names.
    let mut env = TestEnv::new();
    for (setting, name) in [
        ("SEND_QUEUE", "sendgate.send"),
        ("DELIVERY_QUEUE", "sendgate.delivery"),
        ("DEAD_LETTER_EXCHANGE", "sendgate.dead"),
        ("DEAD_LETTER_QUEUE", "sendgate.dead"),
        ("OUTCOMES_QUEUE", "sendgate.outcomes"),
        ("DEFERRED_QUEUE", "sendgate.deferred"),
        ("WAIT_QUEUE", "sendgate.wait"),
        ("JOBS_EXCHANGE", "sendgate.jobs"),
        ("REPORTS_EXCHANGE", "sendgate.reports"),
        ("EVENTS_EXCHANGE", "sendgate.events"),
        ("EVENTS_QUEUE", "sendgate.events"),
    ] {
        env.set(&format!("SENDGATE__AMQP__{setting}"), name);
    }
    let url = |user: &str| format!("amqp://{user}:{user}-dev@127.0.0.1:{}/%2f", rabbit.port);
    let users = Users {
        sendgate: url("sendgate"),
        scheduler: url("scheduler"),
        delivery: url("delivery"),
        jobs: "sendgate.jobs".to_owned(),
        reports: "sendgate.reports".to_owned(),
    };
    each_does_its_part_and_nothing_else(env, &users).await;
}

async fn eventually_get(broker: &Broker, queue: &str) -> lapin::message::Delivery {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let got = broker
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        if let Some(message) = got {
            return message.delivery;
        }
        assert!(std::time::Instant::now() < deadline, "nothing in {queue}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn regex_escape(name: &str) -> String {
    name.replace('.', r"\.")
}
