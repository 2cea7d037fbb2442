//! The forwarding core: a sans-IO state machine between "an EVENT was
//! accepted" and "a sink delivered it". It alone owns the queue, the
//! in-flight bound, the retry policy and what each outcome means. Inputs are
//! methods ([`Forwarder::accept`], [`Forwarder::on_outcome`],
//! [`Forwarder::on_tick`], [`Forwarder::shutdown`]); the driver pulls what to
//! do with [`Forwarder::poll`] (deliver, dead-letter, acknowledge) and asks
//! [`Forwarder::next_wake`] when to call `on_tick` again. No IO, no clock,
//! no global randomness: time is an argument and jitter comes from a seeded
//! generator.
//!
//! Every accepted event is resolved exactly once, by an `Ack` or a
//! `DeadLetter`, or handed back to the driver ([`Forwarder::withdraw`],
//! [`Forwarder::cancel`]: a shared queue's entry that is no longer certainly
//! this instance's): `accepted == forwarded + dead_lettered + withdrawn +
//! waiting + in_flight` holds after every call.
//!
//! Per-key order (jobs with a [`Job::key`], one delivery per event): the
//! first event of a key taken from the queue becomes the key's head; later
//! events of the key wait in the key's line, in the order accepted, until the
//! head is acknowledged or dead-lettered. A head that fails keeps its place:
//! its retry is the only event of its key that may go. Different keys go in
//! parallel up to the in-flight limit. Pipelines keep the order of
//! everything anyway and ignore keys.
//!
//! Waiting for a callee: while a procedure has no callee (its backends
//! are away, within their grace period) its unit ([`Job::unit`]) is
//! [`Forwarder::pause`]d. Its events are parked instead of delivered: no
//! call is made, an attempt that fails meanwhile is not counted, and no
//! retry budget is spent; [`Forwarder::resume`] sends them on, in order,
//! their budget counted from then. They count as waiting (the capacity
//! bounds them). Pipelines (Redis lists, which need no callee) ignore it.
//!
//! Per-procedure policies: a job may carry its procedure's settings
//! ([`Job::policy`]), which then replace the core's own for its retry
//! budget, its batch line's [`Batching`], and add a bound of its own on the
//! procedure's calls in flight (under the global one): a job whose unit is
//! at that bound is held, in order, until one of the unit's calls ends.
//!
//! Batch calls (jobs with a [`Job::batch`] line) wait in their line's pool
//! instead of the queue and go out many to a delivery under the line's own
//! in-flight bound ([`Batching`]), outside the per-event one; a failed batch
//! is retried or dead-lettered whole (see [`super::batch`]).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::batch::{Batching, Pools};
use super::job::{DeliveryId, Dispatch, Job};
use super::outcome::{Failure, GiveUp, Outcome, RetryAction, classify, final_reason};
use super::queue::Queue;
use super::retry::RetryPolicy;
use crate::wamp::id::IdHashing;

/// What to do with a new event when `capacity` events are already waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverflowPolicy {
    /// Refuse the new event (it is dead-lettered).
    DropNewest,
    /// Make room by giving up the oldest event still waiting for its first
    /// attempt (it is dead-lettered); if every waiting event is a retry, the
    /// new event is refused instead.
    DropOldest,
}

/// The core's limits and policies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Events that may wait (first attempt or retry).
    pub capacity: usize,
    pub overflow: OverflowPolicy,
    /// Events in flight at once.
    pub max_in_flight: usize,
    pub dispatch: Dispatch,
    pub retry: RetryPolicy,
    /// How batch procedures' events are grouped (with [`Dispatch::Each`]).
    pub batching: Batching,
}

/// What the driver must do, in order.
#[derive(Debug, PartialEq)]
pub enum Output<T> {
    /// Start delivering the events of this delivery (see
    /// [`Forwarder::delivery`]) and report with [`Forwarder::on_outcome`].
    Deliver(DeliveryId),
    /// Delivered: count it, acknowledge it where the queue needs that.
    Ack(Job<T>),
    /// Given up: log it, count it, store the record.
    DeadLetter(Job<T>, GiveUp),
    /// An attempt failed and its `events` will be tried again at `at`.
    Retrying { at: Instant, events: usize },
    /// An ordering key's head was dead-lettered while later events of the
    /// key waited: the next one goes ahead without it.
    KeyReleased,
}

