//! `subtocall check`: everything the sidecar will need, tried once, with a
//! readable report. It connects and authenticates as configured, lists the
//! SUB_ registrations it would serve and the topic each maps to, tries every
//! meta-API permission discovery relies on (naming the permission to add when
//! one is missing), subscribes to each topic once (and unsubscribes), and
//! pings Redis when Redis is used. Calls `wamp`, `discovery` and `config`;
//! forwards nothing.

use std::fmt;
use std::time::Duration;

use crate::app::client_config;
use crate::config::{Config, Mode};
use crate::discovery::Marker;
use crate::discovery::meta::{self, RegistrationInfo};
use crate::discovery::topic::{Classification, Mapper, MatchPolicy};
use crate::wamp::{Client, Dict, Payload, RegistrationId, RequestError, Value};

/// How long Redis gets to answer PING.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, but probably not as intended (e.g. prefix registrations).
    Warn,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub status: Status,
    pub text: String,
}

/// Everything `check` found, in order.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<Line>,
}

impl Report {
    fn ok(&mut self, text: impl Into<String>) {
        self.push(Status::Ok, text);
    }

    fn warn(&mut self, text: impl Into<String>) {
        self.push(Status::Warn, text);
    }

    fn fail(&mut self, text: impl Into<String>) {
        self.push(Status::Fail, text);
    }

    fn push(&mut self, status: Status, text: impl Into<String>) {
        self.lines.push(Line {
            status,
            text: text.into(),
        });
    }

    /// Whether subtocall would work: no check failed.
    pub fn passed(&self) -> bool {
        self.lines.iter().all(|l| l.status != Status::Fail)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in &self.lines {
            let tag = match line.status {
                Status::Ok => "  ok  ",
                Status::Warn => " warn ",
                Status::Fail => " FAIL ",
            };
            writeln!(f, "[{tag}] {}", line.text)?;
        }
        let failures = self
            .lines
            .iter()
            .filter(|l| l.status == Status::Fail)
            .count();
        if failures == 0 {
            writeln!(f, "\nsubtocall would work with this configuration.")
        } else {
            writeln!(
                f,
                "\n{failures} problem(s): subtocall would not work as configured."
            )
        }
    }
}

/// The permission rule a role needs for the meta API, for copy-paste.
const META_RULE: &str = r#"{"uri": "wamp.registration.", "match": "prefix", "allow": {"call": true, "subscribe": true}}"#;

/// Runs every check. Never fails itself: problems are lines in the report.
pub async fn run(config: &Config) -> Report {
    let mut report = Report::default();
    let mode = match config.forward.mode {
        Mode::Wamp => "WAMP (one CALL per event)",
        Mode::Redis => "Redis (one RPUSH per event)",
    };
    report.ok(format!("configuration is valid; mode: {mode}"));

    check_router(config, &mut report).await;
    if config.forward.mode == Mode::Redis || config.redis.dead_letter_key.is_some() {
        check_redis(config, &mut report).await;
    }
    report
}

async fn check_router(config: &Config, report: &mut Report) {
    let client_config = client_config(config);
    let (client, _incoming) = match Client::connect(client_config).await {
        Ok(joined) => joined,
        Err(e) => {
            report.fail(format!(
                "cannot join realm {:?} at {}: {e}",
                config.wamp.realm, config.wamp.url
            ));
            return;
        }
    };
    let info = client.session();
    let role = info.authrole.clone().unwrap_or_default();
    report.ok(format!(
        "joined realm {} at {} as {} (role {role}, {}, serializer {})",
        info.realm,
        config.wamp.url,
        info.authid.as_deref().unwrap_or("anonymous"),
        info.authmethod.as_deref().unwrap_or("?"),
        client.serializer(),
    ));

    let mut meta_ok = true;
    for topic in meta::META_TOPICS {
        match client.subscribe(topic, Dict::new()).await {
            Ok(id) => {
                let _ = client.unsubscribe(id).await;
            }
            Err(e) => {
                meta_ok = false;
                report.fail(permission_problem(&role, "subscribe", topic, &e));
            }
        }
    }
    if meta_ok {
        report.ok("may subscribe to the wamp.registration.on_* meta events");
    }

    let ids = match client
        .call(meta::LIST, Payload::default(), Dict::new(), None)
        .await
    {
        Ok(result) => match meta::parse_list_result(&result.payload.args) {
            Ok(list) => list.ids().collect::<Vec<RegistrationId>>(),
            Err(e) => {
                report.fail(format!("{} answered something unexpected: {e}", meta::LIST));
                return;
            }
        },
        Err(e) => {
            report.fail(permission_problem(&role, "call", meta::LIST, &e));
            return;
        }
    };
    report.ok(format!(
        "may call {} ({} registrations visible)",
        meta::LIST,
        ids.len()
    ));

    let mut registrations = Vec::new();
    for id in ids {
        let args = Payload::new(vec![Value::UInt(id.0)], Dict::new());
        match client.call(meta::GET, args, Dict::new(), None).await {
            Ok(result) => match meta::parse_get_result(&result.payload.args) {
                Ok(info) => registrations.push(info),
                Err(e) => report.warn(format!(
                    "registration {id}: unexpected {} result: {e}",
                    meta::GET
                )),
            },
            // Deleted between list and get: nothing to report.
            Err(RequestError::Wamp(e)) if e.error == meta::NO_SUCH_REGISTRATION => {}
            Err(e) => {
                report.fail(permission_problem(&role, "call", meta::GET, &e));
                return;
            }
        }
    }
    if !registrations.is_empty() {
        report.ok(format!("may call {}", meta::GET));
    }

    check_registrations(config, &client, &registrations, report).await;
    client.leave(Duration::from_secs(2)).await;
}

