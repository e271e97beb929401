//! Replicated services for the HA tests: a 3-node RabbitMQ cluster and a
//! Postgres primary with a synchronous streaming standby, each on free
//! ports with folders of this process's own (see [`super::services`]); the
//! machine's default services are never touched.

use std::path::Path;
use std::time::Duration;

use tokio::sync::OnceCell;

use super::services::{PrivatePostgres, PrivateRabbit, Watched, root, watch};

/// Three RabbitMQ nodes clustered together.
pub struct RabbitCluster {
    pub nodes: Vec<PrivateRabbit>,
}

static CLUSTER: OnceCell<Watched<RabbitCluster>> = OnceCell::const_new();

/// The binary's cluster, formed on first use (about 20 s) and stopped when
/// the binary exits.
pub async fn rabbit_cluster() -> &'static RabbitCluster {
    let watched = CLUSTER
        .get_or_init(|| async {
            tokio::task::spawn_blocking(|| {
                let dir = root().join("cluster");
                let cluster = RabbitCluster::form(&dir);
                let teardown = cluster
                    .nodes
                    .iter()
                    .map(|n| format!("rabbitmqctl -q -n {} stop", n.node))
                    .collect::<Vec<_>>()
                    .join("; ");
                let _watchdog = watch(&dir, &teardown);
                Watched {
                    service: cluster,
                    _watchdog,
                }
            })
            .await
            .expect("forming the RabbitMQ cluster")
        })
        .await;
    &watched.service
}

impl RabbitCluster {
    fn form(dir: &Path) -> RabbitCluster {
        let nodes: Vec<PrivateRabbit> = (1..=3)
            .map(|n| {
                PrivateRabbit::prepare(&dir.join(n.to_string()), &format!("ha{n}"), |port| {
                    format!("listeners.tcp.local = 127.0.0.1:{port}\n")
                })
            })
            .collect();
        // The nodes boot in parallel, then the second and third join the first.
        std::thread::scope(|scope| {
            for node in &nodes {
                scope.spawn(|| node.launch());
            }
        });
        // `ctl` names the private node (`rabbitmqctl -n <node>`): the
        // machine's own RabbitMQ is never stopped.
        for node in &nodes[1..] {
            node.ctl(&["stop_app"]);
            node.ctl(&["join_cluster", &nodes[0].node]);
            node.ctl(&["start_app"]);
            node.await_startup();
        }
        RabbitCluster { nodes }
    }

    /// Every node's URL, in order, as one `AMQP_URL` list.
    pub fn url_list(&self, order: &[usize]) -> String {
        order
            .iter()
            .map(|&i| self.nodes[i].url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node leading `queue`, asked through node `via`.
    pub fn leader_of(&self, queue: &str, via: usize) -> Option<usize> {
        let out =
            self.nodes[via].ctl_output(&["list_queues", "--no-table-headers", "name", "leader"]);
        let leader = out
            .lines()
            .filter_map(|line| line.split_once(char::is_whitespace))
            .find(|(name, _)| *name == queue)
            .map(|(_, leader)| leader.trim().to_owned())?;
        self.nodes.iter().position(|n| n.node == leader)
    }

    /// Waits until each of `queues` has every node's member online (after
    /// a restart, a node's queue members rejoin a moment after it runs):
    /// only then may another node die without the queues losing quorum.
    pub fn await_members_online(&self, queues: &[String], via: usize) {
        let mut out = String::new();
        for _ in 0..240 {
            out = self.nodes[via].ctl_output(&[
                "list_queues",
                "--formatter",
                "json",
                "name",
                "online",
            ]);
            let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
            let complete = queues.iter().all(|queue| {
                rows.iter().any(|row| {
                    row["name"] == queue.as_str()
                        && row["online"].as_array().map(Vec::len) == Some(self.nodes.len())
                })
            });
            if complete {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("the queues' members did not all come back online: {queues:?}\n{out}");
    }

    /// Starts any node that is down (a test that failed half-way may have
    /// left one killed), then waits until every node runs and sees the
    /// other two.
    pub fn await_all_running(&self) {
        for node in &self.nodes {
            if !node.is_running() {
                node.launch();
            }
            node.await_startup();
        }
        for _ in 0..120 {
            let out = self.nodes[0].ctl_output(&["cluster_status", "--formatter", "json"]);
            let running = serde_json::from_str::<serde_json::Value>(&out)
                .ok()
                .and_then(|v| v["running_nodes"].as_array().map(Vec::len))
                .unwrap_or(0);
            if running == self.nodes.len() {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("the cluster did not come back to three running nodes");
    }
}

/// A Postgres primary and a standby streaming from it, with synchronous
/// replication on: a commit returns only once the standby has it.
pub struct PostgresPair {
    pub primary: PrivatePostgres,
    pub standby: PrivatePostgres,
    _watchdogs: Vec<std::process::Child>,
}

impl PostgresPair {
    /// A fresh pair under this process's folder, named `name`.
    pub fn start(name: &str) -> PostgresPair {
        let dir = root().join(name);
        let primary = PrivatePostgres::start(&dir.join("primary"));
        let standby = PrivatePostgres::standby_of(&primary, &dir.join("standby"), "standby");
        // Synchronous from here on: set on the primary only, after the base
        // backup, so the promoted standby does not wait for a standby of its own.
        primary.sql("ALTER SYSTEM SET synchronous_standby_names = 'standby'");
        primary.sql("SELECT pg_reload_conf()");
        let mut sync = String::new();
        for _ in 0..200 {
            sync = primary.sql("SELECT string_agg(sync_state, ',') FROM pg_stat_replication");
            if sync.trim() == "sync" {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(sync.trim(), "sync", "the standby replicates synchronously");
        let watchdogs = [&primary, &standby]
            .iter()
            .map(|pg| watch(&pg.dir, &pg.stop_command()))
            .collect();
        PostgresPair {
            primary,
            standby,
            _watchdogs: watchdogs,
        }
    }

    /// `postgres://postgres@primary,standby` (libpq's multi-host form),
    /// without a database.
    pub fn base_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}",
            self.primary.port, self.standby.port
        )
    }

    /// A database's URL on both hosts, for sendgate.
    pub fn url(&self, database: &str) -> String {
        format!(
            "{}/{database}?target_session_attrs=read-write",
            self.base_url()
        )
    }

    /// Promotes the standby and crashes the old primary (immediate stop).
    pub fn fail_over(&self) {
        self.primary.pg_ctl(&["-m", "immediate", "stop"]);
        self.standby.pg_ctl(&["promote"]);
    }
}

impl Drop for PostgresPair {
    fn drop(&mut self) {
        for pg in [&self.primary, &self.standby] {
            let _ = std::process::Command::new("sh")
                .args(["-c", &pg.stop_command()])
                .output();
        }
    }
}
