//! Per-procedure delivery policies (`SUBTOCALL_POLICY_FILE`): a TOML file of
//! rules, each a procedure pattern and settings. The first rule whose
//! pattern matches a registration's URI (its group suffix included) gives
//! that procedure's settings; the environment's apply to everything a rule
//! does not set and to procedures no rule matches.
//!
//! Resolved once per registration, never per event: discovery resolves a
//! group's [`Policy`] when it first sees the group and again after a
//! reload ([`crate::discovery::Discovery::set_policies`]); each job then
//! carries it ([`crate::forward::Job::policy`]). Pure: reading the file is
//! the caller's ([`load`] takes its text).
//!
//! Patterns: `*` matches any run of characters, dots included; every other
//! character matches itself. There is no `?` and there are no classes.

mod file;

#[cfg(test)]
pub(crate) mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::OrderBy;
use crate::config::policy_keys::POLICY_KEYS;
use crate::forward::batch::Batching;
use crate::forward::policy::Policy;
use crate::forward::retry::{Backoff, RetryPolicy};

pub use file::{Context, parse};

/// The settings one rule sets; `None` leaves the environment's value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub order_by: Option<OrderBy>,
    pub call_timeout: Option<Duration>,
    pub max_in_flight: Option<usize>,
    pub retry_max_attempts: Option<u32>,
    pub retry_max_age: Option<Duration>,
    pub retry_initial_backoff: Option<Duration>,
    pub retry_max_backoff: Option<Duration>,
    pub max_deliveries: Option<u32>,
    pub batch_max_events: Option<usize>,
    pub batch_max_bytes: Option<usize>,
    pub batch_in_flight: Option<usize>,
    pub batch_linger: Option<Duration>,
    pub details_kwarg: Option<Arc<str>>,
    pub grace_period: Option<Duration>,
}

impl Overrides {
    /// `defaults` with these settings over them.
    pub fn over(&self, defaults: &Policy) -> Policy {
        let d = defaults;
        Policy {
            order_by: self.order_by.clone().unwrap_or_else(|| d.order_by.clone()),
            call_timeout: self.call_timeout.unwrap_or(d.call_timeout),
            max_in_flight: self.max_in_flight.or(d.max_in_flight),
            retry: RetryPolicy {
                max_attempts: self.retry_max_attempts.unwrap_or(d.retry.max_attempts),
                max_age: self.retry_max_age.unwrap_or(d.retry.max_age),
                backoff: Backoff {
                    initial: self
                        .retry_initial_backoff
                        .unwrap_or(d.retry.backoff.initial),
                    max: self.retry_max_backoff.unwrap_or(d.retry.backoff.max),
                },
            },
            max_deliveries: self.max_deliveries.unwrap_or(d.max_deliveries),
            batching: Batching {
                max_events: self.batch_max_events.unwrap_or(d.batching.max_events),
                max_bytes: self.batch_max_bytes.unwrap_or(d.batching.max_bytes),
                in_flight: self.batch_in_flight.unwrap_or(d.batching.in_flight),
                linger: self.batch_linger.unwrap_or(d.batching.linger),
            },
            details_kwarg: self
                .details_kwarg
                .clone()
                .or_else(|| d.details_kwarg.clone()),
            grace_period: self.grace_period.unwrap_or(d.grace_period),
        }
    }
}

/// One rule of the file.
#[derive(Debug, Clone)]
pub struct Rule {
    pub pattern: String,
    /// Where it starts in the file (from 1).
    pub line: usize,
    pub overrides: Overrides,
    /// Its settings over the environment's.
    pub policy: Arc<Policy>,
}

/// Where the rules came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub path: PathBuf,
    /// The file's content hash (FNV-1a, 64 bits, hex): the same on every
    /// instance that reads the same file.
    pub hash: String,
    pub loaded_at: SystemTime,
}

/// The rules in effect, with the environment's settings they fall back to.
#[derive(Debug, Clone)]
pub struct Policies {
    defaults: Arc<Policy>,
    rules: Vec<Rule>,
    source: Option<Source>,
}

/// The policy that applies to one procedure.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The index of the rule that applies; `None`: the defaults.
    pub rule: Option<usize>,
    /// `None`: the defaults (the global settings, which need no carrying).
    pub policy: Option<Arc<Policy>>,
}

impl Policies {
    /// No file: every procedure follows the environment.
    pub fn none(defaults: Policy) -> Policies {
        Policies {
            defaults: Arc::new(defaults),
            rules: Vec::new(),
            source: None,
        }
    }

    /// Rules read from `text`, the content of `path`; every problem, each
    /// with the file and line, when the file is not usable.
    pub fn load(
        path: PathBuf,
        text: &str,
        defaults: Policy,
        context: &Context,
    ) -> Result<Policies, Vec<String>> {
        let shown = path.display().to_string();
        let rules = parse(text, &shown, &defaults, context)?;
        Ok(Policies {
            defaults: Arc::new(defaults),
            rules,
            source: Some(Source {
                hash: format!("{:016x}", crate::forward::key::fnv1a64(text.as_bytes())),
                path,
                loaded_at: SystemTime::now(),
            }),
        })
    }

    /// The same file read again (after SIGHUP), with the same defaults.
    pub fn reload(&self, text: &str, context: &Context) -> Result<Policies, Vec<String>> {
        let path = self
            .source
            .as_ref()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        Policies::load(path, text, (*self.defaults).clone(), context)
    }

    pub fn defaults(&self) -> &Policy {
        &self.defaults
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn source(&self) -> Option<&Source> {
        self.source.as_ref()
    }

    /// The first rule whose pattern matches `procedure`, and its policy.
    pub fn resolve(&self, procedure: &str) -> Resolved {
        match self
            .rules
            .iter()
            .position(|r| glob_matches(&r.pattern, procedure))
        {
            Some(i) => Resolved {
                rule: Some(i),
                policy: Some(self.rules[i].policy.clone()),
            },
            None => Resolved {
                rule: None,
                policy: None,
            },
        }
    }

    /// `policy` (`None`: the defaults) or the defaults.
    pub fn effective<'a>(&'a self, policy: Option<&'a Policy>) -> &'a Policy {
        policy.unwrap_or(&self.defaults)
    }

    /// The settings of `policy` that differ from the defaults, as a rule
    /// would write them, in the reference's order.
    pub fn differences(&self, policy: &Policy) -> Vec<(&'static str, String)> {
        POLICY_KEYS
            .iter()
            .filter_map(|key| {
                let value = key.show(policy);
                (value != key.show(&self.defaults)).then_some((key.name, value))
            })
            .collect()
    }

    /// How rule `i` reads in a line of output: its pattern and line.
    pub fn describe(&self, rule: Option<usize>) -> String {
        match rule.and_then(|i| self.rules.get(i)) {
            Some(r) => format!("rule {:?} (line {})", r.pattern, r.line),
            None => "defaults".to_owned(),
        }
    }

    /// Whether some rule sets `order_by` to something other than `none`.
    pub fn orders_any(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.policy.order_by != OrderBy::None)
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of
/// characters (dots included) and every other character itself.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // The last `*` seen and where in `text` its run ends so far.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            // Let the last `*` take one more character.
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}
