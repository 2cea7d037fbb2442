//! subtocall's configuration, read once at startup from environment
//! variables only. `vars` is the table of variables (names, defaults, help);
//! `parse` turns one value into a typed one; this file reads each variable
//! into its place in [`Config`], collecting every problem before failing.
//!
//! To follow one variable: find its constant in `vars.rs` (e.g.
//! `CALL_TIMEOUT`), then its use below (`r.required(&CALL_TIMEOUT, …)`).

mod error;
mod parse;
pub mod policy_keys;
mod redacted;
mod vars;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

pub use error::{ConfigError, Problem};
pub use redacted::{RedisUrl, Secret, WampUrl};
#[cfg(test)]
pub(crate) use vars::POLICY_EXAMPLE;
pub use vars::{help_text, markdown_reference};

use parse::{Invalid, Parsed};
use vars::*;

/// Everything subtocall is configured with, grouped by the part that uses it.
/// `Debug` never shows a secret.
#[derive(Debug, Clone)]
pub struct Config {
    pub wamp: WampConfig,
    pub discovery: DiscoveryConfig,
    pub forward: ForwardConfig,
    pub redis: RedisConfig,
    pub queue: QueueConfig,
    pub reconnect: ReconnectConfig,
    /// On SIGTERM/SIGINT: deadline to finish or dead-letter in-flight work.
    pub shutdown_timeout: Duration,
    /// Listen address of /metrics, /healthz, /readyz and /status; `None` = no listener.
    pub http: Option<SocketAddr>,
    /// Procedures with metrics of their own (`SUBTOCALL_METRICS_MAX_PROCEDURES`).
    pub metrics_max_procedures: usize,
    pub log: LogConfig,
    /// The rules of `SUBTOCALL_POLICY_FILE` (none when unset), over the
    /// settings above.
    pub policies: std::sync::Arc<crate::policy::Policies>,
    /// Not errors, but worth a log line once logging is up.
    warnings: Vec<String>,
    /// Every variable's value in effect, secrets hidden (for `/status`).
    settings: Vec<crate::status::Setting>,
}

/// How to reach and talk to the router.
#[derive(Debug, Clone)]
pub struct WampConfig {
    /// `ws://` or `wss://`, with a host and without user name or password;
    /// `Display` hides its query values.
    pub url: WampUrl,
    pub realm: String,
    pub auth: Auth,
    /// Offered first in the WebSocket subprotocol list; both are offered.
    pub serializer: Serializer,
    /// TCP + TLS + WebSocket handshake + WAMP join.
    pub connect_timeout: Duration,
    pub ping_interval: Duration,
    /// Dead connection when no frame arrives this long after a ping.
    pub ping_timeout: Duration,
    /// Largest WAMP message accepted, in bytes.
    pub max_message_size: usize,
    /// Largest message sent to the router (a forwarded CALL).
    pub max_call_size: usize,
    /// Extra PEM CA certificates for `wss://`; the file was readable at startup.
    pub ca_file: Option<PathBuf>,
}

/// How subtocall authenticates to the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    Anonymous,
    WampCra { authid: String, secret: Secret },
    Ticket { authid: String, ticket: Secret },
}

/// The WAMP serializer subtocall prefers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serializer {
    MsgPack,
    Json,
}

/// Which registrations are shared-subscription registrations.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// Prefix of the last URI component, `SUB_` by default; never contains `.`.
    pub marker: String,
    /// Before a consumer group's name at the end of the last URI component,
    /// `__` by default; never contains `.`.
    pub group_separator: String,
    /// Prefix of the last URI component of a batch registration,
    /// `SUBBATCH_` by default; never contains `.`, never a prefix of
    /// `marker`.
    pub batch_marker: String,
    /// A registration URI must match this to be served, when set.
    pub filter: Option<Regex>,
    /// How long a topic stays subscribed after its last callee left; may be 0.
    pub grace_period: Duration,
}

impl DiscoveryConfig {
    /// The marker with its group separator, as discovery and `check` use it.
    pub fn marker(&self) -> Result<crate::discovery::Marker, crate::discovery::MarkerError> {
        crate::discovery::Marker::new(self.marker.clone())
            .and_then(|m| m.with_separator(self.group_separator.clone()))
            .and_then(|m| m.with_batch_marker(self.batch_marker.clone()))
    }
}

/// Where events go and how hard subtocall tries.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    pub mode: Mode,
    /// Deadline of one forwarding attempt.
    pub call_timeout: Duration,
    /// Name of the kwarg that carries the event details, when set.
    pub details_kwarg: Option<String>,
    /// Forwarding calls in progress at once, 1..=65536.
    pub max_in_flight: usize,
    /// Events waiting for a free in-flight slot, 1..=10_000_000.
    pub queue_capacity: usize,
    /// Which event to drop (and dead-letter) when the queue is full.
    pub overflow: Overflow,
    pub retry: RetryPolicy,
    /// Per-key ordering (`SUBTOCALL_ORDER_BY`).
    pub order_by: OrderBy,
    /// How batch procedures' events are grouped into calls.
    pub batching: crate::forward::Batching,
}

/// What makes events of one procedure one ordered line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderBy {
    /// No order: events go in parallel up to the in-flight limit.
    None,
    /// The event's concrete topic.
    Topic,
    /// The value of this keyword argument.
    Kwarg(String),
    /// The value of the positional argument at this index.
    Arg(usize),
}

/// Where each event is forwarded (`USE_REDIS_MQ`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One CALL to the `SUB_` procedure per event.
    Wamp,
    /// One RPUSH of a JSON envelope onto the procedure's Redis list.
    Redis,
}

/// What happens to an event that arrives while the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    DropNewest,
    DropOldest,
}

/// The retry budget of one event: whichever limit is reached first ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts including the first; 1 = no retry.
    pub max_attempts: u32,
    /// An event older than this is not retried any more.
    pub max_age: Duration,
    /// First retry delay; capped exponential growth with full jitter.
    pub initial_backoff: Duration,
    /// Never less than `initial_backoff`.
    pub max_backoff: Duration,
}

