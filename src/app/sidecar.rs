//! The sidecar's state and everything it does that needs no waiting:
//! discovery (registrations -> subscriptions), routing and de-duplicating
//! EVENTs, the forwarding core, starting deliveries through the sink, dead
//! letters, metrics and readiness. Synchronous: the event loop (`super`)
//! feeds it the session's outputs in the order the router caused them and
//! the sink's reports, and gives it the session to make requests on. That
//! order is what makes an EVENT that follows its SUBSCRIBED routable.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::Fatal;
use super::dead_letter_log::{DeadLetterLog, LINES_PER_WINDOW, Summary};
use super::procedure_metrics::{Counts, Live, ProcedureMetrics};
use super::queue_stage::{self, QueueStage};
use crate::config::OrderBy;
use crate::discovery::meta;
use crate::discovery::topic::MatchPolicy;
use crate::discovery::{self, Action, Destination, Discovery, GetOutcome, Note, TopicKey};
pub use crate::forward::EventCore as Core;
use crate::forward::dedup::{DEFAULT_CAPACITY, Dedup};
use crate::forward::envelope::SharedEvent;
use crate::forward::key::{KeyOf, OrderKey};
use crate::forward::{Batched, DeliveryId, Failure, GiveUp, Job, Output};
use crate::metrics::Metrics;
use crate::sink::{Report, Sink, Started};
use crate::status;
use crate::streams::admit::Admitted;
use crate::streams::carrier::Fields;
use crate::streams::core::{
    CommandId, Handed, Key, Note as QueueNote, Output as QueueOutput, Reply,
};
use crate::wamp::connection::Refused;
use crate::wamp::id::IdHashing;
use crate::wamp::session::{Output as SessionOutput, Session, Success};
use crate::wamp::{
    Dict, Event, Payload, PublicationId, RawEvent, RegistrationId, RequestError, SubscriptionId,
    Value,
};

/// `SUBTOCALL_METRICS_MAX_PROCEDURES` unless configured.
const DEFAULT_METRICS_MAX_PROCEDURES: usize = 100;

/// What a session request was for; its reply comes back with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    MetaSubscribe(&'static str),
    List,
    Get(RegistrationId),
    Subscribe(TopicKey),
    Unsubscribe(SubscriptionId),
    Deliver(DeliveryId),
    /// `wamp.registration.count_callees`, for `/status`.
    CountCallees(RegistrationId),
}

impl From<DeliveryId> for Token {
    fn from(id: DeliveryId) -> Token {
        Token::Deliver(id)
    }
}

/// A delivery whose outcome a future will report (Redis pushes).
pub type PendingReport = BoxFuture<'static, (DeliveryId, Report)>;

pub struct Sidecar {
    discovery: Discovery,
    dedup: Dedup,
    core: Core,
    sink: Box<dyn Sink<Token> + Send>,
    metrics: Arc<Metrics>,
    /// Dead-letter records for the Redis store task, if one is configured.
    dead_letter_store: Option<mpsc::Sender<Vec<u8>>>,
    /// Deadline given to discovery's requests.
    request_timeout: std::time::Duration,
    /// Deliveries started whose report a future will bring; the loop takes them.
    started: Vec<PendingReport>,
    /// This session's subscriptions to the registration meta topics.
    meta: HashMap<SubscriptionId, &'static str, IdHashing>,
    /// Meta subscriptions not yet confirmed; the list call waits for all.
    meta_pending: usize,
    joined: bool,
    /// This session reached readiness once: it counts as healthy.
    healthy: bool,
    draining: bool,
    /// Set when the session must be dropped and joined anew.
    rejoin: Option<String>,
    /// Which dead letters get a line of their own.
    dead_letter_log: DeadLetterLog,
    /// With the Redis queue: `core` and `sink` admit events to the streams,
    /// and this stage delivers what the readers hand over.
    queue: Option<QueueStage>,
    /// Whether Redis answers (Redis queue only).
    redis_up: bool,
    /// Per-key ordering (`SUBTOCALL_ORDER_BY`).
    order_by: OrderBy,
    /// The core's count of keys released by a dead letter, as last seen.
    /// Where an EVENT's destinations (one per group) are gathered; reused.
    procedures: Vec<Destination>,
    /// Partitions per procedure for keyed events (Redis queue, ordering).
    lanes: Option<u16>,
    /// `subtocall_procedure_*`, and each procedure's counts for `/status`.
    per_procedure: ProcedureMetrics,
    /// Callees of each tracked registration, as the router last counted.
    callees: HashMap<RegistrationId, u64, IdHashing>,
    /// The router refused `count_callees` (said once).
    callees_refused: bool,
}

impl Sidecar {
    pub fn new(
        discovery: Discovery,
        core: Core,
        sink: Box<dyn Sink<Token> + Send>,
        metrics: Arc<Metrics>,
        dead_letter_store: Option<mpsc::Sender<Vec<u8>>>,
        request_timeout: std::time::Duration,
        now: Instant,
    ) -> Sidecar {
        let mut core = core;
        let metrics_for_procedures = metrics.clone();
        let marker = discovery.marker().clone();
        // A sink that needs no session takes deliveries from the start.
        core.set_open(!sink.needs_session(), now);
        Sidecar {
            discovery,
            dedup: Dedup::new(DEFAULT_CAPACITY),
            core,
            sink,
            metrics,
            dead_letter_store,
            request_timeout,
            started: Vec::new(),
            meta: HashMap::default(),
            meta_pending: 0,
            joined: false,
            healthy: false,
            draining: false,
            rejoin: None,
            dead_letter_log: DeadLetterLog::default(),
            redis_up: true,
            queue: None,
            order_by: OrderBy::None,
            procedures: Vec::new(),
            lanes: None,
            per_procedure: ProcedureMetrics::new(
                metrics_for_procedures,
                DEFAULT_METRICS_MAX_PROCEDURES,
                marker,
            ),
            callees: HashMap::default(),
            callees_refused: false,
        }
    }

    /// Delivers events with the same key one at a time, in order.
    pub fn with_order_by(mut self, order_by: OrderBy) -> Sidecar {
        self.order_by = order_by;
        self
    }

    /// Gives at most `max` procedures metrics of their own.
    pub fn with_procedure_metrics(mut self, max: usize) -> Sidecar {
        let marker = self.discovery.marker().clone();
        self.per_procedure = ProcedureMetrics::new(self.metrics.clone(), max, marker);
        self
    }

    /// With the Redis queue and per-key ordering: admits each keyed event
    /// to one of `partitions` streams of its procedure, by key.
    pub fn with_lanes(mut self, partitions: Option<u16>) -> Sidecar {
        self.lanes = partitions;
        self
    }

