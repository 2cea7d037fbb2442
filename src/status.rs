//! What the sidecar is doing right now: `GET /status` (JSON) and
//! `subtocall status` (tables of it). The event loop answers a
//! [`StatusRequest`] with what it holds (router link, mappings with their
//! counts, the local queue); what only Redis knows (the instances of the
//! Redis queue and what each holds, the backlog of the Redis targets) is
//! then read by [`RedisProbe`] on the listener's side, so the loop never
//! waits for Redis.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::metrics::{Metrics, StreamLabel};
use crate::sink::redis::RedisSink;
use crate::streams::carrier::holder_consumer;
use crate::streams::{Keys, Shared};

/// How long `/status` waits for the event loop, and for each Redis read.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// What the listener sends the event loop: where to put the answer.
pub type StatusRequest = oneshot::Sender<(Status, Option<RedisProbe>)>;

/// The whole answer of `GET /status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub version: String,
    /// What `/readyz` says.
    pub ready: bool,
    pub draining: bool,
    pub uptime_seconds: f64,
    pub router: Router,
    /// `wamp` (a CALL per event or batch), `redis-list` or `redis-stream`.
    pub delivery: String,
    pub queue: Queue,
    pub mappings: Vec<Mapping>,
    /// Redis mode: the list or stream of each procedure, with its backlog.
    #[serde(default)]
    pub redis_targets: Vec<RedisTarget>,
    /// Every variable with the value in effect (`set` false: the default);
    /// secrets are `***`, URLs without passwords or query values.
    pub configuration: Vec<Setting>,
    /// `SUBTOCALL_POLICY_FILE`, when set: what is loaded, and the last
    /// reload refused.
    #[serde(default)]
    pub policy_file: Option<PolicyFile>,
}

/// The policy file in effect. Its content hash is the same on instances
/// that read the same file: compare them across instances.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PolicyFile {
    pub path: String,
    pub rules: u64,
    /// FNV-1a 64 of the content loaded, hex.
    pub content_hash: String,
    /// RFC 3339, UTC.
    pub loaded_at: String,
    /// Why the last reload (SIGHUP) was refused, when it was; the rules
    /// loaded before stay in effect. Cleared by a reload that applies.
    pub last_reload_error: Option<String>,
    pub last_reload_error_at: Option<String>,
}

/// A mapping's delivery settings: the rule that gives them (`None`: the
/// variables), every setting in effect, and the names of those a rule
/// changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MappingPolicy {
    /// The rule's pattern, `None` for the defaults.
    pub rule: Option<String>,
    /// Its line in the file.
    pub line: Option<u64>,
    pub settings: BTreeMap<String, String>,
    /// The settings that differ from the variables'.
    pub overrides: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Router {
    /// Query values hidden.
    pub url: String,
    pub realm: String,
    pub connected: bool,
    pub session: Option<u64>,
    /// RFC 3339, UTC.
    pub joined_at: Option<String>,
    pub joined_seconds: Option<f64>,
    pub serializer: Option<String>,
    /// Sessions after the first.
    pub reconnects: u64,
    /// Failed attempts since the last healthy session.
    pub connect_failures: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Queue {
    /// `memory` or `redis`.
    pub kind: String,
    /// Events waiting here for an attempt, and being delivered.
    pub waiting: u64,
    pub in_flight: u64,
    pub capacity: u64,
    pub max_in_flight: u64,
    /// The Redis queue's name (its consumer group) and this instance's
    /// consumer name in it.
    pub name: Option<String>,
    pub consumer: Option<String>,
    pub redis_up: Option<bool>,
    /// The Redis queue's instances, this one included.
    #[serde(default)]
    pub instances: Vec<Instance>,
    /// The Redis queue's streams.
    #[serde(default)]
    pub streams: Vec<QueueStream>,
    /// Why the Redis part is missing, if it is.
    pub error: Option<String>,
    /// Replica acknowledgement (`SUBTOCALL_REDIS_WAIT_REPLICAS` > 0).
    #[serde(default)]
    pub replicas: Option<Replicas>,
}

/// Replica acknowledgement of the Redis queue's writes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Replicas {
    /// Replicas each write is asked to reach.
    pub wanted: u64,
    /// How many acknowledged the last WAIT (the fewest over a cluster's
    /// masters); `None` before the first answer.
    pub acknowledging: Option<u64>,
    /// Admitted events this instance keeps a copy of until confirmed.
    pub unconfirmed: u64,
    /// Copies let go unconfirmed, since start.
    pub unprotected_total: u64,
    /// Copies offered again after a failover or a failed write, since start.
    pub reoffered_total: u64,
}

