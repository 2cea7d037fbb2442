//! The Grafana dashboard (doc/grafana/subtocall.json) and the Prometheus alert
//! rules (doc/prometheus/subtocall-alerts.yml) checked against the code: every
//! PromQL expression in them names only metrics subtocall exports, and label
//! values it matches exist; the rules pass `promtool check rules` where
//! promtool is installed. Reads files only; starts `promtool` at most.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use support::metrics::{exported_series_names, exported_values_of_label};

const DASHBOARD: &str = "doc/grafana/subtocall.json";
const ALERT_RULES: &str = "doc/prometheus/subtocall-alerts.yml";

/// Every metric of ours starts with this; an identifier with it that is not
/// exported is a misspelling or a metric that was renamed.
const PREFIX: &str = "subtocall_";

/// Series that Prometheus itself writes for every scrape, which a rule may
/// name instead of one of ours.
const SCRAPE_SERIES: &[&str] = &["up"];

fn read(relative: &str) -> String {
    let path = support::repo_root().join(relative);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---- PromQL ---------------------------------------------------------------

/// A PromQL token this check cares about; numbers, durations, operators
/// other than the matcher ones, comments and Grafana variables are dropped.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    /// A metric, label, function or keyword name.
    Ident(String),
    /// The contents of a string literal (a label value or a regex).
    Str(String),
    /// `=`, `!` or `~`, the characters of the label matchers.
    Matcher(char),
    /// Anything else that separates tokens (`{`, `,`, `(`, `>`, ...).
    Other,
}

/// Splits a PromQL expression (with Grafana's `$var`, `${var}` and
/// `$__rate_interval` in it) into tokens. Identifiers inside string literals
/// are label values, not metric names, so strings are their own token.
fn tokens(expr: &str) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            let mut value = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' && i + 1 < chars.len() {
                    i += 1;
                }
                value.push(chars[i]);
                i += 1;
            }
            i += 1; // the closing quote
            out.push(Token::Str(value));
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '$' {
            // A Grafana variable: `$name`, `${name}` or `${name:format}`.
            i += 1;
            if chars.get(i) == Some(&'{') {
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < chars.len() && ident_char(chars[i]) {
                    i += 1;
                }
            }
        } else if ident_start(c) {
            let start = i;
            while i < chars.len() && ident_char(chars[i]) {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() || c == '.' {
            // A number or a duration (`5m`, `1e3`, `0.99`, `1h30m`).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            out.push(match c {
                '=' | '!' | '~' => Token::Matcher(c),
                c if c.is_whitespace() => {
                    i += 1;
                    continue;
                }
                _ => Token::Other,
            });
            i += 1;
        }
    }
    out
}

/// The names with our prefix an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    tokens(expr)
        .into_iter()
        .filter_map(|t| match t {
            Token::Ident(name) if name.starts_with(PREFIX) => Some(name),
            _ => None,
        })
        .collect()
}

/// The values an expression matches the label `label` against: `label="v"`,
/// `label!="v"`, and each alternative of `label=~"a|b"` / `label!~"a|b"`.
fn matched_values(expr: &str, label: &str) -> Vec<String> {
    let tokens = tokens(expr);
    let mut values = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        if *token != Token::Ident(label.to_owned()) {
            continue;
        }
        let mut j = i + 1;
        while let Some(Token::Matcher(_)) = tokens.get(j) {
            j += 1;
        }
        if j == i + 1 {
            continue; // `by (reason)`, not a matcher
        }
        if let Some(Token::Str(value)) = tokens.get(j) {
            values.extend(value.split('|').map(str::to_owned));
        }
    }
    values
}

