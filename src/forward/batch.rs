//! Batch calls: the events of a batch procedure (jobs with a
//! [`Job::batch`] line, one line per procedure) wait in their line's pool
//! and go out many to a delivery, in the order accepted. A line has at most
//! [`Batching::in_flight`] deliveries out at once; while they run, events
//! gather, and the next delivery takes what is waiting (natural batching),
//! up to [`Batching::max_events`] and [`Batching::max_bytes`]. With a
//! [`Batching::linger`], a delivery that is not full waits that long for
//! more events first.
//!
//! A batch is one unit: acknowledged, retried (whole, the same events
//! together) or dead-lettered as one. With ordering keys, the events of a
//! key that has events in a batch out (or waiting for its retry) stay in the
//! pool: a key's events keep their order inside a batch, and its next batch
//! waits for the previous one. Pure: time is an argument.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::job::Job;

/// How batch procedures' events are grouped into calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Events in one call, at most.
    pub max_events: usize,
    /// Their sizes ([`Batched::bytes`]) in one call, at most (an event
    /// larger than this goes alone).
    pub max_bytes: usize,
    /// Calls of one procedure in flight at once.
    pub in_flight: usize,
    /// How long a call that is not full waits for more events.
    pub linger: Duration,
}

impl Default for Batching {
    fn default() -> Batching {
        Batching {
            max_events: 100,
            max_bytes: 1 << 20,
            in_flight: 2,
            linger: Duration::ZERO,
        }
    }
}

/// Every batch line's pool.
#[derive(Debug)]
pub(super) struct Pools<T> {
    lines: HashMap<u64, Pool<T>>,
    /// Events waiting in all pools (fresh or for a retry).
    waiting: usize,
}

#[derive(Debug)]
struct Pool<T> {
    /// Waiting for their first attempt, in the order accepted.
    fresh: VecDeque<Job<T>>,
    /// The sizes of `fresh`.
    bytes: usize,
    /// When the oldest of `fresh` arrived in the pool (the linger's start).
    since: Option<Instant>,
    /// Failed batches waiting out their backoff, whole.
    retries: Vec<(Instant, Vec<Job<T>>)>,
    /// Deliveries out.
    in_flight: usize,
    /// Ordering keys with events out or waiting for a retry, and how many.
    busy: HashMap<u64, u32>,
    /// Every fresh event's key was busy at the last try: nothing goes until
    /// a key is freed or an event arrives.
    blocked: bool,
    /// How its calls are formed: the procedure's (its policy's, as of its
    /// latest event) or the global settings.
    s: Batching,
}

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Pool {
            fresh: VecDeque::new(),
            bytes: 0,
            since: None,
            retries: Vec::new(),
            in_flight: 0,
            busy: HashMap::new(),
            blocked: false,
            s: Batching::default(),
        }
    }
}

impl<T> Pool<T> {
    fn is_idle(&self) -> bool {
        self.fresh.is_empty()
            && self.retries.is_empty()
            && self.in_flight == 0
            && self.busy.is_empty()
    }

    /// When its fresh events may go without being a full call.
    fn due(&self, s: &Batching, hurry: bool) -> Option<Instant> {
        if self.blocked {
            return None;
        }
        let since = self.since?;
        let full = self.fresh.len() >= s.max_events || self.bytes >= s.max_bytes;
        Some(if full || hurry {
            since
        } else {
            since + s.linger
        })
    }

    /// The next call of fresh events: in order, skipping keys that are busy,
    /// up to the limits (at least one event).
    fn form(&mut self, s: &Batching, now: Instant) -> Vec<Job<T>> {
        let mut jobs: Vec<Job<T>> = Vec::new();
        let mut bytes = 0usize;
        let mut kept = VecDeque::new();
        while let Some(job) = self.fresh.pop_front() {
            let size = size_of(&job);
            let full =
                jobs.len() >= s.max_events || (!jobs.is_empty() && bytes + size > s.max_bytes);
            if full {
                self.fresh.push_front(job);
                break;
            }
            if job.key.is_some_and(|k| self.busy.contains_key(&k)) {
                kept.push_back(job);
                continue;
            }
            bytes += size;
            self.bytes -= size;
            jobs.push(job);
        }
        // What was skipped goes back in front, in its order.
        while let Some(job) = kept.pop_back() {
            self.fresh.push_front(job);
        }
        for job in &mut jobs {
            job.batched_out = true;
            if let Some(key) = job.key {
                *self.busy.entry(key).or_default() += 1;
            }
        }
        // What stays waits afresh (its linger starts now), unless nothing
        // could go.
        self.blocked = jobs.is_empty();
        if !self.blocked {
            self.since = (!self.fresh.is_empty()).then_some(now);
        }
        jobs
    }
}

