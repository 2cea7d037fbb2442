//! EVENTs whose Arguments and ArgumentsKw are kept as the bytes they arrived
//! in, and CALLs that send such bytes on unchanged. This is the forwarder's
//! hot path: an event's payload is only passed through, so decoding it into
//! a [`Value`](super::value::Value) tree, cloning that per attempt and
//! encoding it again is work (and about half of subtocall's CPU per event)
//! for nothing. Within one session the serializer is the same both ways, so
//! the bytes are spliced into the CALL as they are; across sessions with
//! different serializers they are transcoded.
//!
//! Nothing is accepted here that the full decoder ([`Serializer::decode`])
//! would reject, and every payload accepted decodes to exactly what the full
//! decoder produces: anything unusual (invalid UTF-8, deep nesting,
//! extension types, malformed input) makes [`decode_event`] answer `None`,
//! and the caller decodes the frame the ordinary way, which then accepts it
//! or reports the protocol error it always did. Pure; may call only
//! `codec`, `message`, `value` and `id`.

use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::codec::{DecodeError, EncodeError, Serializer};
use super::id::{MAX_ID, PublicationId, RequestId, SubscriptionId};
use super::message::{Message, Payload, code};
use super::value::{Dict, Value};
use super::write::{empty, string, uint};

/// How deep a payload may nest to be passed through undecoded. Far below
/// the full decoder's limit ([`super::codec::MAX_DEPTH`]), so that whatever
/// passes here certainly passes there; deeper payloads take the full path.
const PASS_THROUGH_DEPTH: usize = 32;

/// Arguments and ArgumentsKw exactly as received, with the serializer that
/// wrote them.
#[derive(Clone, PartialEq, Eq)]
pub struct RawPayload {
    serializer: Serializer,
    /// The payload's wire elements, as they stood in the message: for JSON
    /// joined by the `,` between them.
    bytes: Bytes,
    args: Option<Range<usize>>,
    kwargs: Option<Range<usize>>,
}

impl fmt::Debug for RawPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawPayload")
            .field("serializer", &self.serializer)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl RawPayload {
    pub fn serializer(&self) -> Serializer {
        self.serializer
    }

    /// The number of wire elements (0, 1 or 2).
    fn elements(&self) -> u8 {
        u8::from(self.args.is_some()) + u8::from(self.kwargs.is_some())
    }

    /// Decodes the payload, with the same result the full decoder gives.
    /// It was validated when it was received, so this does not fail for a
    /// payload made by [`decode_event`].
    pub fn decode(&self) -> Result<Payload, DecodeError> {
        let part = |range: &Option<Range<usize>>| -> Result<Option<Value>, DecodeError> {
            range
                .as_ref()
                .map(|r| self.serializer.decode_value(&self.bytes[r.clone()]))
                .transpose()
        };
        let args = match part(&self.args)? {
            None => Vec::new(),
            Some(Value::List(l)) => l,
            Some(other) => return Err(not_a(self.serializer, "list", &other)),
        };
        let kwargs = match part(&self.kwargs)? {
            None => Dict::new(),
            Some(Value::Dict(d)) => d,
            Some(other) => return Err(not_a(self.serializer, "dict", &other)),
        };
        Ok(Payload::new(args, kwargs))
    }
}

impl RawPayload {
    /// The wire bytes and where args and kwargs are in them, to be stored
    /// and put back together with [`RawPayload::from_parts`].
    pub fn parts(&self) -> (&[u8], Option<Range<usize>>, Option<Range<usize>>) {
        (&self.bytes, self.args.clone(), self.kwargs.clone())
    }

