//! The table of environment variables: one entry per variable with its
//! default, what it accepts and what it means. It is the single source of
//! `subtocall --help`, of the reference in `doc/configuration.md` and of the
//! "expected …" part of validation errors. Pure data and text; no parsing.

use std::time::Duration;

/// One environment variable subtocall reads.
#[derive(Debug)]
pub(crate) struct Var {
    pub name: &'static str,
    /// Names it had in the Python SubToCall, read instead when `name` is unset.
    pub old_names: &'static [&'static str],
    pub default: DefaultValue,
    /// What a valid value looks like; completes "expected …" in errors.
    pub accepts: &'static str,
    pub meaning: &'static str,
    /// Never printed: not in errors, not in `Debug`, not in logs.
    pub secret: bool,
    pub group: Group,
}

/// What applies when a variable is unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DefaultValue {
    /// Nothing: the feature is off (or anonymous, for the credentials).
    Unset,
    /// This text, parsed exactly as if the variable had been set to it.
    Value(&'static str),
    /// Computed from other variables; the text says how.
    Depends(&'static str),
}

impl DefaultValue {
    /// How the default reads in `--help` and in the reference.
    pub fn text(self) -> &'static str {
        match self {
            DefaultValue::Unset => "unset",
            DefaultValue::Value(value) => value,
            DefaultValue::Depends(how) => how,
        }
    }
}

/// Sections of `--help` and of the reference, in the order they are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Group {
    Router,
    Reconnect,
    Discovery,
    Forwarding,
    Retry,
    Queue,
    Redis,
    Operations,
}

impl Group {
    pub const ALL: [Group; 8] = [
        Group::Router,
        Group::Reconnect,
        Group::Discovery,
        Group::Forwarding,
        Group::Retry,
        Group::Queue,
        Group::Redis,
        Group::Operations,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Group::Router => "Router connection",
            Group::Reconnect => "Reconnecting",
            Group::Discovery => "Discovering SUB_ registrations",
            Group::Forwarding => "Forwarding events",
            Group::Retry => "Retries and dead letters",
            Group::Queue => "The queue (several instances)",
            Group::Redis => "Redis",
            Group::Operations => "Operations",
        }
    }
}

// "Accepts" texts shared by several variables.
const DURATION: &str = "a duration such as 30s or 500ms (a bare number means seconds)";
const AT_LEAST_100MS: &str =
    "a duration of at least 100ms such as 30s or 500ms (a bare number means seconds)";
const AT_LEAST_10MS: &str =
    "a duration of at least 10ms such as 30s or 500ms (a bare number means seconds)";

// Lower bounds of the durations where a tiny value does harm: a ping or
// reconnect loop, calls and joins that cannot succeed, a drain that cannot
// drain. The "accepts" text of each such variable names its bound.
/// Timeouts, intervals, the retry budget and the reconnect delay's cap.
pub(crate) const MIN_100MS: Duration = Duration::from_millis(100);
/// The first delay of both backoffs, and the retry delay's cap.
pub(crate) const MIN_10MS: Duration = Duration::from_millis(10);

// Old names, used by the table and by the code that reads them.
pub(crate) const REALM: &str = "REALM";
pub(crate) const REDIS_HOST: &str = "REDIS_HOST";
pub(crate) const REDIS_PORT: &str = "REDIS_PORT";
/// Not an old name but the conventional fallback of `SUBTOCALL_LOG`.
pub(crate) const RUST_LOG: &str = "RUST_LOG";

// ---- Router connection ----

pub(crate) const WAMP_URL: Var = Var {
    name: "WAMP_URL",
    old_names: &[],
    default: DefaultValue::Value("ws://127.0.0.1:8080/ws"),
    accepts: "a ws:// or wss:// URL with a host (credentials go in BACKEND_USERNAME/BACKEND_SECRET, not in the URL)",
    meaning: "The router's WebSocket endpoint.",
    secret: false,
    group: Group::Router,
};

pub(crate) const CROSSBAR_REALM: Var = Var {
    name: "CROSSBAR_REALM",
    old_names: &[REALM],
    default: DefaultValue::Value("realm1"),
    accepts: "a realm name (not empty, no spaces)",
    meaning: "The realm to join. CROSSBAR_REALM wins when both names are set.",
    secret: false,
    group: Group::Router,
};

pub(crate) const BACKEND_USERNAME: Var = Var {
    name: "BACKEND_USERNAME",
    old_names: &[],
    default: DefaultValue::Unset,
    accepts: "an authid (not empty)",
    meaning: "The WAMP authid to authenticate as; unset means anonymous.",
    secret: false,
    group: Group::Router,
};

pub(crate) const BACKEND_SECRET: Var = Var {
    name: "BACKEND_SECRET",
    old_names: &[],
    default: DefaultValue::Unset,
    accepts: "the WAMP-CRA secret or the ticket (not empty)",
    meaning: "Required when BACKEND_USERNAME is set and the auth method is wampcra or ticket. \
              Plain and salted (PBKDF2) WAMP-CRA secrets both work; a router whose salted \
              challenge asks for more than 1,000,000 PBKDF2 iterations is refused.",
    secret: true,
    group: Group::Router,
};

pub(crate) const AUTH_METHOD: Var = Var {
    name: "SUBTOCALL_AUTH_METHOD",
    old_names: &[],
    default: DefaultValue::Depends("wampcra if BACKEND_USERNAME is set, else anonymous"),
    accepts: "wampcra, ticket or anonymous",
    meaning: "How to authenticate to the router.",
    secret: false,
    group: Group::Router,
};

pub(crate) const SERIALIZER: Var = Var {
    name: "SUBTOCALL_SERIALIZER",
    old_names: &[],
    default: DefaultValue::Value("msgpack"),
    accepts: "msgpack or json",
    meaning: "The serializer offered first in the WebSocket subprotocol list; \
              both are always offered and the router picks.",
    secret: false,
    group: Group::Router,
};