/// What is wrong with one expression, as sentences (empty when nothing is):
/// it names no metric (ours, or a scrape series where `scrape_series_ok`),
/// names one of ours that is not exported, or matches a `reason` that no
/// metric has.
fn problems(
    expr: &str,
    exported: &BTreeSet<String>,
    reasons: &BTreeSet<String>,
    scrape_series_ok: bool,
) -> Vec<String> {
    let mut found = Vec::new();
    let names = metric_names(expr);
    let names_scrape_series = scrape_series_ok
        && tokens(expr)
            .iter()
            .any(|t| matches!(t, Token::Ident(name) if SCRAPE_SERIES.contains(&name.as_str())));
    if names.is_empty() && !names_scrape_series {
        found.push(format!("names no {PREFIX}* metric"));
    }
    for name in names.iter().filter(|name| !exported.contains(*name)) {
        found.push(format!("names {name}, which subtocall does not export"));
    }
    for reason in matched_values(expr, "reason") {
        if !reasons.contains(&reason) {
            found.push(format!("matches reason {reason:?}, which no metric has"));
        }
    }
    found
}

/// Panics listing every expression with a problem, `(where, expr)` each.
fn assert_all_valid(what: &str, exprs: &[(String, String)], scrape_series_ok: bool) {
    let exported = exported_series_names();
    let reasons = exported_values_of_label("reason");
    let failures: Vec<String> = exprs
        .iter()
        .flat_map(|(place, expr)| {
            problems(expr, &exported, &reasons, scrape_series_ok)
                .into_iter()
                .map(move |p| format!("{place}: `{expr}` {p}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{what}:\n{}\n(exported: {exported:?})",
        failures.join("\n")
    );
}

#[test]
fn promql_tokens_skip_label_values_durations_and_grafana_variables() {
    let expr = r#"histogram_quantile(0.99, sum by (procedure, le) (rate(subtocall_procedure_forward_latency_seconds_bucket{procedure=~"$procedure", reason="subtocall_not_a_metric"}[$__rate_interval]))) > 1.5e3 # subtocall_in_a_comment"#;
    assert_eq!(
        metric_names(expr),
        ["subtocall_procedure_forward_latency_seconds_bucket"]
    );
    assert_eq!(matched_values(expr, "reason"), ["subtocall_not_a_metric"]);
    assert_eq!(
        matched_values(r#"x{reason!~"a|b"} or sum by (reason) (y)"#, "reason"),
        ["a", "b"]
    );
    assert_eq!(
        metric_names("increase(subtocall_router_reconnects_total[15m]) > 3"),
        ["subtocall_router_reconnects_total"]
    );
}

#[test]
fn the_check_reports_misspelled_metrics_unknown_reasons_and_expressions_without_a_metric() {
    let exported = exported_series_names();
    let reasons = exported_values_of_label("reason");
    let ok = "sum(rate(subtocall_events_forwarded_total[5m]))";
    assert_eq!(
        problems(ok, &exported, &reasons, false),
        Vec::<String>::new()
    );
    let misspelled = "sum(rate(subtocall_events_fowarded_total[5m]))";
    assert_eq!(
        problems(misspelled, &exported, &reasons, false),
        ["names subtocall_events_fowarded_total, which subtocall does not export"]
    );
    let bad_reason = r#"subtocall_events_dead_lettered_total{reason=~"exhausted|timeout"}"#;
    assert_eq!(
        problems(bad_reason, &exported, &reasons, false),
        ["matches reason \"timeout\", which no metric has"]
    );
    let no_metric = r#"up{job="subtocall"} == 0"#;
    assert_eq!(
        problems(no_metric, &exported, &reasons, false),
        ["names no subtocall_* metric"]
    );
    assert!(problems(no_metric, &exported, &reasons, true).is_empty());
}

// ---- the Grafana dashboard ------------------------------------------------

fn dashboard() -> Json {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every panel, including those nested in (collapsed) rows.
fn panels(dashboard: &Json) -> Vec<&Json> {
    fn walk<'a>(list: &'a Json, out: &mut Vec<&'a Json>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// `(where, expr)` of every panel target and of every query variable.
fn dashboard_expressions(dashboard: &Json) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {:?}: a target without expr", panel["title"]));
            exprs.push((format!("panel {}", panel["title"]), expr.to_owned()));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] == "query" {
            // Grafana 10 stores `{"query": ..., "refId": ...}`, older ones a string.
            let query = &variable["query"];
            let expr = query["query"]
                .as_str()
                .or(query.as_str())
                .unwrap_or_else(|| panic!("variable {}: no query", variable["name"]));
            exprs.push((format!("variable {}", variable["name"]), expr.to_owned()));
        }
    }
    exprs
}

#[test]
fn every_dashboard_query_names_only_metrics_subtocall_exports() {
    let dashboard = dashboard();
    let exprs = dashboard_expressions(&dashboard);
    assert!(
        exprs.len() >= 20,
        "found only {} expressions in {DASHBOARD}",
        exprs.len()
    );
    assert_all_valid(DASHBOARD, &exprs, false);
}

#[test]
fn dashboard_has_the_variables_and_every_panel_queries_through_them() {
    let dashboard = dashboard();
    assert!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion {}",
        dashboard["schemaVersion"]
    );
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("{DASHBOARD} has no variable {name}"))
    };
    assert_eq!(variable("DS_PROMETHEUS")["type"], "datasource");
    assert_eq!(variable("DS_PROMETHEUS")["query"], "prometheus");
    assert_eq!(
        variable("procedure")["query"]["query"],
        "label_values(subtocall_procedure_events_received_total, procedure)"
    );
    assert_eq!(variable("instance")["includeAll"], true);

    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard) {
        let title = &panel["title"];
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "panel {title}: id used twice"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64(), grid["w"].as_u64());
        assert!(
            x.zip(w).is_some_and(|(x, w)| w > 0 && x + w <= 24),
            "panel {title}: gridPos {grid} is outside the 24 columns"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {title}: not on the data source variable"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            assert!(
                expr.contains(r#"instance=~"$instance""#),
                "panel {title}: `{expr}` ignores the instance variable"
            );
            if metric_names(expr)
                .iter()
                .any(|name| name.starts_with("subtocall_procedure_"))
            {
                assert!(
                    expr.contains(r#"procedure=~"$procedure""#),
                    "panel {title}: `{expr}` ignores the procedure variable"
                );
            }
            assert!(
                target["legendFormat"]
                    .as_str()
                    .is_some_and(|l| !l.is_empty()),
                "panel {title}: `{expr}` has no legend"
            );
        }
    }
}

