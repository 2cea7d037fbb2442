//! Part 1, the sidecar ceiling: subtocall against the loopback peer, which
//! pushes events as fast as subtocall forwards them. Measures sustained
//! events/s, subtocall's CPU per event, its idle and peak RSS, and the
//! peer's own CPU per event (to show the peer is not the bottleneck); and,
//! under callgrind, instructions per event over fixed event counts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use subtocall::wamp::Serializer;

use crate::Ctx;
use crate::peer::{Peer, PeerConfig};
use crate::procfs::Sample;
use crate::procs::{RedisServer, Sidecar, SidecarSpec};

/// Events outstanding at most: well below subtocall's queue capacity
/// (10,000; and the baseline build's incoming channel of 4096), so nothing
/// is ever dead-lettered, and far above its in-flight limit (256), so it
/// always has work queued.
pub const WINDOW: u64 = 2048;

#[derive(Debug, Clone, Default)]
pub struct CeilingRun {
    pub events_per_s: f64,
    pub sidecar_cpu_ns: f64,
    pub peer_cpu_ns: f64,
    pub idle_rss_kb: u64,
    pub peak_rss_kb: u64,
    /// Redis mode: redis-server's CPU per event.
    pub redis_cpu_ns: f64,
}

pub fn serializer_env(serializer: Serializer) -> &'static str {
    match serializer {
        Serializer::MsgPack => "msgpack",
        Serializer::Json => "json",
    }
}

pub fn sidecar_env(peer: &Peer, serializer: Serializer) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("WAMP_URL".into(), peer.url());
    env.insert("CROSSBAR_REALM".into(), "realm1".into());
    env.insert(
        "SUBTOCALL_SERIALIZER".into(),
        serializer_env(serializer).into(),
    );
    env
}

