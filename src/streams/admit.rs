//! Admission: the sink of the first stage in Redis-queue mode. Every
//! instance offers every event it receives; one Lua script per stream and
//! batch appends each event to the stream unless its publication's claim
//! key exists, then sets the claim key (with a TTL of
//! `SUBTOCALL_DEDUP_WINDOW`). The check, the append and the claim are one
//! atomic step on the server, so each event enters the stream once however
//! many instances offer it, and an append that fails leaves no claim behind.
//!
//! The same write reads the stream's new entries for this instance, as
//! many as the queue core granted room for (`QueueCore::grant`): that is
//! how most entries are read, with no request of their own. For a plain
//! stream the read is an XREADGROUP right after the script (Redis then
//! never turns the entries into Lua values: a quarter of its instructions
//! per event for batches of 100); for a partition it is the script's own,
//! and only if the partition's lease in Redis is this instance's. Entries
//! this batch added are taken as the events given, not decoded again.
//!
//! The write also carries the acknowledgements waiting for the procedure's
//! streams (`QueueCore::ride_acks`), as XACK and XDEL before the script:
//! while events keep coming, an event costs Redis one request, not two.
//! What is not atomic is kept out of the script: at a moderate rate the
//! script's own cost (its arguments made Lua strings, each `redis.call`
//! parsed back) is most of what an event costs Redis (see `ADMIT`).
//!
//! Offering again is harmless (the claim refuses it), so a batch that failed
//! half-way is simply retried whole.

use crate::forward::policy::Policy;
use std::collections::HashSet;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{BoxFuture, join_all};
use redis::Value;

use super::carrier::Fields;
use super::core::{
    Command, CommandId, EntryId, Failure as QueueFailure, Got, Grant, GrantId, QueueCore, Unit,
};
use super::replicas::{self, Ask, Copies, Copy};
use super::{Keys, Shared, entry, text};
use crate::forward::envelope::{Outgoing, SharedEvent};
use crate::forward::{DeliveryId, Dispatch, Failure, Job};
use crate::metrics::Metrics;
use crate::sink::{Report, Sink, Started};
use crate::wamp::session::Session;

/// How many events one admission batch carries at most.
pub const BATCH: usize = 512;

