//! The `/status` view, as far as the loop knows it (the listener adds
//! what only Redis knows): the router link, the queue, and every mapping,
//! each topic and group discovery knows with its procedure's counts
//! (`ProcedureMetrics`), what it has in flight and waiting in the stages,
//! and its callees. Read-only.

use std::time::{Instant, SystemTime};

use super::procedure_metrics::{Counts, Live};
use super::sidecar::Sidecar;
use crate::discovery::topic::MatchPolicy;
use crate::status::{self, RedisProbe, Status};

/// What `/status` shows that is fixed at startup.
pub struct Shown {
    pub started: Instant,
    pub url: String,
    pub realm: String,
    pub settings: Vec<status::Setting>,
    pub delivery: &'static str,
    pub queue_kind: &'static str,
    pub capacity: usize,
    pub max_in_flight: usize,
    pub queue_name: Option<String>,
    pub consumer: Option<String>,
    pub probe: Option<RedisProbe>,
}

/// What the loop knows of the router link.
pub struct LinkView {
    pub session: Option<u64>,
    pub serializer: Option<String>,
    /// When the current session joined.
    pub joined: Option<(Instant, SystemTime)>,
    pub reconnects: u64,
    /// Consecutive failures to reach a healthy session.
    pub connect_failures: u32,
    /// The loop is draining.
    pub draining: bool,
}

impl Shown {
    pub fn status(&self, link: LinkView, sidecar: &Sidecar, now: Instant) -> Status {
        let (waiting, in_flight) = sidecar.held();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ready: sidecar.is_ready(),
            draining: link.draining || sidecar.is_draining(),
            uptime_seconds: status::seconds(now.saturating_duration_since(self.started)),
            router: status::Router {
                url: self.url.clone(),
                realm: self.realm.clone(),
                connected: link.session.is_some(),
                session: link.session,
                joined_at: link.joined.map(|(_, at)| status::rfc3339(at)),
                joined_seconds: link
                    .joined
                    .map(|(at, _)| status::seconds(now.saturating_duration_since(at))),
                serializer: link.serializer,
                reconnects: link.reconnects,
                connect_failures: link.connect_failures,
            },
            delivery: self.delivery.to_owned(),
            queue: status::Queue {
                kind: self.queue_kind.to_owned(),
                waiting: waiting as u64,
                in_flight: in_flight as u64,
                capacity: self.capacity as u64,
                max_in_flight: self.max_in_flight as u64,
                name: self.queue_name.clone(),
                consumer: self.consumer.clone(),
                redis_up: sidecar.redis_up(),
                replicas: sidecar.replicas(),
                ..status::Queue::default()
            },
            mappings: mappings(sidecar, now),
            redis_targets: Vec::new(),
            configuration: self.settings.clone(),
            policy_file: policy_file(sidecar),
        }
    }
}

/// The policy file as `/status` shows it.
fn policy_file(sidecar: &Sidecar) -> Option<status::PolicyFile> {
    let state = sidecar.policies()?;
    let policies = state.current();
    let source = policies.source()?;
    let (error_at, error) = state.last_error().cloned().unzip();
    Some(status::PolicyFile {
        path: source.path.display().to_string(),
        rules: policies.rules().len() as u64,
        content_hash: source.hash.clone(),
        loaded_at: status::rfc3339(source.loaded_at),
        last_reload_error: error,
        last_reload_error_at: error_at.map(status::rfc3339),
    })
}

/// A mapping's settings in effect as `/status` shows them.
pub fn mapping_policy(
    policies: &crate::policy::Policies,
    rule: Option<usize>,
    policy: Option<&crate::forward::policy::Policy>,
) -> status::MappingPolicy {
    let effective = policies.effective(policy);
    let rule = rule.and_then(|i| policies.rules().get(i));
    status::MappingPolicy {
        rule: rule.map(|r| r.pattern.clone()),
        line: rule.map(|r| r.line as u64),
        settings: crate::config::policy_keys::POLICY_KEYS
            .iter()
            .map(|k| (k.name.to_owned(), k.show(effective)))
            .collect(),
        overrides: policies
            .differences(effective)
            .into_iter()
            .map(|(name, _)| name.to_owned())
            .collect(),
    }
}

/// Every mapping with its counts, for `/status`.
pub fn mappings(sidecar: &Sidecar, now: Instant) -> Vec<status::Mapping> {
    let (bootstrap, per_procedure) = (sidecar.bootstrap(), sidecar.per_procedure());
    let live = sidecar.live();
    let wall = SystemTime::now();
    let away: std::collections::HashMap<&str, Option<SystemTime>> = sidecar.groups_away().collect();
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
            for (name, l) in &live {
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
            let policy = sidecar
                .policies()
                .map(|p| mapping_policy(p.current(), m.rule, m.policy))
                .unwrap_or_default();
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
                waiting_for_callee: m.procedure.as_deref().is_some_and(|p| away.contains_key(p)),
                away_seconds: m
                    .procedure
                    .as_deref()
                    .and_then(|p| away.get(p).copied().flatten())
                    .map(|since| status::seconds(wall.duration_since(since).unwrap_or_default())),
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
                policy,
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
