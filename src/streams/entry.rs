//! How an event is stored in a queue stream: its payload as received (the
//! wire bytes of args and kwargs, and their serializer), so that it is
//! neither encoded nor decoded on its way through Redis; a CALL splices the
//! bytes in as the memory queue does (transcoding only when the reading
//! session speaks the other serializer). Entries with an `event` field (a
//! JSON envelope, as `dead-letters redrive` writes) are read too.
//!
//! One field, `e`, holds the whole event in a small binary layout (one
//! field rather than one per attribute: each field is a string Redis and
//! both ends must handle, and that was most of the cost per event). All
//! integers little-endian:
//!
//! | bytes | what |
//! |---|---|
//! | 1 | format version: 1, or 2 when a string is 65,535 bytes or longer |
//! | 1 | serializer of the payload: 0 JSON, 1 MessagePack |
//! | 8 | publication id |
//! | 8 | received, milliseconds since the Unix epoch |
//! | 8 | publisher session id, `u64::MAX` when not disclosed |
//! | 4 + 4 | args end, kwargs start within the payload (`u32::MAX`: none) |
//! | 2 + n | topic (UTF-8) |
//! | 2 + n | publisher authid, length `u16::MAX` when not disclosed |
//! | 2 + n | publisher authrole, likewise |
//! | rest | the payload's wire bytes |
//!
//! Version 2 is version 1 with each string's length in 4 bytes (`u32::MAX`
//! when absent). It is written only for an event with a string too long
//! for 2 bytes, so that entries stay readable by builds that know
//! version 1 alone (a rolling upgrade), as far as they can be.

use std::ops::Range;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;

use crate::forward::envelope::{EventPayload, SharedEvent};
use crate::wamp::raw::RawPayload;
use crate::wamp::{PublicationId, Serializer};

/// The stream field that holds an event.
pub const FIELD: &str = "e";
/// A second field, `r`, present (with any value) on an entry `subtocall
/// replay` put back: the event was delivered once already.
pub const REPLAYED: &[u8] = b"r";
const VERSION: u8 = 1;
/// [`VERSION`] with 4-byte string lengths.
const VERSION_LONG: u8 = 2;
const NONE32: u32 = u32::MAX;
const NONE16: u16 = u16::MAX;

/// The stored form of `event` (the value of [`FIELD`]).
pub fn encode(event: &SharedEvent) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(event, &mut out);
    out
}

/// [`encode`] appended to `out` (a buffer used again and again).
pub fn encode_into(event: &SharedEvent, out: &mut Vec<u8>) {
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
    let strings = [
        Some(event.topic.as_str()),
        event.publisher_authid.as_deref(),
        event.publisher_authrole.as_deref(),
    ];
    let long = strings
        .iter()
        .any(|s| s.is_some_and(|s| s.len() >= usize::from(NONE16)));
    out.reserve(40 + event.topic.len() + bytes.len());
    out.push(if long { VERSION_LONG } else { VERSION });
    out.push(match raw.serializer() {
        Serializer::Json => 0,
        Serializer::MsgPack => 1,
    });
    out.extend_from_slice(&event.publication.0.to_le_bytes());
    out.extend_from_slice(&at.to_le_bytes());
    out.extend_from_slice(&event.publisher.unwrap_or(u64::MAX).to_le_bytes());
    let end = |r: Option<Range<usize>>, start: bool| {
        r.map_or(NONE32, |r| if start { r.start } else { r.end } as u32)
    };
    out.extend_from_slice(&end(args, false).to_le_bytes());
    out.extend_from_slice(&end(kwargs, true).to_le_bytes());
    for s in strings {
        put_str(out, s, long);
    }
    out.extend_from_slice(bytes);
}

/// A string with its length (in 4 bytes when `long`); `None` as the
/// largest length.
fn put_str(out: &mut Vec<u8>, s: Option<&str>, long: bool) {
    match (s, long) {
        (Some(s), false) => out.extend_from_slice(&(s.len() as u16).to_le_bytes()),
        (Some(s), true) => out.extend_from_slice(&(s.len() as u32).to_le_bytes()),
        (None, false) => out.extend_from_slice(&NONE16.to_le_bytes()),
        (None, true) => out.extend_from_slice(&NONE32.to_le_bytes()),
    }
    if let Some(s) = s {
        out.extend_from_slice(s.as_bytes());
    }
}