/// KEYS[1] the stream, KEYS[2] its lease (a partition's; for a plain
/// stream, unused), KEYS[3] the topic's retained stream (when retention is
/// written here; else unused), KEYS[4..] the claim keys; ARGV[1] the claim
/// TTL in milliseconds, ARGV[2] the group, ARGV[3] this consumer, ARGV[4]
/// how many new entries to read for it (0: none; -1: none, the caller
/// reads them with an XREADGROUP of its own right after), ARGV[5] the lease
/// holder it must be (this incarnation's, `Carrier::holder`; '' for a
/// plain stream), ARGV[6] the most entries the stream may hold (0: no
/// bound), ARGV[7] '1' to make room at the bound by removing its oldest
/// entry nobody holds, ARGV[8] one character per event, '1' for the events
/// whose copy is the topic's retained one ('' for none), ARGV[9] the oldest
/// retained entry id to keep (milliseconds; 0 keeps all), ARGV[10] the
/// most retained entries, then the stored events (`streams::entry`), one
/// per claim key. Claims each publication (SET NX) and appends it only if
/// the claim is new and there is room (else gives the claim back: over the
/// bound), and keeps the retained copy of what it appended; an append that
/// fails gives its claim back, so the batch can be retried. Then reads.
/// Returns {admitted, admitted before, read, refused, over, removed,
/// retained}, where read holds {id, n} for an entry this call appended and
/// read (the n-th event given; with ARGV[4] -1, every entry it appended),
/// {id, 0, fields} for another, refused the n of each event already
/// claimed, over the n of each event refused for the bound, removed the
/// fields of each entry removed to make room, and retained how many copies
/// it kept. Taken where `PLAIN` does not do: a partition (its read only
/// under the lease), making room by removing the oldest entry, and the
/// offer again after a failover (`offer_cmd`).
///
/// Every argument costs the server a Lua string and every `redis.call` a
/// round through its reply parser (about 1,500 and 7,000 instructions
/// under callgrind): acknowledgements and a plain stream's read are plain
/// commands beside the call, in the same write (`AdmitSink::admit`).
const ADMIT: &str = r"
local nclaims = #KEYS - 3
local bound, oldest = tonumber(ARGV[6]), ARGV[7] == '1'
local keep, keepmax = ARGV[8], ARGV[10]
local added, before, retained = 0, 0, 0
local mine, refused, over, removed = {}, {}, {}, {}
local len = -1
for i = 4, 3 + nclaims do
  local n = i - 3
  if redis.call('SET', KEYS[i], '1', 'NX', 'PX', ARGV[1]) then
    local room = true
    if bound > 0 then
      if len < 0 then len = redis.call('XLEN', KEYS[1]) end
      if len >= bound then
        room = false
        if oldest then
          local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
          if first then
            local held = redis.pcall('XPENDING', KEYS[1], ARGV[2], first[1], first[1], 1)
            if type(held) == 'table' and not held.err and #held == 0 then
              redis.call('XDEL', KEYS[1], first[1])
              removed[#removed + 1] = first[2]
              len = len - 1
              room = true
            end
          end
        end
      end
    end
    if room then
      local id = redis.pcall('XADD', KEYS[1], '*', 'e', ARGV[i + 7])
      if type(id) == 'table' and id.err then
        redis.call('DEL', KEYS[i])
        return id
      end
      mine[id] = n
      added = added + 1
      if len >= 0 then len = len + 1 end
      if string.byte(keep, n) == 49 then
        redis.call('XADD', KEYS[3], 'MAXLEN', keepmax, '*', 'e', ARGV[i + 7])
        retained = retained + 1
      end
    else
      redis.call('DEL', KEYS[i])
      over[#over + 1] = n
    end
  else
    before = before + 1
    refused[#refused + 1] = n
  end
end
if retained > 0 and ARGV[9] ~= '0' then
  redis.call('XTRIM', KEYS[3], 'MINID', ARGV[9])
end
local read = {}
local want = tonumber(ARGV[4])
if want < 0 then
  for id, n in pairs(mine) do read[#read + 1] = {id, n} end
elseif want > 0 and (ARGV[5] == '' or redis.call('GET', KEYS[2]) == ARGV[5]) then
  -- A group gone with a Redis that lost its data: nothing read (the reader
  -- creates it again).
  local r = redis.pcall('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', want, 'STREAMS', KEYS[1], '>')
  if type(r) == 'table' and not r.err then
    for _, e in ipairs(r[1][2]) do
      local n = mine[e[1]]
      if n then
        read[#read + 1] = {e[1], n}
      else
        read[#read + 1] = {e[1], 0, e[2]}
      end
    end
  end
end
return {added, before, read, refused, over, removed, retained}
";

/// The admission script of a stream with nothing more to do than claim,
/// bound (refusing the newest), append and keep the topic's retained copy:
/// most calls. KEYS[1] the stream, KEYS[2..n+1] the claim keys, and with
/// retention KEYS[n+2] the topic's retained stream; ARGV[1] the claim TTL in
/// milliseconds, ARGV[2] the most entries the stream may hold (0: no
/// bound), ARGV[3..n+2] the stored events, one per claim key, and with
/// retention ARGV[n+3] one character per event ('1': keep its copy),
/// ARGV[n+4] the oldest retained entry id to keep (milliseconds; 0 keeps
/// all), ARGV[n+5] the most retained entries (retention is there when
/// ARGV has three more than KEYS, not one). Returns one flat table: how
/// many copies it kept, then per event its entry id if appended, 0 if
/// already claimed, 1 if refused for the bound (`plain_reply` makes it
/// `ADMIT`'s shape). Flat: each table a script returns costs Redis a dozen
/// lookups of its own.
const PLAIN: &str = r"
local keep = #ARGV - #KEYS == 3
local n = #KEYS - (keep and 2 or 1)
local bound, len, kept = tonumber(ARGV[2]), -1, 0
local out = {0}
for i = 2, n + 1 do
  if redis.call('SET', KEYS[i], '1', 'NX', 'PX', ARGV[1]) then
    if bound > 0 and len < 0 then len = redis.call('XLEN', KEYS[1]) end
    if bound > 0 and len >= bound then
      redis.call('DEL', KEYS[i])
      out[i] = 1
    else
      local id = redis.pcall('XADD', KEYS[1], '*', 'e', ARGV[i + 1])
      if type(id) == 'table' and id.err then
        redis.call('DEL', KEYS[i])
        return id
      end
      out[i] = id
      if len >= 0 then len = len + 1 end
      if keep and string.byte(ARGV[n + 3], i - 1) == 49 then
        redis.call('XADD', KEYS[n + 2], 'MAXLEN', ARGV[n + 5], '*', 'e', ARGV[i + 1])
        kept = kept + 1
      end
    end
  else
    out[i] = 0
  end
end
if kept > 0 and ARGV[n + 4] ~= '0' then
  redis.call('XTRIM', KEYS[n + 2], 'MINID', ARGV[n + 4])
end
out[1] = kept
return out
";

/// `PLAIN`'s reply in `ADMIT`'s shape: {admitted, admitted before, {{id,
/// n}, ...} for the entries it appended, refused, over, {}, retained}.
fn plain_reply(value: Value) -> Value {
    let Value::Array(each) = value else {
        return value;
    };
    let mut each = each.into_iter();
    let retained = match each.next() {
        Some(Value::Int(kept)) => kept,
        _ => 0,
    };
    let (mut appended, mut refused, mut over) = (Vec::new(), Vec::new(), Vec::new());
    for (i, v) in each.enumerate() {
        let n = Value::Int(i as i64 + 1);
        match v {
            Value::Int(0) => refused.push(n),
            Value::Int(_) => over.push(n),
            id => appended.push(Value::Array(vec![id, n])),
        }
    }
    Value::Array(vec![
        Value::Int(appended.len() as i64),
        Value::Int(refused.len() as i64),
        Value::Array(appended),
        Value::Array(refused),
        Value::Array(over),
        Value::Array(Vec::new()),
        Value::Int(retained),
    ])
}

/// What an admission asks of the queue core.
pub trait Grants {
    /// Room to read `unit`'s new entries in the same step
    /// (`QueueCore::grant`).
    fn grant(&mut self, unit: &Unit) -> Option<Grant>;
    /// The acknowledgements to carry for `procedure`
    /// (`QueueCore::ride_acks`).
    fn ride_acks(&mut self, procedure: &str) -> Option<(CommandId, Command)>;
}

impl Grants for (&mut QueueCore<Fields>, Instant) {
    fn grant(&mut self, unit: &Unit) -> Option<Grant> {
        self.0.grant(unit, self.1)
    }

    fn ride_acks(&mut self, procedure: &str) -> Option<(CommandId, Command)> {
        self.0.ride_acks(procedure)
    }
}

/// What one stream's grant took, or why its admission failed.
pub type Taken = Result<Vec<Got<Fields>>, QueueFailure>;

/// What one admission batch came to: the outcome for the admission core,
/// and what each stream's grant took.
pub struct Admitted {
    pub report: Report,
    pub taken: Vec<(GrantId, Taken)>,
    /// The acknowledgements it carried, and whether they were made.
    pub acked: Vec<(CommandId, Result<(), QueueFailure>)>,
}

/// The admission sink.
#[derive(Clone)]
pub struct AdmitSink {
    conn: Shared,
    keys: Arc<Keys>,
    consumer: Arc<str>,
    /// This incarnation as a lease holder (`Carrier::holder`).
    holder: Arc<str>,
    window_ms: u64,
    /// Procedures already in the registry set (added once per process).
    registered: Arc<Mutex<HashSet<String>>>,
    metrics: Arc<Metrics>,
    /// With `SUBTOCALL_REDIS_WAIT_REPLICAS`: the copies kept until the
    /// replicas confirm them.
    replicas: Option<Arc<Replicas>>,
    /// With `SUBTOCALL_RETENTION`: each event is also kept per topic, in
    /// the same step.
    retention: Option<Arc<super::retain::Retention>>,
    /// By the admission script itself (one Redis), or by a script of its
    /// own after it (a cluster: the topic's stream is in another slot).
    retain_in_script: bool,
    /// `SUBTOCALL_QUEUE_MAX_BACKLOG`: entries a stream may hold (0: no
    /// bound), and whether to make room by removing the oldest.
    bound: u64,
    drop_oldest: bool,
    /// Events removed from a stream to make room, for the driver to
    /// dead-letter (`Sink::take_evicted`).
    removed: Arc<Mutex<Vec<SharedEvent>>>,
}

/// Replica acknowledgement as the admission sink does it.
struct Replicas {
    copies: replicas::Shared,
    wait: crate::config::WaitConfig,
    /// A connection of its own for WAIT (one server or Sentinel): WAIT
    /// blocks the connection it is sent on, so it is sent here after a
    /// small write of its own (`waited`), which comes after the batch's and
    /// so covers it, and admission goes on meanwhile.
    side: Option<Shared>,
    /// That write's key.
    waited: String,
    /// The watch task was started.
    watching: std::sync::atomic::AtomicBool,
}

impl AdmitSink {
    pub fn new(
        conn: Shared,
        keys: Arc<Keys>,
        consumer: &str,
        holder: &str,
        window: Duration,
        metrics: Arc<Metrics>,
    ) -> AdmitSink {
        AdmitSink {
            conn,
            keys,
            consumer: Arc::from(consumer),
            holder: Arc::from(holder),
            window_ms: window.as_millis().max(1) as u64,
            registered: Arc::default(),
            metrics,
            replicas: None,
            retention: None,
            retain_in_script: false,
            bound: 0,
            drop_oldest: false,
            removed: Arc::default(),
        }
    }

    /// Bounds each stream to `bound` entries (0: none); at the bound the
    /// new event is refused, or with `drop_oldest` the stream's oldest
    /// entry nobody holds is removed to make room.
    pub fn with_bound(mut self, bound: u64, drop_oldest: bool) -> AdmitSink {
        self.bound = bound;
        self.drop_oldest = drop_oldest;
        self
    }

    /// Where it writes, and the queue's key names.
    pub fn store(&self) -> (&Shared, &Keys) {
        (&self.conn, &self.keys)
    }

    /// The same sink without retention: for events that come from the
    /// retained stream (kept there already).
    pub fn without_retention(&self) -> AdmitSink {
        AdmitSink {
            retention: None,
            ..self.clone()
        }
    }

    /// Keeps every admitted event per topic as well (`SUBTOCALL_RETENTION`),
    /// in the admission script itself unless `cluster` (where the topic's
    /// stream lives in another hash slot).
    pub fn with_retention(
        mut self,
        retention: super::retain::Retention,
        cluster: bool,
    ) -> AdmitSink {
        self.retention = Some(Arc::new(retention));
        self.retain_in_script = !cluster;
        self
    }

    /// Asks the replicas after each batch (`wait.replicas` > 0) and keeps
    /// copies until they confirm. `conn` should be the admission's own:
    /// WAIT holds it, and counts only its writes.
    pub fn with_replicas(
        mut self,
        wait: crate::config::WaitConfig,
        window: Duration,
        side: Option<Shared>,
    ) -> AdmitSink {
        self.metrics
            .redis_wait_replicas
            .set(i64::from(wait.replicas));
        if wait.replicas > 0 {
            // Not known until the first WAIT answers.
            self.metrics.redis_replicas_acknowledging.set(-1);
            self.replicas = Some(Arc::new(Replicas {
                copies: Arc::new(Mutex::new(Copies::new(&wait, window))),
                wait,
                side,
                waited: format!("{}:waited:{}", self.keys.group(), self.consumer),
                watching: Default::default(),
            }));
            if let (Some(r), Ok(_)) = (&self.replicas, tokio::runtime::Handle::try_current()) {
                self.watch(r);
            }
        }
        self
    }

    /// Admits `jobs`, one script call per stream (a procedure, or one of
    /// its partitions; its keys share a hash slot), in the order of each
    /// stream's first event. With the queue core, each also reads what the
    /// core grants of its stream, and the first call of each procedure
    /// carries the acknowledgements waiting for it.
    pub fn admit(
        &self,
        jobs: &[Job<Box<SharedEvent>>],
        mut core: Option<&mut dyn Grants>,
    ) -> BoxFuture<'static, Admitted> {
        let groups =
            crate::sink::groups_in_order(jobs.iter().map(|j| (&*j.item.procedure, j.item.lane)));
        let mut calls = Vec::with_capacity(groups.len());
        let mut copies: Vec<Option<Copy>> = Vec::new();
        let mut new = Vec::new();
        let mut seen_procedures: Vec<&str> = Vec::new();
        // Each call's procedure and the batch's events it carries.
        let mut placed: Vec<(Arc<str>, Vec<usize>)> = Vec::with_capacity(groups.len());
        // With retention: the topic's copies, by call and place in it.
        let mut to_retain: Vec<(usize, usize, String, Bytes)> = Vec::new();
        for ((procedure, lane), at) in groups {
            let unit = Unit {
                procedure: Arc::from(procedure),
                partition: lane,
            };
            let first_of_procedure = !seen_procedures.contains(&procedure);
            if first_of_procedure {
                seen_procedures.push(procedure);
            }
            let granted = core.as_mut().and_then(|c| c.grant(&unit));
            let ride = match core.as_mut() {
                Some(c) if first_of_procedure => c.ride_acks(procedure),
                _ => None,
            };
            let acks = match ride {
                Some((id, Command::Ack { keys })) => {
                    Some((id, super::carrier::acks_by_stream(&self.keys, &keys)))
                }
                _ => None,
            };
            let events: Vec<&SharedEvent> = at.iter().map(|&i| &*jobs[i].item).collect();
            let stream = self.keys.stream_of(&unit);
            let lease = self.keys.lease_of(&unit);
            // One write: the acknowledgements, the script, and for a plain
            // stream its read (a partition's is the script's: only while
            // this instance holds its lease).
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for (s, ids) in acks.iter().flat_map(|(_, s)| s) {
                super::carrier::push_ack(&mut pipe, s, self.keys.group(), ids);
            }
            let read_here = match granted {
                Some(g) if lease.is_none() && g.count > 0 => Some(g.count),
                _ => None,
            };
            // Retention in the same script (one Redis), or after it.
            let keep_here = self
                .retention
                .as_ref()
                .filter(|_| self.retain_in_script)
                .filter(|_| events.iter().any(|e| e.retain));
            // The small script where it does all that is needed: most
            // calls at a moderate rate are one event, whose cost to Redis
            // is mostly the script's arguments.
            let plain = lease.is_none() && !(self.bound > 0 && self.drop_oldest);
            // By its hash: the script's 2 KB are not sent (nor hashed by
            // Redis) with every event; sent once a server says it lacks it.
            // Sized up front: grown argument by argument, redis-rs's buffers
            // cost a dozen reallocations per event at a moderate rate.
            let mut cmd =
                redis::Cmd::with_capacity(2 * events.len() + 16, 512 * events.len() + 512);
            cmd.arg("EVALSHA");
            let retained = keep_here.map(|r| r.key(&events[0].topic));
            if plain {
                let keys = events.len() + 1 + usize::from(retained.is_some());
                cmd.arg(hash(true)).arg(keys).arg(&stream);
            } else {
                cmd.arg(hash(false))
                    .arg(events.len() + 3)
                    .arg(&stream)
                    .arg(lease.as_deref().unwrap_or(&stream))
                    .arg(retained.as_deref().unwrap_or(&stream));
            }
            // One buffer for every key and event: `arg` copies it.
            let seen = self.keys.seen(procedure, 0);
            let prefix = seen.strip_suffix('0').unwrap_or(&seen).as_bytes();
            let mut scratch: Vec<u8> = Vec::with_capacity(256);
            let keep = self.replicas.is_some();
            let mut copy = keep.then(|| Copy {
                stream: stream.clone(),
                lease: lease.clone().unwrap_or_else(|| stream.clone()),
                claims: Vec::with_capacity(events.len()),
                entries: Vec::with_capacity(events.len()),
            });
            for ev in &events {
                scratch.clear();
                scratch.extend_from_slice(prefix);
                let _ = write!(scratch, "{}", ev.publication.0);
                cmd.arg(scratch.as_slice());
                if let Some(copy) = copy.as_mut() {
                    copy.claims.push(Bytes::copy_from_slice(&scratch));
                }
            }
            if let (true, Some(retained)) = (plain, &retained) {
                cmd.arg(retained);
            }
            let want = match (read_here, granted) {
                (Some(_), _) => -1,
                (None, Some(g)) => g.count as i64,
                (None, None) => 0,
            };
            // Whether the script's reply lists what it read (else what it
            // appended, or nothing).
            let script_reads = !plain && want > 0;
            // Retention's arguments: which events to keep, the oldest entry
            // id and the most entries to keep.
            let keep_args = keep_here.map(|r| {
                let flags: Vec<u8> = events
                    .iter()
                    .map(|e| if e.retain { b'1' } else { b'0' })
                    .collect();
                (flags, r.oldest_ms(), r.max_events())
            });
            if plain {
                cmd.arg(self.window_ms).arg(self.bound);
            } else {
                cmd.arg(self.window_ms)
                    .arg(self.keys.group())
                    .arg(&*self.consumer)
                    .arg(want)
                    .arg(if lease.is_some() { &*self.holder } else { "" })
                    .arg(self.bound)
                    .arg(if self.drop_oldest { "1" } else { "0" });
                match &keep_args {
                    Some((flags, oldest, max)) => cmd.arg(flags).arg(oldest).arg(max),
                    None => cmd.arg("").arg(0).arg(0),
                };
            }
            // The stored events, kept for the entries this call reads back.
            let mut stored = Vec::with_capacity(events.len());
            for (n, ev) in events.iter().enumerate() {
                scratch.clear();
                entry::encode_into(ev, &mut scratch);
                cmd.arg(scratch.as_slice());
                if ev.retain && self.retention.is_some() && !self.retain_in_script {
                    // Kept for the topic (after the script, on a cluster)
                    // if this call appends it.
                    let e = Bytes::copy_from_slice(&scratch);
                    to_retain.push((calls.len(), n + 1, ev.topic.clone(), e));
                }
                if granted.is_some() || keep {
                    let e = Bytes::copy_from_slice(&scratch);
                    if let Some(copy) = copy.as_mut() {
                        copy.entries.push(e.clone());
                    }
                    if granted.is_some() {
                        stored.push(e);
                    }
                }
            }
            if let (true, Some((flags, oldest, max))) = (plain, &keep_args) {
                cmd.arg(flags).arg(oldest).arg(max);
            }
            pipe.add_command(cmd);
            if let Some(count) = read_here {
                let mut read = redis::Cmd::with_capacity(9, 128 + stream.len());
                read.arg("XREADGROUP")
                    .arg("GROUP")
                    .arg(self.keys.group())
                    .arg(&*self.consumer)
                    .arg("COUNT")
                    .arg(count)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(">");
                pipe.add_command(read);
            }
            let registered = self
                .registered
                .lock()
                .map(|r| r.contains(procedure))
                .unwrap_or(false);
            if !registered && !new.iter().any(|p| p == procedure) {
                new.push(procedure.to_owned());
            }
            copies.push(copy);
            let script_at = 2 * acks.as_ref().map_or(0, |(_, s)| s.len());
            calls.push((
                Write {
                    pipe,
                    script_at,
                    plain,
                },
                granted.map(|g| (g.id, script_reads)),
                acks.map(|(id, _)| id),
                stored,
            ));
            placed.push((unit.procedure.clone(), at));
        }
        let events = jobs.len();
        let retention = self.retention.clone();
        let conn = self.conn.clone();
        let keys = self.keys.clone();
        let registered = self.registered.clone();
        let metrics = self.metrics.clone();
        let replicas = self.replicas.clone();
        let again = self.clone();
        Box::pin(async move {
            let grants: Vec<GrantId> = calls
                .iter()
                .filter_map(|(_, g, _, _)| g.map(|(id, _)| id))
                .collect();
            let rides: Vec<CommandId> = calls.iter().filter_map(|(_, _, a, _)| *a).collect();
            let failed = |e: redis::RedisError| {
                let why = super::carrier::failure(&e);
                Admitted {
                    report: Report::All(Err(Failure::Redis(e))),
                    taken: grants.iter().map(|g| (*g, Err(why.clone()))).collect(),
                    acked: rides.iter().map(|a| (*a, Err(why.clone()))).collect(),
                }
            };
            let mut c = match conn.get().await {
                Ok(c) => c,
                Err(e) => {
                    again.write_failed();
                    return failed(e);
                }
            };
            let epoch = c.epoch();
            if let Some(r) = &replicas {
                again.watch(r);
                // What an earlier master may have lost goes before anything new.
                if let Err(e) = again.offer_again(r, &c).await {
                    return failed(e);
                }
            }
            // The registry first: a stream nobody knows about would not be read.
            for procedure in new {
                let added = redis::cmd("SADD")
                    .arg(keys.procedures())
                    .arg(&procedure)
                    .query_async::<i64>(&mut c)
                    .await;
                if let Err(e) = added {
                    again.write_failed();
                    return failed(e);
                }
                if let Ok(mut r) = registered.lock() {
                    r.insert(procedure);
                }
            }
            let replies = join_all(calls.iter().map(|(write, _, _, _)| {
                let mut c = c.clone();
                async move { run_call(write, &mut c).await }
            }))
            .await;
            let (mut admitted, mut elsewhere) = (0, 0);
            let mut taken = Vec::new();
            let mut acked = Vec::new();
            let mut error = None;
            let mut kept = Vec::new();
            let mut over: Vec<usize> = Vec::new();
            // The retained copies this batch appended.
            let mut retain: Vec<(&str, &[u8])> = Vec::new();
            for (call, (((reply, (_, grant, ride, stored)), copy), (procedure, at))) in replies
                .into_iter()
                .zip(calls)
                .zip(copies)
                .zip(placed)
                .enumerate()
            {
                let (value, read) = match reply {
                    Ok(Call {
                        acked: ack,
                        script,
                        read,
                    }) => {
                        if let Some(a) = ride {
                            acked.push((a, ack));
                        }
                        (script, read)
                    }
                    Err(e) => {
                        if let Some(a) = ride {
                            acked.push((a, Err(super::carrier::failure(&e))));
                        }
                        (Err(e), None)
                    }
                };
                match value {
                    Ok(value) => {
                        if retention.is_some() {
                            let not_here = not_appended(&value);
                            retain.extend(
                                to_retain
                                    .iter()
                                    .filter(|(c, n, _, _)| *c == call && !not_here.contains(n))
                                    .map(|(_, _, topic, e)| (topic.as_str(), e.as_ref())),
                            );
                        }
                        if let Some(copy) = copy {
                            kept.push(only_admitted(copy, &value));
                        }
                        if let Value::Array(parts) = &value
                            && let Some(Value::Int(n)) = parts.get(6)
                        {
                            metrics.queue_retained.inc_by((*n).max(0) as u64);
                        }
                        let (refused, removed) = over_bound(&value);
                        over.extend(refused.iter().filter_map(|n| at.get(n - 1)));
                        if !removed.is_empty() {
                            let mut out = again.removed.lock().unwrap_or_else(|e| e.into_inner());
                            for fields in removed {
                                match entry::read(&procedure, fields) {
                                    Ok(event) => out.push(event),
                                    Err(e) => {
                                        tracing::warn!(%procedure, error = %e, "an entry removed to make room held no event")
                                    }
                                }
                            }
                        }
                        let (added, before, mut got) = parse_admitted(&value, &stored);
                        admitted += added;
                        elsewhere += before;
                        if let Some((g, script_reads)) = grant {
                            let got = match read {
                                // Read beside the script: what it appended
                                // are the events given (`got` names them).
                                Some(read) => read.map(|read| with_stored(&read, &mut got)),
                                None if script_reads => Ok(std::mem::take(&mut got)),
                                None => Ok(Vec::new()),
                            };
                            taken.push((g, got));
                        }
                    }
                    Err(e) => {
                        if let Some((g, _)) = grant {
                            // A read beside it took what it says (the
                            // entries a half-done script appended too).
                            let got = match read {
                                Some(read) => read.map(|read| with_stored(&read, &mut Vec::new())),
                                None => Err(super::carrier::failure(&e)),
                            };
                            taken.push((g, got));
                        }
                        // Offering again is harmless: retry the whole batch.
                        error.get_or_insert(e);
                    }
                }
            }
            if let (Some(r), false) = (&retention, retain.is_empty()) {
                let commands = r.commands(&retain);
                let kept = join_all(commands.iter().map(|cmd| {
                    let mut c = c.clone();
                    async move { super::retain::run(cmd, &mut c).await }
                }))
                .await;
                for (kept, cmd) in kept.into_iter().zip(&commands) {
                    match kept {
                        Ok(Value::Int(n)) => {
                            metrics.queue_retained.inc_by(n.max(0) as u64);
                        }
                        Ok(_) => {}
                        // The events are admitted: only their history copy
                        // is missing (not retried: it would be kept twice).
                        Err(e) => {
                            let events = cmd.args_iter().count().saturating_sub(5);
                            metrics.redis_errors.inc();
                            metrics.queue_retention_failed.inc_by(events as u64);
                            tracing::warn!(events, error = %e, "could not keep admitted events in their topic's retained stream; they are delivered, but replay will not have them");
                        }
                    }
                }
            }
            metrics.queue_admitted.inc_by(admitted);
            metrics.queue_admitted_elsewhere.inc_by(elsewhere);
            if let Some(r) = &replicas {
                if error.is_some() {
                    again.write_failed();
                } else {
                    let ask = {
                        let mut held = lock(&r.copies);
                        let ask = held.keep(kept, epoch, Instant::now());
                        held.publish(&metrics);
                        ask
                    };
                    if let Some(ask) = ask {
                        again.ask_wait(r, c, ask);
                    }
                }
            }
            let report = match error {
                Some(e) => Report::All(Err(Failure::Redis(e))),
                None if over.is_empty() => Report::All(Ok(())),
                // Refused at the bound: dead-lettered with reason backlog.
                None => {
                    let mut each: Vec<crate::forward::Outcome> =
                        (0..events).map(|_| Ok(())).collect();
                    for i in over {
                        if let Some(o) = each.get_mut(i) {
                            *o = Err(Failure::Backlog {
                                backlog: again.bound,
                            });
                        }
                    }
                    Report::Each(each)
                }
            };
            Admitted {
                report,
                taken,
                acked,
            }
        })
    }
}

impl AdmitSink {
    /// This instance delivered `procedure`'s event of `publication`: its
    /// copy (if any) is not offered again.
    pub fn delivered(&self, procedure: &str, publication: u64) {
        if let Some(r) = &self.replicas {
            let claim = self.keys.seen(procedure, publication);
            lock(&r.copies).delivered(claim.as_bytes());
        }
    }

    /// A write failed: the copies are offered again before the next one.
    fn write_failed(&self) {
        if let Some(r) = &self.replicas {
            lock(&r.copies).failed();
        }
    }

    /// Offers the unconfirmed copies again when connection `c` may lack
    /// them (another master, or a write failed since they were written).
    async fn offer_again(&self, r: &Replicas, c: &super::Conn) -> redis::RedisResult<()> {
        let epoch = c.epoch();
        let again = lock(&r.copies).to_offer_again(epoch, Instant::now());
        if !again.is_empty() {
            let events: usize = again.iter().map(|copy| copy.claims.len()).sum();
            let offers: Vec<redis::Cmd> = again.iter().map(|copy| self.offer_cmd(copy)).collect();
            let replies = join_all(offers.iter().map(|cmd| {
                let mut c = c.clone();
                async move { run_admit(cmd, &mut c).await }
            }))
            .await;
            let mut admitted = 0;
            for reply in replies {
                match reply {
                    Ok(value) => admitted += parse_admitted(&value, &[]).0,
                    Err(e) => {
                        lock(&r.copies).failed();
                        return Err(e);
                    }
                }
            }
            tracing::warn!(
                events,
                admitted,
                "offered the events the replicas had not confirmed to the master again \
                 (a failover or a failed write); admitted = what the master had lost"
            );
            self.metrics.queue_admitted.inc_by(admitted);
            lock(&r.copies).publish(&self.metrics);
        }
        lock(&r.copies).offered(epoch);
        Ok(())
    }

    /// The admission script for a copy: append unless claimed, read nothing.
    fn offer_cmd(&self, copy: &Copy) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(hash(false))
            .arg(copy.claims.len() + 3)
            .arg(&copy.stream)
            .arg(&copy.lease)
            .arg(&copy.stream);
        for claim in &copy.claims {
            cmd.arg(claim.as_ref());
        }
        cmd.arg(self.window_ms)
            .arg(self.keys.group())
            .arg(&*self.consumer)
            .arg(0)
            .arg("")
            .arg(self.bound)
            .arg(if self.drop_oldest { "1" } else { "0" })
            .arg("")
            .arg(0)
            .arg(0);
        for entry in &copy.entries {
            cmd.arg(entry.as_ref());
        }
        cmd
    }

    /// Sends `WAIT` on `c` (the connection the batch was written on), and
    /// lets go of the copies it confirms when it answers.
    fn ask_wait(&self, r: &Arc<Replicas>, mut c: super::Conn, ask: Ask) {
        let r = r.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut ask = ask;
            loop {
                // A WAIT owed for batches written on another connection than
                // `c` fails at once: they are offered again.
                let answer = match ask.epoch == c.epoch() {
                    true => wait(&r, &mut c, ask).await,
                    false => Err(()),
                };
                let next = {
                    let mut copies = lock(&r.copies);
                    let next = copies.answered(ask, answer, Instant::now());
                    copies.publish(&metrics);
                    next
                };
                match next {
                    Some(next) => ask = next,
                    None => break,
                }
            }
        });
    }

    /// Starts, once, the task that asks the replicas once a second while
    /// no admission does (and offers the copies again after a failover
    /// when no new event comes to do it).
    fn watch(&self, r: &Arc<Replicas>) {
        use std::sync::atomic::Ordering;
        if r.watching.swap(true, Ordering::Relaxed) {
            return;
        }
        // Without the copies: only `weak` keeps them, so the task ends with
        // the last clone of the sink.
        let sink = AdmitSink {
            replicas: None,
            ..self.clone()
        };
        let weak = Arc::downgrade(r);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(replicas::ASK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(r) = weak.upgrade() else { return };
                let c = match sink.conn.get().await {
                    Ok(c) => c,
                    Err(_) => continue,
                };
                if sink.offer_again(&r, &c).await.is_err() {
                    continue;
                }
                let ask = lock(&r.copies).tick(c.epoch(), Instant::now());
                if let Some(ask) = ask {
                    sink.ask_wait(&r, c, ask);
                }
            }
        });
    }
}

