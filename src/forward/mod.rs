//! Getting accepted events to their destination: the bounded queue, the
//! retry policy and (elsewhere) the sinks that do the delivering.

pub mod queue;
pub mod retry;
