//! High availability: sendgate on a 3-node RabbitMQ cluster and a Postgres
//! primary with a synchronous standby (`harness::ha`, on this binary's own
//! ports and folders), with jobs arriving at a steady rate while a node
//! dies, the queue's leader dies, or the standby is promoted.
//!
//! The test's own clients (the scheduler publishing, the downstream
//! consuming forwards) use the third node, which no scenario kills; the
//! send queue's leader is put on the second node by declaring the topology
//! through it, and sendgate lists the first node first. Each run reports
//! the suite's usual join plus the acked charges missing after the run and
//! the longest time with no job forwarded.

use super::*;
use harness::ha::{PostgresPair, RabbitCluster, rabbit_cluster};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use tokio_util::sync::CancellationToken;

/// Jobs arrive at this rate, as a scheduler's steady stream does.
const RATE_PER_SEC: u64 = 100;

/// The most jobs a run may publish (at [`RATE_PER_SEC`], ten minutes).
const MAX_JOBS_PER_SCALE_ACCOUNT: usize = 15_000;

/// Jobs published after the last fault was ridden out, before publishing
/// stops (`HA_TAIL_JOBS` for longer runs).
fn tail_jobs() -> f64 {
    std::env::var("HA_TAIL_JOBS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300.0)
}

/// The bounds the runs are held to: the longest gap with no job forwarded
/// after a broker node dies, and after the database fails over.
const BROKER_GAP: Duration = Duration::from_secs(5);
const DATABASE_GAP: Duration = Duration::from_secs(15);

/// Node roles in every run.
const SENDGATE_NODE: usize = 0;
const LEADER_NODE: usize = 1;
const CLIENT_NODE: usize = 2;

struct Run {
    cluster: &'static RabbitCluster,
    pair: PostgresPair,
    fleet: Fleet,
    store: Store,
    workload: Workload,
    done: CancellationToken,
    stop_publishing: CancellationToken,
    publisher: tokio::task::JoinHandle<usize>,
    downstream: tokio::task::JoinHandle<Vec<(Instant, lapin::message::Delivery)>>,
}

/// A cluster with every node up, a fresh database pair, `processes`
/// sendgate processes ready, and jobs publishing until the run ends.
async fn begin_ha(name: &str, processes: usize) -> Run {
    let cluster = rabbit_cluster().await;
    tokio::task::spawn_blocking(|| cluster.await_all_running())
        .await
        .unwrap();
    let pair_name = format!("pg-{name}");
    let pair = tokio::task::spawn_blocking(move || PostgresPair::start(&pair_name))
        .await
        .unwrap();

    let mut env = TestEnv::new();
    let database = format!("sendgate_ha_{}", env.id);
    env.db_url = pair.url(&database);
    let sendgate_order = [SENDGATE_NODE, LEADER_NODE, CLIENT_NODE];
    env.set("DATABASE_URL", &env.db_url.clone())
        .set("AMQP_URL", &cluster.url_list(&sendgate_order))
        .set("SENDGATE__AMQP__PREFETCH", &PREFETCH.to_string())
        .set("SENDGATE__GATE__BATCH_SIZE", "20")
        .set("SENDGATE__AMQP__HEARTBEAT_SECS", "5")
        .set("SENDGATE__AMQP__PUBLISH_TIMEOUT_MS", "5000")
        .set("SENDGATE__GATE__FORWARD_LEASE_SECS", "10")
        .set("SENDGATE__DATABASE__STATEMENT_TIMEOUT_MS", "2000")
        .set("SENDGATE__DATABASE__ACQUIRE_TIMEOUT_MS", "2000");

    if let Ok(level) = std::env::var("FAULT_LOG_LEVEL") {
        env.set("SENDGATE__LOG__LEVEL", &level);
    }

    // The queues' leaders go where they are declared: on LEADER_NODE.
    let leader = Broker::connect_to(&cluster.nodes[LEADER_NODE].url()).await;
    sendgate::amqp::declare_topology(&leader.channel, &env.settings().amqp)
        .await
        .unwrap();
    let _ = leader.connection.close(200, "declared".into()).await;
    let leader_now = cluster.leader_of(&env.send_queue(), CLIENT_NODE);
    assert_eq!(leader_now, Some(LEADER_NODE), "the send queue's leader");
    // The partitions' leaders go where `balanced` puts them (RabbitMQ 3.10
    // counts leaders lazily, so partitions declared at once may share a
    // node; `rabbitmq-queues rebalance quorum` spreads them, which the
    // cluster benchmark does). The other queues stay on LEADER_NODE, where
    // the faults below expect them.
    let leaders: std::collections::BTreeSet<usize> = env.job_queues()[1..]
        .iter()
        .filter_map(|q| cluster.leader_of(q, CLIENT_NODE))
        .collect();
    eprintln!("partition leaders on nodes {leaders:?}");

    let store = env.store().await;
    let workload = Workload::mixed(2, 2, 4, 40, MAX_JOBS_PER_SCALE_ACCOUNT);
    create_accounts(&store, &workload).await;
    let mut fleet = Fleet::new(env, processes);
    fleet.client = cluster.nodes[CLIENT_NODE].url();
    fleet.start_all();
    fleet.wait_ready(WAIT).await;

    let done = CancellationToken::new();
    let downstream = tokio::spawn(consume_forwards(
        fleet.client.clone(),
        fleet.env.delivery_queue(),
        done.clone(),
    ));
    let stop_publishing = CancellationToken::new();
    let publisher = tokio::spawn(publish_paced(
        fleet.client.clone(),
        fleet.env.jobs_exchange(),
        workload.jobs.clone(),
        stop_publishing.clone(),
    ));
    Run {
        cluster,
        pair,
        fleet,
        store,
        workload,
        done,
        stop_publishing,
        publisher,
        downstream,
    }
}

/// Publishes `jobs` in order at [`RATE_PER_SEC`] with confirms, through
/// one node and the jobs `exchange` (routing key = the account), until
/// `stop`; a job whose confirm does not come is published again. Returns
/// how many were published.
async fn publish_paced(
    url: String,
    exchange: String,
    jobs: Vec<(String, String, Vec<u8>)>,
    stop: CancellationToken,
) -> usize {
    let broker = Broker::connect_to(&url).await;
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE_PER_SEC));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut pending = Vec::new();
    let mut published = 0;
    for (account, _, body) in &jobs {
        tick.tick().await;
        if stop.is_cancelled() {
            break;
        }
        published += 1;
        let confirm = broker
            .channel
            .basic_publish(
                exchange.as_str().into(),
                account.as_str().into(),
                BasicPublishOptions::default(),
                body,
                job_properties(),
            )
            .await
            .unwrap();
        pending.push((account.clone(), body.clone(), confirm));
        // Confirms are checked in chunks, so a slow one does not slow the pace.
        if pending.len() >= RATE_PER_SEC as usize {
            confirm_all(&broker, &exchange, std::mem::take(&mut pending)).await;
        }
    }
    confirm_all(&broker, &exchange, pending).await;
    published
}

