//! A private `redis-server` for integration tests, on a free port of 127.0.0.1.
//!
//! Never the shared server on 6379: each fixture runs its own process with no persistence
//! (`--save "" --appendonly no`) in its own temp dir, and is killed on drop.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::resp::{self, Reply};
use super::{free_port, stop_server, tail, terminate, terminate_blocking};

/// How long redis-server gets to answer PING after spawn.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long redis-server gets to exit after SIGTERM before it is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Fresh ports tried when the chosen one turns out to be taken.
const PORT_ATTEMPTS: usize = 3;
/// `redis-server` binary; `SUBTOCALL_REDIS_SERVER` overrides it.
const DEFAULT_REDIS_SERVER: &str = "redis-server";

/// A running redis-server. Stops it on drop.
pub struct Redis {
    dir: TempDir,
    port: u16,
    /// Append-only file with fsync on every write, so data survives a restart.
    persistent: bool,
    child: Option<Child>,
    log_path: PathBuf,
}

impl Redis {
    /// Starts redis-server on a free port and waits until it answers PING (10 s cap).
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    /// Like [`Redis::start`], but with an append-only file fsynced on every
    /// write: what was pushed before [`Redis::stop`] is there after
    /// [`Redis::start_again`].
    pub async fn start_persistent() -> Self {
        Self::start_with(true).await
    }

    async fn start_with(persistent: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("subtocall-redis-")
            .tempdir()
            .expect("create a temp dir for redis");
        let log_path = dir.path().join("redis.log");
        let mut redis = Self {
            dir,
            port: 0,
            persistent,
            child: None,
            log_path,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            redis.port = free_port();
            match redis.spawn_and_wait().await {
                Ok(()) => return redis,
                Err(failure) if attempt < PORT_ATTEMPTS && redis.log().contains("in use") => {
                    eprintln!("redis: port {} was taken ({failure}); retrying", redis.port);
                }
                Err(failure) => redis.fail(&failure),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Stops the server (SIGTERM, 5 s, SIGKILL) and waits until the port refuses
    /// connections. Does nothing when already stopped.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        stop_server(&mut child, self.port, STOP_GRACE, "redis-server").await;
    }

    /// Starts the server again on the same port (stopping it first if it runs). Data is
    /// kept only when started with [`Redis::start_persistent`].
    pub async fn start_again(&mut self) {
        self.stop().await;
        if let Err(failure) = self.spawn_and_wait().await {
            self.fail(&failure);
        }
    }

    /// Sends one command and returns the reply; panics on IO errors.
    pub async fn command(&self, args: &[&str]) -> Reply {
        resp::command(self.port, args)
            .await
            .unwrap_or_else(|e| panic!("redis command {args:?} on port {}: {e}", self.port))
    }

    /// True when the server answers PING with PONG.
    pub async fn ping(&self) -> bool {
        matches!(resp::command(self.port, &["PING"]).await, Ok(Reply::Simple(s)) if s == "PONG")
    }

    /// `LLEN key`.
    pub async fn llen(&self, key: &str) -> i64 {
        self.command(&["LLEN", key]).await.integer()
    }

    /// The whole list at `key` (`LRANGE key 0 -1`) as text.
    pub async fn lrange(&self, key: &str) -> Vec<String> {
        self.command(&["LRANGE", key, "0", "-1"]).await.texts()
    }

    /// The whole list at `key`, each element parsed as JSON.
    pub async fn lrange_json(&self, key: &str) -> Vec<Value> {
        self.lrange(key)
            .await
            .iter()
            .map(|text| {
                serde_json::from_str(text)
                    .unwrap_or_else(|e| panic!("list {key} holds non-JSON {text:?}: {e}"))
            })
            .collect()
    }

    /// `DEL key`; returns how many keys were removed.
    pub async fn del(&self, key: &str) -> i64 {
        self.command(&["DEL", key]).await.integer()
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let binary = std::env::var("SUBTOCALL_REDIS_SERVER")
            .unwrap_or_else(|_| DEFAULT_REDIS_SERVER.to_owned());
        let child = Command::new(&binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", if self.persistent { "yes" } else { "no" }])
            .args(["--appendfsync", "always"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&self.log_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < READY_TIMEOUT {
            let child = self.child.as_mut().expect("child was just spawned");
            if let Some(status) = child.try_wait().expect("try_wait on redis-server") {
                self.child = None;
                return Err(format!(
                    "redis-server exited before it was ready ({status})"
                ));
            }
            if self.ping().await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, STOP_GRACE).await;
        }
        Err(format!("no PONG within {READY_TIMEOUT:?}"))
    }

    fn fail(&self, failure: &str) -> ! {
        panic!(
            "redis-server did not start on port {}: {failure}\n--- redis log ---\n{}\n--- end ---",
            self.port,
            self.log()
        );
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate_blocking(&mut child, STOP_GRACE);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- last 50 lines of the redis log ---\n{}\n--- end of redis log ---",
                tail(&self.log(), 50)
            );
        }
    }
}
