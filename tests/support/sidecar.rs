//! The `subtocall` binary as a child process, configured only through its
//! environment (a clean one: nothing leaks in from the test's own), with its
//! log captured to a file and its metrics/health listener on a free port.
//! A test can crash it (`kill`) or stop it and start it again (`restart`)
//! as the same guard. Dropping the guard kills it; a guard dropped during a
//! panic prints the tail of its log.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::process::{Child, Command};

use super::crossbar::{BACKEND_USER, Crossbar};
use super::free_port;
use super::peers::RouterMeta;

const POLL: Duration = Duration::from_millis(25);

/// A running `subtocall` process.
pub struct Sidecar {
    child: Option<Child>,
    dir: TempDir,
    log_path: PathBuf,
    http_port: u16,
    env: BTreeMap<String, String>,
}

/// The environment for a sidecar joined to `crossbar` as the `backend` user,
/// with fast reconnects, debug logs, and its HTTP listener on a free port.
pub fn sidecar_env(crossbar: &Crossbar) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("WAMP_URL".into(), crossbar.url());
    env.insert("CROSSBAR_REALM".into(), crossbar.realm().into());
    env.insert("BACKEND_USERNAME".into(), BACKEND_USER.0.into());
    env.insert("BACKEND_SECRET".into(), BACKEND_USER.1.into());
    env.insert("SUBTOCALL_LOG".into(), "info,subtocall=debug".into());
    env.insert("SUBTOCALL_RECONNECT_INITIAL_BACKOFF".into(), "100ms".into());
    env.insert("SUBTOCALL_RECONNECT_MAX_BACKOFF".into(), "500ms".into());
    if let Some(ca) = crossbar.ca_file_opt() {
        env.insert("SUBTOCALL_CA_FILE".into(), ca.display().to_string());
    }
    env
}

/// The environment for a sidecar joined to a scripted router at `url`
/// (JSON, fast reconnects, debug logs), plus `extra`.
pub fn fake_router_env(url: &str, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("WAMP_URL".into(), url.into());
    env.insert("SUBTOCALL_SERIALIZER".into(), "json".into());
    env.insert("SUBTOCALL_LOG".into(), "info,subtocall=debug".into());
    env.insert("SUBTOCALL_RECONNECT_INITIAL_BACKOFF".into(), "50ms".into());
    env.insert("SUBTOCALL_RECONNECT_MAX_BACKOFF".into(), "100ms".into());
    for (k, v) in extra {
        env.insert((*k).into(), (*v).into());
    }
    env
}

impl Sidecar {
    /// Starts the binary with exactly `env` (plus PATH and a free
    /// `SUBTOCALL_HTTP_ADDR` unless `env` sets one).
    pub fn start(env: BTreeMap<String, String>) -> Sidecar {
        let dir = tempfile::Builder::new()
            .prefix("subtocall-sidecar-")
            .tempdir()
            .expect("temp dir");
        let log_path = dir.path().join("subtocall.log");
        let http_port = free_port();
        let mut env = env;
        env.entry("SUBTOCALL_HTTP_ADDR".into())
            .or_insert_with(|| format!("127.0.0.1:{http_port}"));
        let log = File::create(&log_path).expect("log file");
        Sidecar {
            child: Some(spawn(&env, log)),
            dir,
            log_path,
            http_port,
            env,
        }
    }

