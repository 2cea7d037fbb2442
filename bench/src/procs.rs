//! The processes the benchmark starts: subtocall (optionally under
//! valgrind), a Crossbar router and a private redis-server, each on free
//! ports of 127.0.0.1, each stopped when its guard is dropped.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::procfs;

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A child process stopped (SIGTERM, then SIGKILL) on drop.
pub struct Proc {
    pub name: &'static str,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let file = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Proc {
            name,
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Fails with the log's tail if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail(30)
            );
        }
        Ok(())
    }

    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn signal(&self, sig: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child; no memory is involved.
            unsafe {
                libc::kill(child.id() as i32, sig);
            }
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: as above.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let started = Instant::now();
        while started.elapsed() < grace {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        while let Some(child) = self.child.as_mut() {
            if child.try_wait()?.is_some() {
                self.child = None;
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!("{} did not exit within {limit:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// How to run subtocall.
pub struct SidecarSpec<'a> {
    pub binary: &'a Path,
    pub env: BTreeMap<String, String>,
    /// Run under `valgrind --tool=callgrind`, writing its counts here.
    pub callgrind_out: Option<PathBuf>,
    pub log: PathBuf,
}

/// subtocall as a child process, with a clean environment and its metrics
/// listener on a free port (read once at the end of a run, to check that
/// nothing was dropped or dead-lettered).
pub struct Sidecar {
    pub proc: Proc,
    pub http_port: u16,
}

impl Sidecar {
    pub fn start(spec: SidecarSpec<'_>) -> Result<Sidecar> {
        let http_port = free_port()?;
        let mut cmd = match &spec.callgrind_out {
            Some(out) => {
                let mut c = Command::new("valgrind");
                c.arg("--tool=callgrind")
                    .arg(format!("--callgrind-out-file={}", out.display()))
                    .arg(spec.binary);
                c
            }
            None => Command::new(spec.binary),
        };
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("SUBTOCALL_LOG", "warn")
            .env("SUBTOCALL_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
            .envs(&spec.env);
        let proc = Proc::spawn("subtocall", cmd, spec.log)?;
        Ok(Sidecar { proc, http_port })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn cpu_ns(&self) -> u64 {
        procfs::cpu_ns(self.pid())
    }

    pub fn rss_kb(&self) -> u64 {
        procfs::status_kb(self.pid(), "VmRSS").unwrap_or(0)
    }

    pub fn peak_rss_kb(&self) -> u64 {
        procfs::status_kb(self.pid(), "VmHWM").unwrap_or(0)
    }

    /// `/metrics` as `(sample, value)` pairs.
    pub fn metrics(&self) -> Result<BTreeMap<String, f64>> {
        metrics_at(self.http_port)
    }

    /// Fails unless every event was forwarded: none dropped for a slow
    /// consumer (a metric of builds before the single event loop), none
    /// dead-lettered.
    pub fn check_nothing_lost(&self) -> Result<f64> {
        let m = self.metrics()?;
        let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
        let dropped = get("subtocall_events_dropped_total{reason=\"consumer_behind\"}");
        let dead: f64 = m
            .iter()
            .filter(|(k, _)| k.starts_with("subtocall_events_dead_lettered_total"))
            .map(|(_, v)| v)
            .sum();
        if dropped > 0.0 || dead > 0.0 {
            bail!("subtocall lost events: {dropped} dropped, {dead} dead-lettered");
        }
        Ok(get("subtocall_events_forwarded_total"))
    }
}

/// The `/metrics` of the subtocall listening on `port`, as `(sample, value)`
/// pairs.
pub fn metrics_at(port: u16) -> Result<BTreeMap<String, f64>> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect())
}

/// A private redis-server without persistence.
pub struct RedisServer {
    pub proc: Proc,
    pub port: u16,
}

impl RedisServer {
    pub fn start(dir: &Path) -> Result<RedisServer> {
        Self::start_with(dir, "redis", &[])
    }

    /// With extra command-line options; `name` keeps logs apart.
    pub fn start_with(dir: &Path, name: &str, extra: &[&str]) -> Result<RedisServer> {
        let port = free_port()?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(extra)
            .arg("--dir")
            .arg(dir);
        let proc = Proc::spawn("redis-server", cmd, dir.join(format!("{name}.log")))?;
        let mut server = RedisServer { proc, port };
        let started = Instant::now();
        loop {
            if let Ok(mut c) = crate::resp::Conn::connect(port)
                && c.command(&["PING"]).is_ok()
            {
                return Ok(server);
            }
            server.proc.check_alive()?;
            if started.elapsed() > Duration::from_secs(10) {
                bail!("redis-server did not answer PING within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}
