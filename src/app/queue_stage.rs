//! The delivery stage of the Redis queue (`SUBTOCALL_QUEUE=redis`): the
//! queue core (`streams::core`) decides what this instance reads, holds
//! and commits; the carrier takes its commands to Redis; the entries it
//! hands out are delivered through the real sink by a forwarding core of
//! their own. Synchronous, like the sidecar: the loop brings the replies.

use std::time::{Duration, Instant, SystemTime};

use futures_util::future::BoxFuture;

use super::Token;
use crate::forward::EventCore as Core;
use crate::forward::envelope::{Entry as EntryRef, SharedEvent};
use crate::forward::{DeliveryId, Job};
use crate::sink::Sink;
use crate::streams::admit::{AdmitSink, Admitted};
use crate::streams::carrier::{Carrier, Fields};
use crate::streams::core::{Command, CommandId, Handed, Key, QueueCore, Reply};

/// Delivery ids of this stage start here, apart from the admission core's.
pub const IDS_FROM: u64 = 1 << 62;

/// A command on its way to Redis: its reply, when it comes.
pub type PendingCommand = BoxFuture<'static, (CommandId, Reply<Fields>)>;

/// An admission batch on its way to Redis: what came of it, when it comes.
pub type PendingAdmission = BoxFuture<'static, (DeliveryId, Admitted)>;

pub struct QueueStage {
    /// The forwarding core that delivers what the queue core hands out.
    pub core: Core,
    pub sink: Box<dyn Sink<Token> + Send>,
    /// What this instance reads, holds and commits.
    pub queue: QueueCore<Fields>,
    carrier: Carrier,
    /// The admission stage's sink: its batches also read what the queue
    /// core grants.
    admission: AdmitSink,
    /// Commands carried whose replies the loop takes in.
    commands: Vec<PendingCommand>,
    /// Admission batches started, likewise.
    admissions: Vec<PendingAdmission>,
}

impl QueueStage {
    pub fn new(
        core: Core,
        sink: Box<dyn Sink<Token> + Send>,
        queue: QueueCore<Fields>,
        carrier: Carrier,
        admission: AdmitSink,
    ) -> QueueStage {
        QueueStage {
            core,
            sink,
            queue,
            carrier,
            admission,
            commands: Vec::new(),
            admissions: Vec::new(),
        }
    }

    pub fn is_delivery(id: DeliveryId) -> bool {
        id.0 > IDS_FROM
    }

    /// Takes `command` to Redis.
    pub fn carry(&mut self, id: CommandId, command: Command) {
        self.commands.push(self.carrier.start(id, command));
    }

    /// Starts admission delivery `id` of `jobs`, each stream's batch taking
    /// what the queue core grants.
    pub fn admit(&mut self, id: DeliveryId, jobs: &[Job<Box<SharedEvent>>], now: Instant) {
        let admitting = self
            .admission
            .admit(jobs, Some(&mut (&mut self.queue, now)));
        self.admissions
            .push(Box::pin(async move { (id, admitting.await) }));
    }

    /// Commands and admissions started since last asked, for the loop to
    /// await.
    pub fn take_io(
        &mut self,
    ) -> (
        std::vec::Drain<'_, PendingCommand>,
        std::vec::Drain<'_, PendingAdmission>,
    ) {
        (self.commands.drain(..), self.admissions.drain(..))
    }

    pub fn carrier(&self) -> &Carrier {
        &self.carrier
    }

    /// An entry handed out, as a job with its history: received when it
    /// was added to the stream, attempted once per earlier hand-out.
    pub fn job(
        &self,
        handed: &Handed<Fields>,
        mut event: SharedEvent,
        now: Instant,
    ) -> Job<Box<SharedEvent>> {
        let added = SystemTime::UNIX_EPOCH + Duration::from_millis(handed.key.id.0);
        let age = SystemTime::now().duration_since(added).unwrap_or_default();
        event.outgoing = self.sink.prepare(&event);
        event.entry = Some(EntryRef {
            key: handed.key.clone(),
            deliveries: handed.deliveries,
        });
        let mut job = Job::new(Box::new(event), now.checked_sub(age).unwrap_or(now));
        job.attempts = handed.deliveries.saturating_sub(1);
        job
    }

    /// Takes back a delivery that must not go out (or was not written):
    /// its entries are no longer certainly ours, and are left undelivered
    /// to whoever holds them now.
    pub fn take_back(&mut self, id: DeliveryId, now: Instant) {
        let keys: Vec<Key> = self
            .core
            .cancel(id)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|j| j.item.entry.map(|e| e.key))
            .collect();
        self.queue.cancelled(&keys, now);
    }

    /// Until when every entry of a delivery is certainly this instance's
    /// (its call must be written before then); `None` when one of them is
    /// not any more.
    pub fn certain_until(&self, jobs: &[Job<Box<SharedEvent>>]) -> Option<Instant> {
        let mut earliest: Option<Instant> = None;
        for entry in jobs.iter().filter_map(|j| j.item.entry.as_ref()) {
            let until = self.queue.certain_until(&entry.key)?;
            earliest = Some(earliest.map_or(until, |e| e.min(until)));
        }
        earliest
    }
}

/// The queue key of a job read from the queue.
pub fn key_of(job: &Job<Box<SharedEvent>>) -> Option<&Key> {
    job.item.entry.as_ref().map(|e| &e.key)
}
