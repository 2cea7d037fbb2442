//! The `subtocall` binary: reads the configuration from the environment,
//! sets up logging, runs the sidecar until SIGTERM/SIGINT (then drains), and
//! turns the outcome into an exit code: 0 after a clean shutdown, 1 when the
//! sidecar cannot work (rejected credentials, missing permissions, too many
//! failed connection attempts), 2 for invalid configuration. `subtocall check`
//! tries the configuration once and reports; `subtocall healthcheck` asks a
//! running sidecar's /healthz (for container health checks).

use std::process::ExitCode;
use std::sync::Arc;

use subtocall::config::{self, Config, LogFormat};
use subtocall::metrics::Metrics;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut command = Command::Run;
    match args.first().map(String::as_str) {
        None => {}
        Some("check") => command = Command::Check,
        Some("healthcheck") => command = Command::HealthCheck,
        Some("-h" | "--help" | "help") => {
            print!("{}", config::help_text());
            return ExitCode::SUCCESS;
        }
        Some("-V" | "--version" | "version") => {
            println!("subtocall {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!(
                "subtocall: unknown argument {other:?}\n\
                 Usage: subtocall [check | healthcheck | --help | --version]; \
                 the configuration comes from environment variables (see --help)."
            );
            return ExitCode::from(2);
        }
    }

    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("subtocall: invalid configuration:\n{e}");
            return ExitCode::from(2);
        }
    };
    if command == Command::HealthCheck {
        return healthcheck(&config);
    }
    init_tracing(&config);
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }

    // One thread: subtocall serves one socket, and every event crosses the
    // socket task and the app task twice; on one thread those hand-offs are
    // not cross-thread wake-ups. Measured (doc/benchmarks.md): half the CPU
    // per event at moderate rates, and still twice the target at the ceiling.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match command {
        Command::Check => runtime.block_on(check(config)),
        _ => runtime.block_on(run(config)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    /// The sidecar.
    Run,
    /// `subtocall check`: try the configuration once and report.
    Check,
    /// `subtocall healthcheck`: ask a running sidecar's /healthz (for
    /// container HEALTHCHECKs in images without curl).
    HealthCheck,
}

async fn check(config: Config) -> ExitCode {
    let report = subtocall::check::run(&config).await;
    print!("{report}");
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// GET /healthz on the configured listener (a wildcard address is asked on
/// loopback). Exit 0 when it answers 200.
fn healthcheck(config: &Config) -> ExitCode {
    use std::io::{Read, Write};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
    use std::time::Duration;

    let Some(mut addr) = config.http else {
        eprintln!("subtocall healthcheck: SUBTOCALL_HTTP_ADDR is off; nothing to ask");
        return ExitCode::FAILURE;
    };
    if addr.ip().is_unspecified() {
        let loopback = match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        addr = SocketAddr::new(loopback, addr.port());
    }
    let timeout = Duration::from_secs(3);
    let answer = (|| -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })();
    match answer {
        Ok(response) if response.starts_with("HTTP/1.1 200") => ExitCode::SUCCESS,
        Ok(response) => {
            eprintln!(
                "subtocall healthcheck: {addr} answered {:?}",
                response.lines().next().unwrap_or("")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("subtocall healthcheck: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> ExitCode {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    // The listener stops after the app has drained, so /metrics and /readyz
    // answer (not ready) during the drain.
    let http_stop = CancellationToken::new();
    if let Some(addr) = config.http {
        match subtocall::http::bind(addr).await {
            Ok(listener) => {
                // With port 0, the port the system chose.
                let bound = listener.local_addr().unwrap_or(addr);
                tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
                tokio::spawn(subtocall::http::serve(
                    listener,
                    metrics.clone(),
                    subtocall::http::Limits::default(),
                    http_stop.clone(),
                ));
            }
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot listen for /metrics (set SUBTOCALL_HTTP_ADDR, or off)");
                return ExitCode::FAILURE;
            }
        }
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        url = %config.wamp.url,
        realm = %config.wamp.realm,
        mode = ?config.forward.mode,
        "subtocall starting"
    );
    let result = subtocall::app::run(config, metrics, shutdown).await;
    http_stop.cancel();
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// First SIGTERM/SIGINT: drain and stop. A second one: stop at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop subtocall with SIGKILL");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down");
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::warn!("second signal: exiting without draining");
    std::process::exit(130);
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    // The filter was validated with the configuration; fall back to info
    // rather than fail if it somehow does not parse here.
    let filter = EnvFilter::try_new(&config.log.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}
