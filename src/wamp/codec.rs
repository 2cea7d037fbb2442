//! The two WAMP serializers, `wamp.2.json` and `wamp.2.msgpack`: bytes in a
//! WebSocket frame <-> [`Message`]. Binary values survive both: MessagePack
//! `bin` is bytes, and in JSON a string starting with `\u0000` is the base64 of
//! bytes (both ways), so an event received in one format can be re-sent in the
//! other unchanged. Pure; may call only `message` and `value`.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::ser::{self, SerializeMap, SerializeSeq};

use super::message::{Element, Message, MessageError};
use super::value::{Dict, Value};

/// How deep lists and dicts may nest in a message. A hostile peer could
/// otherwise overflow the stack with a few kilobytes of `[[[[...`; 64 levels
/// is far beyond any real payload.
pub const MAX_DEPTH: usize = 64;

/// A WAMP serializer, negotiated through the WebSocket subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Serializer {
    Json,
    MsgPack,
}

/// What a frame could not be decoded into. Either way the peer broke the
/// protocol; the session is closed and the connection re-established.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed {serializer} frame: {detail}")]
    Malformed {
        serializer: &'static str,
        detail: String,
    },
    #[error(transparent)]
    Message(#[from] MessageError),
}

/// Encoding fails only for values a serializer cannot represent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot encode {message} as {serializer}: {detail}")]
pub struct EncodeError {
    pub message: &'static str,
    pub serializer: &'static str,
    pub detail: String,
}

impl Serializer {
    pub const ALL: [Serializer; 2] = [Serializer::MsgPack, Serializer::Json];

    /// The WebSocket subprotocol naming this serializer.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Serializer::Json => "wamp.2.json",
            Serializer::MsgPack => "wamp.2.msgpack",
        }
    }

    pub fn from_subprotocol(name: &str) -> Option<Serializer> {
        Serializer::ALL
            .into_iter()
            .find(|s| s.subprotocol().eq_ignore_ascii_case(name.trim()))
    }

    /// Whether frames are WebSocket text (JSON) or binary (MessagePack).
    pub fn is_text(self) -> bool {
        self == Serializer::Json
    }

    fn name(self) -> &'static str {
        match self {
            Serializer::Json => "JSON",
            Serializer::MsgPack => "MessagePack",
        }
    }

    /// Encodes a message into a new buffer.
    pub fn encode(self, msg: &Message) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(128);
        self.encode_into(msg, &mut out)?;
        Ok(out)
    }

    /// Encodes a message, appending to `out`.
    pub fn encode_into(self, msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let wire = WireMessage {
            msg,
            json: self == Serializer::Json,
        };
        let result = match self {
            Serializer::Json => {
                serde::Serialize::serialize(&wire, &mut serde_json::Serializer::new(&mut *out))
                    .map_err(|e| e.to_string())
            }
            Serializer::MsgPack => {
                serde::Serialize::serialize(&wire, &mut rmp_serde::Serializer::new(&mut *out))
                    .map_err(|e| e.to_string())
            }
        };
        result.map_err(|detail| EncodeError {
            message: msg.name(),
            serializer: self.name(),
            detail,
        })
    }

    /// Decodes one frame into a message.
    pub fn decode(self, bytes: &[u8]) -> Result<Message, DecodeError> {
        let list = self.decode_value(bytes)?;
        match list {
            Value::List(items) => Ok(Message::from_list(items)?),
            other => Err(MessageError::NotAList(other.kind()).into()),
        }
    }

    /// Decodes one frame into a plain value (no message validation).
    pub fn decode_value(self, bytes: &[u8]) -> Result<Value, DecodeError> {
        let seed = ValueSeed {
            json: self == Serializer::Json,
            depth: 0,
        };
        let malformed = |detail: String| DecodeError::Malformed {
            serializer: self.name(),
            detail,
        };
        match self {
            Serializer::Json => {
                let mut de = serde_json::Deserializer::from_slice(bytes);
                let value = seed
                    .deserialize(&mut de)
                    .map_err(|e| malformed(e.to_string()))?;
                de.end().map_err(|e| malformed(e.to_string()))?;
                Ok(value)
            }
            Serializer::MsgPack => {
                let mut de = rmp_serde::Deserializer::new(bytes);
                de.set_max_depth(MAX_DEPTH + 2);
                let value = seed
                    .deserialize(&mut de)
                    .map_err(|e| malformed(e.to_string()))?;
                let rest = de.into_inner().len();
                if rest != 0 {
                    return Err(malformed(format!(
                        "{rest} trailing bytes after the message"
                    )));
                }
                Ok(value)
            }
        }
    }

    /// Encodes a plain value (used for envelopes and tests).
    pub fn encode_value(self, value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        let wire = WireValue {
            value,
            json: self == Serializer::Json,
        };
        // Writing into a Vec cannot fail, and our Serialize impls raise no
        // errors of their own: the results are always Ok.
        let _ = match self {
            Serializer::Json => {
                serde::Serialize::serialize(&wire, &mut serde_json::Serializer::new(&mut out))
                    .map_err(|e| e.to_string())
            }
            Serializer::MsgPack => {
                serde::Serialize::serialize(&wire, &mut rmp_serde::Serializer::new(&mut out))
                    .map_err(|e| e.to_string())
            }
        };
        out
    }
}

