//! The sidecar's state driven as the event loop drives it, without IO: a
//! real sans-IO [`Session`] fed the router's messages, the sidecar fed the
//! session's outputs in order, and what would be written collected as JSON.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

use super::*;
use crate::discovery::{Discovery, Marker};
use crate::forward::retry::{Backoff, RetryPolicy};
use crate::forward::{Dispatch, Forwarder, MemoryQueue, OverflowPolicy, Settings};
use crate::sink::wamp::WampSink;
use crate::wamp::Serializer;
use crate::wamp::auth::Credentials;
use crate::wamp::session::{Output as SessionOutput, Session, SessionConfig};

const S: Duration = Duration::from_secs(1);
const WELCOME: &str = r#"[2,1273811465337858,{"realm":"realm1","authid":"backend","authrole":"backend","roles":{"dealer":{"features":{"call_canceling":true}},"broker":{}}}]"#;

struct Rig {
    sidecar: Sidecar,
    session: Session<Token>,
    metrics: Arc<Metrics>,
    now: Instant,
    /// What would have been written to the router, oldest first.
    sent: Vec<Json>,
}

impl Rig {
    fn new() -> Rig {
        let now = Instant::now();
        let metrics = Arc::new(Metrics::new());
        let discovery = Discovery::new(Marker::new("SUB_".to_owned()).unwrap(), None, 10 * S);
        let settings = Settings {
            capacity: 10,
            overflow: OverflowPolicy::DropNewest,
            max_in_flight: 2,
            dispatch: Dispatch::Each,
            retry: RetryPolicy {
                max_attempts: 3,
                max_age: 60 * S,
                backoff: Backoff { initial: S, max: S },
            },
            batching: Default::default(),
        };
        let core = Forwarder::new(MemoryQueue::new(), settings, 1);
        let sink = Box::new(WampSink {
            call_timeout: 10 * S,
            details_kwarg: None,
        });
        let sidecar = Sidecar::new(discovery, core, sink, metrics.clone(), None, 5 * S, now);
        let mut session = Session::new(SessionConfig {
            realm: "realm1".into(),
            credentials: Credentials::Anonymous,
            agent: "test".into(),
        });
        session.join();
        session.handle_message(decode(WELCOME)).unwrap();
        let mut rig = Rig {
            sidecar,
            session,
            metrics,
            now,
            sent: Vec::new(),
        };
        rig.run().unwrap();
        rig.sent.clear();
        rig.sidecar.on_joined(&mut rig.session, now);
        rig.run().unwrap();
        rig
    }

    /// What the event loop does between two waits.
    fn run(&mut self) -> Result<(), Fatal> {
        loop {
            self.sidecar.pump(Some(&mut self.session), self.now);
            let mut any = false;
            while let Some(output) = self.session.poll_output() {
                any = true;
                match output {
                    SessionOutput::Send(msg) => {
                        let bytes = Serializer::Json.encode(&msg).unwrap();
                        self.sent.push(serde_json::from_slice(&bytes).unwrap());
                    }
                    other => self
                        .sidecar
                        .on_session_output(other, &mut self.session, self.now)?,
                }
            }
            if !any {
                return Ok(());
            }
        }
    }

    /// The router sends `message`.
    fn router(&mut self, message: Json) -> Result<(), Fatal> {
        self.session
            .handle_message(decode(&message.to_string()))
            .unwrap();
        self.run()
    }

    /// Takes what was sent since the last call.
    fn take_sent(&mut self) -> Vec<Json> {
        std::mem::take(&mut self.sent)
    }

    /// Plays the router through discovery of one exact SUB_ registration
    /// and confirms the subscription to its topic with id 777.
    fn discover(&mut self) {
        let subscribes = self.take_sent();
        for (n, s) in subscribes.iter().enumerate() {
            self.router(json!([33, s[1], 100 + n])).unwrap();
        }
        let list = self.take_sent().remove(0);
        self.router(json!([50, list[1], {}, [{"exact": [42]}]]))
            .unwrap();
        let get = self.take_sent().remove(0);
        let info = json!({"id": 42, "created": "x", "uri": "com.example.SUB_t", "match": "exact", "invoke": "roundrobin"});
        self.router(json!([50, get[1], {}, [info]])).unwrap();
        // The callee count (for /status) is asked for first; one callee.
        let mut sent = self.take_sent();
        assert_eq!(kinds(&sent), [48, 32], "{sent:?}");
        let subscribe = sent.remove(1);
        let count = sent.remove(0);
        assert_eq!(count[3], "wamp.registration.count_callees");
        assert_eq!(count[4], json!([42]));
        self.router(json!([50, count[1], {}, [1]])).unwrap();
        assert_eq!(subscribe[3], "com.example.t");
        self.router(json!([33, subscribe[1], 777])).unwrap();
    }
}

