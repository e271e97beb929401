//! The real `sendgate` binary as a user runs it: one-shot commands, and
//! `sendgate run` processes that tests start, stop with SIGTERM or kill -9.

use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::{TestEnv, eventually, http_get};

pub const BIN: &str = env!("CARGO_BIN_EXE_sendgate");

/// A port nobody listens on right now, and never handed out before by this
/// process: the system may offer a port again once its listener is closed,
/// and two processes of one test given the same port would leave one of
/// them failing to bind while the other answers for both.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = portpicker::pick_unused_port().expect("a free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn command(env: &TestEnv) -> Command {
    let mut command = Command::new(BIN);
    command
        .envs(env.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env_remove("RUST_LOG");
    command
}

/// `sendgate ARGS` with the test's settings, run to completion.
pub fn cli(env: &TestEnv, args: &[&str]) -> Output {
    command(env).args(args).output().expect("the binary runs")
}

/// A `sendgate run` process on a port of its own; killed when dropped.
pub struct Process {
    child: Option<Child>,
    pub port: u16,
    /// Where its log goes when not to the test's stderr.
    log: Option<std::path::PathBuf>,
}

impl Process {
    /// Starts `sendgate run`; its log goes to the test's stderr when `logs`.
    pub fn spawn(env: &TestEnv, logs: bool) -> Process {
        Process::spawn_on(env, free_port(), logs)
    }

    /// Without `logs`, the log goes to a file under `target/test-logs/`,
    /// quoted when the process exits badly.
    pub fn spawn_on(env: &TestEnv, port: u16, logs: bool) -> Process {
        let log = (!logs).then(|| {
            static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-logs");
            std::fs::create_dir_all(&dir).unwrap();
            let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            dir.join(format!("sendgate-{}-{port}-{n}.log", std::process::id()))
        });
        let stderr = match &log {
            Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
            None => Stdio::inherit(),
        };
        let child = command(env)
            .arg("run")
            .env("SENDGATE__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("sendgate run starts");
        Process {
            child: Some(child),
            port,
            log,
        }
    }

    /// Its whole log file (empty when its log goes to the test's stderr).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .map(|path| std::fs::read_to_string(path).unwrap_or_default())
            .unwrap_or_default()
    }

    /// The last lines of its log file, for a failure message.
    pub fn log_tail(&self) -> String {
        let Some(path) = &self.log else {
            return "(log on the test's stderr)".to_owned();
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "{}:\n{}",
            path.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    pub fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) {
        let addr = self.addr();
        eventually(timeout, || async move {
            matches!(http_get(addr, "/readyz").await, Ok((200, _)))
        })
        .await;
    }

    /// Sends SIGTERM: drain and exit.
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success(), "kill -TERM failed");
        }
    }

    /// Waits for the process to exit; kills it and panics after `timeout`.
    pub async fn wait_for_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("the process was started");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("sendgate did not exit within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then a clean exit within `timeout`.
    pub async fn stop(&mut self, timeout: Duration) {
        self.terminate();
        let status = self.wait_for_exit(timeout).await;
        assert!(
            status.success(),
            "sendgate exited with {status} on SIGTERM; {}",
            self.log_tail()
        );
    }

    /// kill -9: no drain, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}
