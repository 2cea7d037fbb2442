//! What the sidecar did, as counted when it stops: the stop line.

use crate::forward::GiveUp;
use crate::metrics::Metrics;

/// Counts reported when the sidecar stops. With the memory queue every
/// accepted event is either forwarded or dead-lettered by then:
/// `accepted() == forwarded + dead_lettered`. On the Redis queue an instance
/// hands what it accepts to Redis (`admitted`, or `admitted_elsewhere` when
/// another instance was first) and delivers what it reads, whoever admitted
/// it: the balance holds for the group, not for one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// EVENTs received on forwarding subscriptions.
    pub received: u64,
    /// Skipped: the same publication was already accepted.
    pub duplicates: u64,
    /// Skipped: no procedure to route them to.
    pub unroutable: u64,
    pub forwarded: u64,
    pub dead_lettered: u64,
    /// On the Redis queue: accepted events this instance added to a
    /// stream, and those another instance had added first.
    pub admitted: Option<(u64, u64)>,
}

impl Summary {
    pub fn from_metrics(m: &Metrics, redis_queue: bool) -> Summary {
        Summary {
            admitted: redis_queue
                .then(|| (m.queue_admitted.get(), m.queue_admitted_elsewhere.get())),
            received: m.events_received.get(),
            duplicates: m.events_duplicate.get(),
            unroutable: m.unroutable(false).get() + m.unroutable(true).get(),
            forwarded: m.events_forwarded.get(),
            dead_lettered: GiveUp::ALL.iter().map(|g| m.dead_lettered(*g).get()).sum(),
        }
    }

    /// Events taken on for delivery.
    pub fn accepted(&self) -> u64 {
        self.received - self.duplicates - self.unroutable
    }

    /// The stop line (target `subtocall::app`, as before it had a file
    /// of its own).
    pub fn log(&self) {
        match self.admitted {
            None => tracing::info!(
                target: "subtocall::app",
                received = self.received,
                duplicates = self.duplicates,
                unroutable = self.unroutable,
                accepted = self.accepted(),
                forwarded = self.forwarded,
                dead_lettered = self.dead_lettered,
                "subtocall stopped"
            ),
            Some((admitted, elsewhere)) => tracing::info!(
                target: "subtocall::app",
                received = self.received,
                duplicates = self.duplicates,
                unroutable = self.unroutable,
                accepted = self.accepted(),
                admitted,
                admitted_elsewhere = elsewhere,
                forwarded = self.forwarded,
                dead_lettered = self.dead_lettered,
                "subtocall stopped"
            ),
        }
    }
}
