//! A real Crossbar.io 26.10.1 router for integration tests, one per fixture, on a free port.
//!
//! `Crossbar::start()` writes a config (realm `realm1`, roles `backend`, `public` and
//! `limited`, WAMP-CRA users, anonymous access) into a fresh cbdir, spawns
//! `crossbar start` directly (its PID is the controller's, pitfall P6) and returns once a
//! real `wamp.2.json` WebSocket handshake succeeds. Dropping the fixture stops the router.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::{free_port, stop_server, tail, terminate, terminate_blocking, venv};

/// The realm every fixture serves.
pub const REALM: &str = "realm1";
/// WAMP-CRA user with role `backend` (plain secret).
pub const BACKEND_USER: (&str, &str) = ("backend", "secret123");
/// WAMP-CRA user with role `backend`, salted (salt `salt123`, 100 iterations, keylen 16).
pub const SALTED_USER: (&str, &str) = ("salted", "saltedpass");
/// WAMP-CRA user with role `limited`: like `backend` on `com.`, but no `wamp.` permission.
pub const LIMITED_USER: (&str, &str) = ("limited", "limited123");

/// How long the router gets to accept a WAMP WebSocket handshake after spawn.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the router gets to exit after SIGTERM before it is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Fresh ports tried when the chosen one turns out to be taken.
const PORT_ATTEMPTS: usize = 3;

/// How to start a [`Crossbar`].
#[derive(Clone, Debug)]
pub struct CrossbarOptions {
    /// Serve `wss://localhost:PORT/ws` with a fresh self-signed certificate.
    pub tls: bool,
    /// `--loglevel` (`warn` keeps the log short; `debug`/`trace` to see frames).
    pub loglevel: String,
    /// `--shutdownafter`: the router exits by itself after this long, a safety net if the
    /// test process is killed before it can stop the router.
    pub shutdown_after: Duration,
    /// Edits the generated config before it is written (e.g. add a realm or a user).
    pub customize: Option<fn(&mut Value)>,
}

impl Default for CrossbarOptions {
    fn default() -> Self {
        Self {
            tls: false,
            loglevel: "warn".to_owned(),
            shutdown_after: Duration::from_secs(900),
            customize: None,
        }
    }
}

/// Paths of the PEM files of a TLS-enabled fixture.
#[derive(Clone, Debug)]
struct TlsFiles {
    certificate: PathBuf,
    key: PathBuf,
}

/// A running Crossbar router. Stops it on drop (SIGTERM, 5 s grace, SIGKILL).
pub struct Crossbar {
    cbdir: TempDir,
    port: u16,
    options: CrossbarOptions,
    tls: Option<TlsFiles>,
    child: Option<Child>,
    log_path: PathBuf,
}

impl Crossbar {
    /// Starts a router with the default options and waits until it is ready.
    pub async fn start() -> Self {
        Self::start_with(CrossbarOptions::default()).await
    }

