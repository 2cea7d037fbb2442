//! The IO half of the Redis queue: carries each [`Command`] of the core
//! (`streams::core`) to Redis and brings back its [`Reply`]. It decides
//! nothing: every failure is classified ([`Failure`]) and handed back.
//!
//! Connections, per instance: the shared multiplexed connection (one per
//! node on a cluster) for everything but the reads, and on one Redis
//! server one reader connection of its own, whose XREADGROUP reads every
//! stream the core names at once, without waiting (most new entries are
//! taken by the admissions themselves, `streams::admit`). On a Redis
//! Cluster one command cannot span the procedures' slots: a read is one
//! XREADGROUP per procedure, all at once. Scripts that concern many
//! streams (keepalive, scan, leases) run once per node, declaring one key
//! for routing and naming the others as arguments (`allow-cross-slot-keys`:
//! keys of several slots, on one node).

use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{BoxFuture, join_all};
use redis::Value;
use tokio::sync::Mutex;

use super::core::{Command, CommandId, EntryId, Failure, Got, Kept, Key, Reply, Unit};
use super::resp::{self, Cursor, RawConn};
use super::{COMMAND_TIMEOUT, Keys, Shared, Target, text};
use crate::forward::outcome::is_transient_redis_code;

/// An entry's fields, as slices of the reply that brought them.
pub type Fields = Vec<(Bytes, Bytes)>;

/// Pending entries a take looks at in one call.
const TAKE_SCAN: usize = 100;

