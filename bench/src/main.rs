//! The benchmark command (run it through `scripts/bench.sh`): what subtocall
//! costs per event beside the limit (a loopback peer playing the router),
//! beside the real Crossbar router (with two baselines on the same router,
//! in the same run), in Redis mode (beside `redis-benchmark`), and on the
//! Redis queue (`SUBTOCALL_QUEUE=redis`, one and two instances) beside the
//! memory queue; given a second build (`--baseline-subtocall`, the commit
//! before a change), it measures that build beside the current one,
//! alternating with it. Writes the results into `doc/benchmarks.md`
//! between its GENERATED markers and draws the charts into `doc/img/`.
//!
//! Benchmarks are not tests: nothing here asserts a timing. A run fails only
//! when something is broken (an event lost, a payload changed, a process
//! that died).

mod ceiling;
mod crossbar;
mod peer;
mod procfs;
mod procs;
mod queue;
mod report;
mod resp;
mod router;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail};
use subtocall::wamp::Serializer;

/// What every part needs.
pub struct Ctx {
    /// The subtocall binary of the current checkout.
    pub subtocall: PathBuf,
    /// The baseline build measured beside it, if any.
    pub baseline: Option<PathBuf>,
    pub venv: Option<PathBuf>,
    pub work: PathBuf,
    pub warmup: Duration,
    pub measure: Duration,
    pub repeats: usize,
    pub latency_repeats: usize,
    pub router_warmup: Duration,
    pub router_measure: Duration,
    pub rate: f64,
    pub paced: Duration,
}

/// Which subtocall binary a measurement is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Build {
    /// Built from the current checkout.
    Current,
    /// Built from the baseline commit (`--baseline-subtocall`).
    Baseline,
}

impl Build {
    pub fn label(self) -> &'static str {
        match self {
            Build::Current => "current",
            Build::Baseline => "baseline",
        }
    }
}

impl Ctx {
    /// The builds to measure in repetition `i`: the current one alone, or
    /// both, in an order that flips from one repetition to the next, so that
    /// neither always runs first.
    pub fn builds(&self, i: usize) -> Vec<(Build, &std::path::Path)> {
        let mut builds = vec![(Build::Current, self.subtocall.as_path())];
        if let Some(b) = &self.baseline {
            builds.insert(0, (Build::Baseline, b.as_path()));
        }
        if i % 2 == 1 {
            builds.reverse();
        }
        builds
    }
}

const USAGE: &str = "\
Usage: subtocall-bench --subtocall PATH [options]   (normally run by scripts/bench.sh)

  --subtocall PATH      the release subtocall binary to measure
  --baseline-subtocall PATH
                        a second build to measure beside it, alternating with
                        it (ceiling, instructions and CPU per event, CPU per
                        event at the moderate rate through the loopback peer
                        and Crossbar, RSS); the other parts measure --subtocall only
  --baseline-commit REV the commit the baseline build was made from (for the report)
  --repo DIR            repository root (default: current directory)
  --venv DIR            the Crossbar virtualenv (default: scripts/setup-crossbar.sh)
  --only LIST           comma-separated parts: ceiling,paced,callgrind,crossbar,redis,queue,idle,ordering,policy,queue-paced,queue-ceiling
                        (queue: the Redis queue beside the memory queue, against the
                        loopback peer and at the moderate rate through Crossbar, and
                        idle; idle: 1,000 procedures, two idle instances;
                        ordering: the ceiling with SUBTOCALL_ORDER_BY and 1, 100
                        and 10,000 keys beside it without; policy: instructions per
                        event with a policy file of 100 rules beside none;
                        queue-paced, only when named: the memory and Redis queue
                        (over TCP and over a Unix socket) at the moderate rate
                        from the loopback peer, subtocall's
                        and redis-server's CPU per event, and with
                        BENCH_QUEUE_CALLGRIND=N subtocall's instructions per event
                        at 200/s over N and 5N events; no report is written)
                        queue-ceiling, only when named: the Redis queue's ceiling
                        with one instance, the current and the baseline build
                        alternating; no report is written
  --repeats N           runs per figure (default 5)
  --latency-repeats N   runs per path at the moderate rate (default 3)
  --rate N              the moderate rate through Crossbar, events/s (default 500)
  --quick               fewer and shorter runs, to try the command out
  --no-write            print the report instead of writing doc/benchmarks.md
