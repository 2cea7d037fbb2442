//! Part 2, through the real Crossbar: publishers -> Crossbar -> subtocall ->
//! Crossbar -> two roundrobin backends, beside two baselines on the same
//! router in the same run: the backends subscribing to the topic directly
//! (plain pub/sub: each of them receives every event), and the publishers
//! calling the SUB_ procedure directly (the router's own cost of the work
//! subtocall asks of it). Publishers and backends are Rust clients (this
//! crate's own WAMP client) in this process, so that they cost little.
//!
//! Two more paths measure batch calls: a plain subscriber (one backend
//! subscribes to a topic: the router's cost of the pub/sub hop alone, which
//! no forwarder can go below), and a second sidecar (the current build)
//! serving a `SUBBATCH_` procedure with [`BATCH_LINGER`].
//!
//! For each path: the maximum sustained rate (a closed loop: at most
//! `WINDOW` events between publish and backend), latency from publish to
//! backend at a fixed moderate rate (each event carries its send time,
//! CLOCK_MONOTONIC in ns, as its first argument), and the CPU time Crossbar
//! (controller + router worker) and subtocall spent per event.
//!
//! With a baseline build, a second subtocall (that build) is joined to the
//! same router the whole time, serving its own SUB_ procedure (each sidecar
//! has a `SUBTOCALL_REGISTRATION_FILTER` for its own), and its path takes its
//! turn among the others at the moderate rate. With the Redis queue (part 4),
//! likewise a third: the current build with `SUBTOCALL_QUEUE=redis` on a
//! private redis-server. `--only queue` runs only those two paths at the
//! moderate rate ([`Plan::full`] false).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use subtocall::wamp::{Client, ClientConfig, Dict, Incoming, Payload, Serializer, Value};
use tokio::sync::Notify;

use crate::Ctx;
use crate::crossbar::{Crossbar, SIDECAR_USER};
use crate::procs::{RedisServer, Sidecar, SidecarSpec};

const PROCEDURE: &str = "bench.SUB_ev";
const TOPIC: &str = "bench.ev";
/// What the baseline build serves, so that both sidecars can stay joined.
const BASELINE_PROCEDURE: &str = "bench.SUB_before";
const BASELINE_TOPIC: &str = "bench.before";
/// What the sidecar on the Redis queue serves.
const QUEUED_PROCEDURE: &str = "bench.SUB_queued";
const QUEUED_TOPIC: &str = "bench.queued";
/// What the sidecar on the Redis queue with a replica and WAIT serves.
const WAITED_PROCEDURE: &str = "bench.SUB_waited";
const WAITED_TOPIC: &str = "bench.waited";
const PLAIN_TOPIC: &str = "bench.plain";
/// What one backend alone subscribes to (the pub/sub hop).
const HOP_TOPIC: &str = "bench.hop";
/// What the batching sidecar serves.
const BATCHED_PROCEDURE: &str = "bench.SUBBATCH_batched";
const BATCHED_TOPIC: &str = "bench.batched";
/// The batching sidecar's `SUBTOCALL_BATCH_LINGER`: at the moderate rate,
/// about this many milliseconds' events go in one call.
pub const BATCH_LINGER: &str = "20ms";
/// Events between publish and backend at most, in the saturation runs.
pub const WINDOW: u64 = 200;
const PUBLISHERS: usize = 2;
const BACKENDS: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Path {
    /// Backends subscribe to the topic; each receives every event.
    DirectSubscribe,
    /// One backend subscribes to the topic: the pub/sub hop alone.
    PubSubHop,
    /// Publishers call the SUB_ procedure; roundrobin picks a backend.
    DirectCall,
    /// Publishers publish; subtocall calls the SUB_ procedure.
    Sidecar,
    /// Publishers publish; a second subtocall calls a SUBBATCH_ procedure
    /// with many events a call.
    Batched,
    /// As `Sidecar`, through the baseline build (its own topic and SUB_
    /// procedure). Not in `ALL`: measured only at the moderate rate, and
    /// only when there is a baseline build.
    BaselineSidecar,
    /// As `Sidecar`, the current build with `SUBTOCALL_QUEUE=redis` (its own
    /// topic and SUB_ procedure). Not in `ALL`: measured only at the
    /// moderate rate, and only with part 4.
    RedisQueue,
    /// As `RedisQueue`, on a redis-server of its own with a replica and
    /// `SUBTOCALL_REDIS_WAIT_REPLICAS=1`. Measured with `RedisQueue`.
    RedisWait,
}