/// One instance of the Redis queue.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Instance {
    pub consumer: String,
    /// This process.
    pub this: bool,
    /// Seconds since its last heartbeat (every third of
    /// `SUBTOCALL_CLAIM_IDLE`, at most every second); `None` for a consumer
    /// of the group that no longer beats (gone for longer than the claim
    /// idle time).
    pub heartbeat_seconds: Option<f64>,
    /// Entries it read and has not finished, over every stream.
    pub pending: u64,
    /// Seconds since it last read or was credited an entry, the least over
    /// the streams.
    pub idle_seconds: Option<f64>,
    /// The ordering partitions whose lease it holds (`procedure#k`).
    #[serde(default)]
    pub partitions: Vec<String>,
}

/// One stream of the Redis queue.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct QueueStream {
    /// The procedure, or its partition `procedure#k`.
    pub unit: String,
    pub length: u64,
    /// Read by an instance, not finished yet.
    pub pending: u64,
    /// Seconds since its oldest entry was added (by Redis's clock); `None`
    /// when it is empty.
    #[serde(default)]
    pub oldest_seconds: Option<f64>,
}

/// One consumer group of one topic.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Mapping {
    pub topic: String,
    /// `exact`, `prefix` or `wildcard`.
    #[serde(rename = "match")]
    pub match_policy: String,
    /// `default` for the group without a suffix.
    pub group: String,
    pub procedure: Option<String>,
    pub batch: bool,
    pub registrations: Vec<u64>,
    /// Callees over the registrations; `None` when the router would not say.
    pub callees: Option<u64>,
    pub subscription: Option<u64>,
    /// `subscribed`, `subscribing`, `unsubscribing`, `refused` or `none`.
    pub subscription_state: String,
    /// The last registration left; the subscription stays for the grace period.
    pub in_grace: bool,
    /// No callee (within the grace period): its events wait, no call is
    /// made. Their backlog is `waiting` here, or with the Redis queue its
    /// streams' length (under `queue.streams`).
    #[serde(default)]
    pub waiting_for_callee: bool,
    /// Seconds since this instance saw its last callee leave.
    #[serde(default)]
    pub away_seconds: Option<f64>,
    pub received: u64,
    pub forwarded: u64,
    /// By reason.
    pub dead_lettered: BTreeMap<String, u64>,
    pub in_flight: u64,
    pub waiting: u64,
    pub oldest_waiting_seconds: f64,
    pub last_error: Option<String>,
    /// RFC 3339, UTC.
    pub last_error_at: Option<String>,
    pub last_error_seconds: Option<f64>,
    /// Its delivery settings in effect.
    #[serde(default)]
    pub policy: MappingPolicy,
}

/// One Redis list or stream events are pushed to (Redis mode).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RedisTarget {
    pub key: String,
    /// `list` or `stream`.
    pub kind: String,
    /// Entries in it now.
    pub length: Option<u64>,
    /// Lists: the length. Streams: from the oldest entry some group has not
    /// acknowledged (`subtocall_stream_backlog`).
    pub backlog: Option<u64>,
    pub oldest_unacked_seconds: Option<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Setting {
    pub name: String,
    pub value: String,
    pub set: bool,
}

/// Seconds as shown in the JSON: milliseconds are enough.
pub fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// `at` as RFC 3339 in UTC, to the millisecond.
pub fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

// ------------------------------------------------------------- from Redis