/// The Redis server and its keys.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// Used in Redis mode and for dead letters; `Display` hides the password.
    pub url: RedisUrl,
    /// Key prefix of the per-procedure lists; may be empty.
    pub prefix: String,
    /// Redis list that dead letters are also pushed to, when set.
    pub dead_letter_key: Option<String>,
    /// `url` is a seed node of a Redis Cluster.
    pub cluster: bool,
    /// The master is found through these sentinels (`url` gives only the
    /// user, password and database).
    pub sentinel: Option<SentinelConfig>,
    /// Replica acknowledgement (`SUBTOCALL_REDIS_WAIT_*`).
    pub wait: WaitConfig,
    /// Lists or streams (`SUBTOCALL_REDIS_TARGET`).
    pub target: RedisTarget,
    /// The consumer group created on each stream.
    pub consumer_group: String,
    /// Unacknowledged entries a stream may hold.
    pub max_backlog: u64,
}

/// Replica acknowledgement: how many replicas a write must reach before
/// this instance lets go of its copy (0: none asked), how long one WAIT
/// waits, and how many copies are kept at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitConfig {
    pub replicas: u32,
    pub timeout: Duration,
    pub copies: usize,
}

impl WaitConfig {
    /// Nothing asked of the replicas (the default).
    pub const OFF: WaitConfig = WaitConfig {
        replicas: 0,
        timeout: Duration::from_millis(100),
        copies: 10_000,
    };
}

/// Redis Sentinel: who to ask for the master, and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelConfig {
    /// Host and port of each sentinel.
    pub sentinels: Vec<(String, u16)>,
    pub master: String,
    /// The sentinels' own password.
    pub password: Option<Secret>,
}

/// What Redis mode pushes onto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisTarget {
    List,
    Stream,
}

/// Where accepted events wait (`SUBTOCALL_QUEUE` and its settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    pub kind: QueueKind,
    /// Key namespace and consumer-group name.
    pub name: String,
    /// A pending entry idle this long is taken over by another instance.
    pub claim_idle: Duration,
    /// How long an admitted publication id is remembered.
    pub dedup_window: Duration,
    /// Partitions per procedure for ordered events.
    pub partitions: u16,
    /// This instance's consumer name, when stable (else a new one per start).
    pub instance_id: Option<String>,
    /// Hand-outs of an entry before it is dead-lettered.
    pub max_deliveries: u32,
    /// Entries one stream may hold (0: no bound).
    pub max_backlog: u64,
    /// How long admitted events are kept per topic (`Duration::ZERO`: not).
    pub retention: Duration,
    /// Retained events per topic at most.
    pub retention_max_events: u64,
    /// Where a group seen for the first time starts.
    pub new_group_start: GroupStart,
}

/// Where a group seen for the first time starts (`SUBTOCALL_NEW_GROUP_START`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupStart {
    /// With the events published from then on.
    Now,
    /// With the retained events of its topic first.
    Retained,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    Memory,
    Redis,
}

/// How subtocall reconnects to the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectConfig {
    pub initial_backoff: Duration,
    /// Never less than `initial_backoff`.
    pub max_backoff: Duration,
    /// Consecutive failed attempts before exiting non-zero; `None` = forever.
    pub max_failures: Option<NonZeroU32>,
}

/// What is logged and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// An `EnvFilter` directive list, checked to parse.
    pub filter: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let mut vars = Vec::new();
        let mut not_unicode = Vec::new();
        for (name, value) in std::env::vars_os() {
            // A name that is not UTF-8 cannot be one of ours.
            let Ok(name) = name.into_string() else {
                continue;
            };
            match value.into_string() {
                Ok(value) => vars.push((name, value)),
                Err(_) => not_unicode.push(name),
            }
        }
        read(vars, not_unicode)
    }

    /// Reads the given variables instead of the process environment (tests
    /// pass a `HashMap`). When a name repeats, the last value wins.
    pub fn from_vars<I: IntoIterator<Item = (String, String)>>(
        vars: I,
    ) -> Result<Config, ConfigError> {
        read(vars.into_iter().collect(), Vec::new())
    }

    /// Things worth a warning that do not stop startup, such as an unknown
    /// `SUBTOCALL_` variable (probably a typo) or an ignored old name.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Every variable with the value in effect, as `/status` shows it:
    /// secrets as `***`, URLs without passwords or query values.
    pub fn settings(&self) -> &[crate::status::Setting] {
        &self.settings
    }
}

/// `SUBTOCALL_HTTP_ADDR` alone, parsed as the sidecar parses it (for
/// `subtocall status`, which needs no other variable): `None` when off.
pub fn http_addr_from_env() -> Result<Option<SocketAddr>, String> {
    let set = std::env::var(HTTP_ADDR.name).ok();
    let text = match (&set, HTTP_ADDR.default) {
        (Some(text), _) => text.as_str(),
        (None, DefaultValue::Value(default)) => default,
        (None, _) => "off",
    };
    parse::listen_addr(text).map_err(|_| {
        format!(
            "{}={text:?}: expected {}",
            HTTP_ADDR.name, HTTP_ADDR.accepts
        )
    })
}

/// What [`Config::settings`] holds, from the variables as set.
fn settings(raw: &RawVars) -> Vec<crate::status::Setting> {
    VARS.iter()
        .map(|var| {
            let set = raw.first_set(var).map(|(_, text)| text);
            let value = match set {
                Some(_) if var.secret => redacted::HIDDEN.to_owned(),
                Some(text) if var.name == WAMP_URL.name => {
                    crate::wamp::auth::redact_query(text, |_| true)
                }
                Some(text) if var.name == REDIS_URL.name => redacted::redact_redis_url(text),
                Some(text) => text.to_owned(),
                None => var.default.text().to_owned(),
            };
            crate::status::Setting {
                name: var.name.to_owned(),
                value,
                set: set.is_some(),
            }
        })
        .collect()
}

