//! Forward-once: a bounded memory of recent publication ids, so that an event
//! matching several of our subscriptions (say an exact and a wildcard one) is
//! forwarded once. Pure data; calls only `std` and `crate::wamp` ids.
//!
//! Why a small window is enough: the router delivers one publication to all
//! of a session's matching subscriptions while handling that one PUBLISH, so
//! the duplicates arrive within a few messages of each other, never thousands
//! of events apart. And Crossbar draws publication ids at random from 2^53, so
//! the chance that a *different* event collides with one of 4096 remembered
//! ids is about 4096 / 2^53 ≈ 5·10⁻¹³ per event: not worth a thought.

use std::collections::{HashSet, VecDeque};

use crate::wamp::PublicationId;
use crate::wamp::id::IdHashing;

/// A sensible window: large enough to span any burst of interleaved events,
/// small enough to be ~100 kB.
pub const DEFAULT_CAPACITY: usize = 4096;

/// Remembers the last `capacity` publication ids; the oldest is forgotten
/// first. O(1) per event; memory bounded by `capacity`.
#[derive(Debug)]
pub struct Dedup {
    capacity: usize,
    /// Arrival order, for eviction.
    order: VecDeque<PublicationId>,
    /// The same ids, for lookup.
    seen: HashSet<PublicationId, IdHashing>,
}

impl Dedup {
    /// A capacity of zero remembers nothing: every event counts as new.
    pub fn new(capacity: usize) -> Dedup {
        Dedup {
            capacity,
            order: VecDeque::with_capacity(capacity),
            seen: HashSet::with_capacity_and_hasher(capacity, IdHashing::default()),
        }
    }

    /// True the first time `id` is seen within the window; false for a
    /// repeat, which the caller drops.
    pub fn first_time(&mut self, id: PublicationId) -> bool {
        if self.capacity == 0 {
            return true;
        }
        if self.seen.contains(&id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.order.push_back(id);
        self.seen.insert(id);
        true
    }

    /// [`Dedup::first_time`] for one consumer group: the same publication
    /// is new once per group. `group` is [`group_mix`] of the group's name
    /// (0 for the default group), mixed into the id, so ids of different
    /// groups differ; two different pairs colliding is as unlikely as two
    /// random ids. (One publication has one concrete topic, so its
    /// procedures differ by their group alone.)
    pub fn first_time_for(&mut self, id: PublicationId, group: u64) -> bool {
        self.first_time(PublicationId(id.0 ^ group))
    }

    /// How many ids are remembered right now.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// What a group mixes into publication ids (see
/// [`Dedup::first_time_for`]): 0 for the default group, else its name's
/// FNV-1a hash, with a constant mixed in for a group served in batches.
pub fn group_mix(name: Option<&str>, batch: bool) -> u64 {
    let mix = name.map_or(0, |g| {
        g.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    });
    if batch {
        mix ^ 0x9e37_79b9_7f4a_7c15
    } else {
        mix
    }
}

impl Default for Dedup {
    fn default() -> Dedup {
        Dedup::new(DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: u64) -> PublicationId {
        PublicationId(id)
    }

    #[test]
    fn an_event_delivered_twice_is_forwarded_once() {
        let mut d = Dedup::new(8);
        assert!(d.first_time(p(1)));
        assert!(!d.first_time(p(1)));
        assert!(d.first_time(p(2)));
        assert!(!d.first_time(p(1)));
        assert!(!d.first_time(p(2)));
    }

    #[test]
    fn the_oldest_id_is_evicted_when_the_window_is_full() {
        let mut d = Dedup::new(3);
        for id in 1..=3 {
            assert!(d.first_time(p(id)));
        }
        assert!(d.first_time(p(4))); // evicts 1
        assert_eq!(d.len(), 3);
        assert!(!d.first_time(p(2)));
        assert!(!d.first_time(p(3)));
        assert!(!d.first_time(p(4)));
        assert!(d.first_time(p(1))); // forgotten, so new again; evicts 2
        assert!(d.first_time(p(2)));
    }

    #[test]
    fn a_repeat_does_not_refresh_or_grow_the_window() {
        let mut d = Dedup::new(2);
        assert!(d.first_time(p(1)));
        assert!(d.first_time(p(2)));
        assert!(!d.first_time(p(1))); // does not make 1 the newest
        assert!(d.first_time(p(3))); // evicts 1, the oldest by arrival
        assert!(d.first_time(p(1)));
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn memory_stays_bounded_over_many_events() {
        let mut d = Dedup::new(16);
        for id in 0..10_000 {
            assert!(d.first_time(p(id)));
            assert!(d.len() <= 16);
        }
        assert_eq!(d.seen.len(), 16);
        assert!(!d.first_time(p(9_999)));
        assert!(d.first_time(p(9_983)));
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut d = Dedup::new(0);
        assert!(d.first_time(p(1)));
        assert!(d.first_time(p(1)));
        assert!(d.is_empty());
    }

    #[test]
    fn each_group_gets_a_publication_once() {
        let mut d = Dedup::new(16);
        let (default, audit) = (group_mix(None, false), group_mix(Some("audit"), false));
        assert_ne!(default, audit);
        assert!(d.first_time_for(p(7), default));
        assert!(d.first_time_for(p(7), audit));
        assert!(!d.first_time_for(p(7), default));
        assert!(!d.first_time_for(p(7), audit));
        assert!(d.first_time_for(p(8), default));
    }
}
