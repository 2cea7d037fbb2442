//! The settings a rule of `SUBTOCALL_POLICY_FILE` may hold: one entry per
//! key with the variable it overrides and the parser both share, so a rule
//! accepts exactly what the variable accepts, within the same bounds.
//! Also how each setting of an effective [`Policy`] reads (for `check` and
//! `/status`).

use std::sync::Arc;
use std::time::Duration;

use super::parse::{self, Parsed};
use super::vars::*;
use super::{MIN_10MS, MIN_100MS, OrderBy};
use crate::forward::policy::Policy;
use crate::policy::Overrides;

/// One key of a rule.
pub struct PolicyKey {
    pub name: &'static str,
    /// The variable whose value applies where no rule sets this key.
    pub(crate) var: &'static Var,
    set: fn(&mut Overrides, &str) -> Parsed<()>,
    show: fn(&Policy) -> String,
}

impl PolicyKey {
    /// The variable this key overrides.
    pub fn variable(&self) -> &'static str {
        self.var.name
    }

    /// What a valid value looks like.
    pub fn accepts(&self) -> &'static str {
        self.var.accepts
    }

    /// Parses `text` into `overrides`; the error says what was expected.
    pub fn apply(&self, overrides: &mut Overrides, text: &str) -> Result<(), String> {
        (self.set)(overrides, text).map_err(|invalid| match invalid.reason {
            None => format!("expected {}", self.var.accepts),
            Some(reason) => format!("{reason}; expected {}", self.var.accepts),
        })
    }

    /// This setting of `policy`, as a rule would write it.
    pub fn show(&self, policy: &Policy) -> String {
        (self.show)(policy)
    }
}

// The parsers of the settings rules may hold, shared with the variables.
pub(super) fn call_timeout(text: &str) -> Parsed<Duration> {
    parse::duration_at_least(text, MIN_100MS)
}
pub(super) fn max_in_flight(text: &str) -> Parsed<usize> {
    parse::number_in(text, 1, 65_536)
}
pub(super) fn retry_max_attempts(text: &str) -> Parsed<u32> {
    parse::number_in(text, 1, 1_000_000)
}
pub(super) fn retry_max_age(text: &str) -> Parsed<Duration> {
    parse::duration_at_least(text, MIN_100MS)
}
pub(super) fn retry_backoff(text: &str) -> Parsed<Duration> {
    parse::duration_at_least(text, MIN_10MS)
}
pub(super) fn max_deliveries(text: &str) -> Parsed<u32> {
    parse::number_in(text, 1, 1000)
}
pub(super) fn batch_max_events(text: &str) -> Parsed<usize> {
    parse::number_in(text, 1, 100_000)
}
pub(super) fn batch_in_flight(text: &str) -> Parsed<usize> {
    parse::number_in(text, 1, 1024)
}
pub(super) fn details_kwarg(text: &str) -> Parsed<String> {
    parse::non_empty(text)
}

