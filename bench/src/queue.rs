//! Part 4, the Redis queue (`SUBTOCALL_QUEUE=redis`) beside the memory queue,
//! same build, same run: the ceiling against the loopback peer with one
//! instance and with two (each on a session of its own, fed the same
//! publication ids by a group of peers, sharing one private redis-server),
//! subtocall's CPU per event (summed over the instances), redis-server's, and
//! a check that every event was delivered exactly once. The Crossbar half
//! (latency at the moderate rate) is a path of part 2 (`router.rs`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use subtocall::wamp::Serializer;

use crate::Ctx;
use crate::ceiling::{WINDOW, sidecar_env, wait_subscribed};
use crate::peer::{Peer, PeerConfig, PeerStats, answered};
use crate::procs::{RedisServer, Sidecar, SidecarSpec, metrics_at};

/// Where accepted events wait (`SUBTOCALL_QUEUE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Queue {
    Memory,
    Redis,
    /// The Redis queue with a replica and `SUBTOCALL_REDIS_WAIT_REPLICAS=1`.
    RedisWait,
    /// The Redis queue with `SUBTOCALL_RETENTION=1h`.
    RedisRetained,
}

impl Queue {
    pub fn env(self) -> &'static str {
        match self {
            Queue::Memory => "memory",
            Queue::Redis | Queue::RedisWait | Queue::RedisRetained => "redis",
        }
    }

    /// In the log.
    pub fn name(self) -> &'static str {
        match self {
            Queue::Memory => "memory",
            Queue::Redis => "redis",
            Queue::RedisWait => "redis+wait",
            Queue::RedisRetained => "redis+retain",
        }
    }

    pub fn is_redis(self) -> bool {
        self != Queue::Memory
    }
}

/// The configurations measured, in this order within a repetition (reversed
/// every other one): the memory queue (one instance: it cannot share work),
/// the Redis queue with one instance and with two.
/// Then the Redis queue with a replica and WAIT, one instance, and with
/// retention, one instance.
pub const CASES: [(Queue, usize); 5] = [
    (Queue::Memory, 1),
    (Queue::Redis, 1),
    (Queue::Redis, 2),
    (Queue::RedisWait, 1),
    (Queue::RedisRetained, 1),
];

/// `SUBTOCALL_RETENTION` in the retention case.
const RETENTION: &str = "1h";

/// The event counts of the two callgrind runs per queue.
pub const CALLGRIND_EVENTS: (u64, u64) = (5_000, 25_000);

/// The consumer group's name in the benchmark.
const QUEUE_NAME: &str = "bench";

/// One timed run of one case.
#[derive(Debug, Clone, Default)]
pub struct QueueRun {
    /// Events delivered per second, all instances together (each once).
    pub events_per_s: f64,
    /// subtocall's CPU per event delivered, summed over the instances.
    pub sidecar_cpu_ns: f64,
    /// redis-server's CPU per event delivered (0 for the memory queue).
    pub redis_cpu_ns: f64,
    /// The peers' own CPU per event, together.
    pub peer_cpu_ns: f64,
    /// The largest peak RSS (VmHWM) among the instances.
    pub peak_rss_kb: u64,
    /// The share of the events each instance delivered, over the whole run.
    pub delivered_share: Vec<f64>,
    /// With retention: `subtocall replay` of everything the run retained,
    /// events put back and seconds it took (the command's whole run).
    pub replay: Option<(u64, f64)>,
}