";

fn main() {
    if let Err(e) = run() {
        eprintln!("bench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let started = Instant::now();
    let mut args = std::env::args().skip(1);
    let mut subtocall = None;
    let mut baseline_commit = None;
    let mut venv = None;
    let mut repo = std::env::current_dir()?;
    let mut only: Option<String> = None;
    let mut write = true;
    let mut ctx = Ctx {
        subtocall: PathBuf::new(),
        baseline: None,
        venv: None,
        work: PathBuf::new(),
        warmup: Duration::from_millis(500),
        measure: Duration::from_secs(2),
        repeats: 5,
        latency_repeats: 3,
        router_warmup: Duration::from_secs(1),
        router_measure: Duration::from_secs(4),
        rate: 500.0,
        paced: Duration::from_secs(10),
    };
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--subtocall" => subtocall = Some(PathBuf::from(value("--subtocall")?)),
            "--baseline-subtocall" => {
                ctx.baseline = Some(PathBuf::from(value("--baseline-subtocall")?));
            }
            "--baseline-commit" => baseline_commit = Some(value("--baseline-commit")?),
            "--venv" => venv = Some(PathBuf::from(value("--venv")?)),
            "--repo" => repo = PathBuf::from(value("--repo")?),
            "--only" => only = Some(value("--only")?),
            "--repeats" => ctx.repeats = value("--repeats")?.parse()?,
            "--latency-repeats" => ctx.latency_repeats = value("--latency-repeats")?.parse()?,
            "--rate" => ctx.rate = value("--rate")?.parse()?,
            "--quick" => {
                ctx.repeats = 2;
                ctx.latency_repeats = 1;
                ctx.measure = Duration::from_secs(1);
                ctx.router_measure = Duration::from_secs(2);
                ctx.paced = Duration::from_secs(4);
            }
            "--no-write" => write = false,
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    ctx.subtocall = subtocall.context("--subtocall PATH is required")?;
    for binary in std::iter::once(&ctx.subtocall).chain(&ctx.baseline) {
        if !binary.is_file() {
            bail!("{} is not a file", binary.display());
        }
    }
    let wants = |p: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == p));
    let named = |p: &str| {
        only.as_deref()
            .is_some_and(|o| o.split(',').any(|x| x == p))
    };
    ctx.work = std::env::temp_dir().join(format!("subtocall-bench-{}", std::process::id()));
    std::fs::create_dir_all(&ctx.work)?;
    if wants("crossbar") || wants("queue") {
        ctx.venv = Some(crossbar::find_venv(venv.as_deref(), &repo)?);
    }
    let machine = procfs::machine();
    log(&format!(
        "machine: {} cores, {}, Linux {}, load {}; work dir {}",
        machine.cores,
        machine.model,
        machine.kernel,
        machine.load,
        ctx.work.display()
    ));

    let mut results = report::Results {
        machine,
        date: date_utc(),
        duration_s: 0.0,
        repeats: ctx.repeats,
        current: report::BuildRuns::new(git_commit(&repo)),
        baseline: ctx
            .baseline
            .as_ref()
            .map(|_| report::BuildRuns::new(baseline_commit.unwrap_or_else(|| "baseline".into()))),
        rate: ctx.rate,
        router: None,
        queue: Vec::new(),
        queue_instructions: Vec::new(),
        queue_idle: Vec::new(),
        queue_router: None,
        redis: Vec::new(),
        redis_benchmark: Vec::new(),
        redis_floor_ns: Vec::new(),
        redis_stream: Vec::new(),
        redis_benchmark_xadd: Vec::new(),
        ordering: Vec::new(),
        policy_instructions: Vec::new(),
        envelope_bytes: envelope_bytes(),
        measure_s: ctx.measure.as_secs_f64(),
        router_warmup_s: ctx.router_warmup.as_secs_f64(),
        router_measure_s: ctx.router_measure.as_secs_f64(),
    };

    if wants("ceiling") {
        log("part 1: sidecar ceiling against the loopback peer");
        // Serializers alternate, and so do the builds, so that a disturbance
        // spreads over all of them.
        for i in 0..ctx.repeats {
            for ser in [Serializer::MsgPack, Serializer::Json] {
                for (build, binary) in ctx.builds(i) {
                    let r = ceiling::run_once(&ctx, binary, ser, None, None)?;
                    log(&format!(
                        "  {:>8} {:>7} #{}: {:>7.0} ev/s, subtocall {:.2} us/ev, peer {:.2} us/ev, RSS idle {} kB peak {} kB",
                        build.label(),
                        ceiling::serializer_env(ser),
                        i + 1,
                        r.events_per_s,
                        r.sidecar_cpu_ns / 1e3,
                        r.peer_cpu_ns / 1e3,
                        r.idle_rss_kb,
                        r.peak_rss_kb
                    ));
                    results.runs_mut(build).ceiling_mut(ser).push(r);
                }
            }
        }
    }
    if wants("ordering") {
        log("part 5: per-key ordering (SUBTOCALL_ORDER_BY=kwarg:seq) against the loopback peer");
        for i in 0..ctx.repeats {
            for keys in [None, Some(1), Some(100), Some(10_000)] {
                let r = ceiling::run_once(&ctx, &ctx.subtocall, Serializer::MsgPack, None, keys)?;
                log(&format!(
                    "  keys {:>6} #{}: {:>7.0} ev/s, subtocall {:.2} us/ev, peak RSS {} kB",
                    keys.map_or("none".to_owned(), |k| k.to_string()),
                    i + 1,
                    r.events_per_s,
                    r.sidecar_cpu_ns / 1e3,
                    r.peak_rss_kb
                ));
                results.ordering.push((keys, r));
            }
        }
    }
    if wants("policy") {
        log("part 6: instructions per event with a policy file of 100 rules (callgrind)");
        let file = ctx.work.join("policies-100.toml");
        std::fs::write(&file, policy_file_of_100_rules())?;
        let (small, large) = (5_000, 25_000);
        let per = |extra: &[(&str, String)]| -> anyhow::Result<f64> {
            let a =
                ceiling::callgrind_total(&ctx, &ctx.subtocall, Serializer::MsgPack, small, extra)?;
            let b =
                ceiling::callgrind_total(&ctx, &ctx.subtocall, Serializer::MsgPack, large, extra)?;
            Ok(b.saturating_sub(a) as f64 / (large - small) as f64)
        };
        let none = per(&[])?;
        let rules = per(&[("SUBTOCALL_POLICY_FILE", file.display().to_string())])?;
        // The figure means something only if the rules were in effect: the
        // sidecar (logging warnings only) says each of the 99 that match
        // nothing, and not the last.
        let text = std::fs::read_to_string(ctx.work.join("subtocall-callgrind.log"))?;
        let unmatched = text.matches("matches no registration").count();
        if unmatched != 99 || text.contains(&format!("rule={}", peer::PROCEDURE)) {
            anyhow::bail!("the sidecar under callgrind did not load the 100 rules:\n{text}");
        }
        log(&format!(
            "  no file {none:.0}, 100 rules {rules:.0} instructions per event ({:+.2}%)",
            (rules / none - 1.0) * 100.0
        ));
        results.policy_instructions.push((none, rules));
    }
    if named("queue-paced") {
        log(&format!(
            "part 4c: the memory and Redis queue at {:.0} events/s from the loopback peer",
            ctx.rate
        ));
        queue::paced_loopback(&ctx, &log)?;
    }
    if named("queue-ceiling") {
        log("part 4d: the Redis queue's ceiling, one instance, loopback peer, builds alternating");
        queue::ceiling_builds(&ctx, &log)?;
    }
    // Parts 4c and 4d are for a closer look: named alone (or together),
    // doc/benchmarks.md is left as it is.
    if only.as_deref().is_some_and(|o| {
        o.split(',')
            .all(|x| x == "queue-paced" || x == "queue-ceiling")
    }) {
        leave_work(&ctx);
        return Ok(());
    }
    if wants("paced") {
        log(&format!(
            "part 1c: CPU per event at {:.0} events/s from the loopback peer",
            ctx.rate
        ));
        for i in 0..ctx.latency_repeats {
            for ser in [Serializer::MsgPack, Serializer::Json] {
                for (build, binary) in ctx.builds(i) {
                    let cpu = ceiling::paced_once(
                        &ctx,
                        binary,
                        ser,
                        ctx.rate,
                        ctx.paced.as_secs_f64() / 2.0,
                    )?;
                    log(&format!(
                        "  {:>8} {:>7} #{}: subtocall {:.1} us/ev",
                        build.label(),
                        ceiling::serializer_env(ser),
                        i + 1,
                        cpu / 1e3
                    ));
                    results.runs_mut(build).paced_mut(ser).push(cpu);
                }
            }
        }
    }
    if wants("callgrind") {
        log("part 1b: instructions per event (valgrind --tool=callgrind)");
        let (small, large) = (5_000, 25_000);
        for ser in [Serializer::MsgPack, Serializer::Json] {
            for (build, binary) in ctx.builds(0) {
                let a = ceiling::callgrind_total(&ctx, binary, ser, small, &[])?;
                let b = ceiling::callgrind_total(&ctx, binary, ser, large, &[])?;
                let per = b.saturating_sub(a) as f64 / (large - small) as f64;
                log(&format!(
                    "  {:>8} {:>7}: {a} instructions for {small} events, {b} for {large}: {per:.0} per event",
                    build.label(),
                    ceiling::serializer_env(ser)
                ));
                results.runs_mut(build).callgrind.push((
                    ceiling::serializer_env(ser).into(),
                    small,
                    large,
                    per,
                ));
            }
        }
    }
    // Part 4's redis-server, also serving the Redis-queue path of part 2.
    let queue_redis = if wants("queue") || wants("idle") {
        Some(procs::RedisServer::start_with(
            &ctx.work,
            "redis-queue",
            &[],
        )?)
    } else {
        None
    };
    if wants("crossbar") {
        log("part 2: through the real Crossbar");
        let plan = router::Plan {
            full: true,
            redis: queue_redis.as_ref(),
        };
        results.router = Some(router::run(&ctx, &plan, &log)?);
    }
    if wants("redis") {
        log("part 3: Redis mode");
        let server = procs::RedisServer::start(&ctx.work)?;
        for i in 0..ctx.repeats {
            for target in [ceiling::Target::List, ceiling::Target::Stream] {
                let r = ceiling::run_once(
                    &ctx,
                    &ctx.subtocall,
                    Serializer::MsgPack,
                    Some((&server, target)),
                    None,
                )?;
                log(&format!(
                    "  subtocall {target:?} #{}: {:>7.0} ev/s, subtocall {:.2} us/ev, redis-server {:.2} us/ev",
                    i + 1,
                    r.events_per_s,
                    r.sidecar_cpu_ns / 1e3,
                    r.redis_cpu_ns / 1e3
                ));
                match target {
                    ceiling::Target::List => results.redis.push(r),
                    ceiling::Target::Stream => results.redis_stream.push(r),
                }
            }
            let b = redis_benchmark(&server, results.envelope_bytes, "rpush")?;
            log(&format!(
                "  redis-benchmark #{}: {:>7.0} RPUSH/s, redis-server {:.2} us/op",
                i + 1,
                b.0,
                b.1 / 1e3
            ));
            results.redis_benchmark.push(b);
            let x = redis_benchmark(&server, results.envelope_bytes, "xadd")?;
            log(&format!(
                "  redis-benchmark #{}: {:>7.0} XADD/s, redis-server {:.2} us/op",
                i + 1,
                x.0,
                x.1 / 1e3
            ));
            results.redis_benchmark_xadd.push(x);
        }
        drop(server);
        // A separate instance whose housekeeping runs once a second instead
        // of ten times (`--hz 1`), so that it hardly blurs the figure.
        let quiet = procs::RedisServer::start_with(&ctx.work, "redis-floor", &["--hz", "1"])?;
        for i in 0..ctx.latency_repeats {
            let floor = redis_wakeup_floor(&quiet, ctx.rate, ctx.paced.as_secs_f64() / 4.0)?;
            log(&format!(
                "  redis-server at {:.0} PINGs/s, one at a time #{}: {:.1} us of CPU per request",
                ctx.rate,
                i + 1,
                floor / 1e3
            ));
            results.redis_floor_ns.push(floor);
        }
    }

    if let Some(server) = queue_redis.as_ref().filter(|_| wants("queue")) {
        log("part 4: the Redis queue beside the memory queue, loopback peer");
        for i in 0..ctx.repeats {
            let mut cases = queue::CASES.to_vec();
            if i % 2 == 1 {
                cases.reverse();
            }
            for (q, instances) in cases {
                let r = queue::run_once(&ctx, &ctx.subtocall, q, instances, Some(server))?;
                let share: Vec<String> = r
                    .delivered_share
                    .iter()
                    .map(|s| format!("{:.0}%", s * 100.0))
                    .collect();
                log(&format!(
                    "  {:>12} x{instances} #{}: {:>7.0} ev/s, subtocall {:.2} us/ev, redis-server {:.2} us/ev, peer {:.2} us/ev, delivered {}",
                    q.name(),
                    i + 1,
                    r.events_per_s,
                    r.sidecar_cpu_ns / 1e3,
                    r.redis_cpu_ns / 1e3,
                    r.peer_cpu_ns / 1e3,
                    share.join(" + ")
                ));
                if let Some((n, s)) = r.replay {
                    log(&format!(
                        "  {:>12} replay: {n} events put back in {s:.2} s, {:.0} events/s",
                        "",
                        n as f64 / s
                    ));
                }
                results.queue.push((q, instances, r));
            }
        }
        log("part 4: instructions per event, one instance (valgrind --tool=callgrind)");
        for q in [
            queue::Queue::Memory,
            queue::Queue::Redis,
            queue::Queue::RedisWait,
            queue::Queue::RedisRetained,
        ] {
            let per =
                queue::instructions(&ctx, &ctx.subtocall, q, server, queue::CALLGRIND_EVENTS)?;
            log(&format!(
                "  {:>10}: {per:.0} instructions per event",
                q.name()
            ));
            results.queue_instructions.push((q, per));
        }
        if !wants("crossbar") {
            log(&format!(
                "part 4b: through the real Crossbar at {:.0} events/s, memory and Redis queue",
                ctx.rate
            ));
            let plan = router::Plan {
                full: false,
                redis: Some(server),
            };
            results.queue_router = Some(router::run(&ctx, &plan, &log)?);
        }
    }
    if let Some(server) = &queue_redis {
        log("part 4: 1,000 procedures, two idle instances (Redis connections and commands)");
        for ordered in [false, true] {
            let r = queue::idle(&ctx, &ctx.subtocall, server, 1000, 2, ordered)?;
            log(&format!(
                "  {}: {:.1} commands/s, redis-server {:.0} us/s, subtocall {:.0} us/s, connections {:?}",
                if ordered { "ordered" } else { "unordered" },
                r.commands_per_s,
                r.redis_cpu_per_s_ns / 1e3,
                r.sidecar_cpu_per_s_ns / 1e3,
                r.connections
            ));
            results.queue_idle.push(r);
        }
    }
    drop(queue_redis);

    results.duration_s = started.elapsed().as_secs_f64();
    let section = report::markdown(&results);
    if write {
        let doc = repo.join("doc/benchmarks.md");
        let img = repo.join("doc/img");
        std::fs::create_dir_all(&img)?;
        if let Some(rr) = &results.router {
            report::latency_chart(rr, &img.join("bench-latency.png"))?;
        }
        report::throughput_chart(
            &throughput_bars(&results),
            &img.join("bench-throughput.png"),
        )?;
        report::write_doc(&doc, &section)?;
        log(&format!(
            "wrote {} and {}/bench-*.png in {:.0} s",
            doc.display(),
            img.display(),
            results.duration_s
        ));
    } else {
        println!("{section}");
    }
    leave_work(&ctx);
    Ok(())
}

