//! Tests of reading the configuration: each passes its own variables, never
//! the process environment.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// Distinctive, so a leak anywhere is easy to spot.
const SECRET: &str = "s3cr3t-Zebra-9137";

fn read(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let vars: HashMap<String, String> = pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    Config::from_vars(vars)
}

fn config(pairs: &[(&str, &str)]) -> Config {
    match read(pairs) {
        Ok(config) => config,
        Err(e) => panic!("expected a valid configuration, got:\n{e}"),
    }
}

fn problems(pairs: &[(&str, &str)]) -> Vec<Problem> {
    match read(pairs) {
        Ok(config) => panic!("expected problems with {pairs:?}, got {config:#?}"),
        Err(e) => e.problems().to_vec(),
    }
}

/// The one problem reported, which must be about `variable`.
fn problem(pairs: &[(&str, &str)], variable: &str) -> Problem {
    let problems = problems(pairs);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(problems[0].variable, variable, "{problems:#?}");
    problems[0].clone()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn millis(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A file under the system temp dir, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn with(contents: &str) -> TempFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "subtocall-config-test-{}-{}.pem",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).expect("temp file is writable");
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("temp paths are UTF-8 here")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// Any base64 between the markers is a "certificate" to the PEM reader.
const PEM: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUEXAMPLE=\n-----END CERTIFICATE-----\n";

#[test]
fn an_empty_environment_gives_the_documented_defaults() {
    let config = config(&[]);
    assert_eq!(config.wamp.url.as_str(), "ws://127.0.0.1:8080/ws");
    assert_eq!(config.wamp.realm, "realm1");
    assert_eq!(config.wamp.auth, Auth::Anonymous);
    assert_eq!(config.wamp.serializer, Serializer::MsgPack);
    assert_eq!(config.wamp.connect_timeout, secs(10));
    assert_eq!(config.wamp.ping_interval, secs(10));
    assert_eq!(config.wamp.ping_timeout, secs(5));
    assert_eq!(config.wamp.max_message_size, 16 * 1024 * 1024);
    assert_eq!(config.wamp.ca_file, None);

    assert_eq!(config.discovery.marker, "SUB_");
    assert!(config.discovery.filter.is_none());
    assert_eq!(config.discovery.grace_period, secs(60));

    assert_eq!(config.forward.mode, Mode::Wamp);
    assert_eq!(config.forward.call_timeout, secs(30));
    assert_eq!(config.forward.details_kwarg, None);
    assert_eq!(config.forward.max_in_flight, 256);
    assert_eq!(config.forward.queue_capacity, 10_000);
    assert_eq!(config.forward.overflow, Overflow::DropNewest);
    assert_eq!(
        config.forward.retry,
        RetryPolicy {
            max_attempts: 50,
            max_age: secs(120),
            initial_backoff: millis(100),
            max_backoff: secs(5),
        }
    );

    assert_eq!(config.redis.url.expose(), "redis://127.0.0.1:6379");
    assert_eq!(config.redis.prefix, "queue:");
    assert_eq!(config.redis.dead_letter_key, None);

    assert_eq!(
        config.reconnect,
        ReconnectConfig {
            initial_backoff: millis(200),
            max_backoff: secs(2),
            max_failures: None,
        }
    );
    assert_eq!(config.shutdown_timeout, secs(10));
    assert_eq!(config.http, Some("0.0.0.0:8910".parse().expect("valid")));
    assert_eq!(
        config.log,
        LogConfig {
            filter: "info".to_string(),
            format: LogFormat::Text,
        }
    );
    assert!(config.warnings().is_empty(), "{:?}", config.warnings());
}

#[test]
fn every_variable_can_be_set() {
    let ca = TempFile::with(PEM);
    let config = config(&[
        ("WAMP_URL", "wss://router.example.com:8443/ws"),
        ("CROSSBAR_REALM", "production"),
        ("BACKEND_USERNAME", "subtocall"),
        ("BACKEND_SECRET", SECRET),
        ("SUBTOCALL_AUTH_METHOD", "Ticket"),
        ("SUBTOCALL_SERIALIZER", "json"),
        ("SUBTOCALL_CONNECT_TIMEOUT", "3s"),
        ("SUBTOCALL_PING_INTERVAL", "20"),
        ("SUBTOCALL_PING_TIMEOUT", "1m"),
        ("SUBTOCALL_MAX_MESSAGE_SIZE", "512KiB"),
        ("SUBTOCALL_CA_FILE", ca.path()),
        ("SUBTOCALL_RECONNECT_INITIAL_BACKOFF", "1s"),
        ("SUBTOCALL_RECONNECT_MAX_BACKOFF", "1s"),
        ("SUBTOCALL_MAX_CONNECT_FAILURES", "5"),
        ("SUBTOCALL_MARKER", "SHARED_"),
        ("SUBTOCALL_REGISTRATION_FILTER", r"^com\.example\."),
        ("SUBTOCALL_GRACE_PERIOD", "0"),
        ("USE_REDIS_MQ", "YES"),
        ("SUBTOCALL_CALL_TIMEOUT", "1h 5m"),
        ("SUBTOCALL_DETAILS_KWARG", "_details"),
        ("SUBTOCALL_MAX_IN_FLIGHT", "65536"),
        ("SUBTOCALL_QUEUE_CAPACITY", "10_000_000"),
        ("SUBTOCALL_OVERFLOW", "drop-oldest"),
        ("SUBTOCALL_RETRY_MAX_ATTEMPTS", "1"),
        ("SUBTOCALL_RETRY_MAX_AGE", "10m"),
        ("SUBTOCALL_RETRY_INITIAL_BACKOFF", "50ms"),
        ("SUBTOCALL_RETRY_MAX_BACKOFF", "50ms"),
        ("SUBTOCALL_DEAD_LETTER_KEY", "subtocall:dead"),
        ("REDIS_URL", "rediss://redis.example.com:6380/2"),
        ("SUBTOCALL_REDIS_PREFIX", ""),
        ("SUBTOCALL_SHUTDOWN_TIMEOUT", "30s"),
        ("SUBTOCALL_HTTP_ADDR", "[::1]:9000"),
        ("SUBTOCALL_LOG", "warn,subtocall=debug"),
        ("SUBTOCALL_LOG_FORMAT", "JSON"),
    ]);
    assert_eq!(config.wamp.url.as_str(), "wss://router.example.com:8443/ws");
    assert_eq!(config.wamp.realm, "production");
    assert_eq!(
        config.wamp.auth,
        Auth::Ticket {
            authid: "subtocall".to_string(),
            ticket: Secret::new(SECRET),
        }
    );
    assert_eq!(config.wamp.serializer, Serializer::Json);
    assert_eq!(config.wamp.connect_timeout, secs(3));
    assert_eq!(config.wamp.ping_interval, secs(20));
    assert_eq!(config.wamp.ping_timeout, secs(60));
    assert_eq!(config.wamp.max_message_size, 512 * 1024);
    assert_eq!(config.wamp.ca_file, Some(ca.0.clone()));
    assert_eq!(config.reconnect.initial_backoff, secs(1));
    assert_eq!(config.reconnect.max_backoff, secs(1));
    assert_eq!(config.reconnect.max_failures, NonZeroU32::new(5));
    assert_eq!(config.discovery.marker, "SHARED_");
    let filter = config.discovery.filter.as_ref().expect("filter is set");
    assert!(filter.is_match("com.example.SHARED_status"));
    assert!(!filter.is_match("org.example.SHARED_status"));
    assert_eq!(config.discovery.grace_period, Duration::ZERO);
    assert_eq!(config.forward.mode, Mode::Redis);
    assert_eq!(config.forward.call_timeout, secs(3900));
    assert_eq!(config.forward.details_kwarg.as_deref(), Some("_details"));
    assert_eq!(config.forward.max_in_flight, 65_536);
    assert_eq!(config.forward.queue_capacity, 10_000_000);
    assert_eq!(config.forward.overflow, Overflow::DropOldest);
    assert_eq!(
        config.forward.retry,
        RetryPolicy {
            max_attempts: 1,
            max_age: secs(600),
            initial_backoff: millis(50),
            max_backoff: millis(50),
        }
    );
    assert_eq!(
        config.redis.dead_letter_key.as_deref(),
        Some("subtocall:dead")
    );
    assert_eq!(
        config.redis.url.expose(),
        "rediss://redis.example.com:6380/2"
    );
    assert!(config.redis.url.is_tls());
    assert_eq!(config.redis.prefix, "");
    assert_eq!(config.shutdown_timeout, secs(30));
    assert_eq!(config.http, Some("[::1]:9000".parse().expect("valid")));
    assert_eq!(config.log.filter, "warn,subtocall=debug");
    assert_eq!(config.log.format, LogFormat::Json);
    assert!(config.warnings().is_empty(), "{:?}", config.warnings());
}

#[test]
fn the_old_names_of_the_python_subtocall_are_read() {
    let config = config(&[
        ("REALM", "legacy"),
        ("REDIS_HOST", "redis.internal"),
        ("REDIS_PORT", "6380"),
        ("RUST_LOG", "debug"),
    ]);
    assert_eq!(config.wamp.realm, "legacy");
    assert_eq!(config.redis.url.expose(), "redis://redis.internal:6380");
    assert_eq!(config.log.filter, "debug");
    assert!(config.warnings().is_empty(), "{:?}", config.warnings());

    // Either part of the old Redis address alone, and IPv6 hosts.
    let config = self::config(&[("REDIS_PORT", "7000")]);
    assert_eq!(config.redis.url.expose(), "redis://127.0.0.1:7000");
    let config = self::config(&[("REDIS_HOST", "::1")]);
    assert_eq!(config.redis.url.expose(), "redis://[::1]:6379");
}

#[test]
fn the_new_name_wins_over_the_old_one_with_a_warning() {
    let config = config(&[
        ("CROSSBAR_REALM", "new"),
        ("REALM", "old"),
        ("REDIS_URL", "redis://new:6379"),
        ("REDIS_HOST", "old"),
        ("REDIS_PORT", "1"),
        ("SUBTOCALL_LOG", "warn"),
        ("RUST_LOG", "trace"),
    ]);
    assert_eq!(config.wamp.realm, "new");
    assert_eq!(config.redis.url.expose(), "redis://new:6379");
    assert_eq!(config.log.filter, "warn");
    assert_eq!(
        config.warnings(),
        [
            "REALM is ignored because CROSSBAR_REALM is set",
            "REDIS_HOST is ignored because REDIS_URL is set",
            "REDIS_PORT is ignored because REDIS_URL is set",
        ]
    );
}

#[test]
fn old_redis_port_must_be_between_1_and_65535() {
    for port in ["0", "65536", "http"] {
        let problem = problem(&[("REDIS_PORT", port)], "REDIS_PORT");
        assert!(problem.message.contains("1 to 65535"), "{problem}");
    }
    problem(&[("REDIS_HOST", "user:pw@host")], "REDIS_HOST");
}

#[test]
fn an_empty_rust_log_counts_as_unset_but_a_bad_one_is_reported_under_its_name() {
    assert_eq!(config(&[("RUST_LOG", "")]).log.filter, "info");
    let problem = problem(&[("RUST_LOG", "info,x=loud")], "RUST_LOG");
    assert!(problem.message.contains("RUST_LOG syntax"), "{problem}");
}

#[test]
fn use_redis_mq_accepts_the_usual_spellings_and_rejects_maybe() {
    for on in ["1", "true", "TRUE", "yes", "Yes", "on", " on "] {
        assert_eq!(
            config(&[("USE_REDIS_MQ", on)]).forward.mode,
            Mode::Redis,
            "{on}"
        );
    }
    for off in ["0", "false", "False", "no", "NO", "off"] {
        assert_eq!(
            config(&[("USE_REDIS_MQ", off)]).forward.mode,
            Mode::Wamp,
            "{off}"
        );
    }
    for bad in ["maybe", "", "2", "y"] {
        let problem = problem(&[("USE_REDIS_MQ", bad)], "USE_REDIS_MQ");
        assert_eq!(problem.value.as_deref(), Some(bad));
        assert_eq!(
            problem.message,
            "expected 1, true, yes, on, 0, false, no or off (any case)"
        );
    }
}

#[test]
fn bad_values_are_all_reported_at_once_by_name() {
    let error = read(&[
        ("WAMP_URL", "http://router/ws"),
        ("USE_REDIS_MQ", "maybe"),
        ("SUBTOCALL_CALL_TIMEOUT", "abc"),
        ("SUBTOCALL_SERIALIZER", "cbor"),
        ("SUBTOCALL_MAX_IN_FLIGHT", "0"),
        ("SUBTOCALL_OVERFLOW", "block"),
        ("SUBTOCALL_LOG_FORMAT", "xml"),
        ("SUBTOCALL_HTTP_ADDR", "localhost:8910"),
    ])
    .expect_err("every value here is bad");
    let named: Vec<&str> = error.problems().iter().map(|p| p.variable).collect();
    assert_eq!(
        named,
        [
            "WAMP_URL",
            "SUBTOCALL_SERIALIZER",
            "USE_REDIS_MQ",
            "SUBTOCALL_CALL_TIMEOUT",
            "SUBTOCALL_MAX_IN_FLIGHT",
            "SUBTOCALL_OVERFLOW",
            "SUBTOCALL_HTTP_ADDR",
            "SUBTOCALL_LOG_FORMAT",
        ]
    );
    let text = error.to_string();
    assert_eq!(text.lines().count(), 8, "{text}");
    assert!(
        text.lines().any(|line| line
            == r#"SUBTOCALL_CALL_TIMEOUT="abc": expected a duration of at least 100ms such as 30s or 500ms (a bare number means seconds)"#),
        "{text}"
    );
    assert!(
        text.lines().any(|line| line
            == r#"SUBTOCALL_MAX_IN_FLIGHT="0": is out of range; expected a whole number from 1 to 65536"#),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|line| line == r#"SUBTOCALL_SERIALIZER="cbor": expected msgpack or json"#),
        "{text}"
    );
}

#[test]
fn the_secret_never_appears_in_debug_or_in_errors() {
    let config = config(&[("BACKEND_USERNAME", "backend"), ("BACKEND_SECRET", SECRET)]);
    assert_eq!(
        config.wamp.auth,
        Auth::WampCra {
            authid: "backend".to_string(),
            secret: Secret::new(SECRET),
        }
    );
    let Auth::WampCra { secret, .. } = &config.wamp.auth else {
        unreachable!("checked above");
    };
    assert_eq!(secret.expose(), SECRET);
    assert_eq!(format!("{secret} {secret:?}"), "*** ***");
    for shown in [format!("{config:?}"), format!("{config:#?}")] {
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("***"), "{shown}");
    }

    // A bad value next to a set secret, and a bad secret: never the secret.
    let cases: [&[(&str, &str)]; 4] = [
        &[
            ("BACKEND_USERNAME", "backend"),
            ("BACKEND_SECRET", SECRET),
            ("SUBTOCALL_AUTH_METHOD", "kerberos"),
            ("SUBTOCALL_CALL_TIMEOUT", "abc"),
        ],
        &[
            ("BACKEND_SECRET", SECRET),
            ("SUBTOCALL_AUTH_METHOD", "wampcra"),
        ],
        &[("BACKEND_SECRET", ""), ("BACKEND_USERNAME", "backend")],
        &[
            ("BACKEND_SECRET", SECRET),
            ("WAMP_URL", "ws://backend:s3cr3t-Zebra-9137@router/ws"),
        ],
    ];
    for case in cases {
        let error = read(case).expect_err("each case has a problem");
        for shown in [error.to_string(), format!("{error:?}")] {
            assert!(!shown.contains(SECRET), "{shown}");
        }
    }
    let error = read(&[("BACKEND_SECRET", ""), ("BACKEND_USERNAME", "backend")])
        .expect_err("an empty secret is rejected");
    assert_eq!(
        error.to_string(),
        r#"BACKEND_SECRET="***": is empty; expected the WAMP-CRA secret or the ticket (not empty)"#
    );
}

#[test]
fn a_redis_url_password_is_hidden_in_debug_display_and_errors() {
    let config = config(&[("REDIS_URL", "redis://user:hunter2@redis:6379/0")]);
    assert_eq!(
        config.redis.url.expose(),
        "redis://user:hunter2@redis:6379/0"
    );
    assert_eq!(
        config.redis.url.to_string(),
        "redis://user:***@redis:6379/0"
    );
    assert_eq!(
        format!("{:?}", config.redis.url),
        r#"RedisUrl("redis://user:***@redis:6379/0")"#
    );
    assert!(!format!("{config:?}").contains("hunter2"));

    let config = self::config(&[("REDIS_URL", "unix:///run/redis.sock?db=1&pass=hunter2")]);
    assert_eq!(
        config.redis.url.to_string(),
        "unix:///run/redis.sock?db=1&pass=***"
    );

    for bad in [
        "http://:hunter2@redis:6379",
        "redis//:hunter2@redis",
        "redis://:hunter2@",
        "rediss://user:hunter2@[::1",
    ] {
        let problem = problem(&[("REDIS_URL", bad)], "REDIS_URL");
        let shown = problem.to_string();
        assert!(!shown.contains("hunter2"), "{shown}");
    }
    let problem = problem(&[("REDIS_URL", "http://:hunter2@redis:6379")], "REDIS_URL");
    assert_eq!(problem.value.as_deref(), Some("http://:***@redis:6379"));
}

#[test]
fn query_values_of_the_wamp_url_are_hidden_in_debug_display_and_errors() {
    let url = "wss://router.example.com/ws?token=hunter4&tenant=acme";
    let config = config(&[("WAMP_URL", url)]);
    assert_eq!(
        config.wamp.url.as_str(),
        url,
        "the whole URL to connect with"
    );
    assert_eq!(
        config.wamp.url.to_string(),
        "wss://router.example.com/ws?token=***&tenant=***"
    );
    for shown in [format!("{config:?}"), format!("{:?}", config.wamp.url)] {
        assert!(!shown.contains("hunter4"), "{shown}");
        assert!(shown.contains("?token=***"), "{shown}");
    }

    let problem = problem(
        &[("WAMP_URL", "http://router/ws?token=hunter4")],
        "WAMP_URL",
    );
    assert_eq!(problem.value.as_deref(), Some("http://router/ws?token=***"));
    assert!(!problem.to_string().contains("hunter4"), "{problem}");
}

#[test]
fn an_invalid_regex_is_reported_with_the_regex_error() {
    let problem = problem(
        &[("SUBTOCALL_REGISTRATION_FILTER", "com.(example")],
        "SUBTOCALL_REGISTRATION_FILTER",
    );
    assert_eq!(
        problem.message,
        "is not a valid regex: unclosed group; expected a regular expression (Rust regex crate syntax)"
    );
}

#[test]
fn bad_durations_sizes_and_addresses_are_rejected() {
    let cases = [
        ("SUBTOCALL_CALL_TIMEOUT", "0s", "below the minimum of 100ms"),
        (
            "SUBTOCALL_CONNECT_TIMEOUT",
            "ten seconds",
            "expected a duration of at least 100ms",
        ),
        ("SUBTOCALL_PING_INTERVAL", "0", "below the minimum of 100ms"),
        ("SUBTOCALL_PING_TIMEOUT", "-5s", "expected a duration"),
        ("SUBTOCALL_SHUTDOWN_TIMEOUT", "1y", "too long"),
        (
            "SUBTOCALL_GRACE_PERIOD",
            "1,5m",
            "expected a duration such as",
        ),
        ("SUBTOCALL_RETRY_MAX_AGE", "0", "below the minimum of 100ms"),
        ("SUBTOCALL_MAX_MESSAGE_SIZE", "16MB", "expected a size"),
        ("SUBTOCALL_MAX_MESSAGE_SIZE", "100", "out of range"),
        ("SUBTOCALL_MAX_MESSAGE_SIZE", "2GiB", "out of range"),
        ("SUBTOCALL_HTTP_ADDR", "8910", "expected an IP:port"),
        (
            "SUBTOCALL_HTTP_ADDR",
            "0.0.0.0:99999",
            "expected an IP:port",
        ),
        ("WAMP_URL", "ws://", "empty host"),
        ("WAMP_URL", "router:8080/ws", "scheme router://"),
        (
            "WAMP_URL",
            "ws://user:pw@router/ws",
            "user name or password",
        ),
        ("REDIS_URL", "redis://", "no host"),
        ("REDIS_URL", "unix://", "no socket path"),
        ("SUBTOCALL_QUEUE_CAPACITY", "10000001", "out of range"),
        ("SUBTOCALL_RETRY_MAX_ATTEMPTS", "0", "out of range"),
        (
            "SUBTOCALL_MAX_CONNECT_FAILURES",
            "-1",
            "expected a whole number",
        ),
        ("SUBTOCALL_MARKER", "SUB.", "contains `.`"),
        ("SUBTOCALL_MARKER", "", "is empty"),
        ("CROSSBAR_REALM", "realm 1", "spaces"),
        ("SUBTOCALL_DETAILS_KWARG", "", "is empty"),
        ("SUBTOCALL_DEAD_LETTER_KEY", "", "is empty"),
        ("BACKEND_USERNAME", "", "is empty"),
        ("SUBTOCALL_LOG", "info,subtocall=loud", "not a valid filter"),
    ];
    for (variable, value, expected) in cases {
        let problem = problem(&[(variable, value)], variable);
        assert!(
            problem.message.contains(expected),
            "{variable}={value:?} gave {problem}, expected {expected:?}"
        );
    }
}

#[test]
fn durations_below_their_lower_bound_are_rejected_naming_the_bound() {
    // Below these a setting does harm: a ping or reconnect loop, calls and
    // joins that cannot succeed, a drain that cannot drain.
    let bounds = [
        ("SUBTOCALL_CONNECT_TIMEOUT", "100ms"),
        ("SUBTOCALL_PING_INTERVAL", "100ms"),
        ("SUBTOCALL_PING_TIMEOUT", "100ms"),
        ("SUBTOCALL_RECONNECT_INITIAL_BACKOFF", "10ms"),
        ("SUBTOCALL_RECONNECT_MAX_BACKOFF", "100ms"),
        ("SUBTOCALL_CALL_TIMEOUT", "100ms"),
        ("SUBTOCALL_RETRY_MAX_AGE", "100ms"),
        ("SUBTOCALL_RETRY_INITIAL_BACKOFF", "10ms"),
        ("SUBTOCALL_RETRY_MAX_BACKOFF", "10ms"),
        ("SUBTOCALL_SHUTDOWN_TIMEOUT", "100ms"),
    ];
    for (variable, minimum) in bounds {
        for too_small in ["1ns", "0", "9ms"] {
            let problem = problem(&[(variable, too_small)], variable);
            let expected = format!(
                "is below the minimum of {minimum}; expected a duration of at least {minimum} "
            );
            assert!(
                problem.message.starts_with(&expected),
                "{variable}={too_small:?} gave {problem}"
            );
        }
        // The bound itself is fine (with the initial backoffs at theirs, so
        // that a maximum may be that low).
        config(&[
            ("SUBTOCALL_RECONNECT_INITIAL_BACKOFF", "10ms"),
            ("SUBTOCALL_RETRY_INITIAL_BACKOFF", "10ms"),
            (variable, minimum),
        ]);
    }
    // Zero stays allowed where it means something.
    assert_eq!(
        config(&[("SUBTOCALL_GRACE_PERIOD", "0")])
            .discovery
            .grace_period,
        Duration::ZERO
    );
}

#[test]
fn the_http_listener_can_be_turned_off() {
    assert_eq!(config(&[("SUBTOCALL_HTTP_ADDR", "off")]).http, None);
    assert_eq!(config(&[("SUBTOCALL_HTTP_ADDR", "OFF")]).http, None);
}

#[test]
fn the_ca_file_must_be_a_readable_pem_file() {
    let wss = ("WAMP_URL", "wss://router/ws");
    let ca = TempFile::with(PEM);
    let config = config(&[wss, ("SUBTOCALL_CA_FILE", ca.path())]);
    assert_eq!(config.wamp.ca_file.as_deref(), Some(ca.0.as_path()));

    let missing = problem(
        &[wss, ("SUBTOCALL_CA_FILE", "/nonexistent/ca.pem")],
        "SUBTOCALL_CA_FILE",
    );
    assert!(missing.message.starts_with("cannot be read"), "{missing}");

    let not_pem = TempFile::with("just some text\n");
    let problem = problem(
        &[wss, ("SUBTOCALL_CA_FILE", not_pem.path())],
        "SUBTOCALL_CA_FILE",
    );
    assert!(problem.message.starts_with("contains no PEM"), "{problem}");
}

#[test]
fn a_ca_file_with_a_plain_ws_url_warns_that_it_has_no_effect() {
    let ca = TempFile::with(PEM);
    let config = config(&[("SUBTOCALL_CA_FILE", ca.path())]);
    assert_eq!(
        config.warnings(),
        ["SUBTOCALL_CA_FILE has no effect because WAMP_URL is not wss://"]
    );
}

#[test]
fn a_max_backoff_below_the_initial_one_is_rejected() {
    let problem = problem(
        &[
            ("SUBTOCALL_RETRY_INITIAL_BACKOFF", "2s"),
            ("SUBTOCALL_RETRY_MAX_BACKOFF", "1s"),
        ],
        "SUBTOCALL_RETRY_MAX_BACKOFF",
    );
    assert_eq!(
        problem.to_string(),
        r#"SUBTOCALL_RETRY_MAX_BACKOFF="1s": must be at least SUBTOCALL_RETRY_INITIAL_BACKOFF (2s)"#
    );

    // The max left at its default (2s): the initial one is the culprit.
    let problem = self::problem(
        &[("SUBTOCALL_RECONNECT_INITIAL_BACKOFF", "3s")],
        "SUBTOCALL_RECONNECT_INITIAL_BACKOFF",
    );
    assert_eq!(
        problem.to_string(),
        r#"SUBTOCALL_RECONNECT_INITIAL_BACKOFF="3s": must be at most SUBTOCALL_RECONNECT_MAX_BACKOFF (2s, its default)"#
    );
}

#[test]
fn a_username_without_a_secret_is_rejected_for_wampcra_and_ticket() {
    let problem = problem(&[("BACKEND_USERNAME", "backend")], "BACKEND_SECRET");
    assert_eq!(
        problem.to_string(),
        "BACKEND_SECRET: is required when SUBTOCALL_AUTH_METHOD is wampcra"
    );
    self::problem(
        &[
            ("BACKEND_USERNAME", "backend"),
            ("SUBTOCALL_AUTH_METHOD", "ticket"),
        ],
        "BACKEND_SECRET",
    );

    // Asking for wampcra without any credentials names both.
    let named: Vec<&str> = problems(&[("SUBTOCALL_AUTH_METHOD", "wampcra")])
        .iter()
        .map(|p| p.variable)
        .collect();
    assert_eq!(named, ["BACKEND_USERNAME", "BACKEND_SECRET"]);
}

#[test]
fn credentials_that_will_not_be_used_give_a_warning() {
    let config = config(&[("BACKEND_SECRET", SECRET)]);
    assert_eq!(config.wamp.auth, Auth::Anonymous);
    assert_eq!(
        config.warnings(),
        ["BACKEND_USERNAME and BACKEND_SECRET are ignored: authenticating anonymously"]
    );

    let config = self::config(&[
        ("BACKEND_USERNAME", "backend"),
        ("SUBTOCALL_AUTH_METHOD", "anonymous"),
    ]);
    assert_eq!(config.wamp.auth, Auth::Anonymous);
    assert_eq!(config.warnings().len(), 1);
}

#[test]
fn an_unknown_subtocall_variable_warns_with_a_suggestion() {
    let config = config(&[
        ("SUBTOCALL_CALLTIMEOUT", "5s"),
        ("SUBTOCALL_RETRY_MAX_ATEMPTS", "3"),
        ("SUBTOCALL_REDIS_URL", "redis://x"),
        ("subtocall_log", "debug"),
        ("SUBTOCALL_WHATEVER", "1"),
        ("OTHER_VARIABLE", "ignored silently"),
    ]);
    assert_eq!(
        config.warnings(),
        [
            "unknown variable SUBTOCALL_CALLTIMEOUT is ignored; did you mean SUBTOCALL_CALL_TIMEOUT?",
            "unknown variable SUBTOCALL_REDIS_URL is ignored; did you mean REDIS_URL?",
            "unknown variable SUBTOCALL_RETRY_MAX_ATEMPTS is ignored; did you mean SUBTOCALL_RETRY_MAX_ATTEMPTS?",
            "unknown variable SUBTOCALL_WHATEVER is ignored; `subtocall --help` lists the known ones",
            "unknown variable subtocall_log is ignored; did you mean SUBTOCALL_LOG?",
        ]
    );
    // Warned about, and really not used.
    assert_eq!(config.forward.call_timeout, secs(30));
    assert_eq!(config.log.filter, "info");
}

#[test]
fn names_are_case_sensitive() {
    let config = config(&[("wamp_url", "ws://elsewhere/ws"), ("realm", "lower")]);
    assert_eq!(config.wamp.url.as_str(), "ws://127.0.0.1:8080/ws");
    assert_eq!(config.wamp.realm, "realm1");
}

#[test]
fn every_known_name_is_read_from_its_own_field() {
    for name in known_names() {
        let sentinel = format!("value-of-{name}");
        let raw: RawVars = envy::from_iter([(name.to_string(), sentinel.clone())])
            .expect("Option<String> fields always deserialize");
        for other in known_names() {
            let expected = (other == name).then_some(sentinel.as_str());
            assert_eq!(raw.get(other), expected, "setting {name}, reading {other}");
        }
    }
}

#[test]
fn every_table_default_parses() {
    // Also covered by the empty environment test; this names the culprit.
    for var in VARS {
        if let DefaultValue::Value(default) = var.default {
            let result = read(&[(var.name, default)]);
            assert!(
                result.is_ok(),
                "{} default {default:?}: {result:?}",
                var.name
            );
        }
    }
}

#[test]
fn help_text_mentions_every_variable_and_its_default() {
    let help = help_text();
    assert!(help.starts_with("subtocall: "), "{help}");
    assert!(help.contains("Usage: subtocall"), "{help}");
    for var in VARS {
        let line = format!("  {}  [default: {}]", var.name, var.default.text());
        assert!(
            help.lines().any(|l| l == line),
            "missing {line:?} in\n{help}"
        );
        for old in var.old_names {
            assert!(help.contains(old), "missing old name {old}");
        }
    }
    for old in ["REDIS_HOST", "REDIS_PORT", "RUST_LOG"] {
        assert!(help.contains(old), "missing {old}");
    }
    assert!(help.lines().all(|line| line.len() <= 100), "{help}");
}

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/doc/configuration.md");
const BEGIN: &str = "<!-- BEGIN GENERATED: config::markdown_reference() -->\n";
const END: &str = "<!-- END GENERATED -->";

/// The generated block of `doc/configuration.md` and the text around it.
fn doc_parts() -> (String, String, String) {
    let doc = std::fs::read_to_string(DOC).expect("doc/configuration.md is readable");
    let (before, rest) = doc.split_once(BEGIN).expect("the doc has the BEGIN marker");
    let (block, after) = rest.split_once(END).expect("the doc has the END marker");
    (before.to_string(), block.to_string(), after.to_string())
}

#[test]
fn the_configuration_doc_matches_the_table() {
    let (_, block, _) = doc_parts();
    let expected = markdown_reference();
    assert!(
        block == expected,
        "doc/configuration.md is out of date with src/config/vars.rs. Regenerate it with\n\
         \n    cargo test --lib regenerate_configuration_doc -- --ignored\n\n\
         or put this between the markers:\n\n{expected}"
    );
}

/// Rewrites the generated block of `doc/configuration.md` from the table.
#[test]
#[ignore = "writes doc/configuration.md; run by hand after changing the table"]
fn regenerate_configuration_doc() {
    let (before, _, after) = doc_parts();
    let doc = format!("{before}{BEGIN}{}{END}{after}", markdown_reference());
    std::fs::write(DOC, doc).expect("doc/configuration.md is writable");
}

#[test]
fn from_env_reads_the_process_environment_like_from_vars() {
    let from_env = Config::from_env().map(|c| format!("{c:?}"));
    let from_vars = Config::from_vars(std::env::vars()).map(|c| format!("{c:?}"));
    assert_eq!(from_env, from_vars);
}

#[test]
fn a_value_that_is_not_utf8_is_reported_by_name() {
    let error = super::read(
        Vec::new(),
        vec!["WAMP_URL".to_string(), "SUBTOCALL_TYPO".to_string()],
    )
    .expect_err("a known variable that is not UTF-8 is a problem");
    assert_eq!(error.to_string(), "WAMP_URL: is not valid UTF-8");
}

#[test]
fn config_can_be_shared_between_tasks() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync::<Config>();
    assert_send_sync::<ConfigError>();
}

#[test]
fn ordering_is_read_and_partitioned_on_the_redis_queue() {
    assert_eq!(config(&[]).forward.order_by, OrderBy::None);
    assert_eq!(
        config(&[("SUBTOCALL_ORDER_BY", "kwarg:client")])
            .forward
            .order_by,
        OrderBy::Kwarg("client".into())
    );
    problem(&[("SUBTOCALL_ORDER_BY", "client")], "SUBTOCALL_ORDER_BY");
    let on_redis = config(&[
        ("SUBTOCALL_ORDER_BY", "topic"),
        ("SUBTOCALL_QUEUE", "redis"),
        ("SUBTOCALL_ORDER_PARTITIONS", "4"),
    ]);
    assert_eq!(on_redis.forward.order_by, OrderBy::Topic);
    assert_eq!(on_redis.queue.partitions, 4);
    assert_eq!(config(&[]).queue.partitions, 16);
    problem(
        &[("SUBTOCALL_ORDER_PARTITIONS", "0")],
        "SUBTOCALL_ORDER_PARTITIONS",
    );
}

#[test]
fn the_group_separator_is_a_word_without_dots() {
    assert_eq!(config(&[]).discovery.group_separator, "__");
    assert_eq!(
        config(&[("SUBTOCALL_GROUP_SEPARATOR", "--")])
            .discovery
            .group_separator,
        "--"
    );
    problem(
        &[("SUBTOCALL_GROUP_SEPARATOR", "a.b")],
        "SUBTOCALL_GROUP_SEPARATOR",
    );
}

#[test]
fn sentinel_settings_are_read_and_checked_together() {
    let c = config(&[
        (
            "SUBTOCALL_REDIS_SENTINELS",
            "10.0.0.1:26379, [::1]:26380,s3:1",
        ),
        ("SUBTOCALL_REDIS_SENTINEL_MASTER", "mymaster"),
        ("SUBTOCALL_REDIS_SENTINEL_PASSWORD", SECRET),
    ]);
    let s = c.redis.sentinel.as_ref().expect("Sentinel configured");
    assert_eq!(
        s.sentinels,
        [
            ("10.0.0.1".to_owned(), 26379),
            ("::1".to_owned(), 26380),
            ("s3".to_owned(), 1)
        ]
    );
    assert_eq!(s.master, "mymaster");
    assert_eq!(s.password.as_ref().map(Secret::expose), Some(SECRET));
    assert!(!format!("{c:?}").contains(SECRET));
    assert_eq!(config(&[]).redis.sentinel, None);

    let p = problem(
        &[("SUBTOCALL_REDIS_SENTINELS", "s1:26379")],
        "SUBTOCALL_REDIS_SENTINEL_MASTER",
    );
    assert!(p.message.contains("required"), "{p:?}");
    let p = problem(
        &[("SUBTOCALL_REDIS_SENTINEL_MASTER", "m")],
        "SUBTOCALL_REDIS_SENTINEL_MASTER",
    );
    assert!(p.message.contains("only used with"), "{p:?}");
    let p = problem(
        &[
            ("SUBTOCALL_REDIS_SENTINELS", "s1:26379"),
            ("SUBTOCALL_REDIS_SENTINEL_MASTER", "m"),
            ("SUBTOCALL_REDIS_CLUSTER", "1"),
        ],
        "SUBTOCALL_REDIS_SENTINELS",
    );
    assert!(p.message.contains("SUBTOCALL_REDIS_CLUSTER"), "{p:?}");
    for bad in ["s1", "s1:0", "s1:65536", ":26379", "::1:26379", "s1:26379,"] {
        let p = problem(
            &[
                ("SUBTOCALL_REDIS_SENTINELS", bad),
                ("SUBTOCALL_REDIS_SENTINEL_MASTER", "m"),
            ],
            "SUBTOCALL_REDIS_SENTINELS",
        );
        assert!(p.message.contains("port"), "{bad}: {p:?}");
    }
}

#[test]
fn retention_and_new_group_start_are_read_and_checked_together() {
    let c = config(&[
        ("SUBTOCALL_QUEUE", "redis"),
        ("SUBTOCALL_RETENTION", "1h"),
        ("SUBTOCALL_RETENTION_MAX_EVENTS", "5000"),
        ("SUBTOCALL_NEW_GROUP_START", "retained"),
    ]);
    assert_eq!(c.queue.retention, Duration::from_secs(3600));
    assert_eq!(c.queue.retention_max_events, 5000);
    assert_eq!(c.queue.new_group_start, GroupStart::Retained);
    let defaults = config(&[]);
    assert_eq!(defaults.queue.retention, Duration::ZERO);
    assert_eq!(defaults.queue.retention_max_events, 1_000_000);
    assert_eq!(defaults.queue.new_group_start, GroupStart::Now);

    let p = problem(&[("SUBTOCALL_RETENTION", "1h")], "SUBTOCALL_RETENTION");
    assert!(p.message.contains("SUBTOCALL_QUEUE=redis"), "{p:?}");
    let p = problem(
        &[
            ("SUBTOCALL_QUEUE", "redis"),
            ("SUBTOCALL_NEW_GROUP_START", "retained"),
        ],
        "SUBTOCALL_NEW_GROUP_START",
    );
    assert!(p.message.contains("SUBTOCALL_RETENTION"), "{p:?}");
    let p = problem(
        &[("SUBTOCALL_NEW_GROUP_START", "yesterday")],
        "SUBTOCALL_NEW_GROUP_START",
    );
    assert!(
        p.message.contains("now") && p.message.contains("retained"),
        "{p:?}"
    );
    problem(
        &[("SUBTOCALL_RETENTION_MAX_EVENTS", "0")],
        "SUBTOCALL_RETENTION_MAX_EVENTS",
    );
}
