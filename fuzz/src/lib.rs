//! The checks the fuzz targets run on one input: the decoders that take
//! router input must not panic, and what they accept must survive being
//! encoded again. `tests/fuzz.rs` includes this file as a module, so stable
//! CI runs every saved input in `fuzz/regressions/` and a bounded generated
//! run through exactly these assertions. A violated check panics, which is
//! what the fuzzer reports. May call only `subtocall::wamp`, the queue
//! entry's codec and the policy file's parser.

use subtocall::streams::entry;
use subtocall::wamp::codec::{Serializer, json_string_to_bytes};
use subtocall::wamp::message::{Element, Message, Payload};
use subtocall::wamp::raw::{decode_event, decode_event_in, encode_call, result_request};
use subtocall::wamp::{Dict, RequestId, Value};

/// `frame` through [`Serializer::decode`] of both serializers. Whatever
/// decodes is encoded in each serializer and decoded again: in its own it
/// must come back as the same message, in the other as the same values up
/// to what that format cannot tell apart ([`reads_back_as`]).
pub fn codec(frame: &[u8]) {
    for from in Serializer::ALL {
        let decoded = from.decode(frame);
        // The head of a RESULT read alone (for a RESULT nobody reads) names
        // the request the full decoder finds there, whenever it decodes.
        if let (Some(request), Ok(msg)) = (result_request(from, frame), &decoded) {
            assert!(
                matches!(msg, Message::Result { request: r, .. } if *r == request),
                "{from}: the head says a RESULT for {request:?}, the full decoder {msg:?}"
            );
        }
        if let Ok(Message::Result { request, .. }) = &decoded {
            assert_eq!(result_request(from, frame), Some(*request), "{from}");
        }
        let Ok(msg) = decoded else {
            continue;
        };
        let original = elements(&msg);
        for to in Serializer::ALL {
            let encoded = to
                .encode(&msg)
                .unwrap_or_else(|e| panic!("{from} {msg:?} does not encode as {to}: {e}"));
            let back = match to.decode_value(&encoded) {
                Ok(Value::List(list)) => list,
                other => panic!("{from} {msg:?} encoded as {to} reads back as {other:?}"),
            };
            assert!(
                list_reads_back_as(&back, &original, from, to),
                "{from} {msg:?} through {to} reads back as {back:?}"
            );
            if from == to {
                let again = to
                    .decode(&encoded)
                    .unwrap_or_else(|e| panic!("{msg:?} re-encoded as {to} is not a message: {e}"));
                assert!(
                    list_reads_back_as(&elements(&again), &original, from, to),
                    "{msg:?} re-encoded as {to} decodes as {again:?}"
                );
            }
        }
    }
}

/// `frame` through the EVENT pass-through ([`decode_event`]) of both
/// serializers. A frame it accepts must be an EVENT the full decoder accepts
/// with the same ids, details and payload, and the payload forwarded with
/// [`encode_call`] in each serializer (spliced in its own, transcoded in
/// the other) must make a CALL that decodes to that payload.
pub fn raw_event(frame: &[u8]) {
    for from in Serializer::ALL {
        let full = from.decode(frame);
        let Some(raw) = decode_event(from, frame) else {
            assert_eq!(
                decode_event_in(from, &bytes::Bytes::copy_from_slice(frame)),
                None
            );
            continue;
        };
        // The connection's way (the payload a slice of the frame) reads the
        // same.
        assert_eq!(
            decode_event_in(from, &bytes::Bytes::copy_from_slice(frame)).as_ref(),
            Some(&raw),
            "{from}"
        );
        let Ok(Message::Event(event)) = full else {
            panic!("the {from} pass-through accepted a frame the full decoder gives {full:?}");
        };
        assert_eq!(raw.subscription, event.subscription, "{from}");
        assert_eq!(raw.publication, event.publication, "{from}");
        assert!(
            dict_reads_back_as(&raw.details, &event.details, from, from),
            "{from} details {:?}, the full decoder's {:?}",
            raw.details,
            event.details
        );
        assert_eq!(raw.payload.serializer(), from);
        let payload = raw
            .payload
            .decode()
            .unwrap_or_else(|e| panic!("an accepted {from} payload does not decode: {e}"));
        assert!(
            payload_reads_back_as(&payload, &event.payload, from, from),
            "{from} payload {payload:?}, the full decoder's {:?}",
            event.payload
        );
        // With options (the general way) and without (the forwarding path,
        // whose head is written directly); request ids of each width.
        let cases = [
            (Dict::new().with("timeout", 5000u64), 7),
            (Dict::new(), 7),
            (Dict::new(), 300),
            (Dict::new(), 70_000),
            (Dict::new(), 1 << 40),
        ];
        let procedure = "com.example.SUB_fuzz";
        for (to, (options, request)) in Serializer::ALL
            .into_iter()
            .flat_map(|to| cases.iter().map(move |c| (to, c)))
        {
            let call = encode_call(
                to,
                RequestId(*request),
                options.clone(),
                procedure,
                &raw.payload,
            )
            .unwrap_or_else(|e| panic!("a {from} payload does not make a {to} CALL: {e}"));
            let decoded = to
                .decode(&call)
                .unwrap_or_else(|e| panic!("the {to} CALL for a {from} payload: {e}"));
            let Message::Call {
                request: got_request,
                options: got_options,
                procedure: got_procedure,
                payload: got,
            } = decoded
            else {
                panic!("the {to} CALL for a {from} payload decodes as {decoded:?}");
            };
            assert_eq!(got_request, RequestId(*request), "{from} -> {to}");
            assert_eq!(&got_options, options, "{from} -> {to}");
            assert_eq!(got_procedure, procedure, "{from} -> {to}");
            assert!(
                payload_reads_back_as(&got, &event.payload, from, to),
                "{from} -> {to}: the CALL carries {got:?}, not {:?}",
                event.payload
            );
        }
    }
}