/// The event stored in an entry of `procedure`'s stream, from its fields.
pub fn read(procedure: &str, fields: Vec<(Bytes, Bytes)>) -> Result<SharedEvent, String> {
    let mut e = None;
    let mut envelope = None;
    let mut replayed = false;
    for (k, v) in fields {
        match &k[..] {
            b"e" => e = Some(v),
            b"event" => envelope = Some(v),
            REPLAYED => replayed = true,
            _ => {}
        }
    }
    let mut event = match (e, envelope) {
        (Some(e), _) => decode(procedure, e),
        (None, Some(json)) => SharedEvent::from_envelope(&json),
        (None, None) => Err("the entry holds no event".into()),
    }?;
    event.replayed = replayed;
    Ok(event)
}

/// Whether an entry has the fields of an event (in either form); one that
/// does not is shown as it is in its dead-letter record.
pub fn looks_like_an_event(fields: &[(Bytes, Bytes)]) -> bool {
    fields
        .iter()
        .any(|(k, _)| &k[..] == b"e" || &k[..] == b"event")
}

/// The inverse of [`encode`].
pub fn decode(procedure: &str, e: Bytes) -> Result<SharedEvent, String> {
    let mut r = Cursor { buf: &e, pos: 0 };
    let short = || "the stored event is cut short".to_owned();
    let long = match r.u8().ok_or_else(short)? {
        VERSION => false,
        VERSION_LONG => true,
        _ => return Err("the stored event has an unknown format version".into()),
    };
    let serializer = match r.u8().ok_or_else(short)? {
        0 => Serializer::Json,
        1 => Serializer::MsgPack,
        _ => return Err("the stored event names an unknown serializer".into()),
    };
    let publication = PublicationId(r.u64().ok_or_else(short)?);
    let at = r.u64().ok_or_else(short)?;
    let publisher = Some(r.u64().ok_or_else(short)?).filter(|p| *p != u64::MAX);
    let args_end = r.u32().ok_or_else(short)?;
    let kwargs_at = r.u32().ok_or_else(short)?;
    let topic = r
        .str(long)
        .ok_or_else(short)??
        .ok_or("the stored event has no topic")?;
    let authid = r.str(long).ok_or_else(short)??;
    let authrole = r.str(long).ok_or_else(short)??;
    let start = r.pos;
    let len = e.len() - start;
    let args = (args_end != NONE32).then_some(0..args_end as usize);
    let kwargs = (kwargs_at != NONE32).then_some(kwargs_at as usize..len);
    let payload = e.slice(start..);
    let raw = RawPayload::from_parts(serializer, payload, args, kwargs)?;
    Ok(SharedEvent {
        procedure: procedure.into(),
        topic,
        publication,
        publisher,
        publisher_authid: authid,
        publisher_authrole: authrole,
        payload: EventPayload::Raw(raw),
        received_at: UNIX_EPOCH + Duration::from_millis(at),
        outgoing: Default::default(),
        entry: None,
        lane: None,
        replayed: false,
        retain: false,
    })
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let bytes = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(bytes)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A length-prefixed string (a 4-byte length when `long`): `None` when
    /// cut short, `Some(Err)` when not UTF-8, `Some(Ok(None))` when absent.
    fn str(&mut self, long: bool) -> Option<Result<Option<String>, String>> {
        let len = match long {
            false => Some(self.u16()?).filter(|l| *l != NONE16).map(usize::from),
            true => Some(self.u32()?)
                .filter(|l| *l != NONE32)
                .map(|l| l as usize),
        };
        let Some(len) = len else {
            return Some(Ok(None));
        };
        let bytes = self.take(len)?;
        Some(
            std::str::from_utf8(bytes)
                .map(|s| Some(s.to_owned()))
                .map_err(|_| "a stored string is not UTF-8".to_owned()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wamp::{Dict, Message, Payload, SubscriptionId, Value, raw};

    fn fields_of(ev: &SharedEvent) -> Vec<(Bytes, Bytes)> {
        vec![(
            Bytes::from_static(FIELD.as_bytes()),
            Bytes::from(encode(ev)),
        )]
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
    fn a_topic_or_authid_of_65535_bytes_or_more_reads_back_whole() {
        for len in [65_534, 65_535, 70_000] {
            let mut ev = SharedEvent::from_envelope(
                br#"{"procedure":"p.SUB_x","topic":"p.x","publication":1,"args":[],"kwargs":{}}"#,
            )
            .unwrap();
            ev.topic = "t".repeat(len);
            ev.publisher_authid = Some("a".repeat(len / 2));
            ev.payload = EventPayload::Decoded(event_payload());
            let stored = encode(&ev);
            assert_eq!(stored[0], if len >= 65_535 { 2 } else { 1 }, "{len}");
            let back = read("p.SUB_x", fields_of(&ev)).unwrap();
            assert_eq!(back.topic.len(), len);
            assert_eq!(back.publisher_authid, ev.publisher_authid);
            assert_eq!(back.publisher_authrole, None);
            assert_eq!(back.call_payload(None).unwrap(), event_payload());
        }
    }

    #[test]
    fn a_version_1_entry_as_earlier_builds_wrote_it_still_reads() {
        // Written by this layout's first version: JSON, publication 42,
        // received at 1234 ms, no publisher, args `[7]` and no kwargs,
        // topic "p.x", authid "pub", no authrole.
        let mut e = vec![1, 0];
        e.extend_from_slice(&42u64.to_le_bytes());
        e.extend_from_slice(&1234u64.to_le_bytes());
        e.extend_from_slice(&u64::MAX.to_le_bytes());
        e.extend_from_slice(&3u32.to_le_bytes());
        e.extend_from_slice(&u32::MAX.to_le_bytes());
        e.extend_from_slice(&[3, 0]);
        e.extend_from_slice(b"p.x");
        e.extend_from_slice(&[3, 0]);
        e.extend_from_slice(b"pub");
        e.extend_from_slice(&[0xff, 0xff]);
        e.extend_from_slice(b"[7]");
        let back = decode("p.SUB_x", Bytes::from(e)).unwrap();
        assert_eq!(back.publication, PublicationId(42));
        assert_eq!(back.topic, "p.x");
        assert_eq!(back.publisher, None);
        assert_eq!(back.publisher_authid.as_deref(), Some("pub"));
        assert_eq!(back.publisher_authrole, None);
        assert_eq!(
            back.call_payload(None).unwrap(),
            Payload::new(vec![Value::UInt(7)], Dict::new())
        );
    }

    #[test]
    fn malformed_entries_are_refused_not_spliced() {
        let stored = |ser: Serializer,
                      payload: &[u8],
                      args: Option<Range<usize>>,
                      kwargs_at: Option<usize>| {
            let mut e = vec![VERSION, u8::from(ser == Serializer::MsgPack)];
            e.extend_from_slice(&1u64.to_le_bytes());
            e.extend_from_slice(&0u64.to_le_bytes());
            e.extend_from_slice(&u64::MAX.to_le_bytes());
            e.extend_from_slice(&args.map_or(NONE32, |r| r.end as u32).to_le_bytes());
            e.extend_from_slice(&kwargs_at.map_or(NONE32, |k| k as u32).to_le_bytes());
            put_str(&mut e, Some("t"), false);
            put_str(&mut e, None, false);
            put_str(&mut e, None, false);
            e.extend_from_slice(payload);
            decode("p", Bytes::from(e))
        };
        let json = Serializer::Json;
        assert!(stored(json, b"[1,2]", Some(0..5), None).is_ok());
        assert!(stored(json, br#"[1],{"a":1}"#, Some(0..3), Some(4)).is_ok());
        assert!(
            stored(json, b"[1,2", Some(0..4), None).is_err(),
            "truncated"
        );
        assert!(
            stored(json, b"{}", Some(0..2), None).is_err(),
            "args not a list"
        );
        assert!(
            stored(json, b"[1]x", Some(0..3), None).is_err(),
            "trailing bytes"
        );
        assert!(
            stored(json, b"[1]", Some(0..9), None).is_err(),
            "out of bounds"
        );
        assert!(
            stored(json, b"[1],[2]", Some(0..3), Some(4)).is_err(),
            "kwargs not a dict"
        );
        let mp = Serializer::MsgPack;
        assert!(stored(mp, &[0x91, 0x01], Some(0..2), None).is_ok());
        assert!(
            stored(mp, &[0x92, 0x01], Some(0..2), None).is_err(),
            "truncated"
        );
        let ok = encode(
            &SharedEvent::from_envelope(
                br#"{"procedure":"p","topic":"t","publication":1,"args":[1],"kwargs":{}}"#,
            )
            .unwrap(),
        );
        for cut in 0..ok.len() {
            assert!(
                decode("p", Bytes::copy_from_slice(&ok[..cut])).is_err(),
                "cut at {cut}"
            );
        }
        let mut bad_version = ok.clone();
        bad_version[0] = 9;
        assert!(decode("p", Bytes::from(bad_version)).is_err());
        assert!(read("p", vec![]).is_err());
    }
}