pub(crate) const CONNECT_TIMEOUT: Var = Var {
    name: "SUBTOCALL_CONNECT_TIMEOUT",
    old_names: &[],
    default: DefaultValue::Value("10s"),
    accepts: AT_LEAST_100MS,
    meaning: "Deadline for one connection attempt: TCP, TLS, WebSocket handshake and WAMP join.",
    secret: false,
    group: Group::Router,
};

pub(crate) const PING_INTERVAL: Var = Var {
    name: "SUBTOCALL_PING_INTERVAL",
    old_names: &[],
    default: DefaultValue::Value("10s"),
    accepts: AT_LEAST_100MS,
    meaning: "How often a WebSocket ping is sent to the router.",
    secret: false,
    group: Group::Router,
};

pub(crate) const PING_TIMEOUT: Var = Var {
    name: "SUBTOCALL_PING_TIMEOUT",
    old_names: &[],
    default: DefaultValue::Value("5s"),
    accepts: AT_LEAST_100MS,
    meaning: "The connection is considered dead when nothing (no pong, no other frame) \
              arrives within this time after a ping.",
    secret: false,
    group: Group::Router,
};

pub(crate) const MAX_MESSAGE_SIZE: Var = Var {
    name: "SUBTOCALL_MAX_MESSAGE_SIZE",
    old_names: &[],
    default: DefaultValue::Value("16MiB"),
    accepts: "a size from 1KiB to 1GiB: a number of bytes, or a number with suffix KiB, MiB or GiB such as 512KiB",
    meaning: "The largest WAMP message accepted from the router. A larger EVENT (up to twice this size) is refused and counted (subtocall_events_refused_total{reason=\"too_large\"}) with its topic, publication and size logged, and the session goes on; anything larger ends the session. Keep it at least the router's own limit (Crossbar: 16 MiB).",
    secret: false,
    group: Group::Router,
};

pub(crate) const MAX_CALL_SIZE: Var = Var {
    name: "SUBTOCALL_MAX_CALL_SIZE",
    old_names: &[],
    default: DefaultValue::Value("16MiB"),
    accepts: "a size from 1KiB to 1GiB: a number of bytes, or a number with suffix KiB, MiB or GiB such as 512KiB",
    meaning: "The largest message subtocall sends the router: a forwarded CALL that would be larger is not sent but dead-lettered with reason too_large. Set it to the router's limit (Crossbar's default is 16 MiB), so that no call makes the router close the connection.",
    secret: false,
    group: Group::Router,
};

pub(crate) const CA_FILE: Var = Var {
    name: "SUBTOCALL_CA_FILE",
    old_names: &[],
    default: DefaultValue::Unset,
    accepts: "the path of a readable PEM file with at least one certificate",
    meaning: "Extra CA certificates for wss://, added to the system and webpki roots. \
              Checked at startup.",
    secret: false,
    group: Group::Router,
};

// ---- Reconnecting ----

pub(crate) const RECONNECT_INITIAL_BACKOFF: Var = Var {
    name: "SUBTOCALL_RECONNECT_INITIAL_BACKOFF",
    old_names: &[],
    default: DefaultValue::Value("200ms"),
    accepts: AT_LEAST_10MS,
    meaning: "Delay before the first reconnect attempt; later delays grow up to \
              SUBTOCALL_RECONNECT_MAX_BACKOFF.",
    secret: false,
    group: Group::Reconnect,
};

pub(crate) const RECONNECT_MAX_BACKOFF: Var = Var {
    name: "SUBTOCALL_RECONNECT_MAX_BACKOFF",
    old_names: &[],
    default: DefaultValue::Value("2s"),
    accepts: AT_LEAST_100MS,
    meaning: "Cap of the reconnect delay; at least SUBTOCALL_RECONNECT_INITIAL_BACKOFF.",
    secret: false,
    group: Group::Reconnect,
};

pub(crate) const MAX_CONNECT_FAILURES: Var = Var {
    name: "SUBTOCALL_MAX_CONNECT_FAILURES",
    old_names: &[],
    default: DefaultValue::Value("0"),
    accepts: "a whole number from 0 to 4294967295",
    meaning: "Consecutive failures to reach a working session after which subtocall exits \
              non-zero; 0 means retry forever. A failed connection attempt counts, and so does a \
              session that ends before discovery completed (a router that breaks the protocol \
              right after the join); a session that completed discovery resets the count.",
    secret: false,
    group: Group::Reconnect,
};

// ---- Discovery ----

pub(crate) const MARKER: Var = Var {
    name: "SUBTOCALL_MARKER",
    old_names: &[],
    default: DefaultValue::Value("SUB_"),
    accepts: "a prefix that is not empty and has no `.` and no spaces",
    meaning: "A registration whose last URI component starts with this prefix is a \
              shared-subscription registration; its topic is the URI without the prefix.",
    secret: false,
    group: Group::Discovery,
};

pub(crate) const GROUP_SEPARATOR: Var = Var {
    name: "SUBTOCALL_GROUP_SEPARATOR",
    old_names: &[],
    default: DefaultValue::Value("__"),
    accepts: "a string that is not empty and has no `.` and no spaces",
    meaning: "Separates a consumer group's name at the end of a registration's last URI \
              component: `com.example.SUB_status__audit` is the group `audit` of the topic \
              `com.example.status`, `com.example.SUB_status` its default group. Each group gets \
              every event once.",
    secret: false,
    group: Group::Discovery,
};

pub(crate) const BATCH_MARKER: Var = Var {
    name: "SUBTOCALL_BATCH_MARKER",
    old_names: &[],
    default: DefaultValue::Value("SUBBATCH_"),
    accepts: "a prefix that is not empty and has no `.` and no spaces, other than \
              SUBTOCALL_MARKER and not a prefix of it",
    meaning: "A registration whose last URI component starts with this prefix is served in \
              batches: `com.example.SUBBATCH_status` gets the events of `com.example.status` \
              many to a call, each positional argument one event (a dict with `args`, \
              `kwargs`, `topic` and `publication`). Groups apply as with SUBTOCALL_MARKER. \
              With USE_REDIS_MQ, events are pushed one by one.",
    secret: false,
    group: Group::Discovery,
};

