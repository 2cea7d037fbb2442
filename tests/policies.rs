//! Per-procedure delivery policies (`SUBTOCALL_POLICY_FILE`) on the real
//! router: a rule gives one procedure its own call timeout and retries,
//! ordering, bound on calls in flight; SIGHUP reloads the file (a bad one
//! keeps the rules); every error of a file is reported with its line; two
//! instances of the Redis queue apply the same rules. Real Crossbar,
//! autobahn backends, redis-server.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use support::ordered::{Verdict, calls, calls_to, verdict};
use support::sidecar::{Sidecar, mapping, run_subtocall, sidecar_env, status};
use support::*;

const WAIT: Duration = Duration::from_secs(60);

/// Writes `text` as the policy file in `dir`.
fn write_policy(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("policies.toml");
    std::fs::write(&path, text).expect("write the policy file");
    path
}

/// The sum of `family`'s samples for `procedure` in `/metrics`.
async fn per_procedure(sidecar: &Sidecar, family: &str, procedure: &str) -> f64 {
    let (_, body) = sidecar
        .http_get("/metrics")
        .await
        .expect("/metrics answers");
    let label = format!("procedure=\"{procedure}\"");
    body.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn slow_backend(
    crossbar: &Crossbar,
    name: &str,
    procedures: &[&str],
    delay_ms: u64,
) -> BackendOptions {
    BackendOptions {
        name: name.into(),
        delay_ms,
        report_answers: true,
        ..BackendOptions::new(crossbar, procedures)
    }
}

const STRICT: &str = "com.example.SUB_pol_strict";
const PATIENT: &str = "com.example.SUB_pol_patient";

/// The file of tests 1 and 6: the strict procedure gives up after one
/// attempt of at most a second; a rule matches nothing.
const STRICT_FILE: &str = r#"# one procedure gives up fast
[[policy]]
procedure = "com.example.SUB_pol_strict"
call_timeout = "1s"
retry_max_attempts = 1

[[policy]]
procedure = "com.example.SUB_pol_nobody*"
call_timeout = "2s"
"#;

#[tokio::test]
async fn a_rule_gives_one_procedure_its_own_timeout_and_retries() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let _backend = Backend::spawn(slow_backend(&crossbar, "A", &[STRICT, PATIENT], 1_500)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_policy(dir.path(), STRICT_FILE);
    let mut env = sidecar_env(&crossbar);
    env.insert("SUBTOCALL_POLICY_FILE".into(), file.display().to_string());
    let sidecar = Sidecar::start(env.clone());
    sidecar
        .wait_subscribed(&router, "com.example.pol_strict", WAIT)
        .await;
    sidecar
        .wait_subscribed(&router, "com.example.pol_patient", WAIT)
        .await;

    Publisher::publish(&crossbar, "com.example.pol_strict", 5).await;
    Publisher::publish(&crossbar, "com.example.pol_patient", 5).await;
    sidecar.wait_idle(10, WAIT).await;

    let dead = "subtocall_procedure_events_dead_lettered_total";
    let forwarded = "subtocall_procedure_events_forwarded_total";
    assert_eq!(per_procedure(&sidecar, dead, STRICT).await, 5.0);
    assert_eq!(per_procedure(&sidecar, forwarded, STRICT).await, 0.0);
    assert_eq!(per_procedure(&sidecar, forwarded, PATIENT).await, 5.0);
    assert_eq!(per_procedure(&sidecar, dead, PATIENT).await, 0.0);

    let s = status(&sidecar).await;
    let strict = &mapping(&s, STRICT)["policy"];
    assert_eq!(strict["rule"], STRICT);
    assert_eq!(strict["line"], 2);
    assert_eq!(strict["settings"]["call_timeout"], "1s");
    assert_eq!(
        strict["overrides"],
        serde_json::json!(["call_timeout", "retry_max_attempts"])
    );
    let patient = &mapping(&s, PATIENT)["policy"];
    assert_eq!(patient["rule"], Value::Null);
    assert_eq!(patient["settings"]["call_timeout"], "30s");
    assert_eq!(s["policy_file"]["rules"], 2);
    assert_eq!(s["policy_file"]["content_hash"].as_str().unwrap().len(), 16);

    // The rule that matches nothing is said once, after discovery.
    let unmatched = sidecar
        .log()
        .lines()
        .filter(|l| l.contains("matches no registration") && l.contains("SUB_pol_nobody"))
        .count();
    assert_eq!(unmatched, 1, "{}", sidecar.log());

    // `check` names the rule of each registration and what it changes.
    let output = run_subtocall(&["check"], &env, Duration::from_secs(30)).await;
    let report = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{report}");
    let line_of = |procedure: &str| {
        report
            .lines()
            .find(|l| l.contains(&format!("serves {procedure} ")))
            .unwrap_or_else(|| panic!("no line for {procedure}:\n{report}"))
            .to_owned()
    };
    assert!(
        line_of(STRICT).ends_with(
            r#"policy: rule "com.example.SUB_pol_strict" (line 2): call_timeout=1s, retry_max_attempts=1"#
        ),
        "{report}"
    );
    assert!(line_of(PATIENT).ends_with("policy: defaults"), "{report}");
    assert!(
        report.contains(
            r#"policy rule "com.example.SUB_pol_nobody*" (line 7) matches no registration"#
        ),
        "{report}"
    );
}

#[tokio::test]
async fn a_rule_orders_one_group_by_key_while_another_of_the_same_events_is_not() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let keyed = "com.example.SUB_pol_same__keyed";
    let free = "com.example.SUB_pol_same__free";
    let backend = |name: &str, procedure: &str| BackendOptions {
        delay_ms: 20,
        jitter_ms: 20,
        ..slow_backend(&crossbar, name, &[procedure], 0)
    };
    let mut a = Backend::spawn(backend("A", keyed)).await;
    let mut b = Backend::spawn(backend("B", free)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_policy(
        dir.path(),
        "[[policy]]\nprocedure = \"com.example.SUB_pol_same__keyed\"\norder_by = \"kwarg:k\"\n",
    );
    let sidecar = Sidecar::start_for(
        &crossbar,
        &[("SUBTOCALL_POLICY_FILE", &file.display().to_string())],
    );
    sidecar
        .wait_subscribed(&router, "com.example.pol_same", WAIT)
        .await;

    const EVENTS: u32 = 300;
    Publisher::run(PublisherOptions {
        quiet: true,
        rate: 500.0,
        keys: Some(4),
        ..PublisherOptions::new(&crossbar, "com.example.pol_same", EVENTS)
    })
    .await
    .assert_success();
    sidecar.wait_idle(2 * u64::from(EVENTS), WAIT).await;
    a.sync().await;
    b.sync().await;

    let ordered = verdict(&calls(&[&a]));
    let unordered = verdict(&calls(&[&b]));
    println!(
        "policy ordering: keyed group {} overlapping, {} out of order; free group {} overlapping",
        ordered.overlapping, ordered.out_of_order, unordered.overlapping
    );
    let Verdict {
        keys,
        out_of_order,
        overlapping,
        ..
    } = ordered;
    assert_eq!(keys, 4);
    assert_eq!(out_of_order, 0, "the ordered group's keys in order");
    assert_eq!(
        overlapping, 0,
        "the ordered group never calls a key twice at once"
    );
    assert!(
        unordered.overlapping > 0,
        "the group without a rule is not ordered: its calls of one key overlap"
    );
    assert_eq!(calls(&[&a]).len(), EVENTS as usize);
    assert_eq!(calls(&[&b]).len(), EVENTS as usize);
}

#[tokio::test]
async fn max_in_flight_one_holds_one_procedure_to_one_call_while_another_runs_twenty() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let one = "com.example.SUB_pol_one";
    let many = "com.example.SUB_pol_many";
    let mut backend = Backend::spawn(slow_backend(&crossbar, "A", &[one, many], 300)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_policy(
        dir.path(),
        "[[policy]]\nprocedure = \"com.example.SUB_pol_one\"\nmax_in_flight = 1\n",
    );
    let sidecar = Sidecar::start_for(
        &crossbar,
        &[("SUBTOCALL_POLICY_FILE", &file.display().to_string())],
    );
    sidecar
        .wait_subscribed(&router, "com.example.pol_one", WAIT)
        .await;
    sidecar
        .wait_subscribed(&router, "com.example.pol_many", WAIT)
        .await;

    for (topic, n) in [("com.example.pol_one", 8), ("com.example.pol_many", 30)] {
        Publisher::run(PublisherOptions {
            quiet: true,
            keys: Some(1_000),
            ..PublisherOptions::new(&crossbar, topic, n)
        })
        .await
        .assert_success();
    }
    sidecar.wait_idle(38, WAIT).await;
    backend.sync().await;

    let all = calls(&[&backend]);
    assert_eq!(all.len(), 38);
    let most = |procedure| verdict(&calls_to(&[&backend], procedure)).most;
    let (one_most, many_most) = (most(one), most(many));
    println!(
        "max_in_flight: {one_most} call(s) of the bounded procedure at once, {many_most} of the other"
    );
    assert_eq!(one_most, 1, "max_in_flight = 1: one call at a time");
    assert!(
        many_most >= 20,
        "the other procedure runs {many_most} at once, not 20"
    );
    assert_eq!(
        per_procedure(&sidecar, "subtocall_procedure_events_forwarded_total", one).await,
        8.0
    );
}

#[tokio::test]
async fn sighup_applies_a_changed_file_to_new_events_and_keeps_the_rules_when_it_is_broken() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let procedure = "com.example.SUB_pol_reload";
    let topic = "com.example.pol_reload";
    let _backend = Backend::spawn(slow_backend(&crossbar, "A", &[procedure], 1_500)).await;
    let dir = tempfile::tempdir().unwrap();
    let patient =
        "[[policy]]\nprocedure = \"com.example.SUB_pol_reload\"\ncall_timeout = \"20s\"\n";
    let file = write_policy(dir.path(), patient);
    let sidecar = Sidecar::start_for(
        &crossbar,
        &[("SUBTOCALL_POLICY_FILE", &file.display().to_string())],
    );
    sidecar.wait_subscribed(&router, topic, WAIT).await;
    let dead = "subtocall_procedure_events_dead_lettered_total";
    let forwarded = "subtocall_procedure_events_forwarded_total";

    Publisher::publish(&crossbar, topic, 3).await;
    sidecar.wait_idle(3, WAIT).await;
    assert_eq!(per_procedure(&sidecar, forwarded, procedure).await, 3.0);
    let first_hash = status(&sidecar).await["policy_file"]["content_hash"].clone();

    // A changed file: the procedure now gives up after one short attempt.
    write_policy(
        dir.path(),
        "[[policy]]\nprocedure = \"com.example.SUB_pol_reload\"\ncall_timeout = \"1s\"\nretry_max_attempts = 1\n",
    );
    sidecar.signal(libc::SIGHUP);
    sidecar
        .wait_metric("subtocall_policy_reloads_total", |n| n == 1.0, WAIT)
        .await;
    let reloaded = status(&sidecar).await;
    assert_ne!(reloaded["policy_file"]["content_hash"], first_hash);
    assert_eq!(
        mapping(&reloaded, procedure)["policy"]["settings"]["call_timeout"],
        "1s"
    );
    Publisher::publish(&crossbar, topic, 3).await;
    sidecar.wait_idle(6, WAIT).await;
    assert_eq!(per_procedure(&sidecar, dead, procedure).await, 3.0);
    assert_eq!(per_procedure(&sidecar, forwarded, procedure).await, 3.0);

    // A broken file: the rules in effect stay, and /status says why.
    write_policy(
        dir.path(),
        "[[policy]]\nprocedure = \"com.example.SUB_pol_reload\"\ncall_timout = \"20s\"\n",
    );
    sidecar.signal(libc::SIGHUP);
    sidecar
        .wait_metric("subtocall_policy_reload_failures_total", |n| n == 1.0, WAIT)
        .await;
    let refused = status(&sidecar).await;
    let error = refused["policy_file"]["last_reload_error"]
        .as_str()
        .unwrap();
    assert!(
        error.ends_with("policies.toml:3: unknown key `call_timout`; did you mean `call_timeout`?"),
        "{error}"
    );
    assert_eq!(
        refused["policy_file"]["content_hash"],
        reloaded["policy_file"]["content_hash"]
    );
    Publisher::publish(&crossbar, topic, 3).await;
    sidecar.wait_idle(9, WAIT).await;
    assert_eq!(per_procedure(&sidecar, dead, procedure).await, 6.0);
    assert_eq!(per_procedure(&sidecar, forwarded, procedure).await, 3.0);
    assert!(!sidecar.has_exited());
    assert_eq!(sidecar.metric("subtocall_reload_signals_total").await, 2.0);
}

