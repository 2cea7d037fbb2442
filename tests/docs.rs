//! The documentation and the packaging checked against the code, so that
//! neither can drift: every metric is in doc/operations.md and nothing else
//! is; relative links resolve; the example Crossbar config passes `crossbar
//! check` and grants what doc/crossbar.md says the sidecar needs; the
//! Compose file uses only real variables and existing files; the Dockerfile
//! runs as non-root and checks health with the `healthcheck` subcommand;
//! defaults quoted in the docs are the configured ones.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use subtocall::config::markdown_reference;
use subtocall::discovery::meta;
use support::metrics::{
    exported_families, exported_label_values, exported_series_names, queried_name,
};

fn root() -> &'static Path {
    support::repo_root()
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// README.md and every Markdown file in doc/.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(root().join("doc"))
        .expect("doc/ is readable")
        .map(|entry| entry.expect("doc/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

// ---- metrics --------------------------------------------------------------

/// Rows of the metrics table in doc/operations.md: name -> (type, labels cell).
fn documented_metrics() -> BTreeMap<String, (String, String)> {
    let doc = read("doc/operations.md");
    let row = Regex::new(r"(?m)^\| `(subtocall_[a-z0-9_]+)` \| ([a-z]+) \|([^|]*)\|").unwrap();
    row.captures_iter(&doc)
        .map(|c| (c[1].to_owned(), (c[2].to_owned(), c[3].to_owned())))
        .collect()
}

#[test]
fn every_exported_metric_is_in_the_operations_table_with_its_type_and_label_values() {
    let documented = documented_metrics();
    let labels = exported_label_values();
    for (name, kind) in exported_families() {
        let queried = queried_name(&name, &kind);
        let (doc_kind, doc_labels) = documented.get(&queried).unwrap_or_else(|| {
            panic!(
                "metric {queried} ({kind}) is exported but not in the table of doc/operations.md"
            )
        });
        assert_eq!(
            doc_kind, &kind,
            "doc/operations.md gives {queried} the wrong type"
        );
        if kind == "info" {
            continue; // its label value is the version, not a fixed set
        }
        for value in labels.get(&queried).into_iter().flatten() {
            assert!(
                doc_labels.contains(&format!("`{value}`")),
                "label value {value:?} of {queried} is not listed in doc/operations.md"
            );
        }
    }
}

#[test]
fn every_metric_named_in_the_docs_is_exported() {
    let exported = exported_series_names();
    let mention = Regex::new(r"\bsubtocall_[a-z0-9_]*[a-z0-9]").unwrap();
    let mut checked = 0;
    for file in markdown_files() {
        let text = fs::read_to_string(&file).unwrap();
        for m in mention.find_iter(&text) {
            // `subtocall_events_(received|forwarded)_total` in a grep pattern
            // is not a metric name.
            let rest = &text[m.end()..];
            if rest.starts_with("_(") || rest.starts_with('(') {
                continue;
            }
            checked += 1;
            assert!(
                exported.contains(m.as_str()),
                "{} names the metric {}, which is not exported (exported: {exported:?})",
                file.display(),
                m.as_str()
            );
        }
    }
    assert!(
        checked >= 20,
        "found only {checked} metric names in the docs"
    );
}

// ---- links ----------------------------------------------------------------

/// Link targets in Markdown text, outside fenced code blocks and code spans.
fn link_targets(markdown: &str) -> Vec<String> {
    let inline = Regex::new(r"\]\(([^)\s]+)(?:\s+\x22[^\x22]*\x22)?\)").unwrap();
    let reference = Regex::new(r"(?m)^\s*\[[^\]]+\]:\s*(\S+)").unwrap();
    let code_span = Regex::new(r"`[^`\n]*`").unwrap();
    let mut targets = Vec::new();
    let mut in_fence = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let line = code_span.replace_all(line, "");
        for c in inline.captures_iter(&line) {
            targets.push(c[1].to_owned());
        }
        for c in reference.captures_iter(&line) {
            targets.push(c[1].to_owned());
        }
    }
    targets
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces
/// to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors a Markdown file defines (duplicates get `-1`, `-2`, …).
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    let mut in_fence = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence || !line.starts_with('#') {
            continue;
        }
        let base = slug(line.trim_start_matches('#'));
        let n = seen.entry(base.clone()).or_insert(0);
        anchors.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    anchors
}

/// Problems with the relative links of `file` (missing files, missing anchors
/// in Markdown targets), and how many links were checked.
fn broken_links(file: &Path) -> (Vec<String>, usize) {
    let text = fs::read_to_string(file).unwrap();
    let dir = file.parent().unwrap();
    let mut broken = Vec::new();
    let mut checked = 0;
    for target in link_targets(&text) {
        if target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        checked += 1;
        let (path, anchor) = match target.split_once('#') {
            Some((path, anchor)) => (path, Some(anchor)),
            None => (target.as_str(), None),
        };
        let resolved = if path.is_empty() {
            file.to_path_buf()
        } else {
            dir.join(path)
        };
        if !resolved.exists() {
            broken.push(format!("{target}: {} does not exist", resolved.display()));
            continue;
        }
        if let Some(anchor) = anchor
            && resolved.extension().is_some_and(|ext| ext == "md")
        {
            let defined = anchors(&fs::read_to_string(&resolved).unwrap());
            if !defined.contains(anchor) {
                broken.push(format!(
                    "{target}: no heading #{anchor} in {} (has {defined:?})",
                    resolved.display()
                ));
            }
        }
    }
    (broken, checked)
}

#[test]
fn link_checker_catches_missing_files_and_anchors() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("other.md"), "# Real heading\n").unwrap();
    let page = dir.path().join("page.md");
    fs::write(
        &page,
        "[ok](other.md#real-heading) [gone](missing.md) [bad](other.md#nope)\n\
         `[not a link](missing2.md)`\n```\n[in code](missing3.md)\n```\n\
         [web](https://example.com/x.md)\n",
    )
    .unwrap();
    let (broken, checked) = broken_links(&page);
    assert_eq!(checked, 3, "{broken:?}");
    assert_eq!(broken.len(), 2, "{broken:?}");
    assert!(broken[0].starts_with("missing.md"), "{broken:?}");
    assert!(broken[1].starts_with("other.md#nope"), "{broken:?}");
    assert_eq!(
        slug(" WAMP-CRA users: plain and salted"),
        "wamp-cra-users-plain-and-salted"
    );
    assert_eq!(slug("The sidecar's role"), "the-sidecars-role");
}

