//! Smoke tests of the integration-test harness itself (`tests/support`, `tests/peers`):
//! the Crossbar and Redis fixtures start, stop and restart on their port, the three-master
//! Redis Cluster fixture spreads hash-tagged keys over its masters, the autobahn
//! peers exchange calls and events with bytes intact, WAMP-CRA (plain and salted) and
//! roles work as configured, the backend peer rejects or serialises calls on demand, a
//! killed sidecar restarts on its port, the meta-API session sees subscribers, and TLS
//! serves wss:// with the generated certificate.

mod support;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt as _;
use std::time::Duration;

use serde_json::{Value, json};
use support::crossbar::{BACKEND_USER, LIMITED_USER, SALTED_USER, write_router_config};
use support::peers::{Connection, Invoke, Match, publisher_blob, user};
use support::redis::RedisCluster;
use support::resp::{self, Reply};
use support::sidecar::Sidecar;
use support::*;

/// Generous cap for anything that should take well under a second.
const WAIT: Duration = Duration::from_secs(20);

fn connection(crossbar: &Crossbar, serializer: Serializer, auth: (&str, &str)) -> Connection {
    Connection {
        serializer,
        auth: user(auth),
        ..Connection::to(crossbar)
    }
}

#[tokio::test]
async fn crossbar_fixture_serves_wamp_stops_and_restarts_on_the_same_port() {
    let mut crossbar = Crossbar::start().await;
    let port = crossbar.port();
    assert_eq!(crossbar.url(), format!("ws://127.0.0.1:{port}/ws"));
    assert_eq!(crossbar.realm(), "realm1");
    assert!(crossbar.pid().is_some());

    let subscriber =
        Subscriber::spawn(SubscriberOptions::new(&crossbar, "com.example.smoke")).await;

    crossbar.stop().await;
    assert!(crossbar.pid().is_none());
    assert!(
        port_is_closed(port).await,
        "port {port} still open after stop()"
    );
    // The router closing the session ends the subscriber with code 5.
    let mut subscriber = subscriber;
    assert_eq!(subscriber.wait_exit(WAIT).await.code(), Some(5));

    crossbar.start_again().await;
    assert_eq!(crossbar.port(), port);
    assert!(!port_is_closed(port).await);
    let subscriber =
        Subscriber::spawn(SubscriberOptions::new(&crossbar, "com.example.smoke")).await;
    let published = Publisher::run(PublisherOptions::new(&crossbar, "com.example.smoke", 1)).await;
    published.assert_success();
    subscriber.wait_for_events(1, WAIT).await;
    assert_eq!(
        crossbar
            .log()
            .matches("subtocall test fixture: starting")
            .count(),
        2,
        "log: {}",
        crossbar.log()
    );
}

async fn peers_exchange_calls_and_events_with_bytes(serializer: Serializer) {
    let crossbar = Crossbar::start().await;
    let topic = "com.example.topic";
    let backend = Backend::spawn(BackendOptions {
        connection: connection(&crossbar, serializer, BACKEND_USER),
        name: "echo".to_owned(),
        ..BackendOptions::new(&crossbar, &["com.example.echo"])
    })
    .await;
    let subscriber = Subscriber::spawn(SubscriberOptions {
        connection: Connection {
            serializer,
            ..Connection::to(&crossbar)
        },
        ..SubscriberOptions::new(&crossbar, topic)
    })
    .await;

    let published = Publisher::run(PublisherOptions {
        connection: connection(&crossbar, serializer, BACKEND_USER),
        with_bytes: true,
        ..PublisherOptions::new(&crossbar, topic, 3)
    })
    .await;
    published.assert_success();
    assert_eq!(published.done().expect("done line")["count"], json!(3));
    let publications: Vec<Value> = published
        .lines_with("published")
        .iter()
        .map(|line| line["publication"].clone())
        .collect();
    assert_eq!(publications.len(), 3);

    let events = subscriber.wait_for_events(3, WAIT).await;
    assert_eq!(events.len(), 3, "events: {events:?}");
    for (i, event) in (0u32..).zip(&events) {
        let blob = wamp_bytes(&publisher_blob(i));
        assert_eq!(event["topic"], json!(topic));
        assert_eq!(
            event["args"],
            json!([i, "hello", {"nested": [1, 2.5, null, true]}, blob])
        );
        assert_eq!(
            event["kwargs"],
            json!({"seq": i, "key": "value", "blob": blob})
        );
        assert_eq!(event["publication"], publications[i as usize]);
        // The backend role discloses publishers.
        assert_eq!(event["publisher_authid"], json!("backend"));
    }

    let blob = wamp_bytes(&[0x00, 0xff, 0x10, 0x80]);
    let called = Caller::run(CallerOptions {
        connection: Connection {
            serializer,
            ..Connection::to(&crossbar)
        },
        payload: Some(json!({"args": [blob, "second"], "kwargs": {"b": blob}})),
        ..CallerOptions::new(&crossbar, "com.example.echo", 1)
    })
    .await;
    called.assert_success();
    let results = called.lines_with("call");
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["args"], json!(["echo", blob]), "{results:?}");

    let invocations = backend.wait_for_invocations(1, WAIT).await;
    assert_eq!(invocations[0]["procedure"], json!("com.example.echo"));
    assert_eq!(invocations[0]["args"], json!([blob, "second"]));
    assert_eq!(invocations[0]["kwargs"], json!({"b": blob}));
    // The public role does not disclose callers.
    assert_eq!(invocations[0]["caller"], Value::Null);
}