pub(crate) const REGISTRATION_FILTER: Var = Var {
    name: "SUBTOCALL_REGISTRATION_FILTER",
    old_names: &[],
    default: DefaultValue::Unset,
    accepts: "a regular expression (Rust regex crate syntax)",
    meaning: "Only registrations whose URI matches this regex are served; unset serves all.",
    secret: false,
    group: Group::Discovery,
};

pub(crate) const GRACE_PERIOD: Var = Var {
    name: "SUBTOCALL_GRACE_PERIOD",
    old_names: &[],
    default: DefaultValue::Value("60s"),
    accepts: DURATION,
    meaning: "How long a group stays after the last callee of its registration left (it may \
              be days): its topic stays subscribed and its events wait for a callee, with no \
              call made and no retry budget spent, bounded by SUBTOCALL_QUEUE_CAPACITY (and \
              with the Redis queue kept in its streams, and the group kept in Redis for \
              instances that start meanwhile). 0 lets the group go at once.",
    secret: false,
    group: Group::Discovery,
};

// ---- Forwarding ----

pub(crate) const USE_REDIS_MQ: Var = Var {
    name: "USE_REDIS_MQ",
    old_names: &[],
    default: DefaultValue::Value("0"),
    accepts: "1, true, yes, on, 0, false, no or off (any case)",
    meaning: "Off: each event becomes one CALL to its SUB_ procedure. \
              On: each event is RPUSHed as JSON onto a Redis list per procedure.",
    secret: false,
    group: Group::Forwarding,
};

pub(crate) const CALL_TIMEOUT: Var = Var {
    name: "SUBTOCALL_CALL_TIMEOUT",
    old_names: &[],
    default: DefaultValue::Value("30s"),
    accepts: AT_LEAST_100MS,
    meaning: "Deadline of one forwarding attempt (a CALL, or an RPUSH in Redis mode).",
    secret: false,
    group: Group::Forwarding,
};

pub(crate) const DETAILS_KWARG: Var = Var {
    name: "SUBTOCALL_DETAILS_KWARG",
    old_names: &[],
    default: DefaultValue::Unset,
    accepts: "a keyword argument name (not empty)",
    meaning: "If set, forwarded calls get a kwarg of this name holding the event details: \
              topic, publication, publisher, publisher_authid, publisher_authrole.",
    secret: false,
    group: Group::Forwarding,
};

pub(crate) const ORDER_BY: Var = Var {
    name: "SUBTOCALL_ORDER_BY",
    old_names: &[],
    default: DefaultValue::Value("none"),
    accepts: "`none`, `topic`, `kwarg:NAME` or `arg:N` (N from 0)",
    meaning: "Per-key ordering: events of one procedure with the same key (the event's \
              concrete topic, the kwarg NAME, or the N-th positional argument) are delivered \
              one at a time, in the order received; the next is not called before the \
              previous one's RESULT or dead letter. Different keys go in parallel up to \
              SUBTOCALL_MAX_IN_FLIGHT. An event without the key is delivered unordered and \
              counted. With SUBTOCALL_QUEUE=redis the order holds across instances \
              (see SUBTOCALL_ORDER_PARTITIONS).",
    secret: false,
    group: Group::Forwarding,
};

pub(crate) const BATCH_MAX_EVENTS: Var = Var {
    name: "SUBTOCALL_BATCH_MAX_EVENTS",
    old_names: &[],
    default: DefaultValue::Value("100"),
    accepts: "a whole number from 1 to 100000",
    meaning: "The most events one batch call carries.",
    secret: false,
    group: Group::Forwarding,
};

pub(crate) const BATCH_MAX_BYTES: Var = Var {
    name: "SUBTOCALL_BATCH_MAX_BYTES",
    old_names: &[],
    default: DefaultValue::Value("1MiB"),
    accepts: "a size from 1KiB to 1GiB: a number of bytes, or a number with suffix KiB, MiB or GiB",
    meaning: "The most payload bytes (the events' arguments, topics and ids as received) one \
              batch call carries; an event larger than this goes alone. Keep it well below \
              SUBTOCALL_MAX_CALL_SIZE: a batch call larger than that is dead-lettered whole.",
    secret: false,
    group: Group::Forwarding,
};

pub(crate) const BATCH_IN_FLIGHT: Var = Var {
    name: "SUBTOCALL_BATCH_IN_FLIGHT",
    old_names: &[],
    default: DefaultValue::Value("2"),
    accepts: "a whole number from 1 to 1024",
    meaning: "Batch calls of one procedure in progress at once (outside \
              SUBTOCALL_MAX_IN_FLIGHT). While they run, events gather; the next call takes \
              what is waiting.",
    secret: false,
    group: Group::Forwarding,
};

pub(crate) const BATCH_LINGER: Var = Var {
    name: "SUBTOCALL_BATCH_LINGER",
    old_names: &[],
    default: DefaultValue::Value("0"),
    accepts: DURATION,
    meaning: "How long a batch call that is not full waits for more events before it goes; \
              0 sends what is waiting as soon as a call may start. A linger makes batches \
              larger at low rates, at the cost of that much latency.",
    secret: false,
    group: Group::Forwarding,
};

pub(crate) const MAX_IN_FLIGHT: Var = Var {
    name: "SUBTOCALL_MAX_IN_FLIGHT",
    old_names: &[],
    default: DefaultValue::Value("256"),
    accepts: "a whole number from 1 to 65536",
    meaning: "How many forwarding calls may be in progress at once.",
    secret: false,
    group: Group::Forwarding,
};

pub(crate) const POLICY_FILE: Var = Var {
    name: "SUBTOCALL_POLICY_FILE",
    old_names: &[],
    default: DefaultValue::Unset,
    accepts: "the path of a readable TOML file of [[policy]] rules",
    meaning: "Per-procedure delivery policies: rules, each a procedure pattern and settings; \
              the first rule whose pattern matches a registration's URI gives its settings, \
              these variables the rest (see \"Per-procedure policies\" below). Read at startup \
              and again on SIGHUP; a file that is not usable stops startup (exit 2), or on \
              SIGHUP keeps the rules in effect. Use the same file on every instance.",
    secret: false,
    group: Group::Forwarding,
};

