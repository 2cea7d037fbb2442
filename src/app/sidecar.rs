//! The sidecar's state: the rooms the event loop feeds, and the one place
//! that passes work between them. Synchronous: the loop (`super`) hands it
//! the session's outputs in the order the router caused them, the sinks'
//! reports and the Redis queue's replies, and gives it the session to make
//! requests on. That order is what makes an EVENT that follows its
//! SUBSCRIBED routable.
//!
//! An EVENT goes: session output -> [`Intake`] (routed, de-duplicated,
//! shaped) -> the first [`Stage`]'s core -> `Deliver` -> its sink; with
//! the Redis queue the admission stage's sink writes it to a stream, the
//! [`RedisQueue`] core hands entries out, and the delivering stage calls
//! the backend. Each stage's outputs are written down by the [`Ledger`].
//! The session bootstrap ([`Bootstrap`]) keeps discovery current.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::bootstrap::Bootstrap;
use super::fatal::Fatal;
use super::intake::{self, EventIn, Intake};
use super::ledger::Ledger;
use super::policies::PolicyState;
use super::procedure_metrics::{Live, ProcedureMetrics};
use super::redis_queue::{self, QueueEvent, QueueIo, RedisQueue};
use super::stage::{Role, Stage, Stages};
use super::token::Token;
use crate::config::OrderBy;
use crate::discovery::Discovery;
use crate::forward::envelope::SharedEvent;
use crate::forward::policy::Policy;
use crate::forward::{DeliveryId, EventCore, Failure, GiveUp, Job, Output};
use crate::metrics::Metrics;
use crate::sink::{Report, Sink, Started};
use crate::streams::carrier::Fields;
use crate::streams::core::{Handed, Key, Output as QueueOutput};
use crate::streams::groups;
use crate::wamp::RequestError;
use crate::wamp::connection::Refused;
use crate::wamp::session::{Output as SessionOutput, Session};

/// `SUBTOCALL_METRICS_MAX_PROCEDURES` unless configured.
const DEFAULT_METRICS_MAX_PROCEDURES: usize = 100;

/// A delivery whose outcome a future will report (Redis pushes).
pub type PendingReport = BoxFuture<'static, (DeliveryId, Report)>;

pub struct Sidecar {
    bootstrap: Bootstrap,
    intake: Intake,
    stages: Stages,
    /// With the Redis queue: what links the admission stage to the
    /// delivering one.
    queue: Option<RedisQueue>,
    ledger: Ledger,
    /// Deliveries started whose report a future will bring; the loop takes them.
    started: Vec<PendingReport>,
    /// This session reached readiness once: it counts as healthy.
    healthy: bool,
    draining: bool,
    /// Every exact group as last seen, and whether its backends are away
    /// (its events wait).
    groups: HashMap<Arc<str>, GroupSeen>,
    /// With the Redis queue: where the groups are kept for every instance.
    kept: Option<groups::Registry>,
    /// Where a group seen for the first time starts.
    start: crate::config::GroupStart,
    /// The groups kept in Redis when this process started: not new.
    known: HashSet<Arc<str>>,
    /// New groups being given their topic's retained events: their live
    /// events wait here meanwhile, in order (at most the admission
    /// stage's capacity each).
    holding: HashMap<Arc<str>, Vec<Job<Box<SharedEvent>>>>,
    /// Events that found no room there: dead-lettered (overflow).
    held_over: Vec<Job<Box<SharedEvent>>>,
    holding_capacity: usize,
    /// The policy file's rules, and each group's policy (`None` in tests
    /// built without a configuration: the global settings).
    policies: Option<PolicyState>,
}

/// A group as the sidecar last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GroupSeen {
    /// The procedure's hash (its unit in the stages).
    unit: u64,
    away: bool,
    /// When it was first seen without a callee (this process's clock).
    away_since: Option<std::time::SystemTime>,
}

impl Sidecar {
    /// A sidecar of one stage, delivering through `sink`.
    pub fn new(
        discovery: Discovery,
        core: EventCore,
        sink: Box<dyn Sink<Token> + Send>,
        metrics: Arc<Metrics>,
        dead_letter_store: Option<mpsc::Sender<Vec<u8>>>,
        request_timeout: std::time::Duration,
        now: Instant,
    ) -> Sidecar {
        let marker = discovery.marker().clone();
        let per_procedure =
            ProcedureMetrics::new(metrics.clone(), DEFAULT_METRICS_MAX_PROCEDURES, marker);
        let mut stages = Stages::default();
        stages.push(Role::Deliver, core, sink, now);
        Sidecar {
            bootstrap: Bootstrap::new(discovery, request_timeout),
            intake: Intake::new(OrderBy::None, None),
            stages,
            queue: None,
            ledger: Ledger::new(metrics, per_procedure, dead_letter_store),
            started: Vec::new(),
            healthy: false,
            draining: false,
            groups: HashMap::new(),
            kept: None,
            start: crate::config::GroupStart::Now,
            known: HashSet::new(),
            holding: HashMap::new(),
            held_over: Vec::new(),
            holding_capacity: 10_000,
            policies: None,
        }
    }

