//! The `subtocall` binary: reads the configuration from the environment,
//! sets up logging, runs the sidecar until SIGTERM/SIGINT (then drains), and
//! turns the outcome into an exit code: 0 after a clean shutdown, 1 when the
//! sidecar cannot work (rejected credentials, missing permissions, too many
//! failed connection attempts), 2 for invalid configuration. `subtocall check`
//! tries the configuration once and reports; `subtocall healthcheck` asks a
//! running sidecar's /healthz (for container health checks). Every command
//! answers `--help` (or `-h`) with its usage, before any configuration is read.

use std::process::ExitCode;
use std::sync::Arc;

use subtocall::config::{self, Config, LogFormat};
use subtocall::metrics::Metrics;
use subtocall::streams::{dead_letters, groups, retain};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse_args(&args) {
        Ok(Invocation::Run(command)) => command,
        Ok(Invocation::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!(
                "subtocall: {problem}\n\
                 Usage: subtocall [check | healthcheck | status | dead-letters list|redrive | groups list|forget | replay | --help | --version]; \
                 the configuration comes from environment variables (see --help)."
            );
            return ExitCode::from(2);
        }
    };

    if let Command::Status { url, json } = &command {
        return status(url.as_deref(), *json);
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
    if let Command::DeadLetters(request) = &command {
        return dead_letters(&config, request);
    }
    if let Command::Groups(request) = &command {
        return groups_command(&config, request);
    }
    if let Command::Replay(request) = &command {
        return replay_command(&config, request);
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

#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    /// The sidecar.
    Run,
    /// `subtocall check`: try the configuration once and report.
    Check,
    /// `subtocall healthcheck`: ask a running sidecar's /healthz (for
    /// container HEALTHCHECKs in images without curl).
    HealthCheck,
    /// `subtocall dead-letters list|redrive`: the Redis queue's dead letters.
    DeadLetters(dead_letters::Request),
    /// `subtocall groups list|forget`: the groups kept in Redis.
    Groups(groups::Request),
    /// `subtocall replay`: retained events put back into a queue.
    Replay(retain::Request),
    /// `subtocall status [--url URL] [--json]`: a running sidecar's /status.
    Status { url: Option<String>, json: bool },
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Invocation {
    /// Read the configuration and run this.
    Run(Command),
    /// Print this and exit 0: the help, one command's usage, the version.
    Print(String),
}

/// The commands that take a name on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Named {
    Check,
    HealthCheck,
    DeadLetters,
    Groups,
    Replay,
    Status,
    Help,
    Version,
}

impl Named {
    fn from_arg(arg: &str) -> Option<Named> {
        match arg {
            "check" => Some(Named::Check),
            "healthcheck" => Some(Named::HealthCheck),
            "dead-letters" => Some(Named::DeadLetters),
            "groups" => Some(Named::Groups),
            "replay" => Some(Named::Replay),
            "status" => Some(Named::Status),
            "help" | "-h" | "--help" => Some(Named::Help),
            "version" | "-V" | "--version" => Some(Named::Version),
            _ => None,
        }
    }

    /// What `subtocall COMMAND --help` prints.
    fn usage(self) -> String {
        match self {
            Named::Check => "Usage: subtocall check\n\n\
                 Connects once with the configuration from the environment (the\n\
                 variables `subtocall --help` lists), lists the SUB_ registrations it\n\
                 would serve and the topic each maps to, tries every permission the\n\
                 sidecar needs (naming the rule to add when one is missing) and pings\n\
                 Redis when Redis is used.\n\n\
                 Exit code: 0 when everything would work, 1 when something would not,\n\
                 2 for invalid configuration.\n"
                .to_owned(),
            Named::HealthCheck => "Usage: subtocall healthcheck\n\n\
                 Asks a running sidecar's /healthz at SUBTOCALL_HTTP_ADDR (a wildcard\n\
                 address is asked on loopback), for container health checks in images\n\
                 without curl.\n\n\
                 Exit code: 0 when it answers 200, 1 when it does not or cannot be\n\
                 reached (or SUBTOCALL_HTTP_ADDR is off), 2 for invalid configuration.\n"
                .to_owned(),
            Named::DeadLetters => {
                "Usage: subtocall dead-letters list|redrive [--procedure P] [--limit N]\n\n\
                 With SUBTOCALL_QUEUE=redis, dead letters are kept in a stream per\n\
                 procedure ({QUEUE_NAME:P}:dead at REDIS_URL).\n\
                 list      prints them, oldest first, one JSON object per line: id,\n\
                 \x20         procedure, reason, attempts, last_error, dead_lettered_at, event.\n\
                 redrive   puts them back into their queue, to be delivered like new\n\
                 \x20         events (with a fresh retry budget), and prints `redriven N`.\n\
                 --procedure P   only this procedure's (default: every procedure).\n\
                 --limit N       at most N dead letters (default: all).\n\n\
                 Reads REDIS_URL, SUBTOCALL_QUEUE_NAME and SUBTOCALL_REDIS_CLUSTER.\n\
                 Exit code: 0 on success, 1 when Redis cannot be used, 2 for invalid\n\
                 configuration or arguments.\n"
                    .to_owned()
            }
            Named::Groups => "Usage: subtocall groups list | groups forget PROCEDURE [--yes]\n\n\
                 With SUBTOCALL_QUEUE=redis, every instance keeps the exact groups it\n\
                 serves in Redis ({QUEUE_NAME}:groups), so that a group whose backends\n\
                 are away is still read for (its events wait in its streams) by an\n\
                 instance that starts meanwhile, until its grace period ends.\n\
                 list      prints each group: procedure, topic, group, whether it has a\n\
                 \x20         callee or since when it is away (and until when it is kept),\n\
                 \x20         and its backlog (events waiting in its streams).\n\
                 forget P  drops the group of procedure P for good, with its backlog:\n\
                 \x20         without --yes it only says what it would drop. Running\n\
                 \x20         instances let the group go at the end of its grace period.\n\n\
                 Reads REDIS_URL, SUBTOCALL_QUEUE_NAME, SUBTOCALL_REDIS_CLUSTER,\n\
                 SUBTOCALL_GRACE_PERIOD, SUBTOCALL_ORDER_BY and SUBTOCALL_ORDER_PARTITIONS.\n\
                 Exit code: 0 on success, 1 when Redis cannot be used or forget is not\n\
                 confirmed, 2 for invalid configuration or arguments.\n"
                .to_owned(),
            Named::Replay => "Usage: subtocall replay --procedure P (--since DURATION | --from TIME)\n\
                 \x20                       [--until TIME] [--dry-run]\n\n\
                 With SUBTOCALL_QUEUE=redis and SUBTOCALL_RETENTION, puts the retained\n\
                 events of P's topic published in the window back into P's queue, each\n\
                 once per run, in publication order (keyed events into their\n\
                 partitions); the instances deliver them again, marked replayed\n\
                 (`replayed: true` in the details under SUBTOCALL_DETAILS_KWARG and in\n\
                 the Redis-mode envelope). Prints how many.\n\
                 --procedure P     an exact SUB_ procedure (its group gets them).\n\
                 --since DURATION  the window starts this long ago (15m, 2h, 1d).\n\
                 --from TIME       or at this RFC 3339 time (2026-12-06T10:00:00Z).\n\
                 --until TIME      the window ends then (default: now).\n\
                 --dry-run         only count what would be replayed.\n\n\
                 Reads REDIS_URL, SUBTOCALL_QUEUE, SUBTOCALL_QUEUE_NAME,\n\
                 SUBTOCALL_RETENTION, SUBTOCALL_MARKER, SUBTOCALL_ORDER_BY and\n\
                 SUBTOCALL_ORDER_PARTITIONS (as the instances have them).\n\
                 Exit code: 0 on success, 1 when Redis cannot be used or nothing is\n\
                 retained, 2 for invalid configuration or arguments.\n"
                .to_owned(),
            Named::Status => "Usage: subtocall status [--url http://HOST:PORT] [--json]\n\n\
                 Asks a running sidecar's /status and prints what it is doing as\n\
                 tables: the router link, every mapping (topic, group, procedure,\n\
                 callees, counts, in flight, waiting, last error), the queue and, with\n\
                 Redis, the queue's instances and the targets' backlog.\n\
                 --url URL   the sidecar's listener (default: SUBTOCALL_HTTP_ADDR, itself\n\
                 \x20           0.0.0.0:8910 by default; a wildcard address is asked on loopback).\n\
                 --json      print the JSON as /status gives it.\n\n\
                 Exit code: 0 when the sidecar is ready, 1 when it is not ready or\n\
                 cannot be reached, 2 for invalid arguments (or, without --url, an\n\
                 invalid or off SUBTOCALL_HTTP_ADDR).\n"
                .to_owned(),
            Named::Help => config::help_text(),
            Named::Version => "Usage: subtocall --version   (or -V, or version)\n\n\
                 Prints the version.\n"
                .to_owned(),
        }
    }
}

/// Reads the command line: a command, optionally `--help` (or `-h`) after
/// it, or `help COMMAND`; nothing else takes arguments. `Err` is the problem
/// to report before exiting 2.
fn parse_args(args: &[String]) -> Result<Invocation, String> {
    let Some(first) = args.first() else {
        return Ok(Invocation::Run(Command::Run));
    };
    let named = Named::from_arg(first).ok_or_else(|| format!("unknown argument {first:?}"))?;
    let rest = &args[1..];
    if rest
        .iter()
        .any(|arg| matches!(arg.as_str(), "-h" | "--help"))
    {
        return Ok(Invocation::Print(named.usage()));
    }
    match (named, rest) {
        (Named::Check, []) => Ok(Invocation::Run(Command::Check)),
        (Named::HealthCheck, []) => Ok(Invocation::Run(Command::HealthCheck)),
        (Named::DeadLetters, rest) => dead_letters_args(rest).map(Invocation::Run),
        (Named::Groups, rest) => groups_args(rest).map(Invocation::Run),
        (Named::Replay, rest) => replay_args(rest).map(Invocation::Run),
        (Named::Status, rest) => status_args(rest).map(Invocation::Run),
        (Named::Help, []) => Ok(Invocation::Print(named.usage())),
        (Named::Help, [topic]) => match Named::from_arg(topic) {
            Some(about) => Ok(Invocation::Print(about.usage())),
            None => Err(format!("no help for {topic:?}: not a command")),
        },
        (Named::Help, [_, extra, ..]) => Err(format!("help takes one command, not also {extra:?}")),
        (Named::Version, []) => Ok(Invocation::Print(format!(
            "subtocall {}\n",
            env!("CARGO_PKG_VERSION")
        ))),
        (_, [extra, ..]) => Err(format!("{first} takes no argument {extra:?}")),
    }
}

/// `dead-letters list|redrive [--procedure P] [--limit N]`.
fn dead_letters_args(args: &[String]) -> Result<Command, String> {
    let (action, mut rest) = match args.split_first() {
        Some((a, rest)) if a == "list" => (dead_letters::Action::List, rest),
        Some((a, rest)) if a == "redrive" => (dead_letters::Action::Redrive, rest),
        Some((a, _)) => {
            return Err(format!(
                "dead-letters: unknown action {a:?} (list or redrive)"
            ));
        }
        None => return Err("dead-letters needs an action: list or redrive".to_owned()),
    };
    let mut request = dead_letters::Request {
        action,
        procedure: None,
        limit: None,
    };
    while let Some((flag, after)) = rest.split_first() {
        let Some((value, after)) = after.split_first() else {
            return Err(format!("dead-letters: {flag} needs a value"));
        };
        match flag.as_str() {
            "--procedure" if !value.is_empty() => request.procedure = Some(value.clone()),
            "--limit" => {
                let n: usize = value.parse().map_err(|_| {
                    format!("dead-letters: --limit {value:?} is not a whole number")
                })?;
                request.limit = Some(n);
            }
            _ => return Err(format!("dead-letters: unknown option {flag:?} {value:?}")),
        }
        rest = after;
    }
    Ok(Command::DeadLetters(request))
}

/// `groups list | groups forget PROCEDURE [--yes]`.
fn groups_args(args: &[String]) -> Result<Command, String> {
    let strs: Vec<&str> = args.iter().map(String::as_str).collect();
    let request = match strs.as_slice() {
        ["list"] => groups::Request::List,
        ["forget", procedure] if !procedure.starts_with('-') => groups::Request::Forget {
            procedure: (*procedure).to_owned(),
            yes: false,
        },
        ["forget", procedure, "--yes"] | ["forget", "--yes", procedure]
            if !procedure.starts_with('-') =>
        {
            groups::Request::Forget {
                procedure: (*procedure).to_owned(),
                yes: true,
            }
        }
        ["forget", ..] => return Err("groups forget takes one procedure, and --yes".to_owned()),
        ["list", extra, ..] => return Err(format!("groups list takes no argument {extra:?}")),
        [other, ..] => return Err(format!("groups: unknown action {other:?} (list or forget)")),
        [] => return Err("groups needs an action: list or forget".to_owned()),
    };
    Ok(Command::Groups(request))
}

/// `replay --procedure P (--since D | --from TIME) [--until TIME] [--dry-run]`.
fn replay_args(args: &[String]) -> Result<Command, String> {
    let mut procedure = None;
    let mut from = None;
    let mut until = None;
    let mut dry_run = false;
    let mut rest = args;
    let time = |flag: &str, value: &str| {
        humantime::parse_rfc3339_weak(value)
            .map_err(|e| format!("replay: {flag} {value:?} is not an RFC 3339 time ({e})"))
    };
    while let Some((flag, after)) = rest.split_first() {
        if flag == "--dry-run" {
            dry_run = true;
            rest = after;
            continue;
        }
        let Some((value, after)) = after.split_first() else {
            return Err(format!("replay: {flag} needs a value"));
        };
        match flag.as_str() {
            "--procedure" if !value.is_empty() => procedure = Some(value.clone()),
            "--since" | "--from" if from.is_some() => {
                return Err("replay: give one of --since and --from".to_owned());
            }
            "--since" => {
                let d = humantime::parse_duration(value).map_err(|e| {
                    format!("replay: --since {value:?} is not a duration such as 15m ({e})")
                })?;
                from = Some(retain::Start::Since(d));
            }
            "--from" => from = Some(retain::Start::At(time(flag, value)?)),
            "--until" => until = Some(time(flag, value)?),
            _ => return Err(format!("replay: unknown option {flag:?} {value:?}")),
        }
        rest = after;
    }
    let procedure = procedure.ok_or("replay needs --procedure P")?;
    let from = from.ok_or("replay needs --since DURATION or --from TIME")?;
    Ok(Command::Replay(retain::Request {
        procedure,
        from,
        until,
        dry_run,
    }))
}

/// `status [--url URL] [--json]`.
fn status_args(args: &[String]) -> Result<Command, String> {
    let (mut url, mut json) = (None, false);
    let mut rest = args;
    while let Some((flag, after)) = rest.split_first() {
        match flag.as_str() {
            "--json" => {
                json = true;
                rest = after;
            }
            "--url" => {
                let Some((value, after)) = after.split_first() else {
                    return Err("status: --url needs a value, e.g. http://127.0.0.1:8910".into());
                };
                url = Some(value.clone());
                rest = after;
            }
            _ => return Err(format!("status: unknown argument {flag:?}")),
        }
    }
    Ok(Command::Status { url, json })
}

/// Where `subtocall status` and `healthcheck` ask: `--url`'s host and port,
/// else SUBTOCALL_HTTP_ADDR (a wildcard address on loopback).
fn listener_addr(
    url: Option<&str>,
    http_addr: Option<std::net::SocketAddr>,
) -> Result<std::net::SocketAddr, String> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
    let addr = match url {
        Some(text) => {
            let url = url::Url::parse(text).map_err(|e| format!("--url {text:?}: {e}"))?;
            if url.scheme() != "http" {
                return Err(format!("--url {text:?}: only http:// is served"));
            }
            let host = url
                .host_str()
                .ok_or_else(|| format!("--url {text:?} has no host"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            (host, url.port().unwrap_or(80))
                .to_socket_addrs()
                .map_err(|e| format!("--url {text:?}: {e}"))?
                .next()
                .ok_or_else(|| format!("--url {text:?}: no address"))?
        }
        None => http_addr
            .ok_or("SUBTOCALL_HTTP_ADDR is off: say where the sidecar listens with --url")?,
    };
    if addr.ip().is_unspecified() {
        let loopback = match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        return Ok(SocketAddr::new(loopback, addr.port()));
    }
    Ok(addr)
}

/// GET `path` from the listener at `addr`: the status code and the body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Error, Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::other("the answer has no end of headers"))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Error::other(format!("not an HTTP answer: {:?}", head.lines().next())))?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
    if !chunked {
        return Ok((code, body.to_owned()));
    }
    let (mut rest, mut whole) = (body, String::new());
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).map_err(Error::other)?;
        if size == 0 || after.len() < size {
            break;
        }
        whole.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    Ok((code, whole))
}