#[tokio::test]
async fn autobahn_peers_keep_bytes_intact_over_json() {
    peers_exchange_calls_and_events_with_bytes(Serializer::Json).await;
}

#[tokio::test]
async fn autobahn_peers_keep_bytes_intact_over_msgpack() {
    peers_exchange_calls_and_events_with_bytes(Serializer::Msgpack).await;
}

#[tokio::test]
async fn salted_and_plain_wampcra_users_join_and_roles_apply() {
    let crossbar = Crossbar::start().await;
    let procedure = "com.example.shared";
    let plain = Backend::spawn(BackendOptions {
        connection: connection(&crossbar, Serializer::Json, BACKEND_USER),
        name: "plain".to_owned(),
        invoke: Invoke::RoundRobin,
        ..BackendOptions::new(&crossbar, &[procedure])
    })
    .await;
    let salted = Backend::spawn(BackendOptions {
        connection: connection(&crossbar, Serializer::Msgpack, SALTED_USER),
        name: "salted".to_owned(),
        invoke: Invoke::RoundRobin,
        ..BackendOptions::new(&crossbar, &[procedure])
    })
    .await;
    assert!(
        salted.stderr().contains("salted WAMP-CRA challenge"),
        "the salted user did not get a salted challenge: {}",
        salted.stderr()
    );
    assert_eq!(
        plain.registration_id(procedure),
        salted.registration_id(procedure),
        "both callees share one registration"
    );

    let called = Caller::run(CallerOptions {
        connection: connection(&crossbar, Serializer::Json, BACKEND_USER),
        ..CallerOptions::new(&crossbar, procedure, 4)
    })
    .await;
    called.assert_success();
    assert_eq!(called.done().expect("done line")["errors"], json!(0));
    for backend in [&plain, &salted] {
        let invocations = backend.wait_for_invocations(2, WAIT).await;
        assert_eq!(invocations.len(), 2, "roundrobin splits 4 calls 2/2");
        assert!(
            invocations
                .iter()
                .all(|inv| inv["caller_authid"] == json!("backend")),
            "the backend role discloses callers: {invocations:?}"
        );
    }

    // A wrong secret must be refused, or the tests above prove nothing about auth.
    let refused = Backend::try_spawn(BackendOptions {
        connection: connection(&crossbar, Serializer::Json, ("salted", "wrong")),
        ..BackendOptions::new(&crossbar, &["com.example.refused"])
    })
    .await
    .err()
    .expect("a wrong salted secret must not join");
    assert_eq!(refused.status.code(), Some(2));
    assert!(refused.stderr.contains("wamp.error.not_authorized"));

    // `limited` may register under com. but has no meta-API permission at all.
    let limited = Backend::spawn(BackendOptions {
        connection: connection(&crossbar, Serializer::Json, LIMITED_USER),
        ..BackendOptions::new(&crossbar, &["com.example.limited"])
    })
    .await;
    assert!(limited.registration_id("com.example.limited") > 0);
    let meta = Subscriber::try_spawn(SubscriberOptions {
        connection: connection(&crossbar, Serializer::Json, LIMITED_USER),
        ..SubscriberOptions::new(&crossbar, "wamp.registration.on_create")
    })
    .await
    .err()
    .expect("limited must not subscribe to meta events");
    let refusal = &meta.lines_with("subscribe_error")[0]["error"];
    assert!(
        refusal
            .as_str()
            .is_some_and(|e| e.contains("not_authorized")),
        "{refusal}"
    );
}

