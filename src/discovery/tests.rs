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
                group: Group::default(),
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
        group: Group::default(),
        grace: GRACE
    }));
    assert_eq!(d.next_deadline(), Some(t0 + GRACE));
    // The backend comes back with a new registration id for the same URI.
    let t1 = t0 + GRACE / 2;
    d.on_meta_event(created(2, "com.example.SUB_status"), t1);
    let out = d.poll(t1);
    assert_eq!(actions(&out), []);
    assert!(notes(&out).contains(&Note::TopicResumed {
        topic: exact("com.example.status"),
        group: Group::default(),
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
fn failed_topic_whose_registrations_are_gone_is_dropped_after_its_grace_period() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_meta_event(created(1, "a.SUB_b"), t0);
    d.poll(t0);
    d.on_subscribe_failed(&exact("a.b"), "denied".into(), t0);
    d.on_meta_event(deleted(1), t0);
    d.poll(t0);
    // The group waits for its backends (grace 10 s, before the retry).
    assert_eq!(d.next_deadline(), Some(t0 + GRACE));
    assert_eq!(d.poll(t0 + GRACE), []);
    assert_eq!(d.next_deadline(), None);
    assert_eq!(d.poll(t0 + RETRY), []);
}

/// A group whose backends are away is subscribed for all the same (its
/// events wait for them): when the router lost the subscription, and when
/// an instance starts knowing the group only from before.
#[test]
fn a_group_whose_backends_are_away_is_subscribed_for() {
    let t0 = Instant::now();
    let mut d = subscribed_status(GRACE, t0);
    d.on_list_result([]);
    d.on_meta_event(deleted(1), t0);
    d.poll(t0);
    // The router revokes the subscription within the grace period.
    d.on_unsubscribed(sub(100));
    assert_eq!(
        actions(&d.poll(t0)),
        [subscribe(exact("com.example.status"))]
    );
    let states: Vec<GroupState> = d.group_states().collect();
    assert_eq!(states.len(), 1);
    assert!(states[0].away);
    assert_eq!(&*states[0].procedure, "com.example.SUB_status");

    // A fresh start that remembers the group.
    let mut fresh = discovery(GRACE);
    assert!(fresh.remember("com.example.SUB_status", t0 + GRACE, t0));
    assert!(!fresh.remember("com.example.status", t0 + GRACE, t0));
    // The registration list first, as on any start.
    assert_eq!(actions(&fresh.poll(t0)), []);
    fresh.on_list_result([]);
    assert_eq!(
        actions(&fresh.poll(t0)),
        [subscribe(exact("com.example.status"))]
    );
    assert_eq!(
        fresh.snapshot(t0),
        [("com.example.SUB_status".into(), t0 + GRACE)]
    );
    // Its grace ends unless a registration comes.
    fresh.on_subscribed(&exact("com.example.status"), sub(7));
    fresh.poll(t0);
    assert_eq!(fresh.next_deadline(), Some(t0 + GRACE));
    let out = fresh.poll(t0 + GRACE);
    assert!(
        actions(&out)
            .iter()
            .any(|a| matches!(a, Action::Unsubscribe { .. }))
    );
    assert_eq!(fresh.group_states().count(), 0);
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
    assert_eq!(route.procedures, ["com.example.SUB_status"]);
    assert_eq!(route.topic, "com.example.status");
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
    assert_eq!(route.procedures, ["com.device7.SUB_status"]);
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
        d.route(sub(100), None).map(|r| r.procedures),
        Ok(vec!["com.example.SUB_status".to_owned()])
    );
}

// ----- consumer groups -------------------------------------------------------

#[test]
fn groups_of_one_topic_share_one_subscription_and_each_get_every_event() {
    let t0 = Instant::now();
    let mut d = subscribed_status(GRACE, t0);
    d.on_meta_event(created(2, "com.example.SUB_status__audit"), t0);
    let out = d.poll(t0);
    assert_eq!(
        actions(&out),
        [],
        "one subscription per topic, however many groups"
    );
    assert!(notes(&out).contains(&Note::RegistrationTracked {
        id: reg(2),
        uri: "com.example.SUB_status__audit".into(),
        invoke: "roundrobin".into(),
        topic: exact("com.example.status"),
        group: Group::named("audit"),
    }));
    let route = d.route(sub(100), None).unwrap();
    assert_eq!(
        route.procedures,
        ["com.example.SUB_status", "com.example.SUB_status__audit"]
    );
    assert_eq!(d.group_count(), 2);
    assert_eq!(
        d.groups()
            .map(|(k, g)| (k.topic.clone(), g.clone()))
            .collect::<Vec<_>>(),
        [
            ("com.example.status".to_owned(), Group::default()),
            ("com.example.status".to_owned(), Group::named("audit"))
        ]
    );
}

#[test]
fn a_group_leaves_after_its_grace_without_touching_the_others() {
    let t0 = Instant::now();
    let mut d = subscribed_status(GRACE, t0);
    d.on_meta_event(created(2, "com.example.SUB_status__audit"), t0);
    d.poll(t0);
    d.on_meta_event(deleted(2), t0);
    let out = d.poll(t0);
    assert!(notes(&out).contains(&Note::GraceStarted {
        topic: exact("com.example.status"),
        group: Group::named("audit"),
        grace: GRACE
    }));
    // In its grace period the group still gets events.
    assert_eq!(d.route(sub(100), None).unwrap().procedures.len(), 2);
    assert_eq!(d.next_deadline(), Some(t0 + GRACE));
    let out = d.poll(t0 + GRACE);
    assert_eq!(
        actions(&out),
        [],
        "the default group keeps the subscription"
    );
    assert_eq!(
        notes(&out),
        [Note::GroupLeft {
            topic: exact("com.example.status"),
            group: Group::named("audit")
        }]
    );
    assert_eq!(
        d.route(sub(100), None).unwrap().procedures,
        ["com.example.SUB_status"]
    );
    assert_eq!(d.group_count(), 1);
    assert_eq!(d.next_deadline(), None);
}

#[test]
fn wildcard_groups_map_each_event_to_each_group_procedure() {
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    d.on_meta_event(
        created_with(1, "com..SUB_status__audit", MatchPolicy::Wildcard),
        t0,
    );
    d.on_meta_event(
        created_with(2, "com..SUB_status", MatchPolicy::Wildcard),
        t0,
    );
    assert_eq!(actions(&d.poll(t0)), [subscribe(wildcard("com..status"))]);
    d.on_subscribed(&wildcard("com..status"), sub(200));
    let route = d.route(sub(200), Some("com.d7.status")).unwrap();
    assert_eq!(
        route.procedures,
        ["com.d7.SUB_status", "com.d7.SUB_status__audit"]
    );
}

#[test]
fn notes_read_as_log_lines() {
    let n = Note::RegistrationTracked {
        id: reg(5),
        uri: "a.SUB_b".into(),
        invoke: "roundrobin".into(),
        topic: exact("a.b"),
        group: Group::default(),
    };
    assert_eq!(
        n.to_string(),
        "tracking SUB_ registration a.SUB_b (id 5, invoke roundrobin) for topic a.b, default group"
    );
    assert_eq!(n.level(), Level::Info);
}

// ----- property test -------------------------------------------------------

/// Random interleavings of registration churn, list/get answers, completions
/// (some failing) and time, against a fake router that checks every action.
mod churn {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    const GRACE: Duration = Duration::from_secs(10);
    const RETRY: Duration = Duration::from_secs(15);

    /// The registrations backends may make: SUB_ exact and wildcard ones, two
    /// mapping to the same topic string, a second group of an exact and of a
    /// wildcard topic, a SUB_ prefix one and an ordinary one.
    const URIS: [(&str, MatchPolicy); 8] = [
        ("a.SUB_x", MatchPolicy::Exact),
        ("a.SUB_x__g", MatchPolicy::Exact),
        ("a..SUB_x__g", MatchPolicy::Wildcard),
        ("b.SUB_x", MatchPolicy::Exact),
        ("a..SUB_x", MatchPolicy::Wildcard),
        ("a..SUB_x", MatchPolicy::Exact),
        ("a.SUB_x", MatchPolicy::Prefix),
        ("a.plain", MatchPolicy::Exact),
    ];

    #[derive(Debug, Clone)]
    enum Op {
        /// A backend registers URIS[i] (a new registration, or another callee).
        Register(usize),
        /// Like `Register`, but before we subscribed to the meta topics: no
        /// events, only the list can tell. Ignored once the list is taken.
        PreExisting(usize),
        /// The last callee of the n-th live registration leaves.
        Delete(usize),
        /// The initial `wamp.registration.list` is answered (once).
        List,
        /// The n-th `get` in flight is answered.
        AnswerGet(usize, Answer),
        /// The n-th SUBSCRIBE in flight completes; `true`: refused.
        CompleteSubscribe(usize, bool),
        /// The n-th UNSUBSCRIBE in flight completes; `true`: with an error.
        CompleteUnsubscribe(usize, bool),
        Advance(u64),
    }

    /// How the router answers a `get`.
    #[derive(Debug, Clone, Copy)]
    enum Answer {
        /// With the state at the time of the answer.
        Current,
        /// With the state at the time of the call: the result was on its way
        /// (or queued in the layer above) while the registration was deleted.
        Stale,
        Failed,
    }

    fn answer() -> impl Strategy<Value = Answer> {
        prop_oneof![
            3 => Just(Answer::Current),
            2 => Just(Answer::Stale),
            1 => Just(Answer::Failed),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..URIS.len()).prop_map(Op::Register),
            1 => (0..URIS.len()).prop_map(Op::PreExisting),
            3 => (0..8usize).prop_map(Op::Delete),
            1 => Just(Op::List),
            3 => (0..4usize, answer()).prop_map(|(n, a)| Op::AnswerGet(n, a)),
            3 => (0..4usize, prop::bool::weighted(0.2))
                .prop_map(|(n, f)| Op::CompleteSubscribe(n, f)),
            3 => (0..4usize, prop::bool::weighted(0.2))
                .prop_map(|(n, f)| Op::CompleteUnsubscribe(n, f)),
            2 => (0..25u64).prop_map(Op::Advance),
        ]
    }

    /// The router as far as discovery can tell, plus the requests in flight.
    struct World {
        d: Discovery,
        now: Instant,
        next_id: u64,
        listed: bool,
        /// Live registrations: id -> index into URIS.
        live: BTreeMap<u64, usize>,
        /// Subscriptions on the router.
        subs: BTreeMap<TopicKey, SubscriptionId>,
        subscribing: Vec<TopicKey>,
        unsubscribing: Vec<(TopicKey, SubscriptionId)>,
        /// Gets in flight, with what the router would have said when asked.
        getting: Vec<(RegistrationId, GetOutcome)>,
    }

    impl World {
        fn new() -> World {
            World {
                d: Discovery::new(Marker::default(), None, GRACE).with_retry_delay(RETRY),
                now: Instant::now(),
                next_id: 1,
                listed: false,
                live: BTreeMap::new(),
                subs: BTreeMap::new(),
                subscribing: Vec::new(),
                unsubscribing: Vec::new(),
                getting: Vec::new(),
            }
        }

        fn info(&self, id: u64) -> RegistrationInfo {
            let (uri, policy) = URIS[self.live[&id]];
            info(id, uri, policy)
        }

        fn lookup(&self, id: RegistrationId) -> GetOutcome {
            if self.live.contains_key(&id.0) {
                GetOutcome::Found(self.info(id.0))
            } else {
                GetOutcome::NoSuchRegistration
            }
        }

        fn live_id(&self, uri: usize) -> Option<u64> {
            self.live
                .iter()
                .find(|(_, u)| **u == uri)
                .map(|(id, _)| *id)
        }

        fn apply(&mut self, op: Op) {
            match op {
                Op::Register(u) => match self.live_id(u) {
                    Some(id) => self.d.on_meta_event(registered(id), self.now),
                    None => {
                        let id = self.next_id;
                        self.next_id += 1;
                        self.live.insert(id, u);
                        let (uri, policy) = URIS[u];
                        self.d
                            .on_meta_event(created_with(id, uri, policy), self.now);
                        self.d.on_meta_event(registered(id), self.now);
                    }
                },
                Op::PreExisting(u) => {
                    if !self.listed && self.live_id(u).is_none() {
                        self.live.insert(self.next_id, u);
                        self.next_id += 1;
                    }
                }
                Op::Delete(n) => {
                    if let Some(id) = self.live.keys().nth(n).copied() {
                        self.live.remove(&id);
                        self.d.on_meta_event(deleted(id), self.now);
                    }
                }
                Op::List => {
                    if !self.listed {
                        self.listed = true;
                        let ids: Vec<_> = self.live.keys().map(|id| reg(*id)).collect();
                        self.d.on_list_result(ids);
                    }
                }
                Op::AnswerGet(n, answer) => {
                    if n < self.getting.len() {
                        let (id, stale) = self.getting.remove(n);
                        let outcome = match answer {
                            Answer::Current => self.lookup(id),
                            Answer::Stale => stale,
                            Answer::Failed => GetOutcome::Failed("wamp.error.timeout".into()),
                        };
                        self.d.on_get_result(id, outcome, self.now);
                    }
                }
                Op::CompleteSubscribe(n, fail) => {
                    if n < self.subscribing.len() {
                        let key = self.subscribing.remove(n);
                        if fail {
                            self.d.on_subscribe_failed(&key, "denied".into(), self.now);
                        } else {
                            let id = SubscriptionId(self.next_id);
                            self.next_id += 1;
                            self.subs.insert(key.clone(), id);
                            self.d.on_subscribed(&key, id);
                        }
                    }
                }
                Op::CompleteUnsubscribe(n, fail) => {
                    if n < self.unsubscribing.len() {
                        let (key, id) = self.unsubscribing.remove(n);
                        // Either way the router no longer has it (a failure
                        // here plays `no_such_subscription`).
                        self.subs.remove(&key);
                        if fail {
                            self.d.on_unsubscribe_failed(id, "gone".into());
                        } else {
                            self.d.on_unsubscribed(id);
                        }
                    }
                }
                Op::Advance(secs) => self.now += Duration::from_secs(secs),
            }
            self.poll();
        }

        /// Executes what discovery asks for, checking it makes sense.
        fn poll(&mut self) {
            for out in self.d.poll(self.now) {
                let Output::Action(action) = out else {
                    continue;
                };
                match action {
                    Action::Subscribe(key) => {
                        assert!(!self.subscribing.contains(&key), "two SUBSCRIBEs for {key}");
                        assert!(
                            !self.subs.contains_key(&key),
                            "SUBSCRIBE for {key}, subscribed"
                        );
                        self.subscribing.push(key);
                    }
                    Action::Unsubscribe {
                        topic,
                        subscription,
                    } => {
                        assert_eq!(self.subs.get(&topic), Some(&subscription));
                        assert!(
                            !self.unsubscribing.iter().any(|(k, _)| *k == topic),
                            "two UNSUBSCRIBEs for {topic}"
                        );
                        self.unsubscribing.push((topic, subscription));
                    }
                    Action::GetRegistration(id) => {
                        assert!(
                            !self.getting.iter().any(|(g, _)| *g == id),
                            "two gets for {id}"
                        );
                        let outcome = self.lookup(id);
                        self.getting.push((id, outcome));
                    }
                }
            }
            self.check();
        }

        fn wanted_topics(&self) -> BTreeSet<TopicKey> {
            let mapper = Mapper::new(Marker::default(), None);
            self.live
                .values()
                .filter_map(|u| match mapper.classify(URIS[*u].0, URIS[*u].1) {
                    Classification::Shared(key, _) => Some(key),
                    _ => None,
                })
                .collect()
        }

        /// The procedures an event on `concrete` (matching `key`) should go
        /// to: one per group with a live registration for `key`.
        fn wanted_procedures(&self, key: &TopicKey, concrete: &str) -> BTreeSet<String> {
            let mapper = Mapper::new(Marker::default(), None);
            self.live
                .values()
                .filter_map(|u| match mapper.classify(URIS[*u].0, URIS[*u].1) {
                    Classification::Shared(k, group) if &k == key => {
                        Some(Marker::default().procedure_for(concrete, &group))
                    }
                    _ => None,
                })
                .collect()
        }

        fn shared_live(&self) -> usize {
            let mapper = Mapper::new(Marker::default(), None);
            self.live
                .values()
                .filter(|u| {
                    matches!(
                        mapper.classify(URIS[**u].0, URIS[**u].1),
                        Classification::Shared(..)
                    )
                })
                .count()
        }

        fn check(&self) {
            assert_eq!(self.d.active_subscriptions(), self.subs.len());
            for (key, id) in &self.subs {
                assert_eq!(
                    self.d.topic_for_subscription(*id),
                    Some((key.topic.as_str(), key.policy))
                );
            }
            assert!(self.d.tracked_registrations() <= self.shared_live());
            if self.d.is_synced() {
                assert_eq!(self.d.tracked_registrations(), self.shared_live());
            }
            if let Some(deadline) = self.d.next_deadline() {
                assert!(deadline > self.now, "a deadline in the past would spin");
            }
        }

        /// Answers everything in flight successfully and lets time pass until
        /// nothing moves any more.
        fn settle(&mut self) {
            if !self.listed {
                self.apply(Op::List);
            }
            for _ in 0..50 {
                let busy = !(self.getting.is_empty()
                    && self.subscribing.is_empty()
                    && self.unsubscribing.is_empty());
                if !busy && self.d.next_deadline().is_none() {
                    return;
                }
                while !self.getting.is_empty() {
                    self.apply(Op::AnswerGet(0, Answer::Current));
                }
                while !self.subscribing.is_empty() {
                    self.apply(Op::CompleteSubscribe(0, false));
                }
                while !self.unsubscribing.is_empty() {
                    self.apply(Op::CompleteUnsubscribe(0, false));
                }
                if let Some(deadline) = self.d.next_deadline() {
                    self.now = deadline;
                    self.poll();
                }
            }
            panic!("discovery did not settle");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn discovery_converges_to_the_router_state_under_any_interleaving(
            ops in prop::collection::vec(op(), 0..60)
        ) {
            let mut w = World::new();
            for op in ops {
                w.apply(op);
            }
            // Every wanted topic ends up subscribed, and nothing else.
            w.settle();
            prop_assert!(w.d.is_synced());
            prop_assert_eq!(w.d.tracked_registrations(), w.shared_live());
            let subscribed: BTreeSet<TopicKey> = w.subs.keys().cloned().collect();
            prop_assert_eq!(subscribed, w.wanted_topics());
            // Each event goes to exactly the groups with a live registration.
            for (key, id) in &w.subs {
                let concrete = match key.policy {
                    MatchPolicy::Wildcard => key.topic.replace("..", ".q."),
                    _ => key.topic.clone(),
                };
                let routed: BTreeSet<String> = w
                    .d
                    .route(*id, Some(&concrete))
                    .unwrap()
                    .procedures
                    .into_iter()
                    .collect();
                prop_assert_eq!(routed, w.wanted_procedures(key, &concrete));
            }
            // Once every registration is gone and the grace has passed,
            // every subscription is gone too.
            let ids: Vec<u64> = w.live.keys().copied().collect();
            for _ in ids {
                w.apply(Op::Delete(0));
            }
            w.settle();
            prop_assert!(w.subs.is_empty());
            prop_assert_eq!(w.d.active_subscriptions(), 0);
            prop_assert_eq!(w.d.tracked_registrations(), 0);
            prop_assert_eq!(w.d.next_deadline(), None);
            prop_assert!(w.d.poll(w.now).is_empty());
        }
    }
}

#[test]
fn a_churn_of_thousands_of_registrations_leaves_nothing_behind() {
    // The probe: 2,000 registrations up and down, three times.
    let t0 = Instant::now();
    let mut d = discovery(GRACE);
    let mut now = t0;
    for round in 0..3u64 {
        let ids = (1..=2000u64).map(|i| round * 10_000 + i);
        for id in ids.clone() {
            d.on_meta_event(created(id, &format!("com.example.t{id}.SUB_x")), now);
        }
        for (n, action) in actions(&d.poll(now)).into_iter().enumerate() {
            let Action::Subscribe(key) = action else {
                panic!("{action:?}")
            };
            d.on_subscribed(&key, sub(round * 100_000 + n as u64));
        }
        assert_eq!(d.active_subscriptions(), 2000);
        let peak = d.capacity();
        for id in ids {
            d.on_meta_event(deleted(id), now);
        }
        now += GRACE;
        for action in actions(&d.poll(now)) {
            let Action::Unsubscribe { subscription, .. } = action else {
                panic!("{action:?}")
            };
            d.on_unsubscribed(subscription);
        }
        d.poll(now);
        assert_eq!(d.tracked_registrations(), 0);
        assert_eq!(d.active_subscriptions(), 0);
        assert_eq!(
            d.footprint(),
            0,
            "round {round}: nothing kept per registration"
        );
        assert!(
            d.capacity() < peak / 4,
            "round {round}: room given back ({} of {peak})",
            d.capacity()
        );
    }
}