/// Reads what only Redis knows; cheap to clone.
#[derive(Clone)]
pub struct RedisProbe {
    pub queue: Option<QueueProbe>,
    pub targets: Option<TargetProbe>,
}

/// The Redis queue.
#[derive(Clone)]
pub struct QueueProbe {
    pub shared: Shared,
    pub keys: Arc<Keys>,
    pub consumer: String,
    /// Per-key ordering's partitions per procedure.
    pub partitions: Option<u16>,
}

/// The Redis lists or streams of Redis mode.
#[derive(Clone)]
pub struct TargetProbe {
    /// The sink that pushes there: its connection and key names.
    pub redis: RedisSink,
    pub stream: bool,
    pub metrics: Arc<Metrics>,
}

impl RedisProbe {
    /// Adds the Redis queue's instances and streams and the targets'
    /// backlogs to `status`; what cannot be read is said in an `error`.
    pub async fn fill(&self, status: &mut Status) {
        if let Some(q) = &self.queue {
            match tokio::time::timeout(ANSWER_WITHIN, q.read()).await {
                Ok(Ok((instances, streams))) => {
                    status.queue.instances = instances;
                    status.queue.streams = streams;
                }
                Ok(Err(e)) => status.queue.error = Some(format!("cannot read Redis: {e}")),
                Err(_) => status.queue.error = Some("Redis did not answer in time".into()),
            }
        }
        if let Some(t) = &self.targets {
            let mut procedures: Vec<&str> = status
                .mappings
                .iter()
                .filter(|m| m.match_policy == "exact")
                .filter_map(|m| m.procedure.as_deref())
                .collect();
            procedures.sort_unstable();
            procedures.dedup();
            let mut targets = Vec::new();
            for procedure in procedures {
                targets.push(t.read(procedure).await);
            }
            status.redis_targets = targets;
        }
    }
}

impl TargetProbe {
    async fn read(&self, procedure: &str) -> RedisTarget {
        let key = self.redis.key(procedure);
        let command = if self.stream { "XLEN" } else { "LLEN" };
        let length = tokio::time::timeout(ANSWER_WITHIN, async {
            let mut conn = self.redis.connection().await?;
            redis::cmd(command)
                .arg(&key)
                .query_async::<u64>(&mut conn)
                .await
        })
        .await;
        let (length, error) = match length {
            Ok(Ok(n)) => (Some(n), None),
            Ok(Err(e)) => (None, Some(e.to_string())),
            Err(_) => (None, Some("Redis did not answer in time".to_owned())),
        };
        let (backlog, oldest) = if self.stream {
            let label = StreamLabel {
                stream: key.clone(),
            };
            let m = &self.metrics;
            (
                Some(m.stream_backlog.get_or_create(&label).get().max(0) as u64),
                Some(m.stream_oldest_unacked.get_or_create(&label).get()),
            )
        } else {
            (length, None)
        };
        RedisTarget {
            key,
            kind: if self.stream { "stream" } else { "list" }.to_owned(),
            length,
            backlog,
            oldest_unacked_seconds: oldest,
            error,
        }
    }
}

/// The milliseconds part of the id of the first entry of an `XRANGE`
/// reply, if there is one.
fn first_entry_ms(reply: &redis::Value) -> Option<u64> {
    let redis::Value::Array(entries) = reply else {
        return None;
    };
    let redis::Value::Array(entry) = entries.first()? else {
        return None;
    };
    let id = match entry.first()? {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        _ => return None,
    };
    crate::streams::entry_id_numbers(&id).map(|(ms, _)| ms)
}