fn lock(copies: &replicas::Shared) -> std::sync::MutexGuard<'_, Copies> {
    copies.lock().unwrap_or_else(|p| p.into_inner())
}

/// Asks `WAIT` for what `c` (the admission's connection) wrote before
/// `ask`: on WAIT's own connection after a small write of its own, when it
/// reaches the same server, else on `c`.
async fn wait(r: &Replicas, c: &mut super::Conn, ask: Ask) -> Result<i64, ()> {
    let wait = replicas::wait_cmd(&r.wait);
    let side = match &r.side {
        Some(side) => side.get().await.ok().filter(|s| s.same_server(c)),
        None => None,
    };
    let answer = match side {
        // After a write of its own, which Redis orders after the batch's:
        // its WAIT covers the batch too.
        Some(mut s) => redis::pipe()
            .cmd("SET")
            .arg(&r.waited)
            .arg(ask.seq)
            .arg("PX")
            .arg(60_000)
            .ignore()
            .add_command(wait)
            .query_async::<(i64,)>(&mut s)
            .await
            .map(|(n,)| n),
        None => wait.query_async::<i64>(c).await,
    };
    answer.map_err(|e| {
        tracing::debug!(error = %e, "WAIT failed: the unconfirmed copies are offered again");
    })
}

/// What one admission call's write came to.
struct Call {
    /// The acknowledgements it carried (none: `Ok`).
    acked: Result<(), QueueFailure>,
    /// The script's reply.
    script: redis::RedisResult<Value>,
    /// The XREADGROUP replies beside it, if it read.
    read: Option<Result<Vec<Value>, QueueFailure>>,
}

