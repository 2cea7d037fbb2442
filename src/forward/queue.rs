//! Where accepted events wait between "accepted" and "delivered": the
//! [`Queue`] seam behind the forwarding core, and [`MemoryQueue`], the
//! in-process implementation. The core decides (capacity, overflow, in-flight
//! bound, retries, dead letters); a queue only keeps events and hands them
//! out in order. Pure: time is an argument.
//!
//! The Redis queue is not behind this seam: it is a stage of its own
//! (`streams::core`), whose entries the same core then delivers from a
//! memory queue. The seam stays for what a core needs of any queue, and
//! keeps the core's tests free of the memory queue's details.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use super::job::Job;

/// Where accepted events wait. Every event the core enqueues comes back out
/// of exactly one of `take_ready`, `evict_oldest_new` or `drain`, and is then
/// either given back, acknowledged or dead-lettered.
pub trait Queue<T> {
    /// Events waiting for an attempt (first or retry), not those in flight.
    fn waiting(&self) -> usize;
    /// Adds a newly accepted event behind everything waiting.
    fn enqueue(&mut self, job: Job<T>);
    /// Removes the oldest event still waiting for its first attempt, to make
    /// room for a new one.
    fn evict_oldest_new(&mut self) -> Option<Job<T>>;
    /// The next event due for an attempt at `now`: due retries first (they
    /// are older than anything new), then new events in arrival order.
    fn take_ready(&mut self, now: Instant) -> Option<Job<T>>;
    /// Takes a failed event back, to be retried from `at`.
    fn give_back(&mut self, job: Job<T>, at: Instant);
    /// Takes failed events back at the head of the line, in order; nothing
    /// at all is handed out before `at`, so that order is kept.
    fn give_back_front(&mut self, jobs: Vec<Job<T>>, at: Instant);
    /// The event was delivered; forget it for good.
    fn ack(&mut self, job: &Job<T>);
    /// The event was given up and is being dead-lettered; forget it for good.
    fn dead_letter(&mut self, job: &Job<T>);
    /// When the next event waiting on time becomes due, if any.
    fn next_due(&self) -> Option<Instant>;
    /// Takes out everything waiting, oldest first where it matters.
    fn drain(&mut self) -> Vec<Job<T>>;
    /// Takes out the waiting events `pred` picks, in order.
    fn take_if(&mut self, pred: &mut dyn FnMut(&Job<T>) -> bool) -> Vec<Job<T>>;
    /// Looks at everything waiting (for metrics).
    fn for_each<'a>(&'a self, f: &mut dyn FnMut(&'a Job<T>));
}

/// The in-process queue: a FIFO of ready events and a timeline of events
/// waiting out a backoff. Lost with the process.
#[derive(Debug)]
pub struct MemoryQueue<T> {
    /// Waiting for their first attempt, or due retries, in start order.
    ready: VecDeque<Job<T>>,
    /// Waiting out a backoff, keyed by due time (and a sequence number so
    /// that equal times don't collide).
    backing_off: BTreeMap<(Instant, u64), Job<T>>,
    seq: u64,
    /// Nothing is handed out before this (head-of-line pause after a failed
    /// ordered batch).
    paused_until: Option<Instant>,
}

impl<T> Default for MemoryQueue<T> {
    fn default() -> Self {
        MemoryQueue {
            ready: VecDeque::new(),
            backing_off: BTreeMap::new(),
            seq: 0,
            paused_until: None,
        }
    }
}

impl<T> MemoryQueue<T> {
    pub fn new() -> MemoryQueue<T> {
        MemoryQueue::default()
    }

    fn promote_due(&mut self, now: Instant) {
        while let Some(entry) = self.backing_off.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let job = entry.remove();
            self.ready.push_front(job);
        }
    }
}

impl<T> Queue<T> for MemoryQueue<T> {
    fn waiting(&self) -> usize {
        self.ready.len() + self.backing_off.len()
    }

    fn enqueue(&mut self, job: Job<T>) {
        self.ready.push_back(job);
    }

    fn evict_oldest_new(&mut self) -> Option<Job<T>> {
        let at = self.ready.iter().position(|j| j.attempts == 0)?;
        self.ready.remove(at)
    }

    fn take_ready(&mut self, now: Instant) -> Option<Job<T>> {
        if let Some(until) = self.paused_until {
            if now < until {
                return None;
            }
            self.paused_until = None;
        }
        self.promote_due(now);
        self.ready.pop_front()
    }

    fn give_back(&mut self, job: Job<T>, at: Instant) {
        self.seq += 1;
        self.backing_off.insert((at, self.seq), job);
    }