/// Removes the work directory, unless BENCH_KEEP_WORK=1 keeps the logs and
/// callgrind outputs for a closer look.
fn leave_work(ctx: &Ctx) {
    if std::env::var_os("BENCH_KEEP_WORK").is_some() {
        log(&format!("kept {}", ctx.work.display()));
    } else {
        let _ = std::fs::remove_dir_all(&ctx.work);
    }
}

fn log(line: &str) {
    eprintln!("bench: {line}");
}

fn throughput_bars(r: &report::Results) -> Vec<(String, f64)> {
    let median = |v: Vec<f64>| report::Spread::of(v).median;
    let mut bars = Vec::new();
    if !r.current.ceiling_msgpack.is_empty() {
        bars.push((
            "subtocall ceiling, MessagePack".into(),
            median(
                r.current
                    .ceiling_msgpack
                    .iter()
                    .map(|c| c.events_per_s)
                    .collect(),
            ),
        ));
        bars.push((
            "subtocall ceiling, JSON".into(),
            median(
                r.current
                    .ceiling_json
                    .iter()
                    .map(|c| c.events_per_s)
                    .collect(),
            ),
        ));
    }
    if !r.redis.is_empty() {
        bars.push((
            "subtocall → Redis".into(),
            median(r.redis.iter().map(|c| c.events_per_s).collect()),
        ));
        bars.push((
            "redis-benchmark RPUSH -P 512".into(),
            median(r.redis_benchmark.iter().map(|c| c.0).collect()),
        ));
    }
    for (q, instances) in queue::CASES {
        let v: Vec<f64> = r
            .queue
            .iter()
            .filter(|(a, b, _)| (*a, *b) == (q, instances))
            .map(|(_, _, run)| run.events_per_s)
            .collect();
        if !v.is_empty() && q.is_redis() {
            let who = match (q, instances) {
                (queue::Queue::RedisWait, _) => "one instance, replica and WAIT".to_owned(),
                (queue::Queue::RedisRetained, _) => "one instance, retention".to_owned(),
                (_, 1) => "one instance".to_owned(),
                (_, 2) => "two instances".to_owned(),
                (_, n) => format!("{n} instances"),
            };
            bars.push((format!("subtocall, Redis queue, {who}"), median(v)));
        }
    }
    if let Some(rr) = &r.router {
        for path in router::Path::ALL {
            let v = rr
                .saturated
                .get(&path)
                .map(|runs| runs.iter().map(|x| x.events_per_s).collect())
                .unwrap_or_default();
            bars.push((format!("Crossbar: {}", path.short()), median(v)));
        }
    }
    bars
}