pub fn wait_subscribed(peer: &Peer, sidecar: &mut Sidecar, limit: Duration) -> Result<()> {
    let started = Instant::now();
    while !peer.stats.subscribed.load(Ordering::Relaxed) {
        sidecar.proc.check_alive()?;
        if let Some(e) = peer.error() {
            bail!("loopback peer: {e}");
        }
        if started.elapsed() > limit {
            bail!("subtocall did not subscribe within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// What Redis mode pushes onto (`SUBTOCALL_REDIS_TARGET`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    List,
    Stream,
}

/// One timed run of the subtocall `binary` in WAMP mode (`redis: None`) or
/// Redis mode onto lists or streams.
pub fn run_once(
    ctx: &Ctx,
    binary: &Path,
    serializer: Serializer,
    redis: Option<(&RedisServer, Target)>,
    keys: Option<u64>,
) -> Result<CeilingRun> {
    let target = redis.map(|(_, t)| t);
    let redis = redis.map(|(r, _)| r);
    let external = redis.map(|_| Arc::new(AtomicU64::new(0)));
    let peer = Peer::start(PeerConfig {
        serializer,
        window: WINDOW,
        limit: None,
        external_completions: external.clone(),
        rate: None,
        keys,
    })?;
    let mut env = sidecar_env(&peer, serializer);
    if keys.is_some() {
        env.insert("SUBTOCALL_ORDER_BY".into(), "kwarg:seq".into());
    }
    let key = format!("queue:{}", crate::peer::PROCEDURE);
    if let Some(r) = redis {
        env.insert("USE_REDIS_MQ".into(), "1".into());
        env.insert("REDIS_URL".into(), r.url());
        if target == Some(Target::Stream) {
            env.insert("SUBTOCALL_REDIS_TARGET".into(), "stream".into());
            // Nothing reads the stream here: no bound on what it holds.
            env.insert("SUBTOCALL_REDIS_MAX_BACKLOG".into(), "1000000000".into());
        }
        crate::resp::Conn::connect(r.port)?.command(&["DEL", &key])?;
    }
    let mut sidecar = Sidecar::start(SidecarSpec {
        binary,
        env,
        callgrind_out: None,
        log: ctx.work.join("subtocall-ceiling.log"),
    })?;
    wait_subscribed(&peer, &mut sidecar, Duration::from_secs(15))?;
    // Joined, one subscription, nothing forwarded yet.
    std::thread::sleep(Duration::from_millis(300));
    let idle_rss_kb = sidecar.rss_kb();

    // Redis mode: the list's (or stream's) length is the completion count.
    let poller = match (redis, &external) {
        (Some(r), Some(done)) => {
            let len = match target {
                Some(Target::Stream) => "XLEN",
                _ => "LLEN",
            };
            Some(LlenPoller::start(r.port, len, key.clone(), done.clone())?)
        }
        _ => None,
    };
    let count = || match &external {
        Some(done) => done.load(Ordering::Relaxed),
        None => peer.stats.answered.load(Ordering::Relaxed),
    };
    let redis_cpu = || {
        redis
            .map(|r| crate::procfs::cpu_ns(r.proc.pid()))
            .unwrap_or(0)
    };

    peer.stats.go.store(true, Ordering::Relaxed);
    std::thread::sleep(ctx.warmup);
    let s0 = Sample {
        at: Instant::now(),
        cpu_ns: sidecar.cpu_ns(),
        count: count(),
    };
    let p0 = peer.cpu_ns();
    let r0 = redis_cpu();
    std::thread::sleep(ctx.measure);
    let s1 = Sample {
        at: Instant::now(),
        cpu_ns: sidecar.cpu_ns(),
        count: count(),
    };
    let p1 = peer.cpu_ns();
    let r1 = redis_cpu();
    let peak_rss_kb = sidecar.peak_rss_kb();
    peer.stats.stop.store(true, Ordering::Relaxed);
    if let Some(e) = peer.error() {
        bail!("loopback peer: {e}");
    }
    // Everything sent must arrive.
    let started = Instant::now();
    while count() < peer.stats.sent.load(Ordering::Relaxed) {
        if started.elapsed() > Duration::from_secs(10) {
            bail!(
                "only {} of {} events arrived",
                count(),
                peer.stats.sent.load(Ordering::Relaxed)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(poller);
    if redis.is_none() && !peer.stats.payload_checked.load(Ordering::Relaxed) {
        bail!("no forwarded CALL was checked against the published payload");
    }
    sidecar.check_nothing_lost()?;
    sidecar.proc.stop(Duration::from_secs(10));
    let events = s1.count - s0.count;
    Ok(CeilingRun {
        events_per_s: s1.rate_since(&s0),
        sidecar_cpu_ns: s1.cpu_per_event_ns(&s0),
        peer_cpu_ns: (p1 - p0) as f64 / (events.max(1)) as f64,
        idle_rss_kb,
        peak_rss_kb,
        redis_cpu_ns: (r1 - r0) as f64 / (events.max(1)) as f64,
    })
}

/// Polls LLEN (or XLEN) every millisecond into `done` until dropped.
struct LlenPoller {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LlenPoller {
    fn start(
        port: u16,
        len: &'static str,
        key: String,
        done: Arc<AtomicU64>,
    ) -> Result<LlenPoller> {
        let mut conn = crate::resp::Conn::connect(port)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                if let Ok(n) = conn.command(&[len, &key]) {
                    done.store(n.max(0) as u64, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Ok(LlenPoller {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for LlenPoller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Instructions executed by the subtocall `binary` for `events` events, start
/// to exit, counted by callgrind; `extra` variables for subtocall (part 4:
/// the queue).
pub fn callgrind_total(
    ctx: &Ctx,
    binary: &Path,
    serializer: Serializer,
    events: u64,
    extra: &[(&str, String)],
) -> Result<u64> {
    callgrind_total_at(ctx, binary, serializer, events, extra, None)
}

/// [`callgrind_total`] with the events sent at `rate` per second (else as
/// fast as they are taken).
pub fn callgrind_total_at(
    ctx: &Ctx,
    binary: &Path,
    serializer: Serializer,
    events: u64,
    extra: &[(&str, String)],
    rate: Option<f64>,
) -> Result<u64> {
    let peer = Peer::start(PeerConfig {
        serializer,
        window: WINDOW,
        limit: Some(events),
        external_completions: None,
        rate,
        keys: None,
    })?;
    let out: PathBuf = ctx.work.join(format!(
        "callgrind.{}.{events}.{}",
        serializer_env(serializer),
        extra.len()
    ));
    let mut env = sidecar_env(&peer, serializer);
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    let mut sidecar = Sidecar::start(SidecarSpec {
        binary,
        env,
        callgrind_out: Some(out.clone()),
        log: ctx.work.join("subtocall-callgrind.log"),
    })?;
    wait_subscribed(&peer, &mut sidecar, Duration::from_secs(120))?;
    peer.stats.go.store(true, Ordering::Relaxed);
    let started = Instant::now();
    while peer.stats.answered.load(Ordering::Relaxed) < events {
        sidecar.proc.check_alive()?;
        if let Some(e) = peer.error() {
            bail!("loopback peer: {e}");
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("callgrind run did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    sidecar.proc.signal(libc::SIGTERM);
    sidecar.proc.wait(Duration::from_secs(120))?;
    let text = std::fs::read_to_string(&out)
        .with_context(|| format!("read callgrind output {}", out.display()))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no totals in callgrind output")
}

/// The CPU per event of the subtocall `binary` at a fixed, moderate rate from
/// the loopback peer: the cost of an event that arrives alone (no batching),
/// without the router in the picture.
pub fn paced_once(
    ctx: &Ctx,
    binary: &Path,
    serializer: Serializer,
    rate: f64,
    secs: f64,
) -> Result<f64> {
    paced_with(ctx, binary, serializer, rate, secs, &[], None).map(|(s, _)| s)
}

/// `paced_once` with `extra` variables for subtocall; also the CPU per
/// event of `other` (a redis-server's pid) over the same interval.
pub fn paced_with(
    ctx: &Ctx,
    binary: &Path,
    serializer: Serializer,
    rate: f64,
    secs: f64,
    extra: &[(&str, String)],
    other: Option<u32>,
) -> Result<(f64, f64)> {
    let peer = Peer::start(PeerConfig {
        serializer,
        window: WINDOW,
        limit: None,
        external_completions: None,
        rate: Some(rate),
        keys: None,
    })?;
    let mut env = sidecar_env(&peer, serializer);
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    let mut sidecar = Sidecar::start(SidecarSpec {
        binary,
        env,
        callgrind_out: None,
        log: ctx.work.join("subtocall-paced.log"),
    })?;
    wait_subscribed(&peer, &mut sidecar, Duration::from_secs(15))?;
    peer.stats.go.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    let count = || peer.stats.answered.load(Ordering::Relaxed);
    let other_cpu = || other.map_or(0, crate::procfs::cpu_ns);
    let o0 = other_cpu();
    let s0 = Sample {
        at: Instant::now(),
        cpu_ns: sidecar.cpu_ns(),
        count: count(),
    };
    std::thread::sleep(Duration::from_secs_f64(secs));
    let s1 = Sample {
        at: Instant::now(),
        cpu_ns: sidecar.cpu_ns(),
        count: count(),
    };
    let o1 = other_cpu();
    peer.stats.stop.store(true, Ordering::Relaxed);
    if let Some(e) = peer.error() {
        bail!("loopback peer: {e}");
    }
    sidecar.check_nothing_lost()?;
    sidecar.proc.stop(Duration::from_secs(10));
    let events = s1.count.saturating_sub(s0.count).max(1) as f64;
    Ok((s1.cpu_per_event_ns(&s0), (o1 - o0) as f64 / events))
}