/// Running totals, each changed only by the core.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub accepted: u64,
    pub forwarded: u64,
    pub dead_lettered: u64,
    pub retried: u64,
    /// Outcomes reported for deliveries that were already resolved (at the
    /// shutdown deadline): ignored.
    pub late_outcomes: u64,
    /// Handed back to the driver, neither delivered nor given up.
    pub withdrawn: u64,
}

/// One ordering key's events: the head (in flight, or waiting for its retry)
/// and the later ones, in the order accepted.
#[derive(Debug)]
struct Line<T> {
    head: u64,
    waiting: VecDeque<Job<T>>,
}

/// A unit with a bound of its own on its calls in flight.
#[derive(Debug)]
struct Limited<T> {
    out: usize,
    held: VecDeque<Job<T>>,
}

impl<T> Default for Limited<T> {
    fn default() -> Self {
        Limited {
            out: 0,
            held: VecDeque::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// Delivering what was accepted until `deadline`.
    Draining {
        deadline: Instant,
    },
    /// The deadline passed: everything unfinished was dead-lettered.
    Stopped,
}

/// The forwarding core over a queue `Q` of items `T`.
#[derive(Debug)]
pub struct Forwarder<T, Q> {
    queue: Q,
    settings: Settings,
    in_flight: HashMap<DeliveryId, Vec<Job<T>>, IdHashing>,
    in_flight_events: usize,
    /// Events in flight one to a delivery (those the in-flight limit bounds).
    in_flight_each: usize,
    /// Batch procedures' events waiting for a call.
    pools: Pools<T>,
    next_id: u64,
    outputs: VecDeque<Output<T>>,
    /// Per-key order: each key with an event out, by key.
    lines: HashMap<u64, Line<T>, IdHashing>,
    /// Events waiting in the lines (behind their key's head).
    in_lines: usize,
    /// Heads whose predecessor was resolved: they go before the queue.
    released: VecDeque<Job<T>>,
    /// The acceptance order, for [`Job::seq`].
    next_seq: u64,
    /// Whether the sink can take deliveries now (WAMP: joined).
    open: bool,
    /// Units waiting for a callee, each with its parked events (in the
    /// order they were taken up).
    paused: HashMap<u64, VecDeque<Job<T>>, IdHashing>,
    /// Events parked, all units together.
    parked: usize,
    /// Units under a bound of their own on calls in flight
    /// ([`super::policy::Policy::max_in_flight`]): their calls out, and
    /// their events held back meanwhile, in order.
    limited: HashMap<u64, Limited<T>, IdHashing>,
    /// Events held back, all units together.
    held: usize,
    /// When each unit last resumed: its events' retry budget counts from
    /// then at the earliest.
    resumed: HashMap<u64, Instant, IdHashing>,
    state: State,
    counts: Counts,
    rng: u64,
}

impl<T, Q: Queue<T>> Forwarder<T, Q> {
    /// Makes this core's delivery ids start above `base`, so that two cores
    /// driven by one loop never hand out the same id.
    pub fn with_ids_from(mut self, base: u64) -> Self {
        self.next_id = base;
        self
    }

    /// A core over `queue`; `seed` makes the backoff jitter reproducible.
    pub fn new(queue: Q, settings: Settings, seed: u64) -> Forwarder<T, Q> {
        let settings = Settings {
            capacity: settings.capacity.max(1),
            max_in_flight: settings.max_in_flight.max(1),
            dispatch: match settings.dispatch {
                Dispatch::Pipeline { max } => Dispatch::Pipeline { max: max.max(1) },
                each => each,
            },
            batching: Batching {
                max_events: settings.batching.max_events.max(1),
                in_flight: settings.batching.in_flight.max(1),
                ..settings.batching
            },
            ..settings
        };
        Forwarder {
            queue,
            settings,
            in_flight: HashMap::default(),
            in_flight_events: 0,
            in_flight_each: 0,
            pools: Pools::default(),
            next_id: 0,
            outputs: VecDeque::new(),
            lines: HashMap::default(),
            in_lines: 0,
            released: VecDeque::new(),
            next_seq: 0,
            open: false,
            paused: HashMap::default(),
            parked: 0,
            limited: HashMap::default(),
            held: 0,
            resumed: HashMap::default(),
            state: State::Running,
            counts: Counts::default(),
            // xorshift must not start at zero.
            rng: seed | 1,
        }
    }

    // ------------------------------------------------------------ inputs

    /// Takes on a new event. Overflow dead-letters (the new event, or with
    /// [`OverflowPolicy::DropOldest`] the oldest waiting one).
    pub fn accept(&mut self, item: T, now: Instant) {
        self.accept_job(Job::new(item, now), now);
    }

    /// Takes on an event that has a history already: received earlier and
    /// perhaps attempted before (an entry read back from a shared queue,
    /// possibly taken over from another instance). Its retry budget counts
    /// from `job.budget_from` and `job.attempts`.
    pub fn accept_job(&mut self, mut job: Job<T>, now: Instant) {
        self.counts.accepted += 1;
        self.next_seq += 1;
        job.seq = self.next_seq;
        if matches!(self.settings.dispatch, Dispatch::Pipeline { .. }) {
            // A pipeline keeps the order of everything, one event at a time.
            job.key = None;
            job.batch = None;
        }
        if self.state == State::Stopped {
            return self.give_up(job, GiveUp::Shutdown);
        }
        if self.waiting() >= self.settings.capacity {
            let evicted = match self.settings.overflow {
                OverflowPolicy::DropOldest => self
                    .queue
                    .evict_oldest_new()
                    .or_else(|| self.pools.evict_oldest_new())
                    .or_else(|| self.evict_oldest_parked()),
                OverflowPolicy::DropNewest => None,
            };
            match evicted {
                Some(oldest) => {
                    self.give_up(oldest, GiveUp::Overflow);
                    self.enqueue(job, now);
                }
                None => self.give_up(job, GiveUp::Overflow),
            }
        } else {
            self.enqueue(job, now);
        }
        self.dispatch(now);
    }

    fn enqueue(&mut self, job: Job<T>, now: Instant) {
        match job.batch {
            Some(b) => {
                let batching = job
                    .policy
                    .as_deref()
                    .map_or(self.settings.batching, |p| sane_batching(p.batching));
                self.pools.push(b.line, job, now, batching)
            }
            None => self.queue.enqueue(job),
        }
    }

    /// Whether the sink can take deliveries now. Events wait while it cannot.
    pub fn set_open(&mut self, open: bool, now: Instant) {
        self.open = open;
        self.dispatch(now);
    }

    /// Procedure `unit` has no callee: its events wait (parked) instead of
    /// being delivered, and failures of those already out are not counted
    /// against their budget. A no-op for a pipeline.
    pub fn pause(&mut self, unit: u64) {
        if matches!(self.settings.dispatch, Dispatch::Each) {
            self.paused.entry(unit).or_default();
        }
    }

    /// Procedure `unit` has a callee again: its parked events go first, in
    /// order, and its events' retry budget counts from `now`.
    pub fn resume(&mut self, unit: u64, now: Instant) {
        let Some(parked) = self.paused.remove(&unit) else {
            return;
        };
        self.resumed.insert(unit, now);
        self.parked -= parked.len();
        // Ahead of the queue, behind heads already released.
        self.released.extend(parked);
        self.dispatch(now);
    }

    /// Whether procedure `unit` waits for a callee.
    pub fn is_paused(&self, unit: u64) -> bool {
        self.paused.contains_key(&unit)
    }

    /// How a delivery ended: one outcome for all its events. Returns false
    /// for a delivery already resolved (by the shutdown deadline).
    pub fn on_outcome(&mut self, id: DeliveryId, outcome: Outcome, now: Instant) -> bool {
        let Some(jobs) = self.take_delivery(id) else {
            return false;
        };
        if let Some(line) = jobs.first().and_then(|j| j.batch).map(|b| b.line) {
            self.pools.finished(line);
            match outcome {
                Ok(()) => jobs.into_iter().for_each(|job| self.ack(job)),
                Err(failure) => self.batch_failed(line, jobs, &failure, now),
            }
            self.dispatch(now);
            return true;
        }
        match outcome {
            Ok(()) => jobs.into_iter().for_each(|job| self.ack(job)),
            Err(failure) => match self.settings.dispatch {
                Dispatch::Pipeline { .. } if classify(&failure) == RetryAction::Retry => {
                    self.retry_in_order(jobs, &failure.to_string(), now)
                }
                _ => {
                    for job in jobs {
                        self.failed(job, &failure, now);
                    }
                }
            },
        }
        self.dispatch(now);
        true
    }

    /// How a delivery ended, event by event (a pipeline whose commands
    /// succeeded or failed one by one). A missing outcome is retried.
    pub fn on_outcomes(&mut self, id: DeliveryId, outcomes: Vec<Outcome>, now: Instant) -> bool {
        if self
            .delivery(id)
            .is_some_and(|jobs| jobs.iter().any(|j| j.batch.is_some()))
        {
            // A batch is resolved as a whole: by its first failure, if any.
            let missing = outcomes.len() < self.delivery(id).map_or(0, <[_]>::len);
            let first_failure = outcomes.into_iter().find(Result::is_err);
            let outcome = match (first_failure, missing) {
                (Some(failure), _) => failure,
                (None, true) => Err(Failure::Missing),
                (None, false) => Ok(()),
            };
            return self.on_outcome(id, outcome, now);
        }
        let Some(jobs) = self.take_delivery(id) else {
            return false;
        };
        let mut outcomes = outcomes.into_iter();
        for job in jobs {
            match outcomes.next() {
                Some(Ok(())) => self.ack(job),
                Some(Err(failure)) => self.failed(job, &failure, now),
                None => self.failed(job, &Failure::Missing, now),
            }
        }
        self.dispatch(now);
        true
    }

    /// Hands back the waiting events `pred` picks (first attempts, retries
    /// waiting out a backoff, events behind their key's head), neither
    /// delivered nor given up. A key whose head is handed back goes on with
    /// its next event.
    pub fn withdraw(&mut self, mut pred: impl FnMut(&T) -> bool) -> Vec<Job<T>> {
        let mut pick = |job: &Job<T>| pred(&job.item);
        let mut out = Vec::new();
        for line in self.lines.values_mut() {
            self.in_lines -= take_picked(&mut line.waiting, &mut pick, &mut out);
        }
        take_picked(&mut self.released, &mut pick, &mut out);
        for parked in self.paused.values_mut() {
            self.parked -= take_picked(parked, &mut pick, &mut out);
        }
        for limited in self.limited.values_mut() {
            self.held -= take_picked(&mut limited.held, &mut pick, &mut out);
        }
        out.extend(self.queue.take_if(&mut pick));
        out.extend(self.pools.take_if(&mut pick));
        for job in &out {
            if job.batch.is_none() {
                self.next_in_line(job);
            }
        }
        self.counts.withdrawn += out.len() as u64;
        out
    }

    /// Undoes a delivery that must not start after all (its events are no
    /// longer certainly this instance's): its events are handed back,
    /// neither delivered nor given up.
    pub fn cancel(&mut self, id: DeliveryId) -> Option<Vec<Job<T>>> {
        let jobs = self.in_flight.remove(&id)?;
        self.in_flight_events -= jobs.len();
        match jobs.first().and_then(|j| j.batch).map(|b| b.line) {
            Some(line) => {
                self.pools.finished(line);
                for job in &jobs {
                    self.pools.resolved(line, job);
                }
            }
            None => {
                self.in_flight_each -= jobs.len();
                for job in &jobs {
                    self.call_ended(job);
                    self.next_in_line(job);
                }
            }
        }
        self.counts.withdrawn += jobs.len() as u64;
        Some(jobs)
    }

    /// Time passed: start due retries; at the shutdown deadline, dead-letter
    /// everything unfinished.
    pub fn on_tick(&mut self, now: Instant) {
        if let State::Draining { deadline } = self.state
            && now >= deadline
        {
            self.stop();
        }
        self.dispatch(now);
    }

    /// Begins the drain: what is accepted keeps being delivered until
    /// `deadline`; then [`Forwarder::on_tick`] dead-letters the rest. Called
    /// again while draining, the earlier deadline holds.
    pub fn shutdown(&mut self, deadline: Instant, now: Instant) {
        self.state = match self.state {
            State::Running => State::Draining { deadline },
            // A drain that must end sooner (nothing left to deliver through).
            State::Draining { deadline: d } => State::Draining {
                deadline: d.min(deadline),
            },
            State::Stopped => State::Stopped,
        };
        self.on_tick(now);
    }

    // ------------------------------------------------------------ outputs

    /// The next thing to do.
    pub fn poll(&mut self) -> Option<Output<T>> {
        self.outputs.pop_front()
    }

    /// The events of a delivery in flight, in order.
    pub fn delivery(&self, id: DeliveryId) -> Option<&[Job<T>]> {
        self.in_flight.get(&id).map(Vec::as_slice)
    }

    /// When `on_tick` has something to do: a retry due (if it could start)
    /// or the shutdown deadline.
    pub fn next_wake(&self) -> Option<Instant> {
        let due = if self.open && self.in_flight_each < self.settings.max_in_flight {
            self.queue.next_due()
        } else {
            None
        };
        let batch = if self.open {
            let skip = |line: u64| self.paused.contains_key(&line);
            self.pools.next_wake(self.draining(), &skip)
        } else {
            None
        };
        let deadline = match self.state {
            State::Draining { deadline } => Some(deadline),
            _ => None,
        };
        [due, batch, deadline].into_iter().flatten().min()
    }

    fn draining(&self) -> bool {
        matches!(self.state, State::Draining { .. })
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Events waiting for an attempt: in the queue, and in the keys' lines.
    pub fn waiting(&self) -> usize {
        self.queue.waiting()
            + self.in_lines
            + self.released.len()
            + self.pools.waiting()
            + self.parked
            + self.held
    }

    /// Looks at every event waiting (`false`) and in flight (`true`), for
    /// metrics.
    pub fn for_each_job<'a>(&'a self, mut f: impl FnMut(&'a Job<T>, bool)) {
        let mut waiting = |job: &'a Job<T>| f(job, false);
        self.queue.for_each(&mut waiting);
        self.pools.for_each(&mut waiting);
        self.released.iter().for_each(&mut waiting);
        self.paused.values().flatten().for_each(&mut waiting);
        self.limited
            .values()
            .flat_map(|l| &l.held)
            .for_each(&mut waiting);
        self.lines
            .values()
            .flat_map(|l| &l.waiting)
            .for_each(&mut waiting);
        self.in_flight
            .values()
            .flatten()
            .for_each(|job| f(job, true));
    }

    /// Events in flight (not deliveries).
    pub fn in_flight(&self) -> usize {
        self.in_flight_events
    }

    /// Nothing waiting, nothing in flight, nothing left to poll.
    pub fn is_idle(&self) -> bool {
        self.waiting() == 0 && self.in_flight_events == 0 && self.outputs.is_empty()
    }

    /// Whether the shutdown deadline has passed.
    pub fn is_stopped(&self) -> bool {
        self.state == State::Stopped
    }

    // ------------------------------------------------------------ inside

    fn dispatch(&mut self, now: Instant) {
        if !self.open || self.state == State::Stopped {
            return;
        }
        self.dispatch_batches(now);
        let batch_max = match self.settings.dispatch {
            Dispatch::Each => 1,
            // One delivery at a time keeps a pipeline's order.
            Dispatch::Pipeline { .. } if !self.in_flight.is_empty() => return,
            Dispatch::Pipeline { max } => max,
        };
        while self.in_flight_each < self.settings.max_in_flight {
            let room = (self.settings.max_in_flight - self.in_flight_each).min(batch_max);
            let mut jobs = Vec::with_capacity(room);
            while jobs.len() < room {
                let Some((job, released)) = self
                    .released
                    .pop_front()
                    .map(|job| (job, true))
                    .or_else(|| self.queue.take_ready(now).map(|job| (job, false)))
                else {
                    break;
                };
                let Some(job) = self.unless_paused(job, now) else {
                    continue;
                };
                let Some(job) = self.in_order(job) else {
                    continue;
                };
                if let Some(mut job) = self.within_bound(job, released) {
                    job.attempts += 1;
                    jobs.push(job);
                }
            }
            if jobs.is_empty() {
                return;
            }
            self.in_flight_each += jobs.len();
            self.deliver(jobs);
            if matches!(self.settings.dispatch, Dispatch::Pipeline { .. }) {
                return;
            }
        }
    }

    /// Batch calls that may start: due retries and gathered events.
    fn dispatch_batches(&mut self, now: Instant) {
        if self.pools.waiting() == 0 {
            return;
        }
        let hurry = self.draining();
        loop {
            let paused = &self.paused;
            let skip = |line: u64| paused.contains_key(&line);
            let Some(mut jobs) = self.pools.take(now, hurry, &skip) else {
                break;
            };
            for job in &mut jobs {
                job.attempts += 1;
                if let Some(at) = self.resumed.get(&job.unit) {
                    job.budget_from = job.budget_from.max(*at);
                }
            }
            self.deliver(jobs);
        }
    }

    fn deliver(&mut self, jobs: Vec<Job<T>>) {
        self.next_id += 1;
        let id = DeliveryId(self.next_id);
        self.in_flight_events += jobs.len();
        self.in_flight.insert(id, jobs);
        self.outputs.push_back(Output::Deliver(id));
    }

    /// A job taken to be delivered: itself unless its unit waits for a
    /// callee (then it is parked), its retry budget counted from its
    /// unit's resumption at the earliest.
    fn unless_paused(&mut self, mut job: Job<T>, now: Instant) -> Option<Job<T>> {
        if self.paused.is_empty() && self.resumed.is_empty() {
            return Some(job);
        }
        if let Some(parked) = self.paused.get_mut(&job.unit) {
            parked.push_back(job);
            self.parked += 1;
            return None;
        }
        if let Some(at) = self.resumed.get(&job.unit) {
            job.budget_from = job.budget_from.max((*at).min(now));
        }
        Some(job)
    }

    /// A job taken to be delivered: itself unless its procedure is at its
    /// own bound on calls in flight (then it is held, behind the unit's
    /// other held jobs). A job `released` (from a key's line, a pause or
    /// the unit's held ones) goes before the unit's held jobs: it is older.
    fn within_bound(&mut self, job: Job<T>, released: bool) -> Option<Job<T>> {
        let Some(bound) = job.policy.as_ref().and_then(|p| p.max_in_flight) else {
            return Some(job);
        };
        if job.batch.is_some() || matches!(self.settings.dispatch, Dispatch::Pipeline { .. }) {
            return Some(job);
        }
        let unit = self.limited.entry(job.unit).or_default();
        if unit.out < bound && (released || unit.held.is_empty()) {
            unit.out += 1;
            return Some(job);
        }
        unit.held.push_back(job);
        self.held += 1;
        None
    }

    /// A call of `job` (one to a delivery) ended: under its procedure's
    /// own bound, the next held job of the unit goes.
    fn call_ended(&mut self, job: &Job<T>) {
        if job
            .policy
            .as_ref()
            .is_none_or(|p| p.max_in_flight.is_none())
            || matches!(self.settings.dispatch, Dispatch::Pipeline { .. })
        {
            return;
        }
        let Entry::Occupied(mut unit) = self.limited.entry(job.unit) else {
            return;
        };
        unit.get_mut().out = unit.get().out.saturating_sub(1);
        if let Some(next) = unit.get_mut().held.pop_front() {
            self.held -= 1;
            self.released.push_back(next);
        } else if unit.get().out == 0 {
            unit.remove();
        }
    }

    /// A job taken to be delivered: itself if it may go now (no key, the
    /// first of its key, or its key's head back for a retry), else `None`,
    /// having joined its key's line.
    fn in_order(&mut self, job: Job<T>) -> Option<Job<T>> {
        let Some(key) = job.key else {
            return Some(job);
        };
        match self.lines.entry(key) {
            Entry::Vacant(e) => {
                e.insert(Line {
                    head: job.seq,
                    waiting: VecDeque::new(),
                });
                Some(job)
            }
            Entry::Occupied(e) if e.get().head == job.seq => Some(job),
            Entry::Occupied(mut e) => {
                e.get_mut().waiting.push_back(job);
                self.in_lines += 1;
                None
            }
        }
    }

    /// `job` was resolved: if it was its key's head, the next of the key
    /// goes ahead (or the key is free). Whether a next one went ahead.
    fn next_in_line(&mut self, job: &Job<T>) -> bool {
        let Some(key) = job.key else {
            return false;
        };
        let Entry::Occupied(mut line) = self.lines.entry(key) else {
            return false;
        };
        if line.get().head != job.seq {
            return false;
        }
        match line.get_mut().waiting.pop_front() {
            Some(next) => {
                line.get_mut().head = next.seq;
                self.in_lines -= 1;
                self.released.push_back(next);
                true
            }
            None => {
                line.remove();
                false
            }
        }
    }

    fn take_delivery(&mut self, id: DeliveryId) -> Option<Vec<Job<T>>> {
        match self.in_flight.remove(&id) {
            Some(jobs) => {
                self.in_flight_events -= jobs.len();
                if jobs.first().is_some_and(|j| j.batch.is_none()) {
                    self.in_flight_each -= jobs.len();
                    for job in &jobs {
                        self.call_ended(job);
                    }
                }
                Some(jobs)
            }
            None => {
                self.counts.late_outcomes += 1;
                None
            }
        }
    }

    fn ack(&mut self, job: Job<T>) {
        self.queue.ack(&job);
        self.resolved(&job);
        self.counts.forwarded += 1;
        self.outputs.push_back(Output::Ack(job));
    }

    fn give_up(&mut self, job: Job<T>, why: GiveUp) {
        self.queue.dead_letter(&job);
        let released = self.state != State::Stopped && self.resolved(&job);
        self.counts.dead_lettered += 1;
        self.outputs.push_back(Output::DeadLetter(job, why));
        if released {
            self.outputs.push_back(Output::KeyReleased);
        }
    }

    /// One event's attempt failed: retry it within its budget, or give up.
    fn failed(&mut self, mut job: Job<T>, failure: &Failure, now: Instant) {
        job.last_error = Some(failure.to_string());
        if classify(failure) == RetryAction::Final {
            return self.give_up(job, final_reason(failure));
        }
        if let Some(parked) = self.paused.get_mut(&job.unit) {
            // Its callee went away: waiting is not failing.
            job.attempts = job.attempts.saturating_sub(1);
            parked.push_back(job);
            self.parked += 1;
            return;
        }
        let jitter = self.jitter();
        match retry_of(&self.settings, &job).next_attempt(
            job.attempts,
            job.budget_from,
            now,
            jitter,
        ) {
            Some(at) => {
                self.counts.retried += 1;
                self.queue.give_back(job, at);
                self.outputs.push_back(Output::Retrying { at, events: 1 });
            }
            None => self.give_up(job, GiveUp::Exhausted),
        }
    }

    /// `job` was acknowledged or dead-lettered: its key (in its line or its
    /// batch pool) may go on. Whether a later event of its line was waiting
    /// for it (and now goes ahead).
    fn resolved(&mut self, job: &Job<T>) -> bool {
        match job.batch {
            Some(b) => {
                self.pools.resolved(b.line, job);
                false
            }
            None => self.next_in_line(job),
        }
    }

    /// A batch call failed: it is retried whole within the budget of its
    /// oldest and most attempted event, or dead-lettered whole.
    fn batch_failed(&mut self, line: u64, mut jobs: Vec<Job<T>>, failure: &Failure, now: Instant) {
        let error = failure.to_string();
        jobs.iter_mut()
            .for_each(|j| j.last_error = Some(error.clone()));
        let why = match classify(failure) {
            RetryAction::Final => final_reason(failure),
            RetryAction::Retry if self.paused.contains_key(&line) => {
                // Its callee went away: the batch waits whole, uncounted.
                jobs.iter_mut()
                    .for_each(|j| j.attempts = j.attempts.saturating_sub(1));
                self.pools.give_back(line, jobs, now);
                return;
            }
            RetryAction::Retry => match self.together_backoff(&jobs, now).0 {
                Some(at) => {
                    let events = jobs.len();
                    self.counts.retried += events as u64;
                    self.pools.give_back(line, jobs, at);
                    self.outputs.push_back(Output::Retrying { at, events });
                    return;
                }
                None => GiveUp::Exhausted,
            },
        };
        for job in jobs {
            self.give_up(job, why);
        }
    }

    /// When events retried together (a batch, a pipeline) go again: one
    /// backoff drawn from the history of their oldest and most attempted,
    /// `None` past the budget; and the jitter drawn for it.
    fn together_backoff(&mut self, jobs: &[Job<T>], now: Instant) -> (Option<Instant>, f64) {
        let attempts = jobs.iter().map(|j| j.attempts).max().unwrap_or(0);
        let oldest = jobs.iter().map(|j| j.budget_from).min().unwrap_or(now);
        let jitter = self.jitter();
        let at = jobs
            .first()
            .map(|job| retry_of(&self.settings, job))
            .and_then(|retry| retry.next_attempt(attempts, oldest, now, jitter));
        (at, jitter)
    }

    /// A pipeline failed as a whole: back to the head of the line, in order,
    /// paused for one backoff drawn from the batch's history.
    fn retry_in_order(&mut self, jobs: Vec<Job<T>>, error: &str, now: Instant) {
        let (together, jitter) = self.together_backoff(&jobs, now);
        let mut keep = Vec::with_capacity(jobs.len());
        for mut job in jobs {
            job.last_error = Some(error.to_owned());
            let within_budget = retry_of(&self.settings, &job)
                .next_attempt(job.attempts, job.budget_from, now, jitter)
                .is_some();
            if within_budget {
                keep.push(job);
            } else {
                self.give_up(job, GiveUp::Exhausted);
            }
        }
        if keep.is_empty() {
            return;
        }
        let at = together.unwrap_or(now);
        let events = keep.len();
        self.counts.retried += events as u64;
        self.queue.give_back_front(keep, at);
        self.outputs.push_back(Output::Retrying { at, events });
    }

    /// The deadline passed: everything waiting or in flight is given up.
    fn stop(&mut self) {
        self.state = State::Stopped;
        let released: Vec<Job<T>> = self.released.drain(..).collect();
        let mut waiting: Vec<_> = self.lines.drain().flat_map(|(_, l)| l.waiting).collect();
        self.in_lines = 0;
        waiting.sort_by_key(|j| j.seq);
        let pooled = self.pools.drain();
        let parked: Vec<Job<T>> = self.paused.values_mut().flat_map(|p| p.drain(..)).collect();
        self.parked = 0;
        let mut held: Vec<Job<T>> = self.limited.drain().flat_map(|(_, l)| l.held).collect();
        held.sort_by_key(|j| j.seq);
        self.held = 0;
        for job in released
            .into_iter()
            .chain(parked)
            .chain(held)
            .chain(waiting)
            .chain(pooled)
            .chain(self.queue.drain())
        {
            self.give_up(job, GiveUp::Shutdown);
        }
        let mut in_flight: Vec<_> = self.in_flight.drain().collect();
        in_flight.sort_by_key(|(id, _)| *id);
        self.in_flight_events = 0;
        self.in_flight_each = 0;
        for job in in_flight.into_iter().flat_map(|(_, jobs)| jobs) {
            self.give_up(job, GiveUp::Shutdown);
        }
    }

    /// The parked event that never had an attempt and was accepted first
    /// (overflow with [`OverflowPolicy::DropOldest`]).
    fn evict_oldest_parked(&mut self) -> Option<Job<T>> {
        let (unit, at) = self
            .paused
            .iter()
            .flat_map(|(unit, p)| p.iter().enumerate().map(move |(i, j)| (*unit, i, j)))
            .filter(|(_, _, j)| j.attempts == 0)
            .min_by_key(|(_, _, j)| j.seq)
            .map(|(unit, i, _)| (unit, i))?;
        let job = self.paused.get_mut(&unit)?.remove(at)?;
        self.parked -= 1;
        Some(job)
    }

    /// A jitter draw in `[0, 1)` (xorshift64*).
    fn jitter(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Moves the jobs of `jobs` that `pick` picks to `out`, the others keeping
/// their order; how many moved.
fn take_picked<T>(
    jobs: &mut VecDeque<Job<T>>,
    pick: &mut impl FnMut(&Job<T>) -> bool,
    out: &mut Vec<Job<T>>,
) -> usize {
    let before = out.len();
    let mut kept = VecDeque::with_capacity(jobs.len());
    for job in jobs.drain(..) {
        if pick(&job) {
            out.push(job);
        } else {
            kept.push_back(job);
        }
    }
    *jobs = kept;
    out.len() - before
}

/// The retry budget of `job`: its procedure's, or the core's.
fn retry_of<'a, T>(settings: &'a Settings, job: &'a Job<T>) -> &'a RetryPolicy {
    job.policy
        .as_deref()
        .map_or(&settings.retry, |policy| &policy.retry)
}

/// `batching` with the floors the core keeps.
fn sane_batching(batching: Batching) -> Batching {
    Batching {
        max_events: batching.max_events.max(1),
        in_flight: batching.in_flight.max(1),
        ..batching
    }
}