impl fmt::Display for Serializer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.subprotocol())
    }
}

/// WAMP's JSON convention for binary: `"\u0000" + base64(bytes)`.
pub fn bytes_to_json_string(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(1 + bytes.len().div_ceil(3) * 4);
    s.push('\0');
    BASE64.encode_string(bytes, &mut s);
    s
}

/// The inverse of [`bytes_to_json_string`]; `None` if `s` is not binary.
pub fn json_string_to_bytes(s: &str) -> Option<Vec<u8>> {
    let b64 = s.strip_prefix('\0')?;
    BASE64.decode(b64).ok()
}

// ---------------------------------------------------------------- encoding

struct WireMessage<'a> {
    msg: &'a Message,
    json: bool,
}

impl ser::Serialize for WireMessage<'_> {
    fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let json = self.json;
        let mut seq = s.serialize_seq(Some(self.msg.element_count()))?;
        self.msg.for_each_element(|el| match el {
            Element::UInt(v) => seq.serialize_element(&v),
            Element::Str(v) => seq.serialize_element(v),
            Element::Dict(dict) => seq.serialize_element(&WireDict { dict, json }),
            Element::List(list) => seq.serialize_element(&WireList { list, json }),
        })?;
        seq.end()
    }
}

struct WireValue<'a> {
    value: &'a Value,
    json: bool,
}

struct WireDict<'a> {
    dict: &'a Dict,
    json: bool,
}

struct WireList<'a> {
    list: &'a [Value],
    json: bool,
}

impl ser::Serialize for WireValue<'_> {
    fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let json = self.json;
        match self.value {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(v) => s.serialize_i64(*v),
            Value::UInt(v) => s.serialize_u64(*v),
            Value::Float(v) => s.serialize_f64(*v),
            Value::Str(v) => s.serialize_str(v),
            Value::Bytes(b) if json => s.serialize_str(&bytes_to_json_string(b)),
            Value::Bytes(b) => s.serialize_bytes(b),
            Value::List(list) => WireList { list, json }.serialize(s),
            Value::Dict(dict) => WireDict { dict, json }.serialize(s),
        }
    }
}

impl ser::Serialize for WireList<'_> {
    fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.list.len()))?;
        for value in self.list {
            seq.serialize_element(&WireValue {
                value,
                json: self.json,
            })?;
        }
        seq.end()
    }
}

impl ser::Serialize for WireDict<'_> {
    fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.dict.len()))?;
        for (key, value) in self.dict.iter() {
            map.serialize_entry(
                key,
                &WireValue {
                    value,
                    json: self.json,
                },
            )?;
        }
        map.end()
    }
}

// ---------------------------------------------------------------- decoding

/// Deserializes any value, turning JSON's `\u0000`-prefixed strings into
/// bytes and counting depth.
#[derive(Clone, Copy)]
struct ValueSeed {
    json: bool,
    depth: usize,
}

impl ValueSeed {
    fn nested<E: de::Error>(self) -> Result<ValueSeed, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format_args!(
                "lists and dicts nested deeper than {MAX_DEPTH} levels"
            )));
        }
        Ok(ValueSeed {
            depth: self.depth + 1,
            ..self
        })
    }

    fn string<E>(self, s: String) -> Result<Value, E> {
        if self.json && s.starts_with('\0') {
            // A string that claims to be binary but isn't valid base64 is kept
            // as the string it is, rather than losing the event.
            if let Some(bytes) = json_string_to_bytes(&s) {
                return Ok(Value::Bytes(bytes));
            }
        }
        Ok(Value::Str(s))
    }
}

impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a WAMP value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::int(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::UInt(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        self.string(v.to_owned())
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        self.string(v)
    }

    fn visit_bytes<E>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::Bytes(v.to_vec()))
    }

    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Value, E> {
        Ok(Value::Bytes(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.nested()?;
        // Never trust a length prefix for allocation: a 5-byte MessagePack
        // header can claim four billion elements.
        let mut list = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(v) = seq.next_element_seed(inner)? {
            list.push(v);
        }
        Ok(Value::List(list))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.nested()?;
        let mut dict = Dict::with_capacity(map.size_hint().unwrap_or(0).min(32));
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let value = map.next_value_seed(inner)?;
            dict.push_unchecked(key, value);
        }
        Ok(Value::Dict(dict))
    }
}

