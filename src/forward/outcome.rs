//! How a delivery attempt ended, as a sink reports it (typed, with the
//! source error kept), and the one place that decides what such an ending
//! means: delivered, worth another attempt, or final. Also why an event is
//! given up. Pure: the sinks report, this module classifies.

use std::fmt;

use crate::wamp::RequestError;

/// How one delivery attempt of one event ended.
pub type Outcome = Result<(), Failure>;

/// Why an attempt did not deliver, as the sink saw it.
#[derive(Debug)]
pub enum Failure {
    /// The forwarded CALL failed: an ERROR from the router or the backend, no
    /// answer in time, or the connection went away before an answer.
    Call(RequestError),
    /// Redis refused the push or could not be reached.
    Redis(redis::RedisError),
    /// The event could not be put into the sink's form. Cannot happen for a
    /// payload validated on arrival; final rather than retried forever.
    Encode(String),
    /// The sink reported no outcome for this event (a pipeline answered
    /// short): not known to be delivered, so retried.
    Missing,
    /// The Redis stream holds its bound of unacknowledged entries: the
    /// event is not added (final: the readers are behind).
    Backlog { backlog: u64 },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Call(e) => e.fmt(f),
            Failure::Redis(e) => write!(f, "Redis: {e}"),
            Failure::Encode(e) => write!(f, "cannot encode the event: {e}"),
            Failure::Missing => f.write_str("no outcome reported"),
            Failure::Backlog { backlog } => write!(
                f,
                "the stream holds {backlog} unacknowledged entries (SUBTOCALL_REDIS_MAX_BACKLOG)"
            ),
        }
    }
}

/// What a failure means for the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAction {
    /// Transient (no callee right now, a callee died, a timeout, a lost
    /// connection, Redis away): try again later.
    Retry,
    /// The destination answered and said no: another attempt would get the
    /// same answer. Dead-lettered, not retried.
    Final,
}

/// WAMP error URIs that mean "not delivered, try again" rather than "the
/// backend rejected it".
const RETRYABLE_WAMP_ERRORS: &[&str] = &[
    // No callee registered right now: backends restarting.
    "wamp.error.no_such_procedure",
    // Also what Crossbar answers while a registration is being torn down.
    "wamp.error.no_such_registration",
    // The callee's session went away mid-call.
    "wamp.error.canceled",
    // Router- or callee-side call timeout.
    "wamp.error.timeout",
    // A callee at its concurrency limit.
    "crossbar.error.max_concurrency_reached",
    // The callee is shutting down (autobahn, on leave).
    "wamp.close.system_shutdown",
    "wamp.error.unavailable",
    "wamp.error.no_available_callee",
];

/// Redis server error codes that mean "try again later", not "this command
/// is wrong": one list for every Redis path (sinks, the Redis queue).
const TRANSIENT_REDIS_CODES: &[&str] = &[
    "NOREPLICAS",
    "MOVED",
    "ASK",
    "LOADING",
    "BUSY",
    "TRYAGAIN",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "OOM",
    "READONLY",
];

/// Whether a Redis server error code means "try again later" (a busy,
/// loading, failing-over or redirecting server, a missing replica).
pub fn is_transient_redis_code(code: &str) -> bool {
    TRANSIENT_REDIS_CODES.contains(&code)
}

/// Classifies a WAMP ERROR returned for a forwarded CALL.
pub fn classify_wamp_error(uri: &str) -> RetryAction {
    if RETRYABLE_WAMP_ERRORS.contains(&uri) {
        RetryAction::Retry
    } else {
        RetryAction::Final
    }
}

/// Classifies a failed attempt: only an answer that says "no" is final;
/// everything that says "not delivered (yet)" is retried.
pub fn classify(failure: &Failure) -> RetryAction {
    match failure {
        Failure::Call(RequestError::Wamp(e)) => classify_wamp_error(&e.error),
        // Fenced: not sent at all (the queue stage takes such a delivery
        // back rather than retrying it).
        Failure::Call(
            RequestError::Timeout
            | RequestError::ConnectionLost
            | RequestError::NotJoined
            | RequestError::Fenced,
        ) => RetryAction::Retry,
        // The same message would be too large again.
        Failure::Call(RequestError::TooLarge { .. }) => RetryAction::Final,
        Failure::Redis(e) => {
            let transient = e.code().is_some_and(is_transient_redis_code)
                || e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_cluster_error();
            if transient {
                RetryAction::Retry
            } else {
                RetryAction::Final
            }
        }
        Failure::Encode(_) | Failure::Backlog { .. } => RetryAction::Final,
        Failure::Missing => RetryAction::Retry,
    }
}