/// The rows of an `XINFO` reply, each as a map of its fields.
fn rows(reply: redis::Value) -> Vec<BTreeMap<String, redis::Value>> {
    use redis::Value;
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let Value::Array(rows) = reply else {
        return Vec::new();
    };
    rows.into_iter()
        .filter_map(|row| match row {
            Value::Array(fields) => Some(
                fields
                    .chunks(2)
                    .filter_map(|kv| Some((text(&kv[0])?, kv.get(1)?.clone())))
                    .collect(),
            ),
            Value::Map(fields) => Some(
                fields
                    .into_iter()
                    .filter_map(|(k, v)| Some((text(&k)?, v)))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

impl QueueProbe {
    async fn read(&self) -> redis::RedisResult<(Vec<Instance>, Vec<QueueStream>)> {
        let mut c = self.shared.get().await?;
        let mut units: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.procedures())
            .query_async(&mut c)
            .await?;
        // With ordering, each procedure's partitions have streams too.
        if let Some(partitions) = self.partitions {
            let procedures = units.clone();
            for procedure in &procedures {
                units.extend((0..partitions).map(|k| crate::streams::lane(procedure, k)));
            }
        }
        units.sort();
        units.dedup();
        let mut instances: BTreeMap<String, Instance> = BTreeMap::new();
        // Heartbeats, scored by Redis's clock in milliseconds.
        let time: (String, String) = redis::cmd("TIME").query_async(&mut c).await?;
        let now = time.0.parse::<f64>().unwrap_or(0.0) * 1000.0
            + time.1.parse::<f64>().unwrap_or(0.0) / 1000.0;
        let beats: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(self.keys.instances())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await?;
        // By incarnation (`carrier::holder_name`): an instance restarted
        // under the same name is shown once, with its latest heartbeat.
        for (holder, at) in beats {
            let beat = seconds(Duration::from_millis((now - at).max(0.0) as u64));
            let i = instances
                .entry(holder_consumer(&holder).to_owned())
                .or_default();
            i.heartbeat_seconds = Some(i.heartbeat_seconds.map_or(beat, |s: f64| s.min(beat)));
        }
        // Every stream's reads at once: on the one multiplexed connection
        // they share round trips, so many streams cost about one.
        let group = self.keys.group();
        let per_unit = units.iter().map(|unit| {
            let mut c = c.clone();
            let stream = self.keys.stream(unit);
            async move {
                let length: u64 = redis::cmd("XLEN").arg(&stream).query_async(&mut c).await?;
                let first: redis::Value = redis::cmd("XRANGE")
                    .arg(&stream)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut c)
                    .await?;
                let oldest = first_entry_ms(&first);
                let consumers: redis::RedisResult<redis::Value> = redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(&stream)
                    .arg(group)
                    .query_async(&mut c)
                    .await;
                // No stream or group yet: nothing read from it.
                redis::RedisResult::Ok((length, oldest, consumers.map(rows).unwrap_or_default()))
            }
        });
        let read = futures_util::future::try_join_all(per_unit).await?;
        let mut streams = Vec::new();
        for (unit, (length, oldest, consumers)) in units.iter().zip(read) {
            let mut pending_here = 0;
            for consumer in consumers {
                let text = |k: &str| match consumer.get(k) {
                    Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    Some(redis::Value::SimpleString(s)) => s.clone(),
                    _ => String::new(),
                };
                let number = |k: &str| match consumer.get(k) {
                    Some(redis::Value::Int(n)) => *n,
                    _ => 0,
                };
                let pending = number("pending").max(0) as u64;
                let idle = seconds(Duration::from_millis(number("idle").max(0) as u64));
                pending_here += pending;
                let i = instances.entry(text("name")).or_default();
                i.pending += pending;
                i.idle_seconds = Some(i.idle_seconds.map_or(idle, |s: f64| s.min(idle)));
            }
            streams.push(QueueStream {
                unit: unit.clone(),
                length,
                pending: pending_here,
                oldest_seconds: oldest
                    .map(|ms| seconds(Duration::from_millis((now - ms as f64).max(0.0) as u64))),
            });
        }
        if let Some(partitions) = self.partitions {
            let mut procedures: Vec<&str> = units
                .iter()
                .map(|u| crate::streams::split_lane(u).0)
                .collect();
            procedures.sort_unstable();
            procedures.dedup();
            let per_procedure = procedures.iter().map(|procedure| {
                let mut c = c.clone();
                let leases: Vec<String> = (0..partitions)
                    .map(|k| self.keys.lease(procedure, k))
                    .collect();
                async move {
                    redis::cmd("MGET")
                        .arg(&leases)
                        .query_async::<Vec<Option<String>>>(&mut c)
                        .await
                }
            });
            let held = futures_util::future::try_join_all(per_procedure).await?;
            for (procedure, holders) in procedures.iter().zip(held) {
                for (k, holder) in holders.into_iter().enumerate() {
                    if let Some(holder) = holder {
                        instances
                            .entry(holder_consumer(&holder).to_owned())
                            .or_default()
                            .partitions
                            .push(crate::streams::lane(procedure, k as u16));
                    }
                }
            }
        }
        let instances = instances
            .into_iter()
            .map(|(consumer, i)| Instance {
                this: consumer == self.consumer,
                consumer,
                ..i
            })
            .collect();
        Ok((instances, streams))
    }
}

// ------------------------------------------------------------------ tables

/// `subtocall status`: the answer as tables a person reads at a glance.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let state = if s.draining {
        "DRAINING"
    } else if s.ready {
        "READY"
    } else {
        "NOT READY"
    };
    let r = &s.router;
    let link = match (r.connected, r.session, r.joined_seconds) {
        (true, Some(session), Some(since)) => {
            format!("session {session}, joined {} ago", age(since))
        }
        _ => "not connected".to_owned(),
    };
    let _ = writeln!(
        out,
        "subtocall {}  {state}  up {}\nrouter     {} realm {}: {link}; {} reconnects{}",
        s.version,
        age(s.uptime_seconds),
        r.url,
        r.realm,
        r.reconnects,
        if r.connect_failures > 0 {
            format!(", {} failed attempts", r.connect_failures)
        } else {
            String::new()
        }
    );
    let q = &s.queue;
    let mut queue = format!(
        "queue      {} (delivery {}): {} waiting of {}, {} in flight of {}",
        q.kind, s.delivery, q.waiting, q.capacity, q.in_flight, q.max_in_flight
    );
    if let Some(name) = &q.name {
        let _ = write!(
            queue,
            "; Redis queue {name:?}, {}",
            match q.redis_up {
                Some(false) => "Redis NOT answering",
                _ => "Redis up",
            }
        );
    }
    let _ = writeln!(out, "{queue}");
    if let Some(r) = &q.replicas {
        let acknowledging = r.acknowledging.map_or_else(
            || "not asked yet".to_owned(),
            |n| format!("{n} acknowledging"),
        );
        let short = match r.acknowledging {
            Some(n) if n < r.wanted => " (FEWER THAN WANTED)",
            _ => "",
        };
        let _ = writeln!(
            out,
            "replicas   {} wanted, {acknowledging}{short}; {} unconfirmed events held, \
             {} let go unprotected, {} offered again",
            r.wanted, r.unconfirmed, r.unprotected_total, r.reoffered_total
        );
    }

    out.push_str("\nMAPPINGS\n");
    let mut rows = vec![row(&[
        "TOPIC",
        "MATCH",
        "GROUP",
        "PROCEDURE",
        "CALLEES",
        "RECEIVED",
        "FORWARDED",
        "DEAD",
        "IN FLIGHT",
        "WAITING",
        "OLDEST",
        "LAST ERROR",
    ])];
    for m in &s.mappings {
        let dead: u64 = m.dead_lettered.values().sum();
        let last_error = match (&m.last_error, m.last_error_seconds) {
            (Some(e), Some(ago)) => format!("{} ago: {}", age(ago), shorten(e, 60)),
            (Some(e), None) => shorten(e, 60),
            _ => "-".to_owned(),
        };
        let mut group = m.group.clone();
        if m.batch {
            group.push_str(" (batch)");
        }
        let mut procedure = m.procedure.clone().unwrap_or_else(|| "-".into());
        if m.waiting_for_callee {
            match m.away_seconds {
                Some(s) => procedure.push_str(&format!(" (no callee {}: waiting)", age(s))),
                None => procedure.push_str(" (no callee: waiting)"),
            }
        } else if m.in_grace {
            procedure.push_str(" (gone, grace)");
        }
        rows.push(vec![
            m.topic.clone(),
            m.match_policy.clone(),
            group,
            procedure,
            m.callees.map_or("?".into(), |n| n.to_string()),
            m.received.to_string(),
            m.forwarded.to_string(),
            dead.to_string(),
            m.in_flight.to_string(),
            m.waiting.to_string(),
            if m.waiting > 0 {
                age(m.oldest_waiting_seconds)
            } else {
                "-".into()
            },
            last_error,
        ]);
    }
    if s.mappings.is_empty() {
        out.push_str("(none: no SUB_ registration is known)\n");
    } else {
        table(&mut out, &rows);
    }
    let dead: Vec<String> = s
        .mappings
        .iter()
        .filter(|m| !m.dead_lettered.is_empty())
        .map(|m| {
            let by: Vec<String> = m
                .dead_lettered
                .iter()
                .map(|(reason, n)| format!("{reason} {n}"))
                .collect();
            format!(
                "  {}: {}",
                m.procedure.as_deref().unwrap_or(&m.topic),
                by.join(", ")
            )
        })
        .collect();
    if !dead.is_empty() {
        out.push_str("dead-lettered by reason:\n");
        out.push_str(&dead.join("\n"));
        out.push('\n');
    }
    if let Some(file) = &s.policy_file {
        let _ = writeln!(
            out,
            "\npolicy file {}: {} rules, content {}, loaded {}",
            file.path, file.rules, file.content_hash, file.loaded_at
        );
        if let Some(e) = &file.last_reload_error {
            let _ = writeln!(
                out,
                "  LAST RELOAD REFUSED ({}), the rules above stay: {}",
                file.last_reload_error_at.as_deref().unwrap_or("?"),
                e.replace('\n', "; ")
            );
        }
        for m in &s.mappings {
            let name = m.procedure.as_deref().unwrap_or(&m.topic);
            let rule = match (&m.policy.rule, m.policy.line) {
                (Some(p), Some(line)) => format!("rule {p:?} (line {line})"),
                (Some(p), None) => format!("rule {p:?}"),
                _ => "defaults".to_owned(),
            };
            let changed: Vec<String> = m
                .policy
                .overrides
                .iter()
                .map(|k| {
                    format!(
                        "{k}={}",
                        m.policy.settings.get(k).map_or("?", String::as_str)
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "  {name}: {rule}{}{}",
                if changed.is_empty() { "" } else { ": " },
                changed.join(", ")
            );
        }
    }

    if q.name.is_some() {
        out.push_str("\nINSTANCES\n");
        if let Some(e) = &q.error {
            let _ = writeln!(out, "({e})");
        }
        let mut rows = vec![row(&[
            "CONSUMER",
            "HEARTBEAT",
            "PENDING",
            "IDLE",
            "PARTITIONS",
        ])];
        for i in &q.instances {
            let mut name = i.consumer.clone();
            if i.this {
                name.push_str(" (this)");
            }
            rows.push(vec![
                name,
                i.heartbeat_seconds
                    .map_or("-".into(), |s| format!("{} ago", age(s))),
                i.pending.to_string(),
                i.idle_seconds.map_or("-".into(), age),
                if i.partitions.is_empty() {
                    "-".into()
                } else {
                    format!("{}: {}", i.partitions.len(), i.partitions.join(" "))
                },
            ]);
        }
        table(&mut out, &rows);
        if !q.streams.is_empty() {
            out.push_str("\nSTREAMS\n");
            let mut rows = vec![row(&["STREAM", "LENGTH", "PENDING", "OLDEST"])];
            for st in &q.streams {
                rows.push(vec![
                    st.unit.clone(),
                    st.length.to_string(),
                    st.pending.to_string(),
                    st.oldest_seconds.map_or("-".into(), age),
                ]);
            }
            table(&mut out, &rows);
        }
    }
    if !s.redis_targets.is_empty() {
        out.push_str("\nREDIS TARGETS\n");
        let mut rows = vec![row(&["KEY", "KIND", "LENGTH", "BACKLOG", "OLDEST UNACKED"])];
        for t in &s.redis_targets {
            let unknown = || t.error.clone().unwrap_or_else(|| "?".into());
            rows.push(vec![
                t.key.clone(),
                t.kind.clone(),
                t.length.map_or_else(unknown, |n| n.to_string()),
                t.backlog.map_or("?".into(), |n| n.to_string()),
                t.oldest_unacked_seconds.map_or("-".into(), age),
            ]);
        }
        table(&mut out, &rows);
    }
    out
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// Left-aligned columns, two spaces apart, like `kubectl get`.
fn table(out: &mut String, rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let pad = widths[c] - cell.chars().count() + 2;
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// A duration in seconds as `850ms`, `12s`, `3m20s`, `2h5m`, `3d4h`.
fn age(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 1.0 {
        return format!("{}ms", (s * 1000.0).round() as u64);
    }
    let s = s.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// At most `max` characters, on one line.
fn shorten(text: &str, max: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let cut: String = one_line.chars().take(max - 1).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Status {
        Status {
            version: "1.2.3".into(),
            ready: true,
            uptime_seconds: 75.0,
            router: Router {
                url: "ws://127.0.0.1:8080/ws".into(),
                realm: "realm1".into(),
                connected: true,
                session: Some(42),
                joined_seconds: Some(70.0),
                reconnects: 1,
                ..Router::default()
            },
            delivery: "wamp".into(),
            queue: Queue {
                kind: "memory".into(),
                capacity: 10000,
                max_in_flight: 100,
                ..Queue::default()
            },
            mappings: vec![
                Mapping {
                    topic: "com.example.good".into(),
                    match_policy: "exact".into(),
                    group: "default".into(),
                    procedure: Some("com.example.SUB_good".into()),
                    callees: Some(2),
                    received: 20,
                    forwarded: 20,
                    ..Mapping::default()
                },
                Mapping {
                    topic: "com.example.bad".into(),
                    match_policy: "exact".into(),
                    group: "audit".into(),
                    procedure: Some("com.example.SUB_bad__audit".into()),
                    callees: None,
                    received: 10,
                    dead_lettered: [("rejected".to_owned(), 10)].into(),
                    last_error: Some("wamp.error.invalid_argument: no\nthanks".into()),
                    last_error_seconds: Some(3.2),
                    ..Mapping::default()
                },
            ],
            ..Status::default()
        }
    }

    #[test]
    fn the_tables_show_each_mapping_on_a_line_of_aligned_columns() {
        let text = render(&example());
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("subtocall 1.2.3  READY  up 1m15s"),
            "{text}"
        );
        assert!(
            lines[1].contains("session 42, joined 1m10s ago; 1 reconnects"),
            "{text}"
        );
        let header = lines.iter().position(|l| l.starts_with("TOPIC")).unwrap();
        let good = lines[header + 1];
        let bad = lines[header + 2];
        assert!(good.starts_with("com.example.good "), "{text}");
        assert!(bad.contains("com.example.SUB_bad__audit"), "{text}");
        assert!(
            bad.ends_with("3s ago: wamp.error.invalid_argument: no thanks"),
            "{text}"
        );
        // Columns line up: PROCEDURE starts at the same place on every row.
        let at = lines[header].find("PROCEDURE").unwrap();
        assert_eq!(good.find("com.example.SUB_good"), Some(at), "{text}");
        assert_eq!(bad.find("com.example.SUB_bad__audit"), Some(at), "{text}");
        // An unknown callee count is `?`, dead letters are listed by reason.
        assert!(bad.contains(" ? "), "{text}");
        assert!(
            text.contains("com.example.SUB_bad__audit: rejected 10"),
            "{text}"
        );
        assert!(!text.contains("INSTANCES"), "memory queue: {text}");
    }

    #[test]
    fn replica_acknowledgement_is_a_line_of_its_own_and_says_when_replicas_are_short() {
        let mut status = example();
        assert!(!render(&status).contains("replicas "), "off: no line");
        status.queue.replicas = Some(Replicas {
            wanted: 1,
            acknowledging: Some(0),
            unconfirmed: 120,
            unprotected_total: 7,
            reoffered_total: 3,
        });
        let text = render(&status);
        assert!(
            text.contains(
                "replicas   1 wanted, 0 acknowledging (FEWER THAN WANTED); 120 unconfirmed \
                 events held, 7 let go unprotected, 3 offered again"
            ),
            "{text}"
        );
        status.queue.replicas = Some(Replicas {
            wanted: 1,
            acknowledging: None,
            ..Replicas::default()
        });
        assert!(render(&status).contains("1 wanted, not asked yet;"));
    }

    #[test]
    fn the_policy_file_its_hash_a_refused_reload_and_each_mappings_rule_are_printed() {
        let mut status = example();
        assert!(!render(&status).contains("policy file"), "no file: no line");
        status.policy_file = Some(PolicyFile {
            path: "/etc/subtocall/policies.toml".into(),
            rules: 2,
            content_hash: "0123456789abcdef".into(),
            loaded_at: "2026-12-06T09:00:00Z".into(),
            last_reload_error: Some(
                "policies.toml:3: unknown key `x`\npolicies.toml:9: bad".into(),
            ),
            last_reload_error_at: Some("2026-12-06T09:05:00Z".into()),
        });
        let m = &mut status.mappings[0];
        m.policy.rule = Some("com.example.SUB_*".into());
        m.policy.line = Some(2);
        m.policy.settings.insert("call_timeout".into(), "1s".into());
        m.policy.overrides = vec!["call_timeout".into()];
        let text = render(&status);
        for line in [
            "policy file /etc/subtocall/policies.toml: 2 rules, content 0123456789abcdef, loaded 2026-12-06T09:00:00Z",
            "  LAST RELOAD REFUSED (2026-12-06T09:05:00Z), the rules above stay: policies.toml:3: unknown key `x`; policies.toml:9: bad",
            "rule \"com.example.SUB_*\" (line 2): call_timeout=1s",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
        let json = serde_json::to_string(&status).unwrap();
        let back: Status = serde_json::from_str(&json).unwrap();
        assert_eq!(back, status);
    }

    #[test]
    fn a_group_waiting_for_a_callee_says_so_with_its_backlog_and_the_streams_their_oldest() {
        let mut status = example();
        let m = &mut status.mappings[0];
        m.waiting_for_callee = true;
        m.away_seconds = Some(125.0);
        m.waiting = 40;
        m.oldest_waiting_seconds = 130.0;
        status.queue.kind = "redis".into();
        status.queue.name = Some("subtocall".into());
        status.queue.streams = vec![QueueStream {
            unit: "com.example.SUB_good".into(),
            length: 40,
            pending: 0,
            oldest_seconds: Some(130.0),
        }];
        let text = render(&status);
        let row = text
            .lines()
            .find(|l| l.starts_with("com.example.good "))
            .unwrap();
        assert!(
            row.contains("com.example.SUB_good (no callee 2m5s: waiting)"),
            "{text}"
        );
        assert!(row.contains(" 40 ") && row.contains("2m10s"), "{text}");
        let stream = text
            .lines()
            .find(|l| l.starts_with("com.example.SUB_good "))
            .unwrap();
        assert!(stream.ends_with("2m10s"), "{text}");
    }

    #[test]
    fn the_json_round_trips() {
        let status = example();
        let json = serde_json::to_string(&status).unwrap();
        assert!(json.contains(r#""match":"exact""#), "{json}");
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), status);
    }

    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(age(0.25), "250ms");
        assert_eq!(age(59.4), "59s");
        assert_eq!(age(200.0), "3m20s");
        assert_eq!(age(7500.0), "2h5m");
        assert_eq!(age(3.0 * 86400.0 + 7200.0), "3d2h");
        assert_eq!(shorten("abcdef", 4), "abc…");
    }
}
