//! Unit tests of the discovery state machine: feed inputs, assert outputs.

use std::time::{Duration, Instant};

use super::*;
use crate::wamp::SessionId;

const GRACE: Duration = Duration::from_secs(10);
const RETRY: Duration = Duration::from_secs(30);

fn discovery(grace: Duration) -> Discovery {
    Discovery::new(Marker::default(), None, grace).with_retry_delay(RETRY)
}

fn reg(id: u64) -> RegistrationId {
    RegistrationId(id)
}

fn sub(id: u64) -> SubscriptionId {
    SubscriptionId(id)
}

fn info(id: u64, uri: &str, policy: MatchPolicy) -> RegistrationInfo {
    RegistrationInfo {
        id: reg(id),
        uri: uri.into(),
        match_policy: policy,
        invoke: "roundrobin".into(),
    }
}

fn created(id: u64, uri: &str) -> MetaEvent {
    created_with(id, uri, MatchPolicy::Exact)
}

fn created_with(id: u64, uri: &str, policy: MatchPolicy) -> MetaEvent {
    MetaEvent::Created {
        session: Some(SessionId(77)),
        info: info(id, uri, policy),
    }
}

fn deleted(id: u64) -> MetaEvent {
    MetaEvent::Deleted {
        session: None,
        registration: reg(id),
    }
}

fn registered(id: u64) -> MetaEvent {
    MetaEvent::Registered {
        session: Some(SessionId(78)),
        registration: reg(id),
    }
}

fn exact(topic: &str) -> TopicKey {
    TopicKey {
        topic: topic.into(),
        policy: MatchPolicy::Exact,
    }
}

fn wildcard(topic: &str) -> TopicKey {
    TopicKey {
        topic: topic.into(),
        policy: MatchPolicy::Wildcard,
    }
}

fn actions(out: &[Output]) -> Vec<Action> {
    out.iter()
        .filter_map(|o| match o {
            Output::Action(a) => Some(a.clone()),
            Output::Note(_) => None,
        })
        .collect()
}

fn notes(out: &[Output]) -> Vec<Note> {
    out.iter()
        .filter_map(|o| match o {
            Output::Note(n) => Some(n.clone()),
            Output::Action(_) => None,
        })
        .collect()
}

fn subscribe(key: TopicKey) -> Action {
    Action::Subscribe(key)
}

fn unsubscribe(key: TopicKey, id: u64) -> Action {
    Action::Unsubscribe {
        topic: key,
        subscription: sub(id),
    }
}

/// A discovery subscribed to `com.example.status` for registration 1.
fn subscribed_status(grace: Duration, t0: Instant) -> Discovery {
    let mut d = discovery(grace);
    d.on_meta_event(created(1, "com.example.SUB_status"), t0);
    assert_eq!(
        actions(&d.poll(t0)),
        [subscribe(exact("com.example.status"))]
    );
    d.on_subscribed(&exact("com.example.status"), sub(100));
    d.poll(t0);
    d
}

// ----- registrations -------------------------------------------------------

#[test]
fn sub_registration_created_subscribes_its_topic_and_is_noted() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_meta_event(created(1, "com.example.SUB_status"), t0);
    let out = d.poll(t0);
    assert_eq!(
        out,
        [
            Output::Note(Note::RegistrationTracked {
                id: reg(1),
                uri: "com.example.SUB_status".into(),
                invoke: "roundrobin".into(),
                topic: exact("com.example.status"),
            }),
            Output::Action(subscribe(exact("com.example.status"))),
        ]
    );
    assert_eq!(d.tracked_registrations(), 1);
    assert_eq!(d.active_subscriptions(), 0);
    d.on_subscribed(&exact("com.example.status"), sub(100));
    assert_eq!(
        d.poll(t0),
        [Output::Note(Note::Subscribed {
            topic: exact("com.example.status"),
            subscription: sub(100)
        })]
    );
    assert_eq!(d.active_subscriptions(), 1);
    assert_eq!(d.poll(t0), []);
}

#[test]
fn registration_seen_by_both_on_create_and_list_is_tracked_once() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_meta_event(created(1, "com.example.SUB_status"), t0);
    d.on_list_result([reg(1)]);
    let out = d.poll(t0);
    assert_eq!(actions(&out), [subscribe(exact("com.example.status"))]);
    assert!(d.is_synced());
    assert_eq!(d.tracked_registrations(), 1);
}

