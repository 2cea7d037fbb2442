//! The Redis queue (`SUBTOCALL_QUEUE=redis`) between the admission stage
//! and the delivering stage: the queue core (`streams::core`) decides what
//! this instance reads, holds, keeps alive and commits; the carrier takes
//! its commands to Redis; the admission sink's batches also read what the
//! core grants. Synchronous, like the sidecar: the loop awaits the IO it
//! starts and brings the replies.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt as _};

use crate::forward::envelope::{Entry as EntryRef, SharedEvent};
use crate::forward::{DeliveryId, EventCore, GiveUp, Job};
use crate::metrics::Metrics;
use crate::sink::{Report, Sink};
use crate::status::QueueProbe;
use crate::streams::admit::{AdmitSink, Admitted};
use crate::streams::carrier::{Carrier, Fields};
use crate::streams::core::{Command, CommandId, Handed, Key, Note, QueueCore, Reply};

/// A command on its way to Redis: its reply, when it comes.
pub type PendingCommand = BoxFuture<'static, (CommandId, Reply<Fields>)>;

/// An admission batch on its way to Redis: what came of it, when it comes.
pub type PendingAdmission = BoxFuture<'static, (DeliveryId, Admitted)>;

/// A new group being given its topic's retained events: how many, or why
/// not.
pub type PendingBackfill = BoxFuture<'static, (Arc<str>, Result<u64, String>)>;

/// The Redis queue's IO, awaited by the loop: commands on their way to
/// Redis (the queue core's replies come back through them) and admission
/// batches (which also bring what they read).
pub struct QueueIo {
    commands: FuturesUnordered<PendingCommand>,
    admissions: FuturesUnordered<PendingAdmission>,
    backfills: FuturesUnordered<PendingBackfill>,
    /// What `/status` reads of the queue.
    pub probe: QueueProbe,
}

/// What the Redis queue's IO brought.
pub enum QueueEvent {
    Reply(CommandId, Reply<Fields>),
    Admitted(DeliveryId, Admitted),
    /// A new group was given its topic's retained events (or not).
    Backfilled(Arc<str>, Result<u64, String>),
}

impl QueueIo {
    pub fn new(probe: QueueProbe) -> QueueIo {
        QueueIo {
            commands: FuturesUnordered::new(),
            admissions: FuturesUnordered::new(),
            backfills: FuturesUnordered::new(),
            probe,
        }
    }

    /// Awaits what `queue` started since last asked.
    pub fn take_from(&mut self, queue: &mut RedisQueue) {
        self.commands.extend(queue.commands.drain(..));
        self.admissions.extend(queue.admissions.drain(..));
        self.backfills.extend(queue.backfills.drain(..));
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty() && self.admissions.is_empty() && self.backfills.is_empty()
    }

    /// The next thing the IO brings; pending while there is nothing to
    /// await. Cancel safe: `FuturesUnordered::next` loses nothing when
    /// another branch of a `select!` wins.
    pub async fn next(&mut self) -> QueueEvent {
        if self.is_empty() {
            return std::future::pending().await;
        }
        tokio::select! {
            Some((id, reply)) = self.commands.next(), if !self.commands.is_empty() => {
                QueueEvent::Reply(id, reply)
            }
            Some((id, admitted)) = self.admissions.next(), if !self.admissions.is_empty() => {
                QueueEvent::Admitted(id, admitted)
            }
            Some((procedure, done)) = self.backfills.next(), if !self.backfills.is_empty() => {
                QueueEvent::Backfilled(procedure, done)
            }
        }
    }
}

pub struct RedisQueue {
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
    /// New groups' backfills started, likewise.
    backfills: Vec<PendingBackfill>,
    /// Whether Redis answers.
    up: bool,
}