/// One admission call's write: the acknowledgements (`script_at`
/// commands), the script (`PLAIN` or `ADMIT`), and its stream's read if
/// any, as `AdmitSink::admit` laid them out.
struct Write {
    pipe: redis::Pipeline,
    script_at: usize,
    plain: bool,
}

/// Sends one admission call's write (`AdmitSink::admit`); when the server
/// lacks the script, the script with its body and the read again.
async fn run_call(write: &Write, c: &mut super::Conn) -> redis::RedisResult<Call> {
    let (pipe, at, plain) = (&write.pipe, write.script_at, write.plain);
    let replies: Vec<redis::RedisResult<Value>> = pipe.query_async(c).await?;
    let mut replies = replies.into_iter();
    let acked = replies
        .by_ref()
        .take(at)
        .try_for_each(|r| r.map(drop))
        .map_err(|e| super::carrier::failure(&e));
    let script = replies.next().unwrap_or_else(no_reply);
    let read = replies.next().map(read_reply);
    let (script, read) = match (script, pipe.cmd_iter().nth(at)) {
        (Err(e), Some(cmd)) if e.code() == Some("NOSCRIPT") => {
            let mut again = redis::pipe();
            again.ignore_errors().add_command(with_body(cmd, plain));
            for read in pipe.cmd_iter().skip(at + 1) {
                again.add_command(read.clone());
            }
            let replies: Vec<redis::RedisResult<Value>> = again.query_async(c).await?;
            let mut replies = replies.into_iter();
            let script = replies.next().unwrap_or_else(no_reply);
            // What the first read took stays taken: both count.
            let read = match (read, replies.next().map(read_reply)) {
                (Some(Ok(mut first)), Some(Ok(second))) => {
                    first.extend(second);
                    Some(Ok(first))
                }
                (Some(Err(e)), _) | (_, Some(Err(e))) => Some(Err(e)),
                (first, _) => first,
            };
            (script, read)
        }
        (script, _) => (script, read),
    };
    let script = if plain {
        script.map(plain_reply)
    } else {
        script
    };
    Ok(Call {
        acked,
        script,
        read,
    })
}