pub(crate) const QUEUE_CAPACITY: Var = Var {
    name: "SUBTOCALL_QUEUE_CAPACITY",
    old_names: &[],
    default: DefaultValue::Value("10000"),
    accepts: "a whole number from 1 to 10000000",
    meaning: "How many events may wait for a free in-flight slot.",
    secret: false,
    group: Group::Forwarding,
};

pub(crate) const OVERFLOW: Var = Var {
    name: "SUBTOCALL_OVERFLOW",
    old_names: &[],
    default: DefaultValue::Value("drop-newest"),
    accepts: "drop-newest or drop-oldest",
    meaning: "Which event is dropped when the queue is full; the dropped event is dead-lettered.",
    secret: false,
    group: Group::Forwarding,
};

// ---- Retries and dead letters ----

pub(crate) const RETRY_MAX_ATTEMPTS: Var = Var {
    name: "SUBTOCALL_RETRY_MAX_ATTEMPTS",
    old_names: &[],
    default: DefaultValue::Value("50"),
    accepts: "a whole number from 1 to 1000000",
    meaning: "Attempts per event including the first; 1 means no retry.",
    secret: false,
    group: Group::Retry,
};

pub(crate) const RETRY_MAX_AGE: Var = Var {
    name: "SUBTOCALL_RETRY_MAX_AGE",
    old_names: &[],
    default: DefaultValue::Value("120s"),
    accepts: AT_LEAST_100MS,
    meaning: "An event older than this is not retried any more (counted from when it was \
              received, or from when its procedure got a callee back after waiting for one).",
    secret: false,
    group: Group::Retry,
};

pub(crate) const RETRY_INITIAL_BACKOFF: Var = Var {
    name: "SUBTOCALL_RETRY_INITIAL_BACKOFF",
    old_names: &[],
    default: DefaultValue::Value("100ms"),
    accepts: AT_LEAST_10MS,
    meaning: "Delay before the first retry; later delays grow exponentially with full jitter.",
    secret: false,
    group: Group::Retry,
};

pub(crate) const RETRY_MAX_BACKOFF: Var = Var {
    name: "SUBTOCALL_RETRY_MAX_BACKOFF",
    old_names: &[],
    default: DefaultValue::Value("5s"),
    accepts: AT_LEAST_10MS,
    meaning: "Cap of the retry delay; at least SUBTOCALL_RETRY_INITIAL_BACKOFF.",
    secret: false,
    group: Group::Retry,
};

pub(crate) const DEAD_LETTER_KEY: Var = Var {
    name: "SUBTOCALL_DEAD_LETTER_KEY",
    old_names: &[],
    default: DefaultValue::Unset,
    accepts: "a Redis key (not empty)",
    meaning: "If set, dead letters are also RPUSHed as JSON onto this Redis list (at REDIS_URL), \
              in either mode. They are always logged.",
    secret: false,
    group: Group::Retry,
};

// ---- The queue ----

pub(crate) const QUEUE: Var = Var {
    name: "SUBTOCALL_QUEUE",
    old_names: &[],
    default: DefaultValue::Value("memory"),
    accepts: "memory or redis",
    meaning: "Where accepted events wait until they are delivered. memory: in the process \
              (lost if it crashes; run one instance only). redis: in Redis Streams at REDIS_URL, \
              shared by every instance with the same SUBTOCALL_QUEUE_NAME; each event is \
              delivered by one of them, and an instance's crash or upgrade loses nothing.",
    secret: false,
    group: Group::Queue,
};

pub(crate) const QUEUE_NAME: Var = Var {
    name: "SUBTOCALL_QUEUE_NAME",
    old_names: &[],
    default: DefaultValue::Value("subtocall"),
    accepts: "letters, digits, '.', '_', '-' or ':' (not empty)",
    meaning: "With SUBTOCALL_QUEUE=redis: the namespace of every key and the consumer group's \
              name. Instances sharing the Redis and this name share the work.",
    secret: false,
    group: Group::Queue,
};

pub(crate) const CLAIM_IDLE: Var = Var {
    name: "SUBTOCALL_CLAIM_IDLE",
    old_names: &[],
    default: DefaultValue::Value("30s"),
    accepts: AT_LEAST_100MS,
    meaning: "With SUBTOCALL_QUEUE=redis: an event held this long by an instance that stopped \
              answering is taken over by another. Live instances refresh what they hold, so \
              long calls are not taken from them. Every instance of one queue must use the same \
              value.",
    secret: false,
    group: Group::Queue,
};

pub(crate) const ORDER_PARTITIONS: Var = Var {
    name: "SUBTOCALL_ORDER_PARTITIONS",
    old_names: &[],
    default: DefaultValue::Value("16"),
    accepts: "a whole number from 1 to 1024",
    meaning: "With SUBTOCALL_QUEUE=redis and SUBTOCALL_ORDER_BY: each procedure's keyed \
              events go to one of this many partition streams by key, and each partition is \
              delivered by one instance at a time, which holds a lease on it (renewed every \
              third of SUBTOCALL_CLAIM_IDLE; another instance takes the partition over when \
              it lapses or when its holder stops).",
    secret: false,
    group: Group::Queue,
};

pub(crate) const DEDUP_WINDOW: Var = Var {
    name: "SUBTOCALL_DEDUP_WINDOW",
    old_names: &[],
    default: DefaultValue::Value("5m"),
    accepts: "a duration of at least 1s such as 5m (a bare number means seconds)",
    meaning: "With SUBTOCALL_QUEUE=redis: how long an admitted event's publication id is \
              remembered, so that the other instances offering the same event are refused. \
              Costs one small Redis key per event for this long.",
    secret: false,
    group: Group::Queue,
};

