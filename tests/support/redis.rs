//! A private `redis-server` for integration tests, on a free port of 127.0.0.1, and a
//! three-master Redis Cluster built from such servers with `redis-cli --cluster create`.
//!
//! Never the shared server on 6379: each fixture runs its own process with no persistence
//! (`--save "" --appendonly no`) in its own temp dir, and is killed on drop.

use std::fs;
use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::resp::{self, Reply};
use super::{
    eventually, free_port, free_port_below, stop_server, tail, terminate, terminate_blocking,
};

/// How long redis-server gets to answer PING after spawn.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long redis-server gets to exit after SIGTERM before it is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Fresh ports tried when the chosen one turns out to be taken.
const PORT_ATTEMPTS: usize = 3;
/// `redis-server` binary; `SUBTOCALL_REDIS_SERVER` overrides it.
const DEFAULT_REDIS_SERVER: &str = "redis-server";
/// Masters in a [`RedisCluster`]: the fewest `redis-cli --cluster create` accepts.
const CLUSTER_MASTERS: usize = 3;
/// A cluster node also listens on its port + 10000, the cluster bus.
const CLUSTER_BUS_OFFSET: u16 = 10_000;
/// Draws of [`free_port`] tried for a port whose cluster bus port is free too.
const CLUSTER_PORT_DRAWS: usize = 100;
/// `cluster-node-timeout` while the cluster forms, in ms. A node pings every peer at least
/// every half node timeout, so the nodes learn each other's slots within a few hundred ms.
/// At the default a node pings one random peer a second, and `redis-cli --cluster create`
/// (which polls once a second until all nodes agree) took 1 to 5 s instead of 1 s.
const CLUSTER_FORMING_NODE_TIMEOUT_MS: &str = "500";
/// `cluster-node-timeout` once the cluster is up, in ms: Redis's default, so a test machine
/// busy for a second does not get a node marked failing (and the cluster down).
const CLUSTER_NODE_TIMEOUT_MS: &str = "15000";
/// `cluster-node-timeout` of a cluster with replicas, in ms: a replica takes over about
/// 2 s after its master stopped answering.
const FAILOVER_NODE_TIMEOUT_MS: &str = "1000";
/// How long `redis-cli --cluster create` may take; it needs about 1 s (a 1 s sleep of its
/// own after the MEETs).
const CLUSTER_CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long every node gets to report `cluster_state:ok` after `redis-cli` returns.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running redis-server. Stops it on drop.
pub struct Redis {
    dir: TempDir,
    port: u16,
    /// Append-only file with fsync on every write, so data survives a restart.
    persistent: bool,
    /// A node of a [`RedisCluster`]: `--cluster-enabled yes`, its `nodes.conf` in `dir`,
    /// a short node timeout until [`RedisCluster::start`] restores the default, and its
    /// port chosen so that port + 10000 (the cluster bus) is free too.
    cluster_node: bool,
    /// `--replicaof 127.0.0.1 <port>`: a replica of the server on that port.
    replica_of: Option<u16>,
    child: Option<Child>,
    log_path: PathBuf,
}

impl Redis {
    /// Starts redis-server on a free port and waits until it answers PING (10 s cap).
    pub async fn start() -> Self {
        Self::start_with(false, false).await
    }

    /// Like [`Redis::start`], but with an append-only file fsynced on every
    /// write: what was pushed before [`Redis::stop`] is there after
    /// [`Redis::start_again`].
    pub async fn start_persistent() -> Self {
        Self::start_with(true, false).await
    }

    /// Starts a replica of the server on `master`'s port (and waits until
    /// it answers PING; it may still be syncing).
    pub async fn start_replica_of(master: u16) -> Self {
        Self::start_full(false, false, Some(master)).await
    }

    async fn start_with(persistent: bool, cluster_node: bool) -> Self {
        Self::start_full(persistent, cluster_node, None).await
    }