    /// Applies the policy file's rules (`state`): discovery resolves each
    /// group's policy with them.
    pub fn with_policies(mut self, state: PolicyState) -> Sidecar {
        self.bootstrap
            .discovery_mut()
            .set_policies(state.current().clone());
        self.policies = Some(state);
        self
    }

    /// The policy file read again after SIGHUP (`text`, or why it could
    /// not be read). A usable file applies to the events accepted from now
    /// on; a bad one changes nothing, and is said in the log and in
    /// `/status`.
    pub fn reload_policies(&mut self, text: std::io::Result<String>, now: Instant) {
        let Some(state) = &mut self.policies else {
            return;
        };
        let m = &self.ledger.metrics;
        match state.reload(text) {
            Ok(policies) => {
                m.policy_reloads.inc();
                tracing::info!(
                    rules = policies.rules().len(),
                    hash = policies.source().map_or("", |s| s.hash.as_str()),
                    "policy file reloaded: events accepted from now on follow its rules"
                );
                self.bootstrap.discovery_mut().set_policies(policies);
                self.sync_groups(now);
            }
            Err(why) => {
                m.policy_reload_failures.inc();
                tracing::warn!(error = %why, "policy file not reloaded: the rules in effect stay");
            }
        }
    }

    /// The policy file's rules in effect and the last refused reload.
    pub fn policies(&self) -> Option<&PolicyState> {
        self.policies.as_ref()
    }

    /// Gives each group seen for the first time its topic's retained
    /// events first (`SUBTOCALL_NEW_GROUP_START=retained`, Redis queue);
    /// its live events wait meanwhile, `capacity` at most.
    pub fn with_new_groups_from_retained(mut self, capacity: usize) -> Sidecar {
        self.start = crate::config::GroupStart::Retained;
        self.holding_capacity = capacity.max(1);
        self
    }

    /// Keeps the groups in Redis for every instance (`registry`), and
    /// starts with those kept there: each reads its topic until its grace
    /// period ends, its events waiting for a callee.
    pub fn keep_groups(
        &mut self,
        registry: groups::Registry,
        kept: Vec<groups::Kept>,
        now: Instant,
    ) {
        let grace = self.bootstrap.discovery().grace();
        let wall = std::time::SystemTime::now();
        let mut remembered = Vec::new();
        for k in kept {
            self.known.insert(Arc::from(k.procedure.as_str()));
            let left = k
                .kept_until(grace, wall)
                .duration_since(wall)
                .unwrap_or_default();
            if left.is_zero() {
                // Its grace period ended while no instance ran.
                registry.send(groups::Change::Forget(k.procedure));
                continue;
            }
            tracing::info!(
                procedure = %k.procedure,
                away = k.away_since.is_some(),
                kept_for = ?left,
                "a group kept in Redis: reading its topic for its grace period unless its backends come back"
            );
            remembered.push((k.procedure, now + left));
        }
        self.bootstrap.keep_groups(remembered);
        self.kept = Some(registry);
    }

    /// Delivers events with the same key one at a time, in order; with
    /// the Redis queue, admits each keyed event to one of `partitions`
    /// streams of its procedure, by key.
    pub fn with_intake(mut self, order_by: OrderBy, partitions: Option<u16>) -> Sidecar {
        self.intake = Intake::new(order_by, partitions);
        self
    }

    /// Gives at most `max` procedures metrics of their own.
    pub fn with_procedure_metrics(mut self, max: usize) -> Sidecar {
        let marker = self.bootstrap.discovery().marker().clone();
        let metrics = self.ledger.metrics.clone();
        self.ledger.per_procedure = ProcedureMetrics::new(metrics, max, marker);
        self
    }

    /// Uses the Redis queue: the first stage (its core and sink given to
    /// [`Sidecar::new`]) admits events to the streams, and a second stage,
    /// `core` and `sink`, delivers what `queue` hands out.
    pub fn with_queue(
        mut self,
        queue: RedisQueue,
        core: EventCore,
        sink: Box<dyn Sink<Token> + Send>,
        now: Instant,
    ) -> Sidecar {
        self.stages.first().role = Role::Admit;
        self.stages.push(Role::DeliverQueued, core, sink, now);
        self.queue = Some(queue);
        // Not ready until Redis has answered once.
        self.ledger.metrics.redis_up.set(0);
        self
    }

    // ------------------------------------------------------------ the session

    /// A new session: discovery starts from nothing, meta topics first.
    pub fn on_joined(&mut self, session: &mut Session<Token>, now: Instant) {
        self.bootstrap.on_joined(session, now);
        self.healthy = false;
        self.stages.set_joined(true, now);
    }