/// A pipeline that came back without the script's reply.
fn no_reply() -> redis::RedisResult<Value> {
    Err((redis::ErrorKind::UnexpectedReturnType, "no admission reply").into())
}

/// An XREADGROUP reply beside an admission script, as its entries' values.
fn read_reply(reply: redis::RedisResult<Value>) -> Result<Vec<Value>, QueueFailure> {
    match reply {
        Ok(v) => Ok(vec![v]),
        // A group gone with a Redis that lost its data: nothing read (the
        // reader creates it again).
        Err(e) if e.code() == Some("NOGROUP") => Ok(Vec::new()),
        Err(e) => Err(super::carrier::failure(&e)),
    }
}

/// The entries of an XREADGROUP reply beside an admission script: those
/// the script appended (`appended`, from its reply) keep the events as
/// given, the others their fields from the reply.
fn with_stored(read: &[Value], appended: &mut [Got<Fields>]) -> Vec<Got<Fields>> {
    appended.sort_unstable_by_key(|g| g.id);
    let mut body =
        |id: EntryId, e: Option<&Value>| match appended.binary_search_by_key(&id, |a| a.id) {
            Ok(i) => appended[i].body.take(),
            Err(_) => e.map(super::carrier::fields),
        };
    read.iter()
        .flat_map(|r| super::carrier::stream_entries_with(r, &mut body))
        .flat_map(|(_, entries)| entries)
        .collect()
}

