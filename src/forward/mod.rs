//! Getting accepted events to their destination: de-duplication, the
//! bounded queue and the retry policy. Pure; the sinks do the delivering.

pub mod dedup;
pub mod envelope;
pub mod queue;
pub mod retry;