    async fn start_full(persistent: bool, cluster_node: bool, replica_of: Option<u16>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("subtocall-redis-")
            .tempdir()
            .expect("create a temp dir for redis");
        let log_path = dir.path().join("redis.log");
        let mut redis = Self {
            dir,
            port: 0,
            persistent,
            cluster_node,
            replica_of,
            child: None,
            log_path,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            redis.port = if cluster_node {
                free_cluster_port()
            } else {
                free_port()
            };
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

    /// Whether the server process runs (not stopped or killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
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

    /// SIGKILLs the server (a crash: nothing is saved or handed over) and
    /// waits until its port refuses connections.
    pub async fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = child.kill();
        let _ = child.wait();
        let closed = super::wait_until(STOP_GRACE, || super::port_is_closed(self.port)).await;
        assert!(
            closed,
            "redis-server killed but port {} still accepts connections",
            self.port
        );
    }

    /// Waits until this replica's link to its master is up (in sync).
    pub async fn wait_in_sync(&self, timeout: Duration) {
        eventually(timeout, "the replica in sync with its master", || async {
            match self.command(&["INFO", "replication"]).await {
                Reply::Bulk(Some(info))
                    if String::from_utf8_lossy(&info).contains("master_link_status:up") =>
                {
                    Some(())
                }
                _ => None,
            }
        })
        .await;
    }

    /// Sends `signal` to the server (SIGSTOP freezes it: connected, silent;
    /// SIGCONT lets it go on).
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe {
                libc::kill(child.id() as i32, signal);
            }
        }
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
        let mut command = Command::new(&binary);
        if self.cluster_node {
            command
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(self.dir.path().join("nodes.conf"))
                .args(["--cluster-node-timeout", CLUSTER_FORMING_NODE_TIMEOUT_MS]);
        }
        if let Some(master) = self.replica_of {
            command.args(["--replicaof", "127.0.0.1", &master.to_string()]);
        }
        let child = command
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

/// A port that [`free_port`] found free and whose cluster bus port (+10000) is free too.
///
/// Both may be taken before redis-server binds them; [`Redis::start_with`] then retries.
fn free_cluster_port() -> u16 {
    for _ in 0..CLUSTER_PORT_DRAWS {
        let port = free_port_below(CLUSTER_BUS_OFFSET);
        let Some(bus) = port.checked_add(CLUSTER_BUS_OFFSET) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
    panic!("no free port whose port + {CLUSTER_BUS_OFFSET} is free in {CLUSTER_PORT_DRAWS} draws");
}

/// The `redis-cli` next to the `redis-server` that `SUBTOCALL_REDIS_SERVER` names, else the
/// one on `PATH`.
fn redis_cli() -> PathBuf {
    std::env::var_os("SUBTOCALL_REDIS_SERVER")
        .map(PathBuf::from)
        .and_then(|server| server.parent().map(|dir| dir.join("redis-cli")))
        .filter(|cli| cli.is_file())
        .unwrap_or_else(|| PathBuf::from("redis-cli"))
}

/// A three-master Redis Cluster (no replicas) on free ports of 127.0.0.1, each node a
/// [`Redis`] in its own temp dir. Dropping it stops every node.
pub struct RedisCluster {
    /// In the order given to `redis-cli --cluster create`, which gives the first the lowest
    /// slots; the first is the seed of [`RedisCluster::url`].
    nodes: Vec<Redis>,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers, joins them with
    /// `redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`, and waits until
    /// every node says `cluster_state:ok`: about 2 s, because a master reports `ok` no
    /// sooner than 2 s after its slots changed (Redis's `CLUSTER_WRITABLE_DELAY`).
    pub async fn start() -> Self {
        let cluster = Self::form(0).await;
        // Formed: back to the default node timeout (see CLUSTER_NODE_TIMEOUT_MS).
        cluster
            .config_set("cluster-node-timeout", CLUSTER_NODE_TIMEOUT_MS)
            .await;
        cluster
    }

    /// Like [`RedisCluster::start`], with a replica for each master, ready
    /// to take over: a master that stops answering is replaced about 2 s
    /// later (`cluster-node-timeout 1000`, and `cluster-replica-validity-factor
    /// 0` so that a replica may always take over).
    pub async fn start_with_replicas() -> Self {
        let cluster = Self::form(1).await;
        cluster
            .config_set("cluster-node-timeout", FAILOVER_NODE_TIMEOUT_MS)
            .await;
        cluster
            .config_set("cluster-replica-validity-factor", "0")
            .await;
        eventually(
            CLUSTER_READY_TIMEOUT,
            "every replica in sync with its master",
            || async {
                let mut synced = 0;
                for node in &cluster.nodes {
                    if let Ok(Reply::Bulk(Some(info))) =
                        resp::command(node.port, &["INFO", "replication"]).await
                    {
                        let info = String::from_utf8_lossy(&info);
                        if info.contains("role:slave") && info.contains("master_link_status:up") {
                            synced += 1;
                        }
                    }
                }
                (synced == CLUSTER_MASTERS).then_some(())
            },
        )
        .await;
        cluster
    }

    /// Starts the nodes (`replicas` per master) and joins them.
    async fn form(replicas: usize) -> Self {
        let count = CLUSTER_MASTERS * (1 + replicas);
        let mut nodes = Vec::with_capacity(count);
        // One after the other: a node's port and bus port are bound before the next draws
        // its own, so no two nodes can pick the same. (A node takes ~50 ms to answer PING.)
        for _ in 0..count {
            nodes.push(Redis::start_with(false, true).await);
        }
        let cluster = Self { nodes };
        cluster.create(replicas).await;
        eventually(
            CLUSTER_READY_TIMEOUT,
            "cluster_state:ok on every cluster node",
            || async {
                for node in &cluster.nodes {
                    match resp::command(node.port, &["CLUSTER", "INFO"]).await {
                        Ok(Reply::Bulk(Some(info)))
                            if String::from_utf8_lossy(&info)
                                .lines()
                                .any(|line| line.trim() == "cluster_state:ok") => {}
                        _ => return None,
                    }
                }
                Some(())
            },
        )
        .await;
        cluster
    }

    /// `CONFIG SET name value` on every running node.
    async fn config_set(&self, name: &str, value: &str) {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let reply = node.command(&["CONFIG", "SET", name, value]).await;
            assert_eq!(reply, Reply::Simple("OK".to_owned()), "port {}", node.port);
        }
    }

    /// SIGKILLs the master that holds `key`'s slot and waits until the
    /// cluster names another one; returns the old and the new master's
    /// ports and how long the takeover took.
    pub async fn kill_master_of(&mut self, key: &str) -> (u16, u16, Duration) {
        let old = self.node_for_key(key).await.port();
        let slot = self.live_node().command(&["CLUSTER", "KEYSLOT", key]).await;
        let slot = u16::try_from(slot.integer()).expect("a slot is below 16384");
        self.nodes
            .iter_mut()
            .find(|n| n.port == old)
            .expect("the master is one of ours")
            .kill()
            .await;
        let killed = Instant::now();
        let new = eventually(
            CLUSTER_READY_TIMEOUT,
            &format!("another master for slot {slot} than {old}"),
            || async {
                let masters = self.slot_masters().await;
                masters
                    .iter()
                    .find(|(range, port)| range.contains(&slot) && *port != old)
                    .map(|&(_, port)| port)
            },
        )
        .await;
        (old, new, killed.elapsed())
    }

    /// A node that runs (the seed, unless it was killed).
    fn live_node(&self) -> &Redis {
        self.nodes
            .iter()
            .find(|n| n.is_running())
            .expect("a cluster node that runs")
    }

    async fn create(&self, replicas: usize) {
        let cli = redis_cli();
        let mut command = tokio::process::Command::new(&cli);
        command.args(["--cluster", "create"]);
        for node in &self.nodes {
            command.arg(format!("127.0.0.1:{}", node.port));
        }
        command
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            // The timeout drops the `output()` future, and with it kills redis-cli.
            .kill_on_drop(true);
        let output = tokio::time::timeout(CLUSTER_CREATE_TIMEOUT, command.output())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} --cluster create took over {CLUSTER_CREATE_TIMEOUT:?}",
                    cli.display()
                )
            })
            .unwrap_or_else(|e| panic!("run {} --cluster create: {e}", cli.display()));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("All 16384 slots covered"),
            "{} --cluster create failed ({}):\n{stdout}\n{}",
            cli.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The seed node's URL, `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// The nodes' client ports (each node's cluster bus is its port + 10000).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(Redis::port).collect()
    }

    /// Every node, to send commands to one of them directly.
    pub fn nodes(&self) -> &[Redis] {
        &self.nodes
    }

    /// Who serves which slots, from the seed's `CLUSTER SLOTS`: each slot range with the
    /// port of its master.
    pub async fn slot_masters(&self) -> Vec<(RangeInclusive<u16>, u16)> {
        let reply = self.live_node().command(&["CLUSTER", "SLOTS"]).await;
        let Reply::Array(Some(ranges)) = &reply else {
            panic!("CLUSTER SLOTS: expected an array, got {reply:?}");
        };
        let number = |reply: &Reply| {
            u16::try_from(reply.integer())
                .unwrap_or_else(|_| panic!("CLUSTER SLOTS: {reply:?} is no slot or port"))
        };
        ranges
            .iter()
            .map(|range| match range {
                // [start, end, [master ip, master port, id, ...], replicas...]
                Reply::Array(Some(fields)) if fields.len() >= 3 => match &fields[2] {
                    Reply::Array(Some(master)) if master.len() >= 2 => {
                        (number(&fields[0])..=number(&fields[1]), number(&master[1]))
                    }
                    other => panic!("CLUSTER SLOTS: a master that is {other:?}"),
                },
                other => panic!("CLUSTER SLOTS: a range that is {other:?}"),
            })
            .collect()
    }

    /// The node whose master holds `key`'s slot (`CLUSTER KEYSLOT` and `CLUSTER SLOTS`).
    pub async fn node_for_key(&self, key: &str) -> &Redis {
        let slot = self.live_node().command(&["CLUSTER", "KEYSLOT", key]).await;
        let slot = u16::try_from(slot.integer()).expect("a slot is below 16384");
        let masters = self.slot_masters().await;
        let port = masters
            .iter()
            .find(|(range, _)| range.contains(&slot))
            .map(|&(_, port)| port)
            .unwrap_or_else(|| panic!("slot {slot} of {key:?} has no master: {masters:?}"));
        self.nodes
            .iter()
            .find(|node| node.port == port)
            .unwrap_or_else(|| panic!("slot {slot} is on port {port}, not one of our nodes"))
    }
}