/// Lists what would be served and tries to subscribe to each topic once.
async fn check_registrations(
    config: &Config,
    client: &Client,
    registrations: &[RegistrationInfo],
    report: &mut Report,
) {
    let marker = match Marker::new(config.discovery.marker.clone()) {
        Ok(m) => m,
        Err(e) => {
            report.fail(format!("marker: {e}"));
            return;
        }
    };
    let mapper = Mapper::new(marker, config.discovery.filter.clone());
    let mut served = 0;
    for reg in registrations {
        match mapper.classify(&reg.uri, reg.match_policy) {
            Classification::Shared(key) => {
                served += 1;
                let pattern = match key.policy {
                    MatchPolicy::Wildcard => " (wildcard)",
                    _ => "",
                };
                let options = match key.policy {
                    MatchPolicy::Wildcard => Dict::new().with("match", "wildcard"),
                    _ => Dict::new(),
                };
                match client.subscribe(&key.topic, options).await {
                    Ok(id) => {
                        let _ = client.unsubscribe(id).await;
                        report.ok(format!(
                            "serves {} (invoke {}) <- topic {}{pattern}",
                            reg.uri, reg.invoke, key.topic
                        ));
                    }
                    Err(e) => {
                        let role = client.session().authrole.clone().unwrap_or_default();
                        report.fail(permission_problem(&role, "subscribe", &key.topic, &e));
                    }
                }
                if reg.invoke == "single" {
                    report.warn(format!(
                        "{} is registered with invoke \"single\": only one backend can register it; \
                         use roundrobin (or random, first, last) to share events between backends",
                        reg.uri
                    ));
                }
            }
            Classification::Prefix => report.warn(format!(
                "ignores {}: a prefix registration stands for no single topic (register it exact or wildcard)",
                reg.uri
            )),
            Classification::FilteredOut => report.ok(format!(
                "ignores {}: excluded by SUBTOCALL_REGISTRATION_FILTER",
                reg.uri
            )),
            Classification::Ordinary => {}
        }
    }
    if served == 0 {
        report.warn(format!(
            "no {}-registrations yet: nothing to forward until a backend registers one \
             (subtocall picks them up while running)",
            config.discovery.marker
        ));
    }
}

async fn check_redis(config: &Config, report: &mut Report) {
    let url = &config.redis.url;
    let ping = async {
        let client = redis::Client::open(url.expose()).map_err(|e| e.to_string())?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(REDIS_TIMEOUT, ping).await {
        Ok(Ok(_)) => report.ok(format!("Redis at {url} answers PING")),
        Ok(Err(e)) => report.fail(format!("Redis at {url}: {e}")),
        Err(_) => report.fail(format!(
            "Redis at {url}: no answer within {REDIS_TIMEOUT:?}"
        )),
    }
}

/// What to tell the operator when a request was refused.
fn permission_problem(role: &str, action: &str, uri: &str, error: &RequestError) -> String {
    match error {
        RequestError::Wamp(e) if e.error == "wamp.error.not_authorized" => {
            let rule = if uri.starts_with("wamp.registration.") {
                format!(" e.g. the rule {META_RULE}")
            } else {
                String::new()
            };
            format!(
                "role {role:?} may not {action} {uri}: add '{action}' permission on {uri} to the role{rule}"
            )
        }
        other => format!("{action} {uri} failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wamp::WampError;

    #[test]
    fn a_refused_meta_request_names_the_permission_to_add() {
        let refused = RequestError::Wamp(WampError {
            error: "wamp.error.not_authorized".into(),
            details: Dict::new(),
            payload: Payload::default(),
        });
        let text = permission_problem("limited", "subscribe", meta::ON_CREATE, &refused);
        assert!(
            text.starts_with("role \"limited\" may not subscribe wamp.registration.on_create: add 'subscribe' permission"),
            "{text}"
        );
        assert!(text.contains(r#""uri": "wamp.registration.""#), "{text}");
    }

    #[test]
    fn report_passes_only_without_failures() {
        let mut r = Report::default();
        r.ok("a");
        r.warn("b");
        assert!(r.passed());
        assert!(r.to_string().contains("would work"));
        r.fail("c");
        assert!(!r.passed());
        assert!(r.to_string().contains("1 problem(s)"));
        assert!(r.to_string().contains("[ FAIL ] c"));
    }
}