    fn give_back_front(&mut self, jobs: Vec<Job<T>>, at: Instant) {
        for job in jobs.into_iter().rev() {
            self.ready.push_front(job);
        }
        self.paused_until = Some(self.paused_until.map_or(at, |p| p.max(at)));
    }

    // In memory, an event in flight is already out of the queue: nothing to do.
    fn ack(&mut self, _job: &Job<T>) {}

    fn dead_letter(&mut self, _job: &Job<T>) {}

    fn next_due(&self) -> Option<Instant> {
        let retry = self.backing_off.keys().next().map(|(at, _)| *at);
        match (retry, self.paused_until) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (Some(a), None) => Some(a),
            (None, Some(b)) if !self.ready.is_empty() => Some(b),
            (None, _) => None,
        }
    }

    fn for_each<'a>(&'a self, f: &mut dyn FnMut(&'a Job<T>)) {
        self.ready.iter().for_each(&mut *f);
        self.backing_off.values().for_each(f);
    }

    fn take_if(&mut self, pred: &mut dyn FnMut(&Job<T>) -> bool) -> Vec<Job<T>> {
        let mut out = Vec::new();
        let mut kept = VecDeque::with_capacity(self.ready.len());
        for job in self.ready.drain(..) {
            if pred(&job) {
                out.push(job);
            } else {
                kept.push_back(job);
            }
        }
        self.ready = kept;
        let picked: Vec<(Instant, u64)> = self
            .backing_off
            .iter()
            .filter(|(_, job)| pred(job))
            .map(|(k, _)| *k)
            .collect();
        out.extend(picked.iter().filter_map(|k| self.backing_off.remove(k)));
        out
    }

    fn drain(&mut self) -> Vec<Job<T>> {
        self.paused_until = None;
        let mut all: Vec<Job<T>> = self.ready.drain(..).collect();
        all.extend(std::mem::take(&mut self.backing_off).into_values());
        all
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn due_retries_go_before_new_events_and_early_ones_wait() {
        let t0 = Instant::now();
        let mut q = MemoryQueue::new();
        q.enqueue(Job::new(1, t0));
        let mut one = q.take_ready(t0).unwrap();
        one.attempts = 1;
        q.give_back(one, t0 + S);
        q.enqueue(Job::new(2, t0));
        assert_eq!(q.next_due(), Some(t0 + S));
        assert_eq!(q.take_ready(t0).map(|j| j.item), Some(2));
        assert_eq!(q.take_ready(t0), None, "the retry is not due yet");
        q.enqueue(Job::new(3, t0));
        assert_eq!(q.take_ready(t0 + S).map(|j| j.item), Some(1));
        assert_eq!(q.take_ready(t0 + S).map(|j| j.item), Some(3));
    }

    #[test]
    fn eviction_takes_the_oldest_event_that_never_had_an_attempt() {
        let t0 = Instant::now();
        let mut q = MemoryQueue::new();
        let mut retried = Job::new(0, t0);
        retried.attempts = 1;
        q.give_back_front(vec![retried], t0);
        q.enqueue(Job::new(1, t0));
        q.enqueue(Job::new(2, t0));
        assert_eq!(q.evict_oldest_new().map(|j| j.item), Some(1));
        assert_eq!(q.evict_oldest_new().map(|j| j.item), Some(2));
        assert_eq!(q.evict_oldest_new(), None, "retries are never evicted");
        assert_eq!(q.waiting(), 1);
    }

    #[test]
    fn given_back_front_jobs_keep_their_order_and_pause_the_line() {
        let t0 = Instant::now();
        let mut q = MemoryQueue::new();
        for i in 1..=4 {
            q.enqueue(Job::new(i, t0));
        }
        let batch: Vec<_> = (0..3).map(|_| q.take_ready(t0).unwrap()).collect();
        q.give_back_front(batch, t0 + S);
        assert_eq!(q.take_ready(t0), None, "paused");
        assert_eq!(q.next_due(), Some(t0 + S));
        let order: Vec<_> = std::iter::from_fn(|| q.take_ready(t0 + S))
            .map(|j| j.item)
            .collect();
        assert_eq!(order, [1, 2, 3, 4]);
    }

    #[test]
    fn drain_returns_ready_and_backing_off_events() {
        let t0 = Instant::now();
        let mut q = MemoryQueue::new();
        q.enqueue(Job::new(1, t0));
        q.give_back(Job::new(2, t0), t0 + S);
        let mut drained: Vec<u32> = q.drain().into_iter().map(|j| j.item).collect();
        drained.sort();
        assert_eq!(drained, [1, 2]);
        assert_eq!(q.waiting(), 0);
        assert_eq!(q.next_due(), None);
    }
}