#[test]
fn relative_links_in_the_readme_and_docs_point_to_existing_files_and_headings() {
    let mut total = 0;
    let mut problems = Vec::new();
    for file in markdown_files() {
        let (broken, checked) = broken_links(&file);
        total += checked;
        problems.extend(
            broken
                .into_iter()
                .map(|b| format!("{}: {b}", file.display())),
        );
    }
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
    assert!(total >= 30, "only {total} relative links found");
}

// ---- configuration variables ------------------------------------------------

/// Every variable name in the reference table (names and old names), with its
/// default as the table shows it (`unset` or a computed default as text).
fn config_variables() -> BTreeMap<String, String> {
    let reference = markdown_reference();
    let row = Regex::new(r"(?m)^\| (`[A-Z][A-Z0-9_]*`[^|]*) \| ([^|]*) \|").unwrap();
    let name = Regex::new(r"`([A-Z][A-Z0-9_]*)`").unwrap();
    let mut vars = BTreeMap::new();
    for c in row.captures_iter(&reference) {
        let default = c[2].trim().trim_matches('`').to_owned();
        for n in name.captures_iter(&c[1]) {
            vars.insert(n[1].to_owned(), default.clone());
        }
    }
    assert!(vars.len() >= 30, "parsed too few variables: {vars:?}");
    vars
}

#[test]
fn every_subtocall_variable_named_in_the_docs_exists() {
    let vars = config_variables();
    let mention = Regex::new(r"\bSUBTOCALL_[A-Z0-9_]*[A-Z0-9]\b").unwrap();
    for file in markdown_files() {
        if file.ends_with("configuration.md") {
            continue; // generated from the table (its typo example is on purpose)
        }
        let text = fs::read_to_string(&file).unwrap();
        for m in mention.find_iter(&text) {
            assert!(
                vars.contains_key(m.as_str()),
                "{} names {}, which is not a configuration variable",
                file.display(),
                m.as_str()
            );
        }
    }
}