/// Dictionary keys must be strings in WAMP (JSON allows nothing else).
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = String;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string dictionary key")
    }

    fn visit_str<E>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_string<E>(self, v: String) -> Result<String, E> {
        Ok(v)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wamp::id::*;
    use crate::wamp::message::{Event, Payload};

    fn sample_payload() -> Payload {
        Payload::new(
            vec![
                0u64.into(),
                "hello".into(),
                Value::Dict(Dict::new().with(
                    "nested",
                    vec![
                        Value::UInt(1),
                        Value::Float(2.5),
                        Value::Null,
                        Value::Bool(true),
                    ],
                )),
                Value::Bytes(vec![0, 1, 2, 255]),
                Value::int(-42),
            ],
            Dict::new()
                .with("key", "value")
                .with("seq", 0u64)
                .with("blob", vec![0u8, 159, 146, 150]),
        )
    }

    fn sample_event() -> Message {
        Message::Event(Event {
            subscription: SubscriptionId(8893464892931420),
            publication: PublicationId(6358646022012579),
            details: Dict::new()
                .with("publisher", 5546838114206924u64)
                .with("publisher_authid", "backend"),
            payload: sample_payload(),
        })
    }

    #[test]
    fn decodes_the_captured_crossbar_event() {
        let frame = br#"[36,8893464892931420,6358646022012579,{"publisher":5546838114206924,"publisher_authid":"backend","publisher_authrole":"backend"},[0,"hello",{"nested":[1,2.5,null,true]}],{"key":"value","seq":0}]"#;
        let Message::Event(ev) = Serializer::Json.decode(frame).unwrap() else {
            panic!("not an event")
        };
        assert_eq!(ev.subscription, SubscriptionId(8893464892931420));
        assert_eq!(ev.details.get_str("publisher_authrole"), Some("backend"));
        assert_eq!(ev.payload.args[0], Value::UInt(0));
        assert_eq!(ev.payload.kwargs.get_str("key"), Some("value"));
    }

    #[test]
    fn decodes_the_captured_welcome_with_crossbar_extra_keys() {
        let frame = br#"[2,1273811465337858,{"x_cb_node":"vm-9572","x_cb_worker":"worker001","realm":"realm1","authid":"backend","authrole":"backend","authmethod":"wampcra","authextra":{"x_cb_pid":9576},"roles":{"broker":{"features":{"publisher_identification":true}}}}]"#;
        let msg = Serializer::Json.decode(frame).unwrap();
        let Message::Welcome { session, details } = msg else {
            panic!()
        };
        assert_eq!(session, SessionId(1273811465337858));
        assert_eq!(details.get_str("authrole"), Some("backend"));
    }

    #[test]
    fn every_message_round_trips_through_both_serializers() {
        for ser in Serializer::ALL {
            let msg = sample_event();
            let bytes = ser.encode(&msg).unwrap();
            assert_eq!(ser.decode(&bytes).unwrap(), msg, "{ser}");
        }
    }

    #[test]
    fn bytes_received_as_msgpack_and_resent_as_json_arrive_identical() {
        let msg = sample_event();
        let via_msgpack = Serializer::MsgPack
            .decode(&Serializer::MsgPack.encode(&msg).unwrap())
            .unwrap();
        let json = Serializer::Json.encode(&via_msgpack).unwrap();
        assert!(
            std::str::from_utf8(&json)
                .unwrap()
                .contains(r#""\u0000AAEC/w==""#),
            "bytes are \\u0000-prefixed base64 in JSON"
        );
        let back = Serializer::Json.decode(&json).unwrap();
        let again = Serializer::MsgPack
            .decode(&Serializer::MsgPack.encode(&back).unwrap())
            .unwrap();
        assert_eq!(again, msg);
    }

    #[test]
    fn msgpack_bytes_are_encoded_as_bin_not_as_a_list() {
        let bytes = Serializer::MsgPack.encode_value(&Value::Bytes(vec![1, 2, 3]));
        assert_eq!(bytes, [0xc4, 3, 1, 2, 3]);
    }

    #[test]
    fn json_string_with_nul_prefix_but_invalid_base64_stays_a_string() {
        let v = Serializer::Json.decode_value(br#"["\u0000!!"]"#).unwrap();
        assert_eq!(v, Value::List(vec![Value::Str("\0!!".into())]));
    }

    #[test]
    fn empty_trailing_payload_is_not_written() {
        let msg = Message::Call {
            request: RequestId(1),
            options: Dict::new(),
            procedure: "com.example.SUB_status".into(),
            payload: Payload::default(),
        };
        assert_eq!(
            Serializer::Json.encode(&msg).unwrap(),
            br#"[48,1,{},"com.example.SUB_status"]"#
        );
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let cases: &[&[u8]] = &[
            b"",
            b"[",
            b"{}",
            b"[36,1",
            b"[\"x\"]",
            b"[36,1,2,{},[],{},{}]",
            b"[36,1,2,{},{},[]]",
            b"[1,\"realm\",{\"a\":1}] trailing",
            b"\xff\xff\xff",
        ];
        for case in cases {
            assert!(Serializer::Json.decode(case).is_err(), "{case:?}");
            assert!(Serializer::MsgPack.decode(case).is_err(), "{case:?}");
        }
    }

    #[test]
    fn msgpack_length_prefix_claiming_billions_of_elements_does_not_allocate_them() {
        // array32 header claiming 2^32-1 elements, followed by nothing.
        let frame = [0xdd, 0xff, 0xff, 0xff, 0xff];
        assert!(Serializer::MsgPack.decode(&frame).is_err());
    }

    #[test]
    fn msgpack_non_string_map_keys_are_rejected() {
        // [36, 1, 2, {1: 2}]
        let frame = [0x94, 36, 1, 2, 0x81, 1, 2];
        assert!(Serializer::MsgPack.decode(&frame).is_err());
    }

    #[test]
    fn nesting_beyond_the_limit_is_an_error_not_a_stack_overflow() {
        for ser in Serializer::ALL {
            let mut v = Value::Null;
            for _ in 0..(MAX_DEPTH + 5) {
                v = Value::List(vec![v]);
            }
            let bytes = ser.encode_value(&v);
            assert!(ser.decode_value(&bytes).is_err(), "{ser}");
        }
        // Far deeper than serde_json's own limit, as raw bytes.
        let deep = "[".repeat(100_000);
        assert!(Serializer::Json.decode(deep.as_bytes()).is_err());
        let deep = vec![0x91u8; 100_000];
        assert!(Serializer::MsgPack.decode(&deep).is_err());
    }

    pub(crate) mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Any value that survives a JSON round trip (no NaN, no string
        /// starting with NUL).
        pub(crate) fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::int),
                any::<u64>().prop_map(Value::UInt),
                any::<f64>()
                    .prop_filter("NaN and infinities have no JSON form", |f| f.is_finite())
                    .prop_map(Value::Float),
                // A string starting with NUL would read back as bytes from JSON
                // (WAMP's convention), so it is not a round-trippable string.
                "[^\\x00][^\\x00]{0,20}".prop_map(Value::Str),
                Just(Value::Str(String::new())),
                proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
            ];
            leaf.prop_recursive(4, 64, 8, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::List),
                    proptest::collection::vec(("[a-z_]{1,8}", inner), 0..8)
                        .prop_map(|kv| Value::Dict(kv.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                for ser in Serializer::ALL {
                    let _ = ser.decode(&bytes);
                }
            }

            #[test]
            fn decoding_mutated_valid_frames_never_panics(
                flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                cut in any::<prop::sample::Index>(),
            ) {
                for ser in Serializer::ALL {
                    let mut frame = ser.encode(&sample_event()).unwrap();
                    for (at, byte) in &flips {
                        let i = at.index(frame.len());
                        frame[i] = *byte;
                    }
                    let _ = ser.decode(&frame);
                    frame.truncate(cut.index(frame.len()));
                    let _ = ser.decode(&frame);
                }
            }

            #[test]
            fn any_value_round_trips_through_both_serializers_and_across(v in value()) {
                for ser in Serializer::ALL {
                    prop_assert_eq!(&ser.decode_value(&ser.encode_value(&v)).unwrap(), &v);
                }
                let via_msgpack = Serializer::MsgPack.decode_value(&Serializer::MsgPack.encode_value(&v)).unwrap();
                let via_json = Serializer::Json.decode_value(&Serializer::Json.encode_value(&via_msgpack)).unwrap();
                prop_assert_eq!(via_json, v);
            }
        }
    }

    #[test]
    fn subprotocols_are_negotiated_by_name() {
        assert_eq!(
            Serializer::from_subprotocol("wamp.2.msgpack"),
            Some(Serializer::MsgPack)
        );
        assert_eq!(
            Serializer::from_subprotocol("wamp.2.json"),
            Some(Serializer::Json)
        );
        assert_eq!(Serializer::from_subprotocol("wamp.2.cbor"), None);
    }
}