pub(crate) const INSTANCE_ID: Var = Var {
    name: "SUBTOCALL_INSTANCE_ID",
    old_names: &[],
    default: DefaultValue::Depends("a new name at every start: host, process id and a random part"),
    accepts: "letters, digits, '.', '_', '-' or ':' (not empty)",
    meaning: "With SUBTOCALL_QUEUE=redis: this instance's name in the consumer group. A stable \
              name (a StatefulSet pod's, say) lets a restarted instance take up the entries it \
              held at once instead of after SUBTOCALL_CLAIM_IDLE; no two running instances may \
              share one.",
    secret: false,
    group: Group::Queue,
};

pub(crate) const QUEUE_MAX_BACKLOG: Var = Var {
    name: "SUBTOCALL_QUEUE_MAX_BACKLOG",
    old_names: &[],
    default: DefaultValue::Value("1000000"),
    accepts: "a whole number from 0 to 1000000000; 0 for no bound",
    meaning: "With SUBTOCALL_QUEUE=redis: entries one stream of a procedure (its plain stream, \
              or one of its partitions with ordering) may hold, waiting or being delivered; it \
              protects Redis while a group waits for a callee for a long grace period. At the \
              bound SUBTOCALL_OVERFLOW applies: drop-newest refuses the new event, drop-oldest \
              removes the stream's oldest entry no instance holds; either is dead-lettered with \
              reason `backlog`.",
    secret: false,
    group: Group::Queue,
};

pub(crate) const RETENTION: Var = Var {
    name: "SUBTOCALL_RETENTION",
    old_names: &[],
    default: DefaultValue::Value("0"),
    accepts: "a duration such as 1h or 7d (a bare number means seconds); 0 turns it off",
    meaning: "With SUBTOCALL_QUEUE=redis: every admitted event is also kept for this long in its \
              topic's retained stream ({QUEUE_NAME:topic:T}:retained, one copy per topic \
              whatever its groups), written in the admission step and trimmed by age, so that \
              `subtocall replay` can put it back and SUBTOCALL_NEW_GROUP_START=retained can give \
              it to a new group. Costs one script call per topic and admission batch.",
    secret: false,
    group: Group::Queue,
};

pub(crate) const RETENTION_MAX_EVENTS: Var = Var {
    name: "SUBTOCALL_RETENTION_MAX_EVENTS",
    old_names: &[],
    default: DefaultValue::Value("1000000"),
    accepts: "a whole number from 1 to 1000000000",
    meaning: "With SUBTOCALL_RETENTION: events a topic's retained stream keeps at most; the \
              oldest go first.",
    secret: false,
    group: Group::Queue,
};

pub(crate) const NEW_GROUP_START: Var = Var {
    name: "SUBTOCALL_NEW_GROUP_START",
    old_names: &[],
    default: DefaultValue::Value("now"),
    accepts: "now or retained",
    meaning: "With SUBTOCALL_RETENTION: where a group seen for the first time (not kept in Redis \
              yet) starts. now: with the events published from then on. retained: first with \
              the retained events of its topic, in order, then the live ones, none missing \
              between the two and none twice (exact registrations).",
    secret: false,
    group: Group::Queue,
};

pub(crate) const MAX_DELIVERIES: Var = Var {
    name: "SUBTOCALL_MAX_DELIVERIES",
    old_names: &[],
    default: DefaultValue::Value("5"),
    accepts: "a whole number from 1 to 1000",
    meaning: "With SUBTOCALL_QUEUE=redis: an entry handed out this many times (each takeover \
              after an instance died or froze counts) is dead-lettered with reason \
              max_deliveries instead of being delivered again, so that an event that kills \
              whoever delivers it cannot block its key or crash the instances forever.",
    secret: false,
    group: Group::Queue,
};

// ---- Redis ----

pub(crate) const REDIS_URL: Var = Var {
    name: "REDIS_URL",
    // Not aliases: together they make a URL, see `config::redis_url`.
    old_names: &[],
    default: DefaultValue::Value("redis://127.0.0.1:6379"),
    accepts: "a redis://, rediss:// or unix:// URL",
    meaning: "The Redis server, used in Redis mode and for SUBTOCALL_DEAD_LETTER_KEY. \
              A password in the URL is never printed. Old names: when REDIS_URL is unset, \
              REDIS_HOST (default 127.0.0.1) and REDIS_PORT (default 6379, 1-65535) \
              build redis://HOST:PORT.",
    secret: false,
    group: Group::Redis,
};

pub(crate) const REDIS_CLUSTER: Var = Var {
    name: "SUBTOCALL_REDIS_CLUSTER",
    old_names: &[],
    default: DefaultValue::Value("0"),
    accepts: "1, true, yes, on, 0, false, no or off (any case)",
    meaning: "On: REDIS_URL is one node of a Redis Cluster (the others are discovered). \
              The queue's keys are hash-tagged per procedure, so procedures spread over the masters.",
    secret: false,
    group: Group::Redis,
};

pub(crate) const REDIS_SENTINELS: Var = Var {
    name: "SUBTOCALL_REDIS_SENTINELS",
    old_names: &[],
    default: DefaultValue::Unset,
    accepts: "host:port[,host:port...] (IPv6 as [addr]:port)",
    meaning: "Redis Sentinel: the sentinels to ask for the master named by \
              SUBTOCALL_REDIS_SENTINEL_MASTER, for every Redis connection (the queue, \
              Redis mode, dead letters, /status, subtocall check and dead-letters). A \
              failover is followed: a connection that fails or finds a replica asks again. \
              The user, password and database come from REDIS_URL; its host and port are \
              ignored. Not with SUBTOCALL_REDIS_CLUSTER.",
    secret: false,
    group: Group::Redis,
};

pub(crate) const REDIS_SENTINEL_MASTER: Var = Var {
    name: "SUBTOCALL_REDIS_SENTINEL_MASTER",
    old_names: &[],
    default: DefaultValue::Unset,
    accepts: "the master's name in the sentinels' configuration (not empty)",
    meaning: "With SUBTOCALL_REDIS_SENTINELS (and required by it): the name the sentinels \
              monitor the master under (`sentinel monitor <name> ...`).",
    secret: false,
    group: Group::Redis,
};

