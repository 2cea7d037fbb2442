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
use crate::config::{Config, Mode, QueueKind, RedisTarget};
use crate::discovery::GroupName;
use crate::discovery::meta::{self, RegistrationInfo};
use crate::discovery::topic::{Classification, Mapper, MatchPolicy};
use crate::wamp::{Client, Dict, Payload, RegistrationId, RequestError, Value};

/// How long Redis gets to answer PING and INFO.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// The oldest Redis (major, minor) `check` accepts: the Redis Streams queue
/// uses no command newer than 7.0. Every Valkey (7.2 and later) qualifies.
const MIN_REDIS: (u32, u32) = (7, 0);

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
        Mode::Redis if config.redis.target == RedisTarget::Stream => {
            "Redis streams (one XADD per event, read by consumer groups)"
        }
        Mode::Redis => "Redis (one RPUSH per event)",
    };
    let queue = match config.queue.kind {
        QueueKind::Memory => "memory (one instance)".to_owned(),
        QueueKind::Redis => format!(
            "Redis Streams, queue name {} (instances with this name share the work)",
            config.queue.name
        ),
    };
    report.ok(format!(
        "configuration is valid; mode: {mode}; queue: {queue}"
    ));

    check_router(config, &mut report).await;
    if config.forward.mode == Mode::Redis
        || config.redis.dead_letter_key.is_some()
        || config.queue.kind == QueueKind::Redis
    {
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
    let marker = match config.discovery.marker() {
        Ok(m) => m,
        Err(e) => {
            report.fail(format!("marker: {e}"));
            return;
        }
    };
    let mapper = Mapper::new(marker, config.discovery.filter.clone());
    let mut served = 0;
    let mut matched = vec![false; config.policies.rules().len()];
    for reg in registrations {
        match mapper.classify(&reg.uri, reg.match_policy) {
            Classification::Shared(key, group) => {
                served += 1;
                if let Some(i) = config.policies.resolve(&reg.uri).rule {
                    matched[i] = true;
                }
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
                            "serves {} (invoke {}) <- topic {}{pattern}, {}; policy: {}",
                            reg.uri,
                            reg.invoke,
                            key.topic,
                            GroupName(&group),
                            policy_line(&config.policies, &reg.uri)
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
    if let Some(source) = config.policies.source() {
        report.ok(format!(
            "policy file {}: {} rules, content {}",
            source.path.display(),
            config.policies.rules().len(),
            source.hash
        ));
    }
    for (rule, _) in config
        .policies
        .rules()
        .iter()
        .zip(&matched)
        .filter(|(_, m)| !**m)
    {
        report.warn(format!(
            "policy rule {:?} (line {}) matches no registration",
            rule.pattern, rule.line
        ));
    }
    if served == 0 {
        report.warn(format!(
            "no {}-registrations yet: nothing to forward until a backend registers one \
             (subtocall picks them up while running)",
            config.discovery.marker
        ));
    }
}

/// The rule that applies to `uri` and the settings it changes, or
/// `defaults`.
fn policy_line(policies: &crate::policy::Policies, uri: &str) -> String {
    let resolved = policies.resolve(uri);
    let Some(policy) = resolved.policy else {
        return "defaults".to_owned();
    };
    let changed: Vec<String> = policies
        .differences(&policy)
        .into_iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    let rule = policies.describe(resolved.rule);
    if changed.is_empty() {
        format!("{rule}, no setting changed")
    } else {
        format!("{rule}: {}", changed.join(", "))
    }
}

async fn check_redis(config: &Config, report: &mut Report) {
    // Where it asks: the URL (its password hidden), or the master the
    // sentinels name.
    let url: String = match &config.redis.sentinel {
        Some(s) => format!(
            "the master {} (named by {} sentinels)",
            s.master,
            s.sentinels.len()
        ),
        None => config.redis.url.to_string(),
    };
    let url = &url;
    let ask = async {
        // One server, or the master the sentinels name (not a cluster:
        // PING and INFO ask the seed).
        let target = crate::streams::Target::from_config(&config.redis, false)?;
        let mut conn = target.shared()?.get().await.map_err(|e| e.to_string())?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        // It answers: whatever happens now is about its version.
        let version = match redis::cmd("INFO")
            .arg("server")
            .query_async::<String>(&mut conn)
            .await
        {
            Ok(info) => parse_server_version(&info),
            Err(e) => Err(format!("INFO server failed: {e}")),
        };
        let topology = topology(config, &mut conn).await;
        let streams =
            if config.forward.mode == Mode::Redis && config.redis.target == RedisTarget::Stream {
                stream_lines(config, &mut conn).await
            } else {
                Vec::new()
            };
        Ok::<_, String>((version, topology, streams))
    };
    match tokio::time::timeout(REDIS_TIMEOUT, ask).await {
        Ok(Ok((version, topology, streams))) => {
            report.lines.push(version_line(url, version));
            match topology {
                Ok(t) => {
                    report.ok(t.describe());
                    let wanted = config.redis.wait.replicas;
                    if wanted > 0 && (t.fewest_replicas() as u64) < u64::from(wanted) {
                        report.warn(format!(
                            "SUBTOCALL_REDIS_WAIT_REPLICAS={wanted} but {} replicas are \
                             online{}: WAITs fall short, admitted events stay unconfirmed \
                             copies (up to SUBTOCALL_REDIS_WAIT_COPIES) and the \
                             replicas-missing alert fires",
                            t.fewest_replicas(),
                            if t.masters.len() > 1 {
                                " on some master"
                            } else {
                                ""
                            }
                        ));
                    }
                }
                Err(e) => report.warn(format!("Redis topology unknown: {e}")),
            }
            for line in streams {
                report.ok(line);
            }
        }
        Ok(Err(e)) => report.fail(format!("Redis at {url}: {e}")),
        Err(_) => report.fail(format!(
            "Redis at {url}: no answer within {REDIS_TIMEOUT:?}"
        )),
    }
}

/// The masters found and their online replicas.
#[derive(Debug, PartialEq)]
struct Topology {
    cluster: bool,
    /// Each master's address and its online replicas' addresses.
    masters: Vec<(String, Vec<String>)>,
}

impl Topology {
    fn fewest_replicas(&self) -> usize {
        self.masters.iter().map(|(_, r)| r.len()).min().unwrap_or(0)
    }

    fn describe(&self) -> String {
        let one = |(master, replicas): &(String, Vec<String>)| match replicas.len() {
            0 => format!("{master} without replicas"),
            _ => format!("{master} with replicas {}", replicas.join(", ")),
        };
        if self.cluster {
            format!(
                "topology: a cluster of {} masters: {}",
                self.masters.len(),
                self.masters.iter().map(one).collect::<Vec<_>>().join("; ")
            )
        } else {
            format!(
                "topology: master {}",
                self.masters.first().map(one).unwrap_or_default()
            )
        }
    }
}

/// What `conn` says of the masters and replicas: `CLUSTER NODES` on a
/// cluster, `INFO replication` on a master.
async fn topology(config: &Config, conn: &mut crate::streams::Conn) -> Result<Topology, String> {
    if config.redis.cluster {
        let nodes = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async::<String>(conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok(cluster_topology(&nodes))
    } else {
        let info = redis::cmd("INFO")
            .arg("replication")
            .query_async::<String>(conn)
            .await
            .map_err(|e| e.to_string())?;
        let addr = match &config.redis.sentinel {
            Some(s) => format!("{} (Sentinel)", s.master),
            None => config.redis.url.to_string(),
        };
        master_topology(&addr, &info)
    }
}

/// A master's `INFO replication`: its online replicas (`slaveN:ip=...,
/// port=...,state=online,...`).
fn master_topology(addr: &str, info: &str) -> Result<Topology, String> {
    let role = info_field(info, "role");
    if role != Some("master") {
        return Err(format!(
            "{addr} is not a master (role {})",
            role.unwrap_or_default()
        ));
    }
    let replicas = info
        .lines()
        .filter(|l| l.starts_with("slave") && l.contains("ip="))
        .filter_map(|l| {
            let (_, rest) = l.trim().split_once(':')?;
            let get = |k: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            };
            if get("state") != Some("online") {
                return None;
            }
            Some(format!("{}:{}", get("ip")?, get("port")?))
        })
        .collect();
    Ok(Topology {
        cluster: false,
        masters: vec![(addr.to_owned(), replicas)],
    })
}

/// `CLUSTER NODES`: every master that holds slots, with its connected
/// replicas.
fn cluster_topology(nodes: &str) -> Topology {
    // <id> <ip:port@cport> <flags> <master id or -> <ping> <pong> <epoch> <link> <slots...>
    let rows: Vec<Vec<&str>> = nodes
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 8)
        .collect();
    let addr = |f: &[&str]| f[1].split('@').next().unwrap_or(f[1]).to_owned();
    let healthy = |f: &[&str]| !f[2].contains("fail") && f[7] == "connected";
    let masters = rows
        .iter()
        .filter(|f| f[2].contains("master") && !f[2].contains("fail") && f.len() > 8)
        .map(|m| {
            let replicas = rows
                .iter()
                .filter(|r| r[3] == m[0] && r[2].contains("slave") && healthy(r))
                .map(|r| addr(r))
                .collect();
            (addr(m), replicas)
        })
        .collect();
    Topology {
        cluster: true,
        masters,
    }
}

/// One line per stream of the stream target (`<prefix>*`): its backlog and
/// each consumer group with its consumers, pending entries and lag.
async fn stream_lines(config: &Config, conn: &mut crate::streams::Conn) -> Vec<String> {
    let pattern = format!("{}*", config.redis.prefix);
    let mut streams: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let scanned: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .arg("TYPE")
            .arg("stream")
            .query_async(conn)
            .await;
        let Ok((next, keys)) = scanned else {
            return vec!["could not list the streams (SCAN failed)".to_owned()];
        };
        streams.extend(keys);
        if next == 0 || streams.len() >= 1000 {
            break;
        }
        cursor = next;
    }
    streams.sort();
    if streams.is_empty() {
        return vec![format!(
            "no stream under {pattern:?} yet (subtocall creates each with its group {:?} on the first event)",
            config.redis.consumer_group
        )];
    }
    let mut lines = Vec::new();
    for stream in streams {
        let len: i64 = redis::cmd("XLEN")
            .arg(&stream)
            .query_async(conn)
            .await
            .unwrap_or(-1);
        let groups: redis::RedisResult<Vec<redis::Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream)
            .query_async(conn)
            .await;
        let groups: Vec<String> = groups
            .unwrap_or_default()
            .iter()
            .map(|g| {
                let field = |name: &str| -> String {
                    let redis::Value::Array(kv) = g else {
                        return "?".into();
                    };
                    kv.chunks(2)
                        .find(|p| matches!(&p[0], redis::Value::BulkString(k) if k == name.as_bytes()))
                        .and_then(|p| p.get(1))
                        .map_or("?".into(), |v| match v {
                            redis::Value::Int(n) => n.to_string(),
                            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                            redis::Value::Nil => "unknown".into(),
                            _ => "?".into(),
                        })
                };
                format!(
                    "group {} ({} consumers, {} pending, lag {})",
                    field("name"),
                    field("consumers"),
                    field("pending"),
                    field("lag")
                )
            })
            .collect();
        lines.push(format!(
            "stream {stream}: {len} entries (at most {} unacknowledged); {}",
            config.redis.max_backlog,
            if groups.is_empty() {
                "no consumer group".to_owned()
            } else {
                groups.join(", ")
            }
        ));
    }
    lines
}