async fn confirm_all(
    broker: &Broker,
    exchange: &str,
    pending: Vec<(String, Vec<u8>, lapin::PublisherConfirm)>,
) {
    for (account, body, confirm) in pending {
        if !confirm.await.is_ok_and(|c| c.is_ack()) {
            broker.publish_for(exchange, &account, &body).await;
        }
    }
}

/// Plays the downstream until `done`: takes every forward as it comes,
/// noting when.
async fn consume_forwards(
    url: String,
    queue: String,
    done: CancellationToken,
) -> Vec<(Instant, lapin::message::Delivery)> {
    use futures_util::StreamExt;
    let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "ha-downstream".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    loop {
        tokio::select! {
            _ = done.cancelled() => break,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => seen.push((Instant::now(), delivery)),
                other => panic!("the downstream consumer ended: {other:?}"),
            },
        }
    }
    let _ = connection.close(200, "done".into()).await;
    seen
}

/// Waits until jobs are being forwarded again after `since`: a fault has
/// been ridden out.
async fn forwarding_after(fleet: &Fleet, since: Instant) {
    let before = forwarded_total(fleet).await;
    eventually(Duration::from_secs(60), || async {
        forwarded_total(fleet).await > before
    })
    .await;
    eprintln!("forwarding again {:?} after the fault", since.elapsed());
}

