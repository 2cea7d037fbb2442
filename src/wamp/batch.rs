//! The Arguments of a batch CALL: one positional argument per event, each a
//! dict `{"args": [...], "kwargs": {...}, "topic": "...", "publication": N}`
//! (plus the event's details under a configured key). Written straight into
//! wire bytes: an event's args and kwargs received in the same serializer
//! are copied in as they are (binary stays binary, nothing is decoded);
//! others are transcoded. Pure; may call only `codec`, `raw`, `message`,
//! `value`, `write` and `id`.

use bytes::Bytes;

use super::codec::Serializer;
use super::message::Payload;
use super::raw::RawPayload;
use super::value::{Dict, Value};
use super::write::{empty, string, uint};

/// An event's args and kwargs, as the batch writer takes them.
#[derive(Debug, Clone, Copy)]
pub enum Parts<'a> {
    Raw(&'a RawPayload),
    Decoded(&'a Payload),
}

/// Writes the events of one batch call in `serializer`, in order.
#[derive(Debug)]
pub struct BatchWriter {
    serializer: Serializer,
    out: Vec<u8>,
    /// Events written.
    written: usize,
    /// Events announced in the MessagePack array header.
    announced: usize,
}

impl BatchWriter {
    /// A writer for exactly `events` events, with room for `bytes` of them.
    pub fn new(serializer: Serializer, events: usize, bytes: usize) -> BatchWriter {
        let mut out = Vec::with_capacity(bytes + 64 * events + 16);
        match serializer {
            Serializer::MsgPack => array_header(&mut out, events),
            Serializer::Json => out.push(b'['),
        }
        BatchWriter {
            serializer,
            out,
            written: 0,
            announced: events,
        }
    }

    /// One event. `details`, when given, is added under its key.
    pub fn push(
        &mut self,
        parts: Parts<'_>,
        topic: &str,
        publication: u64,
        details: Option<(&str, Dict)>,
    ) {
        let ser = self.serializer;
        let out = &mut self.out;
        let fields = 4 + usize::from(details.is_some());
        match ser {
            Serializer::MsgPack => map_header(out, fields),
            Serializer::Json => {
                if self.written > 0 {
                    out.push(b',');
                }
                out.push(b'{');
            }
        }
        key(ser, out, "args", true);
        let (args, kwargs) = match parts {
            Parts::Raw(raw) if raw.serializer() == ser => {
                let (bytes, args, kwargs) = raw.parts();
                (
                    args.map(|r| Wire::Bytes(&bytes[r])),
                    kwargs.map(|r| Wire::Bytes(&bytes[r])),
                )
            }
            Parts::Raw(raw) => match raw.decode() {
                // Validated on arrival: decoding does not fail in practice.
                Ok(p) => (
                    Some(Wire::list(ser, p.args)),
                    Some(Wire::dict(ser, p.kwargs)),
                ),
                Err(_) => (None, None),
            },
            Parts::Decoded(p) => (
                Some(Wire::list(ser, p.args.clone())),
                Some(Wire::dict(ser, p.kwargs.clone())),
            ),
        };
        match &args {
            Some(w) => out.extend_from_slice(w.bytes()),
            None => empty(ser, out, true),
        }
        key(ser, out, "kwargs", false);
        match &kwargs {
            Some(w) => out.extend_from_slice(w.bytes()),
            None => empty(ser, out, false),
        }
        key(ser, out, "topic", false);
        string(ser, out, topic);
        key(ser, out, "publication", false);
        uint(ser, out, publication);
        if let Some((name, details)) = details {
            key(ser, out, name, false);
            out.extend_from_slice(&ser.encode_value(&Value::Dict(details)));
        }
        if ser == Serializer::Json {
            out.push(b'}');
        }
        self.written += 1;
    }

    /// The batch as a payload of positional arguments only.
    pub fn finish(mut self) -> RawPayload {
        match self.serializer {
            Serializer::MsgPack => {
                debug_assert_eq!(self.written, self.announced, "events announced");
                if self.written != self.announced {
                    // Never happens with a correct caller; keep the bytes
                    // well-formed all the same.
                    let mut fixed = Vec::with_capacity(self.out.len());
                    array_header(&mut fixed, self.written);
                    fixed.extend_from_slice(&self.out[header_len(self.announced)..]);
                    self.out = fixed;
                }
            }
            Serializer::Json => self.out.push(b']'),
        }
        RawPayload::args_only(self.serializer, Bytes::from(self.out))
    }
}

/// A part written into the batch: borrowed wire bytes or freshly encoded.
enum Wire<'a> {
    Bytes(&'a [u8]),
    Owned(Vec<u8>),
}

impl Wire<'_> {
    fn list(ser: Serializer, items: Vec<Value>) -> Wire<'static> {
        Wire::Owned(ser.encode_value(&Value::List(items)))
    }

    fn dict(ser: Serializer, dict: Dict) -> Wire<'static> {
        Wire::Owned(ser.encode_value(&Value::Dict(dict)))
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Wire::Bytes(b) => b,
            Wire::Owned(v) => v,
        }
    }
}