#[test]
fn registration_listed_then_created_then_got_is_tracked_once() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_list_result([reg(1)]);
    assert_eq!(actions(&d.poll(t0)), [Action::GetRegistration(reg(1))]);
    d.on_meta_event(created(1, "com.example.SUB_status"), t0);
    d.on_get_result(
        reg(1),
        GetOutcome::Found(info(1, "com.example.SUB_status", MatchPolicy::Exact)),
        t0,
    );
    let out = d.poll(t0);
    assert_eq!(actions(&out), [subscribe(exact("com.example.status"))]);
    let tracked = notes(&out)
        .iter()
        .filter(|n| matches!(n, Note::RegistrationTracked { .. }))
        .count();
    assert_eq!(tracked, 1);
    assert_eq!(d.tracked_registrations(), 1);
}

#[test]
fn additional_callee_of_a_shared_registration_changes_nothing() {
    let t0 = Instant::now();
    let mut d = subscribed_status(GRACE, t0);
    d.on_meta_event(registered(1), t0);
    d.on_meta_event(
        MetaEvent::Unregistered {
            session: Some(SessionId(78)),
            registration: reg(1),
        },
        t0,
    );
    assert_eq!(d.poll(t0), []);
    assert_eq!(d.tracked_registrations(), 1);
}

#[test]
fn on_register_for_an_unknown_registration_fetches_it_once() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_meta_event(registered(5), t0);
    d.on_meta_event(registered(5), t0);
    assert_eq!(
        d.poll(t0),
        [Output::Action(Action::GetRegistration(reg(5)))]
    );
    d.on_meta_event(registered(5), t0);
    assert_eq!(d.poll(t0), []);
    d.on_get_result(
        reg(5),
        GetOutcome::Found(info(5, "a.SUB_b", MatchPolicy::Exact)),
        t0,
    );
    assert_eq!(actions(&d.poll(t0)), [subscribe(exact("a.b"))]);
}

#[test]
fn non_sub_registration_is_ignored() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_meta_event(created(1, "com.example.plain_proc"), t0);
    d.on_meta_event(created(2, "com.SUB_example.proc"), t0);
    d.on_meta_event(created(3, "com.example.SUB_"), t0);
    assert_eq!(d.poll(t0), []);
    assert_eq!(d.tracked_registrations(), 0);
    d.on_meta_event(deleted(1), t0);
    assert_eq!(d.poll(t0), []);
}

#[test]
fn prefix_registration_is_ignored_with_one_warning() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_meta_event(
        created_with(1, "com.example.SUB_pfx", MatchPolicy::Prefix),
        t0,
    );
    d.on_list_result([reg(1)]);
    d.on_get_result(
        reg(1),
        GetOutcome::Found(info(1, "com.example.SUB_pfx", MatchPolicy::Prefix)),
        t0,
    );
    let out = d.poll(t0);
    let warning = Note::PrefixRegistrationIgnored {
        id: reg(1),
        uri: "com.example.SUB_pfx".into(),
    };
    assert_eq!(
        out,
        [
            Output::Note(warning.clone()),
            Output::Note(Note::Synced { registrations: 0 })
        ]
    );
    assert_eq!(warning.level(), Level::Warn);
    // An ordinary prefix registration is not worth a warning.
    d.on_meta_event(created_with(2, "com.example.pfx", MatchPolicy::Prefix), t0);
    assert_eq!(d.poll(t0), []);
}

#[test]
fn filter_rejects_non_matching_uri() {
    let t0 = Instant::now();
    let filter = Regex::new(r"^com\.example\.").unwrap();
    let mut d = Discovery::new(Marker::default(), Some(filter), GRACE);
    d.on_meta_event(created(1, "org.other.SUB_status"), t0);
    d.on_meta_event(created(2, "com.example.SUB_status"), t0);
    let out = d.poll(t0);
    assert_eq!(actions(&out), [subscribe(exact("com.example.status"))]);
    let filtered = Note::RegistrationFilteredOut {
        id: reg(1),
        uri: "org.other.SUB_status".into(),
    };
    assert_eq!(notes(&out)[0], filtered);
    assert_eq!(filtered.level(), Level::Debug);
    assert_eq!(d.tracked_registrations(), 1);
}

#[test]
fn custom_marker_selects_registrations() {
    let t0 = Instant::now();
    let mut d = Discovery::new(Marker::new("Q_").unwrap(), None, GRACE);
    d.on_meta_event(created(1, "a.SUB_x"), t0);
    d.on_meta_event(created(2, "a.Q_x"), t0);
    assert_eq!(actions(&d.poll(t0)), [subscribe(exact("a.x"))]);
}

