//! WAMP mode: one CALL per event to its SUB_ procedure; the router's shared
//! registration picks the backend, the RESULT is the acknowledgement.

use std::time::Duration;

use crate::forward::envelope::{EventPayload, SharedEvent};
use crate::forward::queue::Attempt;
use crate::forward::retry::{RetryAction, classify_wamp_error};
use crate::wamp::{Client, Dict, RequestError};

/// Makes one delivery attempt.
pub async fn deliver(
    client: &Client,
    event: &SharedEvent,
    details_kwarg: Option<&str>,
    timeout: Duration,
) -> Attempt {
    let procedure = &event.procedure;
    let result = match (&event.payload, details_kwarg) {
        // The hot path: the payload goes out as it came in, undecoded.
        (EventPayload::Raw(raw), None) => {
            client
                .call_raw(procedure, raw.clone(), Dict::new(), Some(timeout))
                .await
        }
        _ => match event.call_payload(details_kwarg) {
            Ok(payload) => {
                client
                    .call(procedure, payload, Dict::new(), Some(timeout))
                    .await
            }
            // Cannot happen for a payload checked on arrival; final rather
            // than retried forever if it somehow does.
            Err(e) => {
                return Attempt::Failed {
                    action: RetryAction::Final,
                    error: format!("event payload cannot be decoded: {e}"),
                };
            }
        },
    };
    outcome(result.map(drop))
}

/// Classifies a call's outcome: only an application error from the backend
/// is final; everything that says "not delivered (yet)" is retried.
pub fn outcome(result: Result<(), RequestError>) -> Attempt {
    match result {
        Ok(()) => Attempt::Delivered,
        Err(RequestError::Wamp(e)) => Attempt::Failed {
            action: classify_wamp_error(&e.error),
            error: e.to_string(),
        },
        Err(
            e @ (RequestError::Timeout | RequestError::ConnectionLost | RequestError::NotJoined),
        ) => Attempt::Failed {
            action: RetryAction::Retry,
            error: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wamp::{Payload, WampError};

    fn wamp_error(uri: &str) -> RequestError {
        RequestError::Wamp(WampError {
            error: uri.into(),
            details: Dict::new(),
            payload: Payload::default(),
        })
    }

    #[test]
    fn lost_connections_and_timeouts_are_retried() {
        for e in [
            RequestError::Timeout,
            RequestError::ConnectionLost,
            RequestError::NotJoined,
        ] {
            assert!(matches!(
                outcome(Err(e)),
                Attempt::Failed {
                    action: RetryAction::Retry,
                    ..
                }
            ));
        }
    }

    #[test]
    fn backend_application_errors_are_final_and_keep_the_uri() {
        let Attempt::Failed { action, error } =
            outcome(Err(wamp_error("com.example.error.rejected")))
        else {
            panic!()
        };
        assert_eq!(action, RetryAction::Final);
        assert!(error.contains("com.example.error.rejected"));
        assert!(matches!(
            outcome(Err(wamp_error("wamp.error.no_such_procedure"))),
            Attempt::Failed {
                action: RetryAction::Retry,
                ..
            }
        ));
    }
}
