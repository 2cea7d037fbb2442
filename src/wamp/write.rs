//! Wire values written straight into a frame, in either serializer, for
//! messages assembled from parts (a batch's arguments, a forwarded CALL's
//! head): the same bytes the encoder writes. A leaf: no other module here.

use super::codec::Serializer;

/// An empty list or dict.
pub fn empty(ser: Serializer, out: &mut Vec<u8>, list: bool) {
    match (ser, list) {
        (Serializer::MsgPack, true) => out.push(0x90),
        (Serializer::MsgPack, false) => out.push(0x80),
        (Serializer::Json, true) => out.extend_from_slice(b"[]"),
        (Serializer::Json, false) => out.extend_from_slice(b"{}"),
    }
}

/// A string.
pub fn string(ser: Serializer, out: &mut Vec<u8>, s: &str) {
    match ser {
        // Nothing to escape (URIs, topics): as serde_json writes it.
        Serializer::Json if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') => {
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
            out.push(b'"');
        }
        Serializer::Json => {
            // Writing a string into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, s);
        }
        Serializer::MsgPack => {
            let n = s.len();
            if n < 32 {
                out.push(0xa0 | n as u8);
            } else if n <= 0xff {
                out.extend_from_slice(&[0xd9, n as u8]);
            } else if n <= 0xffff {
                out.push(0xda);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            } else {
                out.push(0xdb);
                out.extend_from_slice(&(n as u32).to_be_bytes());
            }
            out.extend_from_slice(s.as_bytes());
        }
    }
}

/// An unsigned integer (in MessagePack, its shortest form).
pub fn uint(ser: Serializer, out: &mut Vec<u8>, n: u64) {
    match ser {
        Serializer::Json => {
            // Without the formatting machinery: this runs for every CALL.
            let mut digits = [0u8; 20];
            let mut at = digits.len();
            let mut v = n;
            loop {
                at -= 1;
                digits[at] = b'0' + (v % 10) as u8;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            out.extend_from_slice(&digits[at..]);
        }
        Serializer::MsgPack => {
            if n < 128 {
                out.push(n as u8);
            } else if n <= 0xff {
                out.extend_from_slice(&[0xcc, n as u8]);
            } else if n <= 0xffff {
                out.push(0xcd);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            } else if n <= 0xffff_ffff {
                out.push(0xce);
                out.extend_from_slice(&(n as u32).to_be_bytes());
            } else {
                out.push(0xcf);
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wamp::value::Value;

    /// The same bytes as the encoder, for every width and for strings with
    /// and without something to escape.
    #[test]
    fn values_are_written_as_the_encoder_writes_them() {
        for ser in Serializer::ALL {
            for n in [0, 127, 128, 255, 256, 65_535, 65_536, 1 << 32, u64::MAX] {
                let mut out = Vec::new();
                uint(ser, &mut out, n);
                assert_eq!(out, ser.encode_value(&Value::UInt(n)), "{ser} {n}");
            }
            let long = "x".repeat(300);
            for s in [
                "",
                "com.example.SUB_x",
                "é",
                "a\"b\\c\u{1}\u{7f}",
                "\u{1}",
                "a\tb",
                "a\"b",
                "a\\b",
                "\u{7f}",
                long.as_str(),
            ] {
                let mut out = Vec::new();
                string(ser, &mut out, s);
                assert_eq!(out, ser.encode_value(&Value::from(s)), "{ser} {s:?}");
            }
        }
    }
}