impl Path {
    /// The paths of the router tables.
    pub const ALL: [Path; 5] = [
        Path::DirectSubscribe,
        Path::PubSubHop,
        Path::DirectCall,
        Path::Sidecar,
        Path::Batched,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Path::DirectSubscribe => "baseline: backends subscribe directly",
            Path::PubSubHop => "baseline: one backend subscribes (the pub/sub hop alone)",
            Path::DirectCall => "baseline: publishers call SUB_ directly",
            Path::Sidecar => "through subtocall",
            Path::Batched => "through subtocall, batch calls (`SUBBATCH_`)",
            Path::BaselineSidecar => "through the baseline build of subtocall",
            Path::RedisQueue => "through subtocall, `SUBTOCALL_QUEUE=redis`",
            Path::RedisWait => {
                "through subtocall, `SUBTOCALL_QUEUE=redis`, a replica and \
                 `SUBTOCALL_REDIS_WAIT_REPLICAS=1`"
            }
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Path::DirectSubscribe => "direct subscribe",
            Path::PubSubHop => "pub/sub hop",
            Path::DirectCall => "direct call",
            Path::Sidecar => "subtocall",
            Path::Batched => "subtocall, batches",
            Path::BaselineSidecar => "baseline build",
            Path::RedisQueue => "subtocall, Redis queue",
            Path::RedisWait => "subtocall, Redis queue + WAIT",
        }
    }

    /// Receptions per published event.
    fn fanout(self) -> u64 {
        match self {
            Path::DirectSubscribe => BACKENDS as u64,
            _ => 1,
        }
    }
}

/// One measurement of one path.
#[derive(Debug, Clone, Default)]
pub struct RouterRun {
    pub events_per_s: f64,
    pub crossbar_cpu_ns: f64,
    pub sidecar_cpu_ns: f64,
    /// redis-server's, on the Redis-queue path (else 0).
    pub redis_cpu_ns: f64,
    /// Publish -> backend, ns (paced runs only).
    pub latencies: Vec<u64>,
    /// redis-server's commands per event on the Redis-queue path (paced
    /// runs only; a diagnostic for the log).
    pub commands: String,
}

/// Everything part 2 measured.
#[derive(Debug, Default)]
pub struct RouterResults {
    pub saturated: BTreeMap<Path, Vec<RouterRun>>,
    pub paced: BTreeMap<Path, Vec<RouterRun>>,
    pub rate: f64,
    pub paced_secs: f64,
    pub sidecar_peak_rss_kb: u64,
    /// The baseline build's, when there is one.
    pub baseline_peak_rss_kb: Option<u64>,
    /// The Redis-queue sidecar's, when there is one.
    pub queued_peak_rss_kb: Option<u64>,
    /// The batching sidecar's calls per event over the whole part.
    pub batch_calls_per_event: Option<f64>,
}

/// What to run through Crossbar.
pub struct Plan<'a> {
    /// Part 2 in full: every path, saturated and at the moderate rate. Else
    /// only the two queues' paths at the moderate rate.
    pub full: bool,
    /// The server of the Redis-queue path, if it is measured.
    pub redis: Option<&'a RedisServer>,
}

/// CLOCK_MONOTONIC in nanoseconds: the stamp every event carries.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn payload(seq: u64) -> Payload {
    Payload::new(
        vec![
            Value::UInt(now_ns()),
            Value::UInt(seq),
            "status".into(),
            Value::Dict(
                Dict::new()
                    .with("id", 42u64)
                    .with("ok", true)
                    .with("load", 0.25),
            ),
        ],
        Dict::new().with("source", "bench"),
    )
}

/// What the backends saw.
#[derive(Default)]
struct Recorder {
    received: AtomicU64,
    recording: AtomicBool,
    samples: Mutex<Vec<u64>>,
    progress: Notify,
}

