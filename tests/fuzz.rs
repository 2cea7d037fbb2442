//! The fuzz targets' checks (`fuzz/src/lib.rs`) on stable, without
//! cargo-fuzz: every saved input in `fuzz/regressions/<target>/` (seeds and
//! whatever a fuzz run found), then a short run over generated inputs, both
//! arbitrary bytes and valid frames with random payloads, cut and mutated.
//! The real, open-ended fuzzing is `cargo fuzz run` (doc/architecture.md).

// The checks are the fuzz crate's library, compiled here as a module so that
// the main workspace needs neither that crate nor libFuzzer.
#[path = "../fuzz/src/lib.rs"]
mod checks;

use std::fs;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use subtocall::wamp::message::Event;
use subtocall::wamp::{Dict, Message, Payload, PublicationId, Serializer, SubscriptionId, Value};

/// The files saved for one target, sorted; at least one, so that a moved
/// directory cannot turn the test into a no-op.
fn regressions(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no inputs in {}", dir.display());
    files
}

fn run_saved(target: &str, check: fn(&[u8])) {
    for file in regressions(target) {
        let input = fs::read(&file).expect("readable input");
        let outcome = std::panic::catch_unwind(|| check(&input));
        assert!(outcome.is_ok(), "{} fails its check", file.display());
    }
}

#[test]
fn every_saved_codec_input_passes_the_codec_check() {
    run_saved("codec", checks::codec);
}

#[test]
fn every_saved_raw_event_input_passes_the_raw_event_check() {
    run_saved("raw_event", checks::raw_event);
}

#[test]
fn every_saved_queue_entry_input_passes_the_queue_entry_check() {
    run_saved("queue_entry", checks::queue_entry);
}

#[test]
fn every_saved_policy_file_passes_the_policy_file_check() {
    run_saved("policy_file", checks::policy_file);
}

// ---- a bounded run over generated inputs ------------------------------------

/// Any value either decoder can produce, including what only one of them
/// can (NaN and infinities from MessagePack, strings that read as WAMP's
/// binary convention), so that transcoding meets them too.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::int),
        any::<u64>().prop_map(Value::UInt),
        any::<f64>().prop_map(Value::Float),
        // proptest's any::<f64>() leaves these out.
        prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(-0.0),
        ]
        .prop_map(Value::Float),
        ".{0,12}".prop_map(Value::Str),
        "\u{0}[A-Za-z0-9+/]{0,8}={0,2}".prop_map(Value::Str),
        proptest::collection::vec(any::<u8>(), 0..24).prop_map(Value::Bytes),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::List),
            proptest::collection::vec((".{0,6}", inner), 0..6)
                .prop_map(|kv| Value::Dict(kv.into_iter().collect())),
        ]
    })
}

fn payload() -> impl Strategy<Value = Payload> {
    (
        proptest::collection::vec(value(), 0..5),
        proptest::collection::vec(("[a-z_]{1,8}", value()), 0..4),
    )
        .prop_map(|(args, kwargs)| Payload::new(args, kwargs.into_iter().collect()))
}

/// An EVENT frame in `ser`, as the router would send it.
fn event_frame(ser: Serializer, payload: Payload, topic: Option<String>) -> Vec<u8> {
    let mut details = Dict::new().with("publisher", 5546838114206924u64);
    if let Some(topic) = topic {
        details.insert("topic", topic);
    }
    ser.encode(&Message::Event(Event {
        subscription: SubscriptionId(8893464892931420),
        publication: PublicationId(6358646022012579),
        details,
        payload,
    }))
    .expect("an EVENT encodes")
}

/// One edit to a frame: overwrite, insert or remove a byte, or cut it short.
#[derive(Debug, Clone)]
enum Edit {
    Set(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Remove(prop::sample::Index),
    Cut(prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, b)| Edit::Set(at, b)),
        1 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, b)| Edit::Insert(at, b)),
        1 => any::<prop::sample::Index>().prop_map(Edit::Remove),
        1 => any::<prop::sample::Index>().prop_map(Edit::Cut),
    ]
}