    /// A payload from stored parts (see [`RawPayload::parts`]), checked
    /// without decoding it: the ranges must be in order and in bounds, args
    /// a well-formed list and kwargs a well-formed dict, nothing else in
    /// `bytes` but the JSON separator. Stored bytes are spliced into CALLs,
    /// so nothing malformed may pass.
    pub fn from_parts(
        serializer: Serializer,
        bytes: Bytes,
        args: Option<Range<usize>>,
        kwargs: Option<Range<usize>>,
    ) -> Result<RawPayload, String> {
        if kwargs.is_some() && args.is_none() {
            return Err("kwargs without args".into());
        }
        let end = kwargs.as_ref().or(args.as_ref()).map_or(0, |r| r.end);
        let gap = match serializer {
            Serializer::Json => 1,
            Serializer::MsgPack => 0,
        };
        let laid_out = match (&args, &kwargs) {
            (None, _) => bytes.is_empty(),
            (Some(a), None) => a.start == 0 && a.start <= a.end,
            (Some(a), Some(k)) => {
                a.start == 0
                    && a.start <= a.end
                    && k.start <= k.end
                    && k.start == a.end + gap
                    && (gap == 0 || bytes.get(a.end) == Some(&b','))
            }
        };
        if !laid_out || end != bytes.len() {
            return Err("payload parts are not laid out as expected".into());
        }
        let well_formed = |range: &Range<usize>, list: bool| -> bool {
            let part = &bytes[range.clone()];
            match serializer {
                Serializer::MsgPack => {
                    let mut r = Reader { buf: part, pos: 0 };
                    (if list { r.is_array() } else { r.is_map() })
                        && r.skip(0).is_some()
                        && r.pos == part.len()
                }
                Serializer::Json => {
                    let open = if list { b'[' } else { b'{' };
                    part.first() == Some(&open)
                        && serde_json::from_slice::<serde::de::IgnoredAny>(part).is_ok()
                }
            }
        };
        if args.as_ref().is_some_and(|r| !well_formed(r, true)) {
            return Err("stored args are not a well-formed list".into());
        }
        if kwargs.as_ref().is_some_and(|r| !well_formed(r, false)) {
            return Err("stored kwargs are not a well-formed dict".into());
        }
        Ok(RawPayload {
            serializer,
            bytes,
            args,
            kwargs,
        })
    }

    /// Positional arguments only, as written by [`super::batch`] (trusted:
    /// not checked again).
    pub(super) fn args_only(serializer: Serializer, bytes: Bytes) -> RawPayload {
        RawPayload {
            serializer,
            args: Some(0..bytes.len()),
            kwargs: None,
            bytes,
        }
    }

    /// A decoded payload in raw form (MessagePack), to be stored.
    pub fn from_payload(payload: &Payload) -> RawPayload {
        let ser = Serializer::MsgPack;
        let mut bytes = ser.encode_value(&Value::List(payload.args.clone()));
        let args = 0..bytes.len();
        let kwargs = if payload.kwargs.is_empty() {
            None
        } else {
            let at = bytes.len();
            bytes.extend(ser.encode_value(&Value::Dict(payload.kwargs.clone())));
            Some(at..bytes.len())
        };
        RawPayload {
            serializer: ser,
            bytes: Bytes::from(bytes),
            args: Some(args),
            kwargs,
        }
    }
}

fn not_a(serializer: Serializer, what: &str, got: &Value) -> DecodeError {
    DecodeError::Malformed {
        serializer: match serializer {
            Serializer::Json => "JSON",
            Serializer::MsgPack => "MessagePack",
        },
        detail: format!("payload part is {}, not a {what}", got.kind()),
    }
}

/// An EVENT with its payload kept as received.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEvent {
    pub subscription: SubscriptionId,
    pub publication: PublicationId,
    pub details: Dict,
    pub payload: RawPayload,
}

/// Decodes `frame` as an EVENT without decoding its payload. `None` when the
/// frame is not an EVENT, or is anything the pass-through does not handle:
/// decode it with [`Serializer::decode`] then.
pub fn decode_event(serializer: Serializer, frame: &[u8]) -> Option<RawEvent> {
    let copy = |range: Range<usize>| Bytes::copy_from_slice(&frame[range]);
    match serializer {
        Serializer::MsgPack => decode_event_msgpack(frame, copy),
        Serializer::Json => decode_event_json(frame, copy),
    }
}