/// The variables as set, read with `envy`: one field per name in
/// `vars::known_names()`, `None` when unset. Not `Debug`: it holds the secret
/// in the clear.
#[derive(Deserialize)]
struct RawVars {
    wamp_url: Option<String>,
    crossbar_realm: Option<String>,
    realm: Option<String>,
    backend_username: Option<String>,
    backend_secret: Option<String>,
    use_redis_mq: Option<String>,
    redis_url: Option<String>,
    redis_host: Option<String>,
    redis_port: Option<String>,
    rust_log: Option<String>,
    subtocall_auth_method: Option<String>,
    subtocall_serializer: Option<String>,
    subtocall_connect_timeout: Option<String>,
    subtocall_ping_interval: Option<String>,
    subtocall_ping_timeout: Option<String>,
    subtocall_max_message_size: Option<String>,
    subtocall_max_call_size: Option<String>,
    subtocall_ca_file: Option<String>,
    subtocall_reconnect_initial_backoff: Option<String>,
    subtocall_reconnect_max_backoff: Option<String>,
    subtocall_max_connect_failures: Option<String>,
    subtocall_marker: Option<String>,
    subtocall_group_separator: Option<String>,
    subtocall_batch_marker: Option<String>,
    subtocall_batch_max_events: Option<String>,
    subtocall_batch_max_bytes: Option<String>,
    subtocall_batch_in_flight: Option<String>,
    subtocall_batch_linger: Option<String>,
    subtocall_registration_filter: Option<String>,
    subtocall_grace_period: Option<String>,
    subtocall_call_timeout: Option<String>,
    subtocall_details_kwarg: Option<String>,
    subtocall_order_by: Option<String>,
    subtocall_max_in_flight: Option<String>,
    subtocall_queue_capacity: Option<String>,
    subtocall_overflow: Option<String>,
    subtocall_retry_max_attempts: Option<String>,
    subtocall_retry_max_age: Option<String>,
    subtocall_retry_initial_backoff: Option<String>,
    subtocall_retry_max_backoff: Option<String>,
    subtocall_dead_letter_key: Option<String>,
    subtocall_redis_prefix: Option<String>,
    subtocall_redis_target: Option<String>,
    subtocall_redis_consumer_group: Option<String>,
    subtocall_redis_max_backlog: Option<String>,
    subtocall_queue: Option<String>,
    subtocall_queue_name: Option<String>,
    subtocall_claim_idle: Option<String>,
    subtocall_order_partitions: Option<String>,
    subtocall_dedup_window: Option<String>,
    subtocall_queue_max_backlog: Option<String>,
    subtocall_retention: Option<String>,
    subtocall_retention_max_events: Option<String>,
    subtocall_new_group_start: Option<String>,
    subtocall_instance_id: Option<String>,
    subtocall_max_deliveries: Option<String>,
    subtocall_redis_cluster: Option<String>,
    subtocall_redis_sentinels: Option<String>,
    subtocall_redis_sentinel_master: Option<String>,
    subtocall_redis_sentinel_password: Option<String>,
    subtocall_redis_wait_replicas: Option<String>,
    subtocall_redis_wait_timeout: Option<String>,
    subtocall_redis_wait_copies: Option<String>,
    subtocall_shutdown_timeout: Option<String>,
    subtocall_http_addr: Option<String>,
    subtocall_metrics_max_procedures: Option<String>,
    subtocall_log: Option<String>,
    subtocall_log_format: Option<String>,
    subtocall_policy_file: Option<String>,
}

impl RawVars {
    /// The variable's value under its name, else under the first of its
    /// old names that is set, with the name it was found under.
    fn first_set(&self, var: &'static Var) -> Option<(&'static str, &str)> {
        std::iter::once(var.name)
            .chain(var.old_names.iter().copied())
            .find_map(|name| Some((name, self.get(name)?)))
    }

    /// The value of the variable named exactly `name`, if set.
    fn get(&self, name: &str) -> Option<&str> {
        let field = match name {
            "WAMP_URL" => &self.wamp_url,
            "CROSSBAR_REALM" => &self.crossbar_realm,
            "REALM" => &self.realm,
            "BACKEND_USERNAME" => &self.backend_username,
            "BACKEND_SECRET" => &self.backend_secret,
            "USE_REDIS_MQ" => &self.use_redis_mq,
            "REDIS_URL" => &self.redis_url,
            "REDIS_HOST" => &self.redis_host,
            "REDIS_PORT" => &self.redis_port,
            "RUST_LOG" => &self.rust_log,
            "SUBTOCALL_AUTH_METHOD" => &self.subtocall_auth_method,
            "SUBTOCALL_SERIALIZER" => &self.subtocall_serializer,
            "SUBTOCALL_CONNECT_TIMEOUT" => &self.subtocall_connect_timeout,
            "SUBTOCALL_PING_INTERVAL" => &self.subtocall_ping_interval,
            "SUBTOCALL_PING_TIMEOUT" => &self.subtocall_ping_timeout,
            "SUBTOCALL_MAX_MESSAGE_SIZE" => &self.subtocall_max_message_size,
            "SUBTOCALL_MAX_CALL_SIZE" => &self.subtocall_max_call_size,
            "SUBTOCALL_CA_FILE" => &self.subtocall_ca_file,
            "SUBTOCALL_RECONNECT_INITIAL_BACKOFF" => &self.subtocall_reconnect_initial_backoff,
            "SUBTOCALL_RECONNECT_MAX_BACKOFF" => &self.subtocall_reconnect_max_backoff,
            "SUBTOCALL_MAX_CONNECT_FAILURES" => &self.subtocall_max_connect_failures,
            "SUBTOCALL_MARKER" => &self.subtocall_marker,
            "SUBTOCALL_GROUP_SEPARATOR" => &self.subtocall_group_separator,
            "SUBTOCALL_BATCH_MARKER" => &self.subtocall_batch_marker,
            "SUBTOCALL_BATCH_MAX_EVENTS" => &self.subtocall_batch_max_events,
            "SUBTOCALL_BATCH_MAX_BYTES" => &self.subtocall_batch_max_bytes,
            "SUBTOCALL_BATCH_IN_FLIGHT" => &self.subtocall_batch_in_flight,
            "SUBTOCALL_BATCH_LINGER" => &self.subtocall_batch_linger,
            "SUBTOCALL_REGISTRATION_FILTER" => &self.subtocall_registration_filter,
            "SUBTOCALL_GRACE_PERIOD" => &self.subtocall_grace_period,
            "SUBTOCALL_CALL_TIMEOUT" => &self.subtocall_call_timeout,
            "SUBTOCALL_DETAILS_KWARG" => &self.subtocall_details_kwarg,
            "SUBTOCALL_ORDER_BY" => &self.subtocall_order_by,
            "SUBTOCALL_MAX_IN_FLIGHT" => &self.subtocall_max_in_flight,
            "SUBTOCALL_QUEUE_CAPACITY" => &self.subtocall_queue_capacity,
            "SUBTOCALL_OVERFLOW" => &self.subtocall_overflow,
            "SUBTOCALL_RETRY_MAX_ATTEMPTS" => &self.subtocall_retry_max_attempts,
            "SUBTOCALL_RETRY_MAX_AGE" => &self.subtocall_retry_max_age,
            "SUBTOCALL_RETRY_INITIAL_BACKOFF" => &self.subtocall_retry_initial_backoff,
            "SUBTOCALL_RETRY_MAX_BACKOFF" => &self.subtocall_retry_max_backoff,
            "SUBTOCALL_DEAD_LETTER_KEY" => &self.subtocall_dead_letter_key,
            "SUBTOCALL_REDIS_PREFIX" => &self.subtocall_redis_prefix,
            "SUBTOCALL_REDIS_TARGET" => &self.subtocall_redis_target,
            "SUBTOCALL_REDIS_CONSUMER_GROUP" => &self.subtocall_redis_consumer_group,
            "SUBTOCALL_REDIS_MAX_BACKLOG" => &self.subtocall_redis_max_backlog,
            "SUBTOCALL_QUEUE" => &self.subtocall_queue,
            "SUBTOCALL_QUEUE_NAME" => &self.subtocall_queue_name,
            "SUBTOCALL_CLAIM_IDLE" => &self.subtocall_claim_idle,
            "SUBTOCALL_ORDER_PARTITIONS" => &self.subtocall_order_partitions,
            "SUBTOCALL_DEDUP_WINDOW" => &self.subtocall_dedup_window,
            "SUBTOCALL_QUEUE_MAX_BACKLOG" => &self.subtocall_queue_max_backlog,
            "SUBTOCALL_RETENTION" => &self.subtocall_retention,
            "SUBTOCALL_RETENTION_MAX_EVENTS" => &self.subtocall_retention_max_events,
            "SUBTOCALL_NEW_GROUP_START" => &self.subtocall_new_group_start,
            "SUBTOCALL_INSTANCE_ID" => &self.subtocall_instance_id,
            "SUBTOCALL_MAX_DELIVERIES" => &self.subtocall_max_deliveries,
            "SUBTOCALL_REDIS_CLUSTER" => &self.subtocall_redis_cluster,
            "SUBTOCALL_REDIS_SENTINELS" => &self.subtocall_redis_sentinels,
            "SUBTOCALL_REDIS_SENTINEL_MASTER" => &self.subtocall_redis_sentinel_master,
            "SUBTOCALL_REDIS_SENTINEL_PASSWORD" => &self.subtocall_redis_sentinel_password,
            "SUBTOCALL_REDIS_WAIT_REPLICAS" => &self.subtocall_redis_wait_replicas,
            "SUBTOCALL_REDIS_WAIT_TIMEOUT" => &self.subtocall_redis_wait_timeout,
            "SUBTOCALL_REDIS_WAIT_COPIES" => &self.subtocall_redis_wait_copies,
            "SUBTOCALL_SHUTDOWN_TIMEOUT" => &self.subtocall_shutdown_timeout,
            "SUBTOCALL_HTTP_ADDR" => &self.subtocall_http_addr,
            "SUBTOCALL_METRICS_MAX_PROCEDURES" => &self.subtocall_metrics_max_procedures,
            "SUBTOCALL_LOG" => &self.subtocall_log,
            "SUBTOCALL_LOG_FORMAT" => &self.subtocall_log_format,
            "SUBTOCALL_POLICY_FILE" => &self.subtocall_policy_file,
            _ => return None,
        };
        field.as_deref()
    }
}