fn apply(frame: &mut Vec<u8>, edit: &Edit) {
    if frame.is_empty() {
        return;
    }
    match edit {
        Edit::Set(at, b) => {
            let i = at.index(frame.len());
            frame[i] = *b;
        }
        Edit::Insert(at, b) => frame.insert(at.index(frame.len() + 1), *b),
        Edit::Remove(at) => {
            frame.remove(at.index(frame.len()));
        }
        Edit::Cut(at) => frame.truncate(at.index(frame.len())),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_bytes_pass_both_checks(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        checks::codec(&bytes);
        checks::raw_event(&bytes);
        checks::queue_entry(&bytes);
    }

}

proptest! {
    // Each case checks up to eight frames (both serializers, each edit): a
    // few thousand frames in all, some seconds in a debug build.
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn generated_events_pass_both_checks_whole_and_mutated(
        payload in payload(),
        topic in proptest::option::of("[a-z.]{1,12}"),
        edits in proptest::collection::vec(edit(), 0..4),
    ) {
        for ser in Serializer::ALL {
            let mut frame = event_frame(ser, payload.clone(), topic.clone());
            checks::codec(&frame);
            checks::raw_event(&frame);
            for edit in &edits {
                apply(&mut frame, edit);
                checks::codec(&frame);
                checks::raw_event(&frame);
            }
        }
    }
}

/// An EVENT frame's event as a queue entry stores it.
fn stored_entry(frame: &[u8], ser: Serializer, topic: &str) -> Vec<u8> {
    let raw = subtocall::wamp::raw::decode_event(ser, frame).expect("a valid EVENT");
    let event = subtocall::forward::envelope::SharedEvent::from_raw(
        "p.SUB_x".into(),
        topic.into(),
        raw,
        std::time::SystemTime::now(),
    );
    subtocall::streams::entry::encode(&event)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn generated_queue_entries_pass_the_queue_entry_check_whole_and_mutated(
        payload in payload(),
        topic in "[a-z.]{1,12}",
        long in any::<bool>(),
        edits in proptest::collection::vec(edit(), 0..4),
    ) {
        // A topic too long for a 2-byte length makes the second layout.
        let topic = if long { topic.repeat(70_000 / topic.len() + 1) } else { topic };
        for ser in Serializer::ALL {
            let frame = event_frame(ser, payload.clone(), None);
            let mut stored = stored_entry(&frame, ser, &topic);
            checks::queue_entry(&stored);
            for edit in &edits {
                apply(&mut stored, edit);
                checks::queue_entry(&stored);
            }
        }
    }
}

/// Policy files: the saved ones cut, spliced and mutated line by line
/// (keys, values and headers moved around), and arbitrary text.
fn policy_text() -> impl Strategy<Value = String> {
    let seeds: Vec<String> = regressions("policy_file")
        .iter()
        .map(|f| fs::read_to_string(f).expect("a seed is text"))
        .collect();
    let lines: Vec<String> = seeds
        .iter()
        .flat_map(|s| s.lines().map(str::to_owned))
        .chain(["[[policy]]".to_owned(), "procedure = \"*\"".to_owned()])
        .collect();
    prop_oneof![
        proptest::collection::vec(proptest::sample::select(lines), 0..12)
            .prop_map(|l| l.join("\n")),
        "(\\PC|\n){0,200}",
        proptest::collection::vec(
            prop_oneof![
                Just("[[policy]]\n".to_owned()),
                "[a-z_]{1,22}".prop_map(|k| format!("{k} = ")),
                "\"[a-zA-Z0-9.*_:? ]{0,20}\"\n",
                "[0-9_]{1,12}\n",
            ],
            0..20
        )
        .prop_map(|parts| parts.concat()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn generated_policy_files_pass_the_policy_file_check(text in policy_text()) {
        checks::policy_file(text.as_bytes());
    }
}