#[test]
fn on_delete_for_a_registration_never_seen_is_harmless() {
    let t0 = Instant::now();
    let mut d = subscribed_status(GRACE, t0);
    d.on_meta_event(deleted(999), t0);
    assert_eq!(d.poll(t0), []);
    assert_eq!(d.tracked_registrations(), 1);
}

#[test]
fn late_get_result_for_deleted_registration_does_not_resurrect_it() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_list_result([reg(1)]);
    assert_eq!(actions(&d.poll(t0)), [Action::GetRegistration(reg(1))]);
    d.on_meta_event(deleted(1), t0);
    assert!(d.is_synced(), "a deleted registration needs no answer");
    d.on_get_result(
        reg(1),
        GetOutcome::Found(info(1, "com.example.SUB_status", MatchPolicy::Exact)),
        t0,
    );
    // A late on_create (reordered by the layer above) does not either.
    d.on_meta_event(created(1, "com.example.SUB_status"), t0);
    let out = d.poll(t0);
    assert_eq!(actions(&out), []);
    assert_eq!(d.tracked_registrations(), 0);
}

#[test]
fn listed_id_already_deleted_is_not_fetched() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_meta_event(deleted(1), t0);
    d.on_list_result([reg(1)]);
    assert!(d.is_synced());
    assert_eq!(actions(&d.poll(t0)), []);
}

#[test]
fn get_saying_no_such_registration_counts_as_deleted() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_list_result([reg(1), reg(2)]);
    d.poll(t0);
    d.on_get_result(reg(1), GetOutcome::NoSuchRegistration, t0);
    assert!(!d.is_synced());
    d.on_get_result(
        reg(2),
        GetOutcome::Found(info(2, "a.SUB_b", MatchPolicy::Exact)),
        t0,
    );
    assert!(d.is_synced());
    // A late on_create for the one that was gone does nothing.
    d.on_meta_event(created(1, "a.SUB_c"), t0);
    assert_eq!(actions(&d.poll(t0)), [subscribe(exact("a.b"))]);
}

#[test]
fn no_such_registration_for_a_tracked_registration_untracks_it() {
    let t0 = Instant::now();
    let mut d = subscribed_status(Duration::ZERO, t0);
    d.on_get_result(reg(1), GetOutcome::NoSuchRegistration, t0);
    assert_eq!(
        actions(&d.poll(t0)),
        [unsubscribe(exact("com.example.status"), 100)]
    );
}

// ----- readiness -----------------------------------------------------------

#[test]
fn discovery_is_synced_after_the_list_and_every_get_answer() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    assert!(!d.is_synced());
    d.on_list_result([reg(1), reg(2)]);
    assert!(!d.is_synced());
    assert_eq!(
        actions(&d.poll(t0)),
        [
            Action::GetRegistration(reg(1)),
            Action::GetRegistration(reg(2))
        ]
    );
    d.on_get_result(
        reg(1),
        GetOutcome::Found(info(1, "a.SUB_b", MatchPolicy::Exact)),
        t0,
    );
    assert!(!d.is_synced());
    d.on_get_result(
        reg(2),
        GetOutcome::Found(info(2, "a.plain", MatchPolicy::Exact)),
        t0,
    );
    assert!(d.is_synced());
    let out = d.poll(t0);
    assert!(out.contains(&Output::Note(Note::Synced { registrations: 1 })));
    // An unknown registration afterwards does not make us unready.
    d.on_meta_event(registered(3), t0);
    assert!(d.is_synced());
}

#[test]
fn empty_list_is_synced_at_once() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_list_result([]);
    assert!(d.is_synced());
    assert_eq!(
        d.poll(t0),
        [Output::Note(Note::Synced { registrations: 0 })]
    );
}

#[test]
fn failed_get_is_retried_after_the_delay_and_blocks_readiness() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_list_result([reg(1)]);
    d.poll(t0);
    d.on_get_result(reg(1), GetOutcome::Failed("wamp.error.timeout".into()), t0);
    assert!(!d.is_synced());
    let out = d.poll(t0);
    assert_eq!(
        out,
        [Output::Note(Note::GetFailed {
            id: reg(1),
            error: "wamp.error.timeout".into(),
            retry_in: RETRY
        })]
    );
    assert_eq!(d.next_deadline(), Some(t0 + RETRY));
    assert_eq!(d.poll(t0 + RETRY - Duration::from_millis(1)), []);
    assert_eq!(
        d.poll(t0 + RETRY),
        [Output::Action(Action::GetRegistration(reg(1)))]
    );
    assert_eq!(d.next_deadline(), None);
    d.on_get_result(reg(1), GetOutcome::NoSuchRegistration, t0 + RETRY);
    assert!(d.is_synced());
}

