//! Rust handles for the autobahn-python test peers in `tests/peers/` (backend, publisher,
//! subscriber, caller): third-party WAMP clients to check our code against.
//!
//! Each peer is a child process of the test (`kill_on_drop`) that prints one JSON object
//! per line. A background task collects the lines into a `watch` channel, so tests wait for
//! a line with a timeout instead of sleeping. Bytes appear in the lines with WAMP's JSON
//! convention, `"\u0000" + base64`; [`wamp_bytes`] builds such a value for assertions.

use std::ffi::OsString;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::crossbar::{BACKEND_USER, Crossbar};
use super::{python, repo_root, send_signal, tail};

/// How long a peer gets to connect, join and print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a peer gets to exit after SIGTERM or `quit` before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// `"\u0000" + base64(bytes)`: how the peers print bytes (WAMP's JSON convention).
pub fn wamp_bytes(bytes: &[u8]) -> Value {
    Value::String(format!(
        "\u{0}{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// The bytes the publisher appends to event `i` with `with_bytes`.
pub fn publisher_blob(i: u32) -> Vec<u8> {
    let mut blob = vec![0x00, 0x01, 0x02, 0xff];
    blob.extend_from_slice(&i.to_be_bytes());
    blob
}

/// `Some((authid, secret))` for one of the users in [`super::crossbar`].
pub fn user((authid, secret): (&str, &str)) -> Option<(String, String)> {
    Some((authid.to_owned(), secret.to_owned()))
}

/// The WAMP serializer a peer negotiates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Serializer {
    #[default]
    Json,
    Msgpack,
    Cbor,
}

impl Serializer {
    pub fn as_str(self) -> &'static str {
        match self {
            Serializer::Json => "json",
            Serializer::Msgpack => "msgpack",
            Serializer::Cbor => "cbor",
        }
    }
}

/// A registration's invocation policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Invoke {
    #[default]
    Single,
    RoundRobin,
    Random,
    First,
    Last,
}

impl Invoke {
    pub fn as_str(self) -> &'static str {
        match self {
            Invoke::Single => "single",
            Invoke::RoundRobin => "roundrobin",
            Invoke::Random => "random",
            Invoke::First => "first",
            Invoke::Last => "last",
        }
    }
}

/// A registration's or subscription's URI matching policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Match {
    #[default]
    Exact,
    Prefix,
    Wildcard,
}

impl Match {
    pub fn as_str(self) -> &'static str {
        match self {
            Match::Exact => "exact",
            Match::Prefix => "prefix",
            Match::Wildcard => "wildcard",
        }
    }
}

/// Where and how a peer connects.
#[derive(Clone, Debug)]
pub struct Connection {
    pub url: String,
    pub realm: String,
    pub serializer: Serializer,
    /// WAMP-CRA `(authid, secret)`; anonymous when `None`.
    pub auth: Option<(String, String)>,
    /// Certificate to trust for `wss://` URLs.
    pub ca_file: Option<PathBuf>,
    /// The peer's own watchdog: it exits (code 4) after this long whatever it is doing.
    pub max_seconds: u64,
}

impl Connection {
    /// Anonymous, JSON, to the given router (trusting its certificate when it has TLS).
    pub fn to(crossbar: &Crossbar) -> Self {
        Self {
            url: crossbar.url(),
            realm: crossbar.realm().to_owned(),
            serializer: Serializer::Json,
            auth: None,
            ca_file: crossbar.ca_file_opt().map(Path::to_path_buf),
            max_seconds: 120,
        }
    }

    fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--url".into(),
            self.url.clone().into(),
            "--realm".into(),
            self.realm.clone().into(),
            "--serializer".into(),
            self.serializer.as_str().into(),
            "--max-seconds".into(),
            self.max_seconds.to_string().into(),
        ];
        if let Some((authid, secret)) = &self.auth {
            args.extend([
                "--authid".into(),
                authid.into(),
                "--secret".into(),
                secret.into(),
            ]);
        }
        if let Some(ca_file) = &self.ca_file {
            args.extend(["--ca-file".into(), ca_file.clone().into_os_string()]);
        }
        args
    }
}

/// What a finished peer left behind.
#[derive(Debug)]
pub struct PeerOutput {
    pub status: ExitStatus,
    /// Every stdout line, parsed (a non-JSON line becomes `{"unparsed": line}`).
    pub lines: Vec<Value>,
    pub stderr: String,
}

impl PeerOutput {
    /// Panics with the peer's stderr unless it exited with code 0.
    pub fn assert_success(&self) -> &Self {
        assert!(
            self.status.success(),
            "peer failed ({}); lines: {:?}\n--- peer stderr ---\n{}",
            self.status,
            self.lines,
            self.stderr
        );
        self
    }

