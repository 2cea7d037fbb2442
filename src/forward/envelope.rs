//! An event bound for exactly one consumer ([`SharedEvent`]), and the shapes
//! it takes on the way out: the payload of the forwarded CALL (optionally with
//! a details kwarg), the JSON envelope pushed to Redis, and the dead-letter
//! record. The shape a sink sends is built once, when the event is accepted
//! ([`Outgoing`]), not at every attempt. Pure.

use std::sync::Arc;
use std::time::SystemTime;

use std::borrow::Cow;

use crate::wamp::batch::Parts;
use crate::wamp::codec::{DecodeError, Serializer};
use crate::wamp::{Dict, Event, Payload, PublicationId, RawEvent, RawPayload, Value};

/// An event's args and kwargs: decoded, or kept as received so that they
/// are passed on without being decoded (see `wamp::raw`).
#[derive(Debug, Clone, PartialEq)]
pub enum EventPayload {
    Decoded(Payload),
    Raw(RawPayload),
}

impl EventPayload {
    /// The payload decoded. A raw payload was validated when it was
    /// received, so decoding it again does not fail in practice.
    pub fn decoded(&self) -> Result<Cow<'_, Payload>, DecodeError> {
        match self {
            EventPayload::Decoded(p) => Ok(Cow::Borrowed(p)),
            EventPayload::Raw(raw) => raw.decode().map(Cow::Owned),
        }
    }
}

/// What a sink sends for an event, built once when it is accepted.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Outgoing {
    /// The event's payload as it is (a CALL with the args and kwargs as
    /// received, undecoded when they are raw).
    #[default]
    AsReceived,
    /// A CALL payload: the event's with the details kwarg added.
    Call(Payload),
    /// The JSON envelope pushed to Redis.
    Envelope(Vec<u8>),
    /// The event cannot be put in the sink's form (cannot happen for a
    /// payload validated on arrival); its delivery fails as final.
    Broken(String),
}

/// An event accepted for forwarding.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedEvent {
    /// The SUB_ procedure that will receive it (Redis: the list it goes to).
    /// Shared with discovery's routes: an event costs no copy of it.
    pub procedure: Arc<str>,
    /// The concrete topic it was published to.
    pub topic: String,
    pub publication: PublicationId,
    /// The publisher's session, authid and authrole, when the router
    /// discloses them (Crossbar: `disclose.publisher` on the publisher's role).
    pub publisher: Option<u64>,
    pub publisher_authid: Option<String>,
    pub publisher_authrole: Option<String>,
    pub payload: EventPayload,
    pub received_at: SystemTime,
    /// What the sink sends (see [`Outgoing`]).
    pub outgoing: Outgoing,
    /// Where it waits in the Redis queue, when it was read back from there.
    pub entry: Option<Entry>,
    /// With the Redis queue and per-key ordering: the partition of its
    /// procedure its key falls in (the stream it is admitted to).
    pub lane: Option<u16>,
    /// Put back by `subtocall replay`: delivered once already. Said in its
    /// details (`replayed: true`) and in its envelope.
    pub replayed: bool,
    /// With `SUBTOCALL_RETENTION`: the event's copy for its topic's
    /// retained stream is this one's (the first group of its topic): kept
    /// there by whichever instance admits it.
    pub retain: bool,
}

/// A Redis queue entry: its stream and id, and how often it was handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: crate::streams::core::Key,
    /// The stream's delivery count when this instance got the entry.
    pub deliveries: u32,
}

impl SharedEvent {
    pub fn new(
        procedure: Arc<str>,
        topic: String,
        event: Event,
        received_at: SystemTime,
    ) -> SharedEvent {
        Self::with_payload(
            procedure,
            topic,
            event.publication,
            &event.details,
            EventPayload::Decoded(event.payload),
            received_at,
        )
    }

    /// An event whose payload stays as received.
    pub fn from_raw(
        procedure: Arc<str>,
        topic: String,
        event: RawEvent,
        received_at: SystemTime,
    ) -> SharedEvent {
        Self::with_payload(
            procedure,
            topic,
            event.publication,
            &event.details,
            EventPayload::Raw(event.payload),
            received_at,
        )
    }

    fn with_payload(
        procedure: Arc<str>,
        topic: String,
        publication: PublicationId,
        details: &Dict,
        payload: EventPayload,
        received_at: SystemTime,
    ) -> SharedEvent {
        SharedEvent {
            procedure,
            topic,
            publication,
            publisher: details.get_u64("publisher"),
            publisher_authid: details.get_str("publisher_authid").map(str::to_owned),
            publisher_authrole: details.get_str("publisher_authrole").map(str::to_owned),
            payload,
            received_at,
            outgoing: Outgoing::AsReceived,
            entry: None,
            lane: None,
            replayed: false,
            retain: false,
        }
    }