    /// What discovery says of its groups, applied: a group whose backends
    /// are away waits (its events are kept, no call is made), one with a
    /// callee again goes on, one gone after its grace period is let go;
    /// with the Redis queue, kept in Redis for every instance.
    ///
    /// Only once discovery is synced: until the registration list is
    /// answered, every group would look away (at every rejoin).
    ///
    /// A group new to this process and to the groups kept in Redis is
    /// given its topic's past first (`SUBTOCALL_NEW_GROUP_START=retained`)
    /// as soon as it is seen, synced or not: it is called right after the
    /// meta event that made it, before an EVENT for it can be taken in.
    fn sync_groups(&mut self, now: Instant) {
        let synced = self.bootstrap.is_synced();
        let states: Vec<crate::discovery::GroupState> =
            self.bootstrap.discovery().group_states().collect();
        if let Some(state) = &mut self.policies {
            state.note_patterns(self.bootstrap.discovery().pattern_policies());
            for (procedure, max) in state.note_groups(states.iter(), synced) {
                if let Some(q) = &mut self.queue {
                    q.queue.set_max_deliveries(&procedure, max);
                }
            }
        }
        if !synced && self.start == crate::config::GroupStart::Now {
            return;
        }
        let wall = std::time::SystemTime::now();
        let mut seen: HashMap<Arc<str>, GroupSeen> = HashMap::with_capacity(self.groups.len());
        for g in states {
            let before = self.groups.get(&g.procedure).copied();
            let now_seen = GroupSeen {
                unit: g.unit,
                away: g.away,
                away_since: match before {
                    Some(b) if b.away && g.away => b.away_since,
                    _ => g.away.then_some(wall),
                },
            };
            if before.is_none()
                && !g.away
                && self.start == crate::config::GroupStart::Retained
                && !self.known.contains(&g.procedure)
                && let Some(q) = &mut self.queue
            {
                // New to this process and to the groups kept in Redis: its
                // topic's past first, its live events held meanwhile.
                self.known.insert(g.procedure.clone());
                self.holding.insert(g.procedure.clone(), Vec::new());
                tracing::info!(procedure = %g.procedure, topic = %g.topic.topic, "a new group: giving it its topic's retained events first");
                let shape = redis_queue::Shape {
                    order_by: g
                        .policy
                        .as_ref()
                        .map_or_else(|| self.intake.order_by().clone(), |p| p.order_by.clone()),
                    partitions: self.intake.partitions(),
                };
                q.start_backfill(g.procedure.clone(), g.topic.topic.clone(), shape);
            }
            if !synced {
                // Until the registration list is answered every group
                // looks away (at every rejoin): nothing else is compared.
                // A group new to this process waits meanwhile: a restarted
                // instance reads a kept group's streams at once, and would
                // call a procedure nobody may register (an event past its
                // retry age then dead-lettered on its first failure).
                if before.is_none() {
                    self.stages.set_away(g.unit, true, now);
                    if let Some(q) = &mut self.queue {
                        q.queue.pause(&g.procedure);
                    }
                }
                continue;
            }
            if before.map(|b| b.away) != Some(g.away) {
                self.stages.set_away(g.unit, g.away, now);
                if let Some(q) = &mut self.queue {
                    if g.away {
                        q.queue.pause(&g.procedure);
                    } else {
                        q.queue.resume(&g.procedure);
                    }
                }
                if g.away {
                    tracing::info!(procedure = %g.procedure, "no callee: its events wait for one (no call is made) until its grace period ends");
                } else if before.is_some() {
                    tracing::info!(procedure = %g.procedure, "a callee again: its waiting events go on");
                }
                if let Some(kept) = &self.kept {
                    kept.send(groups::Change::Keep(groups::Kept {
                        procedure: g.procedure.to_string(),
                        topic: g.topic.topic.clone(),
                        group: g.group.name.clone(),
                        batch: g.group.batch,
                        away_since: now_seen.away_since,
                    }));
                }
            }
            seen.insert(g.procedure, now_seen);
        }
        if !synced {
            return;
        }
        for (procedure, before) in &self.groups {
            if seen.contains_key(procedure) {
                continue;
            }
            // Gone (its grace period ended): what waited goes on, and
            // fails as calls to a procedure nobody registers.
            if before.away {
                self.stages.set_away(before.unit, false, now);
                if let Some(q) = &mut self.queue {
                    q.queue.resume(procedure);
                }
            }
            if let Some(kept) = &self.kept {
                kept.send(groups::Change::Forget(procedure.to_string()));
            }
        }
        self.groups = seen;
        let waiting = self.groups.values().filter(|g| g.away).count();
        self.ledger.metrics.groups_waiting.set(waiting as i64);
    }

