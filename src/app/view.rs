//! The `/status` view of the mappings: each topic and group discovery
//! knows, with its procedure's counts (`ProcedureMetrics`), what it has in
//! flight and waiting in the stages, and its callees. Read-only.

use std::collections::HashMap;
use std::time::{Instant, SystemTime};

use super::bootstrap::Bootstrap;
use super::procedure_metrics::{Counts, Live, ProcedureMetrics};
use crate::discovery::topic::MatchPolicy;
use crate::status;

/// Every mapping with its counts, for `/status`.
pub fn mappings(
    bootstrap: &Bootstrap,
    per_procedure: &ProcedureMetrics,
    live: &HashMap<&str, Live>,
    now: Instant,
) -> Vec<status::Mapping> {
    let wall = SystemTime::now();
    bootstrap
        .discovery()
        .mappings()
        .into_iter()
        .map(|m| {
            // A pattern's events go to procedures derived from their
            // topics: those matching the registration's URI.
            let matches = |name: &str| match (&m.procedure, m.topic.policy) {
                (Some(p), MatchPolicy::Wildcard) => wildcard_matches(p, name),
                (Some(p), _) => p == name,
                (None, _) => false,
            };
            let mut counts = Counts::default();
            let mut here = Live::default();
            if m.topic.policy == MatchPolicy::Exact {
                if let Some(p) = &m.procedure {
                    counts = per_procedure.tally(p);
                }
            } else {
                for (name, c) in per_procedure.tallies() {
                    if matches(name) {
                        counts.add(c);
                    }
                }
            }
            for (name, l) in live {
                if matches(name) {
                    here.add(*l);
                }
            }
            let callees = m
                .registrations
                .iter()
                .map(|id| bootstrap.callees(*id))
                .sum::<Option<u64>>();
            let (last_error, last_error_at) = counts.last_error.unzip();
            status::Mapping {
                topic: m.topic.topic.clone(),
                match_policy: m.topic.policy.as_str().to_owned(),
                group: m.group.name.clone().unwrap_or_else(|| "default".into()),
                procedure: m.procedure.clone(),
                batch: m.group.batch,
                registrations: m.registrations.iter().map(|r| r.0).collect(),
                callees,
                subscription: m.subscription.map(|s| s.0),
                subscription_state: m.subscription_state.to_owned(),
                in_grace: m.in_grace,
                received: counts.received,
                forwarded: counts.forwarded,
                dead_lettered: counts
                    .dead_lettered
                    .into_iter()
                    .map(|(r, n)| (r.to_owned(), n))
                    .collect(),
                in_flight: here.in_flight,
                waiting: here.waiting,
                oldest_waiting_seconds: here
                    .oldest
                    .map_or(0.0, |o| status::seconds(now.saturating_duration_since(o))),
                last_error,
                last_error_at: last_error_at.map(status::rfc3339),
                last_error_seconds: last_error_at
                    .map(|at| status::seconds(wall.duration_since(at).unwrap_or_default())),
            }
        })
        .collect()
}

/// Whether the concrete URI `name` matches the wildcard URI `pattern`
/// (same number of components; an empty one matches any).
pub fn wildcard_matches(pattern: &str, name: &str) -> bool {
    let (mut p, mut n) = (pattern.split('.'), name.split('.'));
    loop {
        match (p.next(), n.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a.is_empty() || a == b => {}
            _ => return false,
        }
    }
}
