//! WAMP mode: one CALL per event to its SUB_ procedure, made on the event
//! loop's own session; the router's shared registration picks the backend,
//! and the RESULT (or ERROR) comes back as the session's reply to the request
//! tagged with the delivery. A batch procedure's delivery is one CALL whose
//! positional arguments are its events (see [`crate::wamp::batch`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Report, Sink, Started};
use crate::forward::envelope::{EventPayload, Outgoing, SharedEvent};
use crate::forward::policy::Policy;
use crate::forward::{DeliveryId, Dispatch, Failure, Job};
use crate::wamp::batch::{BatchWriter, Parts};
use crate::wamp::session::Session;
use crate::wamp::{Dict, RequestError, Serializer};

pub struct WampSink {
    pub call_timeout: Duration,
    /// The kwarg that carries the event's details, if configured.
    pub details_kwarg: Option<Arc<str>>,
}

impl<T: From<DeliveryId>> Sink<T> for WampSink {
    fn prepare(&self, event: &SharedEvent, policy: Option<&Policy>) -> Outgoing {
        let details_kwarg = match policy {
            Some(policy) => &policy.details_kwarg,
            None => &self.details_kwarg,
        };
        match (details_kwarg, &event.payload) {
            // The hot path: the payload goes out as it came in, undecoded.
            (None, _) => Outgoing::AsReceived,
            (Some(kwarg), _) => match event.call_payload(Some(kwarg)) {
                Ok(payload) => Outgoing::Call(payload),
                Err(e) => Outgoing::Broken(e.to_string()),
            },
        }
    }

    fn dispatch(&self) -> Dispatch {
        Dispatch::Each
    }

    fn needs_session(&self) -> bool {
        true
    }

    fn start(
        &mut self,
        id: DeliveryId,
        jobs: &[Job<Box<SharedEvent>>],
        session: Option<&mut Session<T>>,
        now: Instant,
    ) -> Started {
        // The core opens a call sink only while joined.
        let Some(session) = session else {
            let not_joined = Failure::Call(RequestError::NotJoined);
            return Started::Done(Report::All(Err(not_joined)));
        };
        let call_timeout = match jobs.first().and_then(|j| j.policy.as_deref()) {
            Some(policy) => policy.call_timeout,
            None => self.call_timeout,
        };
        let deadline = Some(now + call_timeout);
        let job = match jobs {
            [first, ..] if first.batch.is_some() => {
                let procedure = first.item.procedure.clone();
                let payload = self.batch(jobs);
                session.call_raw(procedure, Dict::new(), payload, id.into(), deadline);
                session.ignore_last_result();
                return Started::OnSession;
            }
            [job] => job,
            _ => {
                let e = format!(
                    "{} events in one call to a procedure without batches",
                    jobs.len()
                );
                return Started::Done(Report::All(Err(Failure::Encode(e))));
            }
        };
        let event = &job.item;
        let procedure = &*event.procedure;
        match (&event.outgoing, &event.payload) {
            (Outgoing::AsReceived, EventPayload::Raw(raw)) => {
                session.call_raw(procedure, Dict::new(), raw.clone(), id.into(), deadline)
            }
            (Outgoing::AsReceived, EventPayload::Decoded(payload)) => {
                session.call(procedure, Dict::new(), payload.clone(), id.into(), deadline)
            }
            (Outgoing::Call(payload), _) => {
                session.call(procedure, Dict::new(), payload.clone(), id.into(), deadline)
            }
            (Outgoing::Broken(e), _) => {
                return Started::Done(Report::All(Err(Failure::Encode(e.clone()))));
            }
            (Outgoing::Envelope(_), _) => {
                let e = "a Redis envelope cannot be called".to_owned();
                return Started::Done(Report::All(Err(Failure::Encode(e))));
            }
        }
        // Only whether the call succeeded matters, not what it returned.
        session.ignore_last_result();
        Started::OnSession
    }
}

impl WampSink {
    /// A batch call's arguments: each event a dict, in order, written in the
    /// serializer its first event arrived in (the session's), so that the
    /// events' args and kwargs are copied in undecoded.
    fn batch(&self, jobs: &[Job<Box<SharedEvent>>]) -> crate::wamp::RawPayload {
        let serializer = jobs
            .iter()
            .find_map(|j| match j.item.batch_parts() {
                Parts::Raw(raw) => Some(raw.serializer()),
                Parts::Decoded(_) => None,
            })
            .unwrap_or(Serializer::MsgPack);
        let bytes = jobs
            .iter()
            .map(|j| j.batch.map_or(0, |b| b.bytes as usize))
            .sum();
        let mut writer = BatchWriter::new(serializer, jobs.len(), bytes);
        let details_kwarg = match jobs.first().and_then(|j| j.policy.as_deref()) {
            Some(policy) => policy.details_kwarg.as_deref(),
            None => self.details_kwarg.as_deref(),
        };
        for job in jobs {
            let event = &job.item;
            let details = details_kwarg.map(|kwarg| (kwarg, event.details()));
            writer.push(
                event.batch_parts(),
                &event.topic,
                event.publication.0,
                details,
            );
        }
        writer.finish()
    }
}
