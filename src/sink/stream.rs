//! Redis mode onto streams (`SUBTOCALL_REDIS_TARGET=stream`): each event's
//! JSON envelope is XADDed, in field `event`, to the stream
//! `<prefix><procedure>`, which backends read with a consumer group and
//! acknowledge (`examples/stream_consumer.py`). One script per stream and
//! batch creates the group if it is missing (from the stream's first entry,
//! so nothing added before the first backend reads is missed), trims what
//! every consumer group of the stream has acknowledged, and adds as many
//! events as `SUBTOCALL_REDIS_MAX_BACKLOG` allows. At the bound the overflow
//! policy applies: `drop-newest` refuses the new events, `drop-oldest`
//! removes the oldest entries no consumer group has been handed yet (never
//! one a backend may be working on) to make room, and refuses the new
//! events only when there are none; either way what is given up is
//! dead-lettered with reason `backlog`, never trimmed away unread.
//!
//! The stream and its group are created when discovery first sees an exact
//! SUB_ registration (a wildcard one's procedures are known only from their
//! events: at the first push), so a backend may start reading before the
//! first event.
//!
//! The backlog is every entry from the oldest one some group has not
//! acknowledged on (computed from XINFO GROUPS and XPENDING: Redis 7.0 has
//! no `XTRIM ... ACKED`), so entries acknowledged out of order behind it
//! still count until it is acknowledged too.

use crate::forward::policy::Policy;
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::streams::Conn;
use futures_util::future::join_all;

use super::redis::RedisSink;
use super::{Report, Sink, Started};
use crate::forward::envelope::{Outgoing, SharedEvent};
use crate::forward::{DeliveryId, Dispatch, Failure, Job};
use crate::metrics::{Metrics, StreamLabel};
use crate::wamp::session::Session;

/// How many events one batch carries at most.
const PIPELINE: usize = 512;