#[tokio::test]
async fn every_error_of_a_policy_file_is_reported_by_the_binary_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_policy(
        dir.path(),
        r#"[[policy]]
procedure = "com.example.SUB_a"
order_bye = "kwarg:x"

[[policy]]
procedure = "com.example.SUB_b"
call_timeout = "soon"

[[policy]]
procedure = "com.example.orders"

[[policy]]
procedure = "com.example.SUB_a"
"#,
    );
    let shown = file.display().to_string();
    let mut env = BTreeMap::new();
    env.insert("SUBTOCALL_POLICY_FILE".to_owned(), shown.clone());
    for command in [&[][..], &["check"][..]] {
        let output = run_subtocall(command, &env, Duration::from_secs(10)).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{command:?}: {stderr}");
        for expected in [
            format!(
                "SUBTOCALL_POLICY_FILE: {shown}:3: unknown key `order_bye`; did you mean `order_by`?"
            ),
            format!(
                "SUBTOCALL_POLICY_FILE: {shown}:7: call_timeout = \"soon\": expected a duration"
            ),
            format!(
                "SUBTOCALL_POLICY_FILE: {shown}:10: procedure = \"com.example.orders\" cannot match"
            ),
            format!(
                "SUBTOCALL_POLICY_FILE: {shown}:13: procedure = \"com.example.SUB_a\" repeats the rule of line 2"
            ),
        ] {
            assert!(
                stderr.contains(&expected),
                "{command:?}: {expected:?} not in\n{stderr}"
            );
        }
    }
    env.insert(
        "SUBTOCALL_POLICY_FILE".to_owned(),
        dir.path().join("missing.toml").display().to_string(),
    );
    let output = run_subtocall(&[], &env, Duration::from_secs(10)).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("missing.toml\": cannot be read"),
        "{stderr}"
    );
}

