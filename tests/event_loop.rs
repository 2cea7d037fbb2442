//! The sidecar's event loop against a scripted router, for what a real
//! Crossbar cannot be made to do on demand: an EVENT in the same write as the
//! SUBSCRIBED that created its subscription, a router that breaks the
//! protocol right after WELCOME, a backend that never answers during the
//! drain.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use support::fake_router::{FakeRouter, FakeSession};
use support::redis::Redis;
use support::sidecar::{Sidecar, fake_router_env};
use support::wait_until;

const WAIT: Duration = Duration::from_secs(10);
const TOPIC: &str = "com.example.t";
const PROCEDURE: &str = "com.example.SUB_t";
/// The subscription id the scripted router gives the sidecar for TOPIC.
const SUBSCRIPTION: u64 = 777;

fn env(router: &FakeRouter, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    fake_router_env(&router.url(), extra)
}

/// The next message of `kind` from the sidecar.
async fn expect(session: &mut FakeSession, kind: u64) -> Value {
    let m = session.recv().await.expect("the sidecar is connected");
    assert_eq!(m[0], kind, "expected message type {kind}, got {m}");
    m
}

/// Plays the router through discovery: the four meta subscriptions, a
/// list with one registration of PROCEDURE, its details; then answers the
/// SUBSCRIBE to TOPIC with SUBSCRIBED and, in the same write, `events`.
async fn bootstrap(session: &mut FakeSession, events: &[Value]) {
    for n in 0..4u64 {
        let subscribe = expect(session, 32).await;
        session.send_json(json!([33, subscribe[1], 100 + n])).await;
    }
    let list = expect(session, 48).await;
    assert_eq!(list[3], "wamp.registration.list");
    session
        .send_json(json!([50, list[1], {}, [{"exact": [42], "prefix": [], "wildcard": []}]]))
        .await;
    let get = expect(session, 48).await;
    assert_eq!(get[3], "wamp.registration.get");
    let info = json!({"id": 42, "created": "2026-11-29T00:00:00.000Z", "uri": PROCEDURE,
                      "match": "exact", "invoke": "roundrobin"});
    session.send_json(json!([50, get[1], {}, [info]])).await;
    // The callee count, for /status.
    let count = expect(session, 48).await;
    assert_eq!(count[3], "wamp.registration.count_callees");
    session.send_json(json!([50, count[1], {}, [1]])).await;
    let subscribe = expect(session, 32).await;
    assert_eq!(subscribe[3], TOPIC);
    let mut together = vec![json!([33, subscribe[1], SUBSCRIPTION])];
    together.extend_from_slice(events);
    session.send_together(&together).await;
}

fn event(publication: u64) -> Value {
    json!([36, SUBSCRIPTION, publication, {}, [publication]])
}

#[tokio::test]
async fn an_event_in_the_same_write_as_its_subscribed_is_forwarded_every_time() {
    // The loop used to take the EVENT (one channel) before the SUBSCRIBED
    // that created its subscription (another): counted unroutable, lost.
    let mut router = FakeRouter::start().await;
    let mut sidecar = Sidecar::start(env(&router, &[]));
    for round in 1..=25u64 {
        let mut session = router.next_joined().await;
        bootstrap(&mut session, &[event(round)]).await;
        let call = expect(&mut session, 48).await;
        assert_eq!(call[3], PROCEDURE, "round {round}: {call}");
        assert_eq!(call[4], json!([round]), "round {round}");
        session.send_json(json!([50, call[1], {}])).await;
        // The router goes away; the sidecar comes back for the next round.
    }
    assert_eq!(
        sidecar
            .metric("subtocall_events_unroutable_total{reason=\"unknown_subscription\"}")
            .await,
        0.0
    );
    assert_eq!(
        sidecar.metric("subtocall_events_forwarded_total").await,
        25.0
    );
    assert_eq!(sidecar.terminate(WAIT).await.code(), Some(0));
}

#[tokio::test]
async fn a_router_that_breaks_right_after_welcome_meets_the_failure_limit() {
    // Each join used to reset the backoff and the failure count: 147
    // reconnects in 15 s and SUBTOCALL_MAX_CONNECT_FAILURES never fired.
    let mut router = FakeRouter::start().await;
    let mut sidecar = Sidecar::start(env(&router, &[("SUBTOCALL_MAX_CONNECT_FAILURES", "4")]));
    for _ in 0..4 {
        let mut session = router.next_joined().await;
        session.send_json(json!([99, 1, {}])).await;
    }
    let status = sidecar.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "{}", sidecar.log());
    assert!(
        router
            .try_next_session(Duration::from_millis(300))
            .await
            .is_none(),
        "no fifth attempt"
    );
}