/// Runs a call of the full admission script (`offer_cmd`), sending the
/// body when the server lacks it.
async fn run_admit(cmd: &redis::Cmd, c: &mut super::Conn) -> redis::RedisResult<Value> {
    match cmd.query_async::<Value>(c).await {
        Err(e) if e.code() == Some("NOSCRIPT") => {
            with_body(cmd, false).query_async::<Value>(c).await
        }
        other => other,
    }
}

/// The SHA-1 of an admission script (`PLAIN` or `ADMIT`), as EVALSHA
/// names it.
fn hash(plain: bool) -> &'static str {
    static HASHES: std::sync::OnceLock<[String; 2]> = std::sync::OnceLock::new();
    let [admit, plain_hash] = HASHES
        .get_or_init(|| [ADMIT, PLAIN].map(|body| redis::Script::new(body).get_hash().to_owned()));
    if plain { plain_hash } else { admit }
}

/// `cmd` (an EVALSHA of `PLAIN` if `plain`, else of `ADMIT`) as an EVAL
/// with the script's body, which also puts it in the server's script cache.
fn with_body(cmd: &redis::Cmd, plain: bool) -> redis::Cmd {
    let mut eval = redis::cmd("EVAL");
    eval.arg(if plain { PLAIN } else { ADMIT });
    for arg in cmd.args_iter().skip(2) {
        if let redis::Arg::Simple(bytes) = arg {
            eval.arg(bytes);
        }
    }
    eval
}