#[tokio::test]
async fn backend_peer_rejects_dies_and_reregisters_on_command() {
    let crossbar = Crossbar::start().await;
    let procedure = "com.example.flaky";
    let mut backend = Backend::spawn(BackendOptions {
        connection: connection(&crossbar, Serializer::Json, BACKEND_USER),
        error_on_call: Some(2),
        die_on_call: Some(3),
        ..BackendOptions::new(&crossbar, &[procedure])
    })
    .await;
    let call_once = || Caller::run(CallerOptions::new(&crossbar, procedure, 1));

    let first = call_once().await;
    assert_eq!(first.lines_with("call")[0]["args"], json!(["backend", 0]));
    let second = call_once().await;
    assert_eq!(
        second.lines_with("call")[0]["error"],
        json!("com.example.error.rejected")
    );
    assert_eq!(
        backend.wait_for_invocations(2, WAIT).await[1]["errored"],
        json!(true)
    );

    let registration = backend.registration_id(procedure);
    backend.unregister().await;
    let unregistered = call_once().await;
    assert_eq!(
        unregistered.lines_with("call")[0]["error"],
        json!("wamp.error.no_such_procedure")
    );
    backend.register().await;
    assert_ne!(backend.registration_id(procedure), registration);

    let third = call_once().await;
    let error = third.lines_with("call")[0]["error"].clone();
    assert!(
        error.as_str().is_some_and(|e| e.starts_with("wamp.error.")),
        "a callee dying mid-call must fail the call: {error}"
    );
    assert_eq!(backend.wait_exit(WAIT).await.code(), Some(3));
    assert_eq!(backend.wait_for_invocations(3, WAIT).await.len(), 3);
}

#[tokio::test]
async fn backend_peer_rejects_every_call_while_told_to_and_can_take_one_call_at_a_time() {
    let crossbar = Crossbar::start().await;
    let procedure = "com.example.serial";
    let mut backend = Backend::spawn(BackendOptions {
        connection: connection(&crossbar, Serializer::Json, BACKEND_USER),
        delay_ms: 100,
        concurrency: Some(1),
        ..BackendOptions::new(&crossbar, &[procedure])
    })
    .await;
    let calls = |count| Caller::run(CallerOptions::new(&crossbar, procedure, count));

    backend.reject_calls(true).await;
    let rejected = calls(2).await;
    for answer in rejected.lines_with("call") {
        assert_eq!(
            answer["error"],
            json!("com.example.error.rejected"),
            "{answer}"
        );
    }
    backend.reject_calls(false).await;
    let answered = calls(3).await;
    for answer in answered.lines_with("call") {
        assert_eq!(answer["args"][0], json!("backend"), "{answer}");
    }

    let invocations = backend.wait_for_invocations(5, WAIT).await;
    let errored: Vec<bool> = invocations
        .iter()
        .map(|i| i["errored"] == json!(true))
        .collect();
    assert_eq!(errored, [true, true, false, false, false]);
    // Made concurrently, handled one after the other: each starts once the
    // one before has slept its 100 ms.
    let starts: Vec<f64> = invocations[2..]
        .iter()
        .map(|i| i["at"].as_f64().expect("at"))
        .collect();
    for pair in starts.windows(2) {
        assert!(pair[1] - pair[0] >= 0.09, "overlapping calls: {starts:?}");
    }
}

#[tokio::test]
async fn a_killed_sidecar_restarts_with_its_environment_and_http_port() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let backend = Backend::spawn(BackendOptions::new(&crossbar, &["com.example.SUB_again"])).await;
    let topic = "com.example.again";
    let mut sidecar = Sidecar::start_for(&crossbar, &[]);
    sidecar.wait_subscribed(&router, topic, WAIT).await;
    let (port, pid) = (sidecar.http_port(), sidecar.pid());

    let status = sidecar.kill().await;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(sidecar.has_exited());
    eventually(WAIT, "the killed sidecar's subscription gone", || async {
        router.subscribers(topic).await.is_empty().then_some(())
    })
    .await;

    sidecar.restart();
    assert_ne!(sidecar.pid(), pid);
    sidecar.wait_subscribed(&router, topic, WAIT).await;
    assert_eq!(sidecar.http_port(), port);
    assert_eq!(sidecar.http_get("/healthz").await.map(|r| r.0), Some(200));
    Publisher::run(PublisherOptions::new(&crossbar, topic, 1))
        .await
        .assert_success();
    backend.wait_for_invocations(1, WAIT).await;
    assert_eq!(
        sidecar.log().matches("restarted by the test").count(),
        1,
        "one log file for both runs"
    );
}