    /// Uses the Redis queue: the sidecar's own core and sink admit events
    /// to the streams, and `queue` delivers what the readers hand over.
    pub fn with_queue(mut self, mut queue: QueueStage, now: Instant) -> Sidecar {
        let open = !queue.sink.needs_session();
        queue.core.set_open(open, now);
        self.queue = Some(queue);
        // Not ready until Redis has answered once.
        self.redis_up = false;
        self.metrics.redis_up.set(0);
        self
    }

    // ------------------------------------------------------------ the session

    /// A new session: discovery starts from nothing, meta topics first.
    pub fn on_joined(&mut self, session: &mut Session<Token>, now: Instant) {
        self.discovery.reset();
        self.callees.clear();
        self.meta.clear();
        self.meta_pending = meta::META_TOPICS.len();
        self.joined = true;
        self.healthy = false;
        self.rejoin = None;
        let deadline = Some(now + self.request_timeout);
        for topic in meta::META_TOPICS {
            session.subscribe(topic, Dict::new(), Token::MetaSubscribe(topic), deadline);
        }
        if self.sink.needs_session() {
            self.core.set_open(true, now);
        }
        if let Some(q) = &mut self.queue
            && q.sink.needs_session()
        {
            q.core.set_open(true, now);
        }
    }

    /// The session is gone: no delivery starts on it any more. The loop
    /// then hands over its pending requests, answered "connection lost"
    /// (discovery's are ignored, deliveries are retried).
    pub fn on_session_end(&mut self, now: Instant) {
        self.joined = false;
        self.meta.clear();
        self.meta_pending = 0;
        if self.sink.needs_session() {
            self.core.set_open(false, now);
            if self.draining {
                // No new session comes while draining: nothing can deliver.
                self.core.shutdown(now, now);
            }
        }
        if let Some(q) = &mut self.queue
            && q.sink.needs_session()
        {
            q.core.set_open(false, now);
            if self.draining {
                // Released to the other instances at once.
                q.core.shutdown(now, now);
            }
        }
    }

    /// Whether the session reached readiness (discovery complete) once.
    pub fn was_healthy(&self) -> bool {
        self.healthy
    }

    /// Why the session must be dropped and joined anew, once.
    pub fn take_rejoin(&mut self) -> Option<String> {
        self.rejoin.take()
    }

    /// Joined, discovery complete, Redis answering (Redis queue), not draining.
    pub fn is_ready(&self) -> bool {
        self.joined
            && self.meta_pending == 0
            && self.discovery.is_synced()
            && !self.draining
            && self.redis_up
    }

    /// One output of the session, in order.
    pub fn on_session_output(
        &mut self,
        output: SessionOutput<Token>,
        session: &mut Session<Token>,
        now: Instant,
    ) -> Result<(), Fatal> {
        match output {
            SessionOutput::Reply { token, reply } => self.on_reply(token, reply, session, now)?,
            SessionOutput::RawEvent(event) => {
                if let Some(&topic) = self.meta.get(&event.subscription) {
                    match event.payload.decode() {
                        Ok(payload) => self.on_meta_event(topic, &payload.args, session, now),
                        Err(e) => {
                            tracing::warn!(topic, error = %e, "ignoring malformed meta event")
                        }
                    }
                } else {
                    self.on_event(event, now);
                }
            }
            SessionOutput::Event(event) => {
                if let Some(&topic) = self.meta.get(&event.subscription) {
                    self.on_meta_event(topic, &event.payload.args, session, now);
                } else {
                    self.on_event(event, now);
                }
            }
            SessionOutput::Revoked { kind, details } => {
                tracing::warn!(kind, ?details, "router revoked a {kind}");
                match details.get_u64("subscription").map(SubscriptionId) {
                    Some(id) if self.meta.contains_key(&id) => {
                        // Without meta events discovery would go stale.
                        self.rejoin = Some("the router revoked a meta subscription".into());
                    }
                    Some(id) => self.discovery.on_unsubscribed(id),
                    None => tracing::warn!(kind, "router revoked a {kind} we do not hold"),
                }
            }
            SessionOutput::Invocation(inv) => {
                tracing::warn!(registration = %inv.registration, "unexpected INVOCATION: subtocall registers nothing");
            }
            SessionOutput::Interrupt { .. }
            | SessionOutput::Joined(_)
            | SessionOutput::Send(_)
            | SessionOutput::SendRawCall { .. }
            | SessionOutput::Closed { .. } => {}
        }
        Ok(())
    }

    fn on_reply(
        &mut self,
        token: Token,
        reply: Result<Success, RequestError>,
        session: &mut Session<Token>,
        now: Instant,
    ) -> Result<(), Fatal> {
        match (token, reply) {
            (Token::Deliver(id), reply) => {
                let outcome = reply.map(drop).map_err(crate::forward::Failure::Call);
                self.on_report(id, Report::All(outcome), now);
            }
            // A previous session's discovery answer (answered "connection
            // lost" when it ended): the new session starts from nothing.
            (_, Err(RequestError::ConnectionLost)) if !self.joined => {}
            (Token::MetaSubscribe(topic), Ok(Success::Subscribed(id))) => {
                self.meta.insert(id, topic);
                self.meta_pending -= 1;
                if self.meta_pending == 0 {
                    // Listing only after every meta subscription is in place
                    // means nothing registered meanwhile can be missed.
                    let deadline = Some(now + self.request_timeout);
                    session.call(
                        meta::LIST,
                        Dict::new(),
                        Payload::default(),
                        Token::List,
                        deadline,
                    );
                }
            }
            (Token::MetaSubscribe(topic), Err(RequestError::Wamp(e))) => {
                return Err(Fatal::MetaApi {
                    what: format!("SUBSCRIBE to {topic}"),
                    error: e.to_string(),
                    permission: "'subscribe' on wamp.registration.* (e.g. a 'wamp.' prefix rule)",
                });
            }
            (Token::List, Err(RequestError::Wamp(e))) => {
                return Err(Fatal::MetaApi {
                    what: format!("CALL to {}", meta::LIST),
                    error: e.to_string(),
                    permission: "'call' on wamp.registration.* (e.g. a 'wamp.' prefix rule)",
                });
            }
            (Token::MetaSubscribe(_) | Token::List, Err(e)) => {
                // Timeout or lost connection during the bootstrap: start over.
                self.rejoin = Some(format!("discovery bootstrap failed: {e}"));
            }
            (Token::List, Ok(Success::Result { payload, .. })) => {
                match meta::parse_list_result(&payload.args) {
                    Ok(list) => {
                        tracing::info!(registrations = list.ids().count(), "registrations listed");
                        self.discovery.on_list_result(list.ids());
                    }
                    Err(e) => {
                        self.rejoin = Some(format!("malformed wamp.registration.list result: {e}"))
                    }
                }
            }
            (Token::Get(id), result) => {
                let outcome = match result {
                    Ok(Success::Result { payload, .. }) => {
                        match meta::parse_get_result(&payload.args) {
                            Ok(info) => GetOutcome::Found(info),
                            Err(e) => GetOutcome::Failed(e.to_string()),
                        }
                    }
                    Ok(other) => GetOutcome::Failed(format!("unexpected reply {other:?}")),
                    Err(RequestError::Wamp(e)) if e.error == meta::NO_SUCH_REGISTRATION => {
                        GetOutcome::NoSuchRegistration
                    }
                    Err(e) => GetOutcome::Failed(e.to_string()),
                };
                self.discovery.on_get_result(id, outcome, now);
                self.count_callees(id, session, now);
            }
            (Token::CountCallees(id), Ok(Success::Result { payload, .. })) => {
                match payload.args.first().and_then(Value::as_u64) {
                    Some(n) if self.discovery.tracks(id) => {
                        self.callees.insert(id, n);
                    }
                    Some(_) => {}
                    None => tracing::debug!(registration = %id, "unexpected count_callees result"),
                }
            }
            (Token::CountCallees(id), result) => {
                self.callees.remove(&id);
                match result {
                    Err(RequestError::Wamp(e)) if e.error == "wamp.error.not_authorized" => {
                        if !self.callees_refused {
                            self.callees_refused = true;
                            tracing::warn!(
                                error = %e,
                                "the router refused {}: /status shows callee counts as unknown \
                                 (grant 'call' on it to subtocall's role, see doc/crossbar.md)",
                                meta::COUNT_CALLEES
                            );
                        }
                    }
                    other => {
                        tracing::debug!(registration = %id, result = ?other.err(), "callees not counted")
                    }
                }
            }
            (Token::Subscribe(key), Ok(Success::Subscribed(id))) => {
                self.discovery.on_subscribed(&key, id)
            }
            (Token::Subscribe(key), result) => {
                let error = match result {
                    Err(e) => e.to_string(),
                    Ok(other) => format!("unexpected reply {other:?}"),
                };
                self.discovery.on_subscribe_failed(&key, error, now)
            }
            (Token::Unsubscribe(id), Ok(_)) => self.discovery.on_unsubscribed(id),
            (Token::Unsubscribe(id), Err(e)) => {
                self.discovery.on_unsubscribe_failed(id, e.to_string())
            }
            (token @ (Token::MetaSubscribe(_) | Token::List), Ok(other)) => {
                self.rejoin = Some(format!("unexpected reply to {token:?}: {other:?}"));
            }
        }
        Ok(())
    }