/// Runs the subtocall `binary` with `instances` instances on `queue`
/// (`redis`: the server the Redis queue uses; emptied first).
pub fn run_once(
    ctx: &Ctx,
    binary: &Path,
    queue: Queue,
    instances: usize,
    redis: Option<&RedisServer>,
) -> Result<QueueRun> {
    // The WAIT case on a master and replica of their own (`waited`).
    let waited = match (queue, redis) {
        (Queue::RedisWait, Some(_)) => Some(waited(ctx)?),
        _ => None,
    };
    let redis = match (queue.is_redis(), &waited, redis) {
        (true, Some((master, _)), _) => Some(master),
        (true, None, Some(r)) => {
            // No stream, claim key or group left from the previous run (their
            // publication ids are the same).
            crate::resp::Conn::connect(r.port)?.command(&["FLUSHALL"])?;
            Some(r)
        }
        (true, None, None) => bail!("the Redis queue needs a redis-server"),
        (false, _, _) => None,
    };
    let serializer = Serializer::MsgPack;
    let peers = Peer::start_group(
        PeerConfig {
            serializer,
            window: WINDOW,
            limit: None,
            external_completions: None,
            rate: None,
            keys: None,
        },
        instances,
    )?;
    let mut sidecars = Vec::with_capacity(instances);
    for (i, peer) in peers.iter().enumerate() {
        let mut env: BTreeMap<String, String> = sidecar_env(peer, serializer);
        env.insert("SUBTOCALL_QUEUE".into(), queue.env().into());
        if let Some(r) = redis {
            env.insert("REDIS_URL".into(), r.url());
            env.insert("SUBTOCALL_QUEUE_NAME".into(), QUEUE_NAME.into());
        }
        if queue == Queue::RedisWait {
            env.insert("SUBTOCALL_REDIS_WAIT_REPLICAS".into(), "1".into());
        }
        if queue == Queue::RedisRetained {
            env.insert("SUBTOCALL_RETENTION".into(), RETENTION.into());
        }
        sidecars.push(Sidecar::start(SidecarSpec {
            binary,
            env,
            callgrind_out: None,
            log: ctx.work.join(format!("subtocall-queue-{}.log", i + 1)),
        })?);
    }
    for (peer, sidecar) in peers.iter().zip(&mut sidecars) {
        wait_subscribed(peer, sidecar, Duration::from_secs(15))?;
    }
    std::thread::sleep(Duration::from_millis(300));
    // Two instances: each peer keeps within the window of what its own
    // instance has taken in.
    let intake = (instances > 1).then(|| {
        IntakePoller::start(
            sidecars
                .iter()
                .zip(&peers)
                .map(|(s, p)| (s.http_port, p.stats.clone()))
                .collect(),
        )
    });

    let stats: Vec<_> = peers.iter().map(|p| p.stats.clone()).collect();
    let sample = || {
        (
            Instant::now(),
            answered(&stats),
            sidecars.iter().map(Sidecar::cpu_ns).sum::<u64>(),
            redis.map_or(0, |r| crate::procfs::cpu_ns(r.proc.pid())),
            peers.iter().map(Peer::cpu_ns).sum::<u64>(),
        )
    };
    for p in &peers {
        p.stats.go.store(true, Ordering::Relaxed);
    }
    std::thread::sleep(ctx.warmup);
    let (t0, c0, s0, r0, p0) = sample();
    std::thread::sleep(ctx.measure);
    let (t1, c1, s1, r1, p1) = sample();
    let peak_rss_kb = sidecars.iter().map(Sidecar::peak_rss_kb).max();
    for p in &peers {
        p.stats.stop.store(true, Ordering::Relaxed);
    }
    for p in &peers {
        if let Some(e) = p.error() {
            bail!("loopback peer: {e}");
        }
    }
    // The group sent ids 0..max; the memory queue's one instance its own.
    let unique = peers
        .iter()
        .map(|p| p.stats.sent.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    let started = Instant::now();
    while answered(&stats) < unique {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("only {} of {unique} events arrived", answered(&stats));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(intake);
    let delivered = exactly_once(&sidecars, queue, unique)?;
    if answered(&stats) != unique {
        bail!(
            "{} CALLs for {unique} events: some were delivered twice",
            answered(&stats)
        );
    }
    if !peers
        .iter()
        .any(|p| p.stats.payload_checked.load(Ordering::Relaxed))
    {
        bail!("no forwarded CALL was checked against the published payload");
    }
    for s in &mut sidecars {
        s.check_nothing_lost()?;
        s.proc.stop(Duration::from_secs(10));
    }
    let replay = match (queue, redis) {
        (Queue::RedisRetained, Some(r)) => Some(replay_all(binary, r, unique)?),
        _ => None,
    };
    let events = (c1 - c0).max(1) as f64;
    Ok(QueueRun {
        events_per_s: (c1 - c0) as f64 / t1.duration_since(t0).as_secs_f64(),
        sidecar_cpu_ns: (s1 - s0) as f64 / events,
        redis_cpu_ns: (r1 - r0) as f64 / events,
        peer_cpu_ns: (p1 - p0) as f64 / events,
        peak_rss_kb: peak_rss_kb.unwrap_or(0),
        delivered_share: delivered
            .iter()
            .map(|&d| d / unique.max(1) as f64)
            .collect(),
        replay,
    })
}

/// Runs `subtocall replay` of the last hour of the bench procedure's topic
/// (everything the run retained, `retained` events) and times it: events
/// put back, seconds.
fn replay_all(binary: &Path, redis: &RedisServer, retained: u64) -> Result<(u64, f64)> {
    let started = Instant::now();
    let out = std::process::Command::new(binary)
        .args([
            "replay",
            "--procedure",
            crate::peer::PROCEDURE,
            "--since",
            "1h",
        ])
        .env_clear()
        .env("REDIS_URL", redis.url())
        .env("SUBTOCALL_QUEUE", "redis")
        .env("SUBTOCALL_QUEUE_NAME", QUEUE_NAME)
        .env("SUBTOCALL_RETENTION", RETENTION)
        .output()?;
    let seconds = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "subtocall replay failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let n: u64 = stdout
        .strip_prefix("replayed ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("unexpected replay output: {stdout}"))?;
    if n < retained {
        bail!("replay put back {n} events, fewer than the {retained} the run retained");
    }
    Ok((n, seconds))
}

/// A master of its own and its replica, for the WAIT case: the other
/// cases' server never has a replica. A master whose replica has gone
/// keeps writing everything into its replication backlog for
/// `repl-backlog-ttl` (an hour by default): before, every case run after
/// the WAIT case paid for that (redis-server 8.5 µs per event at the
/// ceiling with one instance instead of 6.8 µs, 111,186 and 114,989 events
/// per second instead of 133,711, in one run of the two cases alternating).
fn waited(ctx: &Ctx) -> Result<(RedisServer, RedisServer)> {
    let master = RedisServer::start_with(&ctx.work, "redis-queue-waited", &[])?;
    let replica = start_replica(ctx, &master)?;
    Ok((master, replica))
}

/// A replica of `master`, once the master counts it online.
pub fn start_replica(ctx: &Ctx, master: &RedisServer) -> Result<RedisServer> {
    let port = master.port.to_string();
    let replica = RedisServer::start_with(
        &ctx.work,
        "redis-queue-replica",
        &["--replicaof", "127.0.0.1", &port],
    )?;
    let started = Instant::now();
    loop {
        let info = crate::resp::Conn::connect(master.port)?.text(&["INFO", "replication"])?;
        if info.contains("state=online") {
            return Ok(replica);
        }
        if started.elapsed() > Duration::from_secs(15) {
            bail!("the replica was not online within 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Idle instances on the Redis queue with many procedures: what they cost
/// Redis when nothing happens.
#[derive(Debug, Clone, Default)]
pub struct IdleRun {
    pub procedures: usize,
    pub instances: usize,
    /// With `SUBTOCALL_ORDER_BY` (16 partitions per procedure).
    pub ordered: bool,
    pub claim_idle_s: f64,
    /// Commands redis-server processed per second, all instances together.
    pub commands_per_s: f64,
    /// redis-server's CPU per second.
    pub redis_cpu_per_s_ns: f64,
    /// subtocall's CPU per second, all instances together.
    pub sidecar_cpu_per_s_ns: f64,
    /// Connections to Redis of each instance.
    pub connections: Vec<usize>,
}

/// `instances` idle instances on the Redis queue, `procedures` procedures
/// known to it (in its procedures set), at the default claim idle time:
/// after a warm-up of half of it, one claim idle time measured.
pub fn idle(
    ctx: &Ctx,
    binary: &Path,
    redis: &RedisServer,
    procedures: usize,
    instances: usize,
    ordered: bool,
) -> Result<IdleRun> {
    let claim_idle = if ctx.repeats <= 2 {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(30)
    };
    let mut conn = crate::resp::Conn::connect(redis.port)?;
    conn.command(&["FLUSHALL"])?;
    let set = format!("{QUEUE_NAME}:procedures");
    for chunk in (0..procedures).collect::<Vec<_>>().chunks(500) {
        let names: Vec<String> = chunk.iter().map(|i| format!("bench.SUB_idle{i}")).collect();
        let mut args = vec!["SADD", set.as_str()];
        args.extend(names.iter().map(String::as_str));
        conn.command(&args)?;
    }
    let serializer = Serializer::MsgPack;
    let peers = Peer::start_group(
        PeerConfig {
            serializer,
            window: WINDOW,
            limit: None,
            external_completions: None,
            rate: None,
            keys: None,
        },
        instances,
    )?;
    let mut sidecars = Vec::with_capacity(instances);
    for (i, peer) in peers.iter().enumerate() {
        let mut env: BTreeMap<String, String> = sidecar_env(peer, serializer);
        env.insert("SUBTOCALL_QUEUE".into(), "redis".into());
        env.insert("REDIS_URL".into(), redis.url());
        env.insert("SUBTOCALL_QUEUE_NAME".into(), QUEUE_NAME.into());
        env.insert(
            "SUBTOCALL_CLAIM_IDLE".into(),
            format!("{}s", claim_idle.as_secs()),
        );
        if ordered {
            env.insert("SUBTOCALL_ORDER_BY".into(), "kwarg:k".into());
        }
        sidecars.push(Sidecar::start(SidecarSpec {
            binary,
            env,
            callgrind_out: None,
            log: ctx.work.join(format!("subtocall-idle-{}.log", i + 1)),
        })?);
    }
    for (peer, sidecar) in peers.iter().zip(&mut sidecars) {
        wait_subscribed(peer, sidecar, Duration::from_secs(15))?;
    }
    // Groups created, leases shared: half a claim idle time.
    std::thread::sleep(claim_idle / 2);
    let commands = |conn: &mut crate::resp::Conn| -> Result<u64> {
        let info = conn.text(&["INFO", "stats"])?;
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no total_commands_processed in INFO"))
    };
    let pids: Vec<u32> = sidecars.iter().map(Sidecar::pid).collect();
    let (t0, c0, r0, s0) = (
        Instant::now(),
        commands(&mut conn)?,
        crate::procfs::cpu_ns(redis.proc.pid()),
        crate::procfs::cpu_ns_all(&pids),
    );
    std::thread::sleep(claim_idle);
    let (t1, c1, r1, s1) = (
        Instant::now(),
        commands(&mut conn)?,
        crate::procfs::cpu_ns(redis.proc.pid()),
        crate::procfs::cpu_ns_all(&pids),
    );
    let connections = pids
        .iter()
        .map(|&p| crate::procfs::connections_to(p, redis.port))
        .collect();
    for s in &mut sidecars {
        s.proc.check_alive()?;
        s.proc.stop(Duration::from_secs(10));
    }
    let secs = t1.duration_since(t0).as_secs_f64();
    Ok(IdleRun {
        procedures,
        instances,
        ordered,
        claim_idle_s: claim_idle.as_secs_f64(),
        // Two INFO of ours are in the count.
        commands_per_s: (c1 - c0).saturating_sub(2) as f64 / secs,
        redis_cpu_per_s_ns: (r1 - r0) as f64 / secs,
        sidecar_cpu_per_s_ns: (s1 - s0) as f64 / secs,
        connections,
    })
}

/// Reads what each instance has taken in (admitted, or found admitted by
/// another) from its metrics every few milliseconds into its peer's
/// [`PeerStats::subscriber_done`], until dropped. Costs each instance about
/// 200 small HTTP requests a second.
struct IntakePoller {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IntakePoller {
    fn start(instances: Vec<(u16, Arc<PeerStats>)>) -> IntakePoller {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                for (port, stats) in &instances {
                    if let Ok(m) = metrics_at(*port) {
                        let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
                        let done = get("subtocall_queue_admitted_total")
                            + get("subtocall_queue_admitted_elsewhere_total");
                        stats.subscriber_done.store(done as u64, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        IntakePoller {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for IntakePoller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until the instances together report `unique` events delivered
/// (`subtocall_events_forwarded_total`) and, on the Redis queue, admitted
/// (`subtocall_queue_admitted_total`): each event entered the stream once
/// and was delivered once. Returns what each instance delivered.
fn exactly_once(sidecars: &[Sidecar], queue: Queue, unique: u64) -> Result<Vec<f64>> {
    let started = Instant::now();
    loop {
        let mut forwarded = Vec::with_capacity(sidecars.len());
        let mut admitted = 0.0;
        for s in sidecars {
            let m = s.metrics()?;
            let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
            forwarded.push(get("subtocall_events_forwarded_total"));
            admitted += get("subtocall_queue_admitted_total");
        }
        let delivered: f64 = forwarded.iter().sum();
        let unique = unique as f64;
        if delivered > unique || (queue.is_redis() && admitted > unique) {
            bail!(
                "{delivered} deliveries and {admitted} admissions for {unique} events: \
                 not exactly once"
            );
        }
        if delivered == unique && (queue == Queue::Memory || admitted == unique) {
            return Ok(forwarded);
        }
        if started.elapsed() > Duration::from_secs(5) {
            bail!(
                "{delivered} deliveries and {admitted} admissions for {unique} events \
                 after 5 s"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Instructions per event of one instance on `queue` (MessagePack), counted
/// by callgrind: a run of `small` events and one of `large`, the difference
/// divided by theirs, so that start-up, discovery and shutdown cancel out.
pub fn instructions(
    ctx: &Ctx,
    binary: &Path,
    queue: Queue,
    redis: &RedisServer,
    (small, large): (u64, u64),
) -> Result<f64> {
    let mut extra = vec![("SUBTOCALL_QUEUE", queue.env().to_owned())];
    // The WAIT case on a master and replica of their own (`waited`).
    let waited = match queue {
        Queue::RedisWait => {
            extra.push(("SUBTOCALL_REDIS_WAIT_REPLICAS", "1".to_owned()));
            Some(waited(ctx)?)
        }
        Queue::RedisRetained => {
            extra.push(("SUBTOCALL_RETENTION", RETENTION.to_owned()));
            None
        }
        _ => None,
    };
    let redis = waited.as_ref().map_or(redis, |(master, _)| master);
    if queue.is_redis() {
        extra.push(("REDIS_URL", redis.url()));
        extra.push(("SUBTOCALL_QUEUE_NAME", QUEUE_NAME.to_owned()));
    }
    let total = |events| {
        crate::resp::Conn::connect(redis.port)?.command(&["FLUSHALL"])?;
        crate::ceiling::callgrind_total(ctx, binary, Serializer::MsgPack, events, &extra)
    };
    let a = total(small)?;
    let b = total(large)?;
    Ok(b.saturating_sub(a) as f64 / (large - small) as f64)
}

/// Part 4c (`--only queue-paced`, never in a full run): the memory queue
/// and the Redis queue (one instance, a private redis-server) at the
/// moderate rate from the loopback peer, without the router, alternating
/// (and alternating with the baseline build, if any): subtocall's CPU per
/// event and redis-server's, medians per build. With
/// `BENCH_QUEUE_CALLGRIND=N`, first subtocall's instructions per event at
/// 200 events/s (callgrind, N and 5N events). Each Redis run also logs what
/// redis-server ran per event (`INFO commandstats`).
///
/// The Redis queue is measured twice: over TCP (the figure the targets
/// are about) and over the same server's Unix socket. On loopback the
/// sender of a TCP segment runs the receiver's side of the stack too (and
/// wakes it), which a Redis on another host would run there; the Unix
/// socket shows how much of the Redis queue's CPU per event that is.
pub fn paced_loopback(ctx: &Ctx, log: &dyn Fn(&str)) -> Result<()> {
    let socket = ctx.work.join("redis-4c.sock");
    let socket_arg = socket.to_string_lossy().into_owned();
    let server = RedisServer::start_with(
        &ctx.work,
        "redis-4c",
        &["--unixsocket", &socket_arg, "--unixsocketperm", "700"],
    )?;
    let redis_at = |url: String| {
        vec![
            ("SUBTOCALL_QUEUE", "redis".to_owned()),
            ("REDIS_URL", url),
            ("SUBTOCALL_QUEUE_NAME", QUEUE_NAME.to_owned()),
        ]
    };
    let redis_env = redis_at(server.url());
    let unix_env = redis_at(format!("unix://{socket_arg}"));
    let memory_env = vec![("SUBTOCALL_QUEUE", "memory".to_owned())];
    let flush = || crate::resp::Conn::connect(server.port)?.command(&["FLUSHALL"]);
    if let Some(n) = std::env::var("BENCH_QUEUE_CALLGRIND")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        for (name, env) in [("memory", &memory_env), ("redis", &redis_env)] {
            let total = |events| -> Result<u64> {
                flush()?;
                crate::ceiling::callgrind_total_at(
                    ctx,
                    &ctx.subtocall,
                    Serializer::MsgPack,
                    events,
                    env,
                    Some(200.0),
                )
            };
            let a = total(n)?;
            let b = total(5 * n)?;
            let per = b.saturating_sub(a) as f64 / (4 * n) as f64;
            log(&format!(
                "  {name}: {per:.0} instructions per event at 200/s"
            ));
        }
    }
    // (build, queue) -> subtocall's and redis-server's CPU per event, ns.
    let mut runs: BTreeMap<(String, &str), Vec<(f64, f64)>> = BTreeMap::new();
    for i in 0..ctx.repeats {
        for (name, env) in [
            ("memory", &memory_env),
            ("redis", &redis_env),
            ("unix", &unix_env),
        ] {
            for (build, binary) in ctx.builds(i) {
                flush()?;
                let stats0 = crate::router::command_stats(server.port);
                let (cpu, redis) = crate::ceiling::paced_with(
                    ctx,
                    binary,
                    Serializer::MsgPack,
                    ctx.rate,
                    ctx.paced.as_secs_f64(),
                    env,
                    Some(server.proc.pid()),
                )?;
                log(&format!(
                    "  {:>8} {name:>6} #{}: subtocall {:.1} us/ev, redis-server {:.1} us/ev",
                    build.label(),
                    i + 1,
                    cpu / 1e3,
                    redis / 1e3
                ));
                if name != "memory" {
                    let stats1 = crate::router::command_stats(server.port);
                    log(&format!(
                        "  {:>8} {name:>6} #{}: per event appended: {}",
                        "",
                        i + 1,
                        appended_stats(&stats0, &stats1)
                    ));
                }
                runs.entry((build.label().to_owned(), name))
                    .or_default()
                    .push((cpu, redis));
            }
        }
    }
    let builds: Vec<String> = runs.keys().map(|(b, _)| b.clone()).collect();
    for build in builds.iter().collect::<std::collections::BTreeSet<_>>() {
        let of = |queue: &str, pick: fn(&(f64, f64)) -> f64| {
            crate::report::Spread::of(runs[&(build.clone(), queue)].iter().map(pick)).median
        };
        let (memory, redis) = (of("memory", |r| r.0), of("redis", |r| r.0));
        let unix = of("unix", |r| r.0);
        log(&format!(
            "  {build:>8} medians: memory queue {:.1} us, Redis queue {:.1} us ({:.2}x), redis-server {:.1} us; \
             over the Unix socket {:.1} us ({:.2}x), redis-server {:.1} us",
            memory / 1e3,
            redis / 1e3,
            redis / memory,
            of("redis", |r| r.1) / 1e3,
            unix / 1e3,
            unix / memory,
            of("unix", |r| r.1) / 1e3
        ));
    }
    Ok(())
}

/// Part 4d (`--only queue-ceiling`, never in a full run): the Redis
/// queue's ceiling with one instance against the loopback peer (as in part
/// 4), the current build alternating with the baseline build (if any) on
/// the same private redis-server: events/s, subtocall's and redis-server's
/// CPU per event, medians per build. With `--baseline` set to the build an
/// absolute target was measured on, this reads the target on this machine
/// as a ratio to that build.
pub fn ceiling_builds(ctx: &Ctx, log: &dyn Fn(&str)) -> Result<()> {
    let server = RedisServer::start_with(&ctx.work, "redis-4d", &[])?;
    // (build) -> (events/s, subtocall ns/event, redis-server ns/event).
    let mut runs: BTreeMap<&str, Vec<(f64, f64, f64)>> = BTreeMap::new();
    for i in 0..ctx.repeats {
        for (build, binary) in ctx.builds(i) {
            let stats0 = crate::router::command_stats(server.port);
            let r = run_once(ctx, binary, Queue::Redis, 1, Some(&server))?;
            let stats1 = crate::router::command_stats(server.port);
            log(&format!(
                "  {:>8} #{}: {:>7.0} ev/s, subtocall {:.2} us/ev, redis-server {:.2} us/ev",
                build.label(),
                i + 1,
                r.events_per_s,
                r.sidecar_cpu_ns / 1e3,
                r.redis_cpu_ns / 1e3
            ));
            log(&format!(
                "  {:>8} #{}: per event appended: {}",
                "",
                i + 1,
                appended_stats(&stats0, &stats1)
            ));
            runs.entry(build.label()).or_default().push((
                r.events_per_s,
                r.sidecar_cpu_ns,
                r.redis_cpu_ns,
            ));
        }
    }
    let of = |build: &str, pick: fn(&(f64, f64, f64)) -> f64| {
        runs.get(build)
            .map(|v| crate::report::Spread::of(v.iter().map(pick)).median)
    };
    for build in runs.keys() {
        let (Some(rate), Some(cpu), Some(redis)) =
            (of(build, |r| r.0), of(build, |r| r.1), of(build, |r| r.2))
        else {
            continue;
        };
        log(&format!(
            "  {build:>8} medians: {rate:.0} ev/s, subtocall {:.2} us/ev, redis-server {:.2} us/ev",
            cpu / 1e3,
            redis / 1e3
        ));
    }
    if let (Some(current), Some(baseline)) = (of("current", |r| r.0), of("baseline", |r| r.0)) {
        log(&format!(
            "  ceiling, current / baseline: {:.2}x",
            current / baseline
        ));
    }
    Ok(())
}

/// What redis-server ran between two `INFO commandstats`, per event
/// appended (every XADD appends one, a script's too), over a whole run.
fn appended_stats(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
) -> String {
    let xadds = |m: &BTreeMap<String, (u64, u64)>| m.get("xadd").map_or(0, |s| s.0);
    match xadds(after).saturating_sub(xadds(before)) {
        0 => "nothing appended".to_owned(),
        n => crate::router::per_event(before, after, n),
    }
}