    /// The groups whose backends are away, and since when (this process's
    /// view): what `/status` shows as waiting for a callee.
    pub fn groups_away(&self) -> impl Iterator<Item = (&str, Option<std::time::SystemTime>)> {
        self.groups
            .iter()
            .filter(|(_, g)| g.away)
            .map(|(p, g)| (&**p, g.away_since))
    }

    /// The session is gone: no delivery starts on it any more. The loop
    /// then hands over its pending requests, answered "connection lost"
    /// (discovery's are ignored, deliveries are retried).
    pub fn on_session_end(&mut self, now: Instant) {
        self.bootstrap.on_session_end();
        self.stages.set_joined(false, now);
        if self.draining {
            // No new session comes while draining: what needs one cannot
            // deliver (a queue's entries are released to the other
            // instances at once).
            self.stages.stop_without_session(now);
        }
    }

    /// Whether the session reached readiness (discovery complete) once.
    pub fn was_healthy(&self) -> bool {
        self.healthy
    }

    /// Why the session must be dropped and joined anew, once.
    pub fn take_rejoin(&mut self) -> Option<String> {
        self.bootstrap.take_rejoin()
    }

    /// Joined, discovery complete, Redis answering (Redis queue), not draining.
    pub fn is_ready(&self) -> bool {
        self.bootstrap.is_synced()
            && !self.draining
            && self.queue.as_ref().is_none_or(|q| q.is_up())
    }

