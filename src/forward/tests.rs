//! The forwarding core driven like the event loop drives it: unit tests of
//! each rule, and a model-based property test over random sequences of
//! accepts, outcomes, time, sink availability and shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::retry::{Backoff, RetryPolicy};
use super::*;
use crate::wamp::{Dict, Payload, RequestError, WampError};

const S: Duration = Duration::from_secs(1);

fn settings(capacity: usize, max_in_flight: usize, dispatch: Dispatch) -> Settings {
    Settings {
        capacity,
        overflow: OverflowPolicy::DropNewest,
        max_in_flight,
        dispatch,
        retry: RetryPolicy {
            max_attempts: 3,
            max_age: 100 * S,
            backoff: Backoff {
                initial: S,
                max: 4 * S,
            },
        },
        batching: Batching::default(),
    }
}

/// A core whose sink is not open yet: what is accepted waits.
fn closed(s: Settings) -> Forwarder<u32, MemoryQueue<u32>> {
    Forwarder::new(MemoryQueue::new(), s, 7)
}

fn core(s: Settings) -> Forwarder<u32, MemoryQueue<u32>> {
    let mut f = closed(s);
    f.set_open(true, Instant::now());
    f
}

/// A pipeline core that accepted `items` while closed, then opened.
fn pipeline_with(
    items: std::ops::RangeInclusive<u32>,
    t0: Instant,
) -> Forwarder<u32, MemoryQueue<u32>> {
    let mut f = closed(settings(10, 100, Dispatch::Pipeline { max: 3 }));
    for i in items {
        f.accept(i, t0);
    }
    f.set_open(true, t0);
    f
}

/// A procedure's policy: the test settings' retry with `max_attempts`,
/// its own bound on calls in flight and its own batching.
fn policy(
    max_attempts: u32,
    max_in_flight: Option<usize>,
    batching: Batching,
) -> std::sync::Arc<policy::Policy> {
    let base = settings(1, 1, Dispatch::Each);
    std::sync::Arc::new(policy::Policy {
        order_by: crate::config::OrderBy::None,
        call_timeout: S,
        max_in_flight,
        retry: RetryPolicy {
            max_attempts,
            ..base.retry
        },
        max_deliveries: 5,
        batching,
        details_kwarg: None,
        grace_period: Duration::ZERO,
    })
}

fn outputs<T, Q: Queue<T>>(f: &mut Forwarder<T, Q>) -> Vec<Output<T>> {
    std::iter::from_fn(|| f.poll()).collect()
}

fn delivered_ids(out: &[Output<u32>]) -> Vec<DeliveryId> {
    out.iter()
        .filter_map(|o| match o {
            Output::Deliver(id) => Some(*id),
            _ => None,
        })
        .collect()
}

fn wamp(uri: &str) -> Outcome {
    Err(Failure::Call(RequestError::Wamp(WampError {
        error: uri.into(),
        details: Dict::new(),
        payload: Payload::default(),
    })))
}

fn lost() -> Outcome {
    Err(Failure::Call(RequestError::ConnectionLost))
}

#[test]
fn events_start_in_order_up_to_the_in_flight_limit() {
    let t0 = Instant::now();
    let mut f = core(settings(10, 2, Dispatch::Each));
    for i in 0..3 {
        f.accept(i, t0);
    }
    let ids = delivered_ids(&outputs(&mut f));
    assert_eq!(ids.len(), 2, "two in flight");
    assert_eq!(f.delivery(ids[0]).unwrap()[0].item, 0);
    assert_eq!(f.delivery(ids[1]).unwrap()[0].item, 1);
    assert!(f.on_outcome(ids[1], Ok(()), t0));
    let out = outputs(&mut f);
    assert!(matches!(&out[0], Output::Ack(job) if job.item == 1 && job.attempts == 1));
    let third = delivered_ids(&out);
    assert_eq!(f.delivery(third[0]).unwrap()[0].item, 2);
}

#[test]
fn nothing_starts_while_the_sink_is_closed() {
    let t0 = Instant::now();
    let mut f = closed(settings(10, 2, Dispatch::Each));
    f.accept(1, t0);
    assert!(outputs(&mut f).is_empty());
    assert_eq!(f.waiting(), 1);
    f.set_open(true, t0);
    assert_eq!(delivered_ids(&outputs(&mut f)).len(), 1);
}

