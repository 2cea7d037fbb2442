//! What subtocall exports on /metrics, read from the exposition of a fresh
//! `Metrics` with one label set of each labelled family created: the metric
//! names and label values that the docs, the dashboard and the alert rules
//! may name. Pure: no process, no socket.

use std::collections::{BTreeMap, BTreeSet};

use regex::Regex;
use subtocall::metrics::{Metrics, ProcedureLabel, ProcedureReason, StreamLabel};

/// `(name, type)` of every metric family in the exposition, from its
/// `# TYPE` line.
pub fn exported_families() -> Vec<(String, String)> {
    let metrics = Metrics::new();
    // Families labelled per stream are exported once a stream exists.
    let stream = StreamLabel {
        stream: "queue:p".into(),
    };
    let _ = metrics.stream_backlog.get_or_create(&stream);
    let _ = metrics.stream_oldest_unacked.get_or_create(&stream);
    // So are those labelled per procedure once a procedure has an event.
    let procedure = ProcedureLabel {
        procedure: "p".into(),
        group: "default".into(),
    };
    let _ = metrics.procedure_received.get_or_create(&procedure);
    let _ = metrics.procedure_forwarded.get_or_create(&procedure);
    let _ = metrics.procedure_in_flight.get_or_create(&procedure);
    let _ = metrics.procedure_waiting.get_or_create(&procedure);
    let _ = metrics.procedure_oldest_waiting.get_or_create(&procedure);
    let _ = metrics.procedure_latency.get_or_create(&procedure);
    let _ = metrics
        .procedure_dead_lettered
        .get_or_create(&ProcedureReason {
            procedure: "p".into(),
            group: "default".into(),
            reason: "rejected",
        });
    let text = metrics.encode();
    let families: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(|rest| {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            (name.to_owned(), kind.to_owned())
        })
        .collect();
    assert!(families.len() >= 10, "parsed too few families:\n{text}");
    families
}

/// The name an operator queries for a family (counters get `_total`, info
/// metrics `_info`).
pub fn queried_name(name: &str, kind: &str) -> String {
    match kind {
        "counter" => format!("{name}_total"),
        "info" => format!("{name}_info"),
        _ => name.to_owned(),
    }
}

/// Every series name the exposition can contain, including histogram parts.
pub fn exported_series_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (name, kind) in exported_families() {
        names.insert(queried_name(&name, &kind));
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// The label values each family is exported with from the start (e.g.
/// `reason` values): series name -> values of any of its labels.
pub fn exported_label_values() -> BTreeMap<String, BTreeSet<String>> {
    // Stream names are not a fixed set of label values: not created here.
    let text = Metrics::new().encode();
    let sample = Regex::new(r#"^(subtocall_[a-z0-9_]+)\{(.*)\} "#).unwrap();
    let label = Regex::new(r#"[a-z_]+="([^"]*)""#).unwrap();
    let mut values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(c) = sample.captures(line) {
            let entry = values.entry(c[1].to_owned()).or_default();
            for l in label.captures_iter(&c[2]) {
                entry.insert(l[1].to_owned());
            }
        }
    }
    values
}

/// Every value the label `name` takes in the exposition from the start,
/// over all families (e.g. every dead-letter, unroutable and refused
/// `reason`).
pub fn exported_values_of_label(name: &str) -> BTreeSet<String> {
    let text = Metrics::new().encode();
    let label = Regex::new(&format!(r#"[{{,]{}="([^"]*)""#, regex::escape(name))).unwrap();
    text.lines()
        .filter(|line| line.starts_with("subtocall_"))
        .flat_map(|line| label.captures_iter(line).map(|c| c[1].to_owned()))
        .collect()
}