/// Why a failure that is final gives the event up.
pub fn final_reason(failure: &Failure) -> GiveUp {
    match failure {
        Failure::Call(RequestError::TooLarge { .. }) => GiveUp::TooLarge,
        Failure::Backlog { .. } => GiveUp::Backlog,
        _ => GiveUp::Rejected,
    }
}

/// Why an event is given up (the dead letter's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GiveUp {
    /// The queue was full.
    Overflow,
    /// The destination rejected it (a final error).
    Rejected,
    /// Retryable failures until the attempt or age budget ran out.
    Exhausted,
    /// The shutdown deadline came before it was delivered.
    Shutdown,
    /// Its message is larger than the router takes (never sent, or the
    /// router closed the connection over it).
    TooLarge,
    /// Its Redis stream holds its bound of unacknowledged entries.
    Backlog,
    /// A Redis queue entry handed out `SUBTOCALL_MAX_DELIVERIES` times
    /// (takeovers after an instance died or froze included).
    MaxDeliveries,
}

impl GiveUp {
    pub const ALL: [GiveUp; 7] = [
        GiveUp::Overflow,
        GiveUp::Rejected,
        GiveUp::Exhausted,
        GiveUp::Shutdown,
        GiveUp::TooLarge,
        GiveUp::Backlog,
        GiveUp::MaxDeliveries,
    ];

    /// Metric label and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUp::Overflow => "overflow",
            GiveUp::Rejected => "rejected",
            GiveUp::Exhausted => "exhausted",
            GiveUp::Shutdown => "shutdown",
            GiveUp::TooLarge => "too_large",
            GiveUp::Backlog => "backlog",
            GiveUp::MaxDeliveries => "max_deliveries",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wamp::{Dict, Payload, WampError};

    fn wamp_error(uri: &str) -> Failure {
        Failure::Call(RequestError::Wamp(WampError {
            error: uri.into(),
            details: Dict::new(),
            payload: Payload::default(),
        }))
    }

    #[test]
    fn transient_wamp_errors_are_retried_and_application_errors_are_final() {
        for uri in [
            "wamp.error.no_such_procedure",
            "wamp.error.canceled",
            "wamp.error.timeout",
            "crossbar.error.max_concurrency_reached",
        ] {
            assert_eq!(classify(&wamp_error(uri)), RetryAction::Retry, "{uri}");
        }
        for uri in [
            "com.example.error.rejected",
            "wamp.error.invalid_argument",
            "wamp.error.not_authorized",
            "wamp.error.runtime_error",
        ] {
            assert_eq!(classify(&wamp_error(uri)), RetryAction::Final, "{uri}");
        }
    }

    #[test]
    fn lost_connections_and_timeouts_are_retried() {
        for e in [
            RequestError::Timeout,
            RequestError::ConnectionLost,
            RequestError::NotJoined,
        ] {
            assert_eq!(classify(&Failure::Call(e)), RetryAction::Retry);
        }
    }

    #[test]
    fn a_call_too_large_for_the_router_is_final_with_its_own_reason() {
        let failure = Failure::Call(RequestError::TooLarge {
            size: 20,
            limit: Some(10),
        });
        assert_eq!(classify(&failure), RetryAction::Final);
        assert_eq!(final_reason(&failure), GiveUp::TooLarge);
        assert_eq!(
            final_reason(&wamp_error("com.example.no")),
            GiveUp::Rejected
        );
    }

    #[test]
    fn the_failure_keeps_the_backends_error_uri() {
        let failure = wamp_error("com.example.error.rejected");
        assert!(failure.to_string().contains("com.example.error.rejected"));
    }

    #[test]
    fn redis_outages_are_retried_and_wrong_commands_are_final() {
        let io = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert_eq!(classify(&Failure::Redis(io)), RetryAction::Retry);
        let loading = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading),
            "LOADING",
        ));
        assert_eq!(classify(&Failure::Redis(loading)), RetryAction::Retry);
        let wrongtype = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ExecAbort),
            "WRONGTYPE",
        ));
        assert_eq!(classify(&Failure::Redis(wrongtype)), RetryAction::Final);
        assert_eq!(classify(&Failure::Encode("x".into())), RetryAction::Final);
    }
}