    /// One output of the session, in order.
    pub fn on_session_output(
        &mut self,
        output: SessionOutput<Token>,
        session: &mut Session<Token>,
        now: Instant,
    ) -> Result<(), Fatal> {
        match output {
            SessionOutput::Reply {
                token: Token::Deliver(id),
                reply,
            } => {
                let outcome = reply.map(drop).map_err(Failure::Call);
                self.on_report(id, Report::All(outcome), now);
            }
            SessionOutput::Reply { token, reply } => {
                self.bootstrap.on_reply(token, reply, session, now)?;
                self.poll_discovery(session, now);
            }
            SessionOutput::RawEvent(event) => match self.bootstrap.meta_topic(event.subscription) {
                Some(topic) => {
                    match event.payload.decode() {
                        Ok(payload) => {
                            self.bootstrap
                                .on_meta_event(topic, &payload.args, session, now)
                        }
                        Err(e) => {
                            tracing::warn!(topic, error = %e, "ignoring malformed meta event")
                        }
                    }
                    self.poll_discovery(session, now);
                }
                None => self.on_event(event, now),
            },
            SessionOutput::Event(event) => match self.bootstrap.meta_topic(event.subscription) {
                Some(topic) => {
                    self.bootstrap
                        .on_meta_event(topic, &event.payload.args, session, now);
                    self.poll_discovery(session, now);
                }
                None => self.on_event(event, now),
            },
            SessionOutput::Revoked { kind, details } => self.bootstrap.on_revoked(kind, &details),
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

    /// An EVENT on one of our forwarding subscriptions: into the first
    /// stage, once for each group that reads its topic.
    fn on_event<E: EventIn>(&mut self, event: E, now: Instant) {
        let Stage { core, sink, .. } = self.stages.first();
        let sink = &**sink;
        let queue = &mut self.queue;
        let (holding, held_over) = (&mut self.holding, &mut self.held_over);
        let capacity = self.holding_capacity;
        let accept = |mut job: Job<Box<SharedEvent>>| {
            if queue.is_some() {
                // Admission (now, or after a new group's past) follows the
                // global settings; the procedure's policy applies where the
                // entry is delivered.
                job.policy = None;
            }
            if !holding.is_empty()
                && let Some(held) = holding.get_mut(&job.item.procedure)
            {
                // A new group's live events wait for its past.
                if held.len() < capacity {
                    held.push(job);
                } else {
                    held_over.push(job);
                }
                return;
            }
            if let Some(q) = queue {
                // Its stream is read from now on (a no-op once it is).
                q.queue.add_procedure(&job.item.procedure, now);
            }
            core.accept_job(job, now);
        };
        let discovery = self.bootstrap.discovery();
        let prepare = |e: &SharedEvent, policy: Option<&Policy>| sink.prepare(e, policy);
        self.intake
            .on_event(event, discovery, &mut self.ledger, prepare, now, accept);
        for mut job in std::mem::take(&mut self.held_over) {
            job.last_error = Some(
                "no room while its new group was given its topic's retained events \
                 (SUBTOCALL_QUEUE_CAPACITY)"
                    .into(),
            );
            self.dead_letter(&job, GiveUp::Overflow, now);
        }
    }

    /// A new group's backfill ended: its live events held meanwhile go on,
    /// in order.
    fn on_backfilled(&mut self, procedure: Arc<str>, done: Result<u64, String>, now: Instant) {
        let m = &self.ledger.metrics;
        match done {
            Ok(n) => {
                m.queue_backfilled.inc_by(n);
                tracing::info!(%procedure, events = n, "the new group was given its topic's retained events; its live events follow");
            }
            Err(e) => {
                m.queue_backfills_failed.inc();
                tracing::warn!(%procedure, error = %e, "could not give the new group its topic's retained events; its live events go on without them");
            }
        }
        let held = self.holding.remove(&procedure).unwrap_or_default();
        let Stage { core, .. } = self.stages.first();
        for job in held {
            if let Some(q) = &mut self.queue {
                q.queue.add_procedure(&job.item.procedure, now);
            }
            core.accept_job(job, now);
        }
    }

    /// An EVENT over SUBTOCALL_MAX_MESSAGE_SIZE that the connection did not
    /// take: counted, and logged with what could be read of it.
    pub fn on_refused(&mut self, refused: Refused) {
        intake::on_refused(refused, self.bootstrap.discovery(), &self.ledger.metrics);
    }

    // ------------------------------------------------------------ deliveries

    /// A delivery's outcome, from the session or a sink's future: its
    /// stage's core decides what it means.
    pub fn on_report(&mut self, id: DeliveryId, report: Report, now: Instant) {
        let i = self.stages.of(id);
        self.dead_letter_evicted(i, now);
        let stage = self.stages.get_mut(i);
        match (stage.role, &mut self.queue) {
            (Role::DeliverQueued, Some(q))
                if matches!(
                    report,
                    Report::All(Err(Failure::Call(RequestError::Fenced)))
                ) =>
            {
                // Never written: its entries are no longer certainly ours,
                // and are left to whoever holds them now.
                q.take_back(&mut stage.core, id, now);
                return;
            }
            // The admission stage's outcome says whether Redis answers.
            (Role::Admit, Some(q)) => match &report {
                Report::All(Ok(())) => q.set_up(true, &self.ledger.metrics),
                Report::All(Err(error)) => {
                    if q.is_up() {
                        tracing::warn!(%error, "cannot admit events to the Redis queue; they wait in memory and are retried");
                    }
                    q.set_up(false, &self.ledger.metrics);
                }
                Report::Each(_) => {}
            },
            _ => {}
        }
        if let Some(jobs) = stage.core.delivery(id) {
            let redis = !stage.sink.needs_session();
            self.ledger.failures(jobs, &report, redis);
        }
        let known = match report {
            Report::All(outcome) => stage.core.on_outcome(id, outcome, now),
            Report::Each(outcomes) => stage.core.on_outcomes(id, outcomes, now),
        };
        if !known {
            tracing::debug!(delivery = %id, "outcome of a delivery already given up or released (shutdown deadline)");
        }
    }

    /// What the Redis queue's IO brought: a command's reply goes to the
    /// queue core; an admission batch's grants to the queue core and its
    /// outcome to the admission stage.
    pub fn on_queue_event(&mut self, event: QueueEvent, now: Instant) {
        let (id, report) = match (event, &mut self.queue) {
            (QueueEvent::Reply(id, reply), Some(q)) => return q.queue.on_reply(id, reply, now),
            (QueueEvent::Reply(..), None) => return,
            (QueueEvent::Admitted(id, admitted), Some(q)) => (id, q.on_admitted(admitted, now)),
            (QueueEvent::Admitted(id, admitted), None) => (id, admitted.report),
            (QueueEvent::Backfilled(procedure, done), _) => {
                return self.on_backfilled(procedure, done, now);
            }
        };
        self.on_report(id, report, now);
    }

    /// Deliveries started whose outcome a future will report.
    pub fn take_started(&mut self) -> std::vec::Drain<'_, PendingReport> {
        self.started.drain(..)
    }

    /// Does everything that needs no waiting: discovery's requests (while
    /// joined and not draining), each stage's outputs in order, gauges.
    pub fn pump(&mut self, mut session: Option<&mut Session<Token>>, now: Instant) {
        if let Some(session) = session.as_deref_mut() {
            self.poll_discovery(session, now);
        }
        for i in 0..self.stages.len() {
            self.pump_stage(i, session.as_deref_mut(), now);
        }
        self.ledger.flush(now);
        if self.is_ready() {
            self.healthy = true;
        }
        let m = &self.ledger.metrics;
        self.bootstrap.set_gauges(m);
        m.ready.set(i64::from(self.is_ready()));
        m.queue_depth.set(self.stages.held().0 as i64);
        m.calls_in_flight.set(self.stages.delivering() as i64);
        if self.ledger.per_procedure.refresh_due(now) {
            let live = self.stages.live();
            self.ledger.per_procedure.refresh(live, now);
        }
    }

    /// Discovery's requests and notes (while joined and not draining), and
    /// what its groups' changes mean. Called by `pump`, and right after a
    /// meta event or a reply to discovery, so that an EVENT read after it
    /// meets the groups as they are now.
    fn poll_discovery(&mut self, session: &mut Session<Token>, now: Instant) {
        if !self.bootstrap.is_joined() || self.draining {
            return;
        }
        let stages = &self.stages;
        let due = self.bootstrap.next_wake().is_some_and(|at| at <= now);
        let changed = self.bootstrap.poll(session, now, |uri| {
            // The stream target creates the stream and its group now,
            // before the first event.
            for s in stages.iter().filter(|s| s.role.delivers()) {
                s.sink.prepare_procedure(uri);
            }
        });
        if changed || due {
            self.sync_groups(now);
        }
    }

    /// Stage `i`'s outputs until it has none; for the stage the Redis
    /// queue feeds, what the queue core says first, until neither has more.
    fn pump_stage(&mut self, i: usize, mut session: Option<&mut Session<Token>>, now: Instant) {
        let fed = self.stages.get(i).role == Role::DeliverQueued;
        if fed && let Some(q) = &mut self.queue {
            q.queue.on_tick(now);
        }
        self.stages.get_mut(i).core.on_tick(now);
        let mut released = 0;
        loop {
            if fed && let Some(output) = self.queue.as_mut().and_then(|q| q.queue.poll()) {
                self.on_queue_output(output, now);
                continue;
            }
            let Some(output) = self.stages.get_mut(i).core.poll() else {
                if fed && let Some(q) = &mut self.queue {
                    // Acknowledgements of what was just delivered go out now.
                    q.queue.on_tick(now);
                    if q.queue.has_output() {
                        continue;
                    }
                }
                break;
            };
            released += self.on_output(i, output, session.as_deref_mut(), now);
        }
        if released > 0 {
            tracing::info!(
                entries = released,
                "left unfinished entries in the Redis queue for the other instances"
            );
        }
    }

    /// One output of stage `i`'s core; how many queue entries it released.
    fn on_output(
        &mut self,
        i: usize,
        output: Output<Box<SharedEvent>>,
        session: Option<&mut Session<Token>>,
        now: Instant,
    ) -> usize {
        let role = self.stages.get(i).role;
        match output {
            Output::Deliver(id) => self.start(id, session, now),
            Output::Ack(job) if !role.delivers() => {
                tracing::trace!(publication = %job.item.publication, "event offered to the Redis queue");
            }
            Output::Ack(job) => {
                if let (Some(q), Some(key)) = (&mut self.queue, redis_queue::key_of(&job)) {
                    q.queue.on_delivered(key);
                    q.delivered(&job);
                }
                let pushed = !self.stages.get(i).sink.needs_session();
                self.ledger.delivered(&job, pushed, now);
            }
            Output::DeadLetter(job, GiveUp::Shutdown) if role == Role::DeliverQueued => {
                // Not given up: left in the stream for the other instances.
                if let (Some(q), Some(key)) = (&mut self.queue, redis_queue::key_of(&job)) {
                    q.queue.release(key);
                    self.ledger.metrics.queue_released.inc();
                    return 1;
                }
            }
            Output::DeadLetter(job, why) => self.dead_letter(&job, why, now),
            Output::Retrying { events, .. } => {
                // Admission retries until Redis answers: not a failed delivery.
                if role.delivers() {
                    self.ledger.metrics.events_retried.inc_by(events as u64);
                }
            }
            // With the Redis queue, ordering is the delivering stage's.
            Output::KeyReleased => {
                if role.delivers() {
                    self.ledger.key_released();
                }
            }
        }
        0
    }

    /// One output of the Redis queue's core.
    fn on_queue_output(&mut self, output: QueueOutput<Fields>, now: Instant) {
        let metrics = self.ledger.metrics.clone();
        match output {
            QueueOutput::Send(id, command) => {
                if let Some(q) = &mut self.queue {
                    q.carry(id, command);
                }
            }
            QueueOutput::Deliver(handed) => {
                for h in handed {
                    self.take_entry(h, now);
                }
            }
            QueueOutput::Poison(h) => self.poison(h, now),
            QueueOutput::Withdraw(keys) => {
                let (Some(q), Some(stage)) =
                    (&mut self.queue, self.stages.with_role(Role::DeliverQueued))
                else {
                    return;
                };
                let keys: HashSet<Key> = keys.into_iter().collect();
                let back: Vec<Key> = stage
                    .core
                    .withdraw(|e| e.entry.as_ref().is_some_and(|e| keys.contains(&e.key)))
                    .into_iter()
                    .filter_map(|j| j.item.entry.map(|e| e.key))
                    .collect();
                q.queue.on_withdrawn(&back);
            }
            QueueOutput::RedisUp(up) => {
                if let Some(q) = &mut self.queue {
                    if !up {
                        tracing::warn!("the Redis queue does not answer; retrying");
                    }
                    q.set_up(up, &metrics);
                }
            }
            QueueOutput::Note(note) => redis_queue::on_note(note, &metrics),
        }
    }

    /// An entry the queue core handed out: into the delivering stage, or,
    /// if it holds no event, to the dead-letter stream.
    fn take_entry(&mut self, handed: Handed<Fields>, now: Instant) {
        let (Some(q), Some(stage)) = (&mut self.queue, self.stages.with_role(Role::DeliverQueued))
        else {
            return;
        };
        if handed.taken_over {
            self.ledger.metrics.queue_taken_over.inc();
        }
        match redis_queue::read_entry(&handed) {
            Ok(event) => {
                let batch = self
                    .bootstrap
                    .discovery()
                    .marker()
                    .is_batch(&event.procedure);
                let policy = self.policies.as_ref().and_then(|p| p.of(&event.procedure));
                let job = RedisQueue::job(&handed, event, &*stage.sink, policy.as_deref(), now);
                // Counted unordered when it was admitted, not again.
                let unit = crate::forward::key::fnv1a64(job.item.procedure.as_bytes());
                let (job, _) =
                    intake::shaped(self.intake.order_by(), None, job, batch, unit, policy);
                stage.core.accept_job(job, now);
            }
            Err((why, shown)) => {
                self.ledger.metrics.queue_malformed.inc();
                q.dead_letter_malformed(&handed, why, shown);
            }
        }
    }

    /// An entry handed out too often: dead-lettered without a delivery.
    fn poison(&mut self, handed: Handed<Fields>, now: Instant) {
        let Some(stage) = self.stages.with_role(Role::DeliverQueued) else {
            return;
        };
        match redis_queue::read_entry(&handed) {
            Ok(event) => {
                let mut job = RedisQueue::job(&handed, event, &*stage.sink, None, now);
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

    /// Starts a delivery of whichever stage it is. An admission reads
    /// what the queue core grants as it writes. A queue delivery whose
    /// entries are no longer certainly this instance's is taken back
    /// instead: nobody is called.
    fn start(&mut self, id: DeliveryId, session: Option<&mut Session<Token>>, now: Instant) {
        let stage = self.stages.get_mut(self.stages.of(id));
        let mut send_by = None;
        match (stage.role, &mut self.queue) {
            (Role::Admit, Some(q)) => {
                if let Some(jobs) = stage.core.delivery(id) {
                    q.admit(id, jobs, now);
                }
                return;
            }
            // A queue delivery starts only while its entries are certainly
            // ours, and its call must be written before that ends.
            (Role::DeliverQueued, Some(q)) => {
                let Some(jobs) = stage.core.delivery(id) else {
                    return;
                };
                match q.certain_until(jobs) {
                    Some(until) if now < until => send_by = Some(until),
                    _ => {
                        q.take_back(&mut stage.core, id, now);
                        return;
                    }
                }
            }
            _ => {}
        }
        let Some(jobs) = stage.core.delivery(id) else {
            return;
        };
        if jobs.first().is_some_and(|j| j.batch.is_some()) {
            self.ledger.metrics.batch_calls.inc();
        }
        let mut session = session;
        match stage.sink.start(id, jobs, session.as_deref_mut(), now) {
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

    /// Entries stage `i`'s sink removed from a Redis stream to make room
    /// (`drop-oldest` at the backlog bound): dead letters.
    fn dead_letter_evicted(&mut self, i: usize, now: Instant) {
        for event in self.stages.get_mut(i).sink.take_evicted() {
            let mut job = Job::new(Box::new(event), now);
            job.last_error = Some(
                "removed from the stream to make room for newer events \
                 (SUBTOCALL_REDIS_MAX_BACKLOG or SUBTOCALL_QUEUE_MAX_BACKLOG, \
                 SUBTOCALL_OVERFLOW=drop-oldest)"
                    .into(),
            );
            self.ledger.dead_letter(&job, GiveUp::Backlog, now);
            if let Some(q) = &mut self.queue {
                q.dead_letter_removed(&job);
            }
        }
    }

    /// Written down, and with the Redis queue moved to the procedure's
    /// dead-letter stream.
    fn dead_letter(&mut self, job: &Job<Box<SharedEvent>>, why: GiveUp, now: Instant) {
        self.ledger.dead_letter(job, why, now);
        if let Some(q) = &mut self.queue {
            q.dead_letter(job, why);
        }
    }

    // ------------------------------------------------------------ shutdown

    /// Stops discovery, unsubscribes (events already on their way are still
    /// delivered), and gives the stages until `deadline`.
    pub fn begin_drain(
        &mut self,
        session: Option<&mut Session<Token>>,
        deadline: Instant,
        now: Instant,
    ) {
        let (waiting, in_flight) = self.stages.held();
        tracing::info!(
            waiting,
            in_flight,
            deadline_in = ?deadline.saturating_duration_since(now),
            "shutdown requested: no new subscriptions, draining accepted events"
        );
        self.draining = true;
        // New groups' live events held for their past are admitted now
        // (ahead of a past not given yet, rather than lost).
        let held: Vec<_> = self.holding.drain().flat_map(|(_, jobs)| jobs).collect();
        if !held.is_empty() {
            tracing::warn!(
                events = held.len(),
                "shutdown while new groups were given their topic's past: their live events are admitted without waiting for it"
            );
            let Stage { core, .. } = self.stages.first();
            for job in held {
                core.accept_job(job, now);
            }
        }
        if let Some(q) = &mut self.queue {
            // Nothing new is read; what is held is delivered or released.
            q.queue.shutdown();
            // What waits for a callee is left to the other instances at
            // once: nothing here will call it before the deadline.
            let away: HashSet<u64> = self
                .groups
                .values()
                .filter(|g| g.away)
                .map(|g| g.unit)
                .collect();
            if let Some(stage) = self.stages.with_role(Role::DeliverQueued)
                && !away.is_empty()
            {
                let back = stage.core.withdraw(|e| {
                    away.contains(&crate::forward::key::fnv1a64(e.procedure.as_bytes()))
                });
                for key in back.iter().filter_map(redis_queue::key_of) {
                    q.queue.release(key);
                    self.ledger.metrics.queue_released.inc();
                }
                if !back.is_empty() {
                    tracing::info!(
                        entries = back.len(),
                        "left the entries waiting for a callee in the Redis queue for the other instances"
                    );
                }
            }
        }
        let joined = self.bootstrap.is_joined();
        let session = session.filter(|_| joined);
        // Nothing can deliver through a session that is not there.
        self.stages.drain(deadline, session.is_some(), now);
        if let Some(session) = session {
            self.bootstrap.unsubscribe_all(session, now);
        }
    }

    /// Ends the drain now: everything unfinished is dead-lettered (or, from
    /// the Redis queue, released), and the last dead-letter summary is
    /// logged.
    pub fn stop(&mut self, now: Instant) {
        self.draining = true;
        self.stages.stop(now);
        self.pump(None, now);
        self.ledger.finish();
    }

    /// Nothing waiting or in flight in any stage (and, with the Redis
    /// queue, its last commits made and its leases given up).
    pub fn is_idle(&self) -> bool {
        self.stages.is_idle() && self.queue_finished()
    }

    /// The shutdown deadline passed.
    pub fn is_stopped(&self) -> bool {
        self.stages.is_stopped()
    }

    /// Events waiting and in flight, all stages together.
    pub fn held(&self) -> (usize, usize) {
        self.stages.held()
    }

    /// Earliest time something is due: a retry, the drain deadline, a
    /// queue refresh, a discovery timer (while joined), a dead-letter
    /// summary.
    pub fn next_wake(&self) -> Option<Instant> {
        let discovery = if self.bootstrap.is_joined() && !self.draining {
            self.bootstrap.next_wake()
        } else {
            None
        };
        [
            self.stages.next_wake(),
            self.queue.as_ref().and_then(|q| q.queue.next_wake()),
            discovery,
            self.ledger.next_flush(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn bootstrap(&self) -> &Bootstrap {
        &self.bootstrap
    }

    /// Each procedure's counts.
    pub fn per_procedure(&self) -> &ProcedureMetrics {
        &self.ledger.per_procedure
    }

    /// What each procedure has in flight and waiting, over every stage.
    pub fn live(&self) -> HashMap<&str, Live> {
        self.stages.live()
    }

    /// Whether Redis answers (Redis queue; `None` without it).
    pub fn redis_up(&self) -> Option<bool> {
        self.queue.as_ref().map(|q| q.is_up())
    }

    /// Replica acknowledgement, as the metrics count it (Redis queue with
    /// `SUBTOCALL_REDIS_WAIT_REPLICAS` > 0).
    pub fn replicas(&self) -> Option<crate::status::Replicas> {
        let m = &self.ledger.metrics;
        let wanted = m.redis_wait_replicas.get();
        if self.queue.is_none() || wanted <= 0 {
            return None;
        }
        Some(crate::status::Replicas {
            wanted: wanted as u64,
            // -1 until the first answer.
            acknowledging: u64::try_from(m.redis_replicas_acknowledging.get()).ok(),
            unconfirmed: m.queue_unconfirmed.get().max(0) as u64,
            unprotected_total: m.queue_unprotected.get(),
            reoffered_total: m.queue_reoffered.get(),
        })
    }

    /// Shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Closes the dead-letter store channel so its task can finish.
    pub fn close_dead_letter_store(&mut self) {
        self.ledger.close_dead_letter_store();
    }

    /// Hands `io` what the Redis queue started since last asked.
    pub fn take_queue_io(&mut self, io: &mut QueueIo) {
        if let Some(q) = &mut self.queue {
            io.take_from(q);
        }
    }

    /// Whether the Redis queue is done (its leases given up), or there is
    /// none.
    pub fn queue_finished(&self) -> bool {
        self.queue.as_ref().is_none_or(|q| q.queue.is_finished())
    }
}