/// Jobs forwarded so far by every running process.
async fn forwarded_total(fleet: &Fleet) -> f64 {
    let mut total = 0.0;
    for worker in fleet.workers.iter().filter(|w| w.is_running()) {
        if let Ok((200, text)) = http_get(worker.addr(), "/metrics").await {
            total += text
                .lines()
                .filter(|l| l.starts_with("sendgate_jobs_forwarded_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
    }
    total
}

/// Broker connections each process opened to `node`.
async fn connects_to(fleet: &Fleet, cluster: &RabbitCluster, node: usize) -> f64 {
    let label = format!("127.0.0.1:{}", cluster.nodes[node].port);
    let mut total = 0.0;
    for worker in fleet.workers.iter().filter(|w| w.is_running()) {
        if let Ok((200, text)) = http_get(worker.addr(), "/metrics").await {
            let node = format!("node=\"{label}\"");
            total += text
                .lines()
                .filter(|l| l.starts_with("sendgate_amqp_connects_total{"))
                .filter(|l| l.contains(&node) && l.contains("outcome=\"opened\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
    }
    total
}

/// Kills `node` with SIGKILL, waits until jobs flow again, and starts it
/// again.
async fn kill_and_restart(run: &Run, node: usize) {
    let cluster = run.cluster;
    let at = Instant::now();
    tokio::task::spawn_blocking(move || cluster.nodes[node].kill9())
        .await
        .unwrap();
    if std::env::var_os("FAULT_LOGS").is_some() {
        let queues = cluster.nodes[CLIENT_NODE].ctl_output(&[
            "list_queues",
            "name",
            "leader",
            "online",
            "members",
        ]);
        eprintln!("killed node {node}; queues now:\n{queues}");
    }
    forwarding_after(&run.fleet, at).await;
    // Ready again while the node is still down: /readyz is 503 only while
    // no node answers.
    run.fleet.wait_ready(WAIT).await;
    let queues = run.queues();
    tokio::task::spawn_blocking(move || {
        cluster.nodes[node].launch();
        cluster.await_all_running();
        cluster.await_members_online(&queues, CLIENT_NODE);
    })
    .await
    .unwrap();
}

impl Run {
    /// The quorum queues sendgate declared.
    fn queues(&self) -> Vec<String> {
        let env = &self.fleet.env;
        let mut queues = vec![
            env.delivery_queue(),
            env.dead_queue(),
            env.outcomes_queue(),
            env.deferred_queue(),
        ];
        queues.extend(env.job_queues());
        queues
    }
}

/// Lets the first few seconds of jobs through, so the fault hits a busy
/// gate with most of the stream still to come.
async fn under_way(run: &Run) {
    let first = (5 * RATE_PER_SEC) as f64;
    eventually(Duration::from_secs(60), || async {
        forwarded_total(&run.fleet).await >= first
    })
    .await;
}

/// Finishes the run: every job published and settled, the processes
/// stopped, and the report checked against the invariants and the bounds.
async fn finish_ha(run: Run, scenario: &str, gap_bound: Duration) {
    // A tail of jobs after the last fault, then the stream stops.
    let tail = forwarded_total(&run.fleet).await + tail_jobs();
    eventually(Duration::from_secs(60), || async {
        forwarded_total(&run.fleet).await >= tail
    })
    .await;
    run.stop_publishing.cancel();
    let Run {
        pair,
        mut fleet,
        store,
        workload,
        done,
        publisher,
        downstream,
        ..
    } = run;
    let workload = workload.first(publisher.await.unwrap());
    settle(&fleet, Duration::from_secs(120)).await;
    fleet.stop_all().await;
    done.cancel();
    let received = downstream.await.unwrap();
    let broker = Broker::connect_to(&fleet.client).await;
    let mut forwarded = broker
        .take_all(&fleet.env.delivery_queue(), Duration::ZERO)
        .await;
    let dead = broker
        .take_all(&fleet.env.dead_queue(), Duration::ZERO)
        .await;
    let gap = received
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or_default();
    forwarded.extend(received.into_iter().map(|(_, d)| d));

    // The new primary must hold a charge for every job that was forwarded
    // (its charge committed before the ack).
    store.locate_primary().await;
    let forwarded_reservations: Vec<String> = forwarded
        .iter()
        .filter_map(|d| header(d, "x-sendgate-reservation-id"))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let present: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reservations WHERE id::text = ANY($1)")
            .bind(&forwarded_reservations)
            .fetch_one(store.pool())
            .await
            .unwrap();
    let acked_lost = forwarded_reservations.len() - present as usize;

    let mut report = judge(
        scenario,
        &store,
        &workload,
        &forwarded,
        &dead,
        &HashSet::new(),
    )
    .await;
    report.notes.push(format!(
        "acked charges lost: **{acked_lost}**; longest gap with no job forwarded: **{:.1} s** (bound {} s); {} jobs at {RATE_PER_SEC}/s",
        gap.as_secs_f64(),
        gap_bound.as_secs(),
        workload.total(),
    ));
    assert_sound(&report, PLAN_REASONS);
    assert_eq!(acked_lost, 0, "charges of forwarded jobs lost");
    assert!(
        gap <= gap_bound,
        "no job forwarded for {gap:?}, more than {gap_bound:?}"
    );
    store.close().await;
    drop(pair);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_the_broker_node_sendgate_is_on_is_killed_and_restarted() {
    let _serial = SERIAL.lock().await;
    let run = begin_ha("node", 1).await;
    under_way(&run).await;
    let before = connects_to(&run.fleet, run.cluster, LEADER_NODE).await;
    kill_and_restart(&run, SENDGATE_NODE).await;
    // It moved to the next node of its list, and said so.
    assert!(connects_to(&run.fleet, run.cluster, LEADER_NODE).await > before);
    finish_ha(run, "HA broker node of sendgate killed", BROKER_GAP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_the_send_queue_leader_is_killed_and_restarted() {
    let _serial = SERIAL.lock().await;
    let run = begin_ha("leader", 1).await;
    under_way(&run).await;
    let leader = run
        .cluster
        .leader_of(&run.fleet.env.send_queue(), CLIENT_NODE)
        .unwrap();
    assert_ne!(leader, SENDGATE_NODE);
    kill_and_restart(&run, leader).await;
    let moved = run
        .cluster
        .leader_of(&run.fleet.env.send_queue(), CLIENT_NODE);
    assert!(
        moved.is_some_and(|n| n != leader),
        "a new leader was elected"
    );
    finish_ha(run, "HA send queue leader killed", BROKER_GAP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_the_standby_is_promoted_and_the_old_primary_stopped() {
    let _serial = SERIAL.lock().await;
    let run = begin_ha("promote", 1).await;
    under_way(&run).await;
    let at = Instant::now();
    let pair = &run.pair;
    tokio::task::block_in_place(|| pair.fail_over());
    forwarding_after(&run.fleet, at).await;
    finish_ha(run, "HA database standby promoted", DATABASE_GAP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_all_three_faults_with_two_sendgate_processes() {
    let _serial = SERIAL.lock().await;
    let run = begin_ha("all", 2).await;
    under_way(&run).await;
    kill_and_restart(&run, SENDGATE_NODE).await;
    let leader = run
        .cluster
        .leader_of(&run.fleet.env.send_queue(), CLIENT_NODE)
        .unwrap();
    assert_ne!(
        leader, CLIENT_NODE,
        "the leader stayed where it was declared"
    );
    kill_and_restart(&run, leader).await;
    let at = Instant::now();
    let pair = &run.pair;
    tokio::task::block_in_place(|| pair.fail_over());
    forwarding_after(&run.fleet, at).await;
    finish_ha(run, "HA all three faults, two processes", DATABASE_GAP).await;
}
