//! The wiring: builds the sidecar's stages, sinks and Redis connections
//! from the configuration, and what `/status` shows that is fixed at
//! startup. Runs once, before the loop.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::fatal::Fatal;
use super::redis_queue::{QueueIo, RedisQueue};
use super::sidecar::Sidecar;
use super::token::Token;
use super::view::Shown;
use crate::config::{self, Config};
use crate::discovery::Discovery;
use crate::forward::retry::{Backoff, RetryPolicy};
use crate::forward::{Dispatch, EventCore, Forwarder, MemoryQueue, OverflowPolicy, Settings};
use crate::metrics::Metrics;
use crate::sink::Sink;
use crate::sink::redis::{self as redis_sink, RedisSink};
use crate::sink::stream::StreamSink;
use crate::sink::wamp::WampSink;
use crate::status::{QueueProbe, RedisProbe, TargetProbe};
use crate::streams::admit::{self, AdmitSink};
use crate::streams::carrier::Carrier;
use crate::streams::core::{self as queue_core, QueueCore};
use crate::streams::retain::Retention;
use crate::streams::{Keys, Target};
use crate::wamp::ClientConfig;
use crate::wamp::Serializer;
use crate::wamp::auth::Credentials;

/// What the loop is built from.
pub struct Parts {
    pub sidecar: Sidecar,
    pub client_config: ClientConfig,
    /// The Redis queue's IO, when there is one.
    pub streams: Option<QueueIo>,
    pub shown: Shown,
    /// The task writing dead letters to Redis, when one is configured.
    pub dead_letter_task: Option<JoinHandle<()>>,
    /// With the Redis queue: where the groups are kept for every instance.
    pub kept: Option<(crate::streams::Shared, Keys)>,
}