/// The size of the Redis envelope of the benchmark's event.
fn envelope_bytes() -> usize {
    use subtocall::forward::envelope::SharedEvent;
    use subtocall::wamp::{Dict, Event, PublicationId, SubscriptionId};
    let event = Event {
        subscription: SubscriptionId(1),
        publication: PublicationId(1 << 52),
        details: Dict::new(),
        payload: peer::event_payload(),
    };
    SharedEvent::new(
        peer::PROCEDURE.into(),
        peer::TOPIC.into(),
        event,
        SystemTime::now(),
    )
    .envelope_json()
    .len()
}

/// `redis-benchmark` RPUSH, pipelined like subtocall's pushes: (ops/s,
/// redis-server CPU ns per op).
/// `redis-benchmark` pipelining `what` (`rpush`, or `xadd`: XADD of a
/// value of `size` bytes in one field, as the stream target adds): its
/// rate and redis-server's CPU per operation.
fn redis_benchmark(server: &procs::RedisServer, size: usize, what: &str) -> Result<(f64, f64)> {
    let n: u64 = 500_000;
    let value = "x".repeat(size);
    let port = server.port.to_string();
    let mut cmd = Command::new("redis-benchmark");
    cmd.args(["-h", "127.0.0.1", "-p", &port]).args([
        "-c",
        "1",
        "-P",
        "512",
        "-q",
        "--csv",
        "-n",
        &n.to_string(),
    ]);
    match what {
        "xadd" => cmd.args(["XADD", "bench:stream", "*", "event", &value]),
        _ => cmd.args(["-t", "rpush", "-d", &size.to_string()]),
    };
    let cpu0 = procfs::cpu_ns(server.proc.pid());
    let out = cmd.output().context("run redis-benchmark")?;
    let cpu1 = procfs::cpu_ns(server.proc.pid());
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .filter(|l| !l.starts_with("\"test\""))
        .find_map(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse::<f64>().ok())
        .with_context(|| format!("no {what} line in redis-benchmark's output: {text}"))?;
    let mut c = resp::Conn::connect(server.port)?;
    c.command(&["DEL", "mylist"])?;
    c.command(&["DEL", "bench:stream"])?;
    Ok((rps, (cpu1 - cpu0) as f64 / n as f64))
}