    /// An event read back from its JSON envelope (the Redis queue stores
    /// events that way): the inverse of [`SharedEvent::envelope_json`].
    pub fn from_envelope(json: &[u8]) -> Result<SharedEvent, String> {
        let value = Serializer::Json
            .decode_value(json)
            .map_err(|e| format!("not a JSON envelope: {e}"))?;
        let Value::Dict(mut d) = value else {
            return Err("the envelope is not a JSON object".into());
        };
        let text = |d: &Dict, key: &str| {
            d.get_str(key)
                .map(str::to_owned)
                .ok_or_else(|| format!("the envelope has no {key}"))
        };
        let procedure = text(&d, "procedure")?;
        let topic = text(&d, "topic")?;
        let publication = d
            .get_u64("publication")
            .map(PublicationId)
            .ok_or("the envelope has no publication")?;
        let received_at = d
            .get_str("received_at")
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .unwrap_or_else(SystemTime::now);
        let args = match d.remove("args") {
            Some(Value::List(args)) => args,
            Some(Value::Null) | None => Vec::new(),
            Some(_) => return Err("the envelope's args are not a list".into()),
        };
        let kwargs = match d.remove("kwargs") {
            Some(Value::Dict(kwargs)) => kwargs,
            Some(Value::Null) | None => Dict::new(),
            Some(_) => return Err("the envelope's kwargs are not an object".into()),
        };
        // The envelope names the publisher as EVENT details do.
        Ok(Self::with_payload(
            procedure.into(),
            topic,
            publication,
            &d,
            EventPayload::Decoded(Payload::new(args, kwargs)),
            received_at,
        ))
    }

    /// The event's details as a dict: topic, publication and whatever the
    /// router disclosed about the publisher.
    pub fn details(&self) -> Dict {
        let mut d = Dict::with_capacity(5)
            .with("topic", self.topic.as_str())
            .with("publication", self.publication.0);
        if let Some(p) = self.publisher {
            d.insert("publisher", p);
        }
        if let Some(a) = &self.publisher_authid {
            d.insert("publisher_authid", a.as_str());
        }
        if let Some(r) = &self.publisher_authrole {
            d.insert("publisher_authrole", r.as_str());
        }
        if self.replayed {
            d.insert("replayed", true);
        }
        d
    }

    /// The event's size in a batch call: its payload as received and its
    /// topic, plus what the dict's keys take.
    pub fn batch_size(&self) -> u32 {
        let payload = match &self.payload {
            EventPayload::Raw(raw) => raw.parts().0.len(),
            // Rare (payloads the pass-through does not take): measured by
            // encoding them once.
            EventPayload::Decoded(p) => RawPayload::from_payload(p).parts().0.len(),
        };
        u32::try_from(payload + self.topic.len() + 40).unwrap_or(u32::MAX)
    }

