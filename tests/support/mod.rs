//! Integration-test support: a real Crossbar router, a private Redis, autobahn-python peers
//! and wait-until helpers. Used as `mod support;` by each file in `tests/`; it may spawn
//! processes and open sockets on 127.0.0.1 only, always on free ports.
//!
//! Every fixture is an RAII guard: dropping it stops the process it started, and a guard
//! dropped during a panic prints the tail of its process's log to stderr.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

pub mod crossbar;
pub mod fake_router;
pub mod metrics;
pub mod ordered;
pub mod peers;
pub mod proxy;
pub mod queue;
pub mod redis;
pub mod resp;
pub mod sentinel;
pub mod sidecar;

use std::fs::{self, File};
use std::future::Future;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

// Re-exports for the tests; a test binary that uses only some of them must not warn.
#[allow(unused_imports)]
pub use crossbar::{Crossbar, CrossbarOptions, crossbar_check};
#[allow(unused_imports)]
pub use peers::{
    Backend, BackendOptions, Caller, CallerOptions, PeerOutput, Publisher, PublisherOptions,
    RouterMeta, Serializer, Subscriber, SubscriberOptions, wamp_bytes,
};
#[allow(unused_imports)]
pub use redis::Redis;

/// The pinned Crossbar version; the default venv directory is named after it.
pub const CROSSBAR_VERSION: &str = "26.10.1";

/// How often the wait-until helpers poll.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The repository root (the directory holding Cargo.toml).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Crossbar virtualenv (crossbar, autobahn-python, redis-py).
///
/// `SUBTOCALL_CROSSBAR_VENV` wins when set. Otherwise it is `<repo>/.venv/crossbar-26.10.1`,
/// created on first use by `scripts/setup-crossbar.sh` under an exclusive `flock`, so test
/// processes started in parallel install it once and the others wait for it.
pub fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        if let Some(dir) = std::env::var_os("SUBTOCALL_CROSSBAR_VENV") {
            let dir = PathBuf::from(dir);
            assert!(
                dir.join("bin/crossbar").is_file() && dir.join("bin/python").is_file(),
                "SUBTOCALL_CROSSBAR_VENV={} has no bin/crossbar or bin/python; \
                 run scripts/setup-crossbar.sh or unset the variable",
                dir.display()
            );
            return dir;
        }
        install_default_venv()
    })
}

fn install_default_venv() -> PathBuf {
    let venv_parent = repo_root().join(".venv");
    let venv = venv_parent.join(format!("crossbar-{CROSSBAR_VERSION}"));
    fs::create_dir_all(&venv_parent).expect("create <repo>/.venv");
    let lock_path = venv_parent.join(".setup-crossbar.lock");
    let lock = File::create(&lock_path).expect("create the venv setup lock file");
    // SAFETY: flock on a file descriptor that `lock` keeps open for this whole scope.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(
        rc,
        0,
        "flock {}: {}",
        lock_path.display(),
        std::io::Error::last_os_error()
    );
    // The script is idempotent and returns at once when the venv is complete.
    let output = Command::new("bash")
        .arg(repo_root().join("scripts/setup-crossbar.sh"))
        .env("CROSSBAR_VENV", &venv)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/setup-crossbar.sh");
    assert!(
        output.status.success(),
        "scripts/setup-crossbar.sh failed ({})",
        output.status
    );
    drop(lock); // releases the flock
    venv
}

/// The venv's python interpreter.
pub fn python() -> PathBuf {
    venv().join("bin/python")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// Drawn at random below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), and checked by binding it:
/// a port from `bind(0)` comes out of that range, where every outgoing
/// connection's source port comes from too, so another test's client could
/// take it before our server binds it ("Address already in use"). Below the
/// range only another test's draw can, which is rare; fixtures that bind it
/// still retry on a new port when their server reports the address in use.
pub fn free_port() -> u16 {
    free_port_below(0)
}

/// [`free_port`], leaving `room` ports above it below the ephemeral range
/// (a Redis Cluster node's bus listens on its port + 10000).
pub fn free_port_below(room: u16) -> u16 {
    let low = ephemeral_low().saturating_sub(room);
    if low > 11_000 {
        for _ in 0..200 {
            let port = rand::random_range(10_000..low);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    // A system whose ephemeral range starts low: the kernel's choice.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener
        .local_addr()
        .expect("local address of a bound listener")
        .port()
}

/// The first port of the kernel's ephemeral range (32768 when unreadable).
fn ephemeral_low() -> u16 {
    static LOW: OnceLock<u16> = OnceLock::new();
    *LOW.get_or_init(|| {
        fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse().ok())
            .unwrap_or(32_768)
    })
}

/// Polls `check` every 50 ms until it returns `Some`, and returns that value.
///
/// Panics with `what` when `timeout` elapses first. Use it instead of sleeping.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `condition` every 50 ms until it is true; returns false if `timeout` elapses first.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if condition().await {
            return true;
        }
        if started.elapsed() >= timeout {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Stops a server child (SIGTERM, `grace`, SIGKILL) and waits (`grace` cap)
/// until its port refuses connections; panics naming `what` if it does not.
pub(crate) async fn stop_server(
    child: &mut std::process::Child,
    port: u16,
    grace: Duration,
    what: &str,
) -> std::process::ExitStatus {
    let status = terminate(child, grace).await;
    let closed = wait_until(grace, || port_is_closed(port)).await;
    assert!(
        closed,
        "{what} exited ({status}) but port {port} still accepts connections"
    );
    status
}

/// True when nothing accepts TCP connections on 127.0.0.1:`port`.
pub async fn port_is_closed(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Sends `signal` to `pid`; errors (the process is already gone) are ignored.
pub(crate) fn send_signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Stops a std child: SIGTERM, up to `grace` to exit, then SIGKILL. Blocking; for `Drop`.
pub(crate) fn terminate_blocking(
    child: &mut std::process::Child,
    grace: Duration,
) -> std::process::ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    send_signal(child.id(), libc::SIGTERM);
    let started = Instant::now();
    while started.elapsed() < grace {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().expect("wait for a SIGKILLed child")
}

/// Async variant of [`terminate_blocking`]: polls without blocking the runtime.
pub(crate) async fn terminate(
    child: &mut std::process::Child,
    grace: Duration,
) -> std::process::ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    send_signal(child.id(), libc::SIGTERM);
    let started = Instant::now();
    while started.elapsed() < grace {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    child.wait().expect("wait for a SIGKILLed child")
}

/// Established TCP connections of process `pid` to `port` on this host
/// (its socket descriptors, matched against `/proc/net/tcp` and `tcp6`),
/// each as its line there (local and remote address in hex, state, queues,
/// inode): what a failure shows of them.
pub fn connection_lines(pid: u32, port: u16) -> Vec<String> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let inodes: std::collections::HashSet<String> = fds
        .filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let text = target.to_string_lossy().into_owned();
            let inode = text.strip_prefix("socket:[")?.strip_suffix(']')?;
            Some(inode.to_owned())
        })
        .collect();
    let port = format!("{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| fs::read_to_string(table).ok())
        .flat_map(|text| text.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter(|line| {
            // sl local remote state ... uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() > 9
                && f[3] == "01"
                && f[2].rsplit(':').next() == Some(port.as_str())
                && inodes.contains(f[9])
        })
        .collect()
}