/// `copy` without the events its admission's reply says were already
/// claimed (another instance admitted them, and keeps their copies).
fn only_admitted(mut copy: Copy, value: &Value) -> Copy {
    let Value::Array(parts) = value else {
        return copy;
    };
    // Already claimed, or refused at the bound: not admitted here.
    let none = Vec::new();
    let list = |i: usize| match parts.get(i) {
        Some(Value::Array(v)) => v,
        _ => &none,
    };
    let (refused, over) = (list(3), list(4));
    if refused.is_empty() && over.is_empty() {
        return copy;
    }
    let mut skip = vec![false; copy.claims.len()];
    for n in refused.iter().chain(over) {
        if let Value::Int(n) = n
            && let Some(s) = usize::try_from(*n - 1).ok().and_then(|i| skip.get_mut(i))
        {
            *s = true;
        }
    }
    let mut flags = skip.iter();
    copy.claims
        .retain(|_| !flags.next().copied().unwrap_or(false));
    let mut flags = skip.iter();
    copy.entries
        .retain(|_| !flags.next().copied().unwrap_or(false));
    copy
}

/// The events of an admission call it did not append (already claimed, or
/// over the bound), by their place in the call (from 1).
fn not_appended(value: &Value) -> Vec<usize> {
    let Value::Array(parts) = value else {
        return Vec::new();
    };
    [3, 4]
        .iter()
        .filter_map(|&i| match parts.get(i) {
            Some(Value::Array(v)) => Some(v),
            _ => None,
        })
        .flatten()
        .filter_map(|n| match n {
            Value::Int(n) if *n >= 1 => Some(*n as usize),
            _ => None,
        })
        .collect()
}