/// Builds the sidecar and what the loop needs beside it.
pub fn build(config: &Config, metrics: &Arc<Metrics>) -> Result<Parts, Fatal> {
    let marker = config
        .discovery
        .marker()
        .map_err(|e| Fatal::Setup(e.to_string()))?;
    let discovery = Discovery::new(
        marker,
        config.discovery.filter.clone(),
        config.discovery.grace_period,
    );
    if let Some(source) = config.policies.source() {
        tracing::info!(
            path = %source.path.display(),
            rules = config.policies.rules().len(),
            hash = %source.hash,
            "policy file loaded"
        );
    }
    let f = &config.forward;
    let needs_redis = f.mode == config::Mode::Redis || config.redis.dead_letter_key.is_some();
    let stream_target = config.redis.target == config::RedisTarget::Stream;
    if let Some(sentinel) = &config.redis.sentinel {
        tracing::info!(
            master = %sentinel.master,
            sentinels = sentinel.sentinels.len(),
            "asking the sentinels where the Redis master is (REDIS_URL gives only the login and database)"
        );
    }
    let redis = if needs_redis {
        // Redis mode and dead letters talk to one server (or the master the
        // sentinels name), never to a cluster.
        let target = Target::from_config(&config.redis, false)
            .map_err(|e| Fatal::Setup(format!("Redis: {e}")))?;
        Some(
            RedisSink::new(&target, &config.redis.prefix)
                .map_err(|e| Fatal::Setup(format!("Redis: {e}")))?
                .with_wait(&config.redis.wait, metrics.clone()),
        )
    } else {
        None
    };
    let sink: Box<dyn Sink<Token> + Send> = match (&f.mode, &redis) {
        (config::Mode::Redis, Some(redis)) if stream_target => {
            let sink = StreamSink::new(
                redis.clone(),
                &config.redis.consumer_group,
                config.redis.max_backlog,
                f.overflow == config::Overflow::DropOldest,
                metrics.clone(),
            );
            tokio::spawn(sink.clone().watch());
            Box::new(sink)
        }
        (config::Mode::Redis, Some(redis)) => Box::new(redis.clone()),
        _ => Box::new(WampSink {
            call_timeout: f.call_timeout,
            details_kwarg: f.details_kwarg.as_deref().map(Arc::from),
        }),
    };
    let settings = Settings {
        capacity: f.queue_capacity,
        overflow: match f.overflow {
            config::Overflow::DropNewest => OverflowPolicy::DropNewest,
            config::Overflow::DropOldest => OverflowPolicy::DropOldest,
        },
        max_in_flight: f.max_in_flight,
        dispatch: sink.dispatch(),
        retry: RetryPolicy {
            max_attempts: f.retry.max_attempts,
            max_age: f.retry.max_age,
            backoff: Backoff {
                initial: f.retry.initial_backoff,
                max: f.retry.max_backoff,
            },
        },
        batching: f.batching,
    };
    let targets = match (&f.mode, &redis) {
        (config::Mode::Redis, Some(redis)) => Some(TargetProbe {
            redis: redis.clone(),
            stream: stream_target,
            metrics: metrics.clone(),
        }),
        _ => None,
    };
    let (dead_letter_tx, dead_letter_task) = match (&config.redis.dead_letter_key, redis) {
        (Some(key), Some(redis)) => {
            let (tx, rx) = mpsc::channel(4096);
            let task = tokio::spawn(redis_sink::store_dead_letters(
                redis,
                key.clone(),
                rx,
                metrics.clone(),
            ));
            (Some(tx), Some(task))
        }
        _ => (None, None),
    };
    let client_config = client_config(config);
    let now = std::time::Instant::now();
    let new_sidecar = |core, sink| {
        Sidecar::new(
            discovery,
            core,
            sink,
            metrics.clone(),
            dead_letter_tx,
            client_config.request_timeout,
            now,
        )
        .with_procedure_metrics(config.metrics_max_procedures)
        .with_policies(super::policies::PolicyState::new(
            config.policies.clone(),
            config.policy_context(),
            (config.queue.kind == config::QueueKind::Redis).then(|| config.orders_any()),
        ))
    };
    let mut kept = None;
    let (sidecar, streams) = match config.queue.kind {
        config::QueueKind::Memory => {
            let core = Forwarder::new(MemoryQueue::new(), settings, rand::random());
            let sidecar = new_sidecar(core, sink).with_intake(f.order_by.clone(), None);
            (sidecar, None)
        }
        config::QueueKind::Redis => {
            let (admit, queue, deliver, io) =
                start_streams(config, settings, &*sink, metrics, now)?;
            let admit_settings = Settings {
                max_in_flight: admit::BATCH,
                dispatch: Dispatch::Pipeline { max: admit::BATCH },
                // Events wait for Redis as long as there is room for them.
                retry: RetryPolicy {
                    max_attempts: u32::MAX,
                    max_age: Duration::MAX,
                    backoff: Backoff {
                        initial: Duration::from_millis(100),
                        max: Duration::from_secs(2),
                    },
                },
                ..settings
            };
            let core = Forwarder::new(MemoryQueue::new(), admit_settings, rand::random());
            kept = Some((io.probe.shared.clone(), Keys::new(&config.queue.name)));
            let mut sidecar = new_sidecar(core, Box::new(admit))
                .with_intake(f.order_by.clone(), partitions(config))
                .with_queue(queue, deliver, sink, now);
            if config.queue.new_group_start == config::GroupStart::Retained {
                sidecar = sidecar.with_new_groups_from_retained(f.queue_capacity);
            }
            (sidecar, Some(io))
        }
    };
    let queue_probe = streams.as_ref().map(|s: &QueueIo| s.probe.clone());
    let shown = Shown {
        started: std::time::Instant::now(),
        url: config.wamp.url.to_string(),
        realm: config.wamp.realm.clone(),
        settings: config.settings().to_vec(),
        delivery: match (&f.mode, stream_target) {
            (config::Mode::Wamp, _) => "wamp",
            (config::Mode::Redis, false) => "redis-list",
            (config::Mode::Redis, true) => "redis-stream",
        },
        queue_kind: match config.queue.kind {
            config::QueueKind::Memory => "memory",
            config::QueueKind::Redis => "redis",
        },
        capacity: f.queue_capacity,
        max_in_flight: f.max_in_flight,
        queue_name: queue_probe.as_ref().map(|_| config.queue.name.clone()),
        consumer: queue_probe.as_ref().map(|q| q.consumer.clone()),
        probe: (queue_probe.is_some() || targets.is_some()).then(|| RedisProbe {
            queue: queue_probe,
            targets,
        }),
    };
    Ok(Parts {
        sidecar,
        client_config,
        streams,
        shown,
        dead_letter_task,
        kept,
    })
}