// ----- topics and grace ----------------------------------------------------

#[test]
fn topic_survives_when_registration_returns_within_grace() {
    let t0 = Instant::now();
    let mut d = subscribed_status(GRACE, t0);
    d.on_meta_event(deleted(1), t0);
    let out = d.poll(t0);
    assert_eq!(actions(&out), []);
    assert!(notes(&out).contains(&Note::GraceStarted {
        topic: exact("com.example.status"),
        grace: GRACE
    }));
    assert_eq!(d.next_deadline(), Some(t0 + GRACE));
    // The backend comes back with a new registration id for the same URI.
    let t1 = t0 + GRACE / 2;
    d.on_meta_event(created(2, "com.example.SUB_status"), t1);
    let out = d.poll(t1);
    assert_eq!(actions(&out), []);
    assert!(notes(&out).contains(&Note::TopicResumed {
        topic: exact("com.example.status")
    }));
    assert_eq!(d.next_deadline(), None);
    assert_eq!(actions(&d.poll(t0 + GRACE * 5)), []);
    assert_eq!(d.active_subscriptions(), 1);
}

#[test]
fn grace_expiry_emits_unsubscribe_once() {
    let t0 = Instant::now();
    let mut d = subscribed_status(GRACE, t0);
    d.on_meta_event(deleted(1), t0);
    d.poll(t0);
    assert_eq!(actions(&d.poll(t0 + GRACE - Duration::from_millis(1))), []);
    assert_eq!(
        actions(&d.poll(t0 + GRACE)),
        [unsubscribe(exact("com.example.status"), 100)]
    );
    assert_eq!(d.next_deadline(), None, "no deadline left to spin on");
    assert_eq!(d.poll(t0 + GRACE * 2), []);
    d.on_unsubscribed(sub(100));
    assert_eq!(
        d.poll(t0 + GRACE * 2),
        [Output::Note(Note::Unsubscribed {
            topic: exact("com.example.status"),
            subscription: sub(100)
        })]
    );
    assert_eq!(d.active_subscriptions(), 0);
    assert_eq!(d.poll(t0 + GRACE * 3), []);
}

#[test]
fn zero_grace_unsubscribes_at_once() {
    let t0 = Instant::now();
    let mut d = subscribed_status(Duration::ZERO, t0);
    d.on_meta_event(deleted(1), t0);
    let out = d.poll(t0);
    assert_eq!(
        actions(&out),
        [unsubscribe(exact("com.example.status"), 100)]
    );
    assert!(
        !notes(&out)
            .iter()
            .any(|n| matches!(n, Note::GraceStarted { .. }))
    );
}

#[test]
fn topic_shared_by_an_old_and_a_new_registration_stays_while_either_lives() {
    let t0 = Instant::now();
    let mut d = subscribed_status(Duration::ZERO, t0);
    // Churn reordered: the new registration is reported before the old one's delete.
    d.on_meta_event(created(2, "com.example.SUB_status"), t0);
    d.on_meta_event(deleted(1), t0);
    assert_eq!(actions(&d.poll(t0)), []);
    assert_eq!(d.tracked_registrations(), 1);
    d.on_meta_event(deleted(2), t0);
    assert_eq!(
        actions(&d.poll(t0)),
        [unsubscribe(exact("com.example.status"), 100)]
    );
}

#[test]
fn exact_and_wildcard_topics_with_the_same_string_are_separate_subscriptions() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_meta_event(created_with(1, "com..SUB_x", MatchPolicy::Wildcard), t0);
    d.on_meta_event(created_with(2, "com..SUB_x", MatchPolicy::Exact), t0);
    d.on_meta_event(created(3, "com.a.SUB_x"), t0);
    assert_eq!(
        actions(&d.poll(t0)),
        [
            subscribe(exact("com..x")),
            subscribe(wildcard("com..x")),
            subscribe(exact("com.a.x")),
        ]
    );
}

