//! What operators rely on, against the real router: `/metrics`, `/healthz`
//! and `/readyz` (including readiness while unreachable and while draining),
//! JSON logs, `subtocall check` with a good and an under-privileged role and
//! with Redis up (its version reported) or down, `subtocall healthcheck`,
//! `--help` for every command, and a token in the router URL that is never
//! logged.

mod support;

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use support::crossbar::LIMITED_USER;
use support::peers::{Invoke, Match};
use support::sidecar::{Sidecar, run_subtocall, sidecar_env};
use support::*;

const WAIT: Duration = Duration::from_secs(30);

/// Runs the binary with exactly `env` and `args`, to completion.
async fn subtocall(args: &[&str], env: &BTreeMap<String, String>) -> Output {
    run_subtocall(args, env, WAIT).await
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn backend(crossbar: &Crossbar, procedure: &str) -> BackendOptions {
    BackendOptions {
        invoke: Invoke::RoundRobin,
        ..BackendOptions::new(crossbar, &[procedure])
    }
}

#[tokio::test]
async fn check_lists_what_it_would_serve_and_passes_with_a_good_role() {
    let crossbar = Crossbar::start().await;
    let _exact = Backend::spawn(backend(&crossbar, "com.example.SUB_status")).await;
    let _audit = Backend::spawn(backend(&crossbar, "com.example.SUB_status__audit")).await;
    let _wild = Backend::spawn(BackendOptions {
        match_: Match::Wildcard,
        ..backend(&crossbar, "com.example..SUB_ev")
    })
    .await;
    let _prefix = Backend::spawn(BackendOptions {
        match_: Match::Prefix,
        ..backend(&crossbar, "com.example.pfx.SUB_p")
    })
    .await;
    let _plain = Backend::spawn(BackendOptions::new(&crossbar, &["com.example.plain"])).await;

    let output = subtocall(&["check"], &sidecar_env(&crossbar)).await;
    let report = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{report}");
    for line in [
        "[  ok  ] joined realm realm1",
        "[  ok  ] may subscribe to the wamp.registration.on_* meta events",
        "[  ok  ] may call wamp.registration.list",
        "[  ok  ] serves com.example.SUB_status (invoke roundrobin) <- topic com.example.status, default group",
        "[  ok  ] serves com.example.SUB_status__audit (invoke roundrobin) <- topic com.example.status, group audit",
        "[  ok  ] serves com.example..SUB_ev (invoke roundrobin) <- topic com.example..ev (wildcard)",
        "[ warn ] ignores com.example.pfx.SUB_p: a prefix registration",
        "subtocall would work with this configuration.",
    ] {
        assert!(report.contains(line), "missing {line:?} in:\n{report}");
    }
    assert!(
        !report.contains("com.example.plain"),
        "ordinary registrations are not listed:\n{report}"
    );
}

#[tokio::test]
async fn check_fails_with_an_under_privileged_role_and_names_the_permission_to_add() {
    let crossbar = Crossbar::start().await;
    let mut env = sidecar_env(&crossbar);
    env.insert("BACKEND_USERNAME".into(), LIMITED_USER.0.into());
    env.insert("BACKEND_SECRET".into(), LIMITED_USER.1.into());
    let output = subtocall(&["check"], &env).await;
    let report = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert!(
        report.contains(
            "[ FAIL ] role \"limited\" may not subscribe wamp.registration.on_create: \
             add 'subscribe' permission on wamp.registration.on_create to the role"
        ),
        "{report}"
    );
    assert!(
        report.contains("[ FAIL ] role \"limited\" may not call wamp.registration.list"),
        "{report}"
    );
    assert!(
        report.contains("problem(s): subtocall would not work"),
        "{report}"
    );
    assert!(
        !report.contains(LIMITED_USER.1),
        "secret printed:\n{report}"
    );
}

#[tokio::test]
async fn check_in_redis_mode_requires_redis() {
    let crossbar = Crossbar::start().await;
    let mut env = sidecar_env(&crossbar);
    env.insert("USE_REDIS_MQ".into(), "1".into());
    env.insert(
        "REDIS_URL".into(),
        format!("redis://127.0.0.1:{}", free_port()),
    );
    let down = subtocall(&["check"], &env).await;
    assert_eq!(down.status.code(), Some(1), "{}", stdout(&down));
    assert!(
        stdout(&down).contains("[ FAIL ] Redis at redis://127.0.0.1:"),
        "{}",
        stdout(&down)
    );

    let redis = Redis::start().await;
    env.insert("REDIS_URL".into(), redis.url());
    let up = subtocall(&["check"], &env).await;
    assert_eq!(up.status.code(), Some(0), "{}", stdout(&up));
    // The server's own word for its name and version (the refusal of an
    // older one is a unit test in src/check.rs).
    let line = format!(
        "[  ok  ] {} at {} answers PING",
        redis_server_version(),
        redis.url()
    );
    assert!(
        stdout(&up).contains(&line),
        "missing {line:?} in:\n{}",
        stdout(&up)
    );

    // The stream target: each stream with its groups, their lag and pending.
    let stream = "queue:com.example.SUB_checked";
    redis
        .command(&["XGROUP", "CREATE", stream, "backends", "0", "MKSTREAM"])
        .await;
    for _ in 0..3 {
        redis.command(&["XADD", stream, "*", "event", "{}"]).await;
    }
    redis
        .command(&[
            "XREADGROUP",
            "GROUP",
            "backends",
            "w1",
            "COUNT",
            "1",
            "STREAMS",
            stream,
            ">",
        ])
        .await;
    env.insert("SUBTOCALL_REDIS_TARGET".into(), "stream".into());
    let streams = subtocall(&["check"], &env).await;
    assert_eq!(streams.status.code(), Some(0), "{}", stdout(&streams));
    let line = format!(
        "[  ok  ] stream {stream}: 3 entries (at most 100000 unacknowledged); \
         group backends (1 consumers, 1 pending, lag 2)"
    );
    assert!(
        stdout(&streams).contains(&line),
        "missing {line:?} in:\n{}",
        stdout(&streams)
    );
}

/// "Redis 7.0.15" from `redis-server --version` ("Redis server v=7.0.15
/// sha=…"; Valkey's says "Valkey server v=…"), for the binary the test
/// fixture starts.
fn redis_server_version() -> String {
    let binary =
        std::env::var("SUBTOCALL_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
    let output = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{binary} --version: {e}"));
    let text = String::from_utf8_lossy(&output.stdout);
    let name = text.split_whitespace().next();
    let version = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix("v="));
    match (name, version) {
        (Some(name), Some(version)) => format!("{name} {version}"),
        _ => panic!("no name and v= in {text:?}"),
    }
}

#[tokio::test]
async fn check_with_invalid_configuration_exits_2_like_the_sidecar() {
    let mut env = BTreeMap::new();
    env.insert("SUBTOCALL_GRACE_PERIOD".to_owned(), "forever".to_owned());
    let output = subtocall(&["check"], &env).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("SUBTOCALL_GRACE_PERIOD"));
}