/// The request a RESULT frame answers, read from its first elements alone
/// (the rest is not looked at: for a RESULT nobody reads). `None` when the
/// frame is not a RESULT, or its head is not what the full decoder takes.
pub fn result_request(serializer: Serializer, frame: &[u8]) -> Option<RequestId> {
    let id = match serializer {
        Serializer::MsgPack => {
            let mut r = Reader { buf: frame, pos: 0 };
            let len = r.array_len()?;
            if !(3..=5).contains(&len) || r.uint()? != code::RESULT {
                return None;
            }
            r.id()?
        }
        Serializer::Json => {
            let (code::RESULT, rest) = json_head(frame)? else {
                return None;
            };
            let (id, rest) = json_uint_at(rest.strip_prefix(b",")?)?;
            if rest.first() != Some(&b',') {
                return None;
            }
            Some(id).filter(|v| (1..=MAX_ID).contains(v))?
        }
    };
    Some(RequestId(id))
}

/// [`decode_event`] of a frame already in [`Bytes`]: the payload is a
/// slice of the frame, not a copy.
pub fn decode_event_in(serializer: Serializer, frame: &Bytes) -> Option<RawEvent> {
    let slice = |range: Range<usize>| frame.slice(range);
    match serializer {
        Serializer::MsgPack => decode_event_msgpack(frame, slice),
        Serializer::Json => decode_event_json(frame, slice),
    }
}