#[test]
fn full_queue_dead_letters_the_newest_or_the_oldest_new_event() {
    let t0 = Instant::now();
    let mut f = closed(settings(2, 1, Dispatch::Each));
    for i in 1..=3 {
        f.accept(i, t0);
    }
    assert!(
        matches!(&outputs(&mut f)[..], [Output::DeadLetter(j, GiveUp::Overflow)] if j.item == 3)
    );
    let mut s = settings(2, 1, Dispatch::Each);
    s.overflow = OverflowPolicy::DropOldest;
    let mut f = closed(s);
    for i in 1..=3 {
        f.accept(i, t0);
    }
    assert!(
        matches!(&outputs(&mut f)[..], [Output::DeadLetter(j, GiveUp::Overflow)] if j.item == 1)
    );
    assert_eq!(f.waiting(), 2);
}

#[test]
fn retryable_failure_waits_its_backoff_then_goes_before_newer_events() {
    let t0 = Instant::now();
    let mut f = core(settings(10, 1, Dispatch::Each));
    f.accept(1, t0);
    let id = delivered_ids(&outputs(&mut f))[0];
    f.accept(2, t0);
    f.on_outcome(id, wamp("wamp.error.no_such_procedure"), t0);
    let out = outputs(&mut f);
    let Output::Retrying { at, .. } = out[0] else {
        panic!("{out:?}")
    };
    assert!(at <= t0 + S, "first retry within the initial backoff");
    // Event 2 went meanwhile; the retry is due after it.
    let two = delivered_ids(&out)[0];
    assert_eq!(f.delivery(two).unwrap()[0].item, 2);
    f.on_outcome(two, Ok(()), t0);
    f.accept(3, t0);
    let three = delivered_ids(&outputs(&mut f))[0];
    assert_eq!(f.next_wake(), None, "the slot is taken by event 3");
    f.on_outcome(three, Ok(()), t0);
    outputs(&mut f);
    assert_eq!(f.next_wake(), Some(at));
    f.on_tick(at);
    let retry = delivered_ids(&outputs(&mut f))[0];
    let job = &f.delivery(retry).unwrap()[0];
    assert_eq!((job.item, job.attempts), (1, 2));
    assert!(
        job.last_error
            .as_deref()
            .unwrap()
            .contains("no_such_procedure")
    );
}

#[test]
fn a_final_error_is_dead_lettered_as_rejected_and_a_spent_budget_as_exhausted() {
    let t0 = Instant::now();
    let mut f = core(settings(10, 1, Dispatch::Each));
    f.accept(1, t0);
    let id = delivered_ids(&outputs(&mut f))[0];
    f.on_outcome(id, wamp("com.example.error.rejected"), t0);
    assert!(
        matches!(&outputs(&mut f)[..], [Output::DeadLetter(j, GiveUp::Rejected)]
        if j.last_error.as_deref().unwrap().contains("com.example.error.rejected"))
    );

    f.accept(2, t0);
    let mut now = t0;
    for attempt in 1..=3 {
        let id = delivered_ids(&outputs(&mut f))[0];
        assert_eq!(f.delivery(id).unwrap()[0].attempts, attempt);
        f.on_outcome(id, lost(), now);
        now += 5 * S;
        f.on_tick(now);
    }
    let out = outputs(&mut f);
    assert!(
        matches!(&out[..], [Output::DeadLetter(j, GiveUp::Exhausted)] if j.attempts == 3),
        "{out:?}"
    );
    assert!(f.is_idle());
}