/// KEYS[1] the stream; ARGV: group, this consumer, cursor (exclusive), how
/// many, the idle time (ms) from which another consumer's entry is claimed
/// (-1: own entries only), whether own entries count as delivered again
/// (1/0), how many pending entries to look at. Walks the pending entries
/// in order; returns {next cursor ('0-0' at the end), {{id, deliveries,
/// fields}, ...}}, stopping after the first taken that had been handed out
/// before. Entries deleted meanwhile are acknowledged away.
const TAKE: &str = r"
local group, me = ARGV[1], ARGV[2]
local want, min_idle = tonumber(ARGV[4]), tonumber(ARGV[5])
local count_own, scan = ARGV[6] == '1', tonumber(ARGV[7])
local rows = redis.call('XPENDING', KEYS[1], group, '(' .. ARGV[3], '+', scan)
local out = {}
for i, r in ipairs(rows) do
  local id, owner, idle, n = r[1], r[2], r[3], r[4]
  local mine = owner == me
  if mine or (min_idle >= 0 and idle >= min_idle) then
    local e
    if mine and not count_own then
      redis.call('XCLAIM', KEYS[1], group, me, 0, id, 'JUSTID')
      e = redis.call('XRANGE', KEYS[1], id, id)[1]
    else
      e = redis.call('XCLAIM', KEYS[1], group, me, 0, id)[1]
      n = n + 1
    end
    if e then
      out[#out + 1] = {id, n, e[2]}
      if #out >= want or n > 1 then
        return {id, out}
      end
    else
      redis.call('XACK', KEYS[1], group, id)
    end
  end
end
if #rows >= scan then
  return {rows[#rows][1], out}
end
return {'0-0', out}
";

/// Keepalive on one node. KEYS[1] routes it. ARGV: this consumer, the lease
/// time (ms), the group, the instances' sorted set or '' (see below),
/// this incarnation's name as a lease holder (`Carrier::holder`); then
/// the leases to give up if they are this holder's (count, keys); the
/// leases to renew (count, keys); the leases to take (count of groups,
/// each: how many to take, count, then pairs of lease and its stream); the
/// entries to refresh (count of streams, each: stream, count, ids in
/// order). Returns {renewed (1/0 each), taken ({lease, 1 if its stream has
/// nothing pending else 0}, ...), lost (stream index, id, ...)}.
///
/// A lease key holds its holder's name: the consumer's and a part of this
/// incarnation's own, so that a restart under the same
/// `SUBTOCALL_INSTANCE_ID` is a new holder. Without the instances' set (a
/// cluster, where it lives on one node only) a lease lasts the lease time
/// unless renewed, one key at a time. With it (one Redis), a lease never
/// expires by itself: it is its holder's for as long as the holder counts
/// as live in that set (`HEARTBEAT`), so one heartbeat keeps all of an
/// instance's leases, and a lease whose holder went silent for the lease
/// time is free to take.
const KEEPALIVE: &str = r"#!lua flags=allow-cross-slot-keys
local me, ttl, group, instances, holder = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local live = instances ~= ''
local now = 0
if live then
  local t = redis.call('TIME')
  now = t[1] * 1000 + math.floor(t[2] / 1000)
end
local function free(key)
  local owner = redis.call('GET', key)
  if not owner or owner == holder then return true end
  if not live then return false end
  local seen = redis.call('ZSCORE', instances, owner)
  return not seen or now - tonumber(seen) >= tonumber(ttl)
end
local i = 6
local renewed, taken, lost = {}, {}, {}
local n = tonumber(ARGV[i]); i = i + 1
for k = 1, n do
  local key = ARGV[i]; i = i + 1
  if redis.call('GET', key) == holder then redis.call('DEL', key) end
end
n = tonumber(ARGV[i]); i = i + 1
for k = 1, n do
  local key = ARGV[i]; i = i + 1
  if redis.call('GET', key) == holder then
    if not live then redis.call('PEXPIRE', key, ttl) end
    renewed[k] = 1
  else
    renewed[k] = 0
  end
end
n = tonumber(ARGV[i]); i = i + 1
for g = 1, n do
  local want, m = tonumber(ARGV[i]), tonumber(ARGV[i + 1]); i = i + 2
  for k = 1, m do
    local key, stream = ARGV[i], ARGV[i + 1]; i = i + 2
    if want > 0 and free(key) then
      if live then
        redis.call('SET', key, holder)
      else
        redis.call('SET', key, holder, 'PX', ttl)
      end
      local p = redis.pcall('XPENDING', stream, group)
      local empty = 0
      if type(p) == 'table' and not p.err and p[1] == 0 then empty = 1 end
      taken[#taken + 1] = {key, empty}
      want = want - 1
    end
  end
end
n = tonumber(ARGV[i]); i = i + 1
for s = 1, n do
  local stream, m = ARGV[i], tonumber(ARGV[i + 1]); i = i + 2
  local first, last = ARGV[i], ARGV[i + m - 1]
  local mine = {}
  local rows = redis.pcall('XPENDING', stream, group, first, last, m + 10000, me)
  if type(rows) == 'table' and not rows.err then
    for _, r in ipairs(rows) do mine[r[1]] = true end
  end
  local keep = {'XCLAIM', stream, group, me, 0}
  for k = 1, m do
    local id = ARGV[i]; i = i + 1
    if mine[id] then
      keep[#keep + 1] = id
    else
      lost[#lost + 1] = s
      lost[#lost + 1] = id
    end
    if #keep >= 1005 or (k == m and #keep > 5) then
      keep[#keep + 1] = 'JUSTID'
      redis.call(unpack(keep))
      keep = {'XCLAIM', stream, group, me, 0}
    end
  end
end
return {renewed, taken, lost}
";

/// Scan on one node. KEYS[1] routes it. ARGV: group, this consumer, the
/// claim idle time (ms), how long a consumer with nothing pending may be
/// silent before it is forgotten (ms, 0: not now), then pairs (stream,
/// plain 1/0). Returns the plain streams with an entry idle that long.
const SCAN: &str = r"#!lua flags=allow-cross-slot-keys
local group, me, idle, gone = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local stale = {}
for i = 5, #ARGV, 2 do
  local s = ARGV[i]
  if ARGV[i + 1] == '1' then
    local p = redis.pcall('XPENDING', s, group, 'IDLE', idle, '-', '+', 1)
    if type(p) == 'table' and not p.err and #p > 0 then
      stale[#stale + 1] = s
    end
  end
  if gone > 0 then
    local cs = redis.pcall('XINFO', 'CONSUMERS', s, group)
    if type(cs) == 'table' and not cs.err then
      for _, c in ipairs(cs) do
        local f = {}
        for j = 1, #c, 2 do f[c[j]] = c[j + 1] end
        if f.name ~= me and f.pending == 0 and f.idle > gone then
          redis.call('XGROUP', 'DELCONSUMER', s, group, f.name)
        end
      end
    end
  end
end
return stale
";

/// KEYS[1] routes it; ARGV[1] this holder, ARGV[2..] leases. Gives up
/// those still ours.
const GIVE_UP: &str = r"#!lua flags=allow-cross-slot-keys
local n = 0
for i = 2, #ARGV do
  if redis.call('GET', ARGV[i]) == ARGV[1] then
    redis.call('DEL', ARGV[i])
    n = n + 1
  end
end
return n
";

/// KEYS[1] the instances (a sorted set), KEYS[2] the departures counter
/// (same slot); ARGV[1] this holder, ARGV[2] how long an instance counts
/// as live (ms). Scores this instance with Redis's clock, forgets the
/// silent ones (counting them as departed), returns {how many are live,
/// departures so far, 1 if this instance had counted as live without a
/// break since its previous heartbeat else 0}.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[2])
local prev = redis.call('ZSCORE', KEYS[1], ARGV[1])
local fresh = 0
if prev and now - tonumber(prev) < ttl then fresh = 1 end
redis.call('ZADD', KEYS[1], now, ARGV[1])
local gone = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
if gone > 0 then
  redis.call('INCRBY', KEYS[2], gone)
end
redis.call('PEXPIRE', KEYS[1], 10 * ttl)
redis.call('PEXPIRE', KEYS[2], 10 * ttl)
return {redis.call('ZCARD', KEYS[1]), tonumber(redis.call('GET', KEYS[2]) or '0'), fresh}
";

/// KEYS[1] the instances, KEYS[2] the departures counter; ARGV[1] this
/// holder. Leaves the live instances, counted as a departure.
const LEAVE: &str = r"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('INCR', KEYS[2])
end
return 0
";

/// KEYS[1] the stream, KEYS[2] its dead-letter stream; ARGV[1] the group,
/// ARGV[2] this consumer, ARGV[3] the entry, ARGV[4..] the dead letter's
/// fields. Only if the entry is still ours: acknowledged, deleted, then
/// stored as a dead letter, in one step (sent twice, it is stored once).
pub const DEAD_LETTER: &str = r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then
  return 0
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
return 1
";

/// KEYS[1] the publication's claim key, KEYS[2] the dead-letter stream;
/// ARGV[1] the claim's lifetime (ms), ARGV[2..] the dead letter's fields.
/// For an event no instance admitted: stored as a dead letter only if none
/// did meanwhile, and then claimed so that none admits it later.
const DEAD_LETTER_UNADMITTED: &str = r"
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
  return 1
end
return 0
";

/// KEYS[1] the stream; ARGV[1] the group, ARGV[2] this consumer, ARGV[3]
/// the idle time to set (ms), ARGV[4..] entries in order. Those still ours
/// become claimable by anyone at once.
const RELEASE: &str = r"
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[4], ARGV[#ARGV], #ARGV + 10000, ARGV[2])
local mine = {}
for _, r in ipairs(rows) do mine[r[1]] = true end
local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 4, #ARGV do
  if mine[ARGV[i]] then args[#args + 1] = ARGV[i] end
end
if #args == 5 then return 0 end
local n = #args - 5
args[#args + 1] = 'IDLE'
args[#args + 1] = ARGV[3]
args[#args + 1] = 'JUSTID'
redis.call(unpack(args))
return n
";

/// Who serves which slots (a cluster), for the scripts that run once per
/// node.
#[derive(Debug, Default, Clone)]
struct Topology {
    /// Slot ranges and the index of their node.
    ranges: Vec<(RangeInclusive<u16>, usize)>,
}

impl Topology {
    fn node_of(&self, key: &str) -> usize {
        let slot = resp::slot(key.as_bytes());
        self.ranges
            .iter()
            .find(|(r, _)| r.contains(&slot))
            .map_or(0, |(_, n)| *n)
    }
}

/// A lease holder's (and a live instance's) name for a consumer: the
/// consumer's name, `#` and a random part of this incarnation's. A restart
/// under the same `SUBTOCALL_INSTANCE_ID` takes its own pending entries up
/// at once, but it is a new holder: an earlier incarnation's leases (whose
/// last calls may still run) lapse as anybody's do.
pub fn holder_name(consumer: &str) -> String {
    format!("{consumer}#{:08x}", rand::random::<u32>())
}

/// The consumer a lease holder's (or a live instance's) name is of.
pub fn holder_consumer(holder: &str) -> &str {
    holder.rsplit_once('#').map_or(holder, |(c, _)| c)
}

/// Carries the queue core's commands.
#[derive(Clone)]
pub struct Carrier {
    target: Target,
    shared: Shared,
    keys: Arc<Keys>,
    consumer: Arc<str>,
    /// This incarnation as a lease holder and a live instance: the
    /// consumer's name and a random part (`holder_name`).
    holder: Arc<str>,
    dedup_window: Duration,
    /// The reader's connection (one Redis server).
    reader: Arc<Mutex<Option<RawConn>>>,
    topology: Arc<Mutex<Option<Topology>>>,
    /// Consumers silent this long, with nothing pending, are forgotten.
    gone_after: Duration,
    scans: Arc<AtomicU64>,
    /// With `SUBTOCALL_REDIS_WAIT_REPLICAS`: WAIT after each dead letter.
    gate: Option<Arc<super::replicas::Gate>>,
}

impl Carrier {
    pub fn new(
        target: Target,
        shared: Shared,
        keys: Arc<Keys>,
        consumer: &str,
        dedup_window: Duration,
        claim_idle: Duration,
    ) -> Carrier {
        Carrier {
            target,
            shared,
            keys,
            consumer: Arc::from(consumer),
            holder: Arc::from(holder_name(consumer)),
            dedup_window,
            reader: Arc::new(Mutex::new(None)),
            topology: Arc::new(Mutex::new(None)),
            gone_after: (claim_idle * 10).max(Duration::from_secs(300)),
            scans: Arc::new(AtomicU64::new(0)),
            gate: None,
        }
    }

    /// Asks the replicas after each dead letter written.
    pub fn with_wait(
        mut self,
        wait: &crate::config::WaitConfig,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Carrier {
        self.gate = super::replicas::Gate::new(wait, metrics);
        self
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// This incarnation's name as a lease holder and a live instance.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Carries `command`; the future brings back its reply.
    pub fn start(
        &self,
        id: CommandId,
        command: Command,
    ) -> BoxFuture<'static, (CommandId, Reply<Fields>)> {
        let this = self.clone();
        Box::pin(async move {
            let reply = this.carry(command).await;
            (id, reply)
        })
    }

    async fn carry(&self, command: Command) -> Reply<Fields> {
        let result = match command {
            Command::Procedures => self.procedures().await,
            Command::CreateGroups { units } => self.create_groups(&units).await,
            Command::Read { units, count } => self.read(&units, count).await,
            Command::Take {
                unit,
                cursor,
                count,
                min_idle,
                count_own,
            } => self.take(&unit, cursor, count, min_idle, count_own).await,
            Command::Scan { units, idle } => self.scan(&units, idle).await,
            Command::Keepalive {
                settle,
                renew,
                take,
                refresh,
                ttl,
            } => self.keepalive(&settle, &renew, &take, &refresh, ttl).await,
            Command::Ack { keys } => self.ack(&keys).await,
            Command::DeadLetter { key, fields } => self.dead_letter(&key, &fields).await,
            Command::DeadLetterUnadmitted {
                procedure,
                publication,
                fields,
                claim,
            } => {
                self.dead_letter_unadmitted(&procedure, publication, &fields, claim)
                    .await
            }
            Command::Release { keys, idle } => self.release(&keys, idle).await,
            Command::GiveUp { units } => self.give_up(&units, false).await,
            Command::Leave { units } => self.give_up(&units, true).await,
        };
        result.unwrap_or_else(Reply::Failed)
    }

    async fn procedures(&self) -> Result<Reply<Fields>, Failure> {
        let mut c = self.conn().await?;
        let list: Vec<String> =
            query(redis::cmd("SMEMBERS").arg(self.keys.procedures()), &mut c).await?;
        Ok(Reply::Procedures(list))
    }

    async fn create_groups(&self, units: &[Unit]) -> Result<Reply<Fields>, Failure> {
        let c = self.conn().await?;
        let created = join_all(units.iter().map(|unit| {
            let mut c = c.clone();
            let stream = self.keys.stream_of(unit);
            let group = self.keys.group().to_owned();
            async move {
                let mut cmd = redis::cmd("XGROUP");
                cmd.arg("CREATE")
                    .arg(&stream)
                    .arg(&group)
                    .arg(0)
                    .arg("MKSTREAM");
                match tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async::<Value>(&mut c)).await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) if e.code() == Some("BUSYGROUP") => Ok(()),
                    Ok(Err(e)) => Err(failure(&e)),
                    Err(_) => Err(Failure::Transient("Redis did not answer in time".into())),
                }
            }
        }))
        .await;
        created.into_iter().collect::<Result<Vec<()>, Failure>>()?;
        Ok(Reply::Done)
    }

    /// New entries: one XREADGROUP over every unit on one server; on a
    /// cluster, one per procedure, at once. Never waiting.
    async fn read(&self, units: &[Unit], count: usize) -> Result<Reply<Fields>, Failure> {
        if self.target.is_cluster() {
            return self.read_cluster(units, count).await;
        }
        let streams: Vec<String> = units.iter().map(|u| self.keys.stream_of(u)).collect();
        let count_arg = count.to_string();
        let mut args: Vec<&[u8]> = vec![
            b"XREADGROUP",
            b"GROUP",
            self.keys.group().as_bytes(),
            self.consumer.as_bytes(),
            b"COUNT",
            count_arg.as_bytes(),
        ];
        args.push(b"STREAMS");
        args.extend(streams.iter().map(|s| s.as_bytes()));
        args.extend(std::iter::repeat_n(&b">"[..], streams.len()));
        let mut slot = self.reader.lock().await;
        if slot.is_none() {
            let endpoint = self.target.endpoint().await.map_err(|e| failure(&e))?;
            let conn = RawConn::connect(&endpoint, false, COMMAND_TIMEOUT)
                .await
                .map_err(raw_failure)?;
            *slot = Some(conn);
        }
        let Some(conn) = slot.as_mut() else {
            return Err(Failure::Transient("no reader connection".into()));
        };
        match conn.frame(&args, COMMAND_TIMEOUT).await {
            Ok(frame) => {
                let by_stream: HashMap<&str, &Unit> = streams
                    .iter()
                    .map(String::as_str)
                    .zip(units.iter())
                    .collect();
                Ok(Reply::Read(parse_read(&frame, &by_stream)))
            }
            Err(e) => {
                // A late reply would answer the next command: start over.
                *slot = None;
                Err(raw_failure(e))
            }
        }
    }

    async fn read_cluster(&self, units: &[Unit], count: usize) -> Result<Reply<Fields>, Failure> {
        let c = self.conn().await?;
        let mut by_procedure: BTreeMap<&str, Vec<&Unit>> = BTreeMap::new();
        for unit in units {
            by_procedure.entry(&unit.procedure).or_default().push(unit);
        }
        let reads = join_all(by_procedure.into_values().map(|units| {
            let mut c = c.clone();
            let streams: Vec<String> = units.iter().map(|u| self.keys.stream_of(u)).collect();
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(self.keys.group())
                .arg(&*self.consumer)
                .arg("COUNT")
                .arg(count)
                .arg("STREAMS")
                .arg(&streams);
            for _ in &streams {
                cmd.arg(">");
            }
            async move {
                let value: Value = query(&cmd, &mut c).await?;
                let mut out = Vec::new();
                for (stream, entries) in stream_entries(&value) {
                    if let Some(i) = streams.iter().position(|s| *s == stream) {
                        out.push((units[i].clone(), entries));
                    }
                }
                Ok::<_, Failure>(out)
            }
        }))
        .await;
        let mut all = Vec::new();
        for r in reads {
            all.extend(r?);
        }
        Ok(Reply::Read(all))
    }

    async fn take(
        &self,
        unit: &Unit,
        cursor: EntryId,
        count: usize,
        min_idle: Option<Duration>,
        count_own: bool,
    ) -> Result<Reply<Fields>, Failure> {
        let mut c = self.conn().await?;
        let stream = self.keys.stream_of(unit);
        let min_idle = min_idle.map_or(-1, |d| d.as_millis() as i64);
        let value: Value = query(
            redis::cmd("EVAL")
                .arg(TAKE)
                .arg(1)
                .arg(&stream)
                .arg(self.keys.group())
                .arg(&*self.consumer)
                .arg(cursor.to_string())
                .arg(count)
                .arg(min_idle)
                .arg(u8::from(count_own))
                .arg(TAKE_SCAN),
            &mut c,
        )
        .await?;
        let Value::Array(parts) = value else {
            return Err(Failure::Final("unexpected take reply".into()));
        };
        let next = parts
            .first()
            .and_then(text)
            .and_then(|t| EntryId::parse(&t))
            .unwrap_or(EntryId::ZERO);
        let mut got = Vec::new();
        if let Some(Value::Array(rows)) = parts.get(1) {
            for row in rows {
                let Value::Array(row) = row else { continue };
                let (Some(id), Some(Value::Int(n))) = (
                    row.first().and_then(text).and_then(|t| EntryId::parse(&t)),
                    row.get(1),
                ) else {
                    continue;
                };
                got.push(Got {
                    id,
                    deliveries: (*n).clamp(0, i64::from(u32::MAX)) as u32,
                    body: row.get(2).map(fields),
                });
            }
        }
        Ok(Reply::Taken { next, got })
    }

    async fn scan(&self, units: &[Unit], idle: Duration) -> Result<Reply<Fields>, Failure> {
        // Consumers long gone are forgotten every tenth scan.
        let tidy = self
            .scans
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(10);
        let gone = if tidy {
            self.gone_after.as_millis() as u64
        } else {
            0
        };
        let streams: Vec<(String, &Unit)> =
            units.iter().map(|u| (self.keys.stream_of(u), u)).collect();
        let per_node = self
            .by_node(streams.iter().map(|(s, _)| s.as_str()))
            .await?;
        let c = self.conn().await?;
        let idle_ms = idle.as_millis() as u64;
        let results = join_all(per_node.into_iter().map(|indices| {
            let mut c = c.clone();
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(SCAN)
                .arg(1)
                .arg(&streams[indices[0]].0)
                .arg(self.keys.group())
                .arg(&*self.consumer)
                .arg(idle_ms)
                .arg(gone);
            for &i in &indices {
                cmd.arg(&streams[i].0)
                    .arg(u8::from(streams[i].1.partition.is_none()));
            }
            async move { query::<Vec<String>>(&cmd, &mut c).await }
        }))
        .await;
        let mut stale = Vec::new();
        for r in results {
            for stream in r.inspect_err(|_| self.forget_topology())? {
                if let Some((_, unit)) = streams.iter().find(|(s, _)| *s == stream) {
                    stale.push((*unit).clone());
                }
            }
        }
        Ok(Reply::Stale(stale))
    }

    async fn keepalive(
        &self,
        settle: &[Unit],
        renew: &[Unit],
        take: &[(Arc<str>, Vec<u16>, usize)],
        refresh: &[(Unit, Vec<EntryId>)],
        ttl: Duration,
    ) -> Result<Reply<Fields>, Failure> {
        let mut c = self.conn().await?;
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let (instances, departures, fresh): (i64, i64, i64) = query(
            redis::cmd("EVAL")
                .arg(HEARTBEAT)
                .arg(2)
                .arg(self.keys.instances())
                .arg(self.keys.departures())
                .arg(&*self.holder)
                .arg(ttl_ms),
            &mut c,
        )
        .await?;
        let mut kept = Kept {
            instances: instances.max(1) as usize,
            departures: departures.max(0) as u64,
            ..Kept::default()
        };
        // On one Redis, leases last as long as their holder counts as live
        // (`KEEPALIVE`): when this instance counted as live without a break,
        // nobody could take one of its leases, and the heartbeat just sent
        // renewed them all; else each is looked at.
        let live = !self.target.is_cluster();
        let renew = if live && fresh == 1 {
            kept.renewed = renew.iter().map(|u| (u.clone(), true)).collect();
            &[][..]
        } else {
            renew
        };
        if settle.is_empty() && renew.is_empty() && take.is_empty() && refresh.is_empty() {
            return Ok(Reply::Kept(kept));
        }
        let instances_key = if live {
            self.keys.instances()
        } else {
            String::new()
        };
        // Every key this round touches, by node.
        let renew_keys: Vec<String> = renew.iter().filter_map(|u| self.keys.lease_of(u)).collect();
        let settle_keys: Vec<String> = settle
            .iter()
            .filter_map(|u| self.keys.lease_of(u))
            .collect();
        let take_keys: Vec<Vec<String>> = take
            .iter()
            .map(|(p, ks, _)| ks.iter().map(|k| self.keys.lease(p, *k)).collect())
            .collect();
        let refresh_streams: Vec<String> = refresh
            .iter()
            .map(|(u, _)| self.keys.stream_of(u))
            .collect();
        let topology = self.topology().await?;
        let mut nodes: BTreeMap<usize, NodeRound> = BTreeMap::new();
        // Each list's keys (by index) by node: `field` picks the list in a
        // node's round.
        let mut place = |keys: &mut dyn Iterator<Item = (usize, &String)>,
                         field: fn(&mut NodeRound) -> &mut Vec<usize>| {
            for (i, key) in keys {
                field(nodes.entry(topology.node_of(key)).or_default()).push(i);
            }
        };
        place(&mut settle_keys.iter().enumerate(), |r| &mut r.settle);
        place(&mut renew_keys.iter().enumerate(), |r| &mut r.renew);
        // A procedure's leases share a slot: one node.
        place(
            &mut take_keys
                .iter()
                .enumerate()
                .filter_map(|(g, keys)| keys.first().map(|k| (g, k))),
            |r| &mut r.take,
        );
        place(&mut refresh_streams.iter().enumerate(), |r| &mut r.refresh);
        let rounds = join_all(nodes.into_values().map(|round| {
            let mut c = c.clone();
            let route = round
                .settle
                .first()
                .map(|&i| settle_keys[i].clone())
                .or_else(|| round.renew.first().map(|&i| renew_keys[i].clone()))
                .or_else(|| round.take.first().map(|&g| take_keys[g][0].clone()))
                .or_else(|| round.refresh.first().map(|&s| refresh_streams[s].clone()));
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(KEEPALIVE)
                .arg(1)
                .arg(route.unwrap_or_default())
                .arg(&*self.consumer)
                .arg(ttl_ms)
                .arg(self.keys.group())
                .arg(&instances_key)
                .arg(&*self.holder)
                .arg(round.settle.len());
            for &i in &round.settle {
                cmd.arg(&settle_keys[i]);
            }
            cmd.arg(round.renew.len());
            for &i in &round.renew {
                cmd.arg(&renew_keys[i]);
            }
            cmd.arg(round.take.len());
            for &g in &round.take {
                let (procedure, ks, want) = &take[g];
                cmd.arg(*want).arg(ks.len());
                for (lease, k) in take_keys[g].iter().zip(ks) {
                    cmd.arg(lease)
                        .arg(self.keys.stream_of(&Unit::partition(procedure, *k)));
                }
            }
            cmd.arg(round.refresh.len());
            for &s in &round.refresh {
                let ids = &refresh[s].1;
                cmd.arg(&refresh_streams[s]).arg(ids.len());
                for id in ids {
                    cmd.arg(id.to_string());
                }
            }
            async move {
                let value: Value = query(&cmd, &mut c).await?;
                Ok::<_, Failure>((round, value))
            }
        }))
        .await;
        let unit_of_lease: HashMap<&str, Unit> = renew_keys
            .iter()
            .map(String::as_str)
            .zip(renew.iter().cloned())
            .chain(
                take.iter()
                    .zip(take_keys.iter())
                    .flat_map(|((p, ks, _), keys)| {
                        keys.iter()
                            .map(String::as_str)
                            .zip(ks.iter().map(|k| Unit::partition(p, *k)))
                    }),
            )
            .collect();
        for r in rounds {
            let (round, value) = r.inspect_err(|_| self.forget_topology())?;
            let Value::Array(parts) = value else {
                return Err(Failure::Final("unexpected keepalive reply".into()));
            };
            if let Some(Value::Array(flags)) = parts.first() {
                for (&i, flag) in round.renew.iter().zip(flags) {
                    kept.renewed
                        .push((renew[i].clone(), matches!(flag, Value::Int(1))));
                }
            }
            if let Some(Value::Array(taken)) = parts.get(1) {
                for pair in taken {
                    let Value::Array(pair) = pair else { continue };
                    if let (Some(key), Some(empty)) = (pair.first().and_then(text), pair.get(1))
                        && let Some(unit) = unit_of_lease.get(key.as_str())
                    {
                        kept.taken
                            .push((unit.clone(), matches!(empty, Value::Int(1))));
                    }
                }
            }
            if let Some(Value::Array(lost)) = parts.get(2) {
                for pair in lost.chunks(2) {
                    if let [Value::Int(s), id] = pair
                        && let Some(&stream) = round.refresh.get((*s - 1).max(0) as usize)
                        && let Some(id) = text(id).and_then(|t| EntryId::parse(&t))
                    {
                        kept.lost.push(Key {
                            unit: refresh[stream].0.clone(),
                            id,
                        });
                    }
                }
            }
        }
        Ok(Reply::Kept(kept))
    }

    async fn ack(&self, keys: &[Key]) -> Result<Reply<Fields>, Failure> {
        let c = self.conn().await?;
        let group = self.keys.group();
        let done = join_all(
            acks_by_stream(&self.keys, keys)
                .into_iter()
                .map(|(stream, ids)| {
                    let mut c = c.clone();
                    let mut pipe = redis::pipe();
                    push_ack(&mut pipe, &stream, group, &ids);
                    async move { query_pipe(&pipe, &mut c).await }
                }),
        )
        .await;
        done.into_iter().collect::<Result<Vec<()>, Failure>>()?;
        Ok(Reply::Done)
    }

    async fn dead_letter(
        &self,
        key: &Key,
        fields: &[(&'static str, Vec<u8>)],
    ) -> Result<Reply<Fields>, Failure> {
        let mut c = self.conn().await?;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(DEAD_LETTER)
            .arg(2)
            .arg(self.keys.stream_of(&key.unit))
            .arg(self.keys.dead(&key.unit.procedure))
            .arg(self.keys.group())
            .arg(&*self.consumer)
            .arg(key.id.to_string());
        for (name, value) in fields {
            cmd.arg(*name).arg(value.as_slice());
        }
        query::<i64>(&cmd, &mut c).await?;
        if let Some(gate) = &self.gate {
            gate.after(c, 1);
        }
        Ok(Reply::Done)
    }

    async fn dead_letter_unadmitted(
        &self,
        procedure: &str,
        publication: u64,
        fields: &[(&'static str, Vec<u8>)],
        claim: bool,
    ) -> Result<Reply<Fields>, Failure> {
        let mut c = self.conn().await?;
        let mut cmd = if claim {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(DEAD_LETTER_UNADMITTED)
                .arg(2)
                .arg(self.keys.seen(procedure, publication))
                .arg(self.keys.dead(procedure))
                .arg(self.dedup_window.as_millis().max(1) as u64);
            cmd
        } else {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(self.keys.dead(procedure)).arg("*");
            cmd
        };
        for (name, value) in fields {
            cmd.arg(*name).arg(value.as_slice());
        }
        // The script's count, or XADD's entry id.
        query::<redis::Value>(&cmd, &mut c).await?;
        if let Some(gate) = &self.gate {
            gate.after(c, 1);
        }
        Ok(Reply::Done)
    }

    async fn release(&self, keys: &[Key], idle: Duration) -> Result<Reply<Fields>, Failure> {
        let c = self.conn().await?;
        let mut by_stream: BTreeMap<String, Vec<EntryId>> = BTreeMap::new();
        for key in keys {
            by_stream
                .entry(self.keys.stream_of(&key.unit))
                .or_default()
                .push(key.id);
        }
        let idle_ms = idle.as_millis() as u64;
        let done = join_all(by_stream.into_iter().map(|(stream, mut ids)| {
            let mut c = c.clone();
            ids.sort();
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(RELEASE)
                .arg(1)
                .arg(&stream)
                .arg(self.keys.group())
                .arg(&*self.consumer)
                .arg(idle_ms);
            for id in &ids {
                cmd.arg(id.to_string());
            }
            async move { query::<i64>(&cmd, &mut c).await.map(drop) }
        }))
        .await;
        done.into_iter().collect::<Result<Vec<()>, Failure>>()?;
        Ok(Reply::Done)
    }

    async fn give_up(&self, units: &[Unit], leave: bool) -> Result<Reply<Fields>, Failure> {
        let c = self.conn().await?;
        let leases: Vec<String> = units.iter().filter_map(|u| self.keys.lease_of(u)).collect();
        if !leases.is_empty() {
            let per_node = self.by_node(leases.iter().map(String::as_str)).await?;
            let done = join_all(per_node.into_iter().map(|indices| {
                let mut c = c.clone();
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(GIVE_UP)
                    .arg(1)
                    .arg(&leases[indices[0]])
                    .arg(&*self.holder);
                for &i in &indices {
                    cmd.arg(&leases[i]);
                }
                async move { query::<i64>(&cmd, &mut c).await.map(drop) }
            }))
            .await;
            done.into_iter()
                .collect::<Result<Vec<()>, Failure>>()
                .inspect_err(|_| self.forget_topology())?;
        }
        if leave {
            let mut c = c.clone();
            query::<i64>(
                redis::cmd("EVAL")
                    .arg(LEAVE)
                    .arg(2)
                    .arg(self.keys.instances())
                    .arg(self.keys.departures())
                    .arg(&*self.holder),
                &mut c,
            )
            .await?;
        }
        Ok(Reply::Done)
    }

    async fn conn(&self) -> Result<super::Conn, Failure> {
        self.shared.get().await.map_err(|e| failure(&e))
    }

    /// Indices of `keys` grouped by the node that serves them (one group on
    /// one server).
    async fn by_node<'a>(
        &self,
        keys: impl Iterator<Item = &'a str>,
    ) -> Result<Vec<Vec<usize>>, Failure> {
        let topology = self.topology().await?;
        let mut nodes: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, key) in keys.enumerate() {
            nodes.entry(topology.node_of(key)).or_default().push(i);
        }
        Ok(nodes.into_values().collect())
    }

    /// The cluster's slot map (asked once, again after a failure); one node
    /// on one server.
    async fn topology(&self) -> Result<Topology, Failure> {
        if !self.target.is_cluster() {
            return Ok(Topology::default());
        }
        let mut slot = self.topology.lock().await;
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let mut c = self.conn().await?;
        let value: Value = query(redis::cmd("CLUSTER").arg("SLOTS"), &mut c).await?;
        let mut nodes: Vec<(String, i64)> = Vec::new();
        let mut ranges = Vec::new();
        if let Value::Array(rows) = value {
            for row in rows {
                let Value::Array(r) = row else { continue };
                let (Some(Value::Int(from)), Some(Value::Int(to)), Some(Value::Array(node))) =
                    (r.first(), r.get(1), r.get(2))
                else {
                    continue;
                };
                let addr = (
                    node.first().and_then(text).unwrap_or_default(),
                    match node.get(1) {
                        Some(Value::Int(p)) => *p,
                        _ => 0,
                    },
                );
                let n = match nodes.iter().position(|a| *a == addr) {
                    Some(n) => n,
                    None => {
                        nodes.push(addr);
                        nodes.len() - 1
                    }
                };
                ranges.push(((*from as u16)..=(*to as u16), n));
            }
        }
        let t = Topology { ranges };
        *slot = Some(t.clone());
        Ok(t)
    }

    fn forget_topology(&self) {
        if let Ok(mut slot) = self.topology.try_lock() {
            *slot = None;
        }
    }
}

/// One node's share of a keepalive round (indices into the round's lists).
#[derive(Debug, Default)]
struct NodeRound {
    settle: Vec<usize>,
    renew: Vec<usize>,
    take: Vec<usize>,
    refresh: Vec<usize>,
}

async fn query<T: redis::FromRedisValue>(
    cmd: &redis::Cmd,
    c: &mut super::Conn,
) -> Result<T, Failure> {
    match tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async(c)).await {
        Ok(r) => r.map_err(|e| failure(&e)),
        Err(_) => Err(Failure::Transient("Redis did not answer in time".into())),
    }
}

async fn query_pipe(pipe: &redis::Pipeline, c: &mut super::Conn) -> Result<(), Failure> {
    match tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async::<()>(c)).await {
        Ok(r) => r.map_err(|e| failure(&e)),
        Err(_) => Err(Failure::Transient("Redis did not answer in time".into())),
    }
}

/// Acknowledgements by stream: each stream's name and its entry ids, the
/// streams in the order they first come.
pub(super) fn acks_by_stream(keys: &Keys, acks: &[Key]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for key in acks {
        let stream = keys.stream_of(&key.unit);
        match out.iter_mut().find(|(s, _)| *s == stream) {
            Some((_, ids)) => ids.push(key.id.to_string()),
            None => out.push((stream, vec![key.id.to_string()])),
        }
    }
    out
}

/// Acknowledges `ids` of `stream` in `group` and deletes them: the two
/// commands of an acknowledgement, alone (`Carrier::ack`) or riding on an
/// admission (`AdmitSink::admit`).
pub(super) fn push_ack(pipe: &mut redis::Pipeline, stream: &str, group: &str, ids: &[String]) {
    let bytes = stream.len() + 24 * ids.len();
    let mut ack = redis::Cmd::with_capacity(3 + ids.len(), bytes + group.len() + 4);
    ack.arg("XACK").arg(stream).arg(group).arg(ids);
    let mut del = redis::Cmd::with_capacity(2 + ids.len(), bytes + 4);
    del.arg("XDEL").arg(stream).arg(ids);
    pipe.add_command(ack).add_command(del);
}

/// What a redis-rs error means for the core.
pub fn failure(e: &redis::RedisError) -> Failure {
    let message = e.to_string();
    match e.code() {
        Some("NOGROUP") => Failure::NoGroup(message),
        Some(code) if is_transient_redis_code(code) => Failure::Transient(message),
        _ if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_cluster_error() =>
        {
            Failure::Transient(message)
        }
        _ if message.contains("non local key") || message.contains("CROSSSLOT") => {
            // The slot moved (a resharding, a failover): asked again.
            Failure::Transient(message)
        }
        _ => Failure::Final(message),
    }
}

fn raw_failure(e: resp::Error) -> Failure {
    match (&e, e.code()) {
        (_, Some("NOGROUP")) => Failure::NoGroup(e.to_string()),
        (_, Some(code)) if is_transient_redis_code(code) => Failure::Transient(e.to_string()),
        (resp::Error::Server(_) | resp::Error::Unsupported(_), _) => Failure::Final(e.to_string()),
        _ => Failure::Transient(e.to_string()),
    }
}

/// An XREADGROUP reply (`[[stream, [[id, [f, v, ...]], ...]], ...]`, or nil
/// when the wait ran out), by unit.
fn parse_read(frame: &Bytes, units: &HashMap<&str, &Unit>) -> Vec<(Unit, Vec<Got<Fields>>)> {
    let mut c = Cursor::new(frame);
    let mut out = Vec::new();
    for _ in 0..c.array().unwrap_or(0) {
        if c.array() != Some(2) {
            continue;
        }
        let stream = c.bulk();
        let unit = stream
            .as_deref()
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| units.get(s));
        let n = c.array().unwrap_or(0);
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            if c.array() != Some(2) {
                continue;
            }
            let id = c.bulk();
            let body = c.array().map(|len| {
                let mut pairs = Vec::with_capacity(len / 2);
                for _ in 0..len / 2 {
                    if let (Some(k), Some(v)) = (c.bulk(), c.bulk()) {
                        pairs.push((k, v));
                    }
                }
                pairs
            });
            let Some(id) = id
                .as_deref()
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(EntryId::parse)
            else {
                continue;
            };
            got.push(Got {
                id,
                deliveries: 1,
                body,
            });
        }
        if let Some(unit) = unit {
            out.push(((*unit).clone(), got));
        }
    }
    out
}

/// The entries of an XREADGROUP reply as redis-rs values, by stream.
fn stream_entries(value: &Value) -> Vec<(String, Vec<Got<Fields>>)> {
    stream_entries_with(value, |_, e| e.map(fields))
}

/// The same, each entry's body given by `body` from its id and its
/// field/value pairs as redis-rs gives them.
pub(super) fn stream_entries_with(
    value: &Value,
    mut body: impl FnMut(EntryId, Option<&Value>) -> Option<Fields>,
) -> Vec<(String, Vec<Got<Fields>>)> {
    let Value::Array(streams) = value else {
        return Vec::new();
    };
    streams
        .iter()
        .filter_map(|s| {
            let Value::Array(pair) = s else { return None };
            let name = pair.first().and_then(text)?;
            let Some(Value::Array(entries)) = pair.get(1) else {
                return None;
            };
            let got = entries
                .iter()
                .filter_map(|e| {
                    let Value::Array(e) = e else { return None };
                    let id = e.first().and_then(text).and_then(|t| EntryId::parse(&t))?;
                    Some(Got {
                        id,
                        deliveries: 1,
                        body: body(id, e.get(1)),
                    })
                })
                .collect();
            Some((name, got))
        })
        .collect()
}

/// Field/value pairs of an entry, as redis-rs gives them.
pub(crate) fn fields(value: &Value) -> Fields {
    let Value::Array(flat) = value else {
        return Vec::new();
    };
    flat.chunks(2)
        .filter_map(|kv| match kv {
            [Value::BulkString(k), Value::BulkString(v)] => {
                Some((Bytes::copy_from_slice(k), Bytes::copy_from_slice(v)))
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> resp::Reply {
        resp::Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn frame(reply: &resp::Reply) -> Bytes {
        let mut out = Vec::new();
        resp::write(reply, &mut out);
        Bytes::from(out)
    }

    #[test]
    fn reads_parse_into_entries_by_unit() {
        let p: Arc<str> = Arc::from("p");
        let plain = Unit::plain(&p);
        let part = Unit::partition(&p, 2);
        let units: HashMap<&str, &Unit> =
            [("{q:p}:stream", &plain), ("{q:p}:stream:2", &part)].into();
        let read = resp::Reply::Array(vec![
            resp::Reply::Array(vec![
                bulk("{q:p}:stream"),
                resp::Reply::Array(vec![
                    resp::Reply::Array(vec![
                        bulk("1-0"),
                        resp::Reply::Array(vec![bulk("e"), bulk("x")]),
                    ]),
                    resp::Reply::Array(vec![bulk("2-0"), resp::Reply::Nil]),
                ]),
            ]),
            resp::Reply::Array(vec![
                bulk("{q:p}:stream:2"),
                resp::Reply::Array(vec![resp::Reply::Array(vec![
                    bulk("3-1"),
                    resp::Reply::Array(vec![bulk("e"), bulk("y")]),
                ])]),
            ]),
        ]);
        let got = parse_read(&frame(&read), &units);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, plain);
        assert_eq!(got[0].1[0].id, EntryId(1, 0));
        assert_eq!(
            got[0].1[0].body.as_deref(),
            Some(&[(Bytes::from_static(b"e"), Bytes::from_static(b"x"))][..])
        );
        assert_eq!(got[0].1[1].body, None, "deleted meanwhile");
        assert_eq!(got[1].0, part);
        assert_eq!(got[1].1[0].id, EntryId(3, 1));
        assert!(parse_read(&frame(&resp::Reply::Nil), &units).is_empty());
    }

    #[test]
    fn busy_failing_over_and_redirecting_servers_are_tried_again() {
        for code in [
            "NOREPLICAS",
            "LOADING",
            "TRYAGAIN",
            "BUSY",
            "MASTERDOWN",
            "READONLY",
        ] {
            let e = resp::Error::Server(format!("{code} something"));
            assert!(matches!(raw_failure(e), Failure::Transient(_)), "{code}");
        }
        assert!(matches!(
            raw_failure(resp::Error::Server("NOGROUP No such key".into())),
            Failure::NoGroup(_)
        ));
        assert!(matches!(
            raw_failure(resp::Error::Server("WRONGTYPE nope".into())),
            Failure::Final(_)
        ));
        assert!(matches!(
            raw_failure(resp::Error::Timeout),
            Failure::Transient(_)
        ));
    }
}
