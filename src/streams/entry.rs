//! How an event is stored in a queue stream: its payload as received (the
//! wire bytes of args and kwargs, and their serializer), so that it is
//! neither encoded nor decoded on its way through Redis; a CALL splices the
//! bytes in as the memory queue does (transcoding only when the reading
//! session speaks the other serializer). Entries with an `event` field (a
//! JSON envelope, as `dead-letters redrive` writes) are read too.
//!
//! Fields: `publication`, `topic`, `at` (received, ms since the epoch),
//! `ser` (`json` or `msgpack`), `payload` (the bytes), `args` and `kwargs`
//! (`start-end` within `payload`, absent when the event has none), and
//! `publisher`, `publisher_authid`, `publisher_authrole` when disclosed.

use std::ops::Range;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;

use crate::forward::envelope::{EventPayload, SharedEvent};
use crate::wamp::raw::RawPayload;
use crate::wamp::{PublicationId, Serializer};

/// The entry's fields for `event`, in order, for an XADD (or the arguments
/// of the admission script).
pub fn fields(event: &SharedEvent) -> Vec<(&'static str, Vec<u8>)> {
    let owned;
    let raw = match &event.payload {
        EventPayload::Raw(raw) => raw,
        EventPayload::Decoded(payload) => {
            owned = RawPayload::from_payload(payload);
            &owned
        }
    };
    let (bytes, args, kwargs) = raw.parts();
    let at = event
        .received_at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let ser: &[u8] = match raw.serializer() {
        Serializer::Json => b"json",
        Serializer::MsgPack => b"msgpack",
    };
    let mut f = Vec::with_capacity(10);
    f.push(("publication", event.publication.0.to_string().into_bytes()));
    f.push(("topic", event.topic.as_bytes().to_vec()));
    f.push(("at", at.to_string().into_bytes()));
    f.push(("ser", ser.to_vec()));
    f.push(("payload", bytes.to_vec()));
    if let Some(r) = args {
        f.push(("args", format!("{}-{}", r.start, r.end).into_bytes()));
    }
    if let Some(r) = kwargs {
        f.push(("kwargs", format!("{}-{}", r.start, r.end).into_bytes()));
    }
    if let Some(p) = event.publisher {
        f.push(("publisher", p.to_string().into_bytes()));
    }
    if let Some(a) = &event.publisher_authid {
        f.push(("publisher_authid", a.as_bytes().to_vec()));
    }
    if let Some(r) = &event.publisher_authrole {
        f.push(("publisher_authrole", r.as_bytes().to_vec()));
    }
    f
}

/// The event stored in an entry of `procedure`'s stream.
pub fn read(procedure: &str, fields: Vec<(Vec<u8>, Vec<u8>)>) -> Result<SharedEvent, String> {
    let mut f = Fields(fields);
    if let Some(json) = f.take("event") {
        return SharedEvent::from_envelope(&json);
    }
    let text = |v: Vec<u8>| String::from_utf8(v).map_err(|_| "a field is not UTF-8".to_owned());
    let number = |name: &str, v: Option<Vec<u8>>| -> Result<u64, String> {
        v.and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
            .ok_or_else(|| format!("the entry has no valid {name}"))
    };
    let range = |name: &str, v: Option<Vec<u8>>| -> Result<Option<Range<usize>>, String> {
        let Some(v) = v else { return Ok(None) };
        std::str::from_utf8(&v)
            .ok()
            .and_then(|s| s.split_once('-'))
            .and_then(|(a, b)| Some(a.parse().ok()?..b.parse().ok()?))
            .map(Some)
            .ok_or_else(|| format!("the entry's {name} is not start-end"))
    };
    let publication = PublicationId(number("publication", f.take("publication"))?);
    let topic = text(f.take("topic").ok_or("the entry has no topic")?)?;
    let at = number("at", f.take("at"))?;
    let serializer = match f.take("ser").as_deref() {
        Some(b"json") => Serializer::Json,
        Some(b"msgpack") => Serializer::MsgPack,
        _ => return Err("the entry has no valid ser".into()),
    };
    let payload = Bytes::from(f.take("payload").ok_or("the entry has no payload")?);
    let args = range("args", f.take("args"))?;
    let kwargs = range("kwargs", f.take("kwargs"))?;
    let raw = RawPayload::from_parts(serializer, payload, args, kwargs)?;
    let publisher = match f.take("publisher") {
        Some(v) => Some(number("publisher", Some(v))?),
        None => None,
    };
    Ok(SharedEvent {
        procedure: procedure.to_owned(),
        topic,
        publication,
        publisher,
        publisher_authid: f.take("publisher_authid").map(text).transpose()?,
        publisher_authrole: f.take("publisher_authrole").map(text).transpose()?,
        payload: EventPayload::Raw(raw),
        received_at: UNIX_EPOCH + Duration::from_millis(at),
        outgoing: Default::default(),
        entry: None,
    })
}