#[tokio::test]
async fn two_instances_of_the_redis_queue_apply_the_same_rules() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let _backend = Backend::spawn(slow_backend(&crossbar, "A", &[STRICT, PATIENT], 1_500)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_policy(dir.path(), STRICT_FILE);
    let env = support::queue::queue_env(
        &crossbar,
        &redis.url(),
        &[("SUBTOCALL_POLICY_FILE", &file.display().to_string())],
    );
    let instances = [Sidecar::start(env.clone()), Sidecar::start(env)];
    for topic in ["com.example.pol_strict", "com.example.pol_patient"] {
        for instance in &instances {
            support::queue::wait_subscribers(instance, &router, topic, 2).await;
        }
    }

    const EVENTS: u32 = 20;
    for topic in ["com.example.pol_strict", "com.example.pol_patient"] {
        Publisher::run(PublisherOptions {
            quiet: true,
            rate: 50.0,
            ..PublisherOptions::new(&crossbar, topic, EVENTS)
        })
        .await
        .assert_success();
    }
    let dead = "subtocall_procedure_events_dead_lettered_total";
    let forwarded = "subtocall_procedure_events_forwarded_total";
    let total = |family: &'static str, procedure: &'static str| {
        let instances = &instances;
        async move {
            let mut sum = 0.0;
            for i in instances {
                sum += per_procedure(i, family, procedure).await;
            }
            sum
        }
    };
    eventually(WAIT, "every event delivered or dead-lettered", || async {
        let done = total(dead, STRICT).await + total(forwarded, STRICT).await == f64::from(EVENTS)
            && total(forwarded, PATIENT).await + total(dead, PATIENT).await == f64::from(EVENTS);
        done.then_some(())
    })
    .await;
    let mut hashes = Vec::new();
    for (n, i) in instances.iter().enumerate() {
        let strict_forwarded = per_procedure(i, forwarded, STRICT).await;
        let patient_dead = per_procedure(i, dead, PATIENT).await;
        println!(
            "instance {n}: strict dead {}, patient forwarded {}",
            per_procedure(i, dead, STRICT).await,
            per_procedure(i, forwarded, PATIENT).await
        );
        assert_eq!(
            strict_forwarded, 0.0,
            "instance {n} applied the strict rule"
        );
        assert_eq!(patient_dead, 0.0, "instance {n} applied the defaults");
        hashes.push(status(i).await["policy_file"]["content_hash"].clone());
    }
    assert_eq!(total(dead, STRICT).await, f64::from(EVENTS));
    assert_eq!(total(forwarded, PATIENT).await, f64::from(EVENTS));
    assert_eq!(
        hashes[0], hashes[1],
        "both instances show the same content hash"
    );
}
