//! Per-key ordering's keys (`SUBTOCALL_ORDER_BY`): the bytes of an event's
//! key value and a named hash over them, FNV-1a with 64 bits, so that the
//! partition a key falls in (with the Redis queue) is the same in every
//! build and can be computed in any language:
//!
//! ```text
//! bytes(key)      a string: its UTF-8 bytes; binary: the bytes; an integer:
//!                 its decimal digits (with '-' when negative); true/false;
//!                 null; anything else (a float, a list, a dict): its JSON
//!                 text as WAMP's JSON serializer writes it
//! partition(key)  fnv1a64(bytes(key)) mod SUBTOCALL_ORDER_PARTITIONS
//! ```
//!
//! Within an instance, a key's line is a hash of its procedure and its
//! value, the value's type included (a string and the same bytes, or 1 and
//! 1.0, are different keys; in one partition they may well share). Pure.

use std::io::Write as _;

use crate::config::OrderBy;
use crate::forward::envelope::SharedEvent;
use crate::wamp::{Serializer, Value};

/// An event's ordering key under `order_by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOf {
    /// No ordering configured.
    Unordered,
    /// The event lacks the key: it goes unordered.
    Missing,
    Key(OrderKey),
}

impl KeyOf {
    pub fn key(self) -> Option<OrderKey> {
        match self {
            KeyOf::Key(k) => Some(k),
            KeyOf::Unordered | KeyOf::Missing => None,
        }
    }
}

/// `event`'s ordering key under `order_by` (`SUBTOCALL_ORDER_BY`).
pub fn key_of(order_by: &OrderBy, event: &SharedEvent) -> KeyOf {
    match order_by {
        OrderBy::None => KeyOf::Unordered,
        OrderBy::Topic => KeyOf::Key(OrderKey::from_bytes(
            &event.procedure,
            1,
            event.topic.as_bytes(),
        )),
        OrderBy::Kwarg(_) | OrderBy::Arg(_) => {
            let payload = event.payload.decoded().ok();
            let value = payload.as_deref().and_then(|p| match order_by {
                OrderBy::Kwarg(name) => p.kwargs.get(name),
                OrderBy::Arg(n) => p.args.get(*n),
                OrderBy::None | OrderBy::Topic => None,
            });
            match value {
                Some(value) => KeyOf::Key(OrderKey::of(&event.procedure, value)),
                None => KeyOf::Missing,
            }
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64 bits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_more(FNV_OFFSET, bytes)
}

/// Goes on hashing `bytes` after `hash`.
fn fnv1a64_more(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// `value`'s bytes (see the module's table), appended to `out`; and a byte
/// that tells its type apart.
pub fn key_bytes(value: &Value, out: &mut Vec<u8>) -> u8 {
    match value {
        Value::Str(s) => {
            out.extend_from_slice(s.as_bytes());
            1
        }
        Value::Bytes(b) => {
            out.extend_from_slice(b);
            2
        }
        Value::Int(n) => {
            let _ = write!(out, "{n}");
            3
        }
        Value::UInt(n) => {
            let _ = write!(out, "{n}");
            3
        }
        Value::Bool(b) => {
            out.extend_from_slice(if *b { b"true" } else { b"false" });
            4
        }
        Value::Null => {
            out.extend_from_slice(b"null");
            5
        }
        Value::Float(_) | Value::List(_) | Value::Dict(_) => {
            out.extend_from_slice(&Serializer::Json.encode_value(value));
            6
        }
    }
}

/// An ordering key: the hash of its line (procedure and typed value) and
/// the hash its partition comes from (the value's bytes alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderKey {
    pub line: u64,
    pub partition_hash: u64,
}

impl OrderKey {
    /// The key of `value` for events of `procedure`.
    pub fn of(procedure: &str, value: &Value) -> OrderKey {
        let mut bytes = Vec::with_capacity(32);
        let kind = key_bytes(value, &mut bytes);
        OrderKey::from_bytes(procedure, kind, &bytes)
    }

    /// The key of a value whose bytes are `bytes` (its type `kind`).
    pub fn from_bytes(procedure: &str, kind: u8, bytes: &[u8]) -> OrderKey {
        let partition_hash = fnv1a64(bytes);
        let line = fnv1a64_more(fnv1a64(procedure.as_bytes()), &[0xff, kind]);
        OrderKey {
            line: fnv1a64_more(line, bytes),
            partition_hash,
        }
    }

    /// The partition its events go to, of `partitions`.
    pub fn partition(&self, partitions: u16) -> u16 {
        (self.partition_hash % u64::from(partitions.max(1))) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_its_published_vectors() {
        // From the FNV reference (isthe.com/chongo/tech/comp/fnv).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// The vectors `doc/operations.md` gives for other implementations.
    #[test]
    fn partitions_of_documented_keys() {
        let p = |v: Value| OrderKey::of("com.example.SUB_orders", &v).partition(16);
        assert_eq!(fnv1a64(b"order-1"), 0xdee4_809f_34be_e86d);
        assert_eq!(p(Value::from("order-1")), 13);
        assert_eq!(fnv1a64(b"order-2"), 0xdee4_7d9f_34be_e354);
        assert_eq!(p(Value::from("order-2")), 4);
        assert_eq!(fnv1a64(b"42"), 0x07ee_7e07_b4b1_9223);
        assert_eq!(p(Value::UInt(42)), 3);
        assert_eq!(fnv1a64(b"-7"), 0x07d0_1107_b497_db5d);
        assert_eq!(p(Value::Int(-7)), 13);
        assert_eq!(
            p(Value::Bytes(b"order-1".to_vec())),
            13,
            "bytes as they are"
        );
        assert_eq!(p(Value::UInt(42)), p(Value::from("42")), "same bytes");
    }

    #[test]
    fn lines_tell_types_and_procedures_apart_partitions_do_not() {
        let a = OrderKey::of("p.SUB_a", &Value::from("1"));
        let b = OrderKey::of("p.SUB_a", &Value::UInt(1));
        let c = OrderKey::of("p.SUB_b", &Value::from("1"));
        assert_ne!(a.line, b.line);
        assert_ne!(a.line, c.line);
        assert_eq!(a.partition_hash, b.partition_hash);
        assert_eq!(a.partition_hash, c.partition_hash);
        assert_eq!(a, OrderKey::of("p.SUB_a", &Value::from("1")));
    }
}