fn size_of<T>(job: &Job<T>) -> usize {
    job.batch.map_or(0, |b| b.bytes as usize)
}

impl<T> Default for Pools<T> {
    fn default() -> Self {
        Pools {
            lines: HashMap::new(),
            waiting: 0,
        }
    }
}

impl<T> Pools<T> {
    /// Events waiting in the pools.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Adds a newly accepted event to its line's pool, whose calls are
    /// formed by `s` from then on.
    pub fn push(&mut self, line: u64, job: Job<T>, now: Instant, s: Batching) {
        let pool = self.lines.entry(line).or_default();
        pool.s = s;
        pool.bytes += size_of(&job);
        // A blocked pool stays blocked by an event whose key is busy too.
        if job.key.is_none_or(|k| !pool.busy.contains_key(&k)) {
            pool.blocked = false;
        }
        pool.fresh.push_back(job);
        pool.since.get_or_insert(now);
        self.waiting += 1;
    }

    /// The next batch that may go at `now`: a line's due retry first, then
    /// its fresh events when full or lingered long enough (at once when
    /// `hurry`, while draining). `None` when nothing may go.
    /// Lines `skip` names wait (their procedure has no callee).
    pub fn take(
        &mut self,
        now: Instant,
        hurry: bool,
        skip: &dyn Fn(u64) -> bool,
    ) -> Option<Vec<Job<T>>> {
        for (line, pool) in self.lines.iter_mut() {
            let s = pool.s;
            if pool.in_flight >= s.in_flight || skip(*line) {
                continue;
            }
            let due_retry = pool
                .retries
                .iter()
                .enumerate()
                .filter(|(_, (at, _))| *at <= now)
                .min_by_key(|(_, (at, _))| *at)
                .map(|(i, _)| i);
            let jobs = match due_retry {
                Some(i) => pool.retries.swap_remove(i).1,
                None if pool.due(&s, hurry).is_some_and(|at| at <= now) => pool.form(&s, now),
                None => continue,
            };
            if jobs.is_empty() {
                // Every fresh event's key is busy: they wait for one.
                continue;
            }
            pool.in_flight += 1;
            self.waiting -= jobs.len();
            return Some(jobs);
        }
        None
    }

    /// A delivery of `line` ended (before its events are resolved or given
    /// back).
    pub fn finished(&mut self, line: u64) {
        if let Some(pool) = self.lines.get_mut(&line) {
            pool.in_flight = pool.in_flight.saturating_sub(1);
        }
    }

    /// A failed batch, to be tried again whole from `at`. Its keys stay
    /// busy.
    pub fn give_back(&mut self, line: u64, jobs: Vec<Job<T>>, at: Instant) {
        self.waiting += jobs.len();
        self.lines.entry(line).or_default().retries.push((at, jobs));
    }

    /// An event of `line` was acknowledged or dead-lettered: its key is free
    /// once no other of its events is out; an idle line is forgotten.
    pub fn resolved(&mut self, line: u64, job: &Job<T>) {
        let Entry::Occupied(mut pool) = self.lines.entry(line) else {
            return;
        };
        if let Some(key) = job.key.filter(|_| job.batched_out)
            && let Entry::Occupied(mut busy) = pool.get_mut().busy.entry(key)
        {
            *busy.get_mut() -= 1;
            if *busy.get() == 0 {
                busy.remove();
                pool.get_mut().blocked = false;
            }
        }
        if pool.get().is_idle() {
            pool.remove();
        }
    }

    /// When [`Pools::take`] next has something to hand out, for a line with
    /// room for another delivery: its earliest retry, or its fresh events'
    /// linger end.
    pub fn next_wake(&self, hurry: bool, skip: &dyn Fn(u64) -> bool) -> Option<Instant> {
        self.lines
            .iter()
            .filter(|(line, p)| p.in_flight < p.s.in_flight && !skip(**line))
            .flat_map(|(_, p)| {
                let retry = p.retries.iter().map(|(at, _)| *at).min();
                retry.into_iter().chain(p.due(&p.s, hurry))
            })
            .min()
    }

