//! An event bound for exactly one consumer ([`SharedEvent`]), and the shapes
//! it takes on the way out: the payload of the forwarded CALL (optionally with
//! a details kwarg), the JSON envelope pushed to Redis, and the dead-letter
//! record. Pure.

use std::time::SystemTime;

use crate::wamp::codec::Serializer;
use crate::wamp::{Dict, Event, Payload, PublicationId, Value};

/// An event accepted for forwarding.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedEvent {
    /// The SUB_ procedure that will receive it (Redis: the list it goes to).
    pub procedure: String,
    /// The concrete topic it was published to.
    pub topic: String,
    pub publication: PublicationId,
    /// The publisher's session, authid and authrole, when the router
    /// discloses them (Crossbar: `disclose.publisher` on the publisher's role).
    pub publisher: Option<u64>,
    pub publisher_authid: Option<String>,
    pub publisher_authrole: Option<String>,
    pub payload: Payload,
    pub received_at: SystemTime,
}

impl SharedEvent {
    pub fn new(
        procedure: String,
        topic: String,
        event: Event,
        received_at: SystemTime,
    ) -> SharedEvent {
        let details = &event.details;
        SharedEvent {
            procedure,
            topic,
            publication: event.publication,
            publisher: details.get_u64("publisher"),
            publisher_authid: details.get_str("publisher_authid").map(str::to_owned),
            publisher_authrole: details.get_str("publisher_authrole").map(str::to_owned),
            payload: event.payload,
            received_at,
        }
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
        d
    }

    /// The payload of the forwarded CALL: the event's args and kwargs
    /// untouched, plus the details under `details_kwarg` when configured. A
    /// kwarg of that name sent by the publisher is kept (never overwritten).
    pub fn call_payload(&self, details_kwarg: Option<&str>) -> Payload {
        let mut payload = self.payload.clone();
        if let Some(key) = details_kwarg
            && payload.kwargs.get(key).is_none()
        {
            payload.kwargs.insert(key, self.details());
        }
        payload
    }

    /// The envelope pushed to Redis, as a dict (see [`SharedEvent::envelope_json`]).
    pub fn envelope(&self) -> Dict {
        let opt_u64 = |v: Option<u64>| v.map(Value::UInt).unwrap_or(Value::Null);
        let opt_str = |v: &Option<String>| v.as_deref().map(Value::from).unwrap_or(Value::Null);
        Dict::with_capacity(9)
            .with("procedure", self.procedure.as_str())
            .with("topic", self.topic.as_str())
            .with("args", Value::List(self.payload.args.clone()))
            .with("kwargs", Value::Dict(self.payload.kwargs.clone()))
            .with("publication", self.publication.0)
            .with("publisher", opt_u64(self.publisher))
            .with("publisher_authid", opt_str(&self.publisher_authid))
            .with("publisher_authrole", opt_str(&self.publisher_authrole))
            .with("received_at", rfc3339(self.received_at))
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
    fn undisclosed_publisher_is_null_in_the_envelope() {
        let json: serde_json::Value =
            serde_json::from_slice(&shared(Dict::new()).envelope_json()).unwrap();
        assert_eq!(json["publisher"], serde_json::Value::Null);
        assert_eq!(json["publisher_authid"], serde_json::Value::Null);
    }

    #[test]
    fn details_kwarg_is_added_only_when_configured_and_never_overwrites() {
        let ev = shared(Dict::new().with("publisher_authid", "backend"));
        assert_eq!(ev.call_payload(None), ev.payload, "untouched by default");
        let with = ev.call_payload(Some("_details"));
        let details = with
            .kwargs
            .get("_details")
            .and_then(Value::as_dict)
            .unwrap();
        assert_eq!(details.get_str("topic"), Some("com.example.status"));
        assert_eq!(details.get_u64("publication"), Some(6358646022012579));
        assert_eq!(details.get_str("publisher_authid"), Some("backend"));
        assert_eq!(with.args, ev.payload.args);
        let kept = ev.call_payload(Some("seq"));
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
}
