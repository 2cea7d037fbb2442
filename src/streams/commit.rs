//! What the delivery stage tells the streams, batched per procedure on the
//! shared connection: acknowledgements (XACK, then XDEL: the stream keeps
//! only undelivered work), dead letters (moved to the dead-letter stream in
//! one script), failed attempts (XCLAIM to ourselves, which counts a
//! delivery, so the attempt count survives a takeover), refreshes of what we
//! hold (XCLAIM JUSTID resets the idle time, so a long call is not taken
//! over), and releases at shutdown (the idle time is set past the claim
//! threshold, so another instance takes the entries at once).
//!
//! A commit that cannot be made is retried a few times, then logged and
//! counted: the entry stays pending and is delivered again after a
//! takeover. A duplicate, never a loss.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Keys, Shared};
use crate::metrics::Metrics;

/// KEYS[1] the stream, KEYS[2] the dead-letter stream; ARGV[1] the group,
/// ARGV[2] the entry id, ARGV[3..] field/value pairs of the dead-letter
/// entry. Moves one entry to the dead-letter stream.
const DEAD_LETTER: &str = r"
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
";

/// KEYS[1] the publication's claim key, KEYS[2] the dead-letter stream;
/// ARGV[1] the claim TTL in milliseconds, ARGV[2..] the dead-letter entry's
/// field/value pairs. For an event this instance could not admit: it is
/// stored as a dead letter only if no other instance admitted it, and then
/// claimed, so that none admits it later (it is in exactly one place).
const DEAD_LETTER_UNADMITTED: &str = r"
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
  return 1
end
return 0
";

/// One thing to tell the streams.
#[derive(Debug, Clone)]
pub enum Commit {
    /// Delivered.
    Ack { procedure: Arc<str>, id: String },
    /// Given up: store the record in the dead-letter stream and forget the
    /// entry. An event that never entered the stream (`Unadmitted`) is
    /// stored only if no other instance admitted it.
    DeadLetter {
        procedure: Arc<str>,
        from: DeadFrom,
        fields: Vec<(&'static str, Vec<u8>)>,
    },
    /// An attempt failed: count it as a delivery.
    Failed { procedure: Arc<str>, id: String },
    /// Still ours: reset the idle time.
    Refresh {
        procedure: Arc<str>,
        ids: Vec<String>,
    },
    /// Not ours any more: let another instance take them now.
    Release {
        procedure: Arc<str>,
        ids: Vec<String>,
    },
}

/// Where a dead letter was.
#[derive(Debug, Clone)]
pub enum DeadFrom {
    /// The stream entry with this id.
    Entry(String),
    /// Not admitted by this instance: the publication's claim decides.
    Unadmitted { publication: u64 },
}

impl Commit {
    fn procedure(&self) -> &Arc<str> {
        match self {
            Commit::Ack { procedure, .. }
            | Commit::DeadLetter { procedure, .. }
            | Commit::Failed { procedure, .. }
            | Commit::Refresh { procedure, .. }
            | Commit::Release { procedure, .. } => procedure,
        }
    }
}

/// How this instance commits.
pub struct Committer {
    pub conn: Shared,
    pub keys: Arc<Keys>,
    pub consumer: String,
    pub claim_idle: Duration,
    pub dedup_window: Duration,
    pub metrics: Arc<Metrics>,
}

const ATTEMPTS: u32 = 4;

impl Committer {
    /// Commits what arrives until the channel closes.
    pub async fn run(self, mut commits: mpsc::UnboundedReceiver<Commit>) {
        let mut batch = Vec::new();
        while commits.recv_many(&mut batch, 1024).await > 0 {
            let mut by_procedure: HashMap<Arc<str>, Vec<Commit>> = HashMap::new();
            for c in batch.drain(..) {
                by_procedure
                    .entry(c.procedure().clone())
                    .or_default()
                    .push(c);
            }
            let work = by_procedure
                .into_iter()
                .map(|(procedure, commits)| self.commit(procedure, commits));
            futures_util::future::join_all(work).await;
        }
    }

    async fn commit(&self, procedure: Arc<str>, commits: Vec<Commit>) {
        let pipe = self.pipeline(&procedure, &commits);
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=ATTEMPTS {
            let result = match self.conn.get().await {
                Ok(mut c) => pipe.query_async::<redis::Value>(&mut c).await.map(drop),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return,
                Err(e) if attempt == ATTEMPTS => {
                    self.metrics.redis_errors.inc();
                    tracing::warn!(
                        procedure = %procedure,
                        commits = commits.len(),
                        error = %e,
                        "could not update the Redis queue; the entries stay pending and \
                         are delivered again after a takeover"
                    );
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    }

    /// The commands for one procedure, in a fixed order: counts and
    /// refreshes, releases, dead letters, then acknowledgements.
    fn pipeline(&self, procedure: &str, commits: &[Commit]) -> redis::Pipeline {
        let stream = self.keys.stream(procedure);
        let group = self.keys.group();
        let mut pipe = redis::pipe();
        let mut acks = Vec::new();
        let mut failed = Vec::new();
        let mut refresh = Vec::new();
        let mut release = Vec::new();
        for c in commits {
            match c {
                Commit::Ack { id, .. } => acks.push(id.as_str()),
                Commit::Failed { id, .. } => failed.push(id.as_str()),
                Commit::Refresh { ids, .. } => refresh.extend(ids.iter().map(String::as_str)),
                Commit::Release { ids, .. } => release.extend(ids.iter().map(String::as_str)),
                Commit::DeadLetter { .. } => {}
            }
        }
        if !failed.is_empty() {
            pipe.cmd("XCLAIM")
                .arg(&stream)
                .arg(group)
                .arg(&self.consumer)
                .arg(0)
                .arg(&failed)
                .ignore();
        }
        if !refresh.is_empty() {
            pipe.cmd("XCLAIM")
                .arg(&stream)
                .arg(group)
                .arg(&self.consumer)
                .arg(0)
                .arg(&refresh)
                .arg("JUSTID")
                .ignore();
        }
        if !release.is_empty() {
            // Idle for longer than the claim threshold: claimable at once.
            let idle = self.claim_idle.as_millis() as u64 * 2 + 1000;
            pipe.cmd("XCLAIM")
                .arg(&stream)
                .arg(group)
                .arg(&self.consumer)
                .arg(0)
                .arg(&release)
                .arg("IDLE")
                .arg(idle)
                .arg("JUSTID")
                .ignore();
        }
        for c in commits {
            if let Commit::DeadLetter { from, fields, .. } = c {
                let cmd = match from {
                    DeadFrom::Entry(id) => pipe
                        .cmd("EVAL")
                        .arg(DEAD_LETTER)
                        .arg(2)
                        .arg(&stream)
                        .arg(self.keys.dead(procedure))
                        .arg(group)
                        .arg(id),
                    DeadFrom::Unadmitted { publication } => pipe
                        .cmd("EVAL")
                        .arg(DEAD_LETTER_UNADMITTED)
                        .arg(2)
                        .arg(self.keys.seen(procedure, *publication))
                        .arg(self.keys.dead(procedure))
                        .arg(self.dedup_window.as_millis().max(1) as u64),
                };
                for (name, value) in fields {
                    cmd.arg(*name).arg(value.as_slice());
                }
                cmd.ignore();
            }
        }
        if !acks.is_empty() {
            pipe.cmd("XACK").arg(&stream).arg(group).arg(&acks).ignore();
            pipe.cmd("XDEL").arg(&stream).arg(&acks).ignore();
        }
        pipe
    }
}
