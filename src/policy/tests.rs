use std::time::Duration;

use super::*;

/// The settings of a procedure no rule matches, for tests.
pub(crate) fn defaults() -> Policy {
    Policy {
        order_by: OrderBy::None,
        call_timeout: Duration::from_secs(30),
        max_in_flight: None,
        retry: RetryPolicy {
            max_attempts: 5,
            max_age: Duration::from_secs(300),
            backoff: Backoff {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(30),
            },
        },
        max_deliveries: 5,
        batching: Batching::default(),
        details_kwarg: None,
        grace_period: Duration::from_secs(600),
    }
}

fn context() -> Context {
    Context {
        markers: vec!["SUB_".into(), "SUBBATCH_".into()],
        max_in_flight: 256,
    }
}

fn load(text: &str) -> Result<Policies, Vec<String>> {
    Policies::load("p.toml".into(), text, defaults(), &context())
}

/// The reference's example (doc/configuration.md).
const EXAMPLE: &str = crate::config::POLICY_EXAMPLE;

#[test]
fn a_star_matches_any_run_and_nothing_else_is_a_wildcard() {
    assert!(glob_matches(
        "com.example.SUB_orders*",
        "com.example.SUB_orders"
    ));
    assert!(glob_matches(
        "com.example.SUB_orders*",
        "com.example.SUB_orders__billing"
    ));
    assert!(glob_matches("*", "a.b.SUB_c"));
    assert!(glob_matches("com.*.SUB_x", "com.a.b.SUB_x"));
    assert!(glob_matches("*SUB_*__g", "a.SUB_t__g"));
    assert!(!glob_matches("*SUB_*__g", "a.SUB_t__h"));
    assert!(!glob_matches(
        "com.example.SUB_orders",
        "com.example.SUB_orders2"
    ));
    assert!(!glob_matches("a*b*c", "a.c.b"));
    assert!(glob_matches("a*b*c", "a.b.c"));
}

#[test]
fn the_first_matching_rule_applies_over_the_defaults() {
    let p = load(EXAMPLE).unwrap();
    let orders = p.resolve("com.example.SUB_orders__billing");
    assert_eq!(orders.rule, Some(0));
    let policy = orders.policy.unwrap();
    assert_eq!(policy.order_by, OrderBy::Kwarg("order_id".into()));
    assert_eq!(policy.call_timeout, Duration::from_secs(300));
    assert_eq!(policy.max_in_flight, Some(8));
    assert_eq!(policy.retry.max_attempts, 5, "unset: the default");
    let presence = p.resolve("com.example.SUB_presence").policy.unwrap();
    assert_eq!(presence.retry.max_attempts, 1);
    assert_eq!(p.rules()[1].line, 7);
    assert_eq!(p.resolve("com.example.SUB_other").rule, None);
    assert_eq!(
        p.differences(&presence),
        vec![
            ("call_timeout", "1s".to_owned()),
            ("retry_max_attempts", "1".to_owned())
        ]
    );
    assert_eq!(p.source().unwrap().hash.len(), 16);
}

#[test]
fn every_problem_is_reported_at_once_with_its_line() {
    let text = r#"[[policy]]
procedure = "com.example.SUB_a"
order_bye = "kwarg:x"

[[policy]]
procedure = "com.example.SUB_b"
call_timeout = "5 parsecs"
retry_max_attempts = 0

[[policy]]
procedure = "com.example.orders"

[[policy]]
procedure = "com.example.SUB_a"

[[policy]]
procedure = "com.example.SUB_?"

[[policy]]
call_timeout = "1s"

[[policy]]
procedure = "com.example.SUB_c"
retry_initial_backoff = "10s"
retry_max_backoff = "1s"
max_in_flight = 300
"#;
    let problems = load(text).unwrap_err();
    let expected = [
        "p.toml:3: unknown key `order_bye`; did you mean `order_by`?",
        "p.toml:7: call_timeout = \"5 parsecs\": expected a duration",
        "p.toml:8: retry_max_attempts = \"0\": is out of range; expected a whole number from 1",
        "p.toml:11: procedure = \"com.example.orders\" cannot match",
        "p.toml:14: procedure = \"com.example.SUB_a\" repeats the rule of line 2",
        "p.toml:17: procedure = \"com.example.SUB_?\" holds '?': only * is a wildcard",
        "p.toml:19: this rule has no `procedure`",
        "p.toml:25: retry_max_backoff (1s) is below retry_initial_backoff (10s)",
    ];
    assert_eq!(problems.len(), expected.len(), "{problems:#?}");
    for (problem, start) in problems.iter().zip(expected) {
        assert!(
            problem.starts_with(start),
            "{problem:?} should start with {start:?}"
        );
    }
}

#[test]
fn a_bound_above_the_global_one_and_bad_toml_are_errors_with_their_line() {
    let above = load("[[policy]]\nprocedure = \"a.SUB_b\"\nmax_in_flight = 300\n").unwrap_err();
    assert_eq!(above.len(), 1);
    assert!(
        above[0]
            .starts_with("p.toml:3: max_in_flight = 300 is above SUBTOCALL_MAX_IN_FLIGHT (256)"),
        "{above:?}"
    );
    let broken = load("[[policy]]\nprocedure = \"a.SUB_b\nx = 1\n").unwrap_err();
    assert!(
        broken[0].starts_with("p.toml:2: not valid TOML"),
        "{broken:?}"
    );
    let stray = load("call_timeout = \"1s\"\n").unwrap_err();
    assert!(
        stray[0].starts_with("p.toml:1: unknown key `call_timeout`; a setting goes in a rule"),
        "{stray:?}"
    );
    let typed = load("[[policy]]\nprocedure = \"a.SUB_b\"\nmax_in_flight = true\n").unwrap_err();
    assert!(
        typed[0].starts_with("p.toml:3: max_in_flight = a boolean: expected a whole number"),
        "{typed:?}"
    );
}

#[test]
fn an_empty_file_has_no_rules_and_numbers_may_be_bare() {
    assert!(load("").unwrap().rules().is_empty());
    let p = load("[[policy]]\nprocedure = \"*\"\ncall_timeout = 2\nbatch_max_events = 10_000\n")
        .unwrap();
    let policy = p.resolve("x.SUB_y").policy.unwrap();
    assert_eq!(policy.call_timeout, Duration::from_secs(2));
    assert_eq!(policy.batching.max_events, 10_000);
    // A wildcard registration's URI has empty components.
    let wildcard = load("[[policy]]\nprocedure = \"com.example..SUB_ev\"\n").unwrap();
    assert_eq!(wildcard.resolve("com.example..SUB_ev").rule, Some(0));
}