/// How often the streams' backlog is measured (and trimmed) while no event
/// is pushed.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// KEYS[1] the stream; ARGV[1] the consumer group, ARGV[2] the bound,
/// ARGV[3] `1` to make room by removing entries no group was handed yet,
/// ARGV[4..] envelopes. Creates the group if missing, trims what every group
/// acknowledged, makes room if asked, adds envelopes while the backlog is
/// under the bound. Returns {added, backlog, oldest unacknowledged entry's
/// ms or -1, now ms, the removed entries' envelopes...}.
const PUSH: &str = r"
local stream, group, bound = KEYS[1], ARGV[1], tonumber(ARGV[2])
local make_room = ARGV[3] == '1'
redis.pcall('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local floor_ms, floor_seq
local handed_ms, handed_seq = 0, 0
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local name, pending, last
  for i = 1, #g, 2 do
    local k = g[i]
    if k == 'name' then name = g[i + 1]
    elseif k == 'pending' then pending = g[i + 1]
    elseif k == 'last-delivered-id' then last = g[i + 1] end
  end
  local lms, lseq = parse(last)
  if lms > handed_ms or (lms == handed_ms and lseq > handed_seq) then
    handed_ms, handed_seq = lms, lseq
  end
  local ms, seq
  if pending > 0 then
    ms, seq = parse(redis.call('XPENDING', stream, name)[2])
  else
    ms, seq = lms, lseq + 1
  end
  if not floor_ms or ms < floor_ms or (ms == floor_ms and seq < floor_seq) then
    floor_ms, floor_seq = ms, seq
  end
end
if floor_ms then
  redis.call('XTRIM', stream, 'MINID', string.format('%.0f-%.0f', floor_ms, floor_seq))
end
local backlog = redis.call('XLEN', stream)
local removed = {}
local over = backlog + (#ARGV - 3) - bound
if make_room and over > 0 then
  local after = string.format('(%.0f-%.0f', handed_ms, handed_seq)
  for _, e in ipairs(redis.call('XRANGE', stream, after, '+', 'COUNT', over)) do
    redis.call('XDEL', stream, e[1])
    local f = e[2]
    for i = 1, #f, 2 do
      if f[i] == 'event' then table.insert(removed, f[i + 1]) end
    end
    backlog = backlog - 1
  end
end
local added = 0
for i = 4, #ARGV do
  if backlog >= bound then break end
  redis.call('XADD', stream, '*', 'event', ARGV[i])
  backlog = backlog + 1
  added = added + 1
end
local oldest = -1
local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
if first then oldest = parse(first[1]) end
local t = redis.call('TIME')
local out = {added, backlog, oldest, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
for _, r in ipairs(removed) do table.insert(out, r) end
return out
";

/// The stream target's sink: cheap to clone (the periodic check holds one).
#[derive(Clone)]
pub struct StreamSink {
    redis: RedisSink,
    group: Arc<str>,
    max_backlog: u64,
    /// `SUBTOCALL_OVERFLOW=drop-oldest`: make room at the bound.
    make_room: bool,
    /// Envelopes removed to make room, for the driver to dead-letter.
    evicted: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Every stream pushed to, for the periodic check.
    streams: Arc<Mutex<BTreeSet<String>>>,
    metrics: Arc<Metrics>,
}

/// What one script call said about its stream.
#[derive(Debug, Clone)]
struct Pushed {
    added: usize,
    backlog: u64,
    /// The oldest unacknowledged entry's age, if there is one.
    oldest: Option<Duration>,
    /// Envelopes removed to make room.
    removed: Vec<Vec<u8>>,
}

impl StreamSink {
    pub fn new(
        redis: RedisSink,
        group: &str,
        max_backlog: u64,
        make_room: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        StreamSink {
            redis,
            group: Arc::from(group),
            max_backlog,
            make_room,
            evicted: Arc::default(),
            streams: Arc::default(),
            metrics,
        }
    }

    /// Measures (and trims) every stream pushed to, every [`CHECK_EVERY`],
    /// so that the backlog metrics follow the consumers while no event
    /// arrives. Runs until the process ends.
    pub async fn watch(self) {
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            let streams: Vec<String> = self
                .streams
                .lock()
                .expect("not poisoned")
                .iter()
                .cloned()
                .collect();
            for stream in streams {
                if let Err(e) = self.measure(&stream).await {
                    tracing::debug!(stream, error = %e, "cannot measure the stream's backlog");
                }
            }
        }
    }

    /// Runs the script without events on `stream` (creating its group if
    /// missing, trimming what every group acknowledged) and records what it
    /// says.
    async fn measure(&self, stream: &str) -> redis::RedisResult<()> {
        let cmd = self.push_cmd(stream, false, std::iter::empty::<&[u8]>());
        let pushed = run(&cmd, &mut self.redis.connection().await?).await?;
        self.record(stream, &pushed);
        Ok(())
    }

    /// The script call adding `envelopes` to `stream`, their bytes copied
    /// into it once.
    fn push_cmd<'a>(
        &self,
        stream: &str,
        make_room: bool,
        envelopes: impl IntoIterator<Item = &'a [u8]>,
    ) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(PUSH).arg(1).arg(stream).arg(&*self.group);
        cmd.arg(self.max_backlog)
            .arg(if make_room { "1" } else { "0" });
        for e in envelopes {
            cmd.arg(e);
        }
        cmd
    }

    fn record(&self, stream: &str, p: &Pushed) {
        let label = StreamLabel {
            stream: stream.to_owned(),
        };
        self.metrics
            .stream_backlog
            .get_or_create(&label)
            .set(p.backlog as i64);
        self.metrics
            .stream_oldest_unacked
            .get_or_create(&label)
            .set(p.oldest.map_or(0.0, |d| d.as_secs_f64()));
    }
}

/// Runs a [`PUSH`] call and reads its reply.
async fn run(cmd: &redis::Cmd, conn: &mut Conn) -> redis::RedisResult<Pushed> {
    let reply: Vec<redis::Value> = cmd.query_async(conn).await?;
    let int = |i: usize| match reply.get(i) {
        Some(redis::Value::Int(n)) => *n,
        _ => 0,
    };
    let (added, backlog, oldest, now) = (int(0), int(1), int(2), int(3));
    let removed = reply
        .iter()
        .skip(4)
        .filter_map(|v| match v {
            redis::Value::BulkString(b) => Some(b.clone()),
            _ => None,
        })
        .collect();
    Ok(Pushed {
        added: added.max(0) as usize,
        backlog: backlog.max(0) as u64,
        oldest: (oldest >= 0)
            .then(|| Duration::from_millis(now.saturating_sub(oldest).max(0) as u64)),
        removed,
    })
}