    fn on_meta_event(
        &mut self,
        topic: &'static str,
        args: &[Value],
        session: &mut Session<Token>,
        now: Instant,
    ) {
        match meta::parse_meta_event(topic, args) {
            Ok(meta_event) => {
                let counted = match &meta_event {
                    meta::MetaEvent::Registered { registration, .. }
                    | meta::MetaEvent::Unregistered { registration, .. } => Some(*registration),
                    meta::MetaEvent::Deleted { registration, .. } => {
                        self.callees.remove(registration);
                        None
                    }
                    meta::MetaEvent::Created { .. } => None,
                };
                self.discovery.on_meta_event(meta_event, now);
                if let Some(id) = counted {
                    self.count_callees(id, session, now);
                }
            }
            Err(e) => tracing::warn!(topic, error = %e, "ignoring malformed meta event"),
        }
    }

    /// Asks the router how many callees a tracked registration has now
    /// (after each change: the last answer is the current count).
    fn count_callees(&mut self, id: RegistrationId, session: &mut Session<Token>, now: Instant) {
        if !self.discovery.tracks(id) || self.callees_refused {
            return;
        }
        let args = Payload::new(vec![Value::UInt(id.0)], Dict::new());
        let deadline = Some(now + self.request_timeout);
        session.call(
            meta::COUNT_CALLEES,
            Dict::new(),
            args,
            Token::CountCallees(id),
            deadline,
        );
    }

    /// Routes an EVENT of a forwarding subscription and de-duplicates it:
    /// the procedure and concrete topic when it is to be forwarded.
    fn route(
        &mut self,
        subscription: SubscriptionId,
        publication: PublicationId,
        details: &Dict,
        procedures: &mut Vec<Destination>,
    ) -> Option<String> {
        // One event received per group reading the topic (at least one),
        // so that every one received is accounted for once.
        procedures.clear();
        let routed = self
            .discovery
            .route_into(subscription, details.get_str("topic"), procedures);
        let topic = match routed {
            Ok(_) if procedures.is_empty() => {
                // Every group left; the UNSUBSCRIBE is on its way.
                self.metrics.events_received.inc();
                self.metrics.unroutable(false).inc();
                tracing::debug!(%subscription, %publication, "event for a topic no group reads any more");
                return None;
            }
            Ok(topic) => {
                self.metrics.events_received.inc_by(procedures.len() as u64);
                topic
            }
            Err(e) => {
                self.metrics.events_received.inc();
                let missing_topic = matches!(e, discovery::RouteError::MissingTopic { .. });
                self.metrics.unroutable(missing_topic).inc();
                tracing::debug!(error = %e, %publication, "event not routable");
                return None;
            }
        };
        // An event matching several of our subscriptions is forwarded once
        // to each group.
        let (dedup, metrics) = (&mut self.dedup, &self.metrics);
        procedures.retain(|d| {
            let first = dedup.first_time_for(publication, d.mix);
            if first {
                tracing::debug!(procedure = %d.procedure, %publication, "event accepted");
            } else {
                metrics.events_duplicate.inc();
            }
            first
        });
        // A procedure's count is of what it was given: forwarded,
        // dead-lettered or on its way, nothing else.
        for d in procedures.iter() {
            self.per_procedure.received(&d.procedure);
        }
        (!procedures.is_empty()).then(|| topic.to_owned())
    }

    /// An EVENT on one of our forwarding subscriptions: accepted once for
    /// each group that reads its topic.
    fn on_event<E: EventIn>(&mut self, event: E, now: Instant) {
        let mut procedures = std::mem::take(&mut self.procedures);
        let (subscription, publication, details) = event.head();
        if let Some(topic) = self.route(subscription, publication, details, &mut procedures) {
            let received = SystemTime::now();
            let each = procedures.drain(..);
            for_each_group((event, topic), each, |d, (event, topic)| {
                let shared = event.into_shared(d.procedure, topic, received);
                self.accept(shared, d.batch, now);
            });
        }
        self.procedures = procedures;
    }

    fn accept(&mut self, mut event: SharedEvent, batch: bool, now: Instant) {
        event.outgoing = self.sink.prepare(&event);
        let (job, key) = shaped(
            &self.order_by,
            Some(&self.metrics),
            Job::new(Box::new(event), now),
            batch,
        );
        let mut job = job;
        if let Some(q) = &mut self.queue {
            // Its stream is read from now on (a no-op once it is).
            q.queue.add_procedure(&job.item.procedure, now);
            if let (Some(partitions), Some(key)) = (self.lanes, key) {
                job.item.lane = Some(key.partition(partitions));
            }
        }
        self.core.accept_job(job, now);
    }

