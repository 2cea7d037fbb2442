//! Request deadlines, earliest first, for the session. Most requests come
//! with deadlines that never decrease (now plus one fixed timeout: every
//! forwarded call), so they queue in arrival order, at the cost of a push;
//! one answered is forgotten lazily, when it reaches the front, or when the
//! queue is compacted (it never holds more than twice the requests pending,
//! plus a little). A deadline earlier than the last queued one goes to an
//! ordered set instead. (An ordered set for all, as before, cost about 700
//! instructions per forwarded call.)

use std::collections::{BTreeSet, VecDeque};
use std::time::Instant;

use super::id::RequestId;

/// Entries the queue may hold beyond twice the pending requests before it
/// is compacted.
const SLACK: usize = 64;

#[derive(Debug, Default)]
pub struct Deadlines {
    queued: VecDeque<(Instant, RequestId)>,
    sorted: BTreeSet<(Instant, RequestId)>,
}

impl Deadlines {
    /// `request` must be answered by `at`. `pending` is how many requests
    /// wait (this one included); `waits(request, at)` whether one still
    /// waits with that deadline.
    pub fn insert(
        &mut self,
        at: Instant,
        request: RequestId,
        pending: usize,
        waits: impl Fn(RequestId, Instant) -> bool,
    ) {
        if self.queued.back().is_none_or(|(last, _)| at >= *last) {
            self.queued.push_back((at, request));
            self.compact(pending, waits);
        } else {
            self.sorted.insert((at, request));
        }
    }

    /// `request`, due at `at`, no longer waits (answered or failed);
    /// `pending` requests still do.
    pub fn remove(
        &mut self,
        at: Instant,
        request: RequestId,
        pending: usize,
        waits: impl Fn(RequestId, Instant) -> bool,
    ) {
        if !self.sorted.remove(&(at, request)) {
            self.trim(&waits);
            self.compact(pending, waits);
        }
    }

    /// The earliest deadline (perhaps of a request answered since: firing
    /// early is harmless, [`Deadlines::pop_due`] skips it).
    pub fn first(&self) -> Option<Instant> {
        let queued = self.queued.front().map(|(at, _)| *at);
        let sorted = self.sorted.first().map(|(at, _)| *at);
        match (queued, sorted) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next request still waiting whose deadline is at or before
    /// `now`, taken out; `pending` requests wait.
    pub fn pop_due(
        &mut self,
        now: Instant,
        pending: usize,
        waits: impl Fn(RequestId, Instant) -> bool,
    ) -> Option<RequestId> {
        loop {
            self.trim(&waits);
            let queued = self.queued.front().copied();
            let sorted = self.sorted.first().copied();
            let (earliest, from_sorted) = match (queued, sorted) {
                (Some(q), Some(s)) if s < q => (s, true),
                (Some(q), _) => (q, false),
                (None, Some(s)) => (s, true),
                (None, None) => return None,
            };
            let (at, request) = earliest;
            if at > now {
                self.compact(pending, waits);
                return None;
            }
            if from_sorted {
                self.sorted.pop_first();
            } else {
                self.queued.pop_front();
            }
            if waits(request, at) {
                return Some(request);
            }
        }
    }

    pub fn clear(&mut self) {
        self.queued.clear();
        self.sorted.clear();
    }

    /// Forgets every answered request once the queue holds more than twice
    /// the `pending` ones (plus a little): amortised, a constant per request.
    fn compact(&mut self, pending: usize, waits: impl Fn(RequestId, Instant) -> bool) {
        if self.queued.len() > 2 * pending + SLACK {
            self.queued.retain(|(at, r)| waits(*r, *at));
        }
    }

    /// Forgets the answered requests at the front of the queue.
    fn trim(&mut self, waits: impl Fn(RequestId, Instant) -> bool) {
        while let Some(&(at, request)) = self.queued.front() {
            if waits(request, at) {
                break;
            }
            self.queued.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Step {
        /// A request due this many ms from the start.
        Add(u64),
        /// The n-th oldest pending request is answered.
        Answer(usize),
        /// Time passes to this many ms from the start: what is due times out.
        Tick(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u64..2_000).prop_map(Step::Add),
            3 => (0usize..64).prop_map(Step::Answer),
            1 => (0u64..2_000).prop_map(Step::Tick),
        ]
    }

    proptest! {
        /// Against an ordered set of what is pending: the same requests time
        /// out at each tick, in deadline order, and the earliest deadline
        /// given is never later than the true one; the queue stays bounded.
        #[test]
        fn times_out_what_an_ordered_set_would_and_stays_bounded(
            steps in proptest::collection::vec(step(), 1..400),
            monotonic in any::<bool>(),
        ) {
            let t0 = Instant::now();
            let ms = |n: u64| t0 + Duration::from_millis(n);
            let mut d = Deadlines::default();
            let mut pending: HashMap<RequestId, Instant> = HashMap::new();
            let mut model: BTreeSet<(Instant, RequestId)> = BTreeSet::new();
            let mut next = 1u64;
            let mut last_add = 0u64;
            for step in steps {
                match step {
                    Step::Add(n) => {
                        // Mostly a fixed timeout from a clock that goes on.
                        let n = if monotonic { last_add.max(n) } else { n };
                        last_add = n;
                        let (at, r) = (ms(n), RequestId(next));
                        next += 1;
                        pending.insert(r, at);
                        model.insert((at, r));
                        d.insert(at, r, pending.len(), |r, at| pending.get(&r) == Some(&at));
                    }
                    Step::Answer(i) => {
                        let Some(&(at, r)) = model.iter().nth(i % model.len().max(1)) else {
                            continue;
                        };
                        model.remove(&(at, r));
                        pending.remove(&r);
                        d.remove(at, r, pending.len(), |r, at| pending.get(&r) == Some(&at));
                    }
                    Step::Tick(n) => {
                        let now = ms(n);
                        let mut got = Vec::new();
                        while let Some(r) =
                            d.pop_due(now, pending.len(), |r, at| pending.get(&r) == Some(&at))
                        {
                            pending.remove(&r);
                            got.push(r);
                        }
                        let due: Vec<RequestId> =
                            model.iter().take_while(|(at, _)| *at <= now).map(|(_, r)| *r).collect();
                        for r in &due {
                            model.retain(|(_, m)| m != r);
                        }
                        prop_assert_eq!(got, due);
                    }
                }
                let truth = model.first().map(|(at, _)| *at);
                match (d.first(), truth) {
                    (Some(given), Some(truth)) => prop_assert!(given <= truth),
                    (None, Some(_)) => prop_assert!(false, "a pending deadline forgotten"),
                    _ => {}
                }
                prop_assert!(d.queued.len() <= 2 * pending.len() + SLACK + 1);
            }
        }
    }
}
