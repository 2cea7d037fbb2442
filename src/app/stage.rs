//! The stages an accepted event goes through, in order: each a forwarding
//! core (`forward::core`, sans-IO: it decides what starts, what an outcome
//! means, when to retry or give up) and the sink it starts deliveries on.
//!
//! - memory queue: one stage, [`Role::Deliver`] (the backends, or Redis
//!   mode's lists or streams);
//! - Redis queue: [`Role::Admit`] (events into the queue's streams), then
//!   [`Role::DeliverQueued`] (what the queue core hands out, to the
//!   destination). The Redis queue itself (`super::redis_queue`) is what
//!   links the two.
//!
//! A new stage plugs in here: a role, a core and a sink, pushed in order.
//! Each stage's delivery ids are its own range, so a report finds its
//! stage by id alone.

use std::collections::HashMap;
use std::time::Instant;

use super::procedure_metrics::Live;
use super::token::Token;
use crate::forward::envelope::SharedEvent;
use crate::forward::{DeliveryId, EventCore, Job};
use crate::sink::Sink;

/// What a stage's outcomes mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Delivers to the destination: an acknowledgement is a forwarded event.
    Deliver,
    /// Admits events to the Redis queue: an acknowledgement means Redis
    /// has it, and another instance may be the one that delivers it.
    Admit,
    /// Delivers what the Redis queue hands out, while it is certainly this
    /// instance's; an unfinished entry is left in the queue, not given up.
    DeliverQueued,
}

impl Role {
    /// Whether this stage's acknowledgements are deliveries.
    pub fn delivers(self) -> bool {
        self != Role::Admit
    }
}

pub struct Stage {
    pub role: Role,
    pub core: EventCore,
    pub sink: Box<dyn Sink<Token> + Send>,
    /// This stage's delivery ids are above this one.
    ids_from: u64,
}

impl Stage {
    /// Whether deliveries can start: a sink that needs the session only
    /// while joined.
    fn set_joined(&mut self, joined: bool, now: Instant) {
        if self.sink.needs_session() {
            self.core.set_open(joined, now);
        }
    }
}

/// The stages, in the order an event goes through them.
#[derive(Default)]
pub struct Stages {
    list: Vec<Stage>,
}

impl Stages {
    /// Adds the next stage. A sink that needs no session takes deliveries
    /// from the start.
    pub fn push(
        &mut self,
        role: Role,
        core: EventCore,
        sink: Box<dyn Sink<Token> + Send>,
        now: Instant,
    ) {
        let ids_from = (self.list.len() as u64) << 60;
        let mut core = core.with_ids_from(ids_from);
        core.set_open(!sink.needs_session(), now);
        self.list.push(Stage {
            role,
            core,
            sink,
            ids_from,
        });
    }