/// The value cell of the row of doc/operations.md's limits table whose first
/// cell contains `limit`.
fn documented_limit(limit: &str) -> String {
    let doc = read("doc/operations.md");
    let section = doc
        .split_once("\n## Limits\n")
        .and_then(|(_, rest)| rest.split("\n## ").next())
        .expect("doc/operations.md has a Limits section");
    section
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            (cells.len() > 3 && cells[1].contains(limit)).then(|| cells[2].to_owned())
        })
        .next()
        .unwrap_or_else(|| panic!("no row for {limit:?} in the limits table"))
}

/// 1000000 as 1,000,000.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[test]
fn the_limits_table_gives_the_fixed_limits_of_the_code() {
    use subtocall::http::Limits;
    use subtocall::wamp::auth::{MAX_ITERATIONS, MAX_KEYLEN};
    let http = Limits::default();
    let secs = |d: Duration| format!("{} s", d.as_secs());
    for (limit, value) in [
        ("HTTP request head", secs(http.request_head_timeout)),
        ("HTTP connection age", secs(http.max_connection_age)),
        (
            "HTTP connections open at once",
            http.max_connections.to_string(),
        ),
        ("PBKDF2 iterations", thousands(u64::from(MAX_ITERATIONS))),
        ("derived key length", format!("{MAX_KEYLEN} bytes")),
    ] {
        assert_eq!(documented_limit(limit), value, "the {limit:?} row");
    }
}

#[test]
fn defaults_quoted_in_the_docs_are_the_configured_defaults() {
    let vars = config_variables();
    // "`NAME` (10s)" or "`NAME` (default `0.0.0.0:8910`)"; a value that starts
    // with a digit, or follows "default", is a claim about the default.
    let quoted =
        Regex::new(r"`?\b([A-Z][A-Z0-9_]+)\b`? \((default )?`?([0-9A-Za-z.:_-]+?)`?[);, ]")
            .unwrap();
    let mut checked = 0;
    for file in markdown_files() {
        if file.ends_with("configuration.md") {
            continue; // generated from the table itself
        }
        let text = fs::read_to_string(&file).unwrap();
        for c in quoted.captures_iter(&text) {
            let (name, said_default, value) = (&c[1], c.get(2).is_some(), &c[3]);
            let Some(default) = vars.get(name) else {
                continue;
            };
            if !said_default && !value.starts_with(|ch: char| ch.is_ascii_digit()) {
                continue;
            }
            checked += 1;
            assert_eq!(
                value,
                default,
                "{} says the default of {name} is {value}",
                file.display()
            );
        }
    }
    assert!(checked >= 10, "only {checked} quoted defaults found");
}

// ---- Crossbar ---------------------------------------------------------------

/// `(uri, action)` rows of the permissions table in doc/crossbar.md's section
/// "The sidecar's role": the first backticked URI of each row.
fn documented_permissions() -> Vec<(String, String)> {
    let doc = read("doc/crossbar.md");
    let section = doc
        .split("## The sidecar's role")
        .nth(1)
        .expect("doc/crossbar.md has a section \"The sidecar's role\"");
    let section = section.split("\n## ").next().unwrap();
    let row = Regex::new(r"(?m)^\| [^`|]*`([A-Za-z0-9_.]+)`[^|]* \| (subscribe|call) \|").unwrap();
    row.captures_iter(section)
        .map(|c| (c[1].to_owned(), c[2].to_owned()))
        .collect()
}

