//! The bounded delivery queue between "event accepted" and "event delivered":
//! events waiting for their first attempt, events waiting out a retry
//! backoff, and how many are in flight. It decides what starts next, what is
//! retried when, and what is given up (overflow, spent budget) so that the
//! caller can dead-letter it. Pure: time and jitter are arguments.
//!
//! Memory is bounded: at most `capacity` events wait (first attempt or
//! retry) and at most `max_in_flight` are being delivered.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use super::retry::{RetryAction, RetryPolicy};

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

/// An event on its way to a backend, with its delivery history.
#[derive(Debug, Clone, PartialEq)]
pub struct Job<T> {
    pub item: T,
    /// When subtocall received the event; the retry budget counts from here.
    pub received: Instant,
    /// Attempts made so far.
    pub attempts: u32,
    /// The last failure, for the dead-letter record.
    pub last_error: Option<String>,
}

impl<T> Job<T> {
    pub fn new(item: T, received: Instant) -> Job<T> {
        Job {
            item,
            received,
            attempts: 0,
            last_error: None,
        }
    }
}

/// How a delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered,
    Failed { action: RetryAction, error: String },
}

/// Why an event is given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// The queue was full.
    Overflow,
    /// The backend rejected it (a final error).
    Rejected,
    /// Retryable failures until the attempt or age budget ran out.
    Exhausted,
    /// Shutdown deadline reached before it could be delivered.
    Shutdown,
}

impl GiveUp {
    /// Metric label and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUp::Overflow => "overflow",
            GiveUp::Rejected => "rejected",
            GiveUp::Exhausted => "exhausted",
            GiveUp::Shutdown => "shutdown",
        }
    }
}

/// The result of [`DeliveryQueue::finish`].
#[derive(Debug, PartialEq)]
pub enum Finished<T> {
    Delivered(Job<T>),
    /// Scheduled for another attempt at the given time.
    Retrying {
        at: Instant,
    },
    GivenUp(Job<T>, GiveUp),
}

#[derive(Debug)]
pub struct DeliveryQueue<T> {
    /// Waiting for their first attempt, or due retries, in start order.
    ready: VecDeque<Job<T>>,
    /// Waiting out a backoff, keyed by due time (and a sequence number so
    /// that equal times don't collide).
    backing_off: BTreeMap<(Instant, u64), Job<T>>,
    seq: u64,
    in_flight: usize,
    /// Nothing starts before this (head-of-line pause after a batch failed).
    paused_until: Option<Instant>,
    capacity: usize,
    max_in_flight: usize,
    overflow: OverflowPolicy,
    retry: RetryPolicy,
}

impl<T> DeliveryQueue<T> {
    pub fn new(
        capacity: usize,
        max_in_flight: usize,
        overflow: OverflowPolicy,
        retry: RetryPolicy,
    ) -> DeliveryQueue<T> {
        DeliveryQueue {
            ready: VecDeque::new(),
            backing_off: BTreeMap::new(),
            seq: 0,
            in_flight: 0,
            paused_until: None,
            capacity: capacity.max(1),
            max_in_flight: max_in_flight.max(1),
            overflow,
            retry,
        }
    }

    /// Events waiting (first attempt or retry), not counting those in flight.
    pub fn waiting(&self) -> usize {
        self.ready.len() + self.backing_off.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Nothing waiting and nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.waiting() == 0 && self.in_flight == 0
    }

    /// Accepts a new event. Returns the event given up to make room, if the
    /// queue was full: the new one or, with [`OverflowPolicy::DropOldest`],
    /// the oldest waiting one.
    pub fn offer(&mut self, job: Job<T>) -> Option<Job<T>> {
        if self.waiting() < self.capacity {
            self.ready.push_back(job);
            return None;
        }
        match self.overflow {
            OverflowPolicy::DropOldest => match self.ready.iter().position(|j| j.attempts == 0) {
                Some(at) => {
                    let oldest = self.ready.remove(at);
                    self.ready.push_back(job);
                    oldest
                }
                None => Some(job),
            },
            OverflowPolicy::DropNewest => Some(job),
        }
    }

