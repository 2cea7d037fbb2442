//! Forwarding of events to their procedures: queue, concurrency, retries, dead letters.
pub mod dedup;