/// A CALL carrying `payload` as its Arguments and ArgumentsKw, encoded with
/// `serializer`: the payload's bytes spliced in when it was received in the
/// same format, transcoded otherwise.
pub fn encode_call(
    serializer: Serializer,
    request: RequestId,
    options: Dict,
    procedure: &str,
    payload: &RawPayload,
) -> Result<Vec<u8>, EncodeError> {
    if payload.serializer == serializer && options.is_empty() {
        // The forwarding path: the head written directly, no message built.
        return Ok(call_without_options(
            serializer, request, procedure, payload,
        ));
    }
    let procedure = procedure.to_owned();
    let transcode = |options, procedure| -> Result<Vec<u8>, EncodeError> {
        let decoded = payload.decode().map_err(|e| EncodeError {
            message: "CALL",
            serializer: "payload",
            detail: e.to_string(),
        })?;
        serializer.encode(&Message::Call {
            request,
            options,
            procedure,
            payload: decoded,
        })
    };
    if payload.serializer != serializer {
        return transcode(options, procedure);
    }
    let head = Message::Call {
        request,
        options,
        procedure,
        payload: Payload::default(),
    };
    let mut out = serializer.encode(&head)?;
    out.reserve(payload.bytes.len() + 2);
    let elements = payload.elements();
    if elements == 0 {
        return Ok(out);
    }
    match serializer {
        // [48, Request, Options, Procedure] is a 4-element fixarray.
        Serializer::MsgPack if out.first() == Some(&0x94) => {
            out[0] = 0x94 + elements;
            out.extend_from_slice(&payload.bytes);
        }
        Serializer::Json if out.last() == Some(&b']') => {
            out.pop();
            out.push(b',');
            out.extend_from_slice(&payload.bytes);
            out.push(b']');
        }
        // Not the layout we splice into (cannot happen with our encoder):
        // take the long way rather than guess.
        _ => {
            if let Message::Call {
                options, procedure, ..
            } = head
            {
                return transcode(options, procedure);
            }
            return Err(EncodeError {
                message: "CALL",
                serializer: "payload",
                detail: "unexpected CALL layout".into(),
            });
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- MessagePack

/// `payload` makes the payload's bytes from their range in `frame`.
fn decode_event_msgpack(
    frame: &[u8],
    payload: impl FnOnce(Range<usize>) -> Bytes,
) -> Option<RawEvent> {
    let mut r = Reader { buf: frame, pos: 0 };
    let len = r.array_len()?;
    if !(4..=6).contains(&len) || r.uint()? != code::EVENT {
        return None;
    }
    let subscription = SubscriptionId(r.id()?);
    let publication = PublicationId(r.id()?);
    let details_at = r.pos;
    if !r.is_map() {
        return None;
    }
    r.skip(0)?;
    let details = match Serializer::MsgPack.decode_value(&frame[details_at..r.pos]) {
        Ok(Value::Dict(d)) => d,
        _ => return None,
    };
    let start = r.pos;
    let mut args = None;
    let mut kwargs = None;
    if len >= 5 {
        if !r.is_array() {
            return None;
        }
        r.skip(0)?;
        args = Some(0..r.pos - start);
    }
    if len == 6 {
        if !r.is_map() {
            return None;
        }
        let at = r.pos - start;
        r.skip(0)?;
        kwargs = Some(at..r.pos - start);
    }
    if r.pos != frame.len() {
        return None;
    }
    Some(RawEvent {
        subscription,
        publication,
        details,
        payload: RawPayload {
            serializer: Serializer::MsgPack,
            bytes: payload(start..frame.len()),
            args,
            kwargs,
        },
    })
}

/// A cursor over MessagePack bytes that walks values without building them,
/// checking what the full decoder would check.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn be(&mut self, n: usize) -> Option<u64> {
        Some(
            self.take(n)?
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        )
    }

    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn is_array(&self) -> bool {
        matches!(self.peek(), Some(0x90..=0x9f | 0xdc | 0xdd))
    }

    fn is_map(&self) -> bool {
        matches!(self.peek(), Some(0x80..=0x8f | 0xde | 0xdf))
    }

    fn array_len(&mut self) -> Option<usize> {
        let n = match self.byte()? {
            m @ 0x90..=0x9f => u64::from(m & 0x0f),
            0xdc => self.be(2)?,
            0xdd => self.be(4)?,
            _ => return None,
        };
        usize::try_from(n).ok()
    }

    /// A non-negative integer in any of MessagePack's encodings.
    fn uint(&mut self) -> Option<u64> {
        match self.byte()? {
            m @ 0x00..=0x7f => Some(u64::from(m)),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            0xd0 => i64::from(self.take(1)?[0] as i8).try_into().ok(),
            0xd1 => (self.be(2)? as u16 as i16).try_into().ok(),
            0xd2 => (self.be(4)? as u32 as i32).try_into().ok(),
            0xd3 => (self.be(8)? as i64).try_into().ok(),
            _ => None,
        }
    }

    fn id(&mut self) -> Option<u64> {
        self.uint().filter(|v| (1..=MAX_ID).contains(v))
    }

    /// Steps over one value; `None` for anything the pass-through leaves to
    /// the full decoder.
    fn skip(&mut self, depth: usize) -> Option<()> {
        let m = self.byte()?;
        let (kind, len) = match m {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => return Some(()),
            0xcc | 0xd0 => return self.take(1).map(drop),
            0xcd | 0xd1 => return self.take(2).map(drop),
            0xce | 0xd2 | 0xca => return self.take(4).map(drop),
            0xcf | 0xd3 | 0xcb => return self.take(8).map(drop),
            0xa0..=0xbf => (Kind::Str, u64::from(m & 0x1f)),
            0xd9 => (Kind::Str, self.be(1)?),
            0xda => (Kind::Str, self.be(2)?),
            0xdb => (Kind::Str, self.be(4)?),
            0xc4 => (Kind::Bin, self.be(1)?),
            0xc5 => (Kind::Bin, self.be(2)?),
            0xc6 => (Kind::Bin, self.be(4)?),
            0x90..=0x9f => (Kind::Array, u64::from(m & 0x0f)),
            0xdc => (Kind::Array, self.be(2)?),
            0xdd => (Kind::Array, self.be(4)?),
            0x80..=0x8f => (Kind::Map, u64::from(m & 0x0f)),
            0xde => (Kind::Map, self.be(2)?),
            0xdf => (Kind::Map, self.be(4)?),
            // Extension types and the reserved marker.
            _ => return None,
        };
        let len = usize::try_from(len).ok()?;
        match kind {
            // Invalid UTF-8 in a str decodes as bytes in the full decoder:
            // leave that conversion to it.
            // Most strings are short and ASCII: told apart without the
            // general check.
            Kind::Str => {
                let s = self.take(len)?;
                (s.is_ascii() || std::str::from_utf8(s).is_ok()).then_some(())
            }
            Kind::Bin => self.take(len).map(drop),
            Kind::Array | Kind::Map if depth >= PASS_THROUGH_DEPTH => None,
            Kind::Array => (0..len).try_for_each(|_| self.skip(depth + 1)),
            Kind::Map => (0..len).try_for_each(|_| {
                // Keys must be strings.
                if !matches!(self.peek()?, 0xa0..=0xbf | 0xd9 | 0xda | 0xdb) {
                    return None;
                }
                self.skip(depth + 1)?;
                self.skip(depth + 1)
            }),
        }
    }
}

enum Kind {
    Str,
    Bin,
    Array,
    Map,
}

// ---------------------------------------------------------------- JSON

/// `make` makes the payload's bytes from their range in `frame`.
fn decode_event_json(frame: &[u8], make: impl FnOnce(Range<usize>) -> Bytes) -> Option<RawEvent> {
    // Most frames that are not EVENTs (a RESULT per event) are told by
    // their first bytes, before the whole frame is parsed.
    if !json_starts_with_code(frame, code::EVENT) {
        return None;
    }
    // Each element's exact text, borrowed from the frame; serde_json checks
    // the syntax of all of it.
    let parts: Vec<&RawValue> = serde_json::from_slice(frame).ok()?;
    if !(4..=6).contains(&parts.len()) {
        return None;
    }
    let int = |raw: &RawValue| raw.get().parse::<u64>().ok();
    if int(parts[0])? != code::EVENT {
        return None;
    }
    let id = |raw: &RawValue| int(raw).filter(|v| (1..=MAX_ID).contains(v));
    let subscription = SubscriptionId(id(parts[1])?);
    let publication = PublicationId(id(parts[2])?);
    let details = match Serializer::Json.decode_value(parts[3].get().as_bytes()) {
        Ok(Value::Dict(d)) => d,
        _ => return None,
    };
    let payload = &parts[4..];
    let opens = [b'[', b'{'];
    for (part, open) in payload.iter().zip(opens) {
        if part.get().as_bytes().first() != Some(&open) || !json_passes(part.get()) {
            return None;
        }
    }
    // The payload's text runs from the first part to the end of the last
    // (with the comma between them), as it stood in the frame.
    let base = frame.as_ptr() as usize;
    let offset = |raw: &RawValue| (raw.get().as_ptr() as usize).checked_sub(base);
    let (range, args, kwargs) = match payload {
        [] => (0..0, None, None),
        [args] => {
            let start = offset(args)?;
            let len = args.get().len();
            (start..start + len, Some(0..len), None)
        }
        [args, kwargs] => {
            let start = offset(args)?;
            let kw_start = offset(kwargs)?.checked_sub(start)?;
            let end = kw_start + kwargs.get().len();
            (
                start..start + end,
                Some(0..args.get().len()),
                Some(kw_start..end),
            )
        }
        _ => return None,
    };
    frame.get(range.clone())?;
    let bytes = make(range);
    Some(RawEvent {
        subscription,
        publication,
        details,
        payload: RawPayload {
            serializer: Serializer::Json,
            bytes,
            args,
            kwargs,
        },
    })
}

/// `[CALL, request, {}, procedure, args..., kwargs...]` with the payload's
/// bytes spliced in: what [`encode_call`] writes for a payload in the
/// session's own serializer and no options, byte for byte as the encoder
/// would.
fn call_without_options(
    serializer: Serializer,
    request: RequestId,
    procedure: &str,
    payload: &RawPayload,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + procedure.len() + payload.bytes.len());
    match serializer {
        Serializer::MsgPack => {
            out.push(0x94 + payload.elements());
            uint(serializer, &mut out, code::CALL);
            uint(serializer, &mut out, request.0);
            empty(serializer, &mut out, false);
            string(serializer, &mut out, procedure);
            out.extend_from_slice(&payload.bytes);
        }
        Serializer::Json => {
            out.push(b'[');
            uint(serializer, &mut out, code::CALL);
            out.push(b',');
            uint(serializer, &mut out, request.0);
            out.push(b',');
            empty(serializer, &mut out, false);
            out.push(b',');
            string(serializer, &mut out, procedure);
            if payload.elements() > 0 {
                out.push(b',');
                out.extend_from_slice(&payload.bytes);
            }
            out.push(b']');
        }
    }
    out
}