#[tokio::test]
async fn at_the_shutdown_deadline_calls_in_flight_are_dead_lettered_too() {
    // A call in flight at the deadline used to be neither forwarded nor
    // dead-lettered (accepted=330 forwarded=329 dead_lettered=0).
    let redis = Redis::start().await;
    let mut router = FakeRouter::start().await;
    let mut sidecar = Sidecar::start(env(
        &router,
        &[
            ("SUBTOCALL_MAX_IN_FLIGHT", "2"),
            ("SUBTOCALL_SHUTDOWN_TIMEOUT", "1s"),
            ("SUBTOCALL_DEAD_LETTER_KEY", "dead"),
            ("REDIS_URL", &redis.url()),
        ],
    ));
    let mut session = router.next_joined().await;
    let events: Vec<Value> = (1..=5).map(event).collect();
    bootstrap(&mut session, &events).await;
    // Two calls go out; the backend never answers them.
    for _ in 0..2 {
        assert_eq!(expect(&mut session, 48).await[3], PROCEDURE);
    }
    assert_eq!(sidecar.metric("subtocall_calls_in_flight").await, 2.0);
    sidecar.signal(libc::SIGTERM);
    // The router keeps reading (UNSUBSCRIBEs, the GOODBYE) and never answers.
    let reader = tokio::spawn(async move { session.recv_until_closed().await });
    assert_eq!(sidecar.wait_exit(WAIT).await.code(), Some(0));
    reader.abort();
    assert!(
        wait_until(WAIT, || async { redis.llen("dead").await == 5 }).await,
        "all five dead-lettered: {:?}\n{}",
        redis.lrange("dead").await,
        sidecar.log()
    );
    let records = redis.lrange_json("dead").await;
    assert!(
        records.iter().all(|r| r["reason"] == "shutdown"),
        "{records:?}"
    );
}

#[tokio::test]
async fn a_router_closing_with_1009_after_a_call_dead_letters_that_event_as_too_large() {
    // Crossbar closes the WebSocket (1009) on a message over its limit;
    // retrying the call would close every new session too.
    let mut router = FakeRouter::start().await;
    let sidecar = Sidecar::start(env(&router, &[]));
    let mut session = router.next_joined().await;
    bootstrap(&mut session, &[event(1)]).await;
    assert_eq!(expect(&mut session, 48).await[3], PROCEDURE);
    session.close_with(1009, "message too big").await;
    // The sidecar comes back, and the next event goes through.
    let mut session = router.next_joined().await;
    bootstrap(&mut session, &[event(2)]).await;
    let call = expect(&mut session, 48).await;
    assert_eq!(call[4], json!([2]), "event 1 is not retried: {call}");
    session.send_json(json!([50, call[1], {}])).await;
    let too_large = "subtocall_events_dead_lettered_total{reason=\"too_large\"}";
    assert!(
        wait_until(WAIT, || async { sidecar.metric(too_large).await == 1.0 }).await,
        "{}",
        sidecar.log()
    );
    assert_eq!(
        sidecar.metric("subtocall_events_forwarded_total").await,
        1.0
    );
}

#[tokio::test]
async fn an_event_over_the_message_size_is_refused_and_counted_and_the_session_goes_on() {
    let mut router = FakeRouter::start().await;
    let sidecar = Sidecar::start(env(&router, &[("SUBTOCALL_MAX_MESSAGE_SIZE", "1KiB")]));
    let mut session = router.next_joined().await;
    let big = json!([36, SUBSCRIPTION, 1, {}, ["x".repeat(1500)]]);
    bootstrap(&mut session, &[big, event(2)]).await;
    let call = expect(&mut session, 48).await;
    assert_eq!(
        call[4],
        json!([2]),
        "the next event is forwarded on the same session"
    );
    session.send_json(json!([50, call[1], {}])).await;
    let refused = "subtocall_events_refused_total{reason=\"too_large\"}";
    assert!(wait_until(WAIT, || async { sidecar.metric(refused).await == 1.0 }).await);
    assert_eq!(
        sidecar.metric("subtocall_router_reconnects_total").await,
        0.0
    );
    // Far over the limit, the message is refused unread and the session ends.
    let huge = json!([36, SUBSCRIPTION, 3, {}, ["x".repeat(3000)]]);
    session.send_json(huge).await;
    assert!(
        session.recv_until_closed().await.iter().any(|m| m[0] == 3),
        "ABORT"
    );
    assert!(wait_until(WAIT, || async { sidecar.metric(refused).await == 2.0 }).await);
    let _ = router.next_joined().await;
}