/// Whether an entry has the fields of an event (in either form); one that
/// does not is shown as it is in its dead-letter record.
pub fn looks_like_an_event(fields: &[(Vec<u8>, Vec<u8>)]) -> bool {
    fields
        .iter()
        .any(|(k, _)| k.as_slice() == b"event" || k.as_slice() == b"payload")
}

struct Fields(Vec<(Vec<u8>, Vec<u8>)>);

impl Fields {
    fn take(&mut self, name: &str) -> Option<Vec<u8>> {
        let at = self.0.iter().position(|(k, _)| k == name.as_bytes())?;
        Some(std::mem::take(&mut self.0[at].1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wamp::{Dict, Message, Payload, SubscriptionId, Value, raw};

    fn fields_of(ev: &SharedEvent) -> Vec<(Vec<u8>, Vec<u8>)> {
        fields(ev)
            .into_iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v))
            .collect()
    }

    fn event_payload() -> Payload {
        Payload::new(
            vec![
                Value::UInt(7),
                Value::Bytes(vec![0, 1, 255]),
                Value::from("x"),
            ],
            Dict::new().with("seq", 3u64),
        )
    }

    #[test]
    fn raw_and_decoded_events_read_back_with_the_same_payload() {
        for ser in Serializer::ALL {
            let frame = ser
                .encode(&Message::Event(crate::wamp::Event {
                    subscription: SubscriptionId(1),
                    publication: PublicationId(42),
                    details: Dict::new().with("publisher_authid", "pub"),
                    payload: event_payload(),
                }))
                .unwrap();
            let raw_event = raw::decode_event(ser, &frame).unwrap();
            let ev = SharedEvent::from_raw(
                "p.SUB_x".into(),
                "p.x".into(),
                raw_event,
                UNIX_EPOCH + Duration::from_millis(1234),
            );
            let back = read("p.SUB_x", fields_of(&ev)).unwrap();
            assert_eq!(back.call_payload(None).unwrap(), event_payload(), "{ser}");
            assert_eq!(back.publication, PublicationId(42));
            assert_eq!(back.topic, "p.x");
            assert_eq!(back.publisher_authid.as_deref(), Some("pub"));
            assert_eq!(back.received_at, UNIX_EPOCH + Duration::from_millis(1234));
            assert!(matches!(back.payload, EventPayload::Raw(_)), "stays raw");
        }
        let mut decoded = SharedEvent::from_envelope(&{
            let mut e = SharedEvent::from_envelope(
                br#"{"procedure":"p.SUB_x","topic":"p.x","publication":1,"args":[],"kwargs":{}}"#,
            )
            .unwrap();
            e.payload = EventPayload::Decoded(event_payload());
            e.envelope_json()
        })
        .unwrap();
        decoded.payload = EventPayload::Decoded(event_payload());
        let back = read("p.SUB_x", fields_of(&decoded)).unwrap();
        assert_eq!(back.call_payload(None).unwrap(), event_payload());
    }

    #[test]
    fn malformed_entries_are_refused_not_spliced() {
        let good = |payload: &[u8], args: &str, kwargs: Option<&str>, ser: &str| {
            let mut f = vec![
                (b"publication".to_vec(), b"1".to_vec()),
                (b"topic".to_vec(), b"t".to_vec()),
                (b"at".to_vec(), b"0".to_vec()),
                (b"ser".to_vec(), ser.as_bytes().to_vec()),
                (b"payload".to_vec(), payload.to_vec()),
                (b"args".to_vec(), args.as_bytes().to_vec()),
            ];
            if let Some(k) = kwargs {
                f.push((b"kwargs".to_vec(), k.as_bytes().to_vec()));
            }
            read("p", f)
        };
        assert!(good(b"[1,2]", "0-5", None, "json").is_ok());
        assert!(good(br#"[1],{"a":1}"#, "0-3", Some("4-11"), "json").is_ok());
        assert!(good(b"[1,2", "0-4", None, "json").is_err(), "truncated");
        assert!(good(b"{}", "0-2", None, "json").is_err(), "args not a list");
        assert!(
            good(b"[1]x", "0-3", None, "json").is_err(),
            "trailing bytes"
        );
        assert!(good(b"[1]", "0-9", None, "json").is_err(), "out of bounds");
        assert!(good(b"[1]", "2-1", None, "json").is_err(), "backwards");
        assert!(good(&[0x91, 0x01], "0-2", None, "msgpack").is_ok());
        assert!(
            good(&[0x92, 0x01], "0-2", None, "msgpack").is_err(),
            "truncated"
        );
        assert!(good(&[0x91, 0x01], "0-2", None, "cbor").is_err());
        assert!(read("p", vec![]).is_err());
    }
}