/// Whether a JSON frame begins as a message of type `code` does: `[`, then
/// that number, then `,` or `]` (whitespace allowed between).
fn json_starts_with_code(frame: &[u8], code: u64) -> bool {
    json_head(frame).is_some_and(|(c, rest)| c == code && matches!(rest.first(), Some(b',' | b']')))
}

/// A JSON frame's first element as an unsigned integer, and what follows
/// it (whitespace skipped).
fn json_head(frame: &[u8]) -> Option<(u64, &[u8])> {
    json_uint_at(frame.trim_ascii_start().strip_prefix(b"[")?)
}

/// The unsigned integer `text` begins with (after whitespace), and what
/// follows it (whitespace skipped).
fn json_uint_at(text: &[u8]) -> Option<(u64, &[u8])> {
    let text = text.trim_ascii_start();
    let digits = text.iter().take_while(|b| b.is_ascii_digit()).count();
    let n = std::str::from_utf8(&text[..digits]).ok()?.parse().ok()?;
    Some((n, text[digits..].trim_ascii_start()))
}

/// Whether the full JSON decoder would accept this value: parses it all
/// (numbers in range, string escapes, surrogates), allocating nothing,
/// and checks the nesting depth.
fn json_passes(text: &str) -> bool {
    let mut de = serde_json::Deserializer::from_str(text);
    Check { depth: 0 }.deserialize(&mut de).is_ok() && de.end().is_ok()
}

