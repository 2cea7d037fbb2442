//! Our client against a scripted fake router, for the faults a real Crossbar
//! cannot be made to produce: malformed frames, unknown message types, wrong
//! field types, oversized messages, a router that goes silent or never
//! welcomes, a salted WAMP-CRA challenge that asks for too much work. Each
//! must end the session with a typed error, never a panic or a stall.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use subtocall::wamp::auth::{Credentials, derive_key, sign};
use subtocall::wamp::{
    Client, ClientConfig, CloseReason, ConnectError, Dict, Payload, RequestError, Serializer,
};
use support::fake_router::{FakeRouter, FakeSession};

fn config(router: &FakeRouter) -> ClientConfig {
    let mut c = ClientConfig::new(router.url(), "realm1");
    c.serializers = vec![Serializer::Json];
    c
}

async fn joined(
    router: &mut FakeRouter,
    config: ClientConfig,
) -> (Client, support::fake_router::FakeSession) {
    let connecting = tokio::spawn(Client::connect(config));
    let session = router.next_joined().await;
    let (client, _incoming) = connecting.await.unwrap().expect("joins the fake router");
    // Keep the incoming channel alive by leaking it into a task that drains it.
    tokio::spawn(async move {
        let mut incoming = _incoming;
        while incoming.recv().await.is_some() {}
    });
    (client, session)
}

/// Sends `frame` after the join and checks the client closes with a protocol
/// error, tells the router why with ABORT, and fails its pending call.
async fn frame_is_a_protocol_error(frame: &str, expected_detail: &str) {
    let mut router = FakeRouter::start().await;
    let (client, mut session) = {
        let c = config(&router);
        joined(&mut router, c).await
    };
    let pending = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call("com.example.p", Payload::default(), Dict::new(), None)
                .await
        })
    };
    let call = session.recv().await.expect("CALL");
    assert_eq!(call[0], 48);
    session.send_text(frame).await;
    let reason = tokio::time::timeout(Duration::from_secs(10), client.closed())
        .await
        .expect("client closes");
    let CloseReason::Protocol(detail) = &reason else {
        panic!("expected a protocol error for {frame}, got {reason:?}")
    };
    assert!(
        detail.contains(expected_detail),
        "{detail:?} lacks {expected_detail:?}"
    );
    let rest = session.recv_until_closed().await;
    assert!(
        rest.iter()
            .any(|m| m[0] == 3 && m[2] == "wamp.error.protocol_violation"),
        "ABORT with protocol_violation sent before closing: {rest:?}"
    );
    assert_eq!(pending.await.unwrap(), Err(RequestError::ConnectionLost));
}