    /// The lines that have `key`.
    pub fn lines_with(&self, key: &str) -> Vec<&Value> {
        self.lines
            .iter()
            .filter(|line| line.get(key).is_some())
            .collect()
    }

    /// The final `{"done": true, ...}` line, if the peer got that far.
    pub fn done(&self) -> Option<&Value> {
        self.lines.iter().find(|line| line["done"] == json!(true))
    }
}

/// Collected stdout of a peer; `closed` once stdout reached EOF (the peer exited).
#[derive(Clone, Debug, Default)]
struct Lines {
    lines: Vec<Value>,
    closed: bool,
}

/// One running peer process and everything it printed so far.
pub struct PeerProcess {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: watch::Receiver<Lines>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl PeerProcess {
    /// Spawns `tests/peers/<script>` with the venv's python. `stdin` is piped only when
    /// the peer takes commands.
    fn spawn(script: &str, label: String, args: Vec<OsString>, with_stdin: bool) -> Self {
        let script_path = repo_root().join("tests/peers").join(script);
        Self::spawn_path(script_path, label, args, with_stdin)
    }

    /// [`Self::spawn`] for a script anywhere in the repository.
    fn spawn_path(
        script_path: PathBuf,
        label: String,
        args: Vec<OsString>,
        with_stdin: bool,
    ) -> Self {
        let mut child = Command::new(python())
            .arg("-u")
            .arg(&script_path)
            .args(&args)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(if with_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", script_path.display()));
        let label = format!(
            "{label} (pid {})",
            child.id().map_or("?".to_owned(), |pid| pid.to_string())
        );
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr_pipe = child.stderr.take().expect("stderr is piped");
        let (lines_tx, lines) = watch::channel(Lines::default());
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            tokio::spawn(read_lines(stdout, lines_tx)),
            tokio::spawn(read_stderr(stderr_pipe, Arc::clone(&stderr))),
        ];
        Self {
            label,
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
            readers,
        }
    }

    /// `"<kind> <name> (pid N)"`, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Every stdout line so far.
    pub fn lines(&self) -> Vec<Value> {
        self.lines.borrow().lines.clone()
    }

    /// The lines so far that satisfy `predicate`.
    pub fn lines_matching(&self, predicate: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.lines
            .borrow()
            .lines
            .iter()
            .filter(|line| predicate(line))
            .cloned()
            .collect()
    }

    /// What the peer wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr buffer lock").clone()
    }