pub(crate) const REDIS_SENTINEL_PASSWORD: Var = Var {
    name: "SUBTOCALL_REDIS_SENTINEL_PASSWORD",
    old_names: &[],
    default: DefaultValue::Unset,
    accepts: "any text",
    meaning: "With SUBTOCALL_REDIS_SENTINELS: the sentinels' own password \
              (`requirepass` in sentinel.conf), when they have one.",
    secret: true,
    group: Group::Redis,
};

pub(crate) const REDIS_WAIT_REPLICAS: Var = Var {
    name: "SUBTOCALL_REDIS_WAIT_REPLICAS",
    old_names: &[],
    default: DefaultValue::Value("0"),
    accepts: "a whole number from 0 to 16",
    meaning: "With SUBTOCALL_QUEUE=redis: after each admission batch (and dead-letter write, \
              and Redis mode push) ask Redis to WAIT until this many replicas have it, batched \
              per pipeline. Delivery does not wait for the answer; until the replicas confirm an \
              admitted event, this instance keeps a copy in memory and offers it again to the \
              master after a failover (bounded by SUBTOCALL_REDIS_WAIT_COPIES). 0 asks nothing: \
              an acknowledged but unreplicated write is lost with its master.",
    secret: false,
    group: Group::Redis,
};

pub(crate) const REDIS_WAIT_TIMEOUT: Var = Var {
    name: "SUBTOCALL_REDIS_WAIT_TIMEOUT",
    old_names: &[],
    default: DefaultValue::Value("100ms"),
    accepts: "a duration from 1ms to 10s such as 100ms",
    meaning: "With SUBTOCALL_REDIS_WAIT_REPLICAS: how long one WAIT waits for the replicas. \
              While fewer replicas than asked answer, WAIT is asked at most once a second and \
              the events stay unconfirmed. On a cluster WAIT holds the admission connection, \
              so keep it short.",
    secret: false,
    group: Group::Redis,
};

pub(crate) const REDIS_WAIT_COPIES: Var = Var {
    name: "SUBTOCALL_REDIS_WAIT_COPIES",
    old_names: &[],
    default: DefaultValue::Value("10000"),
    accepts: "a whole number from 1 to 10000000",
    meaning: "With SUBTOCALL_REDIS_WAIT_REPLICAS: how many unconfirmed admitted events this \
              instance keeps copies of. Past it the oldest copies are let go and counted \
              (subtocall_queue_unprotected_events_total): the events stay in Redis, only \
              unprotected against the master failing before its replicas have them. Copies \
              older than SUBTOCALL_DEDUP_WINDOW are let go too (offering them again could \
              admit them twice).",
    secret: false,
    group: Group::Redis,
};

pub(crate) const REDIS_PREFIX: Var = Var {
    name: "SUBTOCALL_REDIS_PREFIX",
    old_names: &[],
    default: DefaultValue::Value("queue:"),
    accepts: "any text, may be empty",
    meaning: "Key prefix of the per-procedure Redis lists: events for com.example.SUB_status \
              go to queue:com.example.SUB_status.",
    secret: false,
    group: Group::Redis,
};

pub(crate) const REDIS_TARGET: Var = Var {
    name: "SUBTOCALL_REDIS_TARGET",
    old_names: &[],
    default: DefaultValue::Value("list"),
    accepts: "list or stream",
    meaning: "With USE_REDIS_MQ: `list` RPUSHes each event's JSON envelope onto the list \
              <SUBTOCALL_REDIS_PREFIX><procedure>; `stream` XADDs it (field `event`) to the \
              stream of that name, which backends read with a consumer group and acknowledge \
              (examples/stream_consumer.py), bounded by SUBTOCALL_REDIS_MAX_BACKLOG.",
    secret: false,
    group: Group::Redis,
};

pub(crate) const REDIS_CONSUMER_GROUP: Var = Var {
    name: "SUBTOCALL_REDIS_CONSUMER_GROUP",
    old_names: &[],
    default: DefaultValue::Value("backends"),
    accepts: "a word (no spaces)",
    meaning: "With SUBTOCALL_REDIS_TARGET=stream: the consumer group subtocall creates on each \
              stream (from its first entry, with MKSTREAM) when it first pushes to it, so \
              that nothing is missed before the first backend reads. Backends may add groups \
              of their own; every group counts for the backlog.",
    secret: false,
    group: Group::Redis,
};

pub(crate) const REDIS_MAX_BACKLOG: Var = Var {
    name: "SUBTOCALL_REDIS_MAX_BACKLOG",
    old_names: &[],
    default: DefaultValue::Value("100000"),
    accepts: "a whole number from 1 to 1000000000",
    meaning: "With SUBTOCALL_REDIS_TARGET=stream: entries a stream may hold that some consumer \
              group has not acknowledged. subtocall trims only entries every group has \
              acknowledged. At the bound SUBTOCALL_OVERFLOW applies: drop-newest refuses the \
              new event, drop-oldest removes the oldest entry no group has been handed yet; \
              either is dead-lettered with reason `backlog`.",
    secret: false,
    group: Group::Redis,
};

// ---- Operations ----

pub(crate) const SHUTDOWN_TIMEOUT: Var = Var {
    name: "SUBTOCALL_SHUTDOWN_TIMEOUT",
    old_names: &[],
    default: DefaultValue::Value("10s"),
    accepts: AT_LEAST_100MS,
    meaning: "On SIGTERM or SIGINT: deadline to finish or dead-letter in-flight work.",
    secret: false,
    group: Group::Operations,
};

pub(crate) const HTTP_ADDR: Var = Var {
    name: "SUBTOCALL_HTTP_ADDR",
    old_names: &[],
    default: DefaultValue::Value("0.0.0.0:8910"),
    accepts: "an IP:port such as 0.0.0.0:8910 or [::]:8910, or off",
    meaning: "Listen address of /metrics, /healthz, /readyz and /status; off disables the listener.",
    secret: false,
    group: Group::Operations,
};