/// Parses every variable, then builds the `Config` only if none was bad.
fn read(vars: Vec<(String, String)>, not_unicode: Vec<String>) -> Result<Config, ConfigError> {
    // Exact names only: envy matches field names case-insensitively, but
    // environment names are case-sensitive (`wamp_url` is not `WAMP_URL`).
    let ours: BTreeMap<String, String> = vars
        .iter()
        .filter(|(name, _)| known_names().any(|known| known == name))
        .cloned()
        .collect();
    let raw: RawVars = match envy::from_iter(ours) {
        Ok(raw) => raw,
        // Cannot happen with `Option<String>` fields and unique names; if it
        // did, the message names no value, so it cannot leak the secret.
        Err(e) => {
            return Err(ConfigError::new(vec![Problem {
                variable: "environment",
                value: None,
                message: format!("cannot be read: {e}"),
            }]));
        }
    };

    let mut r = Reader {
        raw,
        problems: Vec::new(),
        warnings: unknown_variable_warnings(
            vars.iter()
                .map(|(name, _)| name.as_str())
                .chain(not_unicode.iter().map(String::as_str)),
        ),
    };
    for name in &not_unicode {
        if let Some(known) = known_names().find(|known| known == name) {
            r.report(known, None, "is not valid UTF-8".to_string());
        }
    }

    let settings = settings(&r.raw);
    let wamp = wamp(&mut r);
    let discovery = discovery(&mut r);
    let forward = forward(&mut r);
    let redis = redis(&mut r);
    let queue = queue(&mut r);
    let reconnect = reconnect(&mut r);
    let shutdown_timeout = r.required(&SHUTDOWN_TIMEOUT, |text| {
        parse::duration_at_least(text, MIN_100MS)
    });
    let http = r.required(&HTTP_ADDR, parse::listen_addr);
    let metrics_max_procedures = r.required(&METRICS_MAX_PROCEDURES, |text| {
        parse::number_in(text, 0, 10_000)
    });
    let log = log(&mut r);
    let policies = match (&forward, &discovery, &queue) {
        (Ok(f), Ok(d), Ok(q)) => policies(&mut r, f, d, q),
        _ => Err(Reported),
    };

    match (
        wamp,
        discovery,
        forward,
        redis,
        queue,
        reconnect,
        shutdown_timeout,
        http,
        metrics_max_procedures,
        log,
        policies,
    ) {
        (
            Ok(wamp),
            Ok(discovery),
            Ok(forward),
            Ok(redis),
            Ok(queue),
            Ok(reconnect),
            Ok(shutdown_timeout),
            Ok(http),
            Ok(metrics_max_procedures),
            Ok(log),
            Ok(policies),
        ) if r.problems.is_empty() => Ok(Config {
            wamp,
            discovery,
            forward,
            redis,
            queue,
            reconnect,
            shutdown_timeout,
            http,
            metrics_max_procedures,
            log,
            policies,
            warnings: r.warnings,
            settings,
        }),
        _ => Err(ConfigError::new(r.problems)),
    }
}