fn duration_text(d: Duration) -> String {
    if d.is_zero() {
        "0s".to_owned()
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// `order_by` as `SUBTOCALL_ORDER_BY` writes it.
pub fn order_by_text(order_by: &OrderBy) -> String {
    match order_by {
        OrderBy::None => "none".to_owned(),
        OrderBy::Topic => "topic".to_owned(),
        OrderBy::Kwarg(name) => format!("kwarg:{name}"),
        OrderBy::Arg(n) => format!("arg:{n}"),
    }
}

/// Every key, in the order the reference lists them.
pub static POLICY_KEYS: &[PolicyKey] = &[
    PolicyKey {
        name: "order_by",
        var: &ORDER_BY,
        set: |o, t| {
            o.order_by = Some(parse::order_by(t)?);
            Ok(())
        },
        show: |p| order_by_text(&p.order_by),
    },
    PolicyKey {
        name: "call_timeout",
        var: &CALL_TIMEOUT,
        set: |o, t| {
            o.call_timeout = Some(call_timeout(t)?);
            Ok(())
        },
        show: |p| duration_text(p.call_timeout),
    },
    PolicyKey {
        name: "max_in_flight",
        var: &MAX_IN_FLIGHT,
        set: |o, t| {
            o.max_in_flight = Some(max_in_flight(t)?);
            Ok(())
        },
        show: |p| p.max_in_flight.map_or("-".to_owned(), |n| n.to_string()),
    },
    PolicyKey {
        name: "retry_max_attempts",
        var: &RETRY_MAX_ATTEMPTS,
        set: |o, t| {
            o.retry_max_attempts = Some(retry_max_attempts(t)?);
            Ok(())
        },
        show: |p| p.retry.max_attempts.to_string(),
    },
    PolicyKey {
        name: "retry_max_age",
        var: &RETRY_MAX_AGE,
        set: |o, t| {
            o.retry_max_age = Some(retry_max_age(t)?);
            Ok(())
        },
        show: |p| duration_text(p.retry.max_age),
    },
    PolicyKey {
        name: "retry_initial_backoff",
        var: &RETRY_INITIAL_BACKOFF,
        set: |o, t| {
            o.retry_initial_backoff = Some(retry_backoff(t)?);
            Ok(())
        },
        show: |p| duration_text(p.retry.backoff.initial),
    },
    PolicyKey {
        name: "retry_max_backoff",
        var: &RETRY_MAX_BACKOFF,
        set: |o, t| {
            o.retry_max_backoff = Some(retry_backoff(t)?);
            Ok(())
        },
        show: |p| duration_text(p.retry.backoff.max),
    },
    PolicyKey {
        name: "max_deliveries",
        var: &MAX_DELIVERIES,
        set: |o, t| {
            o.max_deliveries = Some(max_deliveries(t)?);
            Ok(())
        },
        show: |p| p.max_deliveries.to_string(),
    },
    PolicyKey {
        name: "batch_max_events",
        var: &BATCH_MAX_EVENTS,
        set: |o, t| {
            o.batch_max_events = Some(batch_max_events(t)?);
            Ok(())
        },
        show: |p| p.batching.max_events.to_string(),
    },
    PolicyKey {
        name: "batch_max_bytes",
        var: &BATCH_MAX_BYTES,
        set: |o, t| {
            o.batch_max_bytes = Some(parse::byte_size(t)?);
            Ok(())
        },
        show: |p| p.batching.max_bytes.to_string(),
    },
    PolicyKey {
        name: "batch_in_flight",
        var: &BATCH_IN_FLIGHT,
        set: |o, t| {
            o.batch_in_flight = Some(batch_in_flight(t)?);
            Ok(())
        },
        show: |p| p.batching.in_flight.to_string(),
    },
    PolicyKey {
        name: "batch_linger",
        var: &BATCH_LINGER,
        set: |o, t| {
            o.batch_linger = Some(parse::duration(t)?);
            Ok(())
        },
        show: |p| duration_text(p.batching.linger),
    },
    PolicyKey {
        name: "details_kwarg",
        var: &DETAILS_KWARG,
        set: |o, t| {
            o.details_kwarg = Some(Arc::from(details_kwarg(t)?));
            Ok(())
        },
        show: |p| p.details_kwarg.as_deref().unwrap_or("-").to_owned(),
    },
    PolicyKey {
        name: "grace_period",
        var: &GRACE_PERIOD,
        set: |o, t| {
            o.grace_period = Some(parse::duration(t)?);
            Ok(())
        },
        show: |p| duration_text(p.grace_period),
    },
];

/// The key named `name`, if a rule may hold it.
pub fn policy_key(name: &str) -> Option<&'static PolicyKey> {
    POLICY_KEYS.iter().find(|k| k.name == name)
}

/// The key an unknown one was probably meant to be.
pub fn nearest_policy_key(unknown: &str) -> Option<&'static str> {
    let unknown = unknown.to_ascii_lowercase();
    let (name, distance) = POLICY_KEYS
        .iter()
        .map(|k| (k.name, super::edit_distance(&unknown, k.name)))
        .min_by_key(|&(_, d)| d)?;
    (distance <= (unknown.len() / 3).max(2)).then_some(name)
}

/// The reference of the keys (`doc/configuration.md`), from this table.
pub fn policy_markdown() -> String {
    let mut out = String::from("| key | overrides | accepts |\n|---|---|---|\n");
    for key in POLICY_KEYS {
        out.push_str(&format!(
            "| `{}` | `{}` | {} |\n",
            key.name,
            key.var.name,
            super::vars::markdown_cell(key.var.accepts)
        ));
    }
    out
}
