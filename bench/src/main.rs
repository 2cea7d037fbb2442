//! The benchmark command (run through `scripts/bench.sh`): what subtocall
//! costs per event, beside the limit (a loopback peer playing the router),
//! beside the real Crossbar router (with two baselines on the same router),
//! and in Redis mode (beside `redis-benchmark`). Writes the results into
//! `doc/benchmarks.md` and charts into `doc/img/`.

mod ceiling;
mod peer;
mod procfs;
mod procs;
mod resp;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use subtocall::wamp::Serializer;

/// What every phase needs.
pub struct Ctx {
    pub subtocall: PathBuf,
    pub venv: Option<PathBuf>,
    pub work: PathBuf,
    pub warmup: Duration,
    pub measure: Duration,
    pub repeats: usize,
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut subtocall = None;
    let mut venv = None;
    let mut only: Option<String> = None;
    let mut repeats = 5;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--subtocall" => subtocall = args.next().map(PathBuf::from),
            "--venv" => venv = args.next().map(PathBuf::from),
            "--only" => only = args.next(),
            "--repeats" => repeats = args.next().context("--repeats N")?.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let subtocall = subtocall.context("--subtocall PATH is required")?;
    let work = std::env::temp_dir().join(format!("subtocall-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let ctx = Ctx {
        subtocall,
        venv,
        work,
        warmup: Duration::from_millis(500),
        measure: Duration::from_secs(2),
        repeats,
    };
    let wants = |p: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == p));
    if wants("ceiling") {
        for ser in [Serializer::MsgPack, Serializer::Json] {
            for _ in 0..ctx.repeats {
                let r = ceiling::run_once(&ctx, ser, None)?;
                println!("{ser}: {r:?}");
            }
        }
    }
    if wants("callgrind") {
        for ser in [Serializer::MsgPack, Serializer::Json] {
            let a = ceiling::callgrind_total(&ctx, ser, 5_000)?;
            let b = ceiling::callgrind_total(&ctx, ser, 25_000)?;
            println!(
                "{ser}: {a} {b} -> {} instr/event",
                (b - a) as f64 / 20_000.0
            );
        }
    }
    if wants("redis") {
        let server = procs::RedisServer::start(&ctx.work)?;
        for _ in 0..ctx.repeats {
            let r = ceiling::run_once(&ctx, Serializer::MsgPack, Some(&server))?;
            println!("redis: {r:?}");
        }
    }
    Ok(())
}