    /// Starts a router and waits until a WAMP WebSocket handshake succeeds (30 s cap).
    ///
    /// Panics with the router's log when it does not come up.
    pub async fn start_with(options: CrossbarOptions) -> Self {
        let cbdir = tempfile::Builder::new()
            .prefix("subtocall-crossbar-")
            .tempdir()
            .expect("create a temp cbdir");
        let tls = options
            .tls
            .then(|| write_self_signed_certificate(cbdir.path()));
        let log_path = cbdir.path().join("crossbar.log");
        let mut crossbar = Self {
            cbdir,
            port: 0,
            options,
            tls,
            child: None,
            log_path,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            crossbar.port = free_port();
            crossbar.write_config();
            match crossbar.spawn_and_wait().await {
                Ok(()) => return crossbar,
                Err(failure) if attempt < PORT_ATTEMPTS && crossbar.log().contains("in use") => {
                    eprintln!(
                        "crossbar: port {} was taken ({failure}); retrying",
                        crossbar.port
                    );
                }
                Err(failure) => crossbar.fail(&failure),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// `ws://127.0.0.1:PORT/ws`, or `wss://localhost:PORT/ws` with TLS.
    pub fn url(&self) -> String {
        if self.tls.is_some() {
            format!("wss://localhost:{}/ws", self.port)
        } else {
            format!("ws://127.0.0.1:{}/ws", self.port)
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn realm(&self) -> &'static str {
        REALM
    }

    /// The node directory holding config.json, the log and (with TLS) the PEM files.
    pub fn cbdir(&self) -> &Path {
        self.cbdir.path()
    }

    /// The self-signed certificate PEM to trust (TLS fixtures only).
    ///
    /// Panics on a fixture started without TLS.
    pub fn ca_file(&self) -> &Path {
        &self
            .tls
            .as_ref()
            .expect("ca_file() needs a Crossbar started with tls: true")
            .certificate
    }

    /// The CA file when TLS is on, for peers that take an optional one.
    pub fn ca_file_opt(&self) -> Option<&Path> {
        self.tls.as_ref().map(|files| files.certificate.as_path())
    }

    /// A rustls client config that trusts this fixture's certificate (TLS fixtures only).
    pub fn tls_client_config(&self) -> Arc<rustls::ClientConfig> {
        client_config_trusting(self.ca_file())
    }

    /// The controller's PID while the router runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the router logged so far (all starts of this fixture).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Stops the router: SIGTERM to the controller, up to 5 s, then SIGKILL; then waits
    /// (5 s cap) until the port refuses connections. Exit code 1 after SIGTERM is normal
    /// (pitfall P5). Does nothing when already stopped.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let status = stop_server(&mut child, self.port, STOP_GRACE, "crossbar").await;
        self.append_log_marker(&format!("stopped by the fixture ({status})"));
    }

    /// Starts the router again on the same port and cbdir (stopping it first if it runs)
    /// and returns once it is ready. Panics with the log when it does not come up.
    pub async fn start_again(&mut self) {
        self.stop().await;
        if let Err(failure) = self.spawn_and_wait().await {
            self.fail(&failure);
        }
    }

    fn write_config(&self) {
        let tls = self
            .tls
            .as_ref()
            .map(|files| (files.certificate.as_path(), files.key.as_path()));
        let mut config = router_config(self.port, tls);
        if let Some(customize) = self.options.customize {
            customize(&mut config);
        }
        let text = serde_json::to_string_pretty(&config).expect("serialize the router config");
        fs::write(self.cbdir.path().join("config.json"), text).expect("write config.json");
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        self.append_log_marker(&format!("starting on port {}", self.port));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open crossbar.log");
        let child = Command::new(venv().join("bin/crossbar"))
            .arg("start")
            .arg("--cbdir")
            .arg(self.cbdir.path())
            .args(["--loglevel", &self.options.loglevel, "--color", "false"])
            .arg("--shutdownafter")
            .arg(self.options.shutdown_after.as_secs().to_string())
            .current_dir(self.cbdir.path())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file handle"))
            .stderr(log)
            .spawn()
            .expect("spawn crossbar start");
        self.child = Some(child);
        self.wait_ready().await
    }

    /// Polls a WAMP WebSocket handshake until it succeeds, the router exits, or 30 s pass.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let tls_config = self
            .tls
            .as_ref()
            .map(|files| client_config_trusting(&files.certificate));
        let url = self.url();
        let started = Instant::now();
        let mut last_error = String::from("no attempt yet");
        while started.elapsed() < READY_TIMEOUT {
            let child = self.child.as_mut().expect("wait_ready after spawn");
            if let Some(status) = child.try_wait().expect("try_wait on crossbar") {
                self.child = None;
                return Err(format!("crossbar exited before it was ready ({status})"));
            }
            match wamp_handshake(&url, tls_config.clone()).await {
                Ok(()) => return Ok(()),
                Err(error) => last_error = error,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, STOP_GRACE).await;
        }
        Err(format!(
            "no WAMP handshake at {url} within {READY_TIMEOUT:?}; last error: {last_error}"
        ))
    }

    fn append_log_marker(&self, text: &str) {
        if let Ok(mut log) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
        {
            let _ = writeln!(log, "=== subtocall test fixture: {text} ===");
        }
    }

    fn fail(&self, failure: &str) -> ! {
        panic!(
            "crossbar did not start: {failure}\n--- crossbar log ({}) ---\n{}\n--- end of crossbar log ---",
            self.log_path.display(),
            self.log()
        );
    }
}

impl Drop for Crossbar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate_blocking(&mut child, STOP_GRACE);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- last 100 lines of the crossbar log ({}) ---\n{}\n--- end of crossbar log ---",
                self.log_path.display(),
                tail(&self.log(), 100)
            );
        }
    }
}