impl Recorder {
    /// An event, or a batch call's events (each a dict whose `args` start
    /// with the send time).
    fn on_receive(&self, payload: &Payload) {
        let now = now_ns();
        let batch: Vec<&[Value]> = payload
            .args
            .iter()
            .filter_map(|a| match a {
                Value::Dict(d) => match d.get("args") {
                    Some(Value::List(args)) => Some(args.as_slice()),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        let events = if batch.is_empty() {
            vec![payload.args.as_slice()]
        } else {
            batch
        };
        if self.recording.load(Ordering::Relaxed)
            && let Ok(mut s) = self.samples.lock()
        {
            for args in &events {
                if let Some(sent) = args.first().and_then(Value::as_u64) {
                    s.push(now.saturating_sub(sent));
                }
            }
        }
        self.received
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        self.progress.notify_one();
    }
}

fn client_config(url: &str) -> ClientConfig {
    let mut c = ClientConfig::new(url, "realm1");
    c.serializers = vec![Serializer::MsgPack];
    c
}

/// A backend; the first one (`hop`) also subscribes to the pub/sub hop's
/// topic.
async fn start_backend(url: &str, rec: Arc<Recorder>, hop: bool) -> Result<Client> {
    let (client, mut incoming) = Client::connect(client_config(url)).await?;
    for procedure in [
        PROCEDURE,
        BASELINE_PROCEDURE,
        QUEUED_PROCEDURE,
        WAITED_PROCEDURE,
        BATCHED_PROCEDURE,
    ] {
        client
            .register(procedure, Dict::new().with("invoke", "roundrobin"))
            .await
            .with_context(|| format!("register {procedure}"))?;
    }
    client.subscribe(PLAIN_TOPIC, Dict::new()).await?;
    if hop {
        client.subscribe(HOP_TOPIC, Dict::new()).await?;
    }
    let c = client.clone();
    tokio::spawn(async move {
        while let Some(inc) = incoming.recv().await {
            match inc {
                Incoming::Invocation(inv) => {
                    rec.on_receive(&inv.payload);
                    let _ = c.yield_result(inv.request, Payload::default()).await;
                }
                Incoming::Event(ev) => rec.on_receive(&ev.payload),
                _ => {}
            }
        }
    });
    Ok(client)
}

/// Sends one event along `path`. Calls run concurrently: their result is not
/// awaited here (the backend's receipt is what counts).
async fn send(client: &Client, path: Path, seq: u64, errors: &Arc<AtomicU64>) {
    let result = match path {
        Path::Sidecar => client
            .publish(TOPIC, payload(seq), Dict::new())
            .await
            .map(drop),
        Path::BaselineSidecar => client
            .publish(BASELINE_TOPIC, payload(seq), Dict::new())
            .await
            .map(drop),
        Path::RedisQueue => client
            .publish(QUEUED_TOPIC, payload(seq), Dict::new())
            .await
            .map(drop),
        Path::RedisWait => client
            .publish(WAITED_TOPIC, payload(seq), Dict::new())
            .await
            .map(drop),
        Path::DirectSubscribe => client
            .publish(PLAIN_TOPIC, payload(seq), Dict::new())
            .await
            .map(drop),
        Path::PubSubHop => client
            .publish(HOP_TOPIC, payload(seq), Dict::new())
            .await
            .map(drop),
        Path::Batched => client
            .publish(BATCHED_TOPIC, payload(seq), Dict::new())
            .await
            .map(drop),
        Path::DirectCall => {
            let c = client.clone();
            let errors = errors.clone();
            tokio::spawn(async move {
                if c.call(PROCEDURE, payload(seq), Dict::new(), None)
                    .await
                    .is_err()
                {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            });
            Ok(())
        }
    };
    if result.is_err() {
        errors.fetch_add(1, Ordering::Relaxed);
    }
}

struct Bench {
    crossbar: Crossbar,
    sidecar: Sidecar,
    /// The baseline build, serving `BASELINE_PROCEDURE`.
    baseline: Option<Sidecar>,
    /// The current build on the Redis queue, serving `QUEUED_PROCEDURE`,
    /// and its redis-server's pid and port.
    queued: Option<(Sidecar, u32, u16)>,
    /// The same on `Path::RedisWait`, serving `WAITED_PROCEDURE`; its
    /// master and replica.
    waited: Option<(Sidecar, u32, u16)>,
    _waited_redis: Option<(RedisServer, RedisServer)>,
    /// The current build serving `BATCHED_PROCEDURE` (part 2 in full).
    batched: Option<Sidecar>,
    publishers: Vec<Client>,
    _backends: Vec<Client>,
    rec: Arc<Recorder>,
    errors: Arc<AtomicU64>,
    seq: AtomicU64,
}

impl Bench {
    fn completed(&self, path: Path) -> u64 {
        self.rec.received.load(Ordering::Relaxed) / path.fanout()
    }

    /// The sidecar on `path`: the baseline build or the Redis-queue one on
    /// their own paths, else the current one (idle on the paths without a
    /// sidecar).
    fn sidecar(&self, path: Path) -> &Sidecar {
        match (path, &self.baseline, &self.queued, &self.batched) {
            (Path::BaselineSidecar, Some(b), _, _) => b,
            (Path::RedisQueue, _, Some((q, _, _)), _) => q,
            (Path::RedisWait, ..) if self.waited.is_some() => {
                &self.waited.as_ref().expect("checked").0
            }
            (Path::Batched, _, _, Some(b)) => b,
            _ => &self.sidecar,
        }
    }

    fn sample(&self, path: Path) -> (Instant, u64, u64, u64, u64) {
        let redis = match (path, &self.queued, &self.waited) {
            (Path::RedisQueue, Some((_, pid, _)), _) | (Path::RedisWait, _, Some((_, pid, _))) => {
                crate::procfs::cpu_ns(*pid)
            }
            _ => 0,
        };
        (
            Instant::now(),
            self.completed(path),
            self.crossbar.cpu_ns(),
            self.sidecar(path).cpu_ns(),
            redis,
        )
    }

    /// redis-server's `INFO commandstats` on the Redis-queue path: calls
    /// and microseconds by command (empty on the other paths).
    fn command_stats(&self, path: Path) -> BTreeMap<String, (u64, u64)> {
        let port = match (path, &self.queued, &self.waited) {
            (Path::RedisQueue, Some((_, _, port)), _)
            | (Path::RedisWait, _, Some((_, _, port))) => *port,
            _ => return BTreeMap::new(),
        };
        command_stats(port)
    }

    /// Waits until every event sent has reached a backend.
    async fn drain(&self, path: Path, issued: u64, base: u64) -> Result<()> {
        let started = Instant::now();
        while self.completed(path) - base < issued {
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "{}: only {} of {issued} events reached a backend",
                    path.short(),
                    self.completed(path) - base
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// The closed loop: as fast as the path goes with `WINDOW` in flight.
    async fn saturate(&self, ctx: &Ctx, path: Path) -> Result<RouterRun> {
        // A multiple of the fanout, so that completions divide exactly.
        let base = self.completed(path);
        self.rec
            .received
            .store(base * path.fanout(), Ordering::Relaxed);
        let issued = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for p in &self.publishers {
            let (p, issued, stop, rec, errors) = (
                p.clone(),
                issued.clone(),
                stop.clone(),
                self.rec.clone(),
                self.errors.clone(),
            );
            let seq0 = self.seq.fetch_add(1 << 32, Ordering::Relaxed);
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let done = rec.received.load(Ordering::Relaxed) / path.fanout() - base;
                    if issued.load(Ordering::Relaxed) - done >= WINDOW {
                        let _ =
                            tokio::time::timeout(Duration::from_millis(5), rec.progress.notified())
                                .await;
                        continue;
                    }
                    issued.fetch_add(1, Ordering::Relaxed);
                    send(&p, path, seq0 + n, &errors).await;
                    n += 1;
                }
            }));
        }
        tokio::time::sleep(ctx.router_warmup).await;
        let (t0, c0, x0, s0, r0) = self.sample(path);
        tokio::time::sleep(ctx.router_measure).await;
        let (t1, c1, x1, s1, r1) = self.sample(path);
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        self.drain(path, issued.load(Ordering::Relaxed), base)
            .await?;
        let events = (c1 - c0).max(1) as f64;
        Ok(RouterRun {
            events_per_s: (c1 - c0) as f64 / t1.duration_since(t0).as_secs_f64(),
            crossbar_cpu_ns: (x1 - x0) as f64 / events,
            sidecar_cpu_ns: (s1 - s0) as f64 / events,
            redis_cpu_ns: (r1 - r0) as f64 / events,
            latencies: Vec::new(),
            commands: String::new(),
        })
    }

    /// A fixed rate, open loop, for `secs`: latency and CPU per event at
    /// that rate.
    async fn paced(&self, ctx: &Ctx, path: Path, secs: Duration) -> Result<RouterRun> {
        let base = self.completed(path);
        self.rec
            .received
            .store(base * path.fanout(), Ordering::Relaxed);
        if let Ok(mut s) = self.rec.samples.lock() {
            s.clear();
        }
        let total = (ctx.rate * secs.as_secs_f64()) as u64;
        let per_publisher = total / self.publishers.len() as u64;
        let interval = Duration::from_secs_f64(self.publishers.len() as f64 / ctx.rate);
        self.rec.recording.store(true, Ordering::Relaxed);
        let stats0 = self.command_stats(path);
        let (t0, c0, x0, s0, r0) = self.sample(path);
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for (i, p) in self.publishers.iter().enumerate() {
            let (p, errors) = (p.clone(), self.errors.clone());
            let seq0 = self.seq.fetch_add(1 << 32, Ordering::Relaxed);
            // Publishers take turns: together they send evenly at `rate`.
            let offset = interval / self.publishers.len() as u32 * i as u32;
            tasks.push(tokio::spawn(async move {
                for n in 0..per_publisher {
                    tokio::time::sleep_until(start + offset + interval * n as u32).await;
                    send(&p, path, seq0 + n, &errors).await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let issued = per_publisher * self.publishers.len() as u64;
        self.drain(path, issued, base).await?;
        let (t1, c1, x1, s1, r1) = self.sample(path);
        self.rec.recording.store(false, Ordering::Relaxed);
        let commands = per_event(&stats0, &self.command_stats(path), (c1 - c0).max(1));
        let latencies = self
            .rec
            .samples
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        let events = (c1 - c0).max(1) as f64;
        Ok(RouterRun {
            events_per_s: (c1 - c0) as f64 / t1.duration_since(t0).as_secs_f64(),
            crossbar_cpu_ns: (x1 - x0) as f64 / events,
            sidecar_cpu_ns: (s1 - s0) as f64 / events,
            redis_cpu_ns: (r1 - r0) as f64 / events,
            latencies,
            commands,
        })
    }
}

pub fn run(ctx: &Ctx, plan: &Plan<'_>, log: &dyn Fn(&str)) -> Result<RouterResults> {
    let venv = ctx.venv.as_deref().context("no Crossbar virtualenv")?;
    let crossbar = Crossbar::start(venv, &ctx.work)?;
    log(&format!("crossbar is up on {}", crossbar.url()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let url = crossbar.url();
        let rec = Arc::new(Recorder::default());
        let mut backends = Vec::new();
        for i in 0..BACKENDS {
            backends.push(start_backend(&url, rec.clone(), i == 0).await?);
        }
        let mut sidecar = start_sidecar(ctx, &ctx.subtocall, &url, PROCEDURE, "crossbar", &[])?;
        let mut baseline = match (&ctx.baseline, plan.full) {
            (Some(binary), true) => Some(start_sidecar(
                ctx,
                binary,
                &url,
                BASELINE_PROCEDURE,
                "crossbar-baseline",
                &[],
            )?),
            _ => None,
        };
        let mut queued = match plan.redis {
            Some(r) => {
                // A fresh queue: no stream or group left by part 4.
                crate::resp::Conn::connect(r.port)?.command(&["FLUSHALL"])?;
                let env = [
                    ("SUBTOCALL_QUEUE", "redis".to_owned()),
                    ("REDIS_URL", r.url()),
                ];
                let s = start_sidecar(
                    ctx,
                    &ctx.subtocall,
                    &url,
                    QUEUED_PROCEDURE,
                    "crossbar-queued",
                    &env,
                )?;
                Some((s, r.proc.pid(), r.port))
            }
            None => None,
        };
        // The same on a master of its own with a replica, and WAIT.
        let (mut waited, waited_redis) = match plan.redis {
            Some(_) => {
                let master = RedisServer::start_with(&ctx.work, "redis-waited", &[])?;
                let replica = crate::queue::start_replica(ctx, &master)?;
                let env = [
                    ("SUBTOCALL_QUEUE", "redis".to_owned()),
                    ("REDIS_URL", master.url()),
                    ("SUBTOCALL_REDIS_WAIT_REPLICAS", "1".to_owned()),
                ];
                let s = start_sidecar(
                    ctx,
                    &ctx.subtocall,
                    &url,
                    WAITED_PROCEDURE,
                    "crossbar-waited",
                    &env,
                )?;
                let (pid, port) = (master.proc.pid(), master.port);
                (Some((s, pid, port)), Some((master, replica)))
            }
            None => (None, None),
        };
        let mut batched = match plan.full {
            true => Some(start_sidecar(
                ctx,
                &ctx.subtocall,
                &url,
                BATCHED_PROCEDURE,
                "crossbar-batched",
                &[("SUBTOCALL_BATCH_LINGER", BATCH_LINGER.to_owned())],
            )?),
            false => None,
        };
        wait_subscribed(&mut sidecar, TOPIC).await?;
        if let Some(b) = batched.as_mut() {
            wait_subscribed(b, BATCHED_TOPIC).await?;
        }
        if let Some(b) = baseline.as_mut() {
            wait_subscribed(b, BASELINE_TOPIC).await?;
        }
        if let Some((q, _, _)) = queued.as_mut() {
            wait_subscribed(q, QUEUED_TOPIC).await?;
        }
        if let Some((w, _, _)) = waited.as_mut() {
            wait_subscribed(w, WAITED_TOPIC).await?;
        }
        let mut publishers = Vec::new();
        for _ in 0..PUBLISHERS {
            publishers.push(Client::connect(client_config(&url)).await?.0);
        }
        let bench = Bench {
            crossbar,
            sidecar,
            baseline,
            queued,
            waited,
            _waited_redis: waited_redis,
            batched,
            publishers,
            _backends: backends,
            rec,
            errors: Arc::new(AtomicU64::new(0)),
            seq: AtomicU64::new(0),
        };
        let mut results = RouterResults {
            rate: ctx.rate,
            paced_secs: ctx.paced.as_secs_f64(),
            ..RouterResults::default()
        };
        // Paths alternate within each repetition, so that a disturbance on
        // the shared machine spreads over all of them.
        let saturated = if plan.full { ctx.repeats } else { 0 };
        if !plan.full {
            // No saturation runs to warm the router up first: a short paced
            // run of each path, not recorded.
            let queued = bench.queued.is_some().then_some(Path::RedisQueue);
            let waited = bench.waited.is_some().then_some(Path::RedisWait);
            for path in std::iter::once(Path::Sidecar).chain(queued).chain(waited) {
                bench.paced(ctx, path, Duration::from_secs(2)).await?;
            }
        }
        for rep in 0..saturated {
            for path in Path::ALL {
                let r = bench.saturate(ctx, path).await?;
                log(&format!(
                    "  saturate {:>16} #{}: {:>6.0} ev/s, crossbar {:>6.1} us/ev, subtocall {:>5.1} us/ev",
                    path.short(),
                    rep + 1,
                    r.events_per_s,
                    r.crossbar_cpu_ns / 1e3,
                    r.sidecar_cpu_ns / 1e3
                ));
                results.saturated.entry(path).or_default().push(r);
            }
        }
        for rep in 0..ctx.latency_repeats {
            // The current build's path between the baseline build's and the
            // Redis queue's, next to each: after one and before the other,
            // then the other way round, so that none always runs first.
            let mut around = Vec::new();
            if bench.baseline.is_some() {
                around.push(Path::BaselineSidecar);
            }
            around.push(Path::Sidecar);
            if bench.queued.is_some() {
                around.push(Path::RedisQueue);
            }
            if bench.waited.is_some() {
                around.push(Path::RedisWait);
            }
            if rep % 2 == 1 {
                around.reverse();
            }
            // The batch path next to the pub/sub hop it is compared with.
            let mut paths = if plan.full {
                vec![
                    Path::DirectSubscribe,
                    Path::PubSubHop,
                    Path::Batched,
                    Path::DirectCall,
                ]
            } else {
                Vec::new()
            };
            paths.extend(around);
            for path in paths {
                let r = bench.paced(ctx, path, ctx.paced).await?;
                let mut l = r.latencies.clone();
                l.sort_unstable();
                let redis = if matches!(path, Path::RedisQueue | Path::RedisWait) {
                    format!(
                        ", redis-server {:.1} us/ev ({})",
                        r.redis_cpu_ns / 1e3,
                        r.commands
                    )
                } else {
                    String::new()
                };
                log(&format!(
                    "  {:>4.0}/s   {:>22} #{}: p50 {:>6.2} ms, p99 {:>6.2} ms, crossbar {:>6.1} us/ev, subtocall {:>5.1} us/ev{redis}",
                    ctx.rate,
                    path.short(),
                    rep + 1,
                    crate::report::percentile(&l, 50.0) / 1e6,
                    crate::report::percentile(&l, 99.0) / 1e6,
                    r.crossbar_cpu_ns / 1e3,
                    r.sidecar_cpu_ns / 1e3
                ));
                results.paced.entry(path).or_default().push(r);
            }
        }
        let errors = bench.errors.load(Ordering::Relaxed);
        if errors > 0 {
            bail!("{errors} publishes or calls failed");
        }
        bench.sidecar.check_nothing_lost()?;
        results.sidecar_peak_rss_kb = bench.sidecar.peak_rss_kb();
        if let Some(b) = &bench.baseline {
            b.check_nothing_lost()?;
            results.baseline_peak_rss_kb = Some(b.peak_rss_kb());
        }
        if let Some((q, _, _)) = &bench.queued {
            q.check_nothing_lost()?;
            results.queued_peak_rss_kb = Some(q.peak_rss_kb());
        }
        if let Some((w, _, _)) = &bench.waited {
            w.check_nothing_lost()?;
        }
        if let Some(b) = &bench.batched {
            b.check_nothing_lost()?;
            results.batch_calls_per_event = b
                .metrics()
                .ok()
                .and_then(|m| {
                    let calls = m.get("subtocall_batch_calls_total")?;
                    let events = m.get("subtocall_events_forwarded_total")?;
                    Some(calls / events)
                });
        }
        Ok(results)
    })
}

/// A sidecar joined to the benchmark's router that serves `procedure` only,
/// with `extra` variables.
fn start_sidecar(
    ctx: &Ctx,
    binary: &std::path::Path,
    url: &str,
    procedure: &str,
    log: &str,
    extra: &[(&str, String)],
) -> Result<Sidecar> {
    let mut env: BTreeMap<String, String> = extra
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    env.insert("WAMP_URL".to_owned(), url.to_owned());
    env.insert("CROSSBAR_REALM".into(), "realm1".into());
    env.insert("BACKEND_USERNAME".into(), SIDECAR_USER.0.into());
    env.insert("BACKEND_SECRET".into(), SIDECAR_USER.1.into());
    env.insert("SUBTOCALL_SERIALIZER".into(), "msgpack".into());
    env.insert(
        "SUBTOCALL_REGISTRATION_FILTER".into(),
        format!("^{}$", procedure.replace('.', "\\.")),
    );
    Sidecar::start(SidecarSpec {
        binary,
        env,
        callgrind_out: None,
        log: ctx.work.join(format!("subtocall-{log}.log")),
    })
}

/// Waits until `sidecar` is ready and subscribed to its one topic.
async fn wait_subscribed(sidecar: &mut Sidecar, topic: &str) -> Result<()> {
    let started = Instant::now();
    loop {
        sidecar.proc.check_alive()?;
        if let Ok(m) = sidecar.metrics()
            && m.get("subtocall_ready").copied() == Some(1.0)
            && m.get("subtocall_subscriptions_active").copied() == Some(1.0)
        {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("subtocall did not subscribe to {topic} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// redis-server's `INFO commandstats` on `port`: calls and microseconds by
/// command (empty if it cannot be read).
pub fn command_stats(port: u16) -> BTreeMap<String, (u64, u64)> {
    let text = crate::resp::Conn::connect(port)
        .and_then(|mut c| c.text(&["INFO", "commandstats"]))
        .unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |f: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('=')?.parse().ok())
            };
            Some((name.to_owned(), (field("calls")?, field("usec")?)))
        })
        .collect()
}

/// Commands per event between two `INFO commandstats` (the ones of this
/// measurement, not its own INFO), as `name calls/ev usec/ev`; those
/// called less than once per 100 events and costing less than 0.05 us per
/// event are left out.
pub fn per_event(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    events: u64,
) -> String {
    after
        .iter()
        .filter(|(name, _)| name.as_str() != "info")
        .filter_map(|(name, (calls, usec))| {
            let (c0, u0) = before.get(name).copied().unwrap_or_default();
            let calls = calls.checked_sub(c0)?;
            let usec = usec.saturating_sub(u0);
            if calls * 100 < events && usec * 20 < events {
                return None;
            }
            Some(format!(
                "{name} {:.4}/ev {:.2} us/ev",
                calls as f64 / events as f64,
                usec as f64 / events as f64
            ))
        })
        .collect::<Vec<_>>()
        .join(", ")
}