/// The Redis queue: the admission sink, the queue between the stages (its
/// core and carrier), the delivering stage's core (it delivers through
/// `sink`, the real destination), and the IO the loop awaits.
fn start_streams(
    config: &Config,
    settings: Settings,
    sink: &(dyn Sink<Token> + Send),
    metrics: &Arc<Metrics>,
    now: std::time::Instant,
) -> Result<(AdmitSink, RedisQueue, EventCore, QueueIo), Fatal> {
    let q = &config.queue;
    let target = Target::from_config(&config.redis, true)
        .map_err(|e| Fatal::Setup(format!("Redis: {e}")))?;
    let shared = target
        .shared()
        .map_err(|e| Fatal::Setup(format!("Redis: {e}")))?;
    let keys = Arc::new(Keys::new(&q.name));
    let consumer = match &q.instance_id {
        Some(id) => id.clone(),
        None => consumer_name(),
    };
    let probe = QueueProbe {
        shared: shared.clone(),
        keys: keys.clone(),
        consumer: consumer.clone(),
        partitions: partitions(config),
    };
    tracing::info!(queue = %q.name, %consumer, cluster = config.redis.cluster, "using the Redis queue");
    // The window: entries held here (waiting or in flight) at most, over
    // every stream: what may be in flight, plus what one read brings.
    let read_max = match sink.dispatch() {
        Dispatch::Each => settings
            .max_in_flight
            .max(settings.batching.max_events)
            .clamp(16, 512),
        Dispatch::Pipeline { max } => max,
    };
    let window = settings.max_in_flight + read_max;
    let carrier = Carrier::new(
        target.clone(),
        shared.clone(),
        keys.clone(),
        &consumer,
        q.dedup_window,
        q.claim_idle,
    )
    .with_wait(&config.redis.wait, metrics.clone());
    let queue = QueueCore::new(
        queue_core::Settings {
            window,
            read_max,
            claim_idle: q.claim_idle,
            partitions: partitions(config),
            max_deliveries: q.max_deliveries,
        },
        now,
    );
    // WAIT holds the connection it is sent on and counts only its writes:
    // with replica acknowledgement, admission writes on a connection of its own.
    let admitting = if config.redis.wait.replicas > 0 {
        target
            .shared()
            .map_err(|e| Fatal::Setup(format!("Redis: {e}")))?
    } else {
        shared
    };
    let admit = AdmitSink::new(
        admitting,
        keys,
        &consumer,
        carrier.holder(),
        q.dedup_window,
        metrics.clone(),
    )
    .with_replicas(
        config.redis.wait,
        q.dedup_window,
        // WAIT's own connection, except on a cluster (where a write of its
        // own would reach one master only).
        match config.redis.wait.replicas > 0 && !target.is_cluster() {
            true => Some(
                target
                    .shared()
                    .map_err(|e| Fatal::Setup(format!("Redis: {e}")))?,
            ),
            false => None,
        },
    );
    let admit = admit.with_bound(
        q.max_backlog,
        config.forward.overflow == config::Overflow::DropOldest,
    );
    let admit = if q.retention.is_zero() {
        admit
    } else {
        tracing::info!(retention = ?q.retention, max_events = q.retention_max_events, "retaining every admitted event per topic");
        admit.with_retention(
            Retention::new(
                Arc::new(Keys::new(&q.name)),
                q.retention,
                q.retention_max_events,
            ),
            target.is_cluster(),
        )
    };
    let deliver = Settings {
        // Never reached: the queue core holds no more than the window.
        capacity: 2 * window,
        ..settings
    };
    let core = Forwarder::new(MemoryQueue::new(), deliver, rand::random());
    let queue = RedisQueue::new(queue, carrier, admit.clone());
    let io = QueueIo::new(probe);
    Ok((admit, queue, core, io))
}

/// Partitions per procedure for keyed events: with per-key ordering on the
/// Redis queue.
fn partitions(config: &Config) -> Option<u16> {
    config.orders_any().then_some(config.queue.partitions)
}

/// This process's consumer name in the group: host, pid and a random part,
/// so that a restarted instance is a new consumer.
fn consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "subtocall".to_owned());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// The WAMP client settings derived from the configuration.
pub fn client_config(config: &Config) -> ClientConfig {
    let w = &config.wamp;
    let mut c = ClientConfig::new(w.url.as_str(), &w.realm);
    c.credentials = match &w.auth {
        config::Auth::Anonymous => Credentials::Anonymous,
        config::Auth::WampCra { authid, secret } => Credentials::WampCra {
            authid: authid.clone(),
            secret: secret.expose().to_owned(),
        },
        config::Auth::Ticket { authid, ticket } => Credentials::Ticket {
            authid: authid.clone(),
            ticket: ticket.expose().to_owned(),
        },
    };
    c.serializers = match w.serializer {
        config::Serializer::MsgPack => vec![Serializer::MsgPack, Serializer::Json],
        config::Serializer::Json => vec![Serializer::Json, Serializer::MsgPack],
    };
    c.connect_timeout = w.connect_timeout;
    c.ping_interval = w.ping_interval;
    c.ping_timeout = w.ping_timeout;
    c.max_message_size = w.max_message_size;
    c.max_call_size = w.max_call_size;
    c.ca_file = w.ca_file.clone();
    // EVENT payloads are kept as received: forwarded undecoded in a CALL,
    // or decoded once when the event is accepted (Redis envelope, details
    // kwarg).
    c.raw_event_payloads = true;
    c
}