/// `subtocall status`: the tables (or the JSON); exit 1 when not ready.
fn status(url: Option<&str>, json: bool) -> ExitCode {
    // Only the listener's address is read from the environment.
    let addr = match url
        .map_or_else(config::http_addr_from_env, |_| Ok(None))
        .and_then(|configured| listener_addr(url, configured))
    {
        Ok(addr) => addr,
        Err(problem) => {
            eprintln!("subtocall status: {problem}");
            return ExitCode::from(2);
        }
    };
    let body = match http_get(addr, "/status") {
        Ok((200, body)) => body,
        Ok((code, body)) => {
            eprintln!("subtocall status: {addr} answered {code}: {}", body.trim());
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("subtocall status: cannot ask {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let parsed: subtocall::status::Status = match serde_json::from_str(&body) {
        Ok(status) => status,
        Err(e) => {
            eprintln!("subtocall status: {addr} answered something else than /status: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{}", body.trim_end());
    } else {
        print!("{}", subtocall::status::render(&parsed));
    }
    if parsed.ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn dead_letters(config: &Config, request: &dead_letters::Request) -> ExitCode {
    let mut out = std::io::stdout().lock();
    run_command("dead-letters", dead_letters::run(config, request, &mut out))
}

fn replay_command(config: &Config, request: &retain::Request) -> ExitCode {
    let mut out = std::io::stdout().lock();
    run_command("replay", retain::replay(config, request, &mut out))
}

fn groups_command(config: &Config, request: &groups::Request) -> ExitCode {
    let mut out = std::io::stdout().lock();
    run_command("groups", groups::run(config, request, &mut out))
}

/// Runs one of the Redis commands on a runtime of its own; its error goes
/// to stderr, named after the command, with exit code 1.
fn run_command<T>(
    name: &str,
    command: impl std::future::Future<Output = Result<T, String>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("subtocall {name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("subtocall {name}: {e}");
            ExitCode::FAILURE
        }
    }
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
    let Some(addr) = config.http else {
        eprintln!("subtocall healthcheck: SUBTOCALL_HTTP_ADDR is off; nothing to ask");
        return ExitCode::FAILURE;
    };
    let addr = match listener_addr(None, Some(addr)) {
        Ok(addr) => addr,
        Err(problem) => {
            eprintln!("subtocall healthcheck: {problem}");
            return ExitCode::FAILURE;
        }
    };
    match http_get(addr, "/healthz") {
        Ok((200, _)) => ExitCode::SUCCESS,
        Ok((code, body)) => {
            eprintln!(
                "subtocall healthcheck: {addr} answered {code}: {}",
                body.trim()
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
    // One reload waiting is enough: SIGHUPs meanwhile read the same file.
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(watch_hangups(metrics.clone(), reload_tx));
    // The listener stops after the app has drained, so /metrics and /readyz
    // answer (not ready) during the drain.
    let http_stop = CancellationToken::new();
    // A few requests may wait; more are answered 503 at once.
    let (status_tx, status_rx) = tokio::sync::mpsc::channel(8);
    if let Some(addr) = config.http {
        match subtocall::http::bind(addr).await {
            Ok(listener) => {
                // With port 0, the port the system chose.
                let bound = listener.local_addr().unwrap_or(addr);
                tracing::info!(addr = %bound, "serving /metrics, /healthz, /readyz and /status");
                tokio::spawn(subtocall::http::serve(
                    listener,
                    metrics.clone(),
                    Some(status_tx),
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
    let result =
        subtocall::app::run(config, metrics, shutdown, Some(status_rx), Some(reload_rx)).await;
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

/// SIGHUP, the operator's reload habit: the loop reads the policy file
/// again (the variables are read only at start). It must not end the
/// process (its default action). Counted.
async fn watch_hangups(metrics: Arc<Metrics>, reload: tokio::sync::mpsc::Sender<()>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install the SIGHUP handler; SIGHUP would stop subtocall");
        return;
    };
    while hangup.recv().await.is_some() {
        metrics.reload_signals.inc();
        // Full: a reload is waiting already, and it reads the file as it
        // is now.
        let _ = reload.try_send(());
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Invocation, String> {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        parse_args(&args)
    }

    fn printed(args: &[&str]) -> String {
        match parse(args) {
            Ok(Invocation::Print(text)) => text,
            other => panic!("{args:?} gives {other:?}, not text to print"),
        }
    }

    #[test]
    fn a_command_alone_runs_it() {
        assert_eq!(parse(&[]), Ok(Invocation::Run(Command::Run)));
        assert_eq!(parse(&["check"]), Ok(Invocation::Run(Command::Check)));
        assert_eq!(
            parse(&["healthcheck"]),
            Ok(Invocation::Run(Command::HealthCheck))
        );
    }

    #[test]
    fn every_command_answers_help_with_its_usage_instead_of_running() {
        for help in ["--help", "-h"] {
            for (command, usage) in [
                ("check", "Usage: subtocall check\n"),
                ("healthcheck", "Usage: subtocall healthcheck\n"),
                ("version", "Usage: subtocall --version"),
                ("--version", "Usage: subtocall --version"),
                ("-V", "Usage: subtocall --version"),
                ("help", "SUBTOCALL_HTTP_ADDR"),
                ("--help", "SUBTOCALL_HTTP_ADDR"),
            ] {
                let text = printed(&[command, help]);
                assert!(
                    text.starts_with(usage) || text.contains(usage),
                    "{command} {help}: {text}"
                );
            }
        }
        assert!(printed(&["help", "check"]).starts_with("Usage: subtocall check\n"));
        assert!(printed(&["--help", "healthcheck"]).starts_with("Usage: subtocall healthcheck\n"));
        // --help wins over anything else after the command.
        assert!(printed(&["check", "--bogus", "-h"]).starts_with("Usage: subtocall check\n"));
    }

    #[test]
    fn arguments_no_command_takes_are_errors() {
        assert!(parse(&["serve"]).unwrap_err().contains("\"serve\""));
        assert!(parse(&["check", "now"]).unwrap_err().contains("\"now\""));
        assert!(parse(&["version", "2"]).is_err());
        assert!(
            parse(&["help", "serve"])
                .unwrap_err()
                .contains("not a command")
        );
        assert!(
            parse(&["help", "check", "now"])
                .unwrap_err()
                .contains("\"now\"")
        );
    }

    #[test]
    fn groups_and_replay_read_their_arguments_and_say_what_is_wrong() {
        assert_eq!(
            parse(&["groups", "list"]),
            Ok(Invocation::Run(Command::Groups(groups::Request::List)))
        );
        assert_eq!(
            parse(&["groups", "forget", "a.SUB_b", "--yes"]),
            Ok(Invocation::Run(Command::Groups(groups::Request::Forget {
                procedure: "a.SUB_b".into(),
                yes: true
            })))
        );
        assert!(parse(&["groups"]).unwrap_err().contains("list or forget"));
        assert!(parse(&["groups", "forget"]).is_err());
        assert!(parse(&["groups", "drop"]).unwrap_err().contains("\"drop\""));
        assert!(printed(&["groups", "--help"]).starts_with("Usage: subtocall groups"));

        let Ok(Invocation::Run(Command::Replay(r))) = parse(&[
            "replay",
            "--procedure",
            "a.SUB_b",
            "--since",
            "15m",
            "--until",
            "2026-12-06T10:00:00Z",
            "--dry-run",
        ]) else {
            panic!("replay parses");
        };
        assert_eq!(r.procedure, "a.SUB_b");
        assert_eq!(
            r.from,
            retain::Start::Since(std::time::Duration::from_secs(900))
        );
        assert!(r.until.is_some() && r.dry_run);
        let Ok(Invocation::Run(Command::Replay(r))) = parse(&[
            "replay",
            "--from",
            "2026-12-06T09:00:00Z",
            "--procedure",
            "a.SUB_b",
        ]) else {
            panic!("replay --from parses");
        };
        assert!(matches!(r.from, retain::Start::At(_)) && !r.dry_run);
        for (args, says) in [
            (&["replay", "--since", "1h"][..], "--procedure"),
            (&["replay", "--procedure", "p"][..], "--since"),
            (
                &["replay", "--procedure", "p", "--since", "soon"][..],
                "duration",
            ),
            (
                &["replay", "--procedure", "p", "--from", "today"][..],
                "RFC 3339",
            ),
            (
                &[
                    "replay",
                    "--procedure",
                    "p",
                    "--since",
                    "1h",
                    "--from",
                    "2026-12-06T09:00:00Z",
                ][..],
                "one of",
            ),
            (
                &["replay", "--procedure", "p", "--since"][..],
                "needs a value",
            ),
            (
                &[
                    "replay",
                    "--procedure",
                    "p",
                    "--since",
                    "1h",
                    "--bogus",
                    "x",
                ][..],
                "unknown option",
            ),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(says), "{args:?}: {e}");
        }
        assert!(printed(&["replay", "-h"]).starts_with("Usage: subtocall replay"));
    }

    #[test]
    fn version_prints_the_crate_version() {
        for arg in ["version", "--version", "-V"] {
            assert_eq!(
                printed(&[arg]),
                format!("subtocall {}\n", env!("CARGO_PKG_VERSION"))
            );
        }
    }
}