    /// Waits until some line satisfies `predicate` and returns the first such line.
    /// Panics (with the peer's output) on timeout or when the peer exits first.
    pub async fn wait_for_line(
        &self,
        predicate: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Value {
        self.wait_for_lines(predicate, 1, timeout)
            .await
            .into_iter()
            .next()
            .expect("wait_for_lines returned one line")
    }

    /// Waits until `n` lines satisfy `predicate` and returns all matching lines (n or more).
    /// Panics (with the peer's output) on timeout or when the peer exits first.
    pub async fn wait_for_lines(
        &self,
        predicate: impl Fn(&Value) -> bool,
        n: usize,
        timeout: Duration,
    ) -> Vec<Value> {
        match self.try_wait_for_lines(&predicate, n, timeout).await {
            Ok(lines) => lines,
            Err(why) => panic!(
                "{}: {why}; lines so far: {:?}\n--- peer stderr ---\n{}",
                self.label,
                self.lines(),
                tail(&self.stderr(), 60)
            ),
        }
    }

    /// Like [`Self::wait_for_lines`], but returns `Err(reason)` instead of panicking.
    pub async fn try_wait_for_lines(
        &self,
        predicate: &impl Fn(&Value) -> bool,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Value>, String> {
        let count = |lines: &Lines| lines.lines.iter().filter(|line| predicate(line)).count();
        let mut receiver = self.lines.clone();
        let waited =
            tokio::time::timeout(timeout, receiver.wait_for(|l| l.closed || count(l) >= n)).await;
        let matching = self.lines_matching(predicate);
        if matching.len() >= n {
            return Ok(matching);
        }
        Err(match waited {
            Err(_) => format!(
                "timed out after {timeout:?} with {} of {n} matching lines",
                matching.len()
            ),
            Ok(_) => format!(
                "the peer exited with {} of {n} matching lines",
                matching.len()
            ),
        })
    }

    /// Writes one command line to the peer's stdin.
    pub async fn send(&mut self, command: &str) {
        let stdin = self
            .stdin
            .as_mut()
            .unwrap_or_else(|| panic!("{} has no stdin pipe", self.label));
        stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .and(stdin.flush().await)
            .unwrap_or_else(|e| panic!("write {command:?} to {}: {e}", self.label));
    }

    /// SIGKILL (simulates a crash) and reaps the process.
    pub async fn kill(&mut self) -> ExitStatus {
        self.child
            .kill()
            .await
            .unwrap_or_else(|e| panic!("kill {}: {e}", self.label));
        self.child.wait().await.expect("wait after kill")
    }

    /// SIGTERM (the peer leaves its session cleanly and exits 0); SIGKILL after 5 s.
    pub async fn terminate(&mut self) -> ExitStatus {
        if let Some(pid) = self.child.id() {
            send_signal(pid, libc::SIGTERM);
        }
        match tokio::time::timeout(EXIT_GRACE, self.child.wait()).await {
            Ok(status) => status.expect("wait for the peer"),
            Err(_) => self.kill().await,
        }
    }

    /// The exit status if the peer has exited, without waiting.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait on a peer")
    }

    /// Waits for the peer to exit; panics (with its stderr) after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait for the peer"),
            Err(_) => {
                self.kill().await;
                panic!(
                    "{} did not exit within {timeout:?}; lines: {:?}\n--- peer stderr ---\n{}",
                    self.label,
                    self.lines(),
                    tail(&self.stderr(), 60)
                );
            }
        }
    }

    /// Waits for exit (`timeout`), then for the output readers, and returns everything.
    pub async fn finish(mut self, timeout: Duration) -> PeerOutput {
        let status = self.wait_exit(timeout).await;
        for reader in std::mem::take(&mut self.readers) {
            // The pipes close when the process exits; 5 s covers a slow reader task.
            let _ = tokio::time::timeout(EXIT_GRACE, reader).await;
        }
        PeerOutput {
            status,
            lines: self.lines(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        // kill_on_drop(true) ends the process; here we only report.
        if std::thread::panicking() {
            eprintln!(
                "--- {}: stdout lines {:?}\n--- last 40 lines of its stderr ---\n{}\n---",
                self.label,
                self.lines(),
                tail(&self.stderr(), 40)
            );
        }
        for reader in &self.readers {
            reader.abort();
        }
    }
}

async fn read_lines(stdout: impl AsyncRead + Unpin, lines: watch::Sender<Lines>) {
    let mut reader = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = reader.next_line().await {
        let value = serde_json::from_str(&line).unwrap_or_else(|_| json!({"unparsed": line}));
        lines.send_modify(|all| all.lines.push(value));
    }
    lines.send_modify(|all| all.closed = true);
}

async fn read_stderr(mut stderr: impl AsyncRead + Unpin, buffer: Arc<Mutex<String>>) {
    let mut chunk = [0u8; 8192];
    while let Ok(read) = stderr.read(&mut chunk).await {
        if read == 0 {
            break;
        }
        buffer
            .lock()
            .expect("stderr buffer lock")
            .push_str(&String::from_utf8_lossy(&chunk[..read]));
    }
}

// ---------------------------------------------------------------------------------------
// backend.py

/// How to start a [`Backend`]. `BackendOptions::new(&crossbar, &["com.example.echo"])`
/// connects as the WAMP-CRA user `backend` (anonymous `public` may not register); change
/// the other fields with struct update syntax.
#[derive(Clone, Debug)]
pub struct BackendOptions {
    pub connection: Connection,
    /// Printed in every invocation line and returned as the first result.
    pub name: String,
    pub procedures: Vec<String>,
    pub invoke: Invoke,
    pub match_: Match,
    /// Sleep this long before answering (calls still run concurrently).
    pub delay_ms: u64,
    /// On the K-th invocation (from 1), print it and exit with code 3 without answering.
    pub die_on_call: Option<u32>,
    /// Answer the K-th invocation with the error `com.example.error.rejected`.
    pub error_on_call: Option<u32>,
    /// Handle at most this many invocations at once; the others wait their turn (and
    /// their invocation lines are printed when their turn comes).
    pub concurrency: Option<u32>,
    /// A further random delay of 0..N ms on each call.
    pub jitter_ms: u64,
    /// Print `{"answered": K, "name", "at"}` just before answering call K.
    pub report_answers: bool,
    /// Never answer an invocation whose kwargs hold this name with a true
    /// value (until the router cancels it).
    pub hang_on_kwarg: Option<String>,
}

impl BackendOptions {
    pub fn new(crossbar: &Crossbar, procedures: &[&str]) -> Self {
        Self {
            connection: Connection {
                auth: user(BACKEND_USER),
                ..Connection::to(crossbar)
            },
            name: "backend".to_owned(),
            procedures: procedures.iter().map(|p| (*p).to_owned()).collect(),
            invoke: Invoke::Single,
            match_: Match::Exact,
            delay_ms: 0,
            die_on_call: None,
            error_on_call: None,
            concurrency: None,
            jitter_ms: 0,
            report_answers: false,
            hang_on_kwarg: None,
        }
    }

    /// One of several callees sharing `procedure` in turn (roundrobin).
    pub fn shared(crossbar: &Crossbar, name: &str, procedure: &str) -> Self {
        Self {
            name: name.into(),
            invoke: Invoke::RoundRobin,
            ..Self::new(crossbar, &[procedure])
        }
    }

    fn args(&self) -> Vec<OsString> {
        let mut args = self.connection.args();
        args.extend(["--name".into(), self.name.clone().into()]);
        for procedure in &self.procedures {
            args.extend(["--procedure".into(), procedure.into()]);
        }
        args.extend([
            "--invoke".into(),
            self.invoke.as_str().into(),
            "--match".into(),
            self.match_.as_str().into(),
            "--delay-ms".into(),
            self.delay_ms.to_string().into(),
        ]);
        if let Some(k) = self.die_on_call {
            args.extend(["--die-on-call".into(), k.to_string().into()]);
        }
        if let Some(k) = self.error_on_call {
            args.extend(["--error-on-call".into(), k.to_string().into()]);
        }
        if let Some(n) = self.concurrency {
            args.extend(["--concurrency".into(), n.to_string().into()]);
        }
        if self.jitter_ms > 0 {
            args.extend(["--jitter-ms".into(), self.jitter_ms.to_string().into()]);
        }
        if self.report_answers {
            args.push("--report-answers".into());
        }
        if let Some(name) = &self.hang_on_kwarg {
            args.extend(["--hang-on-kwarg".into(), name.into()]);
        }
        args
    }
}

/// An autobahn callee (`tests/peers/backend.py`) whose registrations are all in place.
///
/// Each invocation line: `{"name", "call": K, "procedure", "args", "kwargs", "caller",
/// "caller_authid", "caller_authrole", "registration", "at"}` (+ `"errored": true`).
/// Derefs to [`PeerProcess`] for `lines`, `send`, `kill`, `terminate`, ...
pub struct Backend {
    process: PeerProcess,
    ready: Value,
}

impl Backend {
    /// Spawns the backend and waits (30 s) until all procedures are registered.
    /// Panics with the peer's output if it fails.
    pub async fn spawn(options: BackendOptions) -> Self {
        match Self::try_spawn(options).await {
            Ok(backend) => backend,
            Err(output) => panic!(
                "backend did not get ready ({}); lines: {:?}\n--- backend stderr ---\n{}",
                output.status, output.lines, output.stderr
            ),
        }
    }

    /// Like [`Self::spawn`], but a backend that exits before it is ready (join refused,
    /// registration refused) is returned as `Err(output)`. Still panics on timeout.
    pub async fn try_spawn(options: BackendOptions) -> Result<Self, PeerOutput> {
        let label = format!("backend {}", options.name);
        let process = PeerProcess::spawn("backend.py", label, options.args(), true);
        let is_ready = |line: &Value| line["ready"] == json!(true);
        match process
            .try_wait_for_lines(&is_ready, 1, READY_TIMEOUT)
            .await
        {
            Ok(lines) => Ok(Self {
                ready: lines[0].clone(),
                process,
            }),
            Err(_) if process.lines.borrow().closed => Err(process.finish(EXIT_GRACE).await),
            Err(why) => panic!(
                "{}: {why}\n--- stderr ---\n{}",
                process.label,
                process.stderr()
            ),
        }
    }

    /// The WAMP session id the backend joined with.
    pub fn session_id(&self) -> u64 {
        self.ready["session"]
            .as_u64()
            .expect("ready line has a session id")
    }

    /// The registration id of `procedure` from the latest ready line.
    pub fn registration_id(&self, procedure: &str) -> u64 {
        self.process
            .lines_matching(|line| line["ready"] == json!(true))
            .last()
            .and_then(|ready| ready["registrations"][procedure].as_u64())
            .unwrap_or_else(|| panic!("{} did not register {procedure}", self.process.label))
    }

    /// Invocation lines collected so far. Lines are read by a background task, so a line
    /// the peer just printed may not be here yet: use [`Self::wait_for_invocations`].
    pub fn invocations(&self) -> Vec<Value> {
        self.process.lines_matching(is_invocation)
    }

    /// With `report_answers`: `{"answered": K, "name", "at"}` per call answered.
    /// With `report_answers`: when each call (by its number) was answered.
    pub fn answered_at(&self) -> std::collections::BTreeMap<u64, f64> {
        self.answers()
            .iter()
            .map(|a| (a["answered"].as_u64().unwrap(), a["at"].as_f64().unwrap()))
            .collect()
    }

    pub fn answers(&self) -> Vec<Value> {
        self.process
            .lines_matching(|line| line.get("answered").is_some())
    }

    /// Waits until at least `n` invocations arrived and returns them all.
    pub async fn wait_for_invocations(&self, n: usize, timeout: Duration) -> Vec<Value> {
        self.process.wait_for_lines(is_invocation, n, timeout).await
    }

    /// Unregisters every procedure and waits for the confirmation.
    pub async fn unregister(&mut self) {
        let before = self.count(|line| line["unregistered"] == json!(true));
        self.process.send("unregister").await;
        self.process
            .wait_for_lines(
                |line| line["unregistered"] == json!(true),
                before + 1,
                READY_TIMEOUT,
            )
            .await;
    }

    /// Registers every procedure again and waits until they are registered.
    pub async fn register(&mut self) {
        let before = self.count(|line| line["ready"] == json!(true));
        self.process.send("register").await;
        self.process
            .wait_for_lines(
                |line| line["ready"] == json!(true),
                before + 1,
                READY_TIMEOUT,
            )
            .await;
    }

    /// Leaves the session cleanly (`quit` on stdin) and waits for exit.
    pub async fn quit(&mut self) -> ExitStatus {
        self.process.send("quit").await;
        self.process.wait_exit(EXIT_GRACE).await
    }

    /// A graceful rolling-restart exit: unregisters, finishes the calls in
    /// flight, then leaves.
    pub async fn drain(&mut self) -> ExitStatus {
        self.process.send("drain").await;
        self.process.wait_exit(EXIT_GRACE).await
    }

    /// From now on answers every invocation with the error `com.example.error.rejected`
    /// (`rejecting`) or normally again; returns once the backend confirmed the switch.
    pub async fn reject_calls(&mut self, rejecting: bool) {
        let confirmed = move |line: &Value| line["rejecting"] == json!(rejecting);
        let before = self.count(confirmed);
        self.process
            .send(if rejecting { "reject" } else { "accept" })
            .await;
        self.process
            .wait_for_lines(confirmed, before + 1, READY_TIMEOUT)
            .await;
    }

    /// A barrier: returns once every line the backend printed before it read this
    /// command has been collected, so [`Self::invocations`] misses none of them.
    pub async fn sync(&mut self) {
        let before = self.count(|line| line["synced"] == json!(true));
        self.process.send("sync").await;
        self.process
            .wait_for_lines(
                |line| line["synced"] == json!(true),
                before + 1,
                READY_TIMEOUT,
            )
            .await;
    }

    fn count(&self, predicate: impl Fn(&Value) -> bool) -> usize {
        self.process.lines_matching(predicate).len()
    }
}

fn is_invocation(line: &Value) -> bool {
    line.get("call").is_some() && line.get("procedure").is_some()
}

impl Deref for Backend {
    type Target = PeerProcess;
    fn deref(&self) -> &PeerProcess {
        &self.process
    }
}

impl DerefMut for Backend {
    fn deref_mut(&mut self) -> &mut PeerProcess {
        &mut self.process
    }
}

// ---------------------------------------------------------------------------------------
// publisher.py

/// How to run a [`Publisher`].
#[derive(Clone, Debug)]
pub struct PublisherOptions {
    pub connection: Connection,
    pub topic: String,
    /// More topics: event `i` goes to the `i % (1 + n)`-th of `topic` and these.
    pub more_topics: Vec<String>,
    pub count: u32,
    /// The first event's `seq` (and `i`): 0 unless set.
    pub first: u32,
    /// Events per second; 0 publishes as fast as acknowledgements come back.
    pub rate: f64,
    /// Append `publisher_blob(i)` to args and as kwargs `"blob"`.
    pub with_bytes: bool,
    /// `{"args": [...], "kwargs": {...}}` for every event instead of the numbered payload.
    pub payload: Option<Value>,
    /// Add kwargs `"k": i % N` to the numbered payload (an ordering key).
    pub keys: Option<u32>,
    /// Print only the final `{"done": ...}` line.
    pub quiet: bool,
    /// How long [`Publisher::run`] waits for the peer to exit.
    pub timeout: Duration,
}

impl PublisherOptions {
    pub fn new(crossbar: &Crossbar, topic: &str, count: u32) -> Self {
        Self {
            connection: Connection::to(crossbar),
            topic: topic.to_owned(),
            more_topics: Vec::new(),
            count,
            first: 0,
            rate: 0.0,
            with_bytes: false,
            payload: None,
            keys: None,
            quiet: false,
            timeout: Duration::from_secs(60),
        }
    }

    fn args(&self) -> Vec<OsString> {
        let mut args = self.connection.args();
        args.extend([
            "--topic".into(),
            self.topic.clone().into(),
            "--count".into(),
            self.count.to_string().into(),
            "--rate".into(),
            self.rate.to_string().into(),
            "--first".into(),
            self.first.to_string().into(),
        ]);
        for topic in &self.more_topics {
            args.extend(["--topic".into(), topic.into()]);
        }
        if self.with_bytes {
            args.push("--with-bytes".into());
        }
        if let Some(n) = self.keys {
            args.extend(["--keys".into(), n.to_string().into()]);
        }
        if let Some(payload) = &self.payload {
            args.extend(["--payload-json".into(), payload.to_string().into()]);
        }
        if self.quiet {
            args.push("--quiet".into());
        }
        args
    }
}

/// An autobahn publisher (`tests/peers/publisher.py`), publishing with `acknowledge=True`.
///
/// Lines: `{"published": i, "publication": ID}` per event, then `{"done": true, "count",
/// "seconds"}`; on a refused publish `{"publish_error": i, "error"}` and exit code 6.
pub struct Publisher {
    process: PeerProcess,
    timeout: Duration,
}

impl Publisher {
    /// Publishes `n` events to `topic` without printing them, and checks
    /// that it succeeded.
    pub async fn publish(crossbar: &Crossbar, topic: &str, n: u32) {
        Publisher::run(PublisherOptions {
            quiet: true,
            ..PublisherOptions::new(crossbar, topic, n)
        })
        .await
        .assert_success();
    }

    /// Publishes everything and returns the peer's output (check `status` or call
    /// `assert_success`). Panics if the peer does not exit within `options.timeout`.
    pub async fn run(options: PublisherOptions) -> PeerOutput {
        Self::spawn(options).finish().await
    }

    /// Starts publishing in the background; [`Self::finish`] collects the output.
    pub fn spawn(options: PublisherOptions) -> Self {
        let label = format!("publisher to {}", options.topic);
        Self {
            process: PeerProcess::spawn("publisher.py", label, options.args(), false),
            timeout: options.timeout,
        }
    }

    /// Waits (`options.timeout`) for the publisher to exit and returns its output.
    pub async fn finish(self) -> PeerOutput {
        self.process.finish(self.timeout).await
    }
}

impl Deref for Publisher {
    type Target = PeerProcess;
    fn deref(&self) -> &PeerProcess {
        &self.process
    }
}

impl DerefMut for Publisher {
    fn deref_mut(&mut self) -> &mut PeerProcess {
        &mut self.process
    }
}

// ---------------------------------------------------------------------------------------
// subscriber.py

/// How to start a [`Subscriber`].
#[derive(Clone, Debug)]
pub struct SubscriberOptions {
    pub connection: Connection,
    pub topic: String,
    pub match_: Match,
}

impl SubscriberOptions {
    pub fn new(crossbar: &Crossbar, topic: &str) -> Self {
        Self {
            connection: Connection::to(crossbar),
            topic: topic.to_owned(),
            match_: Match::Exact,
        }
    }

    fn args(&self) -> Vec<OsString> {
        let mut args = self.connection.args();
        args.extend([
            "--topic".into(),
            self.topic.clone().into(),
            "--match".into(),
            self.match_.as_str().into(),
        ]);
        args
    }
}

/// An autobahn subscriber (`tests/peers/subscriber.py`) that is subscribed.
///
/// Event lines: `{"topic", "args", "kwargs", "publication", "publisher",
/// "publisher_authid", "at"}`.
pub struct Subscriber {
    process: PeerProcess,
}

impl Subscriber {
    /// Spawns the subscriber and waits (30 s) until it is subscribed; panics otherwise.
    pub async fn spawn(options: SubscriberOptions) -> Self {
        match Self::try_spawn(options).await {
            Ok(subscriber) => subscriber,
            Err(output) => panic!(
                "subscriber did not get ready ({}); lines: {:?}\n--- subscriber stderr ---\n{}",
                output.status, output.lines, output.stderr
            ),
        }
    }

    /// Like [`Self::spawn`], but a subscriber that exits before it is subscribed (join or
    /// subscribe refused) is returned as `Err(output)`. Still panics on timeout.
    pub async fn try_spawn(options: SubscriberOptions) -> Result<Self, PeerOutput> {
        let label = format!("subscriber to {}", options.topic);
        let process = PeerProcess::spawn("subscriber.py", label, options.args(), false);
        let is_ready = |line: &Value| line["ready"] == json!(true);
        match process
            .try_wait_for_lines(&is_ready, 1, READY_TIMEOUT)
            .await
        {
            Ok(_) => Ok(Self { process }),
            Err(_) if process.lines.borrow().closed => Err(process.finish(EXIT_GRACE).await),
            Err(why) => panic!(
                "{}: {why}\n--- stderr ---\n{}",
                process.label,
                process.stderr()
            ),
        }
    }

    /// Event lines collected so far (read in the background: see [`Self::wait_for_events`]).
    pub fn events(&self) -> Vec<Value> {
        self.process.lines_matching(is_event)
    }

    /// Waits until at least `n` events arrived and returns them all.
    pub async fn wait_for_events(&self, n: usize, timeout: Duration) -> Vec<Value> {
        self.process.wait_for_lines(is_event, n, timeout).await
    }
}

fn is_event(line: &Value) -> bool {
    line.get("publication").is_some() && line.get("topic").is_some()
}

impl Deref for Subscriber {
    type Target = PeerProcess;
    fn deref(&self) -> &PeerProcess {
        &self.process
    }
}

impl DerefMut for Subscriber {
    fn deref_mut(&mut self) -> &mut PeerProcess {
        &mut self.process
    }
}

// ---------------------------------------------------------------------------------------
// caller.py

/// How to run a [`Caller`].
#[derive(Clone, Debug)]
pub struct CallerOptions {
    pub connection: Connection,
    pub procedure: String,
    /// Calls made concurrently; call i sends args `[i]`, kwargs `{"seq": i}`.
    pub count: u32,
    /// `{"args": [...], "kwargs": {...}}` for every call instead.
    pub payload: Option<Value>,
    /// Per-call timeout inside the peer (reported as error `"timeout"`).
    pub call_timeout: Duration,
    /// How long [`Caller::run`] waits for the peer to exit.
    pub timeout: Duration,
}

impl CallerOptions {
    pub fn new(crossbar: &Crossbar, procedure: &str, count: u32) -> Self {
        Self {
            connection: Connection::to(crossbar),
            procedure: procedure.to_owned(),
            count,
            payload: None,
            call_timeout: Duration::from_secs(30),
            timeout: Duration::from_secs(60),
        }
    }

    fn args(&self) -> Vec<OsString> {
        let mut args = self.connection.args();
        args.extend([
            "--procedure".into(),
            self.procedure.clone().into(),
            "--count".into(),
            self.count.to_string().into(),
            "--call-timeout".into(),
            self.call_timeout.as_secs_f64().to_string().into(),
        ]);
        if let Some(payload) = &self.payload {
            args.extend(["--payload-json".into(), payload.to_string().into()]);
        }
        args
    }
}

/// An autobahn caller (`tests/peers/caller.py`).
///
/// Lines: `{"call": i, "args", "kwargs"}` per result or `{"call": i, "error": URI, "args"}`,
/// then `{"done": true, "count", "errors"}`.
pub struct Caller;

impl Caller {
    /// Makes all calls and returns the peer's output. Panics if the peer does not exit
    /// within `options.timeout`.
    pub async fn run(options: CallerOptions) -> PeerOutput {
        let label = format!("caller of {}", options.procedure);
        PeerProcess::spawn("caller.py", label, options.args(), false)
            .finish(options.timeout)
            .await
    }
}

// ---------------------------------------------------------------------------------------
// meta.py

/// A session on the router's meta API (`tests/peers/meta.py`, joined as the `backend`
/// user), so that tests wait on what the router sees instead of on what a process logs.
pub struct RouterMeta {
    /// Behind an async lock so that `&self` methods can be polled from `eventually`
    /// closures; the peer answers one call at a time anyway.
    session: tokio::sync::Mutex<MetaSession>,
}

struct MetaSession {
    process: PeerProcess,
    next_id: u64,
}

impl RouterMeta {
    /// Joins `crossbar` and waits (30 s) until the session is ready; panics otherwise.
    pub async fn join(crossbar: &Crossbar) -> Self {
        let connection = Connection {
            auth: user(BACKEND_USER),
            // It lives as long as the test, not as long as one exchange.
            max_seconds: 300,
            ..Connection::to(crossbar)
        };
        let process = PeerProcess::spawn(
            "meta.py",
            "router meta session".to_owned(),
            connection.args(),
            true,
        );
        process
            .wait_for_line(|line| line["ready"] == json!(true), READY_TIMEOUT)
            .await;
        Self {
            session: tokio::sync::Mutex::new(MetaSession {
                process,
                next_id: 1,
            }),
        }
    }

    /// Calls `procedure` with the positional `args` (a JSON array): its positional
    /// results, or the URI of the WAMP error it answered with.
    pub async fn call(&self, procedure: &str, args: Value) -> Result<Vec<Value>, String> {
        let mut session = self.session.lock().await;
        let id = session.next_id;
        session.next_id += 1;
        let request = json!({"id": id, "procedure": procedure, "args": args});
        session.process.send(&request.to_string()).await;
        let answer = session
            .process
            .wait_for_line(|line| line["id"] == json!(id), READY_TIMEOUT)
            .await;
        match (&answer["result"], &answer["error"]) {
            (Value::Array(results), _) => Ok(results.clone()),
            (_, Value::String(error)) => Err(error.clone()),
            _ => panic!("meta.py answered {procedure} with {answer}"),
        }
    }

    /// The sessions subscribed to `topic`, looked up with the match policy its form
    /// implies: wildcard when a component is empty (`com.example..ev`), else exact.
    pub async fn subscribers(&self, topic: &str) -> Vec<u64> {
        let policy = if topic.split('.').any(str::is_empty) {
            Match::Wildcard
        } else {
            Match::Exact
        };
        let lookup = self
            .call(
                "wamp.subscription.lookup",
                json!([topic, {"match": policy.as_str()}]),
            )
            .await
            .unwrap_or_else(|error| panic!("wamp.subscription.lookup {topic}: {error}"));
        // `null` when nobody subscribes.
        let Some(subscription) = lookup.first().and_then(Value::as_u64) else {
            return Vec::new();
        };
        match self
            .call("wamp.subscription.list_subscribers", json!([subscription]))
            .await
        {
            Ok(results) => results
                .first()
                .and_then(Value::as_array)
                .map(|ids| ids.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default(),
            // The last subscriber left between the two calls.
            Err(error) if error == "wamp.error.no_such_subscription" => Vec::new(),
            Err(error) => panic!("wamp.subscription.list_subscribers {subscription}: {error}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// examples/stream_consumer.py

/// The documented stream consumer (`examples/stream_consumer.py`): one
/// consumer of a group reading a stream of the stream target.
pub struct StreamConsumer {
    process: PeerProcess,
}

/// How to run a [`StreamConsumer`].
#[derive(Clone, Debug)]
pub struct StreamConsumerOptions {
    pub redis_url: String,
    pub stream: String,
    pub consumer: String,
    pub claim_idle_ms: u64,
    pub handle_ms: u64,
    pub max_deliveries: u32,
}

impl StreamConsumerOptions {
    pub fn new(redis_url: &str, stream: &str, consumer: &str) -> Self {
        Self {
            redis_url: redis_url.to_owned(),
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
            claim_idle_ms: 1000,
            handle_ms: 0,
            max_deliveries: 5,
        }
    }
}

impl StreamConsumer {
    /// Spawns the consumer and waits (30 s) for its ready line.
    pub async fn spawn(o: StreamConsumerOptions) -> Self {
        let args: Vec<OsString> = vec![
            "--redis-url".into(),
            o.redis_url.clone().into(),
            "--stream".into(),
            o.stream.clone().into(),
            "--consumer".into(),
            o.consumer.clone().into(),
            "--claim-idle-ms".into(),
            o.claim_idle_ms.to_string().into(),
            "--handle-ms".into(),
            o.handle_ms.to_string().into(),
            "--max-deliveries".into(),
            o.max_deliveries.to_string().into(),
        ];
        let path = repo_root().join("examples/stream_consumer.py");
        let label = format!("stream consumer {}", o.consumer);
        let process = PeerProcess::spawn_path(path, label, args, false);
        process
            .wait_for_line(|l| l["ready"] == true, Duration::from_secs(30))
            .await;
        Self { process }
    }

    /// The entries handled so far (one line each, with `id`, `deliveries`
    /// and the envelope's `kwargs`).
    pub fn handled(&self) -> Vec<Value> {
        self.process.lines_matching(|l| l.get("id").is_some())
    }

    pub async fn kill(&mut self) -> ExitStatus {
        self.process.kill().await
    }
}