    /// Starts with [`sidecar_env`] plus `extra`.
    pub fn start_for(crossbar: &Crossbar, extra: &[(&str, &str)]) -> Sidecar {
        let mut env = sidecar_env(crossbar);
        for (k, v) in extra {
            env.insert((*k).into(), (*v).into());
        }
        Sidecar::start(env)
    }

    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether the process has exited (it is a zombie until waited for).
    pub fn has_exited(&self) -> bool {
        let Some(pid) = self.pid() else { return true };
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => true,
        }
    }

    /// Lowers the process's open-file limit (soft and hard) to `n`, as a
    /// container's `ulimit -n` would.
    pub fn limit_open_files(&self, n: u64) {
        let pid = self.pid().expect("sidecar running") as libc::pid_t;
        let limit = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        // SAFETY: prlimit(2) on our own child, reading only `limit`, which
        // lives across the call; no old limit is written back.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Polls `condition` until it holds. Panics naming `what`, with the whole log, when
    /// `timeout` passes or the process exits first. Wait on behaviour (HTTP answers,
    /// metrics, what the router sees), never on log wording.
    pub async fn wait_for<F, Fut>(&self, what: &str, timeout: Duration, mut condition: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            // Exit is checked before the condition, so that a process that got there
            // and then exited is not reported as failing.
            let exited = self.has_exited();
            if condition().await {
                return;
            }
            if exited {
                panic!(
                    "subtocall exited while waiting for {what}; log:\n{}",
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; subtocall log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the `/metrics` sample (see [`Self::metric`]) satisfies `condition`.
    pub async fn wait_metric(
        &self,
        sample: &str,
        condition: impl Fn(f64) -> bool,
        timeout: Duration,
    ) {
        let condition = &condition;
        self.wait_for(&format!("a value of {sample}"), timeout, || async move {
            self.try_metric(sample).await.is_some_and(condition)
        })
        .await;
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) {
        self.wait_for("/readyz to answer 200", timeout, || self.is_ready())
            .await;
    }

    /// Waits until the router shows a subscriber on `topic` (a wildcard pattern such as
    /// `com.example..ev` is looked up as one), so events published from now on reach
    /// the sidecar. Nothing else subscribes to the tests' SUB_ topics, so the
    /// subscriber is this sidecar; a test that replaces a sidecar waits for the old
    /// one's subscription to go first.
    pub async fn wait_subscribed(&self, router: &RouterMeta, topic: &str, timeout: Duration) {
        let what = format!("the router to show a subscriber on {topic}");
        self.wait_for(&what, timeout, || async move {
            !router.subscribers(topic).await.is_empty()
        })
        .await;
    }

    /// Waits until the sidecar has received `events` events and finished every one:
    /// each delivered or dead-lettered, none in flight and none waiting for a retry.
    /// From then on it makes no delivery attempt until another event arrives, so a
    /// duplicate delivery cannot turn up after this returns.
    pub async fn wait_idle(&self, events: u64, timeout: Duration) -> Idle {
        let last = Cell::new(None);
        let last = &last;
        let what = format!("{events} events received and each delivered or dead-lettered");
        self.wait_for(&what, timeout, || async move {
            let Some(body) = self.metrics_text().await else {
                return false;
            };
            let value = |sample: &str| sample_value(&body, sample).unwrap_or(0.0);
            let received = value("subtocall_events_received_total");
            let skipped = value("subtocall_events_duplicate_total")
                + family_sum(&body, "subtocall_events_unroutable_total");
            let now = Idle {
                forwarded: value("subtocall_events_forwarded_total"),
                dead_lettered: family_sum(&body, "subtocall_events_dead_lettered_total"),
            };
            let done = received == events as f64
                && now.forwarded + now.dead_lettered == received - skipped
                && value("subtocall_calls_in_flight") == 0.0
                && value("subtocall_queue_depth") == 0.0;
            last.set(Some(now));
            done
        })
        .await;
        last.get().expect("wait_for returned, so the condition ran")
    }

    /// Dead letters the log accounts for: one line each at low rates, and
    /// above that the `events=N` of each summary line.
    pub fn dead_letters_logged(&self) -> u64 {
        self.log()
            .lines()
            .map(|line| {
                if line.contains("event dead-lettered") {
                    1
                } else if line.contains("dead letters summarised") {
                    line.split("events=")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|n| n.parse().ok())
                        .expect("a summary line has events=N")
                } else {
                    0
                }
            })
            .sum()
    }

    /// SIGKILL (a crash: no shutdown of any kind) and waits until the process is gone.
    pub async fn kill(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("sidecar running");
        child.kill().await.expect("SIGKILL subtocall");
        child.wait().await.expect("wait for a SIGKILLed subtocall")
    }

    /// Starts the binary again, with the same environment (so the same HTTP port)
    /// and its log appended to the same file, after [`Self::kill`],
    /// [`Self::terminate`] or [`Self::wait_exit`]. Its metrics start from zero.
    pub fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "restart: the previous subtocall process was not stopped and reaped"
        );
        let mut log = fs::OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .expect("open the log to append");
        writeln!(log, "--- restarted by the test ---").expect("write the log");
        self.child = Some(spawn(&self.env, log));
    }

    /// Sends SIGTERM and waits for the exit (up to `timeout`).
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(timeout).await
    }

    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
    }

    /// Waits for the process to exit; panics with the log after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("sidecar running");
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => {
                self.child = None;
                status.expect("wait")
            }
            Err(_) => panic!(
                "subtocall did not exit within {timeout:?}; log:\n{}",
                self.log()
            ),
        }
    }

    /// `GET path` on the sidecar's HTTP listener: `(status, body)`, or
    /// `None` if nothing answers.
    pub async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(SocketAddr::from(([127, 0, 0, 1], self.http_port)), path).await
    }

    /// The value of one sample in `/metrics`, e.g.
    /// `subtocall_events_dead_lettered_total{reason="overflow"}`; 0 if absent.
    /// Panics when `/metrics` does not answer: for assertions, not for waits.
    pub async fn metric(&self, sample: &str) -> f64 {
        let body = self.metrics_text().await.expect("/metrics answers 200");
        sample_value(&body, sample).unwrap_or(0.0)
    }

    /// The sum of every sample of `family`, whatever its labels.
    pub async fn metric_total(&self, family: &str) -> f64 {
        let body = self.metrics_text().await.expect("/metrics answers 200");
        family_sum(&body, family)
    }

    /// Like [`Self::metric`], but `None` while `/metrics` does not answer 200.
    pub async fn try_metric(&self, sample: &str) -> Option<f64> {
        let body = self.metrics_text().await?;
        Some(sample_value(&body, sample).unwrap_or(0.0))
    }

    /// The `/metrics` text, or `None` unless it answers 200.
    async fn metrics_text(&self) -> Option<String> {
        match self.http_get("/metrics").await? {
            (200, body) => Some(body),
            _ => None,
        }
    }

    /// Whether `/readyz` answers 200.
    pub async fn is_ready(&self) -> bool {
        matches!(self.http_get("/readyz").await, Some((200, _)))
    }

    /// Peak resident memory of the process, from /proc (kB).
    pub fn peak_rss_kb(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// Runs the binary to completion with `args` and exactly `env` (plus PATH),
/// within `limit`.
pub async fn run_subtocall(
    args: &[&str],
    env: &BTreeMap<String, String>,
    limit: Duration,
) -> std::process::Output {
    let run = Command::new(env!("CARGO_BIN_EXE_subtocall"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(limit, run)
        .await
        .unwrap_or_else(|_| panic!("subtocall {args:?} took over {limit:?}"))
        .unwrap_or_else(|e| panic!("run subtocall {args:?}: {e}"))
}

/// Spawns the binary with exactly `env` (plus PATH), its stdout and stderr into `log`.
fn spawn(env: &BTreeMap<String, String>, log: File) -> Child {
    Command::new(env!("CARGO_BIN_EXE_subtocall"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn subtocall")
}

/// What the counters say once the sidecar is idle (see [`Sidecar::wait_idle`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Idle {
    pub forwarded: f64,
    /// Every reason together.
    pub dead_lettered: f64,
}

/// The value of the sample named exactly `sample` (labels included) in a metrics text.
fn sample_value(body: &str, sample: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok()).flatten()
    })
}

/// The sum of every sample of `family` (`family` itself or `family{...}`).
fn family_sum(body: &str, family: &str) -> f64 {
    body.lines()
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            let labels = name.strip_prefix(family)?;
            (labels.is_empty() || labels.starts_with('{'))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(150).collect();
            eprintln!(
                "--- last 150 lines of the subtocall log ({}) ---",
                self.log_path.display()
            );
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
            eprintln!("--- end of subtocall log ---");
        }
    }
}

/// `GET path` at `addr` with `Connection: close`: `(status, body)`, or `None`
/// if nothing answers within 5 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()
        .flatten()
}

/// The fields of the last `subtocall stopped` line in `log` (the counts a
/// sidecar gives at exit).
pub fn stop_summary(log: &str) -> BTreeMap<String, u64> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("subtocall stopped"))
        .unwrap_or_else(|| panic!("no summary line in:\n{log}"));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

/// `sidecar`'s `/status` as JSON; panics unless it answers 200 with JSON.
pub async fn status(sidecar: &Sidecar) -> serde_json::Value {
    let (code, body) = sidecar.http_get("/status").await.expect("/status answers");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The mapping of `procedure` in a `/status`.
pub fn mapping<'a>(status: &'a serde_json::Value, procedure: &str) -> &'a serde_json::Value {
    status["mappings"]
        .as_array()
        .expect("mappings")
        .iter()
        .find(|m| m["procedure"] == procedure)
        .unwrap_or_else(|| panic!("no mapping of {procedure}: {status:#}"))
}
