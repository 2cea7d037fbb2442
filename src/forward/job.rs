//! The words the forwarding stages, the sinks and the metrics share: a
//! [`Job`] (an event on its way, with its history), its place in a batch
//! ([`Batched`]), the [`DeliveryId`] that brings an attempt's outcome
//! back, and how a sink takes deliveries ([`Dispatch`]). A leaf: it
//! imports none of them.

use std::sync::Arc;
use std::time::Instant;

use super::policy::Policy;

/// Names one delivery (one attempt at one event, or at a pipeline batch) so
/// that its outcome finds its way back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryId(pub u64);

impl std::fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A job's place among batch procedures: its line (the procedure's) and its
/// size in a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batched {
    pub line: u64,
    pub bytes: u32,
}

/// An event on its way to a destination, with its delivery history.
#[derive(Debug, Clone, PartialEq)]
pub struct Job<T> {
    pub item: T,
    /// When subtocall received the event (latency and age count from here).
    pub received: Instant,
    /// The retry budget's age counts from here: `received`, or later when
    /// the event waited for its procedure's callee (waiting is not
    /// failing).
    pub budget_from: Instant,
    /// Its procedure, hashed ([`crate::forward::key::fnv1a64`]): the unit
    /// that waits while the procedure has no callee
    /// ([`super::Forwarder::pause`]).
    pub unit: u64,
    /// Attempts made so far.
    pub attempts: u32,
    /// The last failure, for the dead-letter record.
    pub last_error: Option<String>,
    /// The ordering key's hash (`SUBTOCALL_ORDER_BY`): events with the same
    /// key are delivered one at a time, in the order accepted. `None`:
    /// unordered.
    pub key: Option<u64>,
    /// Set for an event of a batch procedure: delivered many to a call (see
    /// [`super::batch`]).
    pub batch: Option<Batched>,
    /// Its procedure's settings when a rule of the policy file applies to
    /// it (`None`: the global ones). Carried, not looked up: an event keeps
    /// the policy it was accepted under.
    pub policy: Option<Arc<Policy>>,
    /// Set by the forwarding core when it accepts the job: its place in the
    /// order of acceptance.
    pub(super) seq: u64,
    /// Set when the job went out in a batch (its key counts as busy in its
    /// pool until it is resolved).
    pub(super) batched_out: bool,
}

impl<T> Job<T> {
    pub fn new(item: T, received: Instant) -> Job<T> {
        Job {
            item,
            received,
            budget_from: received,
            unit: 0,
            attempts: 0,
            last_error: None,
            key: None,
            batch: None,
            policy: None,
            seq: 0,
            batched_out: false,
        }
    }

    /// The same job with an ordering key.
    pub fn with_key(self, key: Option<u64>) -> Job<T> {
        Job { key, ..self }
    }

    /// The same job as an event of procedure `unit` (its hash).
    pub fn with_unit(self, unit: u64) -> Job<T> {
        Job { unit, ..self }
    }

    /// The same job under its procedure's policy (`None`: the global one).
    pub fn with_policy(self, policy: Option<Arc<Policy>>) -> Job<T> {
        Job { policy, ..self }
    }

    /// The same job as an event of a batch procedure, or not.
    pub fn with_batch(self, batch: Option<Batched>) -> Job<T> {
        Job { batch, ..self }
    }
}

/// How events are grouped into deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// One event per delivery, up to the in-flight limit at once, each
    /// retried on its own (a CALL per event).
    Each,
    /// Up to `max` events per delivery, in order, one delivery at a time; a
    /// delivery that fails as a whole goes back to the head of the line and
    /// nothing passes it (Redis lists, whose order is kept).
    Pipeline { max: usize },
}