#[test]
fn a_failed_pipeline_goes_back_to_the_head_in_order_and_pauses_the_line() {
    let t0 = Instant::now();
    let mut f = pipeline_with(1..=4, t0);
    let ids = delivered_ids(&outputs(&mut f));
    assert_eq!(ids.len(), 1, "one pipeline at a time");
    let items: Vec<u32> = f.delivery(ids[0]).unwrap().iter().map(|j| j.item).collect();
    assert_eq!(items, [1, 2, 3]);
    f.on_outcome(ids[0], lost(), t0);
    let out = outputs(&mut f);
    let [Output::Retrying { at, .. }] = out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(f.in_flight(), 0);
    f.on_tick(at);
    let again = delivered_ids(&outputs(&mut f))[0];
    let jobs = f.delivery(again).unwrap();
    assert_eq!(jobs.iter().map(|j| j.item).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(jobs[0].attempts, 2);
}

#[test]
fn pipeline_commands_that_fail_one_by_one_are_resolved_one_by_one() {
    let t0 = Instant::now();
    let mut f = pipeline_with(1..=3, t0);
    let id = delivered_ids(&outputs(&mut f))[0];
    let wrongtype = redis::RedisError::from((
        redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
        "WRONGTYPE",
    ));
    f.on_outcomes(id, vec![Ok(()), Err(Failure::Redis(wrongtype))], t0);
    let out = outputs(&mut f);
    assert!(matches!(&out[0], Output::Ack(j) if j.item == 1));
    assert!(matches!(&out[1], Output::DeadLetter(j, GiveUp::Rejected) if j.item == 2));
    assert!(
        matches!(&out[2], Output::Retrying { .. }),
        "a missing outcome is retried"
    );
}

#[test]
fn at_the_shutdown_deadline_every_unfinished_event_is_dead_lettered_once() {
    // The defect this guards: a call in flight at the deadline was neither
    // forwarded nor dead-lettered.
    let t0 = Instant::now();
    let mut f = core(settings(10, 1, Dispatch::Each));
    f.accept(1, t0);
    f.accept(2, t0);
    let id = delivered_ids(&outputs(&mut f))[0];
    f.shutdown(t0 + 10 * S, t0);
    assert_eq!(f.next_wake(), Some(t0 + 10 * S));
    f.on_tick(t0 + 10 * S);
    let out = outputs(&mut f);
    let items: BTreeSet<u32> = out
        .iter()
        .map(|o| match o {
            Output::DeadLetter(j, GiveUp::Shutdown) => j.item,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(items, BTreeSet::from([1, 2]));
    assert!(f.is_idle() && f.is_stopped());
    assert!(
        !f.on_outcome(id, Ok(()), t0 + 11 * S),
        "a late answer is ignored"
    );
    let c = f.counts();
    assert_eq!(
        (c.accepted, c.forwarded, c.dead_lettered, c.late_outcomes),
        (2, 0, 2, 1)
    );
}

#[test]
fn a_key_waits_for_its_head_whose_retry_keeps_its_place_and_a_dead_letter_releases_it() {
    let t0 = Instant::now();
    let mut f = core(settings(10, 4, Dispatch::Each));
    for item in [1, 2, 3] {
        f.accept_job(Job::new(item, t0).with_key(Some(7)), t0);
    }
    f.accept(4, t0);
    let out = outputs(&mut f);
    let ids = delivered_ids(&out);
    let items = |f: &Forwarder<u32, MemoryQueue<u32>>, id| f.delivery(id).unwrap()[0].item;
    assert_eq!(
        ids.iter().map(|id| items(&f, *id)).collect::<Vec<_>>(),
        [1, 4],
        "one of key 7 at a time; the unkeyed event goes beside it"
    );
    assert_eq!(f.waiting(), 2);
    // The head fails: its retry keeps its place, the key waits.
    f.on_outcome(ids[0], lost(), t0);
    let out = outputs(&mut f);
    assert!(delivered_ids(&out).is_empty(), "{out:?}");
    let later = t0 + Duration::from_secs(5);
    f.on_tick(later);
    let retry = delivered_ids(&outputs(&mut f));
    assert_eq!(items(&f, retry[0]), 1, "the head again, not the next");
    // A final error dead-letters the head and releases the key.
    f.on_outcome(retry[0], wamp("com.example.error.no"), later);
    let out = outputs(&mut f);
    assert!(matches!(out[0], Output::DeadLetter(ref j, GiveUp::Rejected) if j.item == 1));
    assert_eq!(items(&f, delivered_ids(&out)[0]), 2);
    let released = out.iter().filter(|o| matches!(o, Output::KeyReleased));
    assert_eq!(released.count(), 1);
}

/// A procedure whose callee is away: its events wait, uncounted, longer
/// than the retry budget's age; resumed, they go in order, and their
/// budget counts from the resumption.
#[test]
fn events_wait_for_a_callee_without_spending_their_retry_budget() {
    let t0 = Instant::now();
    let mut s = settings(10, 1, Dispatch::Each);
    s.retry.max_age = 5 * S;
    let mut f = core(s);
    let unit = 7;
    f.accept_job(Job::new(1, t0).with_unit(unit), t0);
    let first = delivered_ids(&outputs(&mut f));
    // The backend leaves while the call is out: it fails, uncounted.
    f.pause(unit);
    assert!(f.on_outcome(first[0], wamp("wamp.error.no_such_procedure"), t0));
    f.accept_job(Job::new(2, t0).with_unit(unit), t0);
    f.accept_job(Job::new(3, t0).with_unit(8), t0);
    // The other procedure goes on; these two wait, well past 5 s.
    let out = outputs(&mut f);
    assert_eq!(delivered_ids(&out).len(), 1);
    let other = delivered_ids(&out)[0];
    assert_eq!(f.delivery(other).unwrap()[0].item, 3);
    assert!(f.on_outcome(other, Ok(()), t0));
    let later = t0 + 12 * S;
    f.on_tick(later);
    assert_eq!((f.waiting(), f.in_flight()), (2, 0));
    assert!(outputs(&mut f).iter().all(|o| matches!(o, Output::Ack(_))));
    f.resume(unit, later);
    let out = outputs(&mut f);
    let id = delivered_ids(&out)[0];
    let job = &f.delivery(id).unwrap()[0];
    assert_eq!(
        (job.item, job.attempts),
        (1, 1),
        "the failure while away did not count"
    );
    // A failure now is retried: the budget counts from the resumption.
    assert!(f.on_outcome(id, lost(), later));
    assert!(
        outputs(&mut f)
            .iter()
            .any(|o| matches!(o, Output::Retrying { .. }))
    );
    assert_eq!(f.counts().dead_lettered, 0);
}

mod model {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Accept,
        /// Accept an event with this ordering key.
        AcceptKeyed(u64),
        /// Accept an event of batch line `.0` (and key `.1`, if any).
        AcceptBatched(u64, Option<u64>),
        /// Accept an event with a history (a queue entry taken over from
        /// another instance): received this many ms ago, attempted before.
        AcceptTaken(u64, u32),
        /// Finish the n-th delivery in flight with this outcome.
        Finish(usize, Kind),
        /// Finish the n-th delivery in flight event by event.
        FinishEach(usize, Vec<Kind>),
        Advance(u64),
        Open(bool),
        Shutdown(u64),
        /// Hand back the waiting events whose item is `.1` modulo `.0`.
        Withdraw(u32, u32),
        /// Undo the n-th delivery in flight before it starts.
        Cancel(usize),
        /// The n-th unit (of [`UNITS`]) loses its callee.
        Pause(usize),
        /// The n-th unit has a callee again.
        Resume(usize),
    }

    /// The units events belong to: the two batch lines, and two plain
    /// procedures.
    const UNITS: [u64; 4] = [0, 1, 10, 11];

    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Ok,
        Transient,
        Final,
    }

    impl Kind {
        fn outcome(self) -> Outcome {
            match self {
                Kind::Ok => Ok(()),
                Kind::Transient => lost(),
                Kind::Final => wamp("com.example.error.no"),
            }
        }
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![3 => Just(Kind::Ok), 2 => Just(Kind::Transient), 1 => Just(Kind::Final)]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => Just(Op::Accept),
            6 => (0..3u64).prop_map(Op::AcceptKeyed),
            6 => (0..2u64, prop::option::of(0..3u64)).prop_map(|(l, k)| Op::AcceptBatched(l, k)),
            2 => (0..200_000u64, 0..8u32).prop_map(|(ago, n)| Op::AcceptTaken(ago, n)),
            6 => (0..8usize, kind()).prop_map(|(n, k)| Op::Finish(n, k)),
            1 => (0..8usize, prop::collection::vec(kind(), 0..4)).prop_map(|(n, k)| Op::FinishEach(n, k)),
            3 => (0..3000u64).prop_map(Op::Advance),
            1 => any::<bool>().prop_map(Op::Open),
            1 => (0..20_000u64).prop_map(Op::Shutdown),
            1 => (2..4u32, 0..2u32).prop_map(|(m, r)| Op::Withdraw(m, r)),
            1 => (0..8usize).prop_map(Op::Cancel),
            1 => (0..4usize).prop_map(Op::Pause),
            2 => (0..4usize).prop_map(Op::Resume),
        ]
    }

    fn dispatch() -> impl Strategy<Value = Dispatch> {
        prop_oneof![
            Just(Dispatch::Each),
            (1..5usize).prop_map(|max| Dispatch::Pipeline { max })
        ]
    }

    fn batching() -> impl Strategy<Value = Batching> {
        (
            1..5usize,
            1..3usize,
            prop_oneof![Just(0u64), 1..2000u64],
            10..45usize,
        )
            .prop_map(|(max_events, in_flight, linger, max_bytes)| Batching {
                max_events,
                max_bytes,
                in_flight,
                linger: Duration::from_millis(linger),
            })
    }

    /// The driver's side: what it was told to deliver, and what became of
    /// each accepted event.
    struct World {
        f: Forwarder<u32, MemoryQueue<u32>>,
        now: Instant,
        next_item: u32,
        max_in_flight: usize,
        pipeline: bool,
        /// Deliveries in flight and their items.
        flying: BTreeMap<DeliveryId, Vec<u32>>,
        /// Each accepted item's resolution: true once acked or dead-lettered.
        resolved: BTreeMap<u32, bool>,
        /// Items of an ordered pipeline, in the order they were delivered.
        delivered_order: Vec<u32>,
        /// Each key's items, in the order accepted (one delivery per event).
        keyed: BTreeMap<u64, Vec<u32>>,
        /// Items of batch lines, by item.
        lines: BTreeMap<u32, u64>,
        batching: Batching,
        /// Per key, whether several of its events were ever in flight at once
        /// (different keys: parallelism is allowed and expected).
        keys_at_once: usize,
        /// Dead letters of keyed events, and keys said to be released.
        keyed_dead_letters: usize,
        keys_released: usize,
        /// Each item's unit, and the units without a callee now.
        units: BTreeMap<u32, u64>,
        paused: BTreeSet<u64>,
        /// Each item's attempts that count: a failure while its procedure
        /// had no callee does not.
        attempts: BTreeMap<u32, u32>,
        /// Plain unit 11's policy: its own retry budget (1 or 2 attempts)
        /// and bound on calls in flight; batch line 1's: its own batching.
        bounded: std::sync::Arc<policy::Policy>,
        line_policy: std::sync::Arc<policy::Policy>,
        /// Items accepted with a history (their attempts exceed budgets).
        taken: BTreeSet<u32>,
    }

    impl World {
        fn new(s: Settings) -> World {
            World::with_policies(s, policy(3, None, s.batching), policy(3, None, s.batching))
        }

        fn with_policies(
            s: Settings,
            bounded: std::sync::Arc<policy::Policy>,
            line_policy: std::sync::Arc<policy::Policy>,
        ) -> World {
            World {
                f: Forwarder::new(MemoryQueue::new(), s, 42),
                now: Instant::now(),
                next_item: 0,
                max_in_flight: s.max_in_flight,
                pipeline: matches!(s.dispatch, Dispatch::Pipeline { .. }),
                flying: BTreeMap::new(),
                resolved: BTreeMap::new(),
                delivered_order: Vec::new(),
                keyed: BTreeMap::new(),
                keys_at_once: 0,
                keyed_dead_letters: 0,
                keys_released: 0,
                lines: BTreeMap::new(),
                batching: s.batching,
                units: BTreeMap::new(),
                paused: BTreeSet::new(),
                attempts: BTreeMap::new(),
                bounded,
                line_policy,
                taken: BTreeSet::new(),
            }
        }

        /// A delivery of `items` ended with these outcomes, one per item
        /// (`None`: no outcome, a lost one): which attempts count.
        fn count_attempts(&mut self, items: &[u32], kinds: &[Option<Kind>]) {
            for (item, kind) in items.iter().zip(kinds) {
                let counts = match kind {
                    Some(Kind::Ok) => false,
                    Some(Kind::Final) => true,
                    Some(Kind::Transient) | None => !self.waits(*item),
                };
                if counts {
                    *self.attempts.entry(*item).or_default() += 1;
                }
            }
        }

        /// Whether `item`'s unit waits for a callee (pipelines ignore it).
        fn waits(&self, item: u32) -> bool {
            !self.pipeline
                && self
                    .units
                    .get(&item)
                    .is_some_and(|u| self.paused.contains(u))
        }

        /// The policy an item of `unit` is accepted with.
        fn policy_of(&self, unit: u64) -> Option<std::sync::Arc<policy::Policy>> {
            match unit {
                11 => Some(self.bounded.clone()),
                1 => Some(self.line_policy.clone()),
                _ => None,
            }
        }

        /// The batching of `line`: line 1's policy's, or the settings'.
        fn batching_of(&self, line: u64) -> Batching {
            if line == 1 {
                self.line_policy.batching
            } else {
                self.batching
            }
        }

        /// A plain item's unit: one of the two plain procedures.
        fn plain_unit(&mut self, item: u32) -> u64 {
            let unit = 10 + u64::from(item % 2);
            self.units.insert(item, unit);
            unit
        }

        /// The batch line of an item, if it has one (pipelines ignore lines).
        fn line_of(&self, item: u32) -> Option<u64> {
            if self.pipeline {
                return None;
            }
            self.lines.get(&item).copied()
        }

        /// The key of an item, if it has one (pipelines ignore keys).
        fn key_of(&self, item: u32) -> Option<u64> {
            if self.pipeline {
                return None;
            }
            self.keyed
                .iter()
                .find(|(_, items)| items.contains(&item))
                .map(|(k, _)| *k)
        }

        /// `item` was delivered or dead-lettered: once, and only if accepted.
        fn resolve(&mut self, item: u32) -> Result<(), TestCaseError> {
            let was = self.resolved.insert(item, true);
            prop_assert_eq!(
                was,
                Some(false),
                "item {} resolved twice or never accepted",
                item
            );
            if self.pipeline {
                self.delivered_order.push(item);
            }
            Ok(())
        }

        fn drain(&mut self) -> Result<(), TestCaseError> {
            while let Some(out) = self.f.poll() {
                match out {
                    Output::Deliver(id) => {
                        let items: Vec<u32> = self
                            .f
                            .delivery(id)
                            .unwrap()
                            .iter()
                            .map(|j| j.item)
                            .collect();
                        prop_assert!(!items.is_empty());
                        let line = self.line_of(items[0]);
                        if let Some(line) = line {
                            prop_assert!(
                                items.iter().all(|i| self.line_of(*i) == Some(line)),
                                "a batch holds one line's events only"
                            );
                            let batching = self.batching_of(line);
                            prop_assert!(items.len() <= batching.max_events);
                            let out = self
                                .flying
                                .values()
                                .filter(|v| self.line_of(v[0]) == Some(line))
                                .count();
                            prop_assert!(out < batching.in_flight, "batch calls in flight");
                        } else {
                            prop_assert!(items.iter().all(|i| self.line_of(*i).is_none()));
                        }
                        for (at, item) in items.iter().enumerate() {
                            prop_assert!(
                                !self.resolved[item],
                                "resolved item {item} delivered again"
                            );
                            prop_assert!(
                                !self.waits(*item),
                                "item {item} delivered while its procedure has no callee"
                            );
                            let job = &self.f.delivery(id).unwrap()[at];
                            prop_assert_eq!(
                                job.attempts,
                                self.attempts.get(item).copied().unwrap_or(0) + 1,
                                "item {}'s attempts count failures while its procedure had no callee",
                                item
                            );
                            // Per-key order: every earlier event of the key
                            // is acknowledged or dead-lettered, or ahead of
                            // it in the same batch; and no other delivery
                            // of the key is out.
                            if let Some(key) = self.key_of(*item) {
                                for earlier in self.keyed[&key].iter().take_while(|i| *i != item) {
                                    prop_assert!(
                                        self.resolved[earlier] || items[..at].contains(earlier),
                                        "item {item} of key {key} delivered before {earlier} was resolved"
                                    );
                                }
                                prop_assert!(
                                    self.flying
                                        .values()
                                        .flatten()
                                        .all(|i| self.key_of(*i) != Some(key)),
                                    "key {key} in two deliveries at once"
                                );
                            }
                            prop_assert!(
                                self.flying.values().all(|v| !v.contains(item)),
                                "item {item} twice in flight"
                            );
                        }
                        if !self.pipeline
                            && let Some(bound) = self.bounded.max_in_flight
                        {
                            let unit_11 = |i: &&u32| {
                                self.line_of(**i).is_none() && self.units.get(*i) == Some(&11)
                            };
                            let out = self.flying.values().flatten().filter(unit_11).count()
                                + items.iter().filter(unit_11).count();
                            prop_assert!(
                                out <= bound,
                                "unit 11 has {} calls out, its bound is {}",
                                out,
                                bound
                            );
                            for item in items.iter().filter(unit_11) {
                                let job = self
                                    .f
                                    .delivery(id)
                                    .unwrap()
                                    .iter()
                                    .find(|j| j.item == *item)
                                    .unwrap();
                                prop_assert!(
                                    self.taken.contains(item)
                                        || job.attempts <= self.bounded.retry.max_attempts,
                                    "item {} attempted {} times, its procedure allows {}",
                                    item,
                                    job.attempts,
                                    self.bounded.retry.max_attempts
                                );
                            }
                        }
                        self.flying.insert(id, items);
                        let keys_flying: BTreeSet<u64> = self
                            .flying
                            .values()
                            .flatten()
                            .filter_map(|i| self.key_of(*i))
                            .collect();
                        self.keys_at_once = self.keys_at_once.max(keys_flying.len());
                    }
                    Output::Ack(job) => self.resolve(job.item)?,
                    Output::DeadLetter(job, why) => {
                        prop_assert!(
                            !(why == GiveUp::Exhausted && self.waits(job.item)),
                            "item {} dead-lettered for failures while its procedure had no callee",
                            job.item
                        );
                        if self.key_of(job.item).is_some() {
                            self.keyed_dead_letters += 1;
                        }
                        self.resolve(job.item)?;
                    }
                    Output::Retrying { at, .. } => prop_assert!(at >= self.now),
                    Output::KeyReleased => self.keys_released += 1,
                }
            }
            // Only a dead-lettered head lets its key's next go ahead.
            prop_assert!(self.keys_released <= self.keyed_dead_letters);
            Ok(())
        }

        fn check(&self) -> Result<(), TestCaseError> {
            let c = self.f.counts();
            let (waiting, in_flight) = (self.f.waiting() as u64, self.f.in_flight() as u64);
            prop_assert_eq!(
                c.accepted,
                c.forwarded + c.dead_lettered + c.withdrawn + waiting + in_flight
            );
            let each = self
                .flying
                .values()
                .flatten()
                .filter(|i| self.line_of(**i).is_none())
                .count();
            prop_assert!(each <= self.max_in_flight, "in-flight bound exceeded");
            let flying: usize = self.flying.values().map(Vec::len).sum();
            prop_assert_eq!(flying, self.f.in_flight());
            let unresolved = self.resolved.values().filter(|r| !**r).count() as u64;
            prop_assert_eq!(unresolved, waiting + in_flight);
            Ok(())
        }

        /// Like [`World::land`], with the delivery's items.
        fn land_items(&mut self, n: usize) -> Option<(DeliveryId, Vec<u32>)> {
            let id = *self.flying.keys().nth(n % self.flying.len().max(1))?;
            let items = self.flying.remove(&id)?;
            Some((id, items))
        }

        /// Takes the n-th delivery in flight (modulo), whose outcome comes now.
        fn land(&mut self, n: usize) -> Option<DeliveryId> {
            let id = *self.flying.keys().nth(n % self.flying.len().max(1))?;
            self.flying.remove(&id);
            Some(id)
        }

        fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
            match op {
                Op::Accept => {
                    self.next_item += 1;
                    self.resolved.insert(self.next_item, false);
                    let unit = self.plain_unit(self.next_item);
                    let job = Job::new(self.next_item, self.now)
                        .with_unit(unit)
                        .with_policy(self.policy_of(unit));
                    self.f.accept_job(job, self.now);
                }
                Op::AcceptKeyed(key) => {
                    self.next_item += 1;
                    self.resolved.insert(self.next_item, false);
                    self.keyed.entry(key).or_default().push(self.next_item);
                    // A key's line is its procedure's (key.rs hashes both).
                    let unit = 10 + key % 2;
                    self.units.insert(self.next_item, unit);
                    let job = Job::new(self.next_item, self.now)
                        .with_key(Some(key))
                        .with_unit(unit)
                        .with_policy(self.policy_of(unit));
                    self.f.accept_job(job, self.now);
                }
                Op::AcceptBatched(line, key) => {
                    self.next_item += 1;
                    self.resolved.insert(self.next_item, false);
                    self.lines.insert(self.next_item, line);
                    // Keys of batch lines are their own (the sidecar hashes
                    // the procedure into the key).
                    let key = key.map(|k| 100 + 10 * line + k);
                    if let Some(key) = key {
                        self.keyed.entry(key).or_default().push(self.next_item);
                    }
                    let batched = Batched { line, bytes: 10 };
                    self.units.insert(self.next_item, line);
                    let job = Job::new(self.next_item, self.now)
                        .with_unit(line)
                        .with_key(key)
                        .with_batch(Some(batched))
                        .with_policy(self.policy_of(line));
                    self.f.accept_job(job, self.now);
                }
                Op::AcceptTaken(ago, attempts) => {
                    self.next_item += 1;
                    self.resolved.insert(self.next_item, false);
                    let received = self
                        .now
                        .checked_sub(Duration::from_millis(ago))
                        .unwrap_or(self.now);
                    let unit = self.plain_unit(self.next_item);
                    self.attempts.insert(self.next_item, attempts);
                    self.taken.insert(self.next_item);
                    let job = Job {
                        attempts,
                        ..Job::new(self.next_item, received)
                            .with_unit(unit)
                            .with_policy(self.policy_of(unit))
                    };
                    self.f.accept_job(job, self.now);
                }
                Op::Finish(n, kind) => {
                    if let Some((id, items)) = self.land_items(n) {
                        self.count_attempts(&items, &vec![Some(kind); items.len()]);
                        prop_assert!(self.f.on_outcome(id, kind.outcome(), self.now));
                    }
                }
                Op::FinishEach(n, kinds) => {
                    if let Some((id, items)) = self.land_items(n) {
                        let mut each: Vec<Option<Kind>> =
                            (0..items.len()).map(|i| kinds.get(i).copied()).collect();
                        if self.line_of(items[0]).is_some() {
                            // A batch is resolved whole, by its first failure.
                            let whole = kinds
                                .iter()
                                .find(|k| !matches!(k, Kind::Ok))
                                .copied()
                                .or((kinds.len() >= items.len()).then_some(Kind::Ok));
                            each = vec![whole; items.len()];
                        }
                        self.count_attempts(&items, &each);
                        let outcomes = kinds.iter().map(|k| k.outcome()).collect();
                        prop_assert!(self.f.on_outcomes(id, outcomes, self.now));
                    }
                }
                Op::Advance(ms) => {
                    self.now += Duration::from_millis(ms);
                    self.f.on_tick(self.now);
                }
                Op::Open(open) => self.f.set_open(open, self.now),
                Op::Withdraw(m, r) => {
                    for job in self.f.withdraw(|item| item % m == r) {
                        prop_assert_eq!(job.item % m, r);
                        let was = self.resolved.insert(job.item, true);
                        prop_assert_eq!(was, Some(false), "item {} withdrawn twice", job.item);
                    }
                    self.f.on_tick(self.now);
                }
                Op::Cancel(n) => {
                    if let Some(id) = self.land(n) {
                        let jobs = self.f.cancel(id);
                        prop_assert!(jobs.is_some());
                        for job in jobs.unwrap_or_default() {
                            let was = self.resolved.insert(job.item, true);
                            prop_assert_eq!(was, Some(false), "item {} cancelled twice", job.item);
                        }
                        self.f.on_tick(self.now);
                    }
                }
                Op::Shutdown(ms) => {
                    let deadline = self.now + Duration::from_millis(ms);
                    self.f.shutdown(deadline, self.now);
                }
                Op::Pause(n) => {
                    self.paused.insert(UNITS[n]);
                    self.f.pause(UNITS[n]);
                }
                Op::Resume(n) => {
                    self.paused.remove(&UNITS[n]);
                    self.f.resume(UNITS[n], self.now);
                }
            }
            self.drain()?;
            // A deadline that passed must have stopped everything.
            if self.f.is_stopped() {
                // Outcomes of deliveries resolved by the deadline are late.
                self.flying.clear();
            }
            self.check()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn every_accepted_event_is_resolved_exactly_once_within_the_bounds(
            ops in prop::collection::vec(op(), 0..120),
            capacity in 1..8usize,
            max_in_flight in 1..5usize,
            dispatch in dispatch(),
            drop_oldest in any::<bool>(),
            batching in batching(),
            line_batching in batching(),
            bound in prop::option::of(1..3usize),
            attempts in 1..3u32,
        ) {
            let mut s = settings(capacity, max_in_flight, dispatch);
            s.batching = batching;
            if drop_oldest {
                s.overflow = OverflowPolicy::DropOldest;
            }
            let mut w = World::with_policies(
                s,
                policy(attempts, bound, batching),
                policy(3, None, line_batching),
            );
            for op in ops {
                w.apply(op)?;
            }
            // Drain: shut down and let the deadline pass with the backends
            // silent. Nothing is left waiting or in flight, and every
            // accepted event was resolved exactly once.
            // (An earlier random shutdown may have set a later deadline, at
            // most 20 s ahead.)
            w.apply(Op::Shutdown(5_000))?;
            w.apply(Op::Advance(25_000))?;
            prop_assert!(w.f.is_idle());
            prop_assert!(w.resolved.values().all(|r| *r));
            let c = w.f.counts();
            prop_assert_eq!(c.accepted, c.forwarded + c.dead_lettered + c.withdrawn);
        }

        /// Many keys, answering backends: keys go in parallel (never two of
        /// one key at once, which the order check above would catch).
        #[test]
        fn different_keys_are_delivered_in_parallel(max_in_flight in 2..5usize) {
            let mut w = World::new(settings(100, max_in_flight, Dispatch::Each));
            w.apply(Op::Open(true))?;
            for key in 0..max_in_flight as u64 {
                w.apply(Op::AcceptKeyed(key))?;
                w.apply(Op::AcceptKeyed(key))?;
            }
            prop_assert_eq!(w.f.in_flight(), max_in_flight, "one of each key in flight");
            prop_assert_eq!(w.keys_at_once, max_in_flight);
            while !w.flying.is_empty() {
                w.apply(Op::Finish(0, Kind::Ok))?;
            }
            prop_assert!(w.f.is_idle());
            prop_assert_eq!(w.f.counts().forwarded, 2 * max_in_flight as u64);
        }

        #[test]
        fn with_answering_backends_a_drain_ends_before_its_deadline(
            accepted in 0..50u32,
            max_in_flight in 1..5usize,
            dispatch in dispatch(),
            keyed in any::<bool>(),
        ) {
            let mut w = World::new(settings(100, max_in_flight, dispatch));
            w.apply(Op::Open(true))?;
            for i in 0..accepted {
                w.apply(if keyed { Op::AcceptKeyed(u64::from(i % 3)) } else { Op::Accept })?;
            }
            w.apply(Op::Shutdown(60_000))?;
            while !w.flying.is_empty() {
                w.apply(Op::Finish(0, Kind::Ok))?;
            }
            prop_assert!(w.f.is_idle());
            prop_assert!(!w.f.is_stopped());
            prop_assert_eq!(w.f.counts().forwarded, u64::from(accepted));
            if matches!(dispatch, Dispatch::Pipeline { .. }) {
                let in_order: Vec<u32> = (1..=accepted).collect();
                prop_assert_eq!(&w.delivered_order, &in_order);
            }
        }
    }
}