/// Whether `role` in the Crossbar `config` allows `action` on `uri`, with
/// Crossbar's precedence: an exact rule, else the longest matching prefix
/// rule, else a wildcard rule.
fn role_allows(config: &Json, role: &str, uri: &str, action: &str) -> bool {
    let realm = &config["workers"][0]["realms"][0];
    let role = realm["roles"]
        .as_array()
        .expect("roles")
        .iter()
        .find(|r| r["name"] == role)
        .unwrap_or_else(|| panic!("no role {role:?}"));
    let rules = role["permissions"].as_array().expect("permissions");
    let matches = |rule: &&Json| {
        let pattern = rule["uri"].as_str().unwrap_or("");
        match rule["match"].as_str().unwrap_or("exact") {
            "exact" => pattern == uri,
            "prefix" => uri.starts_with(pattern),
            "wildcard" => {
                let (p, u): (Vec<&str>, Vec<&str>) =
                    (pattern.split('.').collect(), uri.split('.').collect());
                p.len() == u.len() && p.iter().zip(&u).all(|(p, u)| p.is_empty() || p == u)
            }
            _ => false,
        }
    };
    let exact = rules.iter().filter(matches).find(|r| r["match"] == "exact");
    let prefix = rules
        .iter()
        .filter(matches)
        .filter(|r| r["match"] == "prefix")
        .max_by_key(|r| r["uri"].as_str().unwrap_or("").len());
    let wildcard = rules
        .iter()
        .filter(matches)
        .find(|r| r["match"] == "wildcard");
    exact
        .or(prefix)
        .or(wildcard)
        .is_some_and(|rule| rule["allow"][action] == true)
}

fn example_crossbar_config() -> Json {
    serde_json::from_str(&read("examples/crossbar/config.json")).expect("config.json is JSON")
}

/// The role of a WAMP-CRA user in the example config, and its secret.
fn wampcra_user(config: &Json, authid: &str) -> (String, String) {
    let user =
        &config["workers"][0]["transports"][0]["paths"]["ws"]["auth"]["wampcra"]["users"][authid];
    (
        user["role"]
            .as_str()
            .unwrap_or_else(|| panic!("no WAMP-CRA user {authid:?}"))
            .to_owned(),
        user["secret"].as_str().expect("secret").to_owned(),
    )
}

#[test]
fn crossbar_md_lists_exactly_the_meta_api_the_code_uses() {
    let documented = documented_permissions();
    let meta_rows: BTreeSet<(String, String)> = documented
        .iter()
        .filter(|(uri, _)| uri.starts_with("wamp."))
        .cloned()
        .collect();
    let mut used: BTreeSet<(String, String)> = meta::META_TOPICS
        .iter()
        .map(|topic| (topic.to_string(), "subscribe".to_owned()))
        .collect();
    used.insert((meta::LIST.to_owned(), "call".to_owned()));
    used.insert((meta::GET.to_owned(), "call".to_owned()));
    used.insert((meta::COUNT_CALLEES.to_owned(), "call".to_owned()));
    assert_eq!(meta_rows, used, "doc/crossbar.md vs src/discovery/meta.rs");
    assert!(
        documented.iter().any(|(uri, _)| !uri.starts_with("wamp.")),
        "the table also lists the application URIs: {documented:?}"
    );
}

#[test]
fn example_crossbar_config_passes_crossbar_check_and_grants_what_crossbar_md_lists() {
    let dir = tempfile::tempdir().unwrap();
    let cbdir = dir.path().join(".crossbar");
    fs::create_dir(&cbdir).unwrap();
    fs::copy(
        root().join("examples/crossbar/config.json"),
        cbdir.join("config.json"),
    )
    .unwrap();
    let output = support::crossbar_check(&cbdir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("configuration looks good"),
        "crossbar check failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let config = example_crossbar_config();
    let compose = compose_file();
    let env = service_environment(&compose, "subtocall");
    let authid = env
        .get("BACKEND_USERNAME")
        .expect("compose sets BACKEND_USERNAME");
    let (role, _) = wampcra_user(&config, authid);
    let documented = documented_permissions();
    assert!(documented.len() >= 8, "{documented:?}");
    for (uri, action) in &documented {
        assert!(
            role_allows(&config, &role, uri, action),
            "role {role:?} in examples/crossbar/config.json does not allow {action} on {uri}"
        );
    }
    for action in ["register", "publish"] {
        assert!(
            !role_allows(&config, &role, "com.example.SUB_status", action),
            "doc/crossbar.md says the sidecar never needs {action}; the example role grants it"
        );
    }
}

// ---- Docker Compose ---------------------------------------------------------

fn compose_file() -> Yaml {
    serde_yaml_ng::from_str(&read("docker-compose.yml")).expect("docker-compose.yml is YAML")
}

fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    compose["services"]
        .get(name)
        .unwrap_or_else(|| panic!("docker-compose.yml has no service {name:?}"))
}