    /// Removes the oldest event still waiting for its first attempt (the
    /// earliest accepted, over all lines), to make room for a new one.
    pub fn evict_oldest_new(&mut self) -> Option<Job<T>> {
        let pool = self
            .lines
            .values_mut()
            .filter(|p| !p.fresh.is_empty())
            .min_by_key(|p| p.fresh.front().map(|j| j.seq))?;
        let job = pool.fresh.pop_front()?;
        pool.bytes -= size_of(&job);
        if pool.fresh.is_empty() {
            pool.since = None;
        }
        self.waiting -= 1;
        Some(job)
    }

    /// Looks at everything waiting (for metrics).
    pub fn for_each<'a>(&'a self, f: &mut dyn FnMut(&'a Job<T>)) {
        for pool in self.lines.values() {
            pool.fresh.iter().for_each(&mut *f);
            pool.retries
                .iter()
                .flat_map(|(_, jobs)| jobs)
                .for_each(&mut *f);
        }
    }

    /// Takes out the waiting events (fresh and retries) `pred` picks; a
    /// retry's keys are free again.
    pub fn take_if(&mut self, pred: &mut dyn FnMut(&Job<T>) -> bool) -> Vec<Job<T>> {
        let mut out = Vec::new();
        for pool in self.lines.values_mut() {
            let mut kept = VecDeque::with_capacity(pool.fresh.len());
            for job in pool.fresh.drain(..) {
                if pred(&job) {
                    pool.bytes -= size_of(&job);
                    out.push(job);
                } else {
                    kept.push_back(job);
                }
            }
            pool.fresh = kept;
            if pool.fresh.is_empty() {
                pool.since = None;
            }
            pool.blocked = false;
            for (_, jobs) in &mut pool.retries {
                let (taken, left): (Vec<_>, Vec<_>) = jobs.drain(..).partition(|j| pred(j));
                *jobs = left;
                for job in &taken {
                    if let Some(key) = job.key.filter(|_| job.batched_out)
                        && let Entry::Occupied(mut busy) = pool.busy.entry(key)
                    {
                        *busy.get_mut() -= 1;
                        if *busy.get() == 0 {
                            busy.remove();
                        }
                    }
                }
                out.extend(taken);
            }
            pool.retries.retain(|(_, jobs)| !jobs.is_empty());
        }
        self.waiting -= out.len();
        self.lines.retain(|_, p| !p.is_idle());
        out
    }