#[tokio::test]
async fn every_command_answers_help_with_its_usage_and_exit_0_without_reading_the_configuration() {
    // An invalid configuration would exit 2, and a real `check` would try
    // to reach a router: help must do neither.
    let mut env = BTreeMap::new();
    env.insert("SUBTOCALL_GRACE_PERIOD".to_owned(), "forever".to_owned());
    for help in ["--help", "-h"] {
        for (args, usage) in [
            (vec!["check", help], "Usage: subtocall check\n"),
            (vec!["healthcheck", help], "Usage: subtocall healthcheck\n"),
            (vec!["version", help], "Usage: subtocall --version"),
            (vec!["help", "check"], "Usage: subtocall check\n"),
            (vec![help], "Usage: subtocall [check | healthcheck"),
        ] {
            let output = subtocall(&args, &env).await;
            assert_eq!(output.status.code(), Some(0), "{args:?}: {output:?}");
            assert!(
                stdout(&output).contains(usage),
                "{args:?} prints {}",
                stdout(&output)
            );
        }
    }
    let extra = subtocall(&["check", "now"], &env).await;
    assert_eq!(extra.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&extra.stderr).contains("\"now\""));
}

#[tokio::test]
async fn metrics_health_and_readiness_report_a_working_sidecar() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let backend = Backend::spawn(backend(&crossbar, "com.example.SUB_m")).await;
    let sidecar = Sidecar::start_for(&crossbar, &[]);
    sidecar
        .wait_subscribed(&router, "com.example.m", WAIT)
        .await;
    assert_eq!(sidecar.http_get("/healthz").await.map(|r| r.0), Some(200));
    eventually(WAIT, "ready", || async {
        sidecar.is_ready().await.then_some(())
    })
    .await;

    Publisher::run(PublisherOptions::new(&crossbar, "com.example.m", 10))
        .await
        .assert_success();
    backend.wait_for_invocations(10, WAIT).await;
    eventually(WAIT, "forwarded counted", || async {
        (sidecar.metric("subtocall_events_forwarded_total").await == 10.0).then_some(())
    })
    .await;
    for (sample, value) in [
        ("subtocall_events_received_total", 10.0),
        ("subtocall_forward_latency_seconds_count", 10.0),
        ("subtocall_registrations_tracked", 1.0),
        ("subtocall_subscriptions_active", 1.0),
        ("subtocall_router_connected", 1.0),
        ("subtocall_ready", 1.0),
        ("subtocall_calls_in_flight", 0.0),
        ("subtocall_queue_depth", 0.0),
        (
            r#"subtocall_events_dead_lettered_total{reason="overflow"}"#,
            0.0,
        ),
    ] {
        assert_eq!(sidecar.metric(sample).await, value, "{sample}");
    }
    let (_, body) = sidecar.http_get("/metrics").await.unwrap();
    for name in [
        "subtocall_events_retried_total",
        "subtocall_events_duplicate_total",
        "subtocall_router_reconnects_total",
        "subtocall_router_connect_failures_total",
        "subtocall_redis_pushes_total",
        "subtocall_redis_errors_total",
        "subtocall_build_info",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics");
    }
    assert_eq!(sidecar.http_get("/nope").await.map(|r| r.0), Some(404));
}