    /// An EVENT over SUBTOCALL_MAX_MESSAGE_SIZE that the connection did not
    /// take: counted, and logged with what could be read of it.
    pub fn on_refused(&mut self, refused: Refused) {
        self.metrics.events_refused_too_large.inc();
        let Refused { size, limit, event } = refused;
        match event {
            Some((subscription, publication, details_topic)) => {
                let topic = details_topic.or_else(|| {
                    self.discovery
                        .topic_for_subscription(subscription)
                        .map(|(t, _)| t.to_owned())
                });
                tracing::warn!(
                    topic = topic.as_deref().unwrap_or("unknown"),
                    %subscription,
                    %publication,
                    size,
                    limit,
                    "EVENT over SUBTOCALL_MAX_MESSAGE_SIZE refused, not forwarded"
                );
            }
            None => tracing::warn!(
                size,
                limit,
                "message over twice SUBTOCALL_MAX_MESSAGE_SIZE refused unread; the session ends"
            ),
        }
    }

    // ------------------------------------------------------------ deliveries

    /// A delivery's outcome, from the session or a sink's future.
    pub fn on_report(&mut self, id: DeliveryId, report: Report, now: Instant) {
        self.dead_letter_evicted(id, now);
        if QueueStage::is_delivery(id)
            && let Some(q) = &mut self.queue
        {
            return on_queue_report(q, &self.metrics, &mut self.per_procedure, id, report, now);
        }
        if self.queue.is_some() {
            // The admission stage: its outcome says whether Redis answers.
            match &report {
                Report::All(Ok(())) => self.set_redis_up(true),
                Report::All(Err(error)) => {
                    if self.redis_up {
                        tracing::warn!(%error, "cannot admit events to the Redis queue; they wait in memory and are retried");
                    }
                    self.set_redis_up(false);
                }
                Report::Each(_) => {}
            }
        }
        if let Some(jobs) = self.core.delivery(id) {
            log_failures(jobs, &report, &mut self.per_procedure);
            if !self.sink.needs_session() {
                count_redis_errors(&self.metrics, jobs.len(), &report);
            }
        }
        let known = match report {
            Report::All(outcome) => self.core.on_outcome(id, outcome, now),
            Report::Each(outcomes) => self.core.on_outcomes(id, outcomes, now),
        };
        if !known {
            tracing::debug!(delivery = %id, "outcome of a delivery already given up (shutdown deadline)");
        }
    }

    fn set_redis_up(&mut self, up: bool) {
        if up && !self.redis_up {
            tracing::info!("the Redis queue answers");
        }
        self.redis_up = up;
        self.metrics.redis_up.set(i64::from(up));
    }

    /// A Redis queue command's reply.
    pub fn on_queue_reply(&mut self, id: CommandId, reply: Reply<Fields>, now: Instant) {
        if let Some(q) = &mut self.queue {
            q.queue.on_reply(id, reply, now);
        }
    }

    /// An admission batch's outcome: what each stream's grant took goes to
    /// the queue core, the outcome to the admission core.
    pub fn on_admitted(&mut self, id: DeliveryId, admitted: Admitted, now: Instant) {
        if let Some(q) = &mut self.queue {
            for (grant, taken) in admitted.taken {
                q.queue.on_granted(grant, taken, now);
            }
            for (id, acked) in admitted.acked {
                let reply = match acked {
                    Ok(()) => Reply::Done,
                    Err(f) => Reply::Failed(f),
                };
                q.queue.on_reply(id, reply, now);
            }
        }
        self.on_report(id, admitted.report, now);
    }

    /// An entry the queue core handed out: into the delivery core, or, if
    /// it holds no event, to the dead-letter stream.
    fn take_entry(&mut self, handed: Handed<Fields>, now: Instant) {
        let Some(q) = &mut self.queue else {
            return;
        };
        if handed.taken_over {
            self.metrics.queue_taken_over.inc();
        }
        match read_entry(&handed) {
            Ok(event) => {
                let batch = self.discovery.marker().is_batch(&event.procedure);
                let job = q.job(&handed, event, now);
                // Counted unordered when it was admitted, not again.
                let (job, _) = shaped(&self.order_by, None, job, batch);
                q.core.accept_job(job, now);
            }
            Err((why, shown)) => {
                self.metrics.queue_malformed.inc();
                tracing::error!(
                    target: "subtocall::dead_letter",
                    stream = %handed.key.unit,
                    entry = %handed.key.id,
                    error = %why,
                    "queue entry is not an event; moved to the dead-letter stream"
                );
                q.queue.dead_letter(
                    &handed.key,
                    vec![
                        ("reason", b"malformed".to_vec()),
                        ("attempts", handed.deliveries.to_string().into_bytes()),
                        ("last_error", why.into_bytes()),
                        ("dead_lettered_at", rfc3339_now().into_bytes()),
                        ("event", shown),
                    ],
                );
            }
        }
    }

    /// An entry handed out too often: dead-lettered without a delivery.
    fn poison(&mut self, handed: Handed<Fields>, now: Instant) {
        let Some(q) = &self.queue else {
            return;
        };
        match read_entry(&handed) {
            Ok(event) => {
                let mut job = q.job(&handed, event, now);
                job.last_error = Some(format!(
                    "handed out {} times (SUBTOCALL_MAX_DELIVERIES): an instance that \
                     delivered it may have died each time",
                    handed.deliveries
                ));
                self.dead_letter(&job, GiveUp::MaxDeliveries, now);
            }
            // Not an event either: as any malformed entry.
            Err(_) => self.take_entry(handed, now),
        }
    }

