//! The Prometheus metrics subtocall exports, in one place so names stay
//! consistent (`subtocall_` prefix, low-cardinality labels). Updating a metric
//! is an atomic operation; `encode` renders the text format for `/metrics`.
//! May call only `prometheus_client`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::forward::GiveUp;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// A procedure (its group named apart), or `other` beyond the cap.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcedureLabel {
    pub procedure: String,
    pub group: String,
}

/// A procedure's dead letters by reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcedureReason {
    pub procedure: String,
    pub group: String,
    pub reason: &'static str,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// A Redis stream of the stream target.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    pub stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Version {
    version: &'static str,
}

/// Every metric, as handles that can be updated from anywhere.
pub struct Metrics {
    registry: Registry,
    /// EVENTs received on a forwarding subscription (before de-duplication).
    pub events_received: Counter,
    /// EVENTs skipped because the same publication was already accepted.
    pub events_duplicate: Counter,
    /// Delivered: the backend answered the CALL, or Redis took the RPUSH.
    pub events_forwarded: Counter,
    /// Delivery attempts scheduled again after a retryable failure.
    pub events_retried: Counter,
    /// Batch calls started (each carries one or more events).
    pub batch_calls: Counter,
    /// Stream target: entries of each stream not acknowledged by every
    /// consumer group, and the age of the oldest of them.
    pub stream_backlog: Family<StreamLabel, Gauge>,
    pub stream_oldest_unacked: Family<StreamLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Per procedure (at most SUBTOCALL_METRICS_MAX_PROCEDURES, the rest
    /// under `other`).
    pub procedure_received: Family<ProcedureLabel, Counter>,
    pub procedure_forwarded: Family<ProcedureLabel, Counter>,
    pub procedure_dead_lettered: Family<ProcedureReason, Counter>,
    pub procedure_in_flight: Family<ProcedureLabel, Gauge>,
    pub procedure_waiting: Family<ProcedureLabel, Gauge>,
    pub procedure_oldest_waiting: Family<ProcedureLabel, FloatGauge>,
    pub procedure_latency: Family<ProcedureLabel, Histogram>,
    /// Procedures counted under `other`.
    pub procedures_other: Gauge,
    dead_lettered: [Counter; 7],
    unroutable_unknown_subscription: Counter,
    unroutable_missing_topic: Counter,
    /// EVENTs over SUBTOCALL_MAX_MESSAGE_SIZE, refused before acceptance.
    pub events_refused_too_large: Counter,
    pub calls_in_flight: Gauge,
    pub queue_depth: Gauge,
    /// Seconds from receiving an event to its acknowledgement.
    pub forward_latency: Histogram,
    pub registrations_tracked: Gauge,
    pub subscriptions_active: Gauge,
    /// Consumer groups served, over every topic (the default group counts).
    pub groups: Gauge,
    /// SIGHUPs received (each answered in the log; the process goes on).
    pub reload_signals: Counter,
    pub policy_reloads: Counter,
    pub policy_reload_failures: Counter,
    /// Groups whose backends are away (within their grace period): their
    /// events wait.
    pub groups_waiting: Gauge,
    /// Events delivered unordered because they lacked the ordering key.
    pub events_unordered: Counter,
    /// Ordering keys whose head was dead-lettered while later events waited.
    pub order_released: Counter,
    pub router_connected: Gauge,
    pub router_reconnects: Counter,
    pub router_connect_failures: Counter,
    pub redis_pushes: Counter,
    pub redis_errors: Counter,
    pub dead_letters_stored: Counter,
    pub dead_letter_store_errors: Counter,
    /// 1 when joined, discovery complete, and not draining.
    pub ready: Gauge,
    /// Redis queue: events this instance put into a stream.
    pub queue_admitted: Counter,
    /// Redis queue: events offered that another instance had already admitted.
    pub queue_admitted_elsewhere: Counter,
    /// Redis queue: events this instance kept in a topic's retained stream.
    pub queue_retained: Counter,
    /// Redis queue: admitted events whose retained copy could not be written.
    pub queue_retention_failed: Counter,
    /// Redis queue: retained events a new group was given
    /// (`SUBTOCALL_NEW_GROUP_START=retained`), and backfills that failed.
    pub queue_backfilled: Counter,
    pub queue_backfills_failed: Counter,
    /// Redis queue: entries taken over from another consumer.
    pub queue_taken_over: Counter,
    /// Redis queue: entries left in the stream at shutdown, for the others.
    pub queue_released: Counter,
    /// Redis queue: entries that could not be read back as events.
    pub queue_malformed: Counter,
    /// Redis queue: entries taken back undelivered because they were no
    /// longer certainly this instance's (a pause, Redis out of reach).
    pub queue_fenced: Counter,
    /// Replica acknowledgement: the replicas asked for
    /// (`SUBTOCALL_REDIS_WAIT_REPLICAS`), and how many the last WAIT found.
    pub redis_wait_replicas: Gauge,
    pub redis_replicas_acknowledging: Gauge,
    /// Redis queue: admitted events this instance keeps a copy of until the
    /// replicas confirm them.
    pub queue_unconfirmed: Gauge,
    /// Redis queue: copies let go unconfirmed (past the bound, or older
    /// than the dedup window).
    pub queue_unprotected: Counter,
    /// Redis queue: copies offered again after a failover or a failed write.
    pub queue_reoffered: Counter,
    /// Dead letters and Redis mode pushes whose WAIT found fewer replicas
    /// than asked for.
    pub redis_writes_unconfirmed: Counter,
    /// 1 while Redis answers (Redis queue), else 0.
    pub redis_up: Gauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("subtocall");
        let r = &mut registry;

        registry_info(r);
        let events_received = counter(
            r,
            "events_received",
            "EVENTs received on forwarding subscriptions, once per consumer group reading the topic",
        );
        let events_duplicate = counter(
            r,
            "events_duplicate",
            "EVENTs skipped because their publication was already accepted (matched several subscriptions)",
        );
        let events_forwarded = counter(
            r,
            "events_forwarded",
            "Events delivered: acknowledged by a backend's RESULT or pushed to Redis",
        );
        let events_retried = counter(
            r,
            "events_retried",
            "Delivery attempts rescheduled after a retryable failure",
        );

        let batch_calls = counter(
            r,
            "batch_calls",
            "Batch calls started (to SUBBATCH_ procedures); events_forwarded counts their events",
        );

        let stream_backlog = Family::<StreamLabel, Gauge>::default();
        r.register(
            "stream_backlog",
            "SUBTOCALL_REDIS_TARGET=stream: entries of the stream some consumer group has not acknowledged (as of the last push or the last check, every 5 s)",
            stream_backlog.clone(),
        );
        let stream_oldest_unacked =
            Family::<StreamLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        r.register(
            "stream_oldest_unacked_seconds",
            "SUBTOCALL_REDIS_TARGET=stream: age of the stream's oldest entry some consumer group has not acknowledged (0 when there is none)",
            stream_oldest_unacked.clone(),
        );

        let procedure_received = Family::<ProcedureLabel, Counter>::default();
        r.register(
            "procedure_events_received",
            "EVENTs accepted for each procedure, after de-duplication: each is forwarded, dead-lettered or still on its way",
            procedure_received.clone(),
        );
        let procedure_forwarded = Family::<ProcedureLabel, Counter>::default();
        r.register(
            "procedure_events_forwarded",
            "Events delivered to each procedure",
            procedure_forwarded.clone(),
        );
        let procedure_dead_lettered = Family::<ProcedureReason, Counter>::default();
        r.register(
            "procedure_events_dead_lettered",
            "Events of each procedure dead-lettered, by reason",
            procedure_dead_lettered.clone(),
        );
        let procedure_in_flight = Family::<ProcedureLabel, Gauge>::default();
        r.register(
            "procedure_in_flight",
            "Events of each procedure being delivered (as of the last refresh, every second)",
            procedure_in_flight.clone(),
        );
        let procedure_waiting = Family::<ProcedureLabel, Gauge>::default();
        r.register(
            "procedure_waiting",
            "Events of each procedure waiting for a delivery attempt (as of the last refresh)",
            procedure_waiting.clone(),
        );
        let procedure_oldest_waiting = Family::<ProcedureLabel, FloatGauge>::default();
        r.register(
            "procedure_oldest_waiting_seconds",
            "How long the oldest waiting event of each procedure has waited since it was received (0 when none waits)",
            procedure_oldest_waiting.clone(),
        );
        let procedure_latency = Family::<ProcedureLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0005, 2.0, 16))) as fn() -> Histogram,
        );
        r.register(
            "procedure_forward_latency_seconds",
            "Receipt to acknowledgement of each procedure's delivered events",
            procedure_latency.clone(),
        );
        let procedures_other = gauge(
            r,
            "metrics_procedures_other",
            "Procedures beyond SUBTOCALL_METRICS_MAX_PROCEDURES, whose events the procedure metrics count under procedure=\"other\"",
        );

        let dead_lettered_family = Family::<Reason, Counter>::default();
        r.register(
            "events_dead_lettered",
            "Events given up and dead-lettered, by reason (overflow, rejected, exhausted, shutdown, too_large, backlog)",
            dead_lettered_family.clone(),
        );
        let dead_lettered = GiveUp::ALL.map(|g| {
            dead_lettered_family
                .get_or_create(&Reason { reason: g.as_str() })
                .clone()
        });

        let unroutable = Family::<Reason, Counter>::default();
        r.register(
            "events_unroutable",
            "EVENTs that could not be mapped to a procedure, by reason",
            unroutable.clone(),
        );
        let unroutable_unknown_subscription = unroutable
            .get_or_create(&Reason {
                reason: "unknown_subscription",
            })
            .clone();
        let unroutable_missing_topic = unroutable
            .get_or_create(&Reason {
                reason: "missing_topic",
            })
            .clone();

        let refused = Family::<Reason, Counter>::default();
        r.register(
            "events_refused",
            "EVENTs refused before acceptance, by reason (too_large: over SUBTOCALL_MAX_MESSAGE_SIZE)",
            refused.clone(),
        );
        let events_refused_too_large = refused
            .get_or_create(&Reason {
                reason: "too_large",
            })
            .clone();

        let calls_in_flight = gauge(
            r,
            "calls_in_flight",
            "Deliveries in flight (CALLs, or events in a Redis pipeline)",
        );
        let queue_depth = gauge(
            r,
            "queue_depth",
            "Events waiting for a delivery attempt (first attempt or retry)",
        );
        let forward_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        r.register(
            "forward_latency_seconds",
            "Time from receiving an event to its acknowledgement",
            forward_latency.clone(),
        );
        let registrations_tracked = gauge(
            r,
            "registrations_tracked",
            "SUB_ registrations being served",
        );
        let subscriptions_active = gauge(
            r,
            "subscriptions_active",
            "Topic subscriptions held at the router",
        );
        let events_unordered = counter(
            r,
            "events_unordered",
            "Events without their SUBTOCALL_ORDER_BY key, delivered unordered",
        );
        let order_released = counter(
            r,
            "order_released",
            "Ordering keys released by a dead letter: the next event of the key went ahead without it",
        );
        let groups = gauge(
            r,
            "groups",
            "Consumer groups served, over every topic (a topic's default group counts as one)",
        );
        let groups_waiting = gauge(
            r,
            "groups_waiting_for_callee",
            "Groups whose backends are all away, within their grace period: their events wait, no call is made",
        );
        let router_connected = gauge(
            r,
            "router_connected",
            "1 while a WAMP session with the router is established",
        );
        let reload_signals = counter(
            r,
            "reload_signals",
            "SIGHUPs received: each reloads SUBTOCALL_POLICY_FILE when one is set (the variables are read only at start)",
        );
        let policy_reloads = counter(
            r,
            "policy_reloads",
            "Reloads of SUBTOCALL_POLICY_FILE that applied (new events follow the new rules)",
        );
        let policy_reload_failures = counter(
            r,
            "policy_reload_failures",
            "Reloads of SUBTOCALL_POLICY_FILE refused (unreadable or bad file): the rules in effect stay; /status says why",
        );
        let router_reconnects = counter(
            r,
            "router_reconnects",
            "WAMP sessions established after the first",
        );
        let router_connect_failures = counter(
            r,
            "router_connect_failures",
            "Failed attempts to connect and join",
        );
        let redis_pushes = counter(r, "redis_pushes", "Event envelopes pushed to Redis lists");
        let redis_errors = counter(
            r,
            "redis_errors",
            "Failed Redis pipelines (retried) and commands (final)",
        );
        let dead_letters_stored = counter(
            r,
            "dead_letters_stored",
            "Dead letters pushed to the dead-letter Redis list",
        );
        let dead_letter_store_errors = counter(
            r,
            "dead_letter_store_errors",
            "Dead letters that could not be pushed to Redis (they were logged)",
        );
        let ready = gauge(
            r,
            "ready",
            "1 when joined, discovery is complete and not draining",
        );

        let queue_admitted = counter(
            r,
            "queue_admitted",
            "Events this instance put into the Redis queue (SUBTOCALL_QUEUE=redis)",
        );
        let queue_admitted_elsewhere = counter(
            r,
            "queue_admitted_elsewhere",
            "Events offered to the Redis queue that another instance had already admitted",
        );
        let queue_retained = counter(
            r,
            "queue_retained",
            "Events this instance kept in their topic's retained stream (SUBTOCALL_RETENTION)",
        );
        let queue_retention_failed = counter(
            r,
            "queue_retention_failed",
            "Admitted events whose copy could not be kept in their topic's retained stream (delivered all the same; replay will not have them)",
        );
        let queue_backfilled = counter(
            r,
            "queue_backfilled",
            "Retained events this instance admitted for a new group (SUBTOCALL_NEW_GROUP_START=retained)",
        );
        let queue_backfills_failed = counter(
            r,
            "queue_backfills_failed",
            "New groups that could not be given their topic's retained events (said in the log; their live events go on)",
        );
        let queue_taken_over = counter(
            r,
            "queue_taken_over",
            "Queue entries taken over from an instance that stopped answering",
        );
        let queue_released = counter(
            r,
            "queue_released",
            "Queue entries left to the other instances at shutdown",
        );
        let queue_malformed = counter(
            r,
            "queue_malformed",
            "Queue entries that were not events (moved to the dead-letter stream)",
        );
        let queue_fenced = counter(
            r,
            "queue_fenced",
            "Queue entries not delivered because they were no longer certainly this instance's \
             (not refreshed in time, or taken over): left in Redis for whoever holds them",
        );
        let redis_up = gauge(
            r,
            "redis_up",
            "1 while the Redis queue answers (SUBTOCALL_QUEUE=redis), else 0",
        );

        let redis_wait_replicas = gauge(
            r,
            "redis_wait_replicas",
            "Replicas each write is asked to reach (SUBTOCALL_REDIS_WAIT_REPLICAS)",
        );
        let redis_replicas_acknowledging = gauge(
            r,
            "redis_replicas_acknowledging",
            "Replicas that acknowledged the last WAIT (the fewest over a cluster's masters); -1 before the first",
        );
        let queue_unconfirmed = gauge(
            r,
            "queue_unconfirmed_events",
            "Admitted events not yet confirmed by the replicas, of which this instance keeps a copy",
        );
        let queue_unprotected = counter(
            r,
            "queue_unprotected_events",
            "Unconfirmed copies let go (past SUBTOCALL_REDIS_WAIT_COPIES or the dedup window): \
             the events stay in Redis, unprotected against a master failover",
        );
        let queue_reoffered = counter(
            r,
            "queue_reoffered_events",
            "Unconfirmed copies offered again to the master after a failover or a failed write",
        );
        let redis_writes_unconfirmed = counter(
            r,
            "redis_writes_unconfirmed",
            "Dead-letter writes and Redis mode pushes whose WAIT found fewer replicas than asked for",
        );
        Metrics {
            registry,
            redis_wait_replicas,
            redis_replicas_acknowledging,
            queue_unconfirmed,
            queue_unprotected,
            queue_reoffered,
            redis_writes_unconfirmed,
            queue_admitted,
            queue_admitted_elsewhere,
            queue_retained,
            queue_retention_failed,
            queue_backfilled,
            queue_backfills_failed,
            queue_taken_over,
            queue_released,
            queue_malformed,
            queue_fenced,
            redis_up,
            events_received,
            events_duplicate,
            events_forwarded,
            events_retried,
            batch_calls,
            stream_backlog,
            stream_oldest_unacked,
            procedure_received,
            procedure_forwarded,
            procedure_dead_lettered,
            procedure_in_flight,
            procedure_waiting,
            procedure_oldest_waiting,
            procedure_latency,
            procedures_other,
            dead_lettered,
            unroutable_unknown_subscription,
            unroutable_missing_topic,
            events_refused_too_large,
            calls_in_flight,
            queue_depth,
            forward_latency,
            registrations_tracked,
            subscriptions_active,
            groups,
            groups_waiting,
            reload_signals,
            policy_reloads,
            policy_reload_failures,
            events_unordered,
            order_released,
            router_connected,
            router_reconnects,
            router_connect_failures,
            redis_pushes,
            redis_errors,
            dead_letters_stored,
            dead_letter_store_errors,
            ready,
        }
    }

    pub fn dead_lettered(&self, why: GiveUp) -> &Counter {
        let at = GiveUp::ALL.iter().position(|g| *g == why).unwrap_or(0);
        &self.dead_lettered[at]
    }

    pub fn unroutable(&self, missing_topic: bool) -> &Counter {
        if missing_topic {
            &self.unroutable_missing_topic
        } else {
            &self.unroutable_unknown_subscription
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

fn counter(r: &mut Registry, name: &str, help: &str) -> Counter {
    let c = Counter::default();
    r.register(name, help, c.clone());
    c
}

fn gauge(r: &mut Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::default();
    r.register(name, help, g.clone());
    g
}

fn registry_info(r: &mut Registry) {
    r.register(
        "build",
        "subtocall version",
        Info::new(Version {
            version: env!("CARGO_PKG_VERSION"),
        }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_prefixed_names_and_reason_labels() {
        let m = Metrics::new();
        m.events_received.inc();
        m.dead_lettered(GiveUp::Exhausted).inc_by(2);
        m.forward_latency.observe(0.002);
        let text = m.encode();
        assert!(text.contains("subtocall_events_received_total 1"), "{text}");
        assert!(
            text.contains(r#"subtocall_events_dead_lettered_total{reason="exhausted"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"subtocall_events_dead_lettered_total{reason="overflow"} 0"#),
            "every reason is exported from the start, so rates work: {text}"
        );
        assert!(
            text.contains("subtocall_forward_latency_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("subtocall_build_info{version="), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
