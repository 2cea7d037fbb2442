//! Getting accepted events to their destination. [`core`] is the sans-IO
//! forwarding core (queue, in-flight bound, retry policy, what outcomes
//! mean); [`queue`] is the seam where accepted events wait; [`outcome`]
//! classifies what the sinks report; [`retry`] is the backoff arithmetic;
//! [`dedup`] forwards a publication once; [`envelope`] is the event and its
//! outgoing shapes. Pure throughout: the event loop and the sinks do the IO.

pub mod batch;
pub mod core;
pub mod dedup;
pub mod envelope;
pub mod job;
pub mod key;
pub mod outcome;
pub mod policy;
pub mod queue;
pub mod retry;

#[cfg(test)]
mod tests;

pub use self::batch::Batching;
pub use self::core::{Counts, Forwarder, Output, OverflowPolicy, Settings};
pub use self::job::{Batched, DeliveryId, Dispatch, Job};
pub use self::outcome::{Failure, GiveUp, Outcome, RetryAction};
pub use self::queue::{MemoryQueue, Queue};

/// The forwarding core as the sidecar runs it: over events, kept in memory
/// (boxed, so that a job moves as a pointer).
pub type EventCore = Forwarder<Box<envelope::SharedEvent>, MemoryQueue<Box<envelope::SharedEvent>>>;