impl RedisQueue {
    pub fn new(queue: QueueCore<Fields>, carrier: Carrier, admission: AdmitSink) -> RedisQueue {
        RedisQueue {
            queue,
            carrier,
            admission,
            commands: Vec::new(),
            admissions: Vec::new(),
            backfills: Vec::new(),
            // Not ready until Redis has answered once.
            up: false,
        }
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

    /// Gives the new group of `procedure` the retained events of `topic`,
    /// admitted like live ones (in order, each once: the claims refuse
    /// what another instance's backfill admitted), unless a backfill of it
    /// completed before (marked in Redis). Its live events wait meanwhile
    /// (the caller holds them).
    pub fn start_backfill(&mut self, procedure: Arc<str>, topic: String, shape: Shape) {
        // Retained already: not again.
        let admission = self.admission.without_retention();
        self.backfills.push(Box::pin(async move {
            let done = backfill(&admission, &procedure, &topic, &shape).await;
            (procedure, done)
        }));
    }

    /// `job` was delivered (here: its copy, kept until the replicas confirm
    /// its admission, need not be offered again).
    pub fn delivered(&mut self, job: &Job<Box<SharedEvent>>) {
        self.admission
            .delivered(&job.item.procedure, job.item.publication.0);
    }

    /// An admission batch's outcome: what each stream's grant took, and
    /// the acknowledgements that rode along, go to the queue core; the
    /// report is the admission stage's.
    pub fn on_admitted(&mut self, admitted: Admitted, now: Instant) -> Report {
        for (grant, taken) in admitted.taken {
            self.queue.on_granted(grant, taken, now);
        }
        for (id, acked) in admitted.acked {
            let reply = match acked {
                Ok(()) => Reply::Done,
                Err(f) => Reply::Failed(f),
            };
            self.queue.on_reply(id, reply, now);
        }
        admitted.report
    }

    pub fn carrier(&self) -> &Carrier {
        &self.carrier
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Whether Redis answers.
    pub fn set_up(&mut self, up: bool, metrics: &Metrics) {
        if up && !self.up {
            tracing::info!("the Redis queue answers");
        }
        self.up = up;
        metrics.redis_up.set(i64::from(up));
    }

    /// An entry handed out, as a job with its history: received when it
    /// was added to the stream, attempted once per earlier hand-out, its
    /// outgoing form made by the delivering `sink` under its procedure's
    /// `policy`.
    pub fn job<T>(
        handed: &Handed<Fields>,
        mut event: SharedEvent,
        sink: &dyn Sink<T>,
        policy: Option<&crate::forward::policy::Policy>,
        now: Instant,
    ) -> Job<Box<SharedEvent>> {
        let added = SystemTime::UNIX_EPOCH + Duration::from_millis(handed.key.id.0);
        let age = SystemTime::now().duration_since(added).unwrap_or_default();
        event.outgoing = sink.prepare(&event, policy);
        event.entry = Some(EntryRef {
            key: handed.key.clone(),
            deliveries: handed.deliveries,
        });
        let mut job = Job::new(Box::new(event), now.checked_sub(age).unwrap_or(now));
        job.attempts = handed.deliveries.saturating_sub(1);
        job
    }

    /// Takes back a delivery of `core` that must not go out (or was not
    /// written): its entries are no longer certainly ours, and are left
    /// undelivered to whoever holds them now.
    pub fn take_back(&mut self, core: &mut EventCore, id: DeliveryId, now: Instant) {
        let keys: Vec<Key> = core
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

    /// A dead letter: into the procedure's dead-letter stream (and out of
    /// its queue stream, when it came from there and is still ours).
    pub fn dead_letter(&mut self, job: &Job<Box<SharedEvent>>, why: GiveUp) {
        let fields = Self::record(job, why);
        let ev = &job.item;
        match &ev.entry {
            Some(e) => self.queue.dead_letter(&e.key, fields),
            None => {
                self.queue
                    .dead_letter_unadmitted(&ev.procedure, ev.publication.0, fields, true)
            }
        }
    }

    /// An event removed from a stream to make room (the backlog bound,
    /// `SUBTOCALL_OVERFLOW=drop-oldest`): into the dead-letter stream as it
    /// is (its claim is there: it was admitted).
    pub fn dead_letter_removed(&mut self, job: &Job<Box<SharedEvent>>) {
        let fields = Self::record(job, GiveUp::Backlog);
        let ev = &job.item;
        self.queue
            .dead_letter_unadmitted(&ev.procedure, ev.publication.0, fields, false);
    }

    /// A dead-letter record's fields.
    fn record(job: &Job<Box<SharedEvent>>, why: GiveUp) -> Vec<(&'static str, Vec<u8>)> {
        let ev = &job.item;
        vec![
            ("reason", why.as_str().as_bytes().to_vec()),
            ("attempts", job.attempts.to_string().into_bytes()),
            (
                "last_error",
                job.last_error.clone().unwrap_or_default().into_bytes(),
            ),
            ("dead_lettered_at", rfc3339_now().into_bytes()),
            ("event", ev.envelope_json()),
        ]
    }

    /// An entry that holds no event: to the dead-letter stream as it is.
    pub fn dead_letter_malformed(&mut self, handed: &Handed<Fields>, why: String, shown: Vec<u8>) {
        tracing::error!(
            target: "subtocall::dead_letter",
            stream = %handed.key.unit,
            entry = %handed.key.id,
            error = %why,
            "queue entry is not an event; moved to the dead-letter stream"
        );
        self.queue.dead_letter(
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

/// How a backfill's events are keyed: the ordering key and its partitions.
#[derive(Debug, Clone)]
pub struct Shape {
    pub order_by: crate::config::OrderBy,
    pub partitions: Option<u16>,
}

/// Tries of one chunk of a backfill before it is given up.
const BACKFILL_TRIES: u32 = 5;

async fn backfill(
    admission: &AdmitSink,
    procedure: &Arc<str>,
    topic: &str,
    shape: &Shape,
) -> Result<u64, String> {
    let (shared, keys) = admission.store();
    let mut conn = shared.get().await.map_err(|e| e.to_string())?;
    let done: bool = redis::cmd("HEXISTS")
        .arg(keys.started())
        .arg(&**procedure)
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    if done {
        return Ok(0);
    }
    let mut after: Option<String> = None;
    let mut total = 0;
    loop {
        let chunk =
            crate::streams::retain::read_chunk(&mut conn, keys, topic, 0, None, after.as_deref())
                .await?;
        let Some(last) = chunk.last() else {
            break;
        };
        after = Some(last.id.clone());
        let now = Instant::now();
        let mut jobs = Vec::with_capacity(chunk.len());
        for r in &chunk {
            let mut event = match crate::streams::entry::decode(procedure, r.stored.clone()) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(%procedure, entry = %r.id, error = %e, "a retained entry that is not an event; skipped");
                    continue;
                }
            };
            if let Some(n) = shape.partitions {
                event.lane = crate::forward::key::key_of(&shape.order_by, &event)
                    .key()
                    .map(|k| k.partition(n));
            }
            jobs.push(Job::new(Box::new(event), now));
        }
        let mut tries = 0;
        loop {
            tries += 1;
            match admission.admit(&jobs, None).await.report {
                Report::All(Ok(())) => break,
                Report::All(Err(e)) if tries < BACKFILL_TRIES => {
                    tracing::debug!(%procedure, error = %e, "backfill chunk failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(tries))).await;
                }
                Report::All(Err(e)) => return Err(format!("{e} ({total} admitted so far)")),
                Report::Each(_) => break,
            }
        }
        total += jobs.len() as u64;
    }
    redis::cmd("HSET")
        .arg(keys.started())
        .arg(&**procedure)
        .arg(1)
        .query_async::<i64>(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(total)
}

/// The queue key of a job read from the queue.
pub fn key_of(job: &Job<Box<SharedEvent>>) -> Option<&Key> {
    job.item.entry.as_ref().map(|e| &e.key)
}

/// The event in a queue entry handed out, or why there is none and what
/// the entry held, as text, for its dead-letter record.
pub fn read_entry(handed: &Handed<Fields>) -> Result<SharedEvent, (String, Vec<u8>)> {
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

/// What the queue core noted: logged, and counted where it is a count.
pub fn on_note(note: Note, metrics: &Metrics) {
    match note {
        Note::TakenOver { unit, entries } => {
            tracing::info!(stream = %unit, entries, "took over entries another instance left idle");
        }
        Note::LeaseTaken { unit } => {
            tracing::info!(partition = %unit, "holding the partition's lease; delivering it");
        }
        Note::LeaseLost { unit } => {
            tracing::warn!(
                partition = %unit,
                "the partition's lease is no longer certainly ours (not renewed in time); \
                 its waiting entries are left to its next holder"
            );
        }
        Note::HandingOver { unit, instances } => {
            tracing::info!(partition = %unit, instances, "handing the partition over to another instance");
        }
        Note::Fenced { entries } => {
            metrics.queue_fenced.inc_by(entries as u64);
            tracing::warn!(
                entries,
                "entries no longer certainly ours (not refreshed in time, or taken over): \
                 not delivered here, left in Redis for whoever holds them"
            );
        }
        Note::CommitGivenUp {
            what,
            keys: 0,
            error,
        } => {
            // Only the dead letter of an event never admitted commits no
            // entry: nothing of it is pending in a stream.
            metrics.redis_errors.inc();
            tracing::warn!(
                %error,
                "could not {what} in Redis; the dead letter's log line and metrics are all that keep it"
            );
        }
        Note::CommitGivenUp { what, keys, error } => {
            metrics.redis_errors.inc();
            tracing::warn!(
                entries = keys,
                %error,
                "could not {what}; the entries stay pending and are delivered again after a takeover"
            );
        }
        Note::CommandFailed { what, error } => {
            metrics.redis_errors.inc();
            tracing::debug!(%error, "could not {what}; retrying");
        }
        Note::Reading { procedure } => {
            tracing::info!(%procedure, "reading the procedure's queue streams");
        }
    }
}

fn rfc3339_now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