fn wamp(r: &mut Reader) -> Checked<WampConfig> {
    let url = r.required(&WAMP_URL, parse::websocket_url);
    let realm = r.required(&CROSSBAR_REALM, parse::word);
    let auth = auth(r);
    let serializer = r.required(&SERIALIZER, |text| {
        parse::choice(
            text,
            &[("msgpack", Serializer::MsgPack), ("json", Serializer::Json)],
        )
    });
    let connect_timeout = r.required(&CONNECT_TIMEOUT, |text| {
        parse::duration_at_least(text, MIN_100MS)
    });
    let ping_interval = r.required(&PING_INTERVAL, |text| {
        parse::duration_at_least(text, MIN_100MS)
    });
    let ping_timeout = r.required(&PING_TIMEOUT, |text| {
        parse::duration_at_least(text, MIN_100MS)
    });
    let max_message_size = r.required(&MAX_MESSAGE_SIZE, parse::byte_size);
    let max_call_size = r.required(&MAX_CALL_SIZE, parse::byte_size);
    let ca_file = r.optional(&CA_FILE, parse::ca_file);

    if let (Ok(url), Ok(Some(_))) = (&url, &ca_file)
        && url.scheme() != "wss"
    {
        r.warn(format!(
            "{} has no effect because {} is not wss://",
            CA_FILE.name, WAMP_URL.name
        ));
    }
    Ok(WampConfig {
        url: WampUrl::new(url?),
        realm: realm?,
        auth: auth?,
        serializer: serializer?,
        connect_timeout: connect_timeout?,
        ping_interval: ping_interval?,
        ping_timeout: ping_timeout?,
        max_message_size: max_message_size?,
        max_call_size: max_call_size?,
        ca_file: ca_file?,
    })
}

/// `BACKEND_USERNAME`, `BACKEND_SECRET` and `SUBTOCALL_AUTH_METHOD` together.
fn auth(r: &mut Reader) -> Checked<Auth> {
    #[derive(Clone, Copy)]
    enum Method {
        WampCra,
        Ticket,
        Anonymous,
    }
    let authid = r.optional(&BACKEND_USERNAME, parse::non_empty);
    let secret = r.optional(&BACKEND_SECRET, parse::secret);
    let method = r.optional(&AUTH_METHOD, |text| {
        parse::choice(
            text,
            &[
                ("wampcra", Method::WampCra),
                ("ticket", Method::Ticket),
                ("anonymous", Method::Anonymous),
            ],
        )
    });
    let (authid, secret, method) = (authid?, secret?, method?);

    let method = method.unwrap_or(if authid.is_some() {
        Method::WampCra
    } else {
        Method::Anonymous
    });
    let method_name = match method {
        Method::WampCra => "wampcra",
        Method::Ticket => "ticket",
        Method::Anonymous => {
            if authid.is_some() || secret.is_some() {
                r.warn(format!(
                    "{} and {} are ignored: authenticating anonymously",
                    BACKEND_USERNAME.name, BACKEND_SECRET.name
                ));
            }
            return Ok(Auth::Anonymous);
        }
    };
    let missing = format!("is required when {} is {method_name}", AUTH_METHOD.name);
    match (authid, secret) {
        (Some(authid), Some(secret)) => Ok(match method {
            Method::Ticket => Auth::Ticket {
                authid,
                ticket: secret,
            },
            _ => Auth::WampCra { authid, secret },
        }),
        (authid, secret) => {
            if authid.is_none() {
                r.report(BACKEND_USERNAME.name, None, missing.clone());
            }
            if secret.is_none() {
                r.report(BACKEND_SECRET.name, None, missing);
            }
            Err(Reported)
        }
    }
}

fn discovery(r: &mut Reader) -> Checked<DiscoveryConfig> {
    let marker = r.required(&MARKER, parse::marker);
    let group_separator = r.required(&GROUP_SEPARATOR, parse::marker);
    let batch_marker = r.required(&BATCH_MARKER, parse::marker);
    let batch_marker = match (&marker, batch_marker) {
        (Ok(m), Ok(b)) if m.starts_with(&b) => {
            let why = format!("is {m:?}'s own start (SUBTOCALL_MARKER): the two must differ");
            r.report(BATCH_MARKER.name, Some(&b), why);
            Err(Reported)
        }
        (_, b) => b,
    };
    let filter = r.optional(&REGISTRATION_FILTER, parse::regex);
    let grace_period = r.required(&GRACE_PERIOD, parse::duration);
    Ok(DiscoveryConfig {
        marker: marker?,
        group_separator: group_separator?,
        batch_marker: batch_marker?,
        filter: filter?,
        grace_period: grace_period?,
    })
}

fn forward(r: &mut Reader) -> Checked<ForwardConfig> {
    let mode = r.required(&USE_REDIS_MQ, |text| {
        parse::boolean(text).map(|redis| if redis { Mode::Redis } else { Mode::Wamp })
    });
    let call_timeout = r.required(&CALL_TIMEOUT, policy_keys::call_timeout);
    let details_kwarg = r.optional(&DETAILS_KWARG, policy_keys::details_kwarg);
    let order_by = r.required(&ORDER_BY, parse::order_by);
    let max_in_flight = r.required(&MAX_IN_FLIGHT, policy_keys::max_in_flight);
    let batch_max_events = r.required(&BATCH_MAX_EVENTS, policy_keys::batch_max_events);
    let batch_max_bytes = r.required(&BATCH_MAX_BYTES, parse::byte_size);
    let batch_in_flight = r.required(&BATCH_IN_FLIGHT, policy_keys::batch_in_flight);
    let batch_linger = r.required(&BATCH_LINGER, parse::duration);
    let queue_capacity = r.required(&QUEUE_CAPACITY, |text| {
        parse::number_in(text, 1, 10_000_000)
    });
    let overflow = r.required(&OVERFLOW, |text| {
        parse::choice(
            text,
            &[
                ("drop-newest", Overflow::DropNewest),
                ("drop-oldest", Overflow::DropOldest),
            ],
        )
    });
    let max_attempts = r.required(&RETRY_MAX_ATTEMPTS, policy_keys::retry_max_attempts);
    let max_age = r.required(&RETRY_MAX_AGE, policy_keys::retry_max_age);
    let (initial_backoff, max_backoff) = r.backoff_pair(
        (&RETRY_INITIAL_BACKOFF, MIN_10MS),
        (&RETRY_MAX_BACKOFF, MIN_10MS),
    );
    Ok(ForwardConfig {
        mode: mode?,
        call_timeout: call_timeout?,
        details_kwarg: details_kwarg?,
        max_in_flight: max_in_flight?,
        queue_capacity: queue_capacity?,
        overflow: overflow?,
        retry: RetryPolicy {
            max_attempts: max_attempts?,
            max_age: max_age?,
            initial_backoff: initial_backoff?,
            max_backoff: max_backoff?,
        },
        order_by: order_by?,
        batching: crate::forward::Batching {
            max_events: batch_max_events?,
            max_bytes: batch_max_bytes?,
            in_flight: batch_in_flight?,
            linger: batch_linger?,
        },
    })
}