// ---- the Prometheus alert rules -------------------------------------------

/// `(alert name, rule)` of every rule in every group.
fn alert_rules() -> Vec<(String, Yaml)> {
    let rules: Yaml = serde_yaml_ng::from_str(&read(ALERT_RULES))
        .unwrap_or_else(|e| panic!("{ALERT_RULES}: {e}"));
    let groups = rules["groups"].as_sequence().expect("groups");
    groups
        .iter()
        .flat_map(|group| group["rules"].as_sequence().expect("rules").iter())
        .map(|rule| {
            let name = rule["alert"].as_str().expect("an alert rule has a name");
            (name.to_owned(), rule.clone())
        })
        .collect()
}

#[test]
fn every_alert_rule_names_only_metrics_subtocall_exports_and_says_how_bad_it_is() {
    let rules = alert_rules();
    assert!(rules.len() >= 10, "found only {} rules", rules.len());
    let mut exprs = Vec::new();
    for (name, rule) in &rules {
        let expr = rule["expr"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no expr"));
        exprs.push((format!("alert {name}"), expr.to_owned()));
        assert!(rule["for"].as_str().is_some(), "{name}: no `for:`");
        assert!(
            matches!(rule["labels"]["severity"].as_str(), Some("page" | "ticket")),
            "{name}: severity must be page or ticket"
        );
        for annotation in ["summary", "description"] {
            assert!(
                rule["annotations"][annotation]
                    .as_str()
                    .is_some_and(|a| !a.is_empty()),
                "{name}: no {annotation} annotation"
            );
        }
    }
    assert_all_valid(ALERT_RULES, &exprs, true);
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let path = support::repo_root().join(ALERT_RULES);
    let Some(promtool) = on_path("promtool") else {
        eprintln!(
            "promtool is not on PATH: skipped `promtool check rules {ALERT_RULES}` \
             (Debian/Ubuntu: apt-get install prometheus)"
        );
        return;
    };
    let output = Command::new(promtool)
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("run promtool");
    assert!(
        output.status.success(),
        "promtool check rules {ALERT_RULES} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The first `name` in a directory of PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}