#[tokio::test]
async fn malformed_json_closes_the_session_with_a_protocol_error() {
    frame_is_a_protocol_error(r#"[50, 1, {"#, "malformed JSON frame").await;
}

#[tokio::test]
async fn unknown_message_type_closes_the_session_with_a_protocol_error() {
    frame_is_a_protocol_error(r#"[99, 1, {}]"#, "unknown WAMP message type 99").await;
}

#[tokio::test]
async fn wrong_field_types_close_the_session_with_a_protocol_error() {
    frame_is_a_protocol_error(
        r#"[36, "sub", 1, {}]"#,
        "EVENT.SUBSCRIBED.Subscription must be an id",
    )
    .await;
}

#[tokio::test]
async fn a_message_a_router_must_not_send_closes_the_session() {
    frame_is_a_protocol_error(r#"[1, "realm1", {}]"#, "a router must not send HELLO").await;
}

#[tokio::test]
async fn a_reply_for_the_wrong_request_kind_closes_the_session() {
    // The pending request 1 is a CALL; SUBSCRIBED for it is nonsense.
    frame_is_a_protocol_error(r#"[33, 1, 77]"#, "reply of type Subscribe for request 1").await;
}

#[tokio::test]
async fn oversized_message_closes_the_session_with_a_protocol_error() {
    let mut router = FakeRouter::start().await;
    let mut config = config(&router);
    config.max_message_size = 1024;
    let (client, mut session) = joined(&mut router, config).await;
    let big = "x".repeat(4096);
    session.send_json(json!([36, 1, 2, {}, [big]])).await;
    let reason = tokio::time::timeout(Duration::from_secs(10), client.closed())
        .await
        .expect("client closes");
    assert!(
        matches!(&reason, CloseReason::Protocol(d) if d.contains("message too large")),
        "{reason:?}"
    );
}

#[tokio::test]
async fn silent_router_is_detected_by_the_ping_timeout() {
    let mut router = FakeRouter::start().await;
    let mut config = config(&router);
    config.ping_interval = Duration::from_millis(200);
    config.ping_timeout = Duration::from_millis(300);
    let (client, session) = joined(&mut router, config).await;
    let started = Instant::now();
    let _silent = session.go_silent();
    let reason = tokio::time::timeout(Duration::from_secs(10), client.closed())
        .await
        .expect("client notices");
    assert_eq!(reason, CloseReason::PingTimeout(Duration::from_millis(300)));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn router_that_never_welcomes_hits_the_connect_timeout() {
    let mut router = FakeRouter::start().await;
    let mut config = config(&router);
    config.connect_timeout = Duration::from_millis(500);
    let connecting = tokio::spawn(Client::connect(config));
    let mut session = router.next_session().await;
    assert_eq!(session.recv().await.expect("HELLO")[0], 1);
    let err = connecting.await.unwrap().unwrap_err();
    assert!(matches!(err, ConnectError::Timeout(_)), "{err:?}");
    assert!(!err.is_terminal(), "worth retrying");
}

#[tokio::test]
async fn garbage_instead_of_welcome_is_a_retryable_join_error() {
    let mut router = FakeRouter::start().await;
    let connecting = tokio::spawn(Client::connect(config(&router)));
    let mut session = router.next_session().await;
    assert_eq!(session.recv().await.expect("HELLO")[0], 1);
    session.send_text("{not wamp").await;
    let err = connecting.await.unwrap().unwrap_err();
    assert!(matches!(err, ConnectError::Join(_)), "{err:?}");
    assert!(
        !err.is_terminal(),
        "a broken router may be fixed by a restart"
    );
}

#[tokio::test]
async fn request_ids_are_sequential_from_one_in_every_session() {
    let mut router = FakeRouter::start().await;
    for _ in 0..2 {
        let (client, mut session) = {
            let c = config(&router);
            joined(&mut router, c).await
        };
        let c = client.clone();
        let sub = tokio::spawn(async move { c.subscribe("com.example.t", Dict::new()).await });
        let subscribe = session.recv().await.unwrap();
        assert_eq!(
            (subscribe[0].as_u64(), subscribe[1].as_u64()),
            (Some(32), Some(1))
        );
        session.send_json(json!([33, 1, 555])).await;
        assert_eq!(sub.await.unwrap().unwrap().0, 555);
        let c = client.clone();
        let call =
            tokio::spawn(async move { c.call("p", Payload::default(), Dict::new(), None).await });
        let msg = session.recv().await.unwrap();
        assert_eq!((msg[0].as_u64(), msg[1].as_u64()), (Some(48), Some(2)));
        session.send_json(json!([50, 2, {}, ["ok"]])).await;
        assert_eq!(call.await.unwrap().unwrap().payload.args[0], "ok".into());
        client.close().await;
    }
}

// ---- salted WAMP-CRA: the key derivation a router asks for

/// A captured Crossbar challenge string (signed byte for byte).
const SALTED_CHALLENGE: &str = r#"{"authid": "salted", "authrole": "backend", "authmethod": "wampcra", "authprovider": "static", "session": 8629904171912300, "nonce": "KkUn1VQTiw5/jAlzxZCupZo7fPXYnIFe4EyYE/UgQEzfEt4eCV9wOc5FrS1q7nvh", "timestamp": "2026-11-22T10:22:05.202Z"}"#;

fn salted_config(router: &FakeRouter, secret: &str) -> ClientConfig {
    let mut c = config(router);
    c.credentials = Credentials::WampCra {
        authid: "salted".into(),
        secret: secret.into(),
    };
    c
}

/// Reads HELLO, sends a salted WAMP-CRA CHALLENGE asking for `iterations`
/// PBKDF2 rounds, and returns the client's answer (AUTHENTICATE or ABORT).
async fn salted_challenge(session: &mut FakeSession, iterations: u64) -> serde_json::Value {
    let hello = session.recv().await.expect("HELLO");
    assert_eq!(hello[0], 1, "{hello}");
    session
        .send_json(json!([4, "wampcra", {
            "challenge": SALTED_CHALLENGE,
            "salt": "salt123",
            "iterations": iterations,
            "keylen": 32,
        }]))
        .await;
    session.recv().await.expect("AUTHENTICATE or ABORT")
}

/// The longest time, so far, that the runtime this is spawned on (one
/// thread, as in subtocall) could not run a task that wants to wake every 5 ms.
fn longest_stall() -> Arc<AtomicU64> {
    let longest_us = Arc::new(AtomicU64::new(0));
    let record = longest_us.clone();
    tokio::spawn(async move {
        loop {
            let asleep = Instant::now();
            tokio::time::sleep(Duration::from_millis(5)).await;
            let late = asleep.elapsed().saturating_sub(Duration::from_millis(5));
            record.fetch_max(late.as_micros() as u64, Ordering::Relaxed);
        }
    });
    longest_us
}

/// Far above Crossbar's default of 1000 and below subtocall's limit, and
/// slow enough here (a debug build) to stall the runtime for a noticeable time.
const MANY_ITERATIONS: u64 = 50_000;

#[tokio::test]
async fn salted_wampcra_key_is_derived_off_the_event_loop_and_reused_on_reconnect() {
    let mut router = FakeRouter::start().await;
    let secret = "derive-me-off-the-loop";
    let mut config = salted_config(&router, secret);
    config.connect_timeout = Duration::from_secs(60);
    let stall = longest_stall();

    let mut joins = Vec::new();
    let mut signatures = Vec::new();
    for _ in 0..2 {
        let started = Instant::now();
        let connecting = tokio::spawn(Client::connect(config.clone()));
        let mut session = router.next_session().await;
        let answer = salted_challenge(&mut session, MANY_ITERATIONS).await;
        assert_eq!(answer[0], 5, "AUTHENTICATE: {answer}");
        signatures.push(answer[1].as_str().expect("signature").to_owned());
        session.send_json(json!([2, 4242, {"realm": "realm1", "authrole": "backend", "roles": {"broker": {}, "dealer": {}}}])).await;
        let (client, _incoming) = connecting.await.unwrap().expect("joins");
        joins.push(started.elapsed());
        client.close().await;
    }
    let stall = Duration::from_micros(stall.load(Ordering::Relaxed));

    // Checked after the measurement: deriving here blocks this runtime too.
    let key = derive_key(secret, "salt123", MANY_ITERATIONS as u32, 32);
    let expected = sign(key.as_bytes(), SALTED_CHALLENGE);
    assert_eq!(signatures, [expected.clone(), expected]);
    assert!(
        joins[0] >= Duration::from_millis(200),
        "the first join took {:?}: too fast to show whether the derivation blocks",
        joins[0]
    );
    assert!(
        stall * 4 < joins[0],
        "the runtime stalled for {stall:?} during a join of {:?}: the key was derived on the event loop",
        joins[0]
    );
    assert!(
        joins[1] * 4 < joins[0],
        "the reconnect took {:?} after a first join of {:?}: the derived key was not reused",
        joins[1],
        joins[0]
    );
}

#[tokio::test]
async fn a_challenge_asking_for_more_iterations_than_any_honest_router_is_refused_at_once() {
    let mut router = FakeRouter::start().await;
    let mut config = salted_config(&router, "never-derived");
    config.connect_timeout = Duration::from_secs(60);
    let started = Instant::now();
    let connecting = tokio::spawn(Client::connect(config));
    let mut session = router.next_session().await;
    let answer = salted_challenge(&mut session, 1_000_001).await;
    assert_eq!(answer[0], 3, "ABORT, not AUTHENTICATE: {answer}");
    assert_eq!(answer[2], "wamp.error.authentication_failed", "{answer}");
    let err = connecting.await.unwrap().unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused only after {:?}",
        started.elapsed()
    );
    assert!(err.is_terminal(), "{err}");
    let shown = err.to_string();
    assert!(
        shown.contains("1000001") && shown.contains("1000000"),
        "the error names what was asked and the limit: {shown}"
    );
}
