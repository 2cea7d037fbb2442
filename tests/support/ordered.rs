//! What the ordering tests share: every call the backends saw of keyed
//! events (`kwargs.k`, `kwargs.seq`), with when it started and was
//! answered, and what that says about per-key order.

use std::collections::{BTreeMap, BTreeSet};

use super::peers::Backend;

/// One call as the backends saw it: when it started and, if it was
/// answered, when.
#[derive(Debug)]
pub struct Call {
    pub key: u64,
    pub seq: u64,
    pub start: f64,
    pub answered: Option<f64>,
    /// The calling session (the router discloses it), when known.
    pub caller: Option<u64>,
}

pub fn calls(backends: &[&Backend]) -> Vec<Call> {
    calls_where(backends, |_| true)
}

/// [`calls`] of `procedure` only.
pub fn calls_to(backends: &[&Backend], procedure: &str) -> Vec<Call> {
    calls_where(backends, |inv| inv["procedure"] == procedure)
}

fn calls_where(backends: &[&Backend], pick: impl Fn(&serde_json::Value) -> bool) -> Vec<Call> {
    let mut all = Vec::new();
    for b in backends {
        let answers = b.answered_at();
        for inv in b.invocations().into_iter().filter(|inv| pick(inv)) {
            let k = inv["call"].as_u64().unwrap();
            all.push(Call {
                key: inv["kwargs"]["k"].as_u64().expect("a key"),
                seq: inv["kwargs"]["seq"].as_u64().unwrap(),
                start: inv["at"].as_f64().unwrap(),
                answered: answers.get(&k).copied(),
                caller: inv["caller"].as_u64(),
            });
        }
    }
    all.sort_by(|a, b| a.start.total_cmp(&b.start));
    all
}

/// What the calls say about per-key order.
pub struct Verdict {
    pub keys: usize,
    /// Events delivered for the first time while a later event of their
    /// key had been delivered already (a retry or a redelivery after a
    /// takeover repeats an event and does not count).
    pub out_of_order: usize,
    /// Calls of a key that started before the previous call of the key was
    /// answered (a call that was never answered has no answer to wait for).
    pub overlapping: usize,
    /// The most calls running at once (answered calls only), of distinct
    /// keys since no key overlaps.
    pub most: i32,
}

/// What both ordering tests require of their verdict.
pub fn assert_in_order(out_of_order: usize, overlapping: usize, most: i32) {
    assert_eq!(out_of_order, 0, "no key out of order");
    assert_eq!(overlapping, 0, "no key with two calls at once");
    assert!(most >= 4, "keys run in parallel: at most {most} at once");
}

/// The calls of a key that started before the previous one was answered,
/// each with that previous call (for a failure's message).
pub fn overlaps(all: &[Call]) -> Vec<(&Call, &Call)> {
    let mut by_key: BTreeMap<u64, Vec<&Call>> = BTreeMap::new();
    for c in all {
        by_key.entry(c.key).or_default().push(c);
    }
    by_key
        .values()
        .flat_map(|calls| calls.windows(2))
        .filter(|pair| pair[0].answered.is_some_and(|at| pair[1].start < at))
        .map(|pair| (pair[0], pair[1]))
        .collect()
}

pub fn verdict(all: &[Call]) -> Verdict {
    let mut by_key: BTreeMap<u64, Vec<&Call>> = BTreeMap::new();
    for c in all {
        by_key.entry(c.key).or_default().push(c);
    }
    let (mut out_of_order, mut overlapping) = (0, 0);
    for calls in by_key.values() {
        let mut delivered = BTreeSet::new();
        for c in calls {
            if delivered.insert(c.seq) && delivered.range(c.seq..).nth(1).is_some() {
                out_of_order += 1;
            }
        }
        for pair in calls.windows(2) {
            if pair[0].answered.is_some_and(|at| pair[1].start < at) {
                overlapping += 1;
            }
        }
    }
    let mut edges: Vec<(f64, i32)> = Vec::new();
    for c in all.iter().filter(|c| c.answered.is_some()) {
        edges.push((c.start, 1));
        edges.push((c.answered.unwrap(), -1));
    }
    edges.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
    let (mut running, mut most) = (0, 0);
    for (_, step) in edges {
        running += step;
        most = most.max(running);
    }
    Verdict {
        keys: by_key.len(),
        out_of_order,
        overlapping,
        most,
    }
}
