//! The delivery stage of the Redis queue (`SUBTOCALL_QUEUE=redis`): the
//! entries this instance's readers handed over, delivered through the real
//! sink by a forwarding core of their own. What the stage does to the
//! streams (acknowledge, dead-letter, count a failed attempt, refresh, release)
//! goes to the committer task as [`Commit`]s. Synchronous, like the sidecar.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Semaphore, mpsc};

use super::Token;
use super::sidecar::Core;
use crate::forward::envelope::{Entry as EntryRef, SharedEvent};
use crate::forward::{DeliveryId, Job};
use crate::sink::Sink;
use crate::streams::commit::Commit;
use crate::streams::entry_id_numbers;
use crate::streams::reader::Entry;

/// Delivery ids of this stage start here, apart from the admission core's.
pub const IDS_FROM: u64 = 1 << 62;

pub struct QueueStage {
    pub core: Core,
    pub sink: Box<dyn Sink<Token> + Send>,
    commits: Option<mpsc::UnboundedSender<Commit>>,
    /// The readers' window: one credit per entry held here.
    credits: Arc<Semaphore>,
    /// Entries held (waiting or in flight), per procedure, by id (its two
    /// numbers): refreshed so that no other instance takes them over.
    // A BTreeMap: a few procedures, compared faster than hashed.
    held: BTreeMap<Arc<str>, BTreeSet<(u64, u64)>>,
    refresh_every: Duration,
    next_refresh: Instant,
}

impl QueueStage {
    pub fn new(
        core: Core,
        sink: Box<dyn Sink<Token> + Send>,
        commits: mpsc::UnboundedSender<Commit>,
        credits: Arc<Semaphore>,
        claim_idle: Duration,
        now: Instant,
    ) -> QueueStage {
        let refresh_every = claim_idle / 3;
        QueueStage {
            core,
            sink,
            commits: Some(commits),
            credits,
            held: BTreeMap::new(),
            refresh_every,
            next_refresh: now + refresh_every,
        }
    }

    pub fn is_delivery(id: DeliveryId) -> bool {
        id.0 > IDS_FROM
    }

    pub fn commit(&self, commit: Commit) {
        if let Some(tx) = &self.commits {
            let _ = tx.send(commit);
        }
    }

    /// Closes the channel so that the committer finishes what it has.
    pub fn close(&mut self) {
        self.commits = None;
    }

    /// An entry read back: a job with its history (received when it was
    /// added to the stream; attempted once per earlier hand-out).
    pub fn job(&mut self, entry: &Entry, mut event: SharedEvent, now: Instant) -> Job<SharedEvent> {
        let key = entry_id_numbers(&entry.id);
        let age = key
            .map(|(ms, _)| {
                let added = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
                SystemTime::now().duration_since(added).unwrap_or_default()
            })
            .unwrap_or_default();
        event.outgoing = self.sink.prepare(&event);
        event.entry = Some(EntryRef {
            procedure: entry.procedure.clone(),
            id: entry.id.clone(),
            deliveries: entry.deliveries,
        });
        if let Some(key) = key {
            match self.held.get_mut(&*entry.procedure) {
                Some(ids) => {
                    ids.insert(key);
                }
                None => {
                    self.held
                        .insert(entry.procedure.clone(), BTreeSet::from([key]));
                }
            }
        }
        let mut job = Job::new(event, now.checked_sub(age).unwrap_or(now));
        job.attempts = entry.deliveries.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
        job
    }

    /// The entry is done with here (acknowledged, dead-lettered, released):
    /// its credit goes back to the readers.
    pub fn let_go(&mut self, entry: &EntryRef) {
        if let (Some(ids), Some(id)) = (
            self.held.get_mut(&entry.procedure),
            entry_id_numbers(&entry.id),
        ) {
            ids.remove(&id);
        }
        self.credits.add_permits(1);
    }

    /// A credit for an entry that never became a job.
    pub fn return_credit(&self) {
        self.credits.add_permits(1);
    }

    /// Every `claim_idle / 3`: tells the streams we still hold what we hold.
    pub fn refresh(&mut self, now: Instant) {
        if now < self.next_refresh {
            return;
        }
        self.next_refresh = now + self.refresh_every;
        for (procedure, ids) in &self.held {
            if !ids.is_empty() {
                self.commit(Commit::Refresh {
                    procedure: procedure.clone(),
                    ids: ids.iter().map(|(ms, seq)| format!("{ms}-{seq}")).collect(),
                });
            }
        }
    }

    pub fn next_refresh(&self) -> Option<Instant> {
        self.held
            .values()
            .any(|ids| !ids.is_empty())
            .then_some(self.next_refresh)
    }
}