pub(crate) const METRICS_MAX_PROCEDURES: Var = Var {
    name: "SUBTOCALL_METRICS_MAX_PROCEDURES",
    old_names: &[],
    default: DefaultValue::Value("100"),
    accepts: "a whole number from 0 to 10000",
    meaning: "How many procedures get metrics of their own (the per-procedure metrics, \
              labelled by procedure and group); the events of further procedures are counted under \
              procedure=\"other\", and subtocall_metrics_procedures_other says how many \
              procedures that is. Bounds the metrics' cardinality.",
    secret: false,
    group: Group::Operations,
};

pub(crate) const LOG: Var = Var {
    name: "SUBTOCALL_LOG",
    old_names: &[],
    default: DefaultValue::Value("info"),
    accepts: "a log filter in RUST_LOG syntax such as info or info,subtocall=debug",
    meaning: "Which log lines are written. If unset, RUST_LOG is used; if that is unset too, info.",
    secret: false,
    group: Group::Operations,
};

pub(crate) const LOG_FORMAT: Var = Var {
    name: "SUBTOCALL_LOG_FORMAT",
    old_names: &[],
    default: DefaultValue::Value("text"),
    accepts: "text or json",
    meaning: "Log lines as human-readable text or as one JSON object per line.",
    secret: false,
    group: Group::Operations,
};

/// Every variable, in the order `--help` and the reference show them.
pub(crate) const VARS: &[&Var] = &[
    &WAMP_URL,
    &CROSSBAR_REALM,
    &BACKEND_USERNAME,
    &BACKEND_SECRET,
    &AUTH_METHOD,
    &SERIALIZER,
    &CONNECT_TIMEOUT,
    &PING_INTERVAL,
    &PING_TIMEOUT,
    &MAX_MESSAGE_SIZE,
    &MAX_CALL_SIZE,
    &CA_FILE,
    &RECONNECT_INITIAL_BACKOFF,
    &RECONNECT_MAX_BACKOFF,
    &MAX_CONNECT_FAILURES,
    &MARKER,
    &GROUP_SEPARATOR,
    &BATCH_MARKER,
    &REGISTRATION_FILTER,
    &GRACE_PERIOD,
    &USE_REDIS_MQ,
    &CALL_TIMEOUT,
    &DETAILS_KWARG,
    &ORDER_BY,
    &BATCH_MAX_EVENTS,
    &BATCH_MAX_BYTES,
    &BATCH_IN_FLIGHT,
    &BATCH_LINGER,
    &MAX_IN_FLIGHT,
    &POLICY_FILE,
    &QUEUE_CAPACITY,
    &OVERFLOW,
    &RETRY_MAX_ATTEMPTS,
    &RETRY_MAX_AGE,
    &RETRY_INITIAL_BACKOFF,
    &RETRY_MAX_BACKOFF,
    &DEAD_LETTER_KEY,
    &QUEUE,
    &QUEUE_NAME,
    &CLAIM_IDLE,
    &ORDER_PARTITIONS,
    &DEDUP_WINDOW,
    &QUEUE_MAX_BACKLOG,
    &RETENTION,
    &RETENTION_MAX_EVENTS,
    &NEW_GROUP_START,
    &INSTANCE_ID,
    &MAX_DELIVERIES,
    &REDIS_URL,
    &REDIS_CLUSTER,
    &REDIS_SENTINELS,
    &REDIS_SENTINEL_MASTER,
    &REDIS_SENTINEL_PASSWORD,
    &REDIS_WAIT_REPLICAS,
    &REDIS_WAIT_TIMEOUT,
    &REDIS_WAIT_COPIES,
    &REDIS_PREFIX,
    &REDIS_TARGET,
    &REDIS_CONSUMER_GROUP,
    &REDIS_MAX_BACKLOG,
    &SHUTDOWN_TIMEOUT,
    &HTTP_ADDR,
    &METRICS_MAX_PROCEDURES,
    &LOG,
    &LOG_FORMAT,
];

/// The prefix of every variable that is new in subtocall. Unknown names with
/// this prefix are reported as warnings (they are most likely typos).
pub(crate) const PREFIX: &str = "SUBTOCALL_";

/// Every name subtocall reads: the table's names, their old names, the
/// parts of the old Redis address and RUST_LOG.
pub(crate) fn known_names() -> impl Iterator<Item = &'static str> {
    VARS.iter()
        .flat_map(|var| std::iter::once(var.name).chain(var.old_names.iter().copied()))
        .chain([REDIS_HOST, REDIS_PORT, RUST_LOG])
}

/// Shown above the variables in `--help` and in the reference.
const INTRO: &str = "subtocall is configured only through environment variables. \
A bad value stops startup with exit code 2 and one line per problem, all problems at once. \
Durations are written like 30s, 500ms, 2m or \"1h 5m\" (a bare number means seconds) \
and may be at most 30 days. Names the Python SubToCall used (WAMP_URL, CROSSBAR_REALM or REALM, \
BACKEND_USERNAME, BACKEND_SECRET, USE_REDIS_MQ, REDIS_URL or REDIS_HOST/REDIS_PORT) mean \
what they meant there; everything new starts with SUBTOCALL_.";

/// What `subtocall --help` prints.
pub fn help_text() -> String {
    let mut out = String::new();
    out.push_str("subtocall: shared subscriptions for WAMP routers such as Crossbar.io\n\n");
    out.push_str(
        "Usage: subtocall [check | healthcheck | status | dead-letters list|redrive | --help | --version]\n\n",
    );
    out.push_str(
        "  (no command)  run the sidecar until SIGTERM/SIGINT, then drain and exit 0\n  \
         check         connect once with this configuration, list the SUB_\n                \
         registrations it would serve, check permissions (and Redis);\n                \
         exit 0 only if all is well\n  \
         healthcheck   ask a running sidecar's /healthz (for container health checks)\n  \
         status        what a running sidecar is doing (its /status), as tables\n  \
         dead-letters  list or redrive the Redis queue's dead letters\n\n\
         `subtocall COMMAND --help` shows one command's usage and exit codes.\n\n",
    );
    wrap_into(&mut out, INTRO, "", 79);
    for group in Group::ALL {
        out.push('\n');
        out.push_str(group.title());
        out.push_str(":\n");
        for var in VARS.iter().filter(|var| var.group == group) {
            out.push_str(&format!(
                "  {}  [default: {}]\n",
                var.name,
                var.default.text()
            ));
            let mut text = var.meaning.to_string();
            if !var.old_names.is_empty() {
                let label = if var.old_names.len() == 1 {
                    "Old name"
                } else {
                    "Old names"
                };
                text.push_str(&format!(" {label}: {}.", var.old_names.join(", ")));
            }
            if var.secret {
                text.push_str(" Never printed.");
            }
            text.push_str(&format!(" Accepts {}.", var.accepts));
            wrap_into(&mut out, &text, "      ", 79);
        }
    }
    out
}

