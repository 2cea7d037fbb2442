//! The policy file's text to rules: every problem at once, each as
//! `FILE:LINE: what is wrong`.

use std::collections::HashMap;
use std::sync::Arc;

use toml::de::{DeTable, DeValue};

use super::{Overrides, Rule};
use crate::config::policy_keys::{POLICY_KEYS, nearest_policy_key, policy_key};
use crate::forward::policy::Policy;

/// What a rule is checked against beyond its own values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// `SUBTOCALL_MARKER` and `SUBTOCALL_BATCH_MARKER`: the last component
    /// of every registration served starts with one of them.
    pub markers: Vec<String>,
    /// `SUBTOCALL_MAX_IN_FLIGHT`: a rule's `max_in_flight` is under it.
    pub max_in_flight: usize,
}

/// The rules in `text` (shown as `file` in errors), their settings over
/// `defaults`.
pub fn parse(
    text: &str,
    file: &str,
    defaults: &Policy,
    context: &Context,
) -> Result<Vec<Rule>, Vec<String>> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let at = |offset: usize, message: String| format!("{file}:{}: {message}", line_of(offset));
    let table = match DeTable::parse(text) {
        Ok(table) => table.into_inner(),
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            return Err(vec![at(
                offset,
                format!("not valid TOML: {}", e.message().trim()),
            )]);
        }
    };
    let mut problems = Vec::new();
    let mut rules = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (key, value) in table.iter() {
        let name: &str = key.get_ref();
        if name != "policy" {
            let hint = if nearest_policy_key(name).is_some() || name.starts_with("pol") {
                "; a setting goes in a rule, under [[policy]]"
            } else {
                "; the file holds only [[policy]] rules"
            };
            problems.push(at(key.span().start, format!("unknown key `{name}`{hint}")));
            continue;
        }
        let Some(items) = value.get_ref().as_array() else {
            problems.push(at(
                key.span().start,
                "`policy` must be an array of tables: write each rule as [[policy]]".to_owned(),
            ));
            continue;
        };
        for item in items.iter() {
            let Some(rule) = item.get_ref().as_table() else {
                problems.push(at(
                    item.span().start,
                    "a rule must be a table of settings".to_owned(),
                ));
                continue;
            };
            // Where the rule starts: its `[[policy]]` header, else its
            // first key.
            let first_key = rule
                .iter()
                .map(|(k, _)| k.span().start)
                .min()
                .unwrap_or(item.span().start);
            let start = item.span().start.min(first_key);
            let mut overrides = Overrides::default();
            let mut pattern: Option<(String, usize)> = None;
            let mut where_set: HashMap<&'static str, usize> = HashMap::new();
            let mut ok = true;
            for (k, v) in rule.iter() {
                let name: &str = k.get_ref();
                let offset = k.span().start;
                if name == "procedure" {
                    match v.get_ref().as_str() {
                        Some(p) => match check_pattern(p, context) {
                            Ok(()) => pattern = Some((p.to_owned(), offset)),
                            Err(why) => {
                                problems.push(at(offset, format!("procedure = {p:?} {why}")));
                                ok = false;
                            }
                        },
                        None => {
                            problems.push(at(
                                offset,
                                "procedure must be a string: a URI pattern where * matches any run of characters".to_owned(),
                            ));
                            ok = false;
                        }
                    }
                    continue;
                }
                let Some(key) = policy_key(name) else {
                    let hint = match nearest_policy_key(name) {
                        Some(near) => format!("; did you mean `{near}`?"),
                        None => format!(
                            "; a rule may hold procedure, {}",
                            POLICY_KEYS
                                .iter()
                                .map(|k| k.name)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    };
                    problems.push(at(offset, format!("unknown key `{name}`{hint}")));
                    ok = false;
                    continue;
                };
                let text = match v.get_ref() {
                    DeValue::String(s) => s.to_string(),
                    DeValue::Integer(i) if i.radix() == 10 => i.as_str().to_owned(),
                    other => {
                        problems.push(at(
                            offset,
                            format!(
                                "{name} = a {}: expected {}",
                                other.type_str(),
                                key.accepts()
                            ),
                        ));
                        ok = false;
                        continue;
                    }
                };
                match key.apply(&mut overrides, &text) {
                    Ok(()) => {
                        where_set.insert(key.name, offset);
                    }
                    Err(why) => {
                        problems.push(at(offset, format!("{name} = {text:?}: {why}")));
                        ok = false;
                    }
                }
            }
            let Some((pattern, pattern_at)) = pattern else {
                if ok {
                    problems.push(at(
                        start,
                        "this rule has no `procedure` (the URI pattern it applies to)".to_owned(),
                    ));
                }
                continue;
            };
            if let Some(first) = seen.get(&pattern) {
                problems.push(at(
                    pattern_at,
                    format!(
                        "procedure = {pattern:?} repeats the rule of line {first}, which always applies first"
                    ),
                ));
                continue;
            }
            seen.insert(pattern.clone(), line_of(pattern_at));
            if !ok {
                continue;
            }
            let policy = overrides.over(defaults);
            if policy.retry.backoff.max < policy.retry.backoff.initial {
                let offset = where_set
                    .get("retry_max_backoff")
                    .or_else(|| where_set.get("retry_initial_backoff"))
                    .copied()
                    .unwrap_or(start);
                problems.push(at(
                    offset,
                    format!(
                        "retry_max_backoff ({}) is below retry_initial_backoff ({})",
                        humantime::format_duration(policy.retry.backoff.max),
                        humantime::format_duration(policy.retry.backoff.initial)
                    ),
                ));
                continue;
            }
            if let Some(n) = overrides.max_in_flight
                && n > context.max_in_flight
            {
                let offset = where_set.get("max_in_flight").copied().unwrap_or(start);
                problems.push(at(
                    offset,
                    format!(
                        "max_in_flight = {n} is above SUBTOCALL_MAX_IN_FLIGHT ({}), which bounds all procedures together",
                        context.max_in_flight
                    ),
                ));
                continue;
            }
            rules.push(Rule {
                pattern,
                line: line_of(start),
                overrides,
                policy: Arc::new(policy),
            });
        }
    }
    if problems.is_empty() {
        Ok(rules)
    } else {
        Err(problems)
    }
}

