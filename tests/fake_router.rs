//! Our client against a scripted fake router, for the faults a real Crossbar
//! cannot be made to produce: malformed frames, unknown message types, wrong
//! field types, oversized messages, a router that goes silent or never
//! welcomes. Each must end the session with a typed error, never a panic.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use subtocall::wamp::{
    Client, ClientConfig, CloseReason, ConnectError, Dict, Payload, RequestError, Serializer,
};
use support::fake_router::FakeRouter;

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