fn redis(r: &mut Reader) -> Checked<RedisConfig> {
    let url = redis_url(r);
    let prefix = r.required(&REDIS_PREFIX, parse::any_text);
    let dead_letter_key = r.optional(&DEAD_LETTER_KEY, parse::non_empty);
    let cluster = r.required(&REDIS_CLUSTER, parse::boolean);
    let target = r.required(&REDIS_TARGET, |text| {
        parse::choice(
            text,
            &[("list", RedisTarget::List), ("stream", RedisTarget::Stream)],
        )
    });
    let consumer_group = r.required(&REDIS_CONSUMER_GROUP, parse::word);
    let max_backlog = r.required(&REDIS_MAX_BACKLOG, |text| {
        parse::number_in(text, 1, 1_000_000_000)
    });
    let sentinel = sentinel(r, cluster.as_ref().is_ok_and(|c| *c));
    let wait_replicas = r.required(&REDIS_WAIT_REPLICAS, |text| parse::number_in(text, 0, 16));
    let wait_timeout = r.required(&REDIS_WAIT_TIMEOUT, |text| {
        let d = parse::duration_at_least(text, Duration::from_millis(1))?;
        if d > Duration::from_secs(10) {
            return Err(parse::Invalid::because("is too long; at most 10s"));
        }
        Ok(d)
    });
    let wait_copies = r.required(&REDIS_WAIT_COPIES, |text| {
        parse::number_in(text, 1, 10_000_000)
    });
    Ok(RedisConfig {
        url: url?,
        prefix: prefix?,
        dead_letter_key: dead_letter_key?,
        cluster: cluster?,
        sentinel: sentinel?,
        wait: WaitConfig {
            replicas: wait_replicas?,
            timeout: wait_timeout?,
            copies: wait_copies?,
        },
        target: target?,
        consumer_group: consumer_group?,
        max_backlog: max_backlog?,
    })
}

/// `SUBTOCALL_REDIS_SENTINELS` and the settings that go with it.
fn sentinel(r: &mut Reader, cluster: bool) -> Checked<Option<SentinelConfig>> {
    let sentinels = r.optional(&REDIS_SENTINELS, parse::host_ports);
    let master = r.optional(&REDIS_SENTINEL_MASTER, parse::non_empty);
    let password = r.optional(&REDIS_SENTINEL_PASSWORD, parse::secret);
    let (sentinels, master, password) = (sentinels?, master?, password?);
    let Some(sentinels) = sentinels else {
        let only = format!("is only used with {}", REDIS_SENTINELS.name);
        if master.is_some() {
            r.report(REDIS_SENTINEL_MASTER.name, None, only.clone());
        }
        if password.is_some() {
            r.report(REDIS_SENTINEL_PASSWORD.name, None, only);
        }
        return if master.is_some() || password.is_some() {
            Err(Reported)
        } else {
            Ok(None)
        };
    };
    if cluster {
        r.report(
            REDIS_SENTINELS.name,
            None,
            format!(
                "cannot be used with {} (a Redis Cluster fails over by itself)",
                REDIS_CLUSTER.name
            ),
        );
        return Err(Reported);
    }
    let Some(master) = master else {
        r.report(
            REDIS_SENTINEL_MASTER.name,
            None,
            format!("is required when {} is set", REDIS_SENTINELS.name),
        );
        return Err(Reported);
    };
    Ok(Some(SentinelConfig {
        sentinels,
        master,
        password,
    }))
}

fn queue(r: &mut Reader) -> Checked<QueueConfig> {
    let kind = r.required(&QUEUE, |text| {
        parse::choice(
            text,
            &[("memory", QueueKind::Memory), ("redis", QueueKind::Redis)],
        )
    });
    let name = r.required(&QUEUE_NAME, parse::queue_name);
    let claim_idle = r.required(&CLAIM_IDLE, |text| {
        parse::duration_at_least(text, MIN_100MS)
    });
    let dedup_window = r.required(&DEDUP_WINDOW, |text| {
        parse::duration_at_least(text, Duration::from_secs(1))
    });
    let partitions = r.required(&ORDER_PARTITIONS, |text| parse::number_in(text, 1, 1024));
    let instance_id = r.optional(&INSTANCE_ID, parse::queue_name);
    let max_deliveries = r.required(&MAX_DELIVERIES, policy_keys::max_deliveries);
    let max_backlog = r.required(&QUEUE_MAX_BACKLOG, |text| {
        parse::number_in(text, 0, 1_000_000_000)
    });
    let retention = r.required(&RETENTION, parse::duration);
    let retention_max_events = r.required(&RETENTION_MAX_EVENTS, |text| {
        parse::number_in(text, 1, 1_000_000_000)
    });
    let new_group_start = r.required(&NEW_GROUP_START, |text| {
        parse::choice(
            text,
            &[("now", GroupStart::Now), ("retained", GroupStart::Retained)],
        )
    });
    let redis_queue = matches!(kind, Ok(QueueKind::Redis));
    if let Ok(retention) = &retention
        && !retention.is_zero()
        && !redis_queue
    {
        let value = r.raw.get(RETENTION.name).map(str::to_owned);
        r.report(
            RETENTION.name,
            value.as_deref(),
            format!("needs {}=redis (events are retained in Redis)", QUEUE.name),
        );
    }
    if let (Ok(GroupStart::Retained), Ok(retention)) = (&new_group_start, &retention)
        && retention.is_zero()
    {
        let value = r.raw.get(NEW_GROUP_START.name).map(str::to_owned);
        r.report(
            NEW_GROUP_START.name,
            value.as_deref(),
            format!(
                "retained needs {} (there is nothing retained to start from)",
                RETENTION.name
            ),
        );
    }
    Ok(QueueConfig {
        kind: kind?,
        name: name?,
        claim_idle: claim_idle?,
        dedup_window: dedup_window?,
        partitions: partitions?,
        instance_id: instance_id?,
        max_deliveries: max_deliveries?,
        max_backlog: max_backlog?,
        retention: retention?,
        retention_max_events: retention_max_events?,
        new_group_start: new_group_start?,
    })
}

