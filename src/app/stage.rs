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