#[derive(Clone, Copy)]
struct Check {
    depth: usize,
}

impl Check {
    fn nested<E: de::Error>(self) -> Result<Check, E> {
        if self.depth >= PASS_THROUGH_DEPTH {
            return Err(E::custom("deep"));
        }
        Ok(Check {
            depth: self.depth + 1,
        })
    }
}

impl<'de> DeserializeSeed<'de> for Check {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a WAMP value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.nested()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.nested()?;
        while map.next_key::<de::IgnoredAny>()?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wamp::message::Event;

    fn payloads() -> Vec<Payload> {
        let blob = Value::Bytes(vec![0, 1, 2, 255, 128]);
        vec![
            Payload::default(),
            Payload::new(vec![Value::UInt(1)], Dict::new()),
            Payload::new(Vec::new(), Dict::new().with("k", "v")),
            Payload::new(
                vec![
                    "status".into(),
                    Value::int(-7),
                    Value::Float(2.5),
                    Value::Null,
                    Value::Bool(true),
                    blob.clone(),
                    Value::List(vec![Value::Dict(Dict::new().with("deep", blob.clone()))]),
                ],
                Dict::new()
                    .with("seq", 5u64)
                    .with("blob", blob)
                    .with("text", "é \" \\ \u{1F600}"),
            ),
        ]
    }

    fn event_frame(ser: Serializer, payload: Payload) -> Vec<u8> {
        ser.encode(&Message::Event(Event {
            subscription: SubscriptionId(8893464892931420),
            publication: PublicationId(6358646022012579),
            details: Dict::new().with("publisher", 1u64).with("topic", "a.b"),
            payload,
        }))
        .unwrap()
    }

    #[test]
    fn raw_events_decode_to_what_the_full_decoder_gives() {
        for ser in Serializer::ALL {
            for payload in payloads() {
                let frame = event_frame(ser, payload.clone());
                let raw = decode_event(ser, &frame).expect("passes through");
                let Message::Event(full) = ser.decode(&frame).unwrap() else {
                    panic!()
                };
                assert_eq!(raw.subscription, full.subscription);
                assert_eq!(raw.publication, full.publication);
                assert_eq!(raw.details, full.details);
                assert_eq!(raw.payload.decode().unwrap(), full.payload, "{ser}");
                assert_eq!(full.payload, payload);
            }
        }
    }