fn key(ser: Serializer, out: &mut Vec<u8>, name: &str, first: bool) {
    if ser == Serializer::Json && !first {
        out.push(b',');
    }
    string(ser, out, name);
    if ser == Serializer::Json {
        out.push(b':');
    }
}

fn map_header(out: &mut Vec<u8>, n: usize) {
    // Our dicts have at most five entries.
    debug_assert!(n < 16);
    out.push(0x80 | n as u8);
}

fn array_header(out: &mut Vec<u8>, n: usize) {
    if n < 16 {
        out.push(0x90 | n as u8);
    } else if n <= 0xffff {
        out.push(0xdc);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdd);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

fn header_len(n: usize) -> usize {
    if n < 16 {
        1
    } else if n <= 0xffff {
        3
    } else {
        5
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wamp::raw::decode_event;
    use crate::wamp::{Event, Message, PublicationId, RequestId, SubscriptionId};

    /// An EVENT as the router sends it, read the pass-through way.
    fn raw_event(ser: Serializer, payload: Payload) -> RawPayload {
        let frame = ser
            .encode(&Message::Event(Event {
                subscription: SubscriptionId(1),
                publication: PublicationId(2),
                details: Dict::new(),
                payload,
            }))
            .unwrap();
        decode_event(ser, &frame).expect("pass-through").payload
    }

    fn decode_batch(ser: Serializer, batch: &RawPayload) -> Vec<Value> {
        let frame =
            crate::wamp::raw::encode_call(ser, RequestId(1), Dict::new(), "p", batch).unwrap();
        match ser.decode(&frame).unwrap() {
            Message::Call { payload, .. } => {
                assert!(payload.kwargs.is_empty());
                payload.args
            }
            other => panic!("not a CALL: {other:?}"),
        }
    }

    fn event(args: Vec<Value>, kwargs: Dict, topic: &str, publication: u64) -> Value {
        Value::Dict(
            Dict::new()
                .with("args", Value::List(args))
                .with("kwargs", Value::Dict(kwargs))
                .with("topic", topic)
                .with("publication", publication),
        )
    }

    #[test]
    fn events_become_dicts_in_order_with_binary_kept_in_both_serializers() {
        for ser in [Serializer::MsgPack, Serializer::Json] {
            let blob = Value::Bytes(vec![0, 159, 255, 1]);
            let one = raw_event(
                ser,
                Payload::new(
                    vec![blob.clone(), Value::UInt(7)],
                    Dict::new().with("k", "v"),
                ),
            );
            let two = raw_event(ser, Payload::new(vec![], Dict::new()));
            let three = Payload::new(vec!["é".into()], Dict::new());
            // Enough events for a MessagePack array16 header.
            let mut w = BatchWriter::new(ser, 20, 1000);
            w.push(Parts::Raw(&one), "a.b", 1, None);
            w.push(Parts::Raw(&two), "a.c", 1 << 40, None);
            for n in 0..18 {
                w.push(Parts::Decoded(&three), &"t".repeat(40), n, None);
            }
            let args = decode_batch(ser, &w.finish());
            assert_eq!(args.len(), 20, "{ser}");
            assert_eq!(
                args[0],
                event(
                    vec![blob.clone(), Value::UInt(7)],
                    Dict::new().with("k", "v"),
                    "a.b",
                    1
                )
            );
            assert_eq!(args[1], event(vec![], Dict::new(), "a.c", 1 << 40));
            assert_eq!(
                args[19],
                event(vec!["é".into()], Dict::new(), &"t".repeat(40), 17)
            );
        }
    }

    #[test]
    fn details_go_under_their_key_and_other_serializers_are_transcoded() {
        let json = raw_event(
            Serializer::Json,
            Payload::new(vec![Value::Bytes(vec![1, 2])], Dict::new()),
        );
        let mut w = BatchWriter::new(Serializer::MsgPack, 1, 100);
        let details = Dict::new().with("publisher", 5u64);
        w.push(
            Parts::Raw(&json),
            "x",
            3,
            Some(("_details", details.clone())),
        );
        let args = decode_batch(Serializer::MsgPack, &w.finish());
        let Value::Dict(d) = &args[0] else {
            panic!("not a dict")
        };
        assert_eq!(
            d.get("args"),
            Some(&Value::List(vec![Value::Bytes(vec![1, 2])]))
        );
        assert_eq!(d.get("_details"), Some(&Value::Dict(details)));
    }
}