#[tokio::test]
async fn router_meta_session_sees_exact_and_wildcard_subscribers_come_and_go() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    assert!(router.subscribers("com.example.watched").await.is_empty());
    let mut exact =
        Subscriber::spawn(SubscriberOptions::new(&crossbar, "com.example.watched")).await;
    let wildcard = Subscriber::spawn(SubscriberOptions {
        match_: Match::Wildcard,
        ..SubscriberOptions::new(&crossbar, "com.example..watched")
    })
    .await;
    assert_eq!(router.subscribers("com.example.watched").await.len(), 1);
    assert_eq!(router.subscribers("com.example..watched").await.len(), 1);
    assert_eq!(
        router.call("wamp.no_such.procedure", json!([])).await,
        Err("wamp.error.no_such_procedure".to_owned())
    );

    exact.terminate().await;
    eventually(WAIT, "the exact subscription gone", || async {
        router
            .subscribers("com.example.watched")
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    assert_eq!(router.subscribers("com.example..watched").await.len(), 1);
    drop(wildcard);
}

#[tokio::test]
async fn redis_fixture_answers_stops_and_restarts_on_the_same_port() {
    let mut redis = Redis::start().await;
    let port = redis.port();
    assert_ne!(port, 6379, "never the shared redis");
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
    assert!(redis.ping().await);
    let pushed = redis
        .command(&["RPUSH", "events", r#"{"seq":1,"b":"\u0000AQ=="}"#])
        .await;
    assert_eq!(pushed, Reply::Integer(1));
    let length = eventually(WAIT, "one element in the list", || async {
        Some(redis.llen("events").await).filter(|&n| n == 1)
    })
    .await;
    assert_eq!(length, 1);
    assert_eq!(
        redis.lrange_json("events").await,
        vec![json!({"seq": 1, "b": "\u{0}AQ=="})]
    );

    redis.stop().await;
    assert!(port_is_closed(port).await);
    assert!(!redis.ping().await);

    redis.start_again().await;
    assert_eq!(redis.port(), port);
    assert!(redis.ping().await);
    assert_eq!(
        redis.llen("events").await,
        0,
        "no persistence across restarts"
    );
}

#[tokio::test]
async fn redis_cluster_fixture_spreads_hash_tagged_keys_over_three_masters() {
    let cluster = RedisCluster::start().await;
    let ports = cluster.ports();
    assert_eq!(ports.len(), 3);
    assert!(!ports.contains(&6379), "never the shared redis");
    assert_eq!(cluster.url(), format!("redis://127.0.0.1:{}", ports[0]));

    // CLUSTER SLOTS: the 16384 slots, each exactly once, over the three masters.
    let mut masters = cluster.slot_masters().await;
    masters.sort_by_key(|(range, _)| *range.start());
    let mut next_slot = 0;
    for (range, port) in &masters {
        assert_eq!(
            *range.start(),
            next_slot,
            "a gap or an overlap: {masters:?}"
        );
        assert!(ports.contains(port), "{port} is not one of {ports:?}");
        next_slot = range.end() + 1;
    }
    assert_eq!(next_slot, 16384, "slots: {masters:?}");
    let mut master_ports: Vec<u16> = masters.iter().map(|&(_, port)| port).collect();
    master_ports.sort_unstable();
    let mut sorted_ports = ports.clone();
    sorted_ports.sort_unstable();
    assert_eq!(master_ports, sorted_ports, "one range per master");

    // Keys tagged per procedure, as issue 11 plans them: a procedure's keys share its
    // slot; different procedures spread over the masters. Each key is written through
    // the node that holds it, and every other node answers it with MOVED to that node.
    let mut keys_per_port: BTreeMap<u16, i64> = BTreeMap::new();
    for procedure in [
        "com.example.a",
        "com.example.b",
        "com.example.c",
        "com.example.d",
    ] {
        let stream = format!("subtocall:{{{procedure}}}:stream");
        let claims = format!("subtocall:{{{procedure}}}:claims");
        let owner = cluster.node_for_key(&stream).await;
        assert_eq!(
            cluster.node_for_key(&claims).await.port(),
            owner.port(),
            "one hash tag, one slot"
        );
        for key in [&stream, &claims] {
            let written = owner.command(&["SET", key, procedure]).await;
            assert_eq!(written, Reply::Simple("OK".to_owned()), "SET {key}");
        }
        let slot = owner
            .command(&["CLUSTER", "KEYSLOT", &stream])
            .await
            .integer();
        for other in cluster.nodes().iter().filter(|n| n.port() != owner.port()) {
            assert_eq!(
                other.command(&["GET", &stream]).await,
                Reply::Error(format!("MOVED {slot} 127.0.0.1:{}", owner.port())),
                "node {} must redirect {stream}",
                other.port()
            );
        }
        *keys_per_port.entry(owner.port()).or_default() += 2;
    }
    // CRC16 and redis-cli's even split are deterministic: these four tags hit all three.
    assert_eq!(
        keys_per_port.len(),
        3,
        "keys per master port: {keys_per_port:?}"
    );
    for node in cluster.nodes() {
        let expected = keys_per_port.get(&node.port()).copied().unwrap_or(0);
        assert_eq!(node.command(&["DBSIZE"]).await.integer(), expected);
    }

    // Dropping the fixture stops every node: client and cluster bus ports close.
    drop(cluster);
    for port in ports {
        assert!(port_is_closed(port).await, "port {port} still open");
        assert!(
            port_is_closed(port + 10_000).await,
            "bus port of {port} still open"
        );
    }
}

#[tokio::test]
async fn tls_crossbar_serves_wss_with_the_generated_certificate() {
    let crossbar = Crossbar::start_with(CrossbarOptions {
        tls: true,
        ..CrossbarOptions::default()
    })
    .await;
    let port = crossbar.port();
    assert_eq!(crossbar.url(), format!("wss://localhost:{port}/ws"));
    let pem = std::fs::read_to_string(crossbar.ca_file()).expect("read the CA file");
    assert!(pem.contains("BEGIN CERTIFICATE"));

    // autobahn over wss, trusting the generated certificate (Connection::to passes it).
    let subscriber = Subscriber::spawn(SubscriberOptions::new(&crossbar, "com.example.tls")).await;
    Publisher::run(PublisherOptions::new(&crossbar, "com.example.tls", 2))
        .await
        .assert_success();
    subscriber.wait_for_events(2, WAIT).await;

    // Without trusting it, the handshake must fail: the TLS is real.
    let untrusted = Subscriber::try_spawn(SubscriberOptions {
        connection: Connection {
            ca_file: None,
            ..Connection::to(&crossbar)
        },
        ..SubscriberOptions::new(&crossbar, "com.example.tls")
    })
    .await
    .err()
    .expect("an untrusted certificate must be refused");
    assert_eq!(untrusted.status.code(), Some(2));
    assert!(
        untrusted.stderr.contains("CERTIFICATE_VERIFY_FAILED"),
        "{}",
        untrusted.stderr
    );
}

#[test]
fn generated_router_config_passes_crossbar_check() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_router_config(dir.path(), free_port());
    let output = crossbar_check(dir.path());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "crossbar check failed ({}): {stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("configuration looks good"),
        "unexpected crossbar check output: {stdout}"
    );
}

#[test]
fn resp_parser_waits_for_complete_replies_and_parses_nested_arrays() {
    let reply = b"*3\r\n$5\r\nhello\r\n:42\r\n*2\r\n+OK\r\n$-1\r\n";
    for cut in 0..reply.len() {
        assert_eq!(resp::parse(&reply[..cut]), Ok(None), "cut at {cut}");
    }
    let expected = Reply::Array(Some(vec![
        Reply::Bulk(Some(b"hello".to_vec())),
        Reply::Integer(42),
        Reply::Array(Some(vec![
            Reply::Simple("OK".to_owned()),
            Reply::Bulk(None),
        ])),
    ]));
    assert_eq!(resp::parse(reply), Ok(Some((expected, reply.len()))));
    assert_eq!(
        resp::parse(b"-ERR wrong type\r\n"),
        Ok(Some((Reply::Error("ERR wrong type".to_owned()), 17)))
    );
    assert_eq!(
        resp::encode(&["LLEN", "k"]),
        b"*2\r\n$4\r\nLLEN\r\n$1\r\nk\r\n".to_vec()
    );
}