    /// The next event to attempt, if one is due and a slot is free. The
    /// caller must [`DeliveryQueue::finish`] it (or requeue it).
    pub fn start(&mut self, now: Instant) -> Option<Job<T>> {
        if self.in_flight >= self.max_in_flight {
            return None;
        }
        if let Some(until) = self.paused_until {
            if now < until {
                return None;
            }
            self.paused_until = None;
        }
        self.promote_due(now);
        let mut job = self.ready.pop_front()?;
        job.attempts += 1;
        self.in_flight += 1;
        Some(job)
    }

    /// Up to `max` events to deliver together, in order (Redis pipelining).
    pub fn start_batch(&mut self, now: Instant, max: usize) -> Vec<Job<T>> {
        let mut batch = Vec::new();
        while batch.len() < max {
            match self.start(now) {
                Some(job) => batch.push(job),
                None => break,
            }
        }
        batch
    }

    /// Records how an attempt ended: delivered, retried later, or given up.
    pub fn finish(
        &mut self,
        mut job: Job<T>,
        attempt: Attempt,
        now: Instant,
        jitter: f64,
    ) -> Finished<T> {
        self.in_flight = self.in_flight.saturating_sub(1);
        let Attempt::Failed { action, error } = attempt else {
            return Finished::Delivered(job);
        };
        job.last_error = Some(error);
        if action == RetryAction::Final {
            return Finished::GivenUp(job, GiveUp::Rejected);
        }
        match self
            .retry
            .next_attempt(job.attempts, job.received, now, jitter)
        {
            Some(at) => {
                self.seq += 1;
                self.backing_off.insert((at, self.seq), job);
                Finished::Retrying { at }
            }
            None => Finished::GivenUp(job, GiveUp::Exhausted),
        }
    }

    /// Puts a failed batch back at the head of the queue, in order, and
    /// pauses all starts until the batch's retry is due, so that order is
    /// kept (Redis lists). Returns the events whose budget is spent.
    pub fn requeue_front(
        &mut self,
        batch: Vec<Job<T>>,
        error: &str,
        now: Instant,
        jitter: f64,
    ) -> Vec<Job<T>> {
        self.in_flight = self.in_flight.saturating_sub(batch.len());
        let attempts = batch.iter().map(|j| j.attempts).max().unwrap_or(0);
        let oldest = batch.iter().map(|j| j.received).min().unwrap_or(now);
        let mut given_up = Vec::new();
        let mut keep = Vec::new();
        for mut job in batch {
            job.last_error = Some(error.to_owned());
            if self
                .retry
                .next_attempt(job.attempts, job.received, now, jitter)
                .is_some()
            {
                keep.push(job);
            } else {
                given_up.push(job);
            }
        }
        for job in keep.into_iter().rev() {
            self.ready.push_front(job);
        }
        // One pause for the whole head of line, from the batch's history.
        let until = self
            .retry
            .next_attempt(attempts, oldest, now, jitter)
            .unwrap_or(now);
        self.paused_until = Some(until);
        given_up
    }