fn decode(frame: &str) -> crate::wamp::Message {
    Serializer::Json.decode(frame.as_bytes()).unwrap()
}

fn kinds(sent: &[Json]) -> Vec<u64> {
    sent.iter().map(|m| m[0].as_u64().unwrap()).collect()
}

#[test]
fn discovery_subscribes_to_every_meta_topic_before_it_lists() {
    let mut rig = Rig::new();
    let subscribes = rig.take_sent();
    let topics: Vec<&str> = subscribes.iter().map(|m| m[3].as_str().unwrap()).collect();
    assert_eq!(topics, crate::discovery::meta::META_TOPICS);
    for s in &subscribes[..3] {
        rig.router(json!([33, s[1], 1])).unwrap();
    }
    assert!(
        rig.take_sent().is_empty(),
        "no list before every meta subscription is confirmed"
    );
    assert!(!rig.sidecar.is_ready());
    rig.router(json!([33, subscribes[3][1], 2])).unwrap();
    let list = rig.take_sent();
    assert_eq!(
        (list[0][0].as_u64(), list[0][3].as_str()),
        (Some(48), Some("wamp.registration.list"))
    );
}

#[test]
fn readiness_needs_the_whole_bootstrap_and_makes_the_session_healthy() {
    let mut rig = Rig::new();
    assert!(!rig.sidecar.was_healthy());
    rig.discover();
    assert!(rig.sidecar.is_ready());
    assert!(rig.sidecar.was_healthy());
    assert_eq!(rig.metrics.ready.get(), 1);
}

#[test]
fn an_event_right_after_its_subscribed_is_called_on_the_procedure() {
    let mut rig = Rig::new();
    rig.discover();
    rig.router(json!([36, 777, 5, {}, ["hello"]])).unwrap();
    let call = rig.take_sent().remove(0);
    assert_eq!(call[0], 48);
    assert_eq!(call[3], "com.example.SUB_t");
    assert_eq!(call[4], json!(["hello"]));
    rig.router(json!([50, call[1], {}])).unwrap();
    assert_eq!(rig.metrics.events_forwarded.get(), 1);
    assert_eq!(rig.sidecar.held(), (0, 0));
}

#[test]
fn a_refused_meta_subscription_is_fatal_and_names_the_permission() {
    let mut rig = Rig::new();
    let first = rig.take_sent().remove(0);
    let refused = rig.router(json!([8, 32, first[1], {}, "wamp.error.not_authorized"]));
    let Err(Fatal::MetaApi { permission, .. }) = refused else {
        panic!("{refused:?}")
    };
    assert!(permission.contains("subscribe"));
}

#[test]
fn a_revoked_meta_subscription_asks_for_a_rejoin_and_a_topic_one_does_not() {
    let mut rig = Rig::new();
    rig.discover();
    rig.router(json!([35, 0, {"subscription": 777, "reason": "wamp.close.revoked"}]))
        .unwrap();
    assert_eq!(rig.sidecar.take_rejoin(), None);
    rig.router(json!([35, 0, {"subscription": 100, "reason": "wamp.close.revoked"}]))
        .unwrap();
    assert!(rig.sidecar.take_rejoin().is_some());
}