    /// Deliveries started whose outcome a future will report.
    pub fn take_started(&mut self) -> std::vec::Drain<'_, PendingReport> {
        self.started.drain(..)
    }

    /// Does everything that needs no waiting: discovery's requests (while
    /// joined and not draining), the forwarding core's outputs, gauges.
    pub fn pump(&mut self, mut session: Option<&mut Session<Token>>, now: Instant) {
        if let Some(session) = session.as_deref_mut()
            && self.joined
            && !self.draining
        {
            for output in self.discovery.poll(now) {
                match output {
                    discovery::Output::Action(action) => self.execute(action, session, now),
                    discovery::Output::Note(note) => {
                        if let Note::RegistrationTracked { uri, topic, .. } = &note
                            && topic.policy == MatchPolicy::Exact
                        {
                            // The stream target creates the stream and its
                            // group now, before the first event.
                            match &self.queue {
                                Some(q) => q.sink.prepare_procedure(uri),
                                None => self.sink.prepare_procedure(uri),
                            }
                        }
                        log_note(&note);
                    }
                }
            }
        }
        self.core.on_tick(now);
        while let Some(output) = self.core.poll() {
            match output {
                Output::Deliver(id) => self.start(id, session.as_deref_mut(), now),
                Output::Ack(job) if self.queue.is_some() => {
                    tracing::trace!(publication = %job.item.publication, "event offered to the Redis queue");
                }
                Output::Ack(job) => {
                    let pushed = !self.sink.needs_session();
                    self.delivered(&job, pushed, now);
                }
                Output::DeadLetter(job, why) => self.dead_letter(&job, why, now),
                Output::Retrying { .. } if self.queue.is_some() => {}
                Output::Retrying { events, .. } => {
                    self.metrics.events_retried.inc_by(events as u64);
                }
                // With the Redis queue, ordering is the delivering stage's.
                Output::KeyReleased if self.queue.is_some() => {}
                Output::KeyReleased => self.key_released(),
            }
        }
        self.pump_queue(session, now);
        if let Some(summary) = self.dead_letter_log.flush(now) {
            log_summary(&summary);
        }
        if self.is_ready() {
            self.healthy = true;
        }
        let m = &self.metrics;
        m.registrations_tracked
            .set(self.discovery.tracked_registrations() as i64);
        m.groups.set(self.discovery.group_count() as i64);
        m.subscriptions_active
            .set(self.discovery.active_subscriptions() as i64);
        m.ready.set(i64::from(self.is_ready()));
        match &self.queue {
            Some(q) => {
                m.queue_depth
                    .set((self.core.waiting() + q.core.waiting()) as i64);
                m.calls_in_flight.set(q.core.in_flight() as i64);
            }
            None => {
                m.queue_depth.set(self.core.waiting() as i64);
                m.calls_in_flight.set(self.core.in_flight() as i64);
            }
        }
        if self.per_procedure.refresh_due(now) {
            let live = live(&self.core, self.queue.as_ref());
            self.per_procedure.refresh(live, now);
        }
    }

    /// A dead-lettered event let the next of its ordering key go ahead.
    fn key_released(&mut self) {
        self.metrics.order_released.inc();
        tracing::info!(
            keys = self.metrics.order_released.get(),
            "a dead-lettered event released its ordering key: the next event of the key went ahead"
        );
    }

    /// The Redis queue: what its core says, and the delivery stage's
    /// outputs, until neither has more.
    fn pump_queue(&mut self, mut session: Option<&mut Session<Token>>, now: Instant) {
        let Some(q) = &mut self.queue else {
            return;
        };
        q.queue.on_tick(now);
        q.core.on_tick(now);
        let mut released = 0;
        loop {
            let Some(q) = &mut self.queue else {
                return;
            };
            if let Some(output) = q.queue.poll() {
                self.on_queue_output(output, now);
                continue;
            }
            let Some(output) = q.core.poll() else {
                // Acknowledgements of what was just delivered go out now.
                q.queue.on_tick(now);
                if q.queue.has_output() {
                    continue;
                }
                break;
            };
            match output {
                Output::Deliver(id) => self.start(id, session.as_deref_mut(), now),
                Output::Ack(job) => {
                    let pushed = !q.sink.needs_session();
                    if let Some(key) = queue_stage::key_of(&job) {
                        q.queue.on_delivered(key);
                    }
                    self.delivered(&job, pushed, now);
                }
                Output::DeadLetter(job, GiveUp::Shutdown) => {
                    // Not given up: left in the stream for the other instances.
                    if let Some(key) = queue_stage::key_of(&job) {
                        q.queue.release(key);
                        self.metrics.queue_released.inc();
                        released += 1;
                    }
                }
                Output::DeadLetter(job, why) => self.dead_letter(&job, why, now),
                Output::Retrying { events, .. } => {
                    self.metrics.events_retried.inc_by(events as u64);
                }
                Output::KeyReleased => self.key_released(),
            }
        }
        if released > 0 {
            tracing::info!(
                entries = released,
                "left unfinished entries in the Redis queue for the other instances"
            );
        }
    }

    /// One output of the queue core.
    fn on_queue_output(&mut self, output: QueueOutput<Fields>, now: Instant) {
        let Some(q) = &mut self.queue else {
            return;
        };
        match output {
            QueueOutput::Send(id, command) => q.carry(id, command),
            QueueOutput::Deliver(handed) => {
                for h in handed {
                    self.take_entry(h, now);
                }
            }
            QueueOutput::Poison(h) => self.poison(h, now),
            QueueOutput::Withdraw(keys) => {
                let keys: std::collections::HashSet<Key> = keys.into_iter().collect();
                let back: Vec<Key> = q
                    .core
                    .withdraw(|e| e.entry.as_ref().is_some_and(|e| keys.contains(&e.key)))
                    .into_iter()
                    .filter_map(|j| j.item.entry.map(|e| e.key))
                    .collect();
                q.queue.on_withdrawn(&back);
            }
            QueueOutput::RedisUp(up) => {
                if !up {
                    tracing::warn!("the Redis queue does not answer; retrying");
                }
                self.set_redis_up(up);
            }
            QueueOutput::Note(note) => self.on_queue_note(note),
        }
    }

    fn on_queue_note(&mut self, note: QueueNote) {
        match note {
            QueueNote::TakenOver { unit, entries } => {
                tracing::info!(stream = %unit, entries, "took over entries another instance left idle");
            }
            QueueNote::LeaseTaken { unit } => {
                tracing::info!(partition = %unit, "holding the partition's lease; delivering it");
            }
            QueueNote::LeaseLost { unit } => {
                tracing::warn!(
                    partition = %unit,
                    "the partition's lease is no longer certainly ours (not renewed in time); \
                     its waiting entries are left to its next holder"
                );
            }
            QueueNote::HandingOver { unit, instances } => {
                tracing::info!(partition = %unit, instances, "handing the partition over to another instance");
            }
            QueueNote::Fenced { entries } => {
                self.metrics.queue_fenced.inc_by(entries as u64);
                tracing::warn!(
                    entries,
                    "entries no longer certainly ours (not refreshed in time, or taken over): \
                     not delivered here, left in Redis for whoever holds them"
                );
            }
            QueueNote::CommitGivenUp { what, keys, error } => {
                self.metrics.redis_errors.inc();
                tracing::warn!(
                    entries = keys,
                    %error,
                    "could not {what}; the entries stay pending and are delivered again after a takeover"
                );
            }
            QueueNote::CommandFailed { what, error } => {
                self.metrics.redis_errors.inc();
                tracing::debug!(%error, "could not {what}; retrying");
            }
            QueueNote::Reading { procedure } => {
                tracing::info!(%procedure, "reading the procedure's queue streams");
            }
        }
    }

    fn execute(&mut self, action: Action, session: &mut Session<Token>, now: Instant) {
        let deadline = Some(now + self.request_timeout);
        match action {
            Action::Subscribe(key) => {
                let options = match key.policy {
                    MatchPolicy::Wildcard => Dict::new().with("match", "wildcard"),
                    // Prefix topics are never subscribed (discovery ignores
                    // prefix registrations); exact needs no option.
                    MatchPolicy::Prefix => Dict::new().with("match", "prefix"),
                    MatchPolicy::Exact => Dict::new(),
                };
                let topic = key.topic.clone();
                session.subscribe(&topic, options, Token::Subscribe(key), deadline);
            }
            Action::Unsubscribe { subscription, .. } => {
                session.unsubscribe(subscription, Token::Unsubscribe(subscription), deadline)
            }
            Action::GetRegistration(id) => {
                let args = Payload::new(vec![Value::UInt(id.0)], Dict::new());
                session.call(meta::GET, Dict::new(), args, Token::Get(id), deadline);
            }
        }
    }

    /// Starts a delivery of either stage (the queue stage's ids are its own).
    /// A queue delivery whose entries are no longer certainly this
    /// instance's is cancelled instead: nobody is called. An admission to
    /// the Redis queue also reads what the queue core grants.
    fn start(&mut self, id: DeliveryId, session: Option<&mut Session<Token>>, now: Instant) {
        if let Some(q) = &mut self.queue
            && !QueueStage::is_delivery(id)
        {
            if let Some(jobs) = self.core.delivery(id) {
                q.admit(id, jobs, now);
            }
            return;
        }
        // A queue delivery starts only while its entries are certainly
        // ours, and its call must be written before that ends.
        let mut send_by = None;
        if let Some(q) = &mut self.queue
            && QueueStage::is_delivery(id)
            && let Some(jobs) = q.core.delivery(id)
        {
            match q.certain_until(jobs) {
                Some(until) if now < until => send_by = Some(until),
                _ => {
                    q.take_back(id, now);
                    return;
                }
            }
        }
        let (core, sink) = match &mut self.queue {
            Some(q) if QueueStage::is_delivery(id) => (&q.core, &mut q.sink),
            _ => (&self.core, &mut self.sink),
        };
        let Some(jobs) = core.delivery(id) else {
            return;
        };
        if jobs.first().is_some_and(|j| j.batch.is_some()) {
            self.metrics.batch_calls.inc();
        }
        let mut session = session;
        match sink.start(id, jobs, session.as_deref_mut(), now) {
            // A queue delivery's call goes out only while its entries are
            // certainly still ours, however long this process is paused
            // before it writes the call.
            Started::OnSession => {
                if let (Some(session), Some(at)) = (session, send_by) {
                    session.send_last_by(at);
                }
            }
            Started::Pending(report) => self
                .started
                .push(Box::pin(async move { (id, report.await) })),
            Started::Done(report) => self.on_report(id, report, now),
        }
    }

    /// `pushed`: delivered by an RPUSH (Redis mode), not a CALL.
    fn delivered(&mut self, job: &Job<Box<SharedEvent>>, pushed: bool, now: Instant) {
        self.metrics.events_forwarded.inc();
        self.per_procedure.forwarded(
            &job.item.procedure,
            now.saturating_duration_since(job.received),
        );
        if pushed {
            self.metrics.redis_pushes.inc();
        }
        self.metrics
            .forward_latency
            .observe(now.saturating_duration_since(job.received).as_secs_f64());
        tracing::debug!(
            procedure = %job.item.procedure,
            publication = %job.item.publication,
            attempts = job.attempts,
            "event delivered"
        );
    }

    /// Entries the delivering sink removed from a Redis stream to make room
    /// (`drop-oldest` at the backlog bound): dead letters.
    fn dead_letter_evicted(&mut self, id: DeliveryId, now: Instant) {
        let evicted = match &mut self.queue {
            Some(q) if QueueStage::is_delivery(id) => q.sink.take_evicted(),
            _ => self.sink.take_evicted(),
        };
        for event in evicted {
            let mut job = Job::new(Box::new(event), now);
            job.last_error = Some(
                "removed from the stream to make room for newer events \
                 (SUBTOCALL_REDIS_MAX_BACKLOG, SUBTOCALL_OVERFLOW=drop-oldest)"
                    .into(),
            );
            self.dead_letter(&job, GiveUp::Backlog, now);
        }
    }

    fn dead_letter(&mut self, job: &Job<Box<SharedEvent>>, why: GiveUp, now: Instant) {
        self.metrics.dead_lettered(why).inc();
        self.per_procedure
            .dead_lettered(&job.item.procedure, why.as_str());
        let error = match &job.last_error {
            Some(e) => format!("dead-lettered ({}): {e}", why.as_str()),
            None => format!("dead-lettered ({})", why.as_str()),
        };
        self.per_procedure.failed(&job.item.procedure, error);
        let ev = &job.item;
        if self.dead_letter_log.admit(now, why.as_str(), &ev.procedure) {
            tracing::error!(
            target: "subtocall::dead_letter",
            reason = why.as_str(),
            procedure = %ev.procedure,
            topic = %ev.topic,
            publication = %ev.publication,
            attempts = job.attempts,
            last_error = job.last_error.as_deref().unwrap_or(""),
            "event dead-lettered"
            );
        }
        if let Some(q) = &mut self.queue {
            // Into the procedure's dead-letter stream (and out of its queue
            // stream, when it came from there and is still ours).
            let fields = vec![
                ("reason", why.as_str().as_bytes().to_vec()),
                ("attempts", job.attempts.to_string().into_bytes()),
                (
                    "last_error",
                    job.last_error.clone().unwrap_or_default().into_bytes(),
                ),
                ("dead_lettered_at", rfc3339_now().into_bytes()),
                ("event", ev.envelope_json()),
            ];
            match &ev.entry {
                Some(e) => q.queue.dead_letter(&e.key, fields),
                None => q
                    .queue
                    .dead_letter_unadmitted(&ev.procedure, ev.publication.0, fields),
            }
        }
        if let Some(store) = &self.dead_letter_store {
            let record = ev.dead_letter_json(
                why.as_str(),
                job.attempts,
                job.last_error.as_deref(),
                SystemTime::now(),
            );
            if store.try_send(record).is_err() {
                self.metrics.dead_letter_store_errors.inc();
                tracing::warn!(publication = %ev.publication, "dead-letter store is behind; record only logged");
            }
        }
    }

    // ------------------------------------------------------------ shutdown

    /// Stops discovery, unsubscribes (events already on their way are still
    /// delivered), and gives the core until `deadline`.
    pub fn begin_drain(
        &mut self,
        session: Option<&mut Session<Token>>,
        deadline: Instant,
        now: Instant,
    ) {
        tracing::info!(
            waiting = self.core.waiting(),
            in_flight = self.core.in_flight(),
            deadline_in = ?deadline.saturating_duration_since(now),
            "shutdown requested: no new subscriptions, draining accepted events"
        );
        self.draining = true;
        self.core.shutdown(deadline, now);
        if let Some(q) = &mut self.queue {
            // Nothing new is read; what is held is delivered or released.
            q.queue.shutdown();
            q.core.shutdown(deadline, now);
            if q.sink.needs_session() && !(session.is_some() && self.joined) {
                q.core.shutdown(now, now);
            }
        }
        match session {
            Some(session) if self.joined => {
                let subscriptions: Vec<_> = self.discovery.subscriptions().collect();
                for id in subscriptions {
                    let at = Some(now + self.request_timeout);
                    session.unsubscribe(id, Token::Unsubscribe(id), at);
                }
            }
            // Nothing can deliver through a session that is not there.
            _ if self.sink.needs_session() => self.core.shutdown(now, now),
            _ => {}
        }
    }

    /// Ends the drain now: everything unfinished is dead-lettered, and the
    /// last dead-letter summary is logged.
    pub fn stop(&mut self, now: Instant) {
        self.draining = true;
        self.core.shutdown(now, now);
        if let Some(q) = &mut self.queue {
            q.core.shutdown(now, now);
        }
        self.pump(None, now);
        if let Some(summary) = self.dead_letter_log.take_summary() {
            log_summary(&summary);
        }
    }

    pub fn core(&self) -> &Core {
        &self.core
    }

    /// Nothing waiting or in flight in either stage (and, with the Redis
    /// queue, its last commits made and its leases given up).
    pub fn is_idle(&self) -> bool {
        self.core.is_idle()
            && self
                .queue
                .as_ref()
                .is_none_or(|q| q.core.is_idle() && q.queue.is_finished())
    }

    /// The shutdown deadline passed.
    pub fn is_stopped(&self) -> bool {
        self.core.is_stopped() && self.queue.as_ref().is_none_or(|q| q.core.is_stopped())
    }

    /// Events waiting and in flight, both stages together.
    pub fn held(&self) -> (usize, usize) {
        let (w, f) = (self.core.waiting(), self.core.in_flight());
        match &self.queue {
            Some(q) => (w + q.core.waiting(), f + q.core.in_flight()),
            None => (w, f),
        }
    }

    /// Earliest time something is due: a retry, the drain deadline, a
    /// discovery timer (while joined), a dead-letter summary.
    pub fn next_wake(&self) -> Option<Instant> {
        let discovery = if self.joined && !self.draining {
            self.discovery.next_deadline()
        } else {
            None
        };
        let (queue_wake, refresh) = match &self.queue {
            Some(q) => (q.core.next_wake(), q.queue.next_wake()),
            None => (None, None),
        };
        [
            self.core.next_wake(),
            queue_wake,
            refresh,
            discovery,
            self.dead_letter_log.next_flush(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Every mapping with its counts, for `/status`.
    pub fn mappings(&self, now: Instant) -> Vec<status::Mapping> {
        let live = live(&self.core, self.queue.as_ref());
        let wall = SystemTime::now();
        self.discovery
            .mappings()
            .into_iter()
            .map(|m| {
                // A pattern's events go to procedures derived from their
                // topics: those matching the registration's URI.
                let matches = |name: &str| match (&m.procedure, m.topic.policy) {
                    (Some(p), MatchPolicy::Wildcard) => wildcard_matches(p, name),
                    (Some(p), _) => p == name,
                    (None, _) => false,
                };
                let mut counts = Counts::default();
                let mut here = Live::default();
                if m.topic.policy == MatchPolicy::Exact {
                    if let Some(p) = &m.procedure {
                        counts = self.per_procedure.tally(p);
                    }
                } else {
                    for (name, c) in self.per_procedure.tallies() {
                        if matches(name) {
                            counts.add(c);
                        }
                    }
                }
                for (name, l) in &live {
                    if matches(name) {
                        here.add(*l);
                    }
                }
                let callees = m
                    .registrations
                    .iter()
                    .map(|id| self.callees.get(id).copied())
                    .sum::<Option<u64>>();
                let (last_error, last_error_at) = counts.last_error.unzip();
                status::Mapping {
                    topic: m.topic.topic.clone(),
                    match_policy: m.topic.policy.as_str().to_owned(),
                    group: m.group.name.clone().unwrap_or_else(|| "default".into()),
                    procedure: m.procedure.clone(),
                    batch: m.group.batch,
                    registrations: m.registrations.iter().map(|r| r.0).collect(),
                    callees,
                    subscription: m.subscription.map(|s| s.0),
                    subscription_state: m.subscription_state.to_owned(),
                    in_grace: m.in_grace,
                    received: counts.received,
                    forwarded: counts.forwarded,
                    dead_lettered: counts
                        .dead_lettered
                        .into_iter()
                        .map(|(r, n)| (r.to_owned(), n))
                        .collect(),
                    in_flight: here.in_flight,
                    waiting: here.waiting,
                    oldest_waiting_seconds: here
                        .oldest
                        .map_or(0.0, |o| status::seconds(now.saturating_duration_since(o))),
                    last_error,
                    last_error_at: last_error_at.map(status::rfc3339),
                    last_error_seconds: last_error_at
                        .map(|at| status::seconds(wall.duration_since(at).unwrap_or_default())),
                }
            })
            .collect()
    }

    /// Whether Redis answers (Redis queue; `None` without it).
    pub fn redis_up(&self) -> Option<bool> {
        self.queue.as_ref().map(|_| self.redis_up)
    }

    /// Shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Closes the dead-letter store channel so its task can finish.
    pub fn close_dead_letter_store(&mut self) {
        self.dead_letter_store = None;
    }

    /// The Redis queue's commands started since last asked, for the loop to
    /// await; and the interrupts of its blocked read.
    pub fn take_queue_io(
        &mut self,
    ) -> Option<(
        std::vec::Drain<'_, queue_stage::PendingCommand>,
        std::vec::Drain<'_, queue_stage::PendingAdmission>,
    )> {
        Some(self.queue.as_mut()?.take_io())
    }

    /// Whether the Redis queue is done (its leases given up), or there is
    /// none.
    pub fn queue_finished(&self) -> bool {
        self.queue.as_ref().is_none_or(|q| q.queue.is_finished())
    }
}

/// A delivery of the queue stage ended: the core decides.
fn on_queue_report(
    q: &mut QueueStage,
    metrics: &Metrics,
    per_procedure: &mut ProcedureMetrics,
    id: DeliveryId,
    report: Report,
    now: Instant,
) {
    if matches!(
        report,
        Report::All(Err(Failure::Call(RequestError::Fenced)))
    ) {
        // Never written: its entries are no longer certainly ours, and are
        // left to whoever holds them now.
        q.take_back(id, now);
        return;
    }
    if let Some(jobs) = q.core.delivery(id) {
        log_failures(jobs, &report, per_procedure);
        if !q.sink.needs_session() {
            count_redis_errors(metrics, jobs.len(), &report);
        }
    }
    let known = match report {
        Report::All(outcome) => q.core.on_outcome(id, outcome, now),
        Report::Each(outcomes) => q.core.on_outcomes(id, outcomes, now),
    };
    if !known {
        tracing::debug!(delivery = %id, "outcome of a delivery already released (shutdown deadline)");
    }
}

/// Counts the failed Redis pushes of a delivery (Redis mode).
fn count_redis_errors(metrics: &Metrics, events: usize, report: &Report) {
    match report {
        Report::All(Ok(())) => {}
        Report::All(Err(error)) => {
            metrics.redis_errors.inc();
            tracing::warn!(events, %error, "Redis push failed; the batch waits and is retried in order");
        }
        Report::Each(outcomes) => {
            let failed = outcomes.iter().filter(|o| o.is_err()).count();
            metrics.redis_errors.inc_by(failed as u64);
        }
    }
}

fn rfc3339_now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// What each procedure has in flight and waiting, over both stages.
fn live<'a>(core: &'a Core, queue: Option<&'a QueueStage>) -> HashMap<&'a str, Live> {
    let mut live: HashMap<&str, Live> = HashMap::new();
    let mut count = |j: &'a Job<Box<SharedEvent>>, in_flight: bool| {
        live.entry(&*j.item.procedure)
            .or_default()
            .add_job(j.received, in_flight);
    };
    core.for_each_job(&mut count);
    if let Some(q) = queue {
        q.core.for_each_job(&mut count);
    }
    live
}

/// Whether the concrete URI `name` matches the wildcard URI `pattern`
/// (same number of components; an empty one matches any).
pub(super) fn wildcard_matches(pattern: &str, name: &str) -> bool {
    let (mut p, mut n) = (pattern.split('.'), name.split('.'));
    loop {
        match (p.next(), n.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a.is_empty() || a == b => {}
            _ => return false,
        }
    }
}

/// Logs each failed attempt (debug) and keeps it as its procedure's last
/// error.
fn log_failures(
    jobs: &[Job<Box<SharedEvent>>],
    report: &Report,
    per_procedure: &mut ProcedureMetrics,
) {
    let failures: Box<dyn Iterator<Item = (&Job<Box<SharedEvent>>, &crate::forward::Failure)>> =
        match report {
            Report::All(Ok(())) => return,
            Report::All(Err(f)) => Box::new(jobs.iter().map(move |j| (j, f))),
            Report::Each(outcomes) => Box::new(
                jobs.iter()
                    .zip(outcomes)
                    .filter_map(|(j, o)| o.as_ref().err().map(|f| (j, f))),
            ),
        };
    // A failed batch or pipeline shares one error: kept once per procedure,
    // not formatted again for each of its events.
    let mut last: Option<(&str, &crate::forward::Failure)> = None;
    for (job, error) in failures {
        if last.is_none_or(|(p, e)| p != &*job.item.procedure || !std::ptr::eq(e, error)) {
            per_procedure.failed(&job.item.procedure, error.to_string());
            last = Some((&job.item.procedure, error));
        }
        tracing::debug!(
            procedure = %job.item.procedure,
            publication = %job.item.publication,
            attempts = job.attempts,
            %error,
            "delivery attempt failed"
        );
    }
}

fn log_summary(summary: &Summary) {
    tracing::error!(
        target: "subtocall::dead_letter",
        events = summary.events,
        by = %summary.by,
        "dead letters summarised (more than {LINES_PER_WINDOW} in a second; the metrics count each)"
    );
}

fn log_note(note: &Note) {
    match note.level() {
        discovery::Level::Debug => tracing::debug!("{note}"),
        discovery::Level::Info => tracing::info!("{note}"),
        discovery::Level::Warn => tracing::warn!("{note}"),
    }
}

/// An EVENT as it comes from the session: raw (the usual pass-through) or
/// decoded.
trait EventIn: Clone {
    fn head(&self) -> (SubscriptionId, PublicationId, &Dict);
    fn into_shared(self, procedure: Arc<str>, topic: String, received: SystemTime) -> SharedEvent;
}

impl EventIn for RawEvent {
    fn head(&self) -> (SubscriptionId, PublicationId, &Dict) {
        (self.subscription, self.publication, &self.details)
    }

    fn into_shared(self, procedure: Arc<str>, topic: String, received: SystemTime) -> SharedEvent {
        SharedEvent::from_raw(procedure, topic, self, received)
    }
}

impl EventIn for Event {
    fn head(&self) -> (SubscriptionId, PublicationId, &Dict) {
        (self.subscription, self.publication, &self.details)
    }

    fn into_shared(self, procedure: Arc<str>, topic: String, received: SystemTime) -> SharedEvent {
        SharedEvent::new(procedure, topic, self, received)
    }
}

/// Per-key ordering: the event's key (`forward::key`), or `None` to go
/// unordered (counted when the key is missing, if `metrics` is given).
fn order_key(
    order_by: &OrderBy,
    metrics: Option<&Metrics>,
    event: &SharedEvent,
) -> Option<OrderKey> {
    let key = crate::forward::key::key_of(order_by, event);
    if let (KeyOf::Missing, Some(metrics)) = (key, metrics) {
        metrics.events_unordered.inc();
        tracing::debug!(procedure = %event.procedure, publication = %event.publication, "event without its ordering key; delivered unordered");
    }
    key.key()
}

/// `job` with its ordering key and, for a batch procedure's event, its
/// batch line (the procedure's) and size.
fn shaped(
    order_by: &OrderBy,
    metrics: Option<&Metrics>,
    job: Job<Box<SharedEvent>>,
    batch: bool,
) -> (Job<Box<SharedEvent>>, Option<OrderKey>) {
    let key = order_key(order_by, metrics, &job.item);
    let batch = batch.then(|| Batched {
        line: crate::forward::key::fnv1a64(job.item.procedure.as_bytes()),
        bytes: job.item.batch_size(),
    });
    (job.with_key(key.map(|k| k.line)).with_batch(batch), key)
}

/// The event in a queue entry handed out, or why there is none and what
/// the entry held, as text, for its dead-letter record.
fn read_entry(handed: &Handed<Fields>) -> Result<SharedEvent, (String, Vec<u8>)> {
    let fields = &handed.body;
    let event = crate::streams::entry::read(&handed.key.unit.procedure, fields.clone());
    event.map_err(|why| {
        let shown = if crate::streams::entry::looks_like_an_event(fields) {
            Vec::new()
        } else {
            let text: serde_json::Map<String, serde_json::Value> = fields
                .iter()
                .map(|(k, v)| {
                    let k = String::from_utf8_lossy(k).into_owned();
                    (k, String::from_utf8_lossy(v).into_owned().into())
                })
                .collect();
            serde_json::Value::Object(text).to_string().into_bytes()
        };
        (why, shown)
    })
}

/// `event` for each of `procedures` (one per group): copies for all but the
/// last, which takes the event itself, so that one group, the usual case,
/// copies nothing.
fn for_each_group<E: Clone, D>(
    event: E,
    mut procedures: impl DoubleEndedIterator<Item = D>,
    mut f: impl FnMut(D, E),
) {
    let Some(last) = procedures.next_back() else {
        return;
    };
    for procedure in procedures {
        f(procedure, event.clone());
    }
    f(last, event);
}