/// The server that answered, as its `INFO server` section names it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServerVersion {
    /// "Redis" or "Valkey".
    name: &'static str,
    /// The version as the server reports it, e.g. "7.0.15".
    version: String,
    /// Its (major, minor), compared with [`MIN_REDIS`].
    major_minor: (u32, u32),
}

/// Reads the server and its version from the text of `INFO server`. Redis
/// reports `redis_version`; Valkey reports `server_name:valkey` and, since
/// 7.2.5, its own `valkey_version`, while its `redis_version` stays the Redis
/// it is compatible with (7.2.4). `Err` says why the version cannot be told.
/// The value of `name` in an `INFO` reply (`name:value` lines).
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        let (key, value) = line.trim().split_once(':')?;
        (key == name).then_some(value.trim())
    })
}

fn parse_server_version(info: &str) -> Result<ServerVersion, String> {
    let field = |name: &str| info_field(info, name);
    let valkey_version = field("valkey_version");
    let is_valkey = field("server_name") == Some("valkey") || valkey_version.is_some();
    let name = if is_valkey { "Valkey" } else { "Redis" };
    let key = match valkey_version {
        Some(_) => "valkey_version",
        None => "redis_version",
    };
    let version = field(key).ok_or_else(|| format!("INFO server has no {key}"))?;
    let mut numbers = version.split('.').map(str::parse::<u32>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => Ok(ServerVersion {
            name,
            version: version.to_owned(),
            major_minor: (major, minor),
        }),
        _ => Err(format!("INFO server says {key}:{version:?}")),
    }
}