#[test]
fn drain_unsubscribes_and_a_session_lost_while_draining_gives_up_what_waits() {
    let mut rig = Rig::new();
    rig.discover();
    for publication in 1..=3 {
        rig.router(json!([36, 777, publication, {}, []])).unwrap();
    }
    assert_eq!(
        kinds(&rig.take_sent()),
        [48, 48],
        "two calls in flight, one waits"
    );
    rig.sidecar
        .begin_drain(Some(&mut rig.session), rig.now + 30 * S, rig.now);
    rig.run().unwrap();
    assert_eq!(kinds(&rig.take_sent()), [34], "unsubscribed from the topic");
    assert!(!rig.sidecar.is_ready());
    // The router goes away: the calls in flight are answered "connection
    // lost", and with no session to come, everything is given up now.
    rig.sidecar.on_session_end(rig.now);
    rig.session.abandon();
    while let Some(output) = rig.session.poll_output() {
        rig.sidecar
            .on_session_output(output, &mut rig.session, rig.now)
            .unwrap();
    }
    rig.sidecar.pump(None, rig.now);
    assert_eq!(rig.metrics.events_received.get(), 3);
    assert_eq!(rig.sidecar.held(), (0, 0));
    assert!(rig.sidecar.is_idle());
    assert_eq!(
        rig.metrics
            .dead_lettered(crate::forward::GiveUp::Shutdown)
            .get(),
        3
    );
}

#[test]
fn under_overload_meta_events_still_get_through() {
    // Nothing between the socket and the state can fill up: a full queue
    // dead-letters events (counted), and the next meta event is handled.
    let mut rig = Rig::new();
    rig.discover();
    for publication in 1..=200 {
        rig.router(json!([36, 777, publication, {}, []])).unwrap();
    }
    let overflow = rig
        .metrics
        .dead_lettered(crate::forward::GiveUp::Overflow)
        .get();
    assert_eq!(overflow, 200 - 2 - 10, "two in flight, ten waiting");
    rig.take_sent();
    let info = json!({"id": 43, "created": "x", "uri": "com.example.SUB_u",
                      "match": "exact", "invoke": "roundrobin"});
    // Subscription 100 is the first meta topic, on_create.
    rig.router(json!([36, 100, 9999, {}, [7, info]])).unwrap();
    let sent = rig.take_sent();
    assert!(
        sent.iter().any(|m| m[0] == 32 && m[3] == "com.example.u"),
        "the new registration's topic is subscribed: {sent:?}"
    );
}

#[test]
fn status_mappings_follow_callees_joining_and_leaving_and_keep_the_last_error() {
    let mut rig = Rig::new();
    rig.discover();
    let mapping = |rig: &Rig| super::view::mappings(&rig.sidecar, rig.now).remove(0);
    let m = mapping(&rig);
    assert_eq!(
        (
            m.topic.as_str(),
            m.procedure.as_deref(),
            m.registrations.as_slice()
        ),
        ("com.example.t", Some("com.example.SUB_t"), &[42][..])
    );
    assert_eq!((m.callees, m.subscription), (Some(1), Some(777)));
    // A second callee: on_register (meta subscription 101) is counted anew.
    rig.router(json!([36, 101, 1, {}, [9, 42]])).unwrap();
    let count = rig.take_sent().remove(0);
    assert_eq!(count[3], "wamp.registration.count_callees");
    rig.router(json!([50, count[1], {}, [2]])).unwrap();
    assert_eq!(mapping(&rig).callees, Some(2));
    // One leaves (on_unregister, 102, null session when its session ends).
    rig.router(json!([36, 102, 2, {}, [null, 42]])).unwrap();
    let count = rig.take_sent().remove(0);
    rig.router(json!([50, count[1], {}, [1]])).unwrap();
    assert_eq!(mapping(&rig).callees, Some(1));
    // A refused count leaves it unknown, and nothing more is asked.
    rig.router(json!([36, 101, 3, {}, [9, 42]])).unwrap();
    let count = rig.take_sent().remove(0);
    rig.router(json!([8, 48, count[1], {}, "wamp.error.not_authorized"]))
        .unwrap();
    assert_eq!(mapping(&rig).callees, None);
    rig.router(json!([36, 101, 4, {}, [10, 42]])).unwrap();
    assert!(rig.take_sent().is_empty());

    // A failed call is the mapping's last error, with its counts.
    rig.router(json!([36, 777, 5, {}, ["hello"]])).unwrap();
    let call = rig.take_sent().remove(0);
    rig.router(json!([8, 48, call[1], {}, "com.example.nope"]))
        .unwrap();
    let m = mapping(&rig);
    assert_eq!((m.received, m.forwarded), (1, 0));
    assert_eq!(m.dead_lettered.get("rejected"), Some(&1));
    let error = m.last_error.expect("a last error");
    assert!(error.contains("com.example.nope"), "{error}");
    assert!(m.last_error_at.is_some());
}