/// The settings of a procedure no rule matches: the variables'.
fn default_policy(
    f: &ForwardConfig,
    d: &DiscoveryConfig,
    q: &QueueConfig,
) -> crate::forward::policy::Policy {
    crate::forward::policy::Policy {
        order_by: f.order_by.clone(),
        call_timeout: f.call_timeout,
        max_in_flight: None,
        retry: crate::forward::retry::RetryPolicy {
            max_attempts: f.retry.max_attempts,
            max_age: f.retry.max_age,
            backoff: crate::forward::retry::Backoff {
                initial: f.retry.initial_backoff,
                max: f.retry.max_backoff,
            },
        },
        max_deliveries: q.max_deliveries,
        batching: f.batching,
        details_kwarg: f.details_kwarg.as_deref().map(std::sync::Arc::from),
        grace_period: d.grace_period,
    }
}

/// `SUBTOCALL_POLICY_FILE`: its rules over the settings read so far.
fn policies(
    r: &mut Reader,
    f: &ForwardConfig,
    d: &DiscoveryConfig,
    q: &QueueConfig,
) -> Checked<std::sync::Arc<crate::policy::Policies>> {
    let defaults = default_policy(f, d, q);
    let Some(path) = r.optional(&POLICY_FILE, parse::non_empty)? else {
        return Ok(std::sync::Arc::new(crate::policy::Policies::none(defaults)));
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            r.report(
                POLICY_FILE.name,
                Some(&path),
                format!("cannot be read: {e}"),
            );
            return Err(Reported);
        }
    };
    let context = policy_context(d, f);
    match crate::policy::Policies::load(PathBuf::from(&path), &text, defaults, &context) {
        Ok(policies) => {
            let sets_deliveries = policies
                .rules()
                .iter()
                .any(|rule| rule.overrides.max_deliveries.is_some());
            if sets_deliveries && q.kind != QueueKind::Redis {
                r.warn(format!(
                    "max_deliveries in {path} has no effect without {}=redis",
                    QUEUE.name
                ));
            }
            Ok(std::sync::Arc::new(policies))
        }
        Err(problems) => {
            for problem in problems {
                r.report(POLICY_FILE.name, None, problem);
            }
            Err(Reported)
        }
    }
}

/// What the policy file's rules are checked against.
fn policy_context(d: &DiscoveryConfig, f: &ForwardConfig) -> crate::policy::Context {
    crate::policy::Context {
        markers: vec![d.marker.clone(), d.batch_marker.clone()],
        max_in_flight: f.max_in_flight,
    }
}

impl Config {
    /// Whether any procedure is ordered: by `SUBTOCALL_ORDER_BY` or by a
    /// rule of the policy file (the Redis queue then has partitions).
    pub fn orders_any(&self) -> bool {
        self.forward.order_by != OrderBy::None || self.policies.orders_any()
    }

    /// How `procedure`'s events are ordered: its rule's `order_by`, else
    /// `SUBTOCALL_ORDER_BY` (for the tools that move entries by hand).
    pub fn order_by_of(&self, procedure: &str) -> OrderBy {
        match self.policies.resolve(procedure).policy {
            Some(policy) => policy.order_by.clone(),
            None => self.forward.order_by.clone(),
        }
    }

    /// What a reload of the policy file checks its rules against.
    pub fn policy_context(&self) -> crate::policy::Context {
        policy_context(&self.discovery, &self.forward)
    }
}

/// `REDIS_URL`, or else the Python SubToCall's `REDIS_HOST` and `REDIS_PORT`.
fn redis_url(r: &mut Reader) -> Checked<RedisUrl> {
    let host = r.raw.get(REDIS_HOST).map(str::to_string);
    let port = r.raw.get(REDIS_PORT).map(str::to_string);
    if r.raw.get(REDIS_URL.name).is_some() || (host.is_none() && port.is_none()) {
        for (old, value) in [(REDIS_HOST, &host), (REDIS_PORT, &port)] {
            if value.is_some() {
                r.warn(format!(
                    "{old} is ignored because {} is set",
                    REDIS_URL.name
                ));
            }
        }
        return r.required(&REDIS_URL, parse::redis_url);
    }

    let host = match host {
        Some(text) => r.check(
            REDIS_HOST,
            "a host name or IP address",
            false,
            &text,
            redis_host,
        ),
        None => Ok("127.0.0.1".to_string()),
    };
    let port = match port {
        Some(text) => r.check(
            REDIS_PORT,
            "a port number from 1 to 65535",
            false,
            &text,
            |text| parse::number_in(text, 1, 65_535),
        ),
        None => Ok(6379),
    };
    let (host, port) = (host?, port?);
    // An IPv6 address needs brackets in a URL.
    let bracketed = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    RedisUrl::parse(&format!("redis://{bracketed}:{port}")).map_err(|reason| {
        r.report(
            REDIS_HOST,
            Some(&host),
            format!("does not make a valid redis:// URL: {reason}"),
        );
        Reported
    })
}

/// A host for `redis://HOST:PORT`: one word with no URL punctuation in it.
fn redis_host(text: &str) -> Parsed<String> {
    let host = parse::word(text)?;
    if host.contains(['/', '@', '?', '#']) {
        return Err(Invalid::syntax());
    }
    Ok(host)
}

fn reconnect(r: &mut Reader) -> Checked<ReconnectConfig> {
    let (initial_backoff, max_backoff) = r.backoff_pair(
        (&RECONNECT_INITIAL_BACKOFF, MIN_10MS),
        (&RECONNECT_MAX_BACKOFF, MIN_100MS),
    );
    let max_failures = r.required(&MAX_CONNECT_FAILURES, |text| {
        // 0 means "retry forever", which `NonZeroU32::new` maps to `None`.
        parse::number_in(text, 0, u64::from(u32::MAX)).map(NonZeroU32::new)
    });
    Ok(ReconnectConfig {
        initial_backoff: initial_backoff?,
        max_backoff: max_backoff?,
        max_failures: max_failures?,
    })
}

/// `SUBTOCALL_LOG`, else `RUST_LOG` (when not empty), else the default.
fn log(r: &mut Reader) -> Checked<LogConfig> {
    let rust_log = r.raw.get(RUST_LOG).map(str::to_string);
    let filter = match rust_log {
        Some(text) if r.raw.get(LOG.name).is_none() && !text.trim().is_empty() => {
            r.check(RUST_LOG, LOG.accepts, false, &text, parse::log_filter)
        }
        _ => r.required(&LOG, parse::log_filter),
    };
    let format = r.required(&LOG_FORMAT, |text| {
        parse::choice(
            text,
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        )
    });
    Ok(LogConfig {
        filter: filter?,
        format: format?,
    })
}