    #[test]
    fn a_spliced_call_decodes_like_an_encoded_one_in_both_serializers_and_across() {
        for from in Serializer::ALL {
            for to in Serializer::ALL {
                for payload in payloads() {
                    let raw = decode_event(from, &event_frame(from, payload.clone()))
                        .unwrap()
                        .payload;
                    let bytes = encode_call(
                        to,
                        RequestId(77),
                        Dict::new().with("timeout", 5u64),
                        "com.example.SUB_x",
                        &raw,
                    )
                    .unwrap();
                    let expected = Message::Call {
                        request: RequestId(77),
                        options: Dict::new().with("timeout", 5u64),
                        procedure: "com.example.SUB_x".into(),
                        payload: payload.clone(),
                    };
                    assert_eq!(to.decode(&bytes).unwrap(), expected, "{from} -> {to}");
                }
            }
        }
    }

    #[test]
    fn the_same_serializer_splices_the_received_bytes_unchanged() {
        // 1e2 and the escaped é stay exactly as the publisher wrote them.
        let frame = br#"[36,1,2,{},[1e2,"\u00e9"],{"k":[true]}]"#;
        let raw = decode_event(Serializer::Json, frame).unwrap().payload;
        let call = encode_call(Serializer::Json, RequestId(3), Dict::new(), "p", &raw).unwrap();
        assert_eq!(call, br#"[48,3,{},"p",[1e2,"\u00e9"],{"k":[true]}]"#);
    }

    #[test]
    fn anything_unusual_is_left_to_the_full_decoder() {
        let json: &[&[u8]] = &[
            br#"[36,1,2,{},{}]"#,         // args not a list
            br#"[36,1,2,{},[],[]]"#,      // kwargs not a dict
            br#"[36,0,2,{}]"#,            // id out of range
            br#"[36,1,2,{},[1e400]]"#,    // number out of range
            br#"[36,1,2,{},["\ud800"]]"#, // lone surrogate
            br#"[36,1,2,{},[]] "#,        // fine: trailing whitespace
            br#"[36,1,2,{},[]]x"#,        // trailing garbage
            br#"[48,1,{},"p",[]]"#,       // not an EVENT
            br#"[36,1,2,{},[],{},{}]"#,   // too long
        ];
        for frame in json {
            let raw = decode_event(Serializer::Json, frame);
            let full = Serializer::Json.decode(frame);
            match (&raw, &full) {
                (Some(r), Ok(Message::Event(e))) => {
                    assert_eq!(r.payload.decode().unwrap(), e.payload)
                }
                (Some(_), other) => panic!("accepted what the decoder gives {other:?}"),
                (None, _) => {}
            }
        }
        let deep = format!("[36,1,2,{{}},{}{}]", "[".repeat(40), "]".repeat(40));
        assert!(decode_event(Serializer::Json, deep.as_bytes()).is_none());
        // MessagePack: invalid UTF-8 in a str (the full decoder makes bytes
        // of it), an extension type, a non-string key, trailing bytes.
        let msgpack: &[&[u8]] = &[
            &[0x95, 36, 1, 2, 0x80, 0x91, 0xa1, 0xff],
            &[0x95, 36, 1, 2, 0x80, 0x91, 0xd4, 1, 1],
            &[0x96, 36, 1, 2, 0x80, 0x90, 0x81, 1, 2],
            &[0x95, 36, 1, 2, 0x80, 0x90, 0x00],
        ];
        for frame in msgpack {
            assert!(
                decode_event(Serializer::MsgPack, frame).is_none(),
                "{frame:?}"
            );
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn arbitrary_bytes_never_pass_unless_the_decoder_agrees(
                bytes in proptest::collection::vec(any::<u8>(), 0..256)
            ) {
                for ser in Serializer::ALL {
                    if let Some(raw) = decode_event(ser, &bytes) {
                        let Ok(Message::Event(e)) = ser.decode(&bytes) else {
                            panic!("passed what the decoder rejects")
                        };
                        prop_assert_eq!(raw.payload.decode().unwrap(), e.payload);
                    }
                }
            }

            #[test]
            fn mutated_events_never_pass_unless_the_decoder_agrees(
                flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            ) {
                for ser in Serializer::ALL {
                    for payload in payloads() {
                        let mut frame = event_frame(ser, payload);
                        for (at, byte) in &flips {
                            let i = at.index(frame.len());
                            frame[i] = *byte;
                        }
                        if let Some(raw) = decode_event(ser, &frame) {
                            let Ok(Message::Event(e)) = ser.decode(&frame) else {
                                panic!("passed what the decoder rejects: {frame:?}")
                            };
                            prop_assert_eq!(raw.details, e.details);
                            prop_assert_eq!(raw.payload.decode().unwrap(), e.payload);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn an_event_read_from_shared_bytes_keeps_its_payload_in_the_frame() {
        for ser in Serializer::ALL {
            let payload = Payload::new(vec![Value::UInt(7)], Dict::new().with("k", "v"));
            let frame = Bytes::from(event_frame(ser, payload.clone()));
            let raw = decode_event_in(ser, &frame).expect("an EVENT");
            assert_eq!(raw, decode_event(ser, &frame).unwrap(), "{ser}");
            let (bytes, _, _) = raw.payload.parts();
            let within = frame.as_ptr_range();
            assert!(
                within.contains(&bytes.as_ptr()),
                "{ser}: a slice, not a copy"
            );
            assert_eq!(raw.payload.decode().unwrap(), payload);
        }
    }

    #[test]
    fn a_json_frame_is_told_from_its_type_code_before_it_is_parsed() {
        for (frame, event) in [
            (&b"[36,1,2,{}]"[..], true),
            (b" [ 36 , 1, 2, {}]", true),
            (b"[36]", true),
            (b"[50,1,{}]", false),
            (b"[360,1,2,{}]", false),
            (b"[3,1,2,{}]", false),
            (b"36", false),
            (b"[", false),
            (b"", false),
        ] {
            let text = String::from_utf8_lossy(frame);
            assert_eq!(json_starts_with_code(frame, code::EVENT), event, "{text}");
        }
    }

    #[test]
    fn a_results_request_is_read_from_its_head_in_both_serializers() {
        for ser in Serializer::ALL {
            let result = |request, payload| Message::Result {
                request: RequestId(request),
                details: Dict::new(),
                payload,
            };
            let full = Payload::new(vec![Value::UInt(1)], Dict::new().with("k", "v"));
            for (msg, expected) in [
                (result(7, full), Some(RequestId(7))),
                (result(MAX_ID, Payload::default()), Some(RequestId(MAX_ID))),
                (
                    Message::Published {
                        request: RequestId(7),
                        publication: PublicationId(9),
                    },
                    None,
                ),
            ] {
                let frame = ser.encode(&msg).unwrap();
                assert_eq!(result_request(ser, &frame), expected, "{ser} {msg:?}");
            }
            let event = event_frame(ser, Payload::default());
            assert_eq!(result_request(ser, &event), None, "{ser}");
        }
        assert_eq!(result_request(Serializer::Json, b"[50,0,{}]"), None);
        assert_eq!(result_request(Serializer::Json, b"[50,7]"), None);
    }

    #[test]
    fn a_call_without_options_is_written_as_the_encoder_writes_it() {
        let payloads = [
            Payload::default(),
            Payload::new(vec![Value::UInt(7), Value::from("é\"x")], Dict::new()),
            Payload::new(vec![], Dict::new().with("k", "v")),
        ];
        for ser in Serializer::ALL {
            for payload in &payloads {
                let raw = decode_event(ser, &event_frame(ser, payload.clone()))
                    .unwrap()
                    .payload;
                for request in [1, 127, 128, 255, 256, 65_535, 65_536, 1 << 40, MAX_ID] {
                    for procedure in [
                        "p",
                        "com.example.SUB_with_a_name_of_more_than_31_bytes",
                        "a\"quote\\and\u{1}control",
                    ] {
                        let fast =
                            encode_call(ser, RequestId(request), Dict::new(), procedure, &raw)
                                .unwrap();
                        let full = ser
                            .encode(&Message::Call {
                                request: RequestId(request),
                                options: Dict::new(),
                                procedure: procedure.to_owned(),
                                payload: payload.clone(),
                            })
                            .unwrap();
                        assert_eq!(fast, full, "{ser} {request} {procedure} {payload:?}");
                    }
                }
            }
        }
    }
}