#[test]
fn a_procedures_received_count_leaves_out_duplicates_so_its_figures_add_up() {
    let mut rig = Rig::new();
    rig.discover();
    // The same publication twice (as on two overlapping subscriptions).
    rig.router(json!([36, 777, 5, {}, ["hello"]])).unwrap();
    rig.router(json!([36, 777, 5, {}, ["hello"]])).unwrap();
    let sent = rig.take_sent();
    assert_eq!(kinds(&sent), [48], "called once: {sent:?}");
    rig.router(json!([50, sent[0][1], {}])).unwrap();
    assert_eq!(rig.metrics.events_duplicate.get(), 1);
    let m = super::view::mappings(&rig.sidecar, rig.now).remove(0);
    assert_eq!((m.received, m.forwarded, m.in_flight), (1, 1, 0));
}

#[test]
fn a_wildcard_registration_matches_the_procedures_derived_from_it() {
    use super::view::wildcard_matches;
    assert!(wildcard_matches("com..SUB_s", "com.a.SUB_s"));
    assert!(!wildcard_matches("com..SUB_s", "com.a.b.SUB_s"));
    assert!(!wildcard_matches("com..SUB_s", "com.a.SUB_t"));
    assert!(wildcard_matches("com.x.SUB_s", "com.x.SUB_s"));
}

/// A group whose last registration goes keeps its events without calling
/// anyone, across a rejoin of the router session (it is not forgotten
/// while the new session's registration list is on its way), and sends
/// them on when a backend registers again.
#[test]
fn a_group_without_a_callee_keeps_its_events_across_a_rejoin_until_one_registers() {
    let mut rig = Rig::new();
    rig.discover();
    // on_delete (the fourth meta subscription, id 103) of registration 42.
    rig.router(json!([36, 103, 1, {}, [5, 42]])).unwrap();
    assert_eq!(rig.metrics.groups_waiting.get(), 1);
    rig.router(json!([36, 777, 9, {}, ["later"]])).unwrap();
    assert!(
        !kinds(&rig.take_sent()).contains(&48),
        "no call while the group has no callee"
    );
    assert_eq!(rig.sidecar.held(), (1, 0));

    // The router session is lost and joined again.
    let now = rig.now;
    rig.sidecar.on_session_end(now);
    rig.sidecar.on_joined(&mut rig.session, now);
    rig.run().unwrap();
    let away: Vec<&str> = rig.sidecar.groups_away().map(|(p, _)| p).collect();
    assert_eq!(away, ["com.example.SUB_t"], "still waiting, not forgotten");
    let subscribes = rig.take_sent();
    assert_eq!(
        kinds(&subscribes),
        [32, 32, 32, 32],
        "the meta topics first"
    );
    for (n, s) in subscribes.iter().enumerate() {
        rig.router(json!([33, s[1], 200 + n])).unwrap();
    }
    let list = rig.take_sent().remove(0);
    rig.router(json!([50, list[1], {}, [{"exact": []}]]))
        .unwrap();
    // No registration came back: the topic is subscribed for the group.
    let subscribe = rig.take_sent().remove(0);
    assert_eq!(
        (subscribe[0].as_u64(), subscribe[3].as_str()),
        (Some(32), Some("com.example.t"))
    );
    rig.router(json!([33, subscribe[1], 778])).unwrap();
    assert_eq!(rig.metrics.groups_waiting.get(), 1);
    assert_eq!(rig.sidecar.held(), (1, 0));

    // A backend registers again (on_create, id 200): the event goes out.
    let info = json!({"id": 43, "created": "x", "uri": "com.example.SUB_t", "match": "exact", "invoke": "roundrobin"});
    rig.router(json!([36, 200, 2, {}, [6, info]])).unwrap();
    let sent = rig.take_sent();
    let call = sent
        .iter()
        .find(|m| m[0] == 48 && m[3] == "com.example.SUB_t")
        .unwrap_or_else(|| panic!("the waiting event is called: {sent:?}"));
    assert_eq!(call[4], json!(["later"]));
    assert_eq!(rig.metrics.groups_waiting.get(), 0);
}