#[test]
fn no_second_subscribe_while_one_is_in_flight() {
    let t0 = Instant::now();
    let mut d = discovery(Duration::ZERO);
    d.on_meta_event(created(1, "a.SUB_b"), t0);
    assert_eq!(actions(&d.poll(t0)), [subscribe(exact("a.b"))]);
    // Registration churns while SUBSCRIBE is in flight.
    d.on_meta_event(deleted(1), t0);
    d.on_meta_event(created(2, "a.SUB_b"), t0);
    assert_eq!(actions(&d.poll(t0)), []);
    d.on_subscribed(&exact("a.b"), sub(7));
    assert_eq!(actions(&d.poll(t0)), []);
    assert_eq!(d.active_subscriptions(), 1);
}

#[test]
fn topic_deleted_and_expired_while_subscribing_is_unsubscribed_once_subscribed_lands() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_meta_event(created(1, "a.SUB_b"), t0);
    d.poll(t0);
    d.on_meta_event(deleted(1), t0);
    d.poll(t0);
    assert_eq!(actions(&d.poll(t0 + GRACE)), []);
    assert_eq!(d.next_deadline(), None);
    d.on_subscribed(&exact("a.b"), sub(7));
    assert_eq!(actions(&d.poll(t0 + GRACE)), [unsubscribe(exact("a.b"), 7)]);
}

#[test]
fn topic_wanted_again_while_unsubscribing_is_subscribed_after_unsubscribed_lands() {
    let t0 = Instant::now();
    let mut d = subscribed_status(Duration::ZERO, t0);
    d.on_meta_event(deleted(1), t0);
    assert_eq!(
        actions(&d.poll(t0)),
        [unsubscribe(exact("com.example.status"), 100)]
    );
    d.on_meta_event(created(2, "com.example.SUB_status"), t0);
    assert_eq!(actions(&d.poll(t0)), [], "wait for the UNSUBSCRIBE to land");
    // Events still arriving on the old subscription are routed.
    assert!(d.route(sub(100), None).is_ok());
    d.on_unsubscribed(sub(100));
    assert_eq!(
        actions(&d.poll(t0)),
        [subscribe(exact("com.example.status"))]
    );
}

#[test]
fn refused_subscribe_is_retried_after_the_delay_not_at_once() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_meta_event(created(1, "a.SUB_b"), t0);
    d.poll(t0);
    d.on_subscribe_failed(&exact("a.b"), "wamp.error.not_authorized".into(), t0);
    let out = d.poll(t0);
    assert_eq!(
        out,
        [Output::Note(Note::SubscribeFailed {
            topic: exact("a.b"),
            error: "wamp.error.not_authorized".into(),
            retry_in: RETRY
        })]
    );
    assert_eq!(d.poll(t0 + RETRY / 2), []);
    assert_eq!(d.next_deadline(), Some(t0 + RETRY));
    assert_eq!(actions(&d.poll(t0 + RETRY)), [subscribe(exact("a.b"))]);
    assert_eq!(d.next_deadline(), None);
}

#[test]
fn failed_topic_whose_registrations_are_gone_is_dropped() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_meta_event(created(1, "a.SUB_b"), t0);
    d.poll(t0);
    d.on_subscribe_failed(&exact("a.b"), "denied".into(), t0);
    d.on_meta_event(deleted(1), t0);
    d.poll(t0);
    assert_eq!(d.next_deadline(), None);
    assert_eq!(d.poll(t0 + RETRY), []);
}

#[test]
fn failed_unsubscribe_forgets_the_subscription() {
    let t0 = Instant::now();
    let mut d = subscribed_status(Duration::ZERO, t0);
    d.on_meta_event(deleted(1), t0);
    d.poll(t0);
    d.on_unsubscribe_failed(sub(100), "wamp.error.no_such_subscription".into());
    let out = d.poll(t0);
    assert_eq!(
        notes(&out),
        [Note::UnsubscribeFailed {
            topic: exact("com.example.status"),
            subscription: sub(100),
            error: "wamp.error.no_such_subscription".into()
        }]
    );
    assert_eq!(d.active_subscriptions(), 0);
    assert_eq!(
        d.route(sub(100), None),
        Err(RouteError::UnknownSubscription(sub(100)))
    );
}

#[test]
fn revoked_subscription_is_subscribed_again_while_wanted() {
    let t0 = Instant::now();
    let mut d = subscribed_status(GRACE, t0);
    d.on_unsubscribed(sub(100));
    assert_eq!(
        actions(&d.poll(t0)),
        [subscribe(exact("com.example.status"))]
    );
}