/// The problem with this value has been recorded; the value is unusable.
struct Reported;

/// A value read from the environment, or the fact that it was bad.
type Checked<T> = Result<T, Reported>;

/// Reads variables out of `raw`, recording every problem and warning on the
/// way so one run reports them all.
struct Reader {
    raw: RawVars,
    problems: Vec<Problem>,
    warnings: Vec<String>,
}

impl Reader {
    /// The variable's value, or its default when unset. For variables with
    /// a `DefaultValue::Value` in the table.
    fn required<T>(
        &mut self,
        var: &'static Var,
        parse: impl FnOnce(&str) -> Parsed<T>,
    ) -> Checked<T> {
        if let Some((name, text)) = self.lookup(var) {
            return self.check(name, var.accepts, var.secret, &text, parse);
        }
        match var.default {
            DefaultValue::Value(default) => {
                self.check(var.name, var.accepts, var.secret, default, parse)
            }
            DefaultValue::Unset | DefaultValue::Depends(_) => {
                // A mistake in this module, caught by the tests of defaults.
                self.report(
                    var.name,
                    None,
                    "has no default; this is a bug in subtocall".to_string(),
                );
                Err(Reported)
            }
        }
    }

    /// The variable's value, or `None` when it is unset.
    fn optional<T>(
        &mut self,
        var: &'static Var,
        parse: impl FnOnce(&str) -> Parsed<T>,
    ) -> Checked<Option<T>> {
        match self.lookup(var) {
            Some((name, text)) => self
                .check(name, var.accepts, var.secret, &text, parse)
                .map(Some),
            None => Ok(None),
        }
    }

    /// The value under the variable's name, else under the first old name
    /// that is set, with the name it was found under.
    fn lookup(&mut self, var: &'static Var) -> Option<(&'static str, String)> {
        let found = self
            .raw
            .first_set(var)
            .map(|(name, text)| (name, text.to_string()));
        if let Some((used, _)) = &found {
            for old in var.old_names.iter().filter(|old| *old != used) {
                if self.raw.get(old).is_some() {
                    self.warn(format!("{old} is ignored because {used} is set"));
                }
            }
        }
        found
    }

    /// Parses `text` as the value of `variable`; on failure records a
    /// problem that says what was expected.
    fn check<T>(
        &mut self,
        variable: &'static str,
        accepts: &str,
        secret: bool,
        text: &str,
        parse: impl FnOnce(&str) -> Parsed<T>,
    ) -> Checked<T> {
        parse(text).map_err(|invalid| {
            let message = match invalid.reason {
                None => format!("expected {accepts}"),
                Some(reason) => format!("{reason}; expected {accepts}"),
            };
            let shown = if secret { "***" } else { text };
            self.report(variable, Some(shown), message);
            Reported
        })
    }

    /// An initial and a maximum backoff, each with its lower bound, checking
    /// that max >= initial. The problem is reported on whichever of the two
    /// was set (max if both).
    fn backoff_pair(
        &mut self,
        (initial, initial_min): (&'static Var, Duration),
        (max, max_min): (&'static Var, Duration),
    ) -> (Checked<Duration>, Checked<Duration>) {
        let initial_value =
            self.required(initial, |text| parse::duration_at_least(text, initial_min));
        let max_value = self.required(max, |text| parse::duration_at_least(text, max_min));
        let (Ok(initial_duration), Ok(max_duration)) = (&initial_value, &max_value) else {
            return (initial_value, max_value);
        };
        if max_duration >= initial_duration {
            return (initial_value, max_value);
        }
        match self.raw.get(max.name).map(str::to_string) {
            Some(text) => self.report(
                max.name,
                Some(&text),
                format!(
                    "must be at least {} ({})",
                    initial.name,
                    humantime::format_duration(*initial_duration)
                ),
            ),
            None => {
                let text = self.raw.get(initial.name).unwrap_or_default().to_string();
                self.report(
                    initial.name,
                    Some(&text),
                    format!(
                        "must be at most {} ({}, its default)",
                        max.name,
                        humantime::format_duration(*max_duration)
                    ),
                );
            }
        }
        (initial_value, Err(Reported))
    }

    /// Records a problem; `value` is redacted here, whatever the caller passed.
    fn report(&mut self, variable: &'static str, value: Option<&str>, message: String) {
        self.problems.push(Problem {
            variable,
            value: value.map(redacted::redact_value),
            message,
        });
    }

    fn warn(&mut self, warning: String) {
        if !self.warnings.contains(&warning) {
            self.warnings.push(warning);
        }
    }
}

/// One warning per `SUBTOCALL_*` name (in any case) that subtocall does not
/// know, with the closest known name when one is close.
fn unknown_variable_warnings<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut unknown: Vec<&str> = names
        .filter(|name| name.to_ascii_uppercase().starts_with(PREFIX))
        .filter(|name| !known_names().any(|known| known == *name))
        .collect();
    unknown.sort_unstable();
    unknown.dedup();
    unknown
        .into_iter()
        .map(|name| match closest_known_name(name) {
            Some(known) => format!("unknown variable {name} is ignored; did you mean {known}?"),
            None => format!(
                "unknown variable {name} is ignored; `subtocall --help` lists the known ones"
            ),
        })
        .collect()
}

/// The known name an unknown `SUBTOCALL_*` name was probably meant to be.
fn closest_known_name(unknown: &str) -> Option<&'static str> {
    let upper = unknown.to_ascii_uppercase();
    let rest = upper.strip_prefix(PREFIX)?;
    // `SUBTOCALL_REDIS_URL`: a name that never had the prefix.
    if let Some(name) = known_names().find(|name| *name == rest) {
        return Some(name);
    }
    let (name, distance) = VARS
        .iter()
        .filter_map(|var| {
            Some((
                var.name,
                edit_distance(rest, var.name.strip_prefix(PREFIX)?),
            ))
        })
        .min_by_key(|&(_, distance)| distance)?;
    (distance <= (rest.len() / 3).max(2)).then_some(name)
}

/// Levenshtein distance: single-character insertions, deletions and
/// substitutions needed to turn `a` into `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}
