//! A real Crossbar router for part 2: `crossbar start` from the project's
//! pinned virtualenv, on a free port, with a config made for the benchmark
//! (realm1; a `subtocall` role for the sidecar, anonymous `public` for the
//! publishers and backends; MessagePack and JSON).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::json;

use crate::procfs;
use crate::procs::{Proc, free_port};

pub const SIDECAR_USER: (&str, &str) = ("subtocall", "subtocall-secret");

pub struct Crossbar {
    pub proc: Proc,
    pub port: u16,
}

impl Crossbar {
    pub fn start(venv: &Path, dir: &Path) -> Result<Crossbar> {
        let cbdir = dir.join("cbdir");
        std::fs::create_dir_all(&cbdir)?;
        let port = free_port()?;
        std::fs::write(
            cbdir.join("config.json"),
            serde_json::to_string_pretty(&config(port))?,
        )?;
        let mut cmd = Command::new(venv.join("bin/crossbar"));
        cmd.arg("start")
            .arg("--cbdir")
            .arg(&cbdir)
            .args(["--loglevel", "warn", "--color", "false"])
            .args(["--shutdownafter", "1200"])
            .current_dir(&cbdir)
            .env("PYTHONUNBUFFERED", "1");
        let proc = Proc::spawn("crossbar", cmd, dir.join("crossbar.log"))?;
        let mut cb = Crossbar { proc, port };
        cb.wait_ready()?;
        Ok(cb)
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// The controller (the process we started) and its router worker.
    pub fn pids(&self) -> Vec<u32> {
        let controller = self.proc.pid();
        let mut pids = vec![controller];
        pids.extend(procfs::children(controller));
        pids
    }

    pub fn cpu_ns(&self) -> u64 {
        procfs::cpu_ns_all(&self.pids())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        loop {
            self.proc.check_alive()?;
            let url = self.url();
            let ok = runtime.block_on(async {
                let request = {
                    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
                    let mut r = url.as_str().into_client_request().ok()?;
                    r.headers_mut()
                        .insert("Sec-WebSocket-Protocol", "wamp.2.json".parse().ok()?);
                    r
                };
                let attempt = tokio_tungstenite::connect_async(request);
                let (mut ws, _) = tokio::time::timeout(Duration::from_secs(3), attempt)
                    .await
                    .ok()?
                    .ok()?;
                let _ = ws.close(None).await;
                Some(())
            });
            if ok.is_some() {
                // The worker is a child of the controller.
                if self.pids().len() < 2 {
                    bail!("crossbar is up but has no router worker process");
                }
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "crossbar did not accept a WAMP handshake within 60 s:\n{}",
                    self.proc.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn config(port: u16) -> serde_json::Value {
    let perm = |uri: &str, register: bool, publish: bool| {
        json!({
            "uri": uri, "match": "prefix",
            "allow": {"call": true, "register": register, "publish": publish, "subscribe": true},
            "disclose": {"caller": false, "publisher": false},
            "cache": true
        })
    };
    json!({
        "version": 2,
        "controller": {},
        "workers": [{
            "type": "router",
            "realms": [{
                "name": "realm1",
                "roles": [
                    {"name": "subtocall", "permissions": [
                        perm("wamp.registration.", false, false),
                        perm("bench.", false, false),
                    ]},
                    {"name": "public", "permissions": [perm("bench.", true, true)]},
                ]
            }],
            "transports": [{
                "type": "web",
                "endpoint": {"type": "tcp", "interface": "127.0.0.1", "port": port},
                "paths": {
                    "/": {"type": "json", "value": {"service": "subtocall-bench"}},
                    "ws": {
                        "type": "websocket",
                        "serializers": ["msgpack", "json"],
                        "auth": {
                            "wampcra": {"type": "static", "users": {
                                SIDECAR_USER.0: {"secret": SIDECAR_USER.1, "role": "subtocall"}
                            }},
                            "anonymous": {"type": "static", "role": "public"}
                        }
                    }
                }
            }]
        }]
    })
}

/// The pinned virtualenv: `--venv`, else what `scripts/setup-crossbar.sh`
/// prints (it creates the venv on first use).
pub fn find_venv(explicit: Option<&Path>, repo: &Path) -> Result<std::path::PathBuf> {
    if let Some(v) = explicit {
        return Ok(v.to_owned());
    }
    let out = Command::new("bash")
        .arg(repo.join("scripts/setup-crossbar.sh"))
        .stdin(std::process::Stdio::null())
        .output()
        .context("run scripts/setup-crossbar.sh")?;
    if !out.status.success() {
        bail!(
            "scripts/setup-crossbar.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().into())
}