/// The reference tables of `doc/configuration.md`, one per group; the file
/// holds this text between `<!-- BEGIN GENERATED -->` and `<!-- END GENERATED -->`.
pub fn markdown_reference() -> String {
    let mut out = String::new();
    for group in Group::ALL {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&format!("### {}\n\n", group.title()));
        out.push_str("| variable | default | accepts | meaning |\n");
        out.push_str("|---|---|---|---|\n");
        for var in VARS.iter().filter(|var| var.group == group) {
            let mut name = format!("`{}`", var.name);
            for old in var.old_names {
                name.push_str(&format!("<br>old name `{old}`"));
            }
            let default = match var.default {
                DefaultValue::Value(value) => format!("`{value}`"),
                other => other.text().to_string(),
            };
            let mut meaning = var.meaning.to_string();
            if var.secret {
                meaning.push_str(" **Secret: never printed.**");
            }
            out.push_str(&format!(
                "| {name} | {default} | {} | {} |\n",
                markdown_cell(var.accepts),
                markdown_cell(&meaning)
            ));
        }
    }
    out.push('\n');
    out.push_str(POLICY_INTRO);
    out.push_str("```toml\n");
    out.push_str(POLICY_EXAMPLE);
    out.push_str("```\n");
    out.push_str(POLICY_PATTERNS);
    out.push_str(&super::policy_keys::policy_markdown());
    out.push_str(POLICY_OUTRO);
    out
}

/// The policy file's part of the reference, around the table of its keys.
const POLICY_INTRO: &str = r#"### Per-procedure policies (`SUBTOCALL_POLICY_FILE`)

The variables above apply to every procedure. A policy file gives some
procedures settings of their own: a TOML file of `[[policy]]` rules, each a
`procedure` pattern and settings. For each registration, the **first** rule
whose pattern matches its URI (the group suffix included, e.g.
`com.example.SUB_orders__billing`) applies; the variables remain the
defaults of everything that rule does not set, and of procedures no rule
matches.

"#;

/// The policy file of the reference (and of the issue that asked for it);
/// a unit test reads it as the sidecar would.
pub(crate) const POLICY_EXAMPLE: &str = r#"[[policy]]
procedure = "com.example.SUB_orders*"
order_by = "kwarg:order_id"
call_timeout = "5m"
max_in_flight = 8          # this procedure's calls in flight at once

[[policy]]
procedure = "com.example.SUB_presence"
call_timeout = "1s"
retry_max_attempts = 1
"#;

/// After the example, before the keys' table.
const POLICY_PATTERNS: &str = r#"
Patterns: `*` matches any run of characters, dots included; every other
character stands for itself. There is no `?` and there are no character
classes (a pattern holding `?`, `[`, `]`, `{` or `}` is refused). A value is
a TOML string, or a whole number where the variable takes one (a bare number
of seconds for a duration). Each key accepts exactly what its variable
accepts, within the same bounds (one parser serves both):

"#;

const POLICY_OUTRO: &str = r#"
`max_in_flight` bounds the procedure's calls in flight under
`SUBTOCALL_MAX_IN_FLIGHT`, which still bounds all procedures together (a rule
may not set more). `max_deliveries` applies with `SUBTOCALL_QUEUE=redis`
only. Batch settings apply to batch procedures (`SUBBATCH_`).

**Errors.** At startup every problem of the file is reported at once, each as
`SUBTOCALL_POLICY_FILE: FILE:LINE: …`, and subtocall exits with code 2: TOML
that does not parse, an unknown key (with the nearest known one), a bad
value, a rule without `procedure`, a pattern that cannot match a
registration subtocall serves (e.g. its last component does not start with
`SUBTOCALL_MARKER` or `SUBTOCALL_BATCH_MARKER`), a pattern repeated (the
second could never apply), `retry_max_backoff` below `retry_initial_backoff`
once the rule is over the defaults. A rule that matches no registration is a
warning in the log once discovery has the registration list, and in
`subtocall check`.

**Reloading.** `kill -HUP` reads the file again. A usable file applies to the
events accepted from then on (each event keeps the policy it was accepted
under; with the Redis queue, to the entries handed out from then on); an
ordered procedure's events already waiting keep their order. A file that is
not usable changes nothing: the rules in effect stay, and the reason is in
the log, in `/status` (`policy_file.last_reload_error`) and counted
(`subtocall_policy_reload_failures_total`). With the Redis queue a reload
cannot order a procedure when the instance started with no ordering at all
(`SUBTOCALL_ORDER_BY=none` and no rule setting `order_by`): its streams have
no partitions, so that reload is refused; restart the instances instead. The
other variables are read only at start.

**Several instances.** Give every instance the same file: a procedure's
events are delivered by whichever instance reads them, under that instance's
rules. `/status` shows each instance's `policy_file.content_hash` (and
`subtocall status` prints it), so a difference is visible; `/status` also
gives each mapping's rule and settings in effect (`mappings[].policy`), and
`subtocall check` the rule and changed settings of each registration.
"#;

/// Table cells cannot hold a `|`.
pub(crate) fn markdown_cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// Appends `text` word-wrapped to `width` columns, each line starting with `indent`.
fn wrap_into(out: &mut String, text: &str, indent: &str, width: usize) {
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && indent.len() + line.len() + 1 + word.len() > width {
            out.push_str(indent);
            out.push_str(&line);
            out.push('\n');
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out.push_str(indent);
        out.push_str(&line);
        out.push('\n');
    }
}
