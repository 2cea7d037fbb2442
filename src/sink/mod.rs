//! Where an accepted event goes: a CALL through the router ([`wamp`]) or an
//! RPUSH onto a Redis list ([`redis`]). A sink builds an event's outgoing
//! form once, when the event is accepted, starts deliveries, and reports
//! typed outcomes ([`Report`]); it decides nothing: retries, give-ups and
//! what an error means belong to the forwarding core. A new destination is
//! one more implementation of [`Sink`].

pub mod redis;
pub mod stream;
pub mod wamp;

use std::time::Instant;

use futures_util::future::BoxFuture;

use crate::forward::envelope::{Outgoing, SharedEvent};
use crate::forward::policy::Policy;
use crate::forward::{DeliveryId, Dispatch, Job, Outcome};
use crate::wamp::session::Session;

/// How a delivery ended, as the sink saw it.
#[derive(Debug)]
pub enum Report {
    /// One outcome for every event of the delivery.
    All(Outcome),
    /// One outcome per event, in order.
    Each(Vec<Outcome>),
}

/// Where a started delivery's outcome will come from.
pub enum Started {
    /// The router's reply to the session request tagged with the delivery.
    OnSession,
    /// This future.
    Pending(BoxFuture<'static, Report>),
    /// It is already known.
    Done(Report),
}

/// A destination. `T` is the tag the event loop puts on session requests;
/// a sink that calls through the router tags its calls with the delivery.
/// The positions of `keys` grouped by key: groups in the order each key
/// first appears, positions in order. How a pipeline's events are split
/// into one call per stream or list while each keeps its events' order.
pub fn groups_in_order<K: PartialEq>(keys: impl IntoIterator<Item = K>) -> Vec<(K, Vec<usize>)> {
    let mut groups: Vec<(K, Vec<usize>)> = Vec::new();
    for (i, key) in keys.into_iter().enumerate() {
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, at)) => at.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    groups
}

pub trait Sink<T> {
    /// What this sink sends for `event`, built once at accept time, under
    /// its procedure's `policy` (`None`: the global settings).
    fn prepare(&self, event: &SharedEvent, policy: Option<&Policy>) -> Outgoing;
    /// How the forwarding core should group events into deliveries.
    fn dispatch(&self) -> Dispatch;
    /// Whether deliveries go through the router session (and wait for one).
    fn needs_session(&self) -> bool;
    /// Events this sink removed from its destination to make room
    /// (`SUBTOCALL_OVERFLOW=drop-oldest` at a stream's backlog bound), since
    /// it was last asked: the driver dead-letters them.
    fn take_evicted(&mut self) -> Vec<SharedEvent> {
        Vec::new()
    }

    /// A procedure discovery found (an exact registration's): a sink may prepare its destination
    /// (the stream target creates the stream and its consumer group).
    fn prepare_procedure(&self, _procedure: &str) {}

    /// Starts delivering `jobs`, in order; `session` is the router session
    /// while joined.
    fn start(
        &mut self,
        id: DeliveryId,
        jobs: &[Job<Box<SharedEvent>>],
        session: Option<&mut Session<T>>,
        now: Instant,
    ) -> Started;
}

#[cfg(test)]
mod tests {
    #[test]
    fn groups_keep_first_appearance_order_and_each_groups_order() {
        let groups = super::groups_in_order(["b", "a", "b", "c", "a"]);
        assert_eq!(
            groups,
            [("b", vec![0, 2]), ("a", vec![1, 4]), ("c", vec![3])]
        );
    }
}