/// SIGHUP, the reload habit, does not stop subtocall (the default action
/// of the signal would): it is counted and the sidecar goes on forwarding.
#[tokio::test]
async fn sighup_is_answered_and_the_sidecar_goes_on() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let backend = Backend::spawn(backend(&crossbar, "com.example.SUB_hup")).await;
    let sidecar = Sidecar::start_for(&crossbar, &[]);
    sidecar
        .wait_subscribed(&router, "com.example.hup", WAIT)
        .await;
    sidecar.wait_ready(WAIT).await;
    sidecar.signal(libc::SIGHUP);
    sidecar
        .wait_metric("subtocall_reload_signals_total", |n| n == 1.0, WAIT)
        .await;
    assert!(!sidecar.has_exited());
    Publisher::publish(&crossbar, "com.example.hup", 5).await;
    backend.wait_for_invocations(5, WAIT).await;
    assert!(sidecar.is_ready().await);
    assert!(!sidecar.has_exited());
}

#[tokio::test]
async fn readyz_is_503_while_the_router_is_unreachable_but_healthz_is_200() {
    let mut env = BTreeMap::new();
    env.insert(
        "WAMP_URL".to_owned(),
        format!("ws://127.0.0.1:{}/ws", free_port()),
    );
    let sidecar = Sidecar::start(env);
    sidecar
        .wait_metric(
            "subtocall_router_connect_failures_total",
            |n| n >= 1.0,
            WAIT,
        )
        .await;
    assert_eq!(sidecar.http_get("/healthz").await.map(|r| r.0), Some(200));
    assert_eq!(sidecar.http_get("/readyz").await.map(|r| r.0), Some(503));
}