/// A message's wire elements as values (what [`Message::from_list`] reads).
fn elements(msg: &Message) -> Vec<Value> {
    let mut out = Vec::new();
    let _ = msg.for_each_element(|el| {
        out.push(match el {
            Element::UInt(v) => Value::UInt(v),
            Element::Str(s) => Value::Str(s.to_owned()),
            Element::Dict(d) => Value::Dict(d.clone()),
            Element::List(l) => Value::List(l.to_vec()),
        });
        Ok::<(), ()>(())
    });
    out
}

/// Whether `got`, read back from `to`, is what `original`, decoded from
/// `from`, should read back as. The same serializer keeps everything, with
/// floats compared by their bits (a NaN is the same NaN, `-0.0` is not
/// `0.0`). JSON to MessagePack loses nothing. MessagePack to JSON loses two
/// distinctions JSON cannot make: a string that reads as WAMP's binary
/// convention (`\0` followed by base64) comes back as those bytes, and a NaN
/// or infinite float is written as `null` (serde_json's choice).
pub fn reads_back_as(got: &Value, original: &Value, from: Serializer, to: Serializer) -> bool {
    let to_json = from == Serializer::MsgPack && to == Serializer::Json;
    match original {
        Value::Float(f) if to_json && !f.is_finite() => got.is_null(),
        Value::Float(f) => matches!(got, Value::Float(g) if g.to_bits() == f.to_bits()),
        Value::Str(s) if to_json => match json_string_to_bytes(s) {
            Some(bytes) => matches!(got, Value::Bytes(b) if *b == bytes),
            None => got == original,
        },
        Value::List(list) => {
            matches!(got, Value::List(g) if list_reads_back_as(g, list, from, to))
        }
        Value::Dict(dict) => {
            matches!(got, Value::Dict(g) if dict_reads_back_as(g, dict, from, to))
        }
        _ => got == original,
    }
}

fn list_reads_back_as(got: &[Value], original: &[Value], from: Serializer, to: Serializer) -> bool {
    got.len() == original.len()
        && got
            .iter()
            .zip(original)
            .all(|(g, o)| reads_back_as(g, o, from, to))
}

/// Keys in order, duplicates included (the decoders keep both).
fn dict_reads_back_as(got: &Dict, original: &Dict, from: Serializer, to: Serializer) -> bool {
    got.len() == original.len()
        && got
            .iter()
            .zip(original.iter())
            .all(|((gk, gv), (ok, ov))| gk == ok && reads_back_as(gv, ov, from, to))
}

fn payload_reads_back_as(
    got: &Payload,
    original: &Payload,
    from: Serializer,
    to: Serializer,
) -> bool {
    list_reads_back_as(&got.args, &original.args, from, to)
        && dict_reads_back_as(&got.kwargs, &original.kwargs, from, to)
}

/// A stored queue entry's `e` field (Redis holds what any instance, build
/// or tool wrote there): decoding arbitrary bytes never panics; an event
/// that decodes, stored again, decodes to the same event, and the CALL
/// payload it makes is the one it had.
pub fn queue_entry(stored: &[u8]) {
    let Ok(event) = entry::decode("p.SUB_x", bytes::Bytes::copy_from_slice(stored)) else {
        return;
    };
    let again = entry::encode(&event);
    let back = entry::decode("p.SUB_x", bytes::Bytes::from(again))
        .unwrap_or_else(|e| panic!("an event read from an entry does not read back: {e}"));
    assert_eq!(back.topic, event.topic);
    assert_eq!(back.publication, event.publication);
    assert_eq!(back.publisher, event.publisher);
    assert_eq!(back.publisher_authid, event.publisher_authid);
    assert_eq!(back.publisher_authrole, event.publisher_authrole);
    assert_eq!(back.received_at, event.received_at);
    match (event.call_payload(None), back.call_payload(None)) {
        (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("stored again, its payload changed: {a:?} then {b:?}"),
    }
}

/// A policy file as an operator writes it (`SUBTOCALL_POLICY_FILE`): read
/// as text, it is either rules or problems, never a panic. Every problem
/// names the file and a line of it; every rule starts on a line of it; the
/// first rule a procedure resolves to matches it.
pub fn policy_file(bytes: &[u8]) {
    use subtocall::config::Config;
    use subtocall::policy::{Policies, glob_matches};

    let text = String::from_utf8_lossy(bytes);
    // The variables' own defaults (nothing set).
    let config = Config::from_vars(Vec::new()).expect("the defaults are a configuration");
    let defaults = config.policies.defaults().clone();
    let context = config.policy_context();
    let lines = text.matches('\n').count() + 1;
    match Policies::load("f.toml".into(), &text, defaults, &context) {
        Ok(policies) => {
            for (i, rule) in policies.rules().iter().enumerate() {
                assert!(
                    (1..=lines).contains(&rule.line),
                    "rule {i} on line {}",
                    rule.line
                );
                // A rule's own pattern, read as a URI, resolves to it or to
                // an earlier rule that matches it too.
                let resolved = policies.resolve(&rule.pattern);
                let first = resolved.rule.expect("a pattern matches itself");
                assert!(first <= i);
                assert!(glob_matches(
                    &policies.rules()[first].pattern,
                    &rule.pattern
                ));
            }
        }
        Err(problems) => {
            assert!(!problems.is_empty());
            for problem in problems {
                let line: usize = problem
                    .strip_prefix("f.toml:")
                    .and_then(|rest| rest.split(':').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("no file and line in {problem:?}"));
                assert!(
                    (1..=lines).contains(&line),
                    "line {line} of {lines} in {problem:?}"
                );
            }
        }
    }
}