/// Why `pattern` can match no registration subtocall serves, if it cannot.
fn check_pattern(pattern: &str, context: &Context) -> Result<(), String> {
    if pattern.trim().is_empty() {
        return Err("is empty".to_owned());
    }
    if let Some(c) = pattern
        .chars()
        .find(|c| matches!(c, '?' | '[' | ']' | '{' | '}'))
    {
        return Err(format!(
            "holds {c:?}: only * is a wildcard (there is no ? and there are no classes), and a WAMP URI never holds {c:?}"
        ));
    }
    if let Some(c) = pattern.chars().find(|c| c.is_whitespace() || *c == '#') {
        return Err(format!("cannot match: a WAMP URI never holds {c:?}"));
    }
    // (Empty components are allowed: a wildcard registration's URI has
    // them, e.g. `com.example..SUB_ev`.)
    // The last component of a served registration starts with a marker.
    let last = pattern.rsplit('.').next().unwrap_or(pattern);
    let fixed = last.split('*').next().unwrap_or(last);
    let open = last.contains('*');
    let fits = context.markers.iter().any(|m| {
        if open {
            fixed.starts_with(m.as_str()) || m.starts_with(fixed)
        } else {
            fixed.starts_with(m.as_str())
        }
    });
    // (A `*` may span dots: `a.*x` may end in `SUB_x`, which `fixed`, the
    // empty text, allows.)
    if !fits {
        return Err(format!(
            "cannot match: the last component of a registration subtocall serves starts with {}",
            context
                .markers
                .iter()
                .map(|m| format!("{m:?}"))
                .collect::<Vec<_>>()
                .join(" or ")
        ));
    }
    Ok(())
}