/// A service's `environment`, in either the map or the list form.
fn service_environment(compose: &Yaml, name: &str) -> BTreeMap<String, String> {
    let scalar = |v: &Yaml| match v {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        other => panic!("unexpected environment value {other:?}"),
    };
    match &service(compose, name)["environment"] {
        Yaml::Mapping(map) => map.iter().map(|(k, v)| (scalar(k), scalar(v))).collect(),
        Yaml::Sequence(items) => items
            .iter()
            .map(|item| {
                let item = scalar(item);
                let (k, v) = item.split_once('=').unwrap_or((&item, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        other => panic!("service {name} has no environment: {other:?}"),
    }
}

/// Seconds of a Compose duration such as `30s`, `1m30s` or `500ms`.
fn compose_duration(text: &str) -> Duration {
    let part = Regex::new(r"(\d+)(ms|s|m|h)").unwrap();
    let mut total = Duration::ZERO;
    for c in part.captures_iter(text) {
        let n: u64 = c[1].parse().unwrap();
        total += match &c[2] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(60 * n),
            _ => Duration::from_secs(3600 * n),
        };
    }
    total
}

#[test]
fn compose_subtocall_uses_only_known_variables_and_the_example_credentials() {
    let compose = compose_file();
    let vars = config_variables();
    let env = service_environment(&compose, "subtocall");
    assert!(env.len() >= 4, "{env:?}");
    for name in env.keys() {
        assert!(
            vars.contains_key(name),
            "docker-compose.yml sets {name} for subtocall, which is not a configuration variable"
        );
    }
    let (role, secret) = wampcra_user(&example_crossbar_config(), &env["BACKEND_USERNAME"]);
    assert_eq!(
        env["BACKEND_SECRET"], secret,
        "subtocall's secret in docker-compose.yml differs from examples/crossbar/config.json"
    );
    assert!(role_allows(
        &example_crossbar_config(),
        &role,
        meta::LIST,
        "call"
    ));
    assert!(
        env["WAMP_URL"].contains("://crossbar:8080/"),
        "WAMP_URL points at the crossbar service: {}",
        env["WAMP_URL"]
    );
}

#[test]
fn compose_stop_grace_period_outlasts_the_drain() {
    let compose = compose_file();
    let grace = service(&compose, "subtocall")["stop_grace_period"]
        .as_str()
        .expect("subtocall has a stop_grace_period");
    let vars = config_variables();
    let timeout = compose_duration(&vars["SUBTOCALL_SHUTDOWN_TIMEOUT"]);
    // The drain, then up to 6 s for GOODBYE and the last answers and 3 s for
    // the dead-letter store (src/app/mod.rs, FINAL_GRACE).
    assert!(
        compose_duration(grace) > timeout + Duration::from_secs(9),
        "stop_grace_period {grace} is not longer than the shutdown timeout {timeout:?} + 9 s"
    );
}

#[test]
fn compose_build_contexts_dockerfiles_and_bind_mounts_exist() {
    let compose = compose_file();
    let services = compose["services"].as_mapping().expect("services");
    let mut checked = 0;
    for (name, svc) in services {
        let name = name.as_str().unwrap_or("?");
        let build = &svc["build"];
        let (context, dockerfile) = match build {
            Yaml::String(context) => (context.clone(), "Dockerfile".to_owned()),
            Yaml::Mapping(_) => (
                build["context"].as_str().unwrap_or(".").to_owned(),
                build["dockerfile"]
                    .as_str()
                    .unwrap_or("Dockerfile")
                    .to_owned(),
            ),
            _ => (String::new(), String::new()),
        };
        if !context.is_empty() {
            let dir = root().join(&context);
            assert!(
                dir.is_dir(),
                "{name}: build context {context} is not a directory"
            );
            assert!(
                dir.join(&dockerfile).is_file(),
                "{name}: {context}/{dockerfile} does not exist"
            );
            checked += 1;
        }
        for volume in svc["volumes"].as_sequence().into_iter().flatten() {
            let source = match volume {
                Yaml::String(short) => short.split(':').next().unwrap_or("").to_owned(),
                long => long["source"].as_str().unwrap_or("").to_owned(),
            };
            if source.starts_with('.') || source.starts_with('/') {
                assert!(
                    root().join(&source).exists(),
                    "{name}: mounted {source} does not exist"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 3, "only {checked} paths checked");
    let crossbar_volumes = format!("{:?}", service(&compose, "crossbar")["volumes"]);
    assert!(
        crossbar_volumes.contains("./examples/crossbar/config.json:/node/.crossbar/config.json"),
        "the crossbar service mounts the example config where the image reads it: {crossbar_volumes}"
    );
}

// ---- Dockerfile -------------------------------------------------------------

/// The instructions of a Dockerfile (continuations joined, comments dropped),
/// grouped by stage.
fn dockerfile_stages(text: &str) -> Vec<Vec<String>> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Vec<String>> = Vec::new();
    for instruction in instructions {
        if instruction.to_uppercase().starts_with("FROM ") {
            stages.push(Vec::new());
        }
        if let Some(stage) = stages.last_mut() {
            stage.push(instruction);
        }
    }
    stages
}

fn instruction<'a>(stage: &'a [String], keyword: &str) -> Option<&'a str> {
    stage
        .iter()
        .rev()
        .find(|i| i.to_uppercase().starts_with(&format!("{keyword} ")))
        .map(|i| i[keyword.len() + 1..].trim())
}

fn runs_as_non_root(stage: &[String]) -> bool {
    instruction(stage, "USER").is_some_and(|user| {
        let user = user.split(':').next().unwrap_or("");
        !user.is_empty() && user != "root" && user != "0"
    })
}

#[test]
fn dockerfile_runtime_runs_as_non_root_and_checks_health_with_the_healthcheck_subcommand() {
    let stages = dockerfile_stages(&read("Dockerfile"));
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    let builder = stages[0].join("\n");
    assert!(
        builder.contains("cargo build --release --locked --bin subtocall"),
        "{builder}"
    );
    let runtime = stages.last().unwrap();
    assert!(runs_as_non_root(runtime), "runtime USER: {runtime:?}");
    let healthcheck = instruction(runtime, "HEALTHCHECK").expect("a HEALTHCHECK");
    let entrypoint = instruction(runtime, "ENTRYPOINT").expect("an ENTRYPOINT");
    let binary = Regex::new(r#"\["([^"]+)""#)
        .unwrap()
        .captures(entrypoint)
        .unwrap()[1]
        .to_owned();
    assert!(
        healthcheck.contains(&format!(r#"CMD ["{binary}", "healthcheck"]"#)),
        "HEALTHCHECK runs `{binary} healthcheck`: {healthcheck}"
    );
    let copied = instruction(runtime, "COPY").expect("the binary is copied in");
    assert!(copied.ends_with(&binary), "{copied} vs {binary}");

    // The exposed port is the default of SUBTOCALL_HTTP_ADDR.
    let vars = config_variables();
    let port = vars["SUBTOCALL_HTTP_ADDR"]
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(instruction(runtime, "EXPOSE"), Some(port.as_str()));
    // Every ENV of the runtime is a configuration variable.
    for env in runtime.iter().filter(|i| i.starts_with("ENV ")) {
        let name = env[4..].split(['=', ' ']).next().unwrap();
        assert!(vars.contains_key(name), "Dockerfile sets unknown {name}");
    }
    // The version label follows Cargo.toml.
    let version = runtime
        .iter()
        .find_map(|i| i.strip_prefix("ARG VERSION="))
        .expect("ARG VERSION=…");
    assert_eq!(version, env!("CARGO_PKG_VERSION"), "Dockerfile ARG VERSION");
}

#[test]
fn example_images_run_as_non_root() {
    for file in [
        "examples/Dockerfile.backend",
        "examples/crossbar/Dockerfile",
    ] {
        let stages = dockerfile_stages(&read(file));
        assert!(runs_as_non_root(stages.last().unwrap()), "{file}");
    }
}