#[tokio::test]
async fn a_token_in_the_wamp_url_query_is_never_logged() {
    let token = "t0ken-Quokka-4242";
    let mut env = BTreeMap::new();
    env.insert(
        "WAMP_URL".to_owned(),
        format!("ws://127.0.0.1:{}/ws?ticket={token}&x=1", free_port()),
    );
    env.insert("SUBTOCALL_LOG".to_owned(), "trace".to_owned());
    let sidecar = Sidecar::start(env);
    // The startup line and a connection error, both of which print the URL.
    sidecar
        .wait_metric(
            "subtocall_router_connect_failures_total",
            |n| n >= 1.0,
            WAIT,
        )
        .await;
    let log = sidecar.log();
    assert!(!log.contains(token), "{log}");
    assert!(log.contains("/ws?ticket=***&x=***"), "{log}");
}

#[tokio::test]
async fn readyz_turns_503_while_draining() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let slow = Backend::spawn(BackendOptions {
        delay_ms: 3000,
        ..backend(&crossbar, "com.example.SUB_drain")
    })
    .await;
    let mut sidecar = Sidecar::start_for(&crossbar, &[("SUBTOCALL_SHUTDOWN_TIMEOUT", "10s")]);
    sidecar
        .wait_subscribed(&router, "com.example.drain", WAIT)
        .await;
    Publisher::run(PublisherOptions::new(&crossbar, "com.example.drain", 1))
        .await
        .assert_success();
    slow.wait_for_invocations(1, WAIT).await;
    assert!(sidecar.is_ready().await);
    sidecar.signal(libc::SIGTERM);
    // Draining: the in-flight call takes 3 s, so the process is still alive.
    sidecar
        .wait_for("/readyz to answer 503 while draining", WAIT, || async {
            matches!(sidecar.http_get("/readyz").await, Some((503, _)))
        })
        .await;
    assert_eq!(
        sidecar.http_get("/readyz").await.map(|r| r.0),
        Some(503),
        "not ready while draining"
    );
    assert_eq!(
        sidecar.http_get("/healthz").await.map(|r| r.0),
        Some(200),
        "but alive"
    );
    assert_eq!(sidecar.wait_exit(WAIT).await.code(), Some(0));
    assert!(
        sidecar.log().contains("forwarded=1"),
        "the in-flight call finished during the drain"
    );
}

#[tokio::test]
async fn json_logs_are_one_json_object_per_line() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let _backend = Backend::spawn(backend(&crossbar, "com.example.SUB_j")).await;
    let mut sidecar = Sidecar::start_for(&crossbar, &[("SUBTOCALL_LOG_FORMAT", "json")]);
    sidecar
        .wait_subscribed(&router, "com.example.j", WAIT)
        .await;
    sidecar.terminate(WAIT).await;
    let log = sidecar.log();
    let mut lines = 0;
    for line in log.lines() {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            entry["level"].is_string() && entry["timestamp"].is_string(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines > 3, "{log}");
    assert!(log.contains("\"message\":\"joined the router; discovering SUB_ registrations\""));
    assert!(
        log.contains("\"authid\":\"backend\""),
        "fields are JSON fields: {log}"
    );
}

#[tokio::test]
async fn healthcheck_subcommand_asks_the_running_sidecar() {
    let crossbar = Crossbar::start().await;
    let sidecar = Sidecar::start_for(&crossbar, &[]);
    sidecar
        .wait_for("/healthz to answer 200", WAIT, || async {
            matches!(sidecar.http_get("/healthz").await, Some((200, _)))
        })
        .await;
    let mut env = BTreeMap::new();
    // A wildcard address is asked on loopback, as inside a container.
    env.insert(
        "SUBTOCALL_HTTP_ADDR".to_owned(),
        format!("0.0.0.0:{}", sidecar.http_port()),
    );
    assert_eq!(
        subtocall(&["healthcheck"], &env).await.status.code(),
        Some(0)
    );

    env.insert(
        "SUBTOCALL_HTTP_ADDR".to_owned(),
        format!("127.0.0.1:{}", free_port()),
    );
    let refused = subtocall(&["healthcheck"], &env).await;
    assert_eq!(refused.status.code(), Some(1));
    env.insert("SUBTOCALL_HTTP_ADDR".to_owned(), "off".to_owned());
    let off = subtocall(&["healthcheck"], &env).await;
    assert_eq!(off.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&off.stderr).contains("is off"));
}