    /// When something waiting becomes startable: the earliest retry or the
    /// end of a pause. `None` if nothing is waiting on time.
    pub fn next_deadline(&self) -> Option<Instant> {
        let retry = self.backing_off.keys().next().map(|(at, _)| *at);
        match (retry, self.paused_until) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (Some(a), None) => Some(a),
            (None, Some(b)) if !self.ready.is_empty() => Some(b),
            (None, _) => None,
        }
    }

    /// Takes out everything waiting (for the shutdown deadline), in order.
    pub fn drain_waiting(&mut self) -> Vec<Job<T>> {
        let mut all: Vec<Job<T>> = self.ready.drain(..).collect();
        all.extend(std::mem::take(&mut self.backing_off).into_values());
        all
    }

    fn promote_due(&mut self, now: Instant) {
        while let Some(entry) = self.backing_off.first_entry() {
            if entry.key().0 > now {
                break;
            }
            // Due retries go first: they are older than anything still ready.
            let job = entry.remove();
            self.ready.push_front(job);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::forward::retry::Backoff;

    const S: Duration = Duration::from_secs(1);

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            max_age: 100 * S,
            backoff: Backoff {
                initial: S,
                max: 4 * S,
            },
        }
    }

    fn queue(capacity: usize, in_flight: usize, overflow: OverflowPolicy) -> DeliveryQueue<u32> {
        DeliveryQueue::new(capacity, in_flight, overflow, policy(3))
    }

    fn retryable() -> Attempt {
        Attempt::Failed {
            action: RetryAction::Retry,
            error: "wamp.error.no_such_procedure".into(),
        }
    }

    #[test]
    fn events_start_in_order_up_to_the_in_flight_limit() {
        let t0 = Instant::now();
        let mut q = queue(10, 2, OverflowPolicy::DropNewest);
        for i in 0..3 {
            assert_eq!(q.offer(Job::new(i, t0)), None);
        }
        assert_eq!(q.start(t0).map(|j| j.item), Some(0));
        let second = q.start(t0).unwrap();
        assert_eq!(second.attempts, 1);
        assert_eq!(q.start(t0), None, "two in flight");
        assert_eq!(
            q.finish(second, Attempt::Delivered, t0, 0.0),
            Finished::Delivered(Job {
                item: 1,
                received: t0,
                attempts: 1,
                last_error: None
            })
        );
        assert_eq!(q.start(t0).map(|j| j.item), Some(2));
    }

    #[test]
    fn full_queue_refuses_the_newest_by_default() {
        let t0 = Instant::now();
        let mut q = queue(2, 1, OverflowPolicy::DropNewest);
        q.offer(Job::new(1, t0));
        q.offer(Job::new(2, t0));
        assert_eq!(q.offer(Job::new(3, t0)).map(|j| j.item), Some(3));
        assert_eq!(q.waiting(), 2);
    }

    #[test]
    fn drop_oldest_gives_up_the_oldest_first_attempt() {
        let t0 = Instant::now();
        let mut q = queue(2, 1, OverflowPolicy::DropOldest);
        q.offer(Job::new(1, t0));
        q.offer(Job::new(2, t0));
        assert_eq!(q.offer(Job::new(3, t0)).map(|j| j.item), Some(1));
        assert_eq!(q.start(t0).map(|j| j.item), Some(2));
    }

    #[test]
    fn retryable_failure_is_retried_after_its_backoff_before_newer_events() {
        let t0 = Instant::now();
        let mut q = queue(10, 1, OverflowPolicy::DropNewest);
        q.offer(Job::new(1, t0));
        let job = q.start(t0).unwrap();
        q.offer(Job::new(2, t0));
        let Finished::Retrying { at } = q.finish(job, retryable(), t0, 1.0) else {
            panic!()
        };
        assert_eq!(at, t0 + S, "first retry waits up to the initial backoff");
        assert_eq!(q.next_deadline(), Some(t0 + S));
        assert_eq!(
            q.start(t0).map(|j| j.item),
            Some(2),
            "newer event meanwhile"
        );
        let two = q.finish(
            Job {
                item: 2,
                received: t0,
                attempts: 1,
                last_error: None,
            },
            Attempt::Delivered,
            t0,
            0.0,
        );
        assert!(matches!(two, Finished::Delivered(_)));
        q.offer(Job::new(3, t0));
        let retry = q.start(t0 + S).unwrap();
        assert_eq!(
            (retry.item, retry.attempts),
            (1, 2),
            "the due retry goes first"
        );
        assert_eq!(
            retry.last_error.as_deref(),
            Some("wamp.error.no_such_procedure")
        );
    }

    #[test]
    fn final_failure_is_given_up_at_once() {
        let t0 = Instant::now();
        let mut q = queue(10, 1, OverflowPolicy::DropNewest);
        q.offer(Job::new(1, t0));
        let job = q.start(t0).unwrap();
        let failed = Attempt::Failed {
            action: RetryAction::Final,
            error: "com.example.error.rejected".into(),
        };
        let Finished::GivenUp(job, why) = q.finish(job, failed, t0, 0.5) else {
            panic!()
        };
        assert_eq!(why, GiveUp::Rejected);
        assert_eq!(
            job.last_error.as_deref(),
            Some("com.example.error.rejected")
        );
        assert!(q.is_idle());
    }

    #[test]
    fn spent_budget_gives_up_with_the_last_error() {
        let t0 = Instant::now();
        let mut q = queue(10, 1, OverflowPolicy::DropNewest);
        q.offer(Job::new(1, t0));
        let mut now = t0;
        for attempt in 1..=3 {
            let job = q.start(now).expect("due");
            assert_eq!(job.attempts, attempt);
            match q.finish(job, retryable(), now, 1.0) {
                Finished::Retrying { at } => now = at,
                Finished::GivenUp(job, why) => {
                    assert_eq!(attempt, 3);
                    assert_eq!(why, GiveUp::Exhausted);
                    assert_eq!(job.attempts, 3);
                    return;
                }
                other => panic!("{other:?}"),
            }
        }
        panic!("never gave up");
    }

    #[test]
    fn retries_waiting_count_against_capacity() {
        let t0 = Instant::now();
        let mut q = queue(2, 4, OverflowPolicy::DropNewest);
        q.offer(Job::new(1, t0));
        q.offer(Job::new(2, t0));
        let a = q.start(t0).unwrap();
        let b = q.start(t0).unwrap();
        q.finish(a, retryable(), t0, 1.0);
        q.finish(b, retryable(), t0, 1.0);
        assert_eq!(q.waiting(), 2);
        assert_eq!(q.offer(Job::new(3, t0)).map(|j| j.item), Some(3));
        // DropOldest cannot make room from retries: refuses the new one too.
        let mut q2: DeliveryQueue<u32> =
            DeliveryQueue::new(1, 4, OverflowPolicy::DropOldest, policy(3));
        q2.offer(Job::new(1, t0));
        let a = q2.start(t0).unwrap();
        q2.finish(a, retryable(), t0, 1.0);
        assert_eq!(q2.offer(Job::new(2, t0)).map(|j| j.item), Some(2));
    }

    #[test]
    fn failed_batch_goes_back_to_the_head_in_order_and_pauses_the_queue() {
        let t0 = Instant::now();
        let mut q = queue(10, 10, OverflowPolicy::DropNewest);
        for i in 1..=4 {
            q.offer(Job::new(i, t0));
        }
        let batch = q.start_batch(t0, 3);
        assert_eq!(batch.iter().map(|j| j.item).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(q.requeue_front(batch, "redis down", t0, 1.0).is_empty());
        assert_eq!(q.in_flight(), 0);
        assert!(q.start(t0).is_none(), "paused");
        assert_eq!(q.next_deadline(), Some(t0 + S));
        let again = q.start_batch(t0 + S, 10);
        assert_eq!(
            again.iter().map(|j| j.item).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(again[0].attempts, 2);
        assert_eq!(again[3].attempts, 1);
    }

    #[test]
    fn requeued_batch_members_out_of_budget_are_given_up() {
        let t0 = Instant::now();
        let mut q: DeliveryQueue<u32> =
            DeliveryQueue::new(10, 10, OverflowPolicy::DropNewest, policy(1));
        q.offer(Job::new(1, t0));
        let batch = q.start_batch(t0, 5);
        let given_up = q.requeue_front(batch, "redis down", t0, 0.0);
        assert_eq!(given_up.len(), 1);
        assert_eq!(given_up[0].last_error.as_deref(), Some("redis down"));
        assert!(q.is_idle());
    }

    #[test]
    fn drain_waiting_returns_ready_and_backing_off_events() {
        let t0 = Instant::now();
        let mut q = queue(10, 1, OverflowPolicy::DropNewest);
        q.offer(Job::new(1, t0));
        q.offer(Job::new(2, t0));
        let job = q.start(t0).unwrap();
        q.finish(job, retryable(), t0, 1.0);
        let mut drained: Vec<u32> = q.drain_waiting().into_iter().map(|j| j.item).collect();
        drained.sort();
        assert_eq!(drained, [1, 2]);
        assert!(q.is_idle());
    }
}