/// What an admission's reply says of the bound: the events refused (their
/// place in the call, from 1) and the fields of the entries removed to make
/// room.
fn over_bound(value: &Value) -> (Vec<usize>, Vec<Fields>) {
    let Value::Array(parts) = value else {
        return (Vec::new(), Vec::new());
    };
    let refused = match parts.get(4) {
        Some(Value::Array(v)) => v
            .iter()
            .filter_map(|n| match n {
                Value::Int(n) if *n >= 1 => Some(*n as usize),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let removed = match parts.get(5) {
        Some(Value::Array(v)) => v.iter().map(super::carrier::fields).collect(),
        _ => Vec::new(),
    };
    (refused, removed)
}

/// The counts and the entries read of an admission's reply; the entries it
/// appended itself are the events given (`stored`, in order).
fn parse_admitted(value: &Value, stored: &[Bytes]) -> (u64, u64, Vec<Got<Fields>>) {
    let Value::Array(parts) = value else {
        return (0, 0, Vec::new());
    };
    let count = |v: Option<&Value>| match v {
        Some(Value::Int(n)) => (*n).max(0) as u64,
        _ => 0,
    };
    let mut got = Vec::new();
    if let Some(Value::Array(read)) = parts.get(2) {
        for row in read {
            let Value::Array(row) = row else { continue };
            let Some(id) = row.first().and_then(text).and_then(|t| EntryId::parse(&t)) else {
                continue;
            };
            let body = match row.get(1) {
                Some(Value::Int(n)) if *n >= 1 => stored
                    .get(*n as usize - 1)
                    .map(|e| vec![(Bytes::from_static(entry::FIELD.as_bytes()), e.clone())]),
                _ => row.get(2).map(super::carrier::fields),
            };
            got.push(Got {
                id,
                deliveries: 1,
                body,
            });
        }
    }
    (count(parts.first()), count(parts.get(1)), got)
}

impl<T> Sink<T> for AdmitSink {
    fn prepare(&self, _event: &SharedEvent, _policy: Option<&Policy>) -> Outgoing {
        // The entry is made of the payload as received: nothing to build.
        Outgoing::AsReceived
    }

    fn take_evicted(&mut self) -> Vec<SharedEvent> {
        std::mem::take(&mut *self.removed.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn dispatch(&self) -> Dispatch {
        // In order, so that each stream keeps the order events came in.
        Dispatch::Pipeline { max: BATCH }
    }

    fn needs_session(&self) -> bool {
        false
    }

    /// Admits without reading (the queue stage admits through
    /// [`AdmitSink::admit`], with what its core grants).
    fn start(
        &mut self,
        _id: DeliveryId,
        jobs: &[Job<Box<SharedEvent>>],
        _session: Option<&mut Session<T>>,
        _now: Instant,
    ) -> Started {
        let admitting = self.admit(jobs, None);
        Started::Pending(Box::pin(async move { admitting.await.report }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_reply_reads_as_the_full_scripts() {
        let id = || Value::BulkString(b"1-1".to_vec());
        let reply = plain_reply(Value::Array(vec![
            Value::Int(1),
            id(),
            Value::Int(0),
            Value::Int(1),
        ]));
        let (added, before, got) = parse_admitted(&reply, &[Bytes::from_static(b"event")]);
        assert_eq!((added, before), (1, 1));
        let Value::Array(parts) = &reply else {
            panic!("an array")
        };
        assert_eq!(parts.get(6), Some(&Value::Int(1)), "the copies kept");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, EntryId::parse("1-1").expect("an id"));
        assert_eq!(not_appended(&reply), vec![2, 3]);
        assert_eq!(over_bound(&reply).0, vec![3]);
    }
}