/// The report line for the server at `url` once it answered PING: ok with
/// its version when it is new enough; otherwise a failure naming what was
/// found (or why the version cannot be told) and the minimum.
fn version_line(url: &dyn std::fmt::Display, version: Result<ServerVersion, String>) -> Line {
    let (major, minor) = MIN_REDIS;
    let needs = format!("subtocall needs Redis {major}.{minor} or newer, or Valkey");
    let (status, text) = match version {
        Ok(v) if v.major_minor >= MIN_REDIS => (
            Status::Ok,
            format!("{} {} at {url} answers PING", v.name, v.version),
        ),
        Ok(v) => (
            Status::Fail,
            format!("{} {} at {url} is too old: {needs}", v.name, v.version),
        ),
        Err(why) => (
            Status::Fail,
            format!("Redis at {url} answers PING but its version cannot be told ({why}): {needs}"),
        ),
    };
    Line { status, text }
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
    fn the_topology_counts_online_replicas_only() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
                    slave0:ip=10.0.0.2,port=6380,state=online,offset=10,lag=0\r\n\
                    slave1:ip=10.0.0.3,port=6381,state=wait_bgsave,offset=0,lag=0\r\n\
                    master_replid:abc\r\n";
        let t = master_topology("m", info).unwrap();
        assert_eq!(t.masters, vec![("m".into(), vec!["10.0.0.2:6380".into()])]);
        assert_eq!(
            t.describe(),
            "topology: master m with replicas 10.0.0.2:6380"
        );
        assert!(master_topology("m", "role:slave\r\n").is_err());
        let nodes = "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                     b 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922\n\
                     c 127.0.0.1:7002@17002 slave a 0 0 1 connected\n\
                     d 127.0.0.1:7003@17003 slave,fail b 0 0 2 disconnected\n\
                     e 127.0.0.1:7004@17004 master,fail - 0 0 3 disconnected\n";
        let t = cluster_topology(nodes);
        assert_eq!(t.masters.len(), 2, "{t:?}");
        assert_eq!(t.fewest_replicas(), 0, "b's replica has failed");
        assert_eq!(
            t.describe(),
            "topology: a cluster of 2 masters: 127.0.0.1:7000 with replicas 127.0.0.1:7002; \
             127.0.0.1:7001 without replicas"
        );
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

    /// The start of `INFO server` from Redis 7.0.15, as on this machine.
    const REDIS_7_0: &str = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n\
                             redis_mode:standalone\r\nos:Linux 6.8.0 x86_64\r\n";
    /// The same from a Valkey 8 (its `redis_version` is the compatible Redis).
    const VALKEY_8: &str = "# Server\r\nredis_version:7.2.4\r\nserver_name:valkey\r\n\
                            valkey_version:8.0.1\r\nredis_git_sha1:00000000\r\n";

    fn line_for(url: &str, info: &str) -> Line {
        let url = crate::config::RedisUrl::parse(url).expect("a valid URL");
        version_line(&url, parse_server_version(info))
    }

    #[test]
    fn redis_7_0_passes_and_its_version_is_reported() {
        let line = line_for("redis://127.0.0.1:6379", REDIS_7_0);
        assert_eq!(line.status, Status::Ok);
        assert_eq!(
            line.text,
            "Redis 7.0.15 at redis://127.0.0.1:6379 answers PING"
        );
    }

    #[test]
    fn redis_6_2_is_refused_naming_the_version_found_and_the_minimum() {
        let info = REDIS_7_0.replace("7.0.15", "6.2.14");
        let line = line_for("redis://127.0.0.1:6379", &info);
        assert_eq!(line.status, Status::Fail);
        assert_eq!(
            line.text,
            "Redis 6.2.14 at redis://127.0.0.1:6379 is too old: \
             subtocall needs Redis 7.0 or newer, or Valkey"
        );
    }

    #[test]
    fn newer_and_unstable_builds_pass() {
        let info = REDIS_7_0.replace("7.0.15", "8.0.0");
        assert_eq!(line_for("redis://h", &info).status, Status::Ok);
        assert_eq!(
            parse_server_version(&REDIS_7_0.replace("7.0.15", "255.255.255"))
                .map(|v| v.major_minor),
            Ok((255, 255)),
            "an unstable build"
        );
    }

    #[test]
    fn valkey_is_named_with_its_own_version_and_passes() {
        let line = line_for("redis://valkey:6379", VALKEY_8);
        assert_eq!(line.status, Status::Ok);
        assert_eq!(
            line.text,
            "Valkey 8.0.1 at redis://valkey:6379 answers PING"
        );
        // Valkey 7.2.4 named itself but had no valkey_version yet.
        let early = VALKEY_8.replace("valkey_version:8.0.1\r\n", "");
        assert_eq!(
            line_for("redis://valkey:6379", &early).text,
            "Valkey 7.2.4 at redis://valkey:6379 answers PING"
        );
    }

    #[test]
    fn a_missing_or_garbled_version_fails_as_cannot_tell() {
        for (info, why) in [
            ("", "(INFO server has no redis_version)"),
            (
                "# Server\r\nos:Linux\r\n",
                "(INFO server has no redis_version)",
            ),
            (
                "redis_version:seven\r\n",
                r#"(INFO server says redis_version:"seven")"#,
            ),
            (
                "redis_version:7\r\n",
                r#"(INFO server says redis_version:"7")"#,
            ),
            (
                "redis_version:\r\n",
                r#"(INFO server says redis_version:"")"#,
            ),
            ("\u{0}\u{ff}:::\n:", "(INFO server has no redis_version)"),
            (
                "server_name:valkey\nvalkey_version:x.y",
                r#"(INFO server says valkey_version:"x.y")"#,
            ),
        ] {
            let line = line_for("redis://127.0.0.1:6379", info);
            assert_eq!(line.status, Status::Fail, "{info:?}");
            assert_eq!(
                line.text,
                format!(
                    "Redis at redis://127.0.0.1:6379 answers PING but its version cannot be told \
                     {why}: subtocall needs Redis 7.0 or newer, or Valkey"
                ),
                "{info:?}"
            );
        }
    }

    #[test]
    fn a_password_in_the_redis_url_is_not_in_the_version_line() {
        for info in [REDIS_7_0, "redis_version:6.0.0", "garbage"] {
            let line = line_for("redis://user:hunter2@redis:6379/0", info);
            assert!(!line.text.contains("hunter2"), "{}", line.text);
            assert!(
                line.text.contains("redis://user:***@redis:6379/0"),
                "{}",
                line.text
            );
        }
    }
}