impl<T> Sink<T> for StreamSink {
    fn prepare(&self, event: &SharedEvent, _policy: Option<&Policy>) -> Outgoing {
        Outgoing::Envelope(event.envelope_json())
    }

    fn take_evicted(&mut self) -> Vec<SharedEvent> {
        let removed = std::mem::take(&mut *self.evicted.lock().expect("not poisoned"));
        removed
            .iter()
            .filter_map(|json| match SharedEvent::from_envelope(json) {
                Ok(event) => Some(event),
                Err(e) => {
                    tracing::error!(error = %e, "an entry removed from a stream to make room is not an envelope; dropped");
                    None
                }
            })
            .collect()
    }

    fn prepare_procedure(&self, procedure: &str) {
        let stream = self.redis.key(procedure);
        self.streams
            .lock()
            .expect("not poisoned")
            .insert(stream.clone());
        let this = self.clone();
        tokio::spawn(async move {
            match this.measure(&stream).await {
                Ok(()) => {
                    tracing::info!(stream, group = %this.group, "stream and consumer group ready")
                }
                Err(e) => {
                    tracing::warn!(stream, error = %e, "cannot create the stream's consumer group yet; it is created with the first event")
                }
            }
        });
    }

    fn dispatch(&self) -> Dispatch {
        // One batch at a time keeps each stream in order.
        Dispatch::Pipeline { max: PIPELINE }
    }

    fn needs_session(&self) -> bool {
        false
    }

    fn start(
        &mut self,
        _id: DeliveryId,
        jobs: &[Job<Box<SharedEvent>>],
        _session: Option<&mut Session<T>>,
        _now: Instant,
    ) -> Started {
        // One script call per stream, its events in order.
        let streams =
            super::groups_in_order(jobs.iter().map(|j| self.redis.key(&j.item.procedure)));
        {
            let mut known = self.streams.lock().expect("not poisoned");
            for (key, _) in &streams {
                if !known.contains(key) {
                    known.insert(key.clone());
                }
            }
        }
        // Built now: each envelope is copied into its call once.
        let cmds: Vec<redis::Cmd> = streams
            .iter()
            .map(|(key, at)| {
                let envelopes = at.iter().map(|&i| match &jobs[i].item.outgoing {
                    // Built once at accept time (`prepare`); an event
                    // accepted otherwise still gets its envelope.
                    Outgoing::Envelope(bytes) => Cow::Borrowed(bytes.as_slice()),
                    _ => Cow::Owned(jobs[i].item.envelope_json()),
                });
                let envelopes: Vec<Cow<'_, [u8]>> = envelopes.collect();
                self.push_cmd(key, self.make_room, envelopes.iter().map(|e| e.as_ref()))
            })
            .collect();
        let this = self.clone();
        let n = jobs.len();
        Started::Pending(Box::pin(async move {
            let calls = cmds.iter().map(|cmd| {
                let this = &this;
                async move { run(cmd, &mut this.redis.connection().await?).await }
            });
            let replies = join_all(calls).await;
            let added: usize = replies.iter().flatten().map(|p| p.added).sum();
            if let Some(gate) = this.redis.gate()
                && added > 0
                && let Ok(conn) = this.redis.connection().await
            {
                gate.after(conn, added as u64);
            }
            let mut outcomes: Vec<Option<crate::forward::Outcome>> = (0..n).map(|_| None).collect();
            for ((key, at), reply) in streams.iter().zip(replies) {
                match reply {
                    Ok(p) => {
                        this.record(key, &p);
                        for (k, &i) in at.iter().enumerate() {
                            outcomes[i] = Some(if k < p.added {
                                Ok(())
                            } else {
                                Err(Failure::Backlog { backlog: p.backlog })
                            });
                        }
                        if !p.removed.is_empty() {
                            this.evicted.lock().expect("not poisoned").extend(p.removed);
                        }
                    }
                    // The stream's events are tried again (a script that
                    // failed half-way, which Redis does not undo, adds
                    // some twice: at-least-once).
                    Err(e) => {
                        for &i in at {
                            let again = (e.kind(), "stream push failed", e.to_string());
                            outcomes[i] = Some(Err(Failure::Redis(again.into())));
                        }
                    }
                }
            }
            Report::Each(
                outcomes
                    .into_iter()
                    .map(|o| o.unwrap_or(Err(Failure::Missing)))
                    .collect(),
            )
        }))
    }
}
