//! Private services for tests that stop, kill or restart them: a RabbitMQ
//! node and a Postgres cluster of the test binary's own, on free ports, with
//! data directories under the system's temporary folder. The machine's (or
//! the laptop's, or compose's) default services are never touched.
//!
//! They start once per test binary, on first use, and stop when it exits:
//! a small watchdog process waits for the binary to end (however it ends)
//! and then stops both and removes their folders.
//!
//! Needs the RabbitMQ and Postgres server packages (`rabbitmq-server`,
//! `postgresql`); run as root, the servers run as their own users.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::sync::OnceCell;

use super::free_port;

/// The private broker node and database cluster.
pub struct Services {
    pub rabbit: &'static PrivateRabbit,
    pub postgres: &'static PrivatePostgres,
}

static RABBIT: OnceCell<Watched<PrivateRabbit>> = OnceCell::const_new();
static POSTGRES: OnceCell<Watched<PrivatePostgres>> = OnceCell::const_new();

/// A service and the watchdog that tears it down after this process.
pub struct Watched<T> {
    pub service: T,
    pub _watchdog: std::process::Child,
}

/// The binary's private services, started on first use, and made the
/// harness's target: `amqp_url()` and `pg_base_url()` point at them from
/// then on.
pub async fn private_services() -> Services {
    let services = Services {
        rabbit: private_rabbit().await,
        postgres: private_postgres().await,
    };
    super::target(services.rabbit.url(), services.postgres.base_url());
    services
}

/// The private Postgres cluster alone (the harness's target stays as it is).
pub async fn private_postgres() -> &'static PrivatePostgres {
    let watched = POSTGRES
        .get_or_init(|| async {
            tokio::task::spawn_blocking(|| {
                let dir = root().join("postgres");
                let service = PrivatePostgres::start(&dir);
                let _watchdog = watch(&dir, &service.stop_command());
                Watched { service, _watchdog }
            })
            .await
            .expect("starting the private Postgres")
        })
        .await;
    &watched.service
}

async fn private_rabbit() -> &'static PrivateRabbit {
    let watched = RABBIT
        .get_or_init(|| async {
            tokio::task::spawn_blocking(|| {
                let dir = root().join("rabbit");
                let service = PrivateRabbit::start(&dir);
                let teardown = format!("rabbitmqctl -q -n {} stop", service.node);
                let _watchdog = watch(&dir, &teardown);
                Watched { service, _watchdog }
            })
            .await
            .expect("starting the private RabbitMQ")
        })
        .await;
    &watched.service
}

static TLS_RABBIT: OnceCell<Watched<PrivateRabbit>> = OnceCell::const_new();

/// A private RabbitMQ node that speaks only TLS, with the certificate and key
/// given (readable by the `rabbitmq` user); its `port` is the TLS port.
pub async fn private_tls_rabbit(ca: &Path, cert: &Path, key: &Path) -> &'static PrivateRabbit {
    let (ca, cert, key) = (ca.to_owned(), cert.to_owned(), key.to_owned());
    let watched = TLS_RABBIT
        .get_or_init(|| async move {
            tokio::task::spawn_blocking(move || {
                let dir = root().join("rabbit-tls");
                let service = PrivateRabbit::start_with(&dir, "tls", |port| {
                    format!(
                        "listeners.tcp = none\nlisteners.ssl.default = 127.0.0.1:{port}\n\
                         ssl_options.cacertfile = {}\nssl_options.certfile = {}\n\
                         ssl_options.keyfile = {}\nssl_options.verify = verify_none\n\
                         ssl_options.fail_if_no_peer_cert = false\n",
                        ca.display(),
                        cert.display(),
                        key.display()
                    )
                });
                let teardown = format!("rabbitmqctl -q -n {} stop", service.node);
                let _watchdog = watch(&dir, &teardown);
                Watched { service, _watchdog }
            })
            .await
            .expect("starting the private TLS RabbitMQ")
        })
        .await;
    &watched.service
}

static DEFINED_RABBIT: OnceCell<Watched<PrivateRabbit>> = OnceCell::const_new();

/// A private RabbitMQ node that loads `definitions` (users, vhosts and
/// permissions) at boot.
pub async fn private_rabbit_with_definitions(definitions: &Path) -> &'static PrivateRabbit {
    let definitions = definitions.to_owned();
    let watched = DEFINED_RABBIT
        .get_or_init(|| async move {
            tokio::task::spawn_blocking(move || {
                let dir = root().join("rabbit-defined");
                let service = PrivateRabbit::start_with(&dir, "defined", |port| {
                    // A copy the node's user can read, whatever the checkout's modes.
                    let copy = dir.join("definitions.json");
                    std::fs::copy(&definitions, &copy).unwrap();
                    format!(
                        "listeners.tcp.local = 127.0.0.1:{port}\nload_definitions = {}\n",
                        copy.display()
                    )
                });
                let teardown = format!("rabbitmqctl -q -n {} stop", service.node);
                let _watchdog = watch(&dir, &teardown);
                Watched { service, _watchdog }
            })
            .await
            .expect("starting the private RabbitMQ with definitions")
        })
        .await;
    &watched.service
}

