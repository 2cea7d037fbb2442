//! Intake: an EVENT on one of the forwarding subscriptions becomes one job
//! per group that reads its topic. Routed by discovery (subscription ->
//! topic -> procedures), de-duplicated per group by publication id, given
//! its outgoing form by the first stage's sink, its ordering key
//! (`SUBTOCALL_ORDER_BY`), its batch line, and with the Redis queue and
//! ordering its partition. Counted once here as received.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::ledger::Ledger;
use crate::config::OrderBy;
use crate::discovery::{self, Destination, Discovery};
use crate::forward::dedup::{DEFAULT_CAPACITY, Dedup};
use crate::forward::envelope::{Outgoing, SharedEvent};
use crate::forward::key::{KeyOf, OrderKey};
use crate::forward::policy::Policy;
use crate::forward::{Batched, Job};
use crate::metrics::Metrics;
use crate::wamp::connection::Refused;
use crate::wamp::{Dict, Event, PublicationId, RawEvent, SubscriptionId};

pub struct Intake {
    dedup: Dedup,
    /// Per-key ordering (`SUBTOCALL_ORDER_BY`).
    order_by: OrderBy,
    /// Partitions per procedure for keyed events (Redis queue, ordering).
    lanes: Option<u16>,
    /// Where an EVENT's destinations (one per group) are gathered; reused.
    procedures: Vec<Destination>,
}

impl Intake {
    pub fn new(order_by: OrderBy, lanes: Option<u16>) -> Intake {
        Intake {
            dedup: Dedup::new(DEFAULT_CAPACITY),
            order_by,
            lanes,
            procedures: Vec::new(),
        }
    }

    pub fn order_by(&self) -> &OrderBy {
        &self.order_by
    }

    /// Partitions per procedure for keyed events (Redis queue, ordering).
    pub fn partitions(&self) -> Option<u16> {
        self.lanes
    }

    /// An EVENT on one of our forwarding subscriptions: `accept` is given
    /// a job for each group that reads its topic and has not had it yet,
    /// its outgoing form made by `prepare`.
    pub fn on_event<E: EventIn>(
        &mut self,
        event: E,
        discovery: &Discovery,
        ledger: &mut Ledger,
        prepare: impl Fn(&SharedEvent, Option<&Policy>) -> Outgoing,
        now: Instant,
        mut accept: impl FnMut(Job<Box<SharedEvent>>),
    ) {
        let mut procedures = std::mem::take(&mut self.procedures);
        let (subscription, publication, details) = event.head();
        if let Some(topic) = self.route(
            subscription,
            publication,
            details,
            discovery,
            ledger,
            &mut procedures,
        ) {
            let received = SystemTime::now();
            let each = procedures.drain(..);
            // The first group's copy is the one retained for the topic.
            let mut first = true;
            for_each_group((event, topic), each, |d, (event, topic)| {
                let mut event = event.into_shared(d.procedure, topic, received);
                event.retain = std::mem::take(&mut first);
                event.outgoing = prepare(&event, d.policy.as_deref());
                let job = Job::new(Box::new(event), now);
                let metrics = Some(&*ledger.metrics);
                let (mut job, key) =
                    shaped(&self.order_by, metrics, job, d.batch, d.unit, d.policy);
                if let (Some(partitions), Some(key)) = (self.lanes, key) {
                    job.item.lane = Some(key.partition(partitions));
                }
                accept(job);
            });
        }
        self.procedures = procedures;
    }

    /// Routes an EVENT of a forwarding subscription and de-duplicates it:
    /// the procedure and concrete topic when it is to be forwarded.
    fn route(
        &mut self,
        subscription: SubscriptionId,
        publication: PublicationId,
        details: &Dict,
        discovery: &Discovery,
        ledger: &mut Ledger,
        procedures: &mut Vec<Destination>,
    ) -> Option<String> {
        // One event received per group reading the topic (at least one),
        // so that every one received is accounted for once.
        procedures.clear();
        let metrics = &ledger.metrics;
        let routed = discovery.route_into(subscription, details.get_str("topic"), procedures);
        let topic = match routed {
            Ok(_) if procedures.is_empty() => {
                // Every group left; the UNSUBSCRIBE is on its way.
                metrics.events_received.inc();
                metrics.unroutable(false).inc();
                tracing::debug!(%subscription, %publication, "event for a topic no group reads any more");
                return None;
            }
            Ok(topic) => {
                metrics.events_received.inc_by(procedures.len() as u64);
                topic
            }
            Err(e) => {
                metrics.events_received.inc();
                let missing_topic = matches!(e, discovery::RouteError::MissingTopic { .. });
                metrics.unroutable(missing_topic).inc();
                tracing::debug!(error = %e, %publication, "event not routable");
                return None;
            }
        };
        // An event matching several of our subscriptions is forwarded once
        // to each group.
        let dedup = &mut self.dedup;
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
            ledger.per_procedure.received(&d.procedure);
        }
        (!procedures.is_empty()).then(|| topic.to_owned())
    }
}

/// An EVENT over SUBTOCALL_MAX_MESSAGE_SIZE that the connection did not
/// take: counted, and logged with what could be read of it.
pub fn on_refused(refused: Refused, discovery: &Discovery, metrics: &Metrics) {
    metrics.events_refused_too_large.inc();
    let Refused { size, limit, event } = refused;
    match event {
        Some((subscription, publication, details_topic)) => {
            let topic = details_topic.or_else(|| {
                discovery
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

/// An EVENT as it comes from the session: raw (the usual pass-through) or
/// decoded.
pub trait EventIn: Clone {
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

/// `job` with its ordering key (under its procedure's `policy`, else
/// `order_by`), its procedure's `unit` (its hash), its policy and, for a
/// batch procedure's event, its batch line (the same hash) and size.
pub fn shaped(
    order_by: &OrderBy,
    metrics: Option<&Metrics>,
    job: Job<Box<SharedEvent>>,
    batch: bool,
    unit: u64,
    policy: Option<Arc<Policy>>,
) -> (Job<Box<SharedEvent>>, Option<OrderKey>) {
    let order_by = policy.as_ref().map_or(order_by, |p| &p.order_by);
    let key = order_key(order_by, metrics, &job.item);
    let batch = batch.then(|| Batched {
        line: unit,
        bytes: job.item.batch_size(),
    });
    let job = job
        .with_key(key.map(|k| k.line))
        .with_unit(unit)
        .with_policy(policy);
    (job.with_batch(batch), key)
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