/// One WebSocket handshake with subprotocol `wamp.2.json`; Ok when the router agreed.
async fn wamp_handshake(
    url: &str,
    tls_config: Option<Arc<rustls::ClientConfig>>,
) -> Result<(), String> {
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("wamp.2.json"),
    );
    let connector = tls_config.map(tokio_tungstenite::Connector::Rustls);
    let attempt = tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector);
    let (mut socket, response) = tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .map_err(|_| "handshake timed out after 3 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let protocol = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
    match protocol.as_deref() {
        Some("wamp.2.json") => Ok(()),
        other => Err(format!("handshake answered subprotocol {other:?}")),
    }
}

/// A rustls client config (ring provider) whose only root is the PEM certificate at `ca`.
pub fn client_config_trusting(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca).expect("read the CA PEM file") {
        roots
            .add(certificate.expect("parse a certificate in the CA PEM file"))
            .expect("add the certificate to the root store");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

/// Writes a self-signed certificate for `localhost` and `127.0.0.1` into `dir`.
fn write_self_signed_certificate(dir: &Path) -> TlsFiles {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("generate a self-signed certificate");
    let files = TlsFiles {
        certificate: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    fs::write(&files.certificate, certified.cert.pem()).expect("write server.crt");
    fs::write(&files.key, certified.signing_key.serialize_pem()).expect("write server.key");
    files
}

/// The router config used by every fixture: `realm1` on 127.0.0.1:`port`, path `/ws`
/// (serializers json, msgpack, cbor), a JSON root at `/` (never nodeinfo, pitfall P1),
/// WAMP-CRA users `backend`, `salted` and `limited`, and anonymous access as `public`.
/// With `tls = Some((certificate, key))` the endpoint serves TLS with those PEM files.
pub fn router_config(port: u16, tls: Option<(&Path, &Path)>) -> Value {
    let mut endpoint = json!({"type": "tcp", "interface": "127.0.0.1", "port": port});
    if let Some((certificate, key)) = tls {
        endpoint["tls"] = json!({
            "certificate": certificate.to_str().expect("UTF-8 certificate path"),
            "key": key.to_str().expect("UTF-8 key path"),
        });
    }
    let permission = |uri: &str, register: bool, publish: bool, disclose: bool| {
        json!({
            "uri": uri, "match": "prefix",
            "allow": {"call": true, "register": register, "publish": publish, "subscribe": true},
            "disclose": {"caller": disclose, "publisher": disclose},
            "cache": true
        })
    };
    json!({
        "version": 2,
        "controller": {},
        "workers": [{
            "type": "router",
            "realms": [{
                "name": REALM,
                "options": {"enable_meta_api": true},
                "roles": [
                    {"name": "backend", "permissions": [
                        permission("wamp.", false, false, false),
                        permission("com.", true, true, true),
                    ]},
                    {"name": "public", "permissions": [
                        permission("com.", false, true, false),
                    ]},
                    {"name": "limited", "permissions": [
                        permission("com.", true, true, true),
                    ]},
                ]
            }],
            "transports": [{
                "type": "web",
                "endpoint": endpoint,
                "paths": {
                    "/": {"type": "json", "value": {"service": "subtocall-test-router"}},
                    "ws": {
                        "type": "websocket",
                        "serializers": ["json", "msgpack", "cbor"],
                        "auth": {
                            "wampcra": {"type": "static", "users": {
                                BACKEND_USER.0: {"secret": BACKEND_USER.1, "role": "backend"},
                                SALTED_USER.0: {
                                    "secret": SALTED_USER.1, "role": "backend",
                                    "salt": "salt123", "iterations": 100, "keylen": 16
                                },
                                LIMITED_USER.0: {"secret": LIMITED_USER.1, "role": "limited"},
                            }},
                            "anonymous": {"type": "static", "role": "public"}
                        }
                    }
                }
            }]
        }]
    })
}

/// Runs `crossbar check --cbdir <cbdir>` (blocking) and returns its output.
pub fn crossbar_check(cbdir: &Path) -> Output {
    Command::new(venv().join("bin/crossbar"))
        .arg("check")
        .arg("--cbdir")
        .arg(cbdir)
        .stdin(Stdio::null())
        .output()
        .expect("run crossbar check")
}

/// Writes `router_config(port, None)` to `<dir>/config.json`, for `crossbar check` tests.
pub fn write_router_config(dir: &Path, port: u16) -> PathBuf {
    let path = dir.join("config.json");
    let text =
        serde_json::to_string_pretty(&router_config(port, None)).expect("serialize the config");
    File::create(&path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .expect("write config.json");
    path
}