/// A folder of this process's own under the temporary folder, removed when
/// the process exits, however it exits.
pub fn scratch_dir(name: &str) -> PathBuf {
    static WATCHDOGS: std::sync::Mutex<Vec<std::process::Child>> =
        std::sync::Mutex::new(Vec::new());
    let dir = root().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let watchdog = watch(&dir, "true");
    WATCHDOGS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(watchdog);
    dir
}

/// This process's folder for its services.
pub fn root() -> PathBuf {
    std::env::temp_dir().join(format!("sendgate-test-{}", std::process::id()))
}

/// Runs `teardown` and removes `dir` once this process has exited, however
/// it exits.
pub fn watch(dir: &Path, teardown: &str) -> std::process::Child {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {teardown} >/dev/null 2>&1; rm -rf {dir}; \
         rmdir {root} 2>/dev/null || true",
        pid = std::process::id(),
        dir = dir.display(),
        root = root().display(),
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the watchdog starts")
}

fn root_user() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0\n"))
}

/// The words that run a command as `user` (nothing when not root).
fn as_user(user: &str) -> Vec<String> {
    if root_user() {
        vec!["runuser".into(), "-u".into(), user.into(), "--".into()]
    } else {
        Vec::new()
    }
}

/// Runs a command, as `user` when root, and says whether it succeeded.
fn run(user: Option<&str>, program: &str, args: &[&str]) -> bool {
    let mut words = user.map(as_user).unwrap_or_default();
    words.push(program.to_owned());
    words.extend(args.iter().map(|a| (*a).to_owned()));
    let out = Command::new(&words[0])
        .args(&words[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("{program} runs: {err}"));
    if !out.status.success() {
        eprintln!(
            "{words:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

fn chown(user: &str, path: &Path) {
    if root_user() {
        assert!(run(
            None,
            "chown",
            &["-R", &format!("{user}:{user}"), &path.display().to_string()]
        ));
    }
}

/// A RabbitMQ node of the test binary's own.
pub struct PrivateRabbit {
    pub node: String,
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
}

impl PrivateRabbit {
    fn start(dir: &Path) -> PrivateRabbit {
        PrivateRabbit::start_with(dir, "node", |port| {
            format!("listeners.tcp.local = 127.0.0.1:{port}\n")
        })
    }

    /// A node named `name` whose `rabbitmq.conf` is `conf(port)`.
    fn start_with(dir: &Path, name: &str, conf: impl Fn(u16) -> String) -> PrivateRabbit {
        let rabbit = PrivateRabbit::prepare(dir, name, conf);
        rabbit.launch();
        rabbit
    }

    /// A node's folders and files, not started yet.
    pub fn prepare(dir: &Path, name: &str, conf: impl Fn(u16) -> String) -> PrivateRabbit {
        let (port, dist_port) = (free_port(), free_port());
        let node = format!("sendgate-test-{name}-{}@localhost", std::process::id());
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("mnesia")).unwrap();
        std::fs::create_dir_all(dir.join("log")).unwrap();
        // The consistent-hash exchange the job partitions need; no listener.
        std::fs::write(
            dir.join("enabled_plugins"),
            "[rabbitmq_consistent_hash_exchange].\n",
        )
        .unwrap();
        std::fs::write(dir.join("rabbitmq.conf"), conf(port)).unwrap();
        std::fs::write(
            dir.join("rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS=127.0.0.1\nexport ERL_FLAGS=\"-kernel inet_dist_use_interface {127,0,0,1}\"\n",
        )
        .unwrap();
        chown("rabbitmq", dir);
        PrivateRabbit {
            node,
            port,
            dist_port,
            dir: dir.to_owned(),
        }
    }

    /// Starts the node (again, after [`PrivateRabbit::kill9`]) and waits
    /// for it.
    pub fn launch(&self) {
        let dir = |name: &str| self.dir.join(name).display().to_string();
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .current_dir(std::env::temp_dir())
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONF_ENV_FILE", dir("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", dir("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir("log"))
            .env("RABBITMQ_PID_FILE", dir("node.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("rabbitmq-server runs");
        assert!(status.success(), "the private RabbitMQ node starts");
        self.await_startup();
    }

    /// Waits until the node (and its app) runs; it registers with epmd a
    /// moment after it is launched.
    pub fn await_startup(&self) {
        for _ in 0..60 {
            if self.ctl_quiet(&["await_startup", "--timeout", "60"]) {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        panic!("the private RabbitMQ node {} did not start", self.node);
    }

    /// True when the node answers.
    pub fn is_running(&self) -> bool {
        self.ctl_quiet(&["status"])
    }

    /// Kills the node's Erlang VM with SIGKILL: a hard crash.
    pub fn kill9(&self) {
        let pid = std::fs::read_to_string(self.dir.join("node.pid")).expect("the node's pid file");
        assert!(
            run(None, "kill", &["-9", pid.trim()]),
            "kill -9 {}",
            self.node
        );
        // Gone once the node no longer answers.
        while self.is_running() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the node's RabbitMQ app (the Erlang node stays up).
    pub fn stop_app(&self) {
        self.node_ctl(&["--node", &self.node, "stop_app"]);
    }

    /// Starts the node's RabbitMQ app again and waits for it.
    pub fn start_app(&self) {
        self.node_ctl(&["--node", &self.node, "start_app"]);
        self.await_startup();
    }

    /// Closes every client connection to the node.
    pub fn close_all_connections(&self) {
        self.node_ctl(&["--node", &self.node, "close_all_connections", "fault"]);
    }

    /// `rabbitmqctl ARGS`, where ARGS name this node (`--node`), never the
    /// default one; panics when it fails.
    fn node_ctl(&self, args: &[&str]) {
        let ok = Command::new("rabbitmqctl").arg("-q").args(args).status();
        assert!(ok.is_ok_and(|s| s.success()), "rabbitmqctl {args:?}");
    }

    /// `rabbitmqctl -n NODE ARGS`; panics when it fails.
    pub fn ctl(&self, args: &[&str]) {
        assert!(
            self.ctl_quiet(args),
            "rabbitmqctl {args:?} on {}",
            self.node
        );
    }

    fn ctl_quiet(&self, args: &[&str]) -> bool {
        Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.node])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `rabbitmqctl -n NODE ARGS`, its output.
    pub fn ctl_output(&self, args: &[&str]) -> String {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.node])
            .args(args)
            .output()
            .expect("rabbitmqctl runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

/// A Postgres cluster of the test binary's own.
pub struct PrivatePostgres {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    pub dir: PathBuf,
}

impl PrivatePostgres {
    pub fn start(dir: &Path) -> PrivatePostgres {
        let bin = postgres_bin();
        let port = free_port();
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        chown("postgres", dir);
        let postgres = PrivatePostgres {
            port,
            data: dir.join("data"),
            bin,
            dir: dir.to_owned(),
        };
        let data = postgres.data.display().to_string();
        let initdb = postgres.bin.join("initdb").display().to_string();
        assert!(
            run(
                Some("postgres"),
                &initdb,
                &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"]
            ),
            "initdb of the private cluster"
        );
        postgres.pg_ctl(&["start"]);
        postgres
    }

    /// `pg_ctl -D DATA -w ARGS`, with this cluster's port and socket folder.
    pub fn pg_ctl(&self, args: &[&str]) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let data = self.data.display().to_string();
        let log = self.dir.join("server.log").display().to_string();
        let mut words = vec!["-D", &data, "-w", "-l", &log, "-o", &options];
        words.extend(args);
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        assert!(run(Some("postgres"), &pg_ctl, &words), "pg_ctl {args:?}");
    }

    /// A standby of `primary` in `dir`, streaming from it as `name`
    /// (its `application_name`), started.
    pub fn standby_of(primary: &PrivatePostgres, dir: &Path, name: &str) -> PrivatePostgres {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        chown("postgres", dir);
        let standby = PrivatePostgres {
            port: free_port(),
            data: dir.join("data"),
            bin: primary.bin.clone(),
            dir: dir.to_owned(),
        };
        let data = standby.data.display().to_string();
        let basebackup = standby.bin.join("pg_basebackup").display().to_string();
        let conninfo = format!(
            "host=127.0.0.1 port={} user=postgres application_name={name}",
            primary.port
        );
        assert!(
            run(
                Some("postgres"),
                &basebackup,
                &[
                    "-d",
                    &conninfo,
                    "-D",
                    &data,
                    "-X",
                    "stream",
                    "-R",
                    "--no-sync"
                ]
            ),
            "pg_basebackup of the standby"
        );
        standby.pg_ctl(&["start"]);
        standby
    }

    /// Runs one statement with psql as `postgres`; its output, unaligned.
    pub fn sql(&self, statement: &str) -> String {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-XAtq", "-c", statement])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {statement}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A shell command that stops the cluster at once, if it runs.
    pub fn stop_command(&self) -> String {
        format!(
            "{} {}/pg_ctl -D {} -m immediate stop",
            as_user("postgres").join(" "),
            self.bin.display(),
            self.data.display()
        )
    }

    /// Restarts the cluster (a fast shutdown: every session ends).
    pub fn restart(&self) {
        self.pg_ctl(&["-m", "fast", "restart"]);
    }

    pub fn is_ready(&self) -> bool {
        let pg_isready = self.bin.join("pg_isready").display().to_string();
        run(
            None,
            &pg_isready,
            &["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"],
        )
    }

    /// `postgres://postgres@127.0.0.1:PORT`, without a database.
    pub fn base_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }
}

/// The server binaries of the newest installed Postgres.
fn postgres_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<u32> = std::fs::read_dir(root)
        .expect("the Postgres server package is installed")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    let newest = versions.last().expect("a Postgres version");
    root.join(newest.to_string()).join("bin")
}
