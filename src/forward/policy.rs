//! A procedure's delivery settings, resolved once per registration (see
//! [`crate::policy`]): what a job carries when a rule of
//! `SUBTOCALL_POLICY_FILE` applies to its procedure. A job without one
//! follows the global settings. A leaf: plain data.

use std::sync::Arc;
use std::time::Duration;

use super::batch::Batching;
use super::retry::RetryPolicy;
use crate::config::OrderBy;

/// Every delivery setting of one procedure, the rule's values over the
/// environment's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub order_by: OrderBy,
    /// Deadline of one forwarding attempt.
    pub call_timeout: Duration,
    /// This procedure's calls in flight at once, under the global bound
    /// (`SUBTOCALL_MAX_IN_FLIGHT`); `None`: only the global bound.
    pub max_in_flight: Option<usize>,
    pub retry: RetryPolicy,
    /// Hand-outs of a Redis queue entry before it is dead-lettered.
    pub max_deliveries: u32,
    pub batching: Batching,
    /// The kwarg that carries the event details, when set.
    pub details_kwarg: Option<Arc<str>>,
    /// How long the procedure's group outlives its last callee.
    pub grace_period: Duration,
}