/// What it costs any event loop on this machine to wake up for one small
/// request and answer it: redis-server's CPU per PING when PINGs come one at
/// a time at `rate`/s. A floor for the per-event cost at a moderate rate,
/// where every event arrives alone.
fn redis_wakeup_floor(server: &procs::RedisServer, rate: f64, secs: f64) -> Result<f64> {
    let mut c = resp::Conn::connect(server.port)?;
    // redis-server's own timers (serverCron) run whether or not requests
    // come: measured idle over as long, and taken off.
    let idle0 = procfs::cpu_ns(server.proc.pid());
    std::thread::sleep(Duration::from_secs_f64(secs));
    let idle = procfs::cpu_ns(server.proc.pid()) - idle0;
    let n = (rate * secs) as u32;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let cpu0 = procfs::cpu_ns(server.proc.pid());
    for i in 0..n {
        let due = start + interval * i;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        c.command(&["PING"])?;
    }
    let cpu1 = procfs::cpu_ns(server.proc.pid());
    let elapsed = start.elapsed().as_secs_f64();
    let busy = (cpu1 - cpu0) as f64 - idle as f64 * elapsed / secs;
    Ok(busy.max(0.0) / f64::from(n.max(1)))
}

fn git_commit(repo: &std::path::Path) -> String {
    let rev = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let dirty = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args([
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            "src",
            "Cargo.toml",
            "Cargo.lock",
        ])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    if dirty { format!("{rev}+changes") } else { rev }
}

/// Now, UTC, to the minute.
fn date_utc() -> String {
    let t = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    // 2026-11-22T10:21:58Z -> 2026-11-22 10:21 UTC
    format!("{} {} UTC", &t[..10], &t[11..16])
}

/// A policy file of 100 rules in which the loopback peer's procedure
/// (`bench.SUB_ev`) matches only the last: 99 patterns tried and missed
/// once per registration, and a rule that applies (its events carry a
/// policy of their own).
fn policy_file_of_100_rules() -> String {
    let mut text = String::new();
    for i in 0..99 {
        text.push_str(&format!(
            "[[policy]]\nprocedure = \"bench.other{i}.SUB_*\"\ncall_timeout = \"{}s\"\n\n",
            10 + i
        ));
    }
    text.push_str(&format!(
        "[[policy]]\nprocedure = \"{}\"\ncall_timeout = \"29s\"\nretry_max_attempts = 4\n",
        peer::PROCEDURE
    ));
    text
}
