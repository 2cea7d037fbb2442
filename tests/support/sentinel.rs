//! Redis Sentinel for integration tests: a master, one replica and three
//! sentinels (quorum 2) watching it, each on a free port of 127.0.0.1: the
//! usual self-hosted Redis HA. The sentinels call the master down after
//! `down-after-milliseconds` (1 s) without an answer and promote the replica
//! about 2 s after the master died.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::proxy::Proxy;
use super::redis::Redis;
use super::resp::{self, Reply};
use super::{eventually, free_port, tail, terminate_blocking};

/// The name the sentinels monitor the master under.
pub const MASTER_NAME: &str = "subtocall-test";
/// How long the fixture may take to be ready: the sentinels learn the
/// replica and each other from hello messages sent every 2 s.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_GRACE: Duration = Duration::from_secs(5);

/// One `redis-server --sentinel` process.
struct SentinelProcess {
    _dir: TempDir,
    port: u16,
    child: Option<Child>,
    log_path: PathBuf,
}

impl SentinelProcess {
    fn spawn(master_port: u16, failover_timeout_ms: u64) -> SentinelProcess {
        let dir = tempfile::Builder::new()
            .prefix("subtocall-sentinel-")
            .tempdir()
            .expect("create a temp dir for a sentinel");
        let port = free_port();
        let log_path = dir.path().join("sentinel.log");
        let conf = dir.path().join("sentinel.conf");
        fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\nlogfile {log}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                dir = dir.path().display(),
                log = log_path.display(),
            ),
        )
        .expect("write sentinel.conf");
        let binary =
            std::env::var("SUBTOCALL_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&binary)
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {binary} --sentinel: {e}"));
        SentinelProcess {
            _dir: dir,
            port,
            child: Some(child),
            log_path,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate_blocking(&mut child, STOP_GRACE);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- last 30 lines of sentinel {} ---\n{}\n--- end ---",
                self.port,
                tail(&self.log(), 30)
            );
        }
    }
}

/// A master, its replica and three sentinels. Dropping it stops them all.
pub struct RedisSentinel {
    sentinels: Vec<SentinelProcess>,
    /// The master first, then the replica (as started; a failover swaps
    /// their roles, not their places here).
    servers: Vec<Redis>,
    /// With [`RedisSentinel::start_with_link`]: the replica's link to the
    /// master.
    link: Option<Proxy>,
}

impl RedisSentinel {
    /// Starts the master and its replica, waits until the replica is in
    /// sync, then the sentinels, and waits until every sentinel knows the
    /// replica and the two other sentinels (so that a failover can be
    /// agreed on and has somewhere to go).
    pub async fn start() -> RedisSentinel {
        Self::start_full(false).await
    }

    /// Like [`RedisSentinel::start`], with the replica's link to the master
    /// through a [`Proxy`] ([`RedisSentinel::replica_link`]), to make it lag.
    pub async fn start_with_link() -> RedisSentinel {
        Self::start_full(true).await
    }

    async fn start_full(with_link: bool) -> RedisSentinel {
        let master = Redis::start().await;
        let link = match with_link {
            true => Some(Proxy::start(master.port()).await),
            false => None,
        };
        let replica =
            Redis::start_replica_of(link.as_ref().map_or(master.port(), Proxy::port)).await;
        replica.wait_in_sync(READY_TIMEOUT).await;
        // The sentinels re-point a replica that replicates from another
        // address than the master's (its link) `failover-timeout` after they
        // first saw it: with a link, later than any test runs.
        let failover_timeout = if with_link { 120_000 } else { 5_000 };
        let sentinels: Vec<SentinelProcess> = (0..3)
            .map(|_| SentinelProcess::spawn(master.port(), failover_timeout))
            .collect();
        let fixture = RedisSentinel {
            sentinels,
            servers: vec![master, replica],
            link,
        };
        for s in &fixture.sentinels {
            let port = s.port;
            eventually(
                READY_TIMEOUT,
                &format!("sentinel {port} knows the replica and two other sentinels"),
                || async move {
                    let count = |args: &'static [&'static str]| async move {
                        match resp::command(port, args).await {
                            Ok(Reply::Array(Some(items))) => Some(items.len()),
                            _ => None,
                        }
                    };
                    let replicas = count(&["SENTINEL", "REPLICAS", MASTER_NAME]).await?;
                    let others = count(&["SENTINEL", "SENTINELS", MASTER_NAME]).await?;
                    (replicas >= 1 && others >= 2).then_some(())
                },
            )
            .await;
        }
        fixture
    }

    /// `host:port,host:port,host:port`, for `SUBTOCALL_REDIS_SENTINELS`.
    pub fn sentinels(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Makes the replica lag from now on (started with a link): its link
    /// to the master is held. Checks first that the replica still
    /// replicates through the link (the sentinels re-point a replica that
    /// replicates from another address than the master's own
    /// `failover-timeout` after they first saw it: see `start_full`).
    pub async fn lag_replica(&self) {
        let link = self.link.as_ref().expect("started with_link");
        let through = format!("master_port:{}", link.port());
        match self.servers[1].command(&["INFO", "replication"]).await {
            Reply::Bulk(Some(info)) if String::from_utf8_lossy(&info).contains(&through) => {}
            other => panic!("the replica no longer replicates through its link: {other:?}"),
        }
        link.hold();
    }

    /// The replica's link to the master (started with a link).
    pub fn replica_link(&self) -> &Proxy {
        self.link.as_ref().expect("started with_link")
    }

    /// The port of the master, as the first sentinel says now.
    pub async fn master_port(&self) -> Option<u16> {
        let reply = resp::command(
            self.sentinels[0].port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
        )
        .await
        .ok()?;
        match reply {
            Reply::Array(Some(parts)) if parts.len() == 2 => {
                parts[1].text().and_then(|p| p.parse().ok())
            }
            _ => None,
        }
    }

    /// The server on `port` (the master or the replica).
    pub fn server(&mut self, port: u16) -> &mut Redis {
        self.servers
            .iter_mut()
            .find(|s| s.port() == port)
            .unwrap_or_else(|| panic!("no server of the fixture on port {port}"))
    }

    /// SIGKILLs the current master and waits until the sentinels name the
    /// other server; returns how long that took.
    pub async fn kill_master(&mut self) -> Duration {
        let old = self
            .master_port()
            .await
            .expect("the sentinels name a master");
        self.server(old).kill().await;
        let killed = Instant::now();
        eventually(
            READY_TIMEOUT,
            "the sentinels promote the replica",
            || async { self.master_port().await.filter(|p| *p != old).map(|_| ()) },
        )
        .await;
        killed.elapsed()
    }
}