#[test]
fn completions_with_nothing_in_flight_are_ignored() {
    let t0 = Instant::now();
    let mut d = subscribed_status(GRACE, t0);
    d.on_subscribed(&exact("com.example.status"), sub(555));
    d.on_subscribe_failed(&exact("com.example.status"), "x".into(), t0);
    d.on_subscribed(&exact("never.asked"), sub(556));
    d.on_unsubscribed(sub(557));
    d.on_unsubscribe_failed(sub(558), "x".into());
    d.on_get_result(reg(42), GetOutcome::Failed("x".into()), t0);
    assert_eq!(d.poll(t0), []);
    assert_eq!(
        d.topic_for_subscription(sub(100)),
        Some(("com.example.status", MatchPolicy::Exact))
    );
    assert_eq!(d.active_subscriptions(), 1);
}

#[test]
fn reset_forgets_everything_but_the_configuration() {
    let t0 = Instant::now();
    let mut d = subscribed_status(GRACE, t0);
    d.on_list_result([reg(9)]);
    d.on_meta_event(deleted(3), t0);
    d.reset();
    assert_eq!(d.tracked_registrations(), 0);
    assert_eq!(d.active_subscriptions(), 0);
    assert!(!d.is_synced());
    assert_eq!(d.next_deadline(), None);
    assert_eq!(d.poll(t0), []);
    // Rebuilt from scratch: the same registration subscribes again.
    d.on_meta_event(created(1, "com.example.SUB_status"), t0);
    assert_eq!(
        actions(&d.poll(t0)),
        [subscribe(exact("com.example.status"))]
    );
}

// ----- routing -------------------------------------------------------------

#[test]
fn exact_event_routes_to_the_registration_procedure() {
    let t0 = Instant::now();
    let d = subscribed_status(GRACE, t0);
    let route = d.route(sub(100), None).unwrap();
    assert_eq!(route.procedure, "com.example.SUB_status");
    assert_eq!(route.topic, "com.example.status");
    assert!(matches!(route.procedure, Cow::Borrowed(_)));
    assert_eq!(
        d.topic_for_subscription(sub(100)),
        Some(("com.example.status", MatchPolicy::Exact))
    );
}

#[test]
fn wildcard_event_maps_to_concrete_procedure() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_meta_event(
        created_with(1, "com..SUB_status", MatchPolicy::Wildcard),
        t0,
    );
    d.poll(t0);
    d.on_subscribed(&wildcard("com..status"), sub(200));
    let route = d.route(sub(200), Some("com.device7.status")).unwrap();
    assert_eq!(route.procedure, "com.device7.SUB_status");
    assert_eq!(route.topic, "com.device7.status");
    assert_eq!(
        d.topic_for_subscription(sub(200)),
        Some(("com..status", MatchPolicy::Wildcard))
    );
}

#[test]
fn wildcard_event_without_a_topic_is_an_error() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_meta_event(
        created_with(1, "com..SUB_status", MatchPolicy::Wildcard),
        t0,
    );
    d.poll(t0);
    d.on_subscribed(&wildcard("com..status"), sub(200));
    let err = d.route(sub(200), None).unwrap_err();
    assert_eq!(
        err,
        RouteError::MissingTopic {
            subscription: sub(200),
            pattern: wildcard("com..status")
        }
    );
    assert_eq!(
        err.to_string(),
        "event for com..status (wildcard) subscription 200 carries no details.topic"
    );
}

#[test]
fn event_for_unknown_subscription_is_an_error_to_count() {
    let d = discovery(GRACE);
    assert_eq!(
        d.route(sub(1), Some("a.b")),
        Err(RouteError::UnknownSubscription(sub(1)))
    );
    assert_eq!(d.topic_for_subscription(sub(1)), None);
}

#[test]
fn events_for_a_topic_in_its_grace_period_are_still_routed() {
    let t0 = Instant::now();
    let mut d = subscribed_status(GRACE, t0);
    d.on_meta_event(deleted(1), t0);
    d.poll(t0);
    assert_eq!(
        d.route(sub(100), None).map(|r| r.procedure.into_owned()),
        Ok("com.example.SUB_status".to_owned())
    );
}

#[test]
fn notes_read_as_log_lines() {
    let n = Note::RegistrationTracked {
        id: reg(5),
        uri: "a.SUB_b".into(),
        invoke: "roundrobin".into(),
        topic: exact("a.b"),
    };
    assert_eq!(
        n.to_string(),
        "tracking SUB_ registration a.SUB_b (id 5, invoke roundrobin) for topic a.b"
    );
    assert_eq!(n.level(), Level::Info);
}