    /// The event's args and kwargs for a batch call.
    pub fn batch_parts(&self) -> Parts<'_> {
        match &self.payload {
            EventPayload::Raw(raw) => Parts::Raw(raw),
            EventPayload::Decoded(p) => Parts::Decoded(p),
        }
    }

    /// The payload of the forwarded CALL: the event's args and kwargs
    /// untouched, plus the details under `details_kwarg` when configured. A
    /// kwarg of that name sent by the publisher is kept (never overwritten).
    pub fn call_payload(&self, details_kwarg: Option<&str>) -> Result<Payload, DecodeError> {
        let mut payload = self.payload.decoded()?.into_owned();
        if let Some(key) = details_kwarg
            && payload.kwargs.get(key).is_none()
        {
            payload.kwargs.insert(key, self.details());
        }
        Ok(payload)
    }

    /// The envelope pushed to Redis, as a dict (see [`SharedEvent::envelope_json`]).
    pub fn envelope(&self) -> Dict {
        let opt_u64 = |v: Option<u64>| v.map(Value::UInt).unwrap_or(Value::Null);
        let opt_str = |v: &Option<String>| v.as_deref().map(Value::from).unwrap_or(Value::Null);
        // A raw payload that no longer decodes cannot happen (it was checked
        // on arrival); if it did, the record says so instead of inventing args.
        // A raw payload is decoded into a tree of its own: moved, not
        // cloned again.
        let (args, kwargs, error) = match self.payload.decoded() {
            Ok(p) => {
                let p = p.into_owned();
                (Value::List(p.args), Value::Dict(p.kwargs), None)
            }
            Err(e) => (Value::Null, Value::Null, Some(e.to_string())),
        };
        let mut envelope = Dict::with_capacity(9)
            .with("procedure", &*self.procedure)
            .with("topic", self.topic.as_str())
            .with("args", args)
            .with("kwargs", kwargs)
            .with("publication", self.publication.0)
            .with("publisher", opt_u64(self.publisher))
            .with("publisher_authid", opt_str(&self.publisher_authid))
            .with("publisher_authrole", opt_str(&self.publisher_authrole))
            .with("received_at", rfc3339(self.received_at));
        if let Some(e) = error {
            envelope.insert("payload_error", e);
        }
        if self.replayed {
            envelope.insert("replayed", true);
        }
        envelope
    }

    /// The envelope as JSON text; bytes use WAMP's JSON convention
    /// (`"\u0000"` + base64), so consumers decode it like a WAMP JSON payload.
    pub fn envelope_json(&self) -> Vec<u8> {
        Serializer::Json.encode_value(&Value::Dict(self.envelope()))
    }

    /// The dead-letter record: the envelope plus why and when it was given up.
    pub fn dead_letter_json(
        &self,
        reason: &str,
        attempts: u32,
        last_error: Option<&str>,
        at: SystemTime,
    ) -> Vec<u8> {
        let record = self
            .envelope()
            .with("reason", reason)
            .with("attempts", u64::from(attempts))
            .with(
                "last_error",
                last_error.map(Value::from).unwrap_or(Value::Null),
            )
            .with("dead_lettered_at", rfc3339(at));
        Serializer::Json.encode_value(&Value::Dict(record))
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::wamp::SubscriptionId;

    fn event(details: Dict) -> Event {
        Event {
            subscription: SubscriptionId(1),
            publication: PublicationId(6358646022012579),
            details,
            payload: Payload::new(
                vec![0u64.into(), Value::Bytes(vec![0, 1, 255])],
                Dict::new().with("seq", 0u64),
            ),
        }
    }

    fn shared(details: Dict) -> SharedEvent {
        SharedEvent::new(
            "com.example.SUB_status".into(),
            "com.example.status".into(),
            event(details),
            UNIX_EPOCH + Duration::from_millis(1_795_000_000_123),
        )
    }

    #[test]
    fn envelope_has_the_documented_fields_and_wamp_json_bytes() {
        let ev = shared(
            Dict::new()
                .with("publisher", 5546838114206924u64)
                .with("publisher_authid", "backend")
                .with("publisher_authrole", "backend"),
        );
        let json: serde_json::Value = serde_json::from_slice(&ev.envelope_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "procedure": "com.example.SUB_status",
                "topic": "com.example.status",
                "args": [0, "\u{0}AAH/"],
                "kwargs": {"seq": 0},
                "publication": 6358646022012579u64,
                "publisher": 5546838114206924u64,
                "publisher_authid": "backend",
                "publisher_authrole": "backend",
                "received_at": "2026-11-18T11:06:40.123Z",
            })
        );
    }

    #[test]
    fn an_envelope_reads_back_as_the_same_event() {
        let ev = shared(
            Dict::new()
                .with("publisher", 5546838114206924u64)
                .with("publisher_authid", "backend"),
        );
        let back = SharedEvent::from_envelope(&ev.envelope_json()).unwrap();
        assert_eq!(back.envelope_json(), ev.envelope_json());
        assert_eq!(
            back.call_payload(None).unwrap(),
            ev.call_payload(None).unwrap()
        );
        assert!(SharedEvent::from_envelope(b"[1]").is_err());
        assert!(SharedEvent::from_envelope(br#"{"procedure":"p"}"#).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// The Redis queue stores events as envelopes: whatever the args
        /// and kwargs, the event read back makes the same CALL payload.
        #[test]
        fn any_payload_survives_the_queue(
            args in proptest::collection::vec(crate::wamp::codec::tests::properties::value(), 0..4),
            kwargs in proptest::collection::vec(("[a-z_]{1,8}", crate::wamp::codec::tests::properties::value()), 0..4),
        ) {
            let mut ev = shared(Dict::new());
            ev.payload = EventPayload::Decoded(Payload::new(args, kwargs.into_iter().collect()));
            let back = SharedEvent::from_envelope(&ev.envelope_json()).unwrap();
            proptest::prop_assert_eq!(back.call_payload(None).unwrap(), ev.call_payload(None).unwrap());
            proptest::prop_assert_eq!(back.envelope_json(), ev.envelope_json());
        }
    }

    #[test]
    fn undisclosed_publisher_is_null_in_the_envelope() {
        let json: serde_json::Value =
            serde_json::from_slice(&shared(Dict::new()).envelope_json()).unwrap();
        assert_eq!(json["publisher"], serde_json::Value::Null);
        assert_eq!(json["publisher_authid"], serde_json::Value::Null);
    }

    #[test]
    fn a_replayed_event_says_so_in_its_details_and_its_envelope_and_only_then() {
        let mut ev = shared(Dict::new());
        let json = |ev: &SharedEvent| {
            serde_json::from_slice::<serde_json::Value>(&ev.envelope_json()).unwrap()
        };
        assert_eq!(ev.details().get("replayed"), None);
        assert_eq!(json(&ev).get("replayed"), None);
        ev.replayed = true;
        assert_eq!(ev.details().get("replayed"), Some(&Value::Bool(true)));
        assert_eq!(json(&ev)["replayed"], serde_json::Value::Bool(true));
        // Stored with the entry's `r` field, read back replayed.
        let stored = crate::streams::entry::encode(&ev);
        let fields = vec![
            (
                bytes::Bytes::from_static(b"e"),
                bytes::Bytes::from(stored.clone()),
            ),
            (
                bytes::Bytes::from_static(b"r"),
                bytes::Bytes::from_static(b"1"),
            ),
        ];
        let back = crate::streams::entry::read("com.example.SUB_status", fields).unwrap();
        assert!(back.replayed);
        let plain = vec![(bytes::Bytes::from_static(b"e"), bytes::Bytes::from(stored))];
        assert!(
            !crate::streams::entry::read("com.example.SUB_status", plain)
                .unwrap()
                .replayed
        );
    }

    #[test]
    fn details_kwarg_is_added_only_when_configured_and_never_overwrites() {
        let ev = shared(Dict::new().with("publisher_authid", "backend"));
        let EventPayload::Decoded(payload) = &ev.payload else {
            panic!()
        };
        assert_eq!(
            &ev.call_payload(None).unwrap(),
            payload,
            "untouched by default"
        );
        let with = ev.call_payload(Some("_details")).unwrap();
        let details = with
            .kwargs
            .get("_details")
            .and_then(Value::as_dict)
            .unwrap();
        assert_eq!(details.get_str("topic"), Some("com.example.status"));
        assert_eq!(details.get_u64("publication"), Some(6358646022012579));
        assert_eq!(details.get_str("publisher_authid"), Some("backend"));
        assert_eq!(with.args, payload.args);
        let kept = ev.call_payload(Some("seq")).unwrap();
        assert_eq!(
            kept.kwargs.get_u64("seq"),
            Some(0),
            "publisher's kwarg wins"
        );
    }

    #[test]
    fn dead_letter_record_says_why() {
        let ev = shared(Dict::new());
        let json: serde_json::Value = serde_json::from_slice(&ev.dead_letter_json(
            "exhausted",
            50,
            Some("wamp.error.no_such_procedure"),
            UNIX_EPOCH,
        ))
        .unwrap();
        assert_eq!(json["reason"], "exhausted");
        assert_eq!(json["attempts"], 50);
        assert_eq!(json["last_error"], "wamp.error.no_such_procedure");
        assert_eq!(json["dead_lettered_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(json["procedure"], "com.example.SUB_status");
    }

    #[test]
    fn a_raw_payload_makes_the_same_envelope_and_call_payload_as_a_decoded_one() {
        use crate::wamp::raw;
        use crate::wamp::{Message, SubscriptionId};
        let details = Dict::new().with("publisher_authid", "backend");
        let decoded = shared(details.clone());
        for ser in Serializer::ALL {
            let frame = ser.encode(&Message::Event(event(details.clone()))).unwrap();
            let raw_event = raw::decode_event(ser, &frame).unwrap();
            assert_eq!(raw_event.subscription, SubscriptionId(1));
            let raw = SharedEvent::from_raw(
                decoded.procedure.clone(),
                decoded.topic.clone(),
                raw_event,
                decoded.received_at,
            );
            assert_eq!(raw.envelope_json(), decoded.envelope_json(), "{ser}");
            assert_eq!(
                raw.call_payload(Some("_details")).unwrap(),
                decoded.call_payload(Some("_details")).unwrap()
            );
        }
    }
}