    /// Procedure `unit` has no callee (`away`), or has one again: the
    /// stages that call it keep its events waiting, or send them on.
    pub fn set_away(&mut self, unit: u64, away: bool, now: Instant) {
        for s in &mut self.list {
            if !(s.role.delivers() && s.sink.needs_session()) {
                continue;
            }
            if away {
                s.core.pause(unit);
            } else {
                s.core.resume(unit, now);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// The stage that accepted events enter.
    pub fn first(&mut self) -> &mut Stage {
        &mut self.list[0]
    }

    pub fn get(&self, i: usize) -> &Stage {
        &self.list[i]
    }

    pub fn get_mut(&mut self, i: usize) -> &mut Stage {
        &mut self.list[i]
    }

    /// The stage with `role`, if there is one.
    pub fn with_role(&mut self, role: Role) -> Option<&mut Stage> {
        self.list.iter_mut().find(|s| s.role == role)
    }

    /// The stage delivery `id` belongs to.
    pub fn of(&self, id: DeliveryId) -> usize {
        self.list
            .iter()
            .rposition(|s| id.0 > s.ids_from)
            .unwrap_or(0)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Stage> {
        self.list.iter()
    }

    /// A session joined or ended.
    pub fn set_joined(&mut self, joined: bool, now: Instant) {
        for s in &mut self.list {
            s.set_joined(joined, now);
        }
    }

    /// Gives every stage until `deadline`; now, those that cannot deliver
    /// without a session when `session` is false.
    pub fn drain(&mut self, deadline: Instant, session: bool, now: Instant) {
        for s in &mut self.list {
            s.core.shutdown(deadline, now);
            if s.sink.needs_session() && !session {
                s.core.shutdown(now, now);
            }
        }
    }

    /// The session ended while draining: what needs one cannot finish.
    pub fn stop_without_session(&mut self, now: Instant) {
        for s in &mut self.list {
            if s.sink.needs_session() {
                s.core.shutdown(now, now);
            }
        }
    }

    /// Ends every stage's drain now.
    pub fn stop(&mut self, now: Instant) {
        for s in &mut self.list {
            s.core.shutdown(now, now);
        }
    }

    /// Events waiting and in flight, all stages together.
    pub fn held(&self) -> (usize, usize) {
        self.list.iter().fold((0, 0), |(w, f), s| {
            (w + s.core.waiting(), f + s.core.in_flight())
        })
    }

    /// Events in flight to the destination.
    pub fn delivering(&self) -> usize {
        self.list
            .iter()
            .filter(|s| s.role.delivers())
            .map(|s| s.core.in_flight())
            .sum()
    }

    pub fn is_idle(&self) -> bool {
        self.list.iter().all(|s| s.core.is_idle())
    }

    /// Every stage's shutdown deadline passed.
    pub fn is_stopped(&self) -> bool {
        self.list.iter().all(|s| s.core.is_stopped())
    }

    /// Earliest time a stage has something due (a retry, a deadline).
    pub fn next_wake(&self) -> Option<Instant> {
        self.list.iter().filter_map(|s| s.core.next_wake()).min()
    }

    /// What each procedure has in flight and waiting, over every stage.
    pub fn live<'a>(&'a self) -> HashMap<&'a str, Live> {
        let mut live: HashMap<&'a str, Live> = HashMap::new();
        let mut count = |j: &'a Job<Box<SharedEvent>>, in_flight: bool| {
            live.entry(&*j.item.procedure)
                .or_default()
                .add_job(j.received, in_flight);
        };
        for s in &self.list {
            s.core.for_each_job(&mut count);
        }
        live
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::forward::retry::{Backoff, RetryPolicy};
    use crate::forward::{Dispatch, Forwarder, MemoryQueue, Output, OverflowPolicy, Settings};
    use crate::sink::wamp::WampSink;
    use crate::wamp::{Dict, Event, Payload, PublicationId, SubscriptionId};

    fn core() -> EventCore {
        let s = Duration::from_secs(1);
        let settings = Settings {
            capacity: 10,
            overflow: OverflowPolicy::DropNewest,
            max_in_flight: 4,
            dispatch: Dispatch::Each,
            retry: RetryPolicy {
                max_attempts: 3,
                max_age: 60 * s,
                backoff: Backoff { initial: s, max: s },
            },
            batching: Default::default(),
        };
        Forwarder::new(MemoryQueue::new(), settings, 1)
    }

    fn sink() -> Box<dyn Sink<Token> + Send> {
        Box::new(WampSink {
            call_timeout: Duration::from_secs(10),
            details_kwarg: None,
        })
    }

    fn job(publication: u64, now: Instant) -> Job<Box<SharedEvent>> {
        let event = Event {
            subscription: SubscriptionId(1),
            publication: PublicationId(publication),
            details: Dict::new(),
            payload: Payload::default(),
        };
        let shared = SharedEvent::new(Arc::from("p.SUB_t"), "p.t".into(), event, SystemTime::now());
        Job::new(Box::new(shared), now)
    }

    fn delivered(stage: &mut Stage) -> Vec<DeliveryId> {
        std::iter::from_fn(|| stage.core.poll())
            .filter_map(|o| match o {
                Output::Deliver(id) => Some(id),
                _ => None,
            })
            .collect()
    }

    /// A report finds its stage by the delivery id alone, whichever stage
    /// started it, and each stage's counts are its own.
    #[test]
    fn each_stage_owns_its_delivery_ids_and_the_list_sums_what_they_hold() {
        let now = Instant::now();
        let mut stages = Stages::default();
        stages.push(Role::Admit, core(), sink(), now);
        stages.push(Role::DeliverQueued, core(), sink(), now);
        stages.set_joined(true, now);
        for (i, n) in [(0, 2), (1, 3)] {
            for p in 0..n {
                stages.get_mut(i).core.accept_job(job(p, now), now);
            }
        }
        let first = delivered(stages.get_mut(0));
        let second = delivered(stages.get_mut(1));
        assert_eq!((first.len(), second.len()), (2, 3));
        assert!(first.iter().all(|id| stages.of(*id) == 0));
        assert!(second.iter().all(|id| stages.of(*id) == 1));
        assert_eq!(stages.held(), (0, 5));
        // Only the delivering stage's calls are deliveries in flight.
        assert_eq!(stages.delivering(), 3);
        assert_eq!(stages.live()["p.SUB_t"].in_flight, 5);
        assert!(!stages.is_idle());
    }
}