    /// Takes out everything waiting (fresh and retries), in acceptance
    /// order, and forgets every line.
    pub fn drain(&mut self) -> Vec<Job<T>> {
        let mut all: Vec<Job<T>> = self
            .lines
            .drain()
            .flat_map(|(_, p)| {
                p.fresh
                    .into_iter()
                    .chain(p.retries.into_iter().flat_map(|(_, jobs)| jobs))
            })
            .collect();
        all.sort_by_key(|j| j.seq);
        self.waiting = 0;
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::job::Batched;

    const MS: Duration = Duration::from_millis(1);
    /// No line waits for a callee.
    const NONE: &dyn Fn(u64) -> bool = &|_| false;

    fn job(n: u32, key: Option<u64>, bytes: u32, seq: u64) -> Job<u32> {
        let mut job = Job::new(n, Instant::now())
            .with_key(key)
            .with_batch(Some(Batched { line: 1, bytes }));
        job.seq = seq;
        job
    }

    fn batching(
        max_events: usize,
        max_bytes: usize,
        in_flight: usize,
        linger: Duration,
    ) -> Batching {
        Batching {
            max_events,
            max_bytes,
            in_flight,
            linger,
        }
    }

    fn items(jobs: &[Job<u32>]) -> Vec<u32> {
        jobs.iter().map(|j| j.item).collect()
    }

    #[test]
    fn a_call_takes_what_waits_up_to_the_limits_in_order() {
        let s = batching(3, 100, 1, Duration::ZERO);
        let t0 = Instant::now();
        let mut p = Pools::default();
        for n in 1..=5 {
            p.push(1, job(n, None, 10, n.into()), t0, s);
        }
        assert_eq!(
            p.take(t0, false, &NONE).map(|j| items(&j)),
            Some(vec![1, 2, 3])
        );
        assert!(p.take(t0, false, &NONE).is_none(), "one call in flight");
        p.finished(1);
        assert_eq!(
            p.take(t0, false, &NONE).map(|j| items(&j)),
            Some(vec![4, 5])
        );
        assert_eq!(p.waiting(), 0);
    }

    #[test]
    fn bytes_bound_a_call_but_a_large_event_goes_alone() {
        let s = batching(100, 25, 9, Duration::ZERO);
        let t0 = Instant::now();
        let mut p = Pools::default();
        p.push(1, job(1, None, 10, 1), t0, s);
        p.push(1, job(2, None, 10, 2), t0, s);
        p.push(1, job(3, None, 10, 3), t0, s);
        p.push(1, job(4, None, 99, 4), t0, s);
        assert_eq!(
            p.take(t0, false, &NONE).map(|j| items(&j)),
            Some(vec![1, 2])
        );
        assert_eq!(p.take(t0, false, &NONE).map(|j| items(&j)), Some(vec![3]));
        assert_eq!(p.take(t0, false, &NONE).map(|j| items(&j)), Some(vec![4]));
    }

    #[test]
    fn linger_holds_a_call_that_is_not_full() {
        let s = batching(3, 1000, 1, 10 * MS);
        let t0 = Instant::now();
        let mut p = Pools::default();
        p.push(1, job(1, None, 1, 1), t0, s);
        assert!(p.take(t0, false, &NONE).is_none());
        assert_eq!(p.next_wake(false, &NONE), Some(t0 + 10 * MS));
        assert!(p.take(t0, true, &NONE).is_some(), "a drain does not linger");
        p.finished(1);
        p.resolved(1, &Job::new(0, t0));
        for n in 2..=4 {
            p.push(1, job(n, None, 1, n.into()), t0 + MS, s);
        }
        assert_eq!(
            p.take(t0 + MS, false, &NONE).map(|j| items(&j)),
            Some(vec![2, 3, 4]),
            "a full call does not wait"
        );
    }

    #[test]
    fn a_busy_key_waits_for_its_batch_and_other_keys_pass() {
        let s = batching(10, 1000, 2, Duration::ZERO);
        let t0 = Instant::now();
        let mut p = Pools::default();
        p.push(1, job(1, Some(7), 1, 1), t0, s);
        p.push(1, job(2, Some(7), 1, 2), t0, s);
        let first = p.take(t0, false, &NONE).unwrap();
        assert_eq!(
            items(&first),
            [1, 2],
            "one key's events in order in a batch"
        );
        p.push(1, job(3, Some(7), 1, 3), t0, s);
        p.push(1, job(4, Some(8), 1, 4), t0, s);
        p.push(1, job(5, Some(7), 1, 5), t0, s);
        let second = p.take(t0, false, &NONE).unwrap();
        assert_eq!(items(&second), [4], "key 7 waits for its batch");
        p.finished(1);
        p.finished(1);
        for j in first.iter().chain(&second) {
            p.resolved(1, j);
        }
        assert_eq!(
            p.take(t0, false, &NONE).map(|j| items(&j)),
            Some(vec![3, 5])
        );
    }

    #[test]
    fn a_failed_batch_comes_back_whole_and_keeps_its_keys_busy() {
        let s = batching(10, 1000, 2, Duration::ZERO);
        let t0 = Instant::now();
        let mut p = Pools::default();
        p.push(1, job(1, Some(7), 1, 1), t0, s);
        p.push(1, job(2, None, 1, 2), t0, s);
        let batch = p.take(t0, false, &NONE).unwrap();
        p.finished(1);
        p.give_back(1, batch, t0 + 5 * MS);
        p.push(1, job(3, Some(7), 1, 3), t0, s);
        assert!(
            p.take(t0, false, &NONE).is_none(),
            "key 7 waits for the retry"
        );
        assert_eq!(p.next_wake(false, &NONE), Some(t0 + 5 * MS));
        assert_eq!(
            p.take(t0 + 5 * MS, false, &NONE).map(|j| items(&j)),
            Some(vec![1, 2])
        );
        assert_eq!(p.waiting(), 1);
        assert_eq!(items(&p.drain()), [3]);
    }
}
