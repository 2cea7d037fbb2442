//! Admission: the sink of the first stage in Redis-queue mode. Every
//! instance offers every event it receives; one Lua script per procedure and
//! batch appends each event to the procedure's stream unless its
//! publication's claim key exists, then sets the claim key (with a TTL of
//! `SUBTOCALL_DEDUP_WINDOW`). The check, the append and the claim are one
//! atomic step on the server, so each event enters the stream once however
//! many instances offer it, and an append that fails leaves no claim behind.
//!
//! Offering again is harmless (the claim refuses it), so a batch that failed
//! half-way is simply retried whole.

use std::collections::HashSet;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::{Keys, Shared, entry};
use crate::forward::envelope::{Outgoing, SharedEvent};
use crate::forward::{DeliveryId, Dispatch, Failure, Job};
use crate::metrics::Metrics;
use crate::sink::{Report, Sink, Started};
use crate::wamp::session::Session;

/// How many events one admission batch carries at most.
pub const BATCH: usize = 512;

/// KEYS[1] is the stream, KEYS[2..] the claim keys; ARGV[1] the claim TTL
/// in milliseconds, ARGV[2] the wake-up channel ('' for none), ARGV[3] the
/// procedure, ARGV[4..] the stored events (`streams::entry`). Claims each
/// publication (SET NX) and appends it only if the claim is new; an append
/// that fails gives its claim back, so the batch can be retried. Says on
/// the channel that the procedure got entries (a Redis Cluster's readers
/// cannot wait on every stream at once). Returns {admitted, admitted
/// before}.
const ADMIT: &str = r"
local added, before = 0, 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'PX', ARGV[1]) then
    local id = redis.pcall('XADD', KEYS[1], '*', 'e', ARGV[i + 2])
    if type(id) == 'table' and id.err then
      redis.call('DEL', KEYS[i])
      return id
    end
    added = added + 1
  else
    before = before + 1
  end
end
if added > 0 and ARGV[2] ~= '' then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return {added, before}
";

/// A stream's procedure and partition (see [`super::lane`]).
type Unit<'a> = (&'a str, Option<u16>);

/// The admission sink.
pub struct AdmitSink {
    conn: Shared,
    keys: Arc<Keys>,
    window_ms: u64,
    /// Procedures already in the registry set (added once per process).
    registered: Arc<Mutex<HashSet<String>>>,
    /// Where admission says a procedure got entries ('' for nowhere: on one
    /// Redis server the readers wait on the streams themselves).
    wake: String,
    metrics: Arc<Metrics>,
}

impl AdmitSink {
    pub fn new(
        conn: Shared,
        keys: Arc<Keys>,
        window: Duration,
        wake: bool,
        metrics: Arc<Metrics>,
    ) -> AdmitSink {
        AdmitSink {
            wake: if wake { keys.wake() } else { String::new() },
            conn,
            keys,
            window_ms: window.as_millis().max(1) as u64,
            registered: Arc::default(),
            metrics,
        }
    }
}

impl<T> Sink<T> for AdmitSink {
    fn prepare(&self, _event: &SharedEvent) -> Outgoing {
        // The entry is made of the payload as received: nothing to build.
        Outgoing::AsReceived
    }

    fn dispatch(&self) -> Dispatch {
        // In order, so that each stream keeps the order events came in.
        Dispatch::Pipeline { max: BATCH }
    }

    fn needs_session(&self) -> bool {
        false
    }

    fn start(
        &mut self,
        _id: DeliveryId,
        jobs: &[Job<SharedEvent>],
        _session: Option<&mut Session<T>>,
        _now: Instant,
    ) -> Started {
        // One script call per stream (a procedure, or one of its
        // partitions; its keys share a hash slot), in the order of each
        // stream's first event.
        let groups = crate::sink::groups_in_order(
            jobs.iter()
                .map(|j| -> Unit<'_> { (j.item.procedure.as_str(), j.item.lane) }),
        );
        let mut calls = Vec::with_capacity(groups.len());
        let mut new = Vec::new();
        for ((procedure, lane), at) in groups {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(ADMIT);
            let n = at.len();
            let events: Vec<&SharedEvent> = at.iter().map(|&i| &jobs[i].item).collect();
            let stream = match lane {
                Some(k) => self.keys.stream(&super::lane(procedure, k)),
                None => self.keys.stream(procedure),
            };
            cmd.arg(n + 1).arg(stream);
            // One buffer for every key and event: `arg` copies it.
            let seen = self.keys.seen(procedure, 0);
            let prefix = seen
                .strip_suffix('0')
                .expect("seen key ends with the id")
                .as_bytes();
            let mut scratch: Vec<u8> = Vec::with_capacity(256);
            for ev in &events {
                scratch.clear();
                scratch.extend_from_slice(prefix);
                let _ = write!(scratch, "{}", ev.publication.0);
                cmd.arg(scratch.as_slice());
            }
            cmd.arg(self.window_ms).arg(&self.wake).arg(procedure);
            for ev in &events {
                scratch.clear();
                entry::encode_into(ev, &mut scratch);
                cmd.arg(scratch.as_slice());
            }
            if !self
                .registered
                .lock()
                .expect("not poisoned")
                .contains(procedure)
                && !new.iter().any(|p| p == procedure)
            {
                new.push(procedure.to_owned());
            }
            calls.push(cmd);
        }
        let conn = self.conn.clone();
        let keys = self.keys.clone();
        let registered = self.registered.clone();
        let metrics = self.metrics.clone();
        Started::Pending(Box::pin(async move {
            let mut c = match conn.get().await {
                Ok(c) => c,
                Err(e) => return Report::All(Err(Failure::Redis(e))),
            };
            // The registry first: a stream nobody knows about would not be read.
            for procedure in new {
                let added = redis::cmd("SADD")
                    .arg(keys.procedures())
                    .arg(&procedure)
                    .query_async::<i64>(&mut c)
                    .await;
                if let Err(e) = added {
                    return Report::All(Err(Failure::Redis(e)));
                }
                registered.lock().expect("not poisoned").insert(procedure);
            }
            let replies = join_all(calls.iter().map(|cmd| {
                let mut c = c.clone();
                async move { cmd.query_async::<(u64, u64)>(&mut c).await }
            }))
            .await;
            let (mut admitted, mut elsewhere) = (0, 0);
            for reply in replies {
                match reply {
                    Ok((added, before)) => {
                        admitted += added;
                        elsewhere += before;
                    }
                    // Offering again is harmless: retry the whole batch.
                    Err(e) => return Report::All(Err(Failure::Redis(e))),
                }
            }
            metrics.queue_admitted.inc_by(admitted);
            metrics.queue_admitted_elsewhere.inc_by(elsewhere);
            Report::All(Ok(()))
        }))
    }
}
