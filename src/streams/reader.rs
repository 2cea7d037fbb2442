//! Reading the streams: one task per procedure stream, each on a
//! connection of its own (XREADGROUP BLOCK would hold up a shared one),
//! reading as this instance's consumer in the group, never more than the
//! local window allows (the credits: each entry handed to the event loop
//! takes one until it is acknowledged or dead-lettered). Every
//! `claim_idle / 2` a reader also takes over entries another consumer has
//! held idle for `claim_idle` (XAUTOCLAIM), with their delivery counts.
//!
//! A supervisor starts a reader for every procedure in the registry set,
//! for one that this instance's admission just registered, and for new ones
//! other instances registered (it re-reads the set every second, which also
//! tells the event loop whether Redis answers).
//!
//! With per-key ordering, a procedure's keyed events are in partition
//! streams (`procedure#k`), each read by one instance at a time: the one
//! holding the partition's lease (a key with a TTL of `claim_idle`, renewed
//! every third of it). An instance takes every free lease it finds; a lease
//! whose holder died lapses and the next instance to look takes it, claims
//! every entry still pending in the partition (whoever held them) before it
//! reads anything new, and so delivers the partition's entries in stream
//! order. A lease is given up only when its holder has finished (after the
//! last commits at shutdown), so two instances never deliver one partition
//! at once unless a holder stalls longer than `claim_idle`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::Value;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use super::resp::{self, Cursor, RawConn, Reply};
use super::{COMMAND_TIMEOUT, Keys, Shared, Target, text};

/// Longest XREADGROUP BLOCK; a reader looks at its stop signal and its
/// takeover timer at least this often.
const BLOCK: Duration = Duration::from_millis(1000);
/// How often the supervisor re-reads the registry set (which also tells
/// whether Redis answers, while no event flows).
const REGISTRY_EVERY: Duration = Duration::from_secs(1);
/// Entries read at once at most.
const READ_MAX: usize = 256;
/// A consumer with nothing pending, silent this long (or ten times the claim
/// idle time, if longer), belonged to an instance that is gone.
const GONE_AFTER: Duration = Duration::from_secs(300);

/// An entry read from a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub procedure: Arc<str>,
    pub id: String,
    /// The stream's delivery count, this hand-out included.
    pub deliveries: u64,
    /// Its field/value pairs (see `streams::entry`), slices of the reply.
    pub fields: Vec<(Bytes, Bytes)>,
    /// Taken over from another consumer.
    pub taken_over: bool,
}

/// What the readers tell the event loop.
#[derive(Debug)]
pub enum FromReaders {
    Entries(Vec<Entry>),
    /// Whether Redis answers a reader.
    RedisUp(bool),
}

/// The readers' settings, shared by each of them.
pub struct Readers {
    pub target: Target,
    pub shared: Shared,
    pub keys: Arc<Keys>,
    pub consumer: String,
    pub claim_idle: Duration,
    pub credits: Arc<Semaphore>,
    /// Room in the window a read waits for (a quarter of the window).
    pub read_chunk: u32,
    pub out: mpsc::UnboundedSender<FromReaders>,
    pub stop: CancellationToken,
    /// Partitions per procedure for keyed events (per-key ordering), if any.
    pub partitions: Option<u16>,
    /// Cancelled when this instance has finished with its partitions (its
    /// last commits made): their leases are given up then.
    pub release: CancellationToken,
}

/// KEYS: the leases of one procedure's partitions; ARGV[1] this consumer,
/// ARGV[2] the TTL in ms, ARGV[3] how many free leases to take at most.
/// Renews ours, takes free ones; per lease: 1 ours still, 2 newly ours, 0
/// someone else's (or free).
const LEASES: &str = r"
local out = {}
local want = tonumber(ARGV[3])
for i = 1, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    out[i] = 1
  elseif not holder and want > 0 then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
    want = want - 1
    out[i] = 2
  else
    out[i] = 0
  end
end
return out
";

/// KEYS[1] the live instances (a sorted set); ARGV[1] this consumer,
/// ARGV[2] how long an instance counts as live, in ms. Scores this instance
/// with Redis's clock, forgets the silent ones, returns how many are live.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], 10 * tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
";

/// A partition this instance holds: its reader, and whether it is being
/// handed over (the reader stopped; the lease goes once nothing is
/// pending here).
struct Held {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    leaving: bool,
}

/// KEYS: leases; ARGV[1] this consumer. Gives up those still ours.
const RELEASE: &str = r"
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
return n
";

impl Readers {
    /// Runs readers until `stop`, starting one per procedure it learns of
    /// (and, with partitions, one per partition whose lease it holds, whose
    /// leases it keeps until `release`).
    pub async fn run(self, mut new_procedures: mpsc::UnboundedReceiver<String>) {
        let this = Arc::new(self);
        let mut running: HashSet<String> = HashSet::new();
        let mut tasks = JoinSet::new();
        let mut next_scan = Instant::now();
        // Partitions this instance holds, with their readers.
        let mut held: HashMap<String, Held> = HashMap::new();
        let lease_every = (this.claim_idle / 3).min(REGISTRY_EVERY);
        let mut next_lease = Instant::now();
        let mut stopping = false;
        loop {
            let mut found = Vec::new();
            tokio::select! {
                _ = this.release.cancelled() => break,
                _ = this.stop.cancelled(), if !stopping => {
                    if this.partitions.is_none() || held.is_empty() {
                        break;
                    }
                    // Keep the leases while what was read is finished.
                    stopping = true;
                }
                _ = sleep_until(next_lease) => {
                    next_lease = Instant::now() + lease_every;
                    if this.partitions.is_some() {
                        this.leases(&running, &mut held, !stopping).await;
                    } else if let Err(e) = this.heartbeat().await {
                        // Without partitions only `/status` reads it.
                        tracing::debug!(error = %e, "cannot tell the other instances we are here");
                    }
                }
                Some(p) = new_procedures.recv(), if !stopping => found.push(p),
                _ = sleep_until(next_scan) => {
                    next_scan = Instant::now() + REGISTRY_EVERY;
                    match this.registry().await {
                        Ok(all) => {
                            found.extend(all);
                            let _ = this.out.send(FromReaders::RedisUp(true));
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot read the queue's procedure set");
                            let _ = this.out.send(FromReaders::RedisUp(false));
                        }
                    }
                }
            }
            for procedure in found {
                if running.insert(procedure.clone()) {
                    tracing::info!(%procedure, "reading the procedure's queue stream");
                    let this = this.clone();
                    let stop = this.stop.clone();
                    tasks.spawn(async move { this.read(Arc::from(procedure), stop, false).await });
                }
            }
        }
        for h in held.values() {
            h.stop.cancel();
        }
        this.give_up_leases(&running, &held).await;
        while tasks.join_next().await.is_some() {}
        for (_, h) in held {
            let _ = h.task.await;
        }
    }

    /// Renews the partitions' leases this instance holds and, when `take`,
    /// takes free ones up to its share (the partitions divided among the
    /// live instances), starting a reader for each partition it takes and
    /// stopping the reader of one it lost. Above its share it hands
    /// partitions over: their readers stop, and once nothing of theirs is
    /// pending here any more, their leases are given up for another
    /// instance to take.
    async fn leases(
        self: &Arc<Self>,
        procedures: &HashSet<String>,
        held: &mut HashMap<String, Held>,
        take: bool,
    ) {
        let Some(partitions) = self.partitions else {
            return;
        };
        let instances = match self.heartbeat().await {
            Ok(n) => n.max(1),
            Err(e) => {
                tracing::debug!(error = %e, "cannot tell the other instances we are here");
                return;
            }
        };
        let share = usize::from(partitions).div_ceil(instances);
        let ttl = self.claim_idle.as_millis().max(1).to_string();
        for procedure in procedures {
            let units: Vec<String> = (0..partitions).map(|k| super::lane(procedure, k)).collect();
            let staying = |held: &HashMap<String, Held>| {
                units
                    .iter()
                    .filter(|u| held.get(*u).is_some_and(|h| !h.leaving))
                    .count()
            };
            let want = if take {
                share.saturating_sub(staying(held))
            } else {
                0
            };
            let keys: Vec<String> = (0..partitions)
                .map(|k| self.keys.lease(procedure, k))
                .collect();
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(LEASES).arg(keys.len()).arg(&keys);
            cmd.arg(&self.consumer).arg(&ttl).arg(want);
            let states: Vec<i64> = match self.shared.get().await {
                Ok(mut c) => match cmd.query_async(&mut c).await {
                    Ok(states) => states,
                    Err(e) => {
                        tracing::debug!(%procedure, error = %e, "cannot renew the partitions' leases");
                        continue;
                    }
                },
                Err(_) => continue,
            };
            for (unit, state) in units.iter().zip(states) {
                match (state, held.contains_key(unit)) {
                    (1 | 2, false) => {
                        tracing::info!(partition = %unit, "holding the partition's lease; delivering it");
                        let stop = self.stop.child_token();
                        let this = self.clone();
                        let (u, s) = (Arc::from(unit.as_str()), stop.clone());
                        let task = tokio::spawn(async move { this.read(u, s, true).await });
                        held.insert(
                            unit.clone(),
                            Held {
                                stop,
                                task,
                                leaving: false,
                            },
                        );
                    }
                    (0, true) => {
                        tracing::warn!(partition = %unit, "lost the partition's lease (not renewed in time); another instance delivers it now");
                        if let Some(h) = held.remove(unit) {
                            h.stop.cancel();
                        }
                    }
                    _ => {}
                }
            }
            if !take {
                continue;
            }
            // Above the share: hand the last partitions over.
            let excess = staying(held).saturating_sub(share);
            let leaving: Vec<&String> = units
                .iter()
                .rev()
                .filter(|u| held.get(*u).is_some_and(|h| !h.leaving))
                .take(excess)
                .collect();
            for unit in leaving {
                if let Some(h) = held.get_mut(unit) {
                    tracing::info!(partition = %unit, instances, "handing the partition over to another instance");
                    h.leaving = true;
                    h.stop.cancel();
                }
            }
            for unit in &units {
                let done = held
                    .get(unit)
                    .is_some_and(|h| h.leaving && h.task.is_finished());
                if done && self.nothing_pending(unit).await {
                    self.give_up(procedure, std::slice::from_ref(unit)).await;
                    held.remove(unit);
                }
            }
        }
    }

    /// Says this instance is alive (a sorted set scored by Redis's clock)
    /// and counts the live instances: those seen within `claim_idle`.
    async fn heartbeat(&self) -> redis::RedisResult<usize> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(HEARTBEAT)
            .arg(1)
            .arg(self.keys.instances())
            .arg(&self.consumer)
            .arg(self.claim_idle.as_millis().max(1) as u64);
        let mut c = self.shared.get().await?;
        cmd.query_async(&mut c).await
    }

    /// Whether this instance has no entry of `unit` pending (every one it
    /// read is acknowledged, dead-lettered or released in Redis).
    async fn nothing_pending(&self, unit: &str) -> bool {
        let Ok(mut c) = self.shared.get().await else {
            return false;
        };
        let pending: redis::RedisResult<Vec<Value>> = redis::cmd("XPENDING")
            .arg(self.keys.stream(unit))
            .arg(self.keys.group())
            .arg("-")
            .arg("+")
            .arg(1)
            .arg(&self.consumer)
            .query_async(&mut c)
            .await;
        pending.is_ok_and(|p| p.is_empty())
    }

    /// Gives up the leases of `units` of `procedure` if still ours.
    async fn give_up(&self, procedure: &str, units: &[String]) {
        let keys: Vec<String> = units
            .iter()
            .filter_map(|u| super::split_lane(u).1?.parse::<u16>().ok())
            .map(|k| self.keys.lease(procedure, k))
            .collect();
        if keys.is_empty() {
            return;
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RELEASE)
            .arg(keys.len())
            .arg(&keys)
            .arg(&self.consumer);
        if let Ok(mut c) = self.shared.get().await {
            match cmd.query_async::<i64>(&mut c).await {
                Ok(n) => {
                    tracing::info!(%procedure, partitions = n, "gave up the partitions' leases")
                }
                Err(e) => {
                    tracing::warn!(%procedure, error = %e, "could not give up the partitions' leases; they lapse after SUBTOCALL_CLAIM_IDLE")
                }
            }
        }
    }

    /// Gives up the leases this instance holds, so that another instance
    /// takes the partitions at once.
    async fn give_up_leases(&self, procedures: &HashSet<String>, held: &HashMap<String, Held>) {
        for procedure in procedures {
            let units: Vec<String> = held
                .keys()
                .filter(|u| super::split_lane(u).0 == procedure)
                .cloned()
                .collect();
            self.give_up(procedure, &units).await;
        }
    }

    async fn registry(&self) -> redis::RedisResult<Vec<String>> {
        let mut c = self.shared.get().await?;
        redis::cmd("SMEMBERS")
            .arg(self.keys.procedures())
            .query_async(&mut c)
            .await
    }

    /// One stream's reader, until `stop`. `procedure` is the stream's unit
    /// (a procedure or one of its partitions). A partition's new holder
    /// (`claim_all`) first claims every entry pending in it, whoever held
    /// them, so that it delivers them before anything newer.
    async fn read(&self, procedure: Arc<str>, stop: CancellationToken, claim_all: bool) {
        let stream = self.keys.stream(&procedure);
        let mut conn: Option<RawConn> = None;
        // On a cluster: the node a `MOVED` named, tried before a lookup.
        let mut redirect: Option<(String, u16)> = None;
        let mut group_ready = false;
        let mut claimed_all = !claim_all;
        let mut next_claim = Instant::now();
        let mut failures = 0u32;
        let mut moves = 0u32;
        while !stop.is_cancelled() {
            let step = async {
                let c = match &mut conn {
                    Some(c) => c,
                    None => conn.insert(self.connect(&stream, redirect.take()).await?),
                };
                if !group_ready {
                    create_group(c, &stream, self.keys.group()).await?;
                    group_ready = true;
                }
                if !claimed_all {
                    self.take_over(c, &procedure, &stream, Duration::ZERO)
                        .await?;
                    claimed_all = true;
                    next_claim = Instant::now() + self.claim_idle / 2;
                }
                if Instant::now() >= next_claim {
                    self.take_over(c, &procedure, &stream, self.claim_idle)
                        .await?;
                    next_claim = Instant::now() + self.claim_idle / 2;
                }
                // Wait for room in the window: a chunk of it, so that a full
                // window is topped up in a few reads rather than one per
                // acknowledgement.
                let room = tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    permit = self.credits.acquire_many(self.read_chunk) => match permit {
                        Ok(p) => { drop(p); self.credits.available_permits().clamp(1, READ_MAX) }
                        Err(_) => return Ok(()),
                    },
                };
                let block = BLOCK
                    .min(next_claim.saturating_duration_since(Instant::now()))
                    .max(Duration::from_millis(1));
                let count = room.to_string();
                let block_ms = block.as_millis().to_string();
                let read = c
                    .frame(
                        &[
                            b"XREADGROUP",
                            b"GROUP",
                            self.keys.group().as_bytes(),
                            self.consumer.as_bytes(),
                            b"COUNT",
                            count.as_bytes(),
                            b"BLOCK",
                            block_ms.as_bytes(),
                            b"STREAMS",
                            stream.as_bytes(),
                            b">",
                        ],
                        block + COMMAND_TIMEOUT,
                    )
                    .await?;
                let entries = parse_read(&read, &procedure);
                self.hand_over(entries).await;
                Ok::<(), resp::Error>(())
            };
            match step.await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(%procedure, "queue stream readable again");
                        let _ = self.out.send(FromReaders::RedisUp(true));
                    }
                    failures = 0;
                    moves = 0;
                }
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        // The stream or group vanished (a Redis without persistence restarted).
                        group_ready = false;
                    } else {
                        conn = None;
                    }
                    if let Some(node) = e.moved_to() {
                        // The slot moved to another master: follow at once,
                        // unless the nodes keep sending us round.
                        tracing::info!(%procedure, node = %format!("{}:{}", node.0, node.1), "the queue stream's slot moved; following");
                        redirect = Some(node);
                        moves += 1;
                        if moves <= 3 {
                            continue;
                        }
                    }
                    failures += 1;
                    let _ = self.out.send(FromReaders::RedisUp(false));
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(%procedure, error = %e, "cannot read the queue stream; retrying");
                    }
                    let delay = Duration::from_millis(100 * u64::from(failures.min(20)));
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// A connection to the node holding `stream`: the server itself, or on a
    /// cluster the node a redirection named, else the master of the
    /// stream's slot as the cluster says (asked through the shared
    /// connection, which knows every node).
    async fn connect(
        &self,
        stream: &str,
        redirect: Option<(String, u16)>,
    ) -> Result<RawConn, resp::Error> {
        let endpoint = self.target.endpoint();
        let cluster = self.target.is_cluster();
        let endpoint = match (cluster, redirect) {
            (false, _) => endpoint.clone(),
            (true, Some((host, port))) => endpoint.at(&host, port),
            (true, None) => {
                let (host, port) = self.master_of(stream).await?;
                // A node that does not know its own address says "" or "?".
                let host = match host.as_str() {
                    "" | "?" => endpoint.host().unwrap_or("127.0.0.1").to_owned(),
                    _ => host,
                };
                endpoint.at(&host, port)
            }
        };
        RawConn::connect(&endpoint, cluster, COMMAND_TIMEOUT).await
    }

    /// The address of the master serving `key`'s slot (`CLUSTER SLOTS`).
    async fn master_of(&self, key: &str) -> Result<(String, u16), resp::Error> {
        let lookup = |e: String| resp::Error::Cluster(e);
        let mut c = self.shared.get().await.map_err(|e| lookup(e.to_string()))?;
        let slots: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut c)
            .await
            .map_err(|e| lookup(e.to_string()))?;
        let slot = i64::from(resp::slot(key.as_bytes()));
        let Value::Array(ranges) = slots else {
            return Err(lookup("CLUSTER SLOTS gave no ranges".into()));
        };
        ranges
            .iter()
            .find_map(|range| match range {
                Value::Array(r) => match (r.first(), r.get(1), r.get(2)) {
                    (Some(Value::Int(from)), Some(Value::Int(to)), Some(Value::Array(node)))
                        if (*from..=*to).contains(&slot) =>
                    {
                        match (node.first().and_then(text), node.get(1)) {
                            (Some(host), Some(Value::Int(port))) => {
                                Some((host, u16::try_from(*port).ok()?))
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                },
                _ => None,
            })
            .ok_or_else(|| lookup(format!("no node serves slot {slot}")))
    }

    /// Entries to the event loop, each taking one credit.
    async fn hand_over(&self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        // They are ours already: take the credits even if that means waiting.
        if let Ok(p) = self.credits.acquire_many(entries.len() as u32).await {
            p.forget();
        }
        let _ = self.out.send(FromReaders::Entries(entries));
    }

    /// Takes over what another consumer left idle for `idle`, in stream
    /// order.
    async fn take_over(
        &self,
        c: &mut RawConn,
        procedure: &Arc<str>,
        stream: &str,
        idle: Duration,
    ) -> Result<(), resp::Error> {
        let idle = idle.as_millis().to_string();
        let mut cursor = "0-0".to_owned();
        loop {
            let room = self
                .credits
                .available_permits()
                .clamp(1, READ_MAX)
                .to_string();
            let reply = c
                .frame(
                    &[
                        b"XAUTOCLAIM",
                        stream.as_bytes(),
                        self.keys.group().as_bytes(),
                        self.consumer.as_bytes(),
                        idle.as_bytes(),
                        cursor.as_bytes(),
                        b"COUNT",
                        room.as_bytes(),
                    ],
                    COMMAND_TIMEOUT,
                )
                .await?;
            let (next, mut entries) = parse_autoclaim(&reply, procedure);
            if !entries.is_empty() {
                let counts = self.delivery_counts(c, stream, &entries).await?;
                for e in &mut entries {
                    e.deliveries = counts.get(&e.id).copied().unwrap_or(1);
                }
                tracing::info!(%procedure, entries = entries.len(), "took over entries another instance left idle");
                self.hand_over(entries).await;
            }
            match next {
                Some(n) if n != "0-0" && !self.stop.is_cancelled() => cursor = n,
                _ => break,
            }
        }
        self.forget_gone_consumers(c, stream).await
    }

    /// Removes from the group the consumers of instances that are gone:
    /// nothing pending and silent for long (a live reader touches the group
    /// every second). Keeps `XINFO CONSUMERS` short over many restarts.
    async fn forget_gone_consumers(
        &self,
        c: &mut RawConn,
        stream: &str,
    ) -> Result<(), resp::Error> {
        let gone_after = (self.claim_idle * 10).max(GONE_AFTER);
        let group = self.keys.group().as_bytes();
        let reply = c
            .command(
                &[b"XINFO", b"CONSUMERS", stream.as_bytes(), group],
                COMMAND_TIMEOUT,
            )
            .await?;
        let Reply::Array(consumers) = reply else {
            return Ok(());
        };
        for consumer in consumers {
            let info = consumer_info(&consumer);
            let (Some(name), Some(0), Some(idle)) = (info.0, info.1, info.2) else {
                continue;
            };
            if name != self.consumer && idle > gone_after.as_millis() as i64 {
                c.command(
                    &[
                        b"XGROUP",
                        b"DELCONSUMER",
                        stream.as_bytes(),
                        group,
                        name.as_bytes(),
                    ],
                    COMMAND_TIMEOUT,
                )
                .await?;
                tracing::debug!(consumer = %name, stream, "removed a gone consumer from the group");
            }
        }
        Ok(())
    }

    async fn delivery_counts(
        &self,
        c: &mut RawConn,
        stream: &str,
        entries: &[Entry],
    ) -> Result<HashMap<String, u64>, resp::Error> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(HashMap::new());
        };
        let count = (entries.len() * 2 + 16).to_string();
        let reply = c
            .command(
                &[
                    b"XPENDING",
                    stream.as_bytes(),
                    self.keys.group().as_bytes(),
                    first.id.as_bytes(),
                    last.id.as_bytes(),
                    count.as_bytes(),
                    self.consumer.as_bytes(),
                ],
                COMMAND_TIMEOUT,
            )
            .await?;
        let mut counts = HashMap::new();
        if let Reply::Array(rows) = reply {
            for row in rows {
                if let Reply::Array(f) = row
                    && let (Some(id), Some(Reply::Int(n))) =
                        (f.first().and_then(Reply::text), f.get(3))
                {
                    counts.insert(id.to_owned(), *n as u64);
                }
            }
        }
        Ok(counts)
    }
}

/// Name, pending count and idle milliseconds of one `XINFO CONSUMERS` row
/// (a flat field/value array).
fn consumer_info(row: &Reply) -> (Option<String>, Option<i64>, Option<i64>) {
    let mut info = (None, None, None);
    let Reply::Array(flat) = row else {
        return info;
    };
    for kv in flat.chunks(2) {
        match kv {
            [k, Reply::Int(n)] if k.text() == Some("pending") => info.1 = Some(*n),
            [k, Reply::Int(n)] if k.text() == Some("idle") => info.2 = Some(*n),
            [k, v] if k.text() == Some("name") => info.0 = v.text().map(str::to_owned),
            _ => {}
        }
    }
    info
}

async fn create_group(c: &mut RawConn, stream: &str, group: &str) -> Result<(), resp::Error> {
    let created = c
        .command(
            &[
                b"XGROUP",
                b"CREATE",
                stream.as_bytes(),
                group.as_bytes(),
                b"0",
                b"MKSTREAM",
            ],
            COMMAND_TIMEOUT,
        )
        .await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other.map(drop),
    }
}

/// Entries of an XREADGROUP reply (`[[stream, [[id, [f, v, ...]], ...]]]`,
/// or nil when the block ran out).
fn parse_read(reply: &Bytes, procedure: &Arc<str>) -> Vec<Entry> {
    let mut c = Cursor::new(reply);
    let mut entries = Vec::new();
    for _ in 0..c.array().unwrap_or(0) {
        if c.array() == Some(2) {
            c.skip();
            parse_entries(&mut c, procedure, false, &mut entries);
        }
    }
    entries
}

/// The cursor and the entries of an XAUTOCLAIM reply (`[cursor, entries,
/// deleted ids]`); deleted entries (nil fields) are skipped (Redis drops
/// them from the pending list).
fn parse_autoclaim(reply: &Bytes, procedure: &Arc<str>) -> (Option<String>, Vec<Entry>) {
    let mut c = Cursor::new(reply);
    let mut entries = Vec::new();
    if c.array().unwrap_or(0) < 2 {
        return (None, entries);
    }
    let cursor = c
        .bulk()
        .and_then(|b| std::str::from_utf8(&b).ok().map(str::to_owned));
    parse_entries(&mut c, procedure, true, &mut entries);
    (cursor, entries)
}

/// An array of `[id, [field, value, ...]]` entries, into `out`.
fn parse_entries(c: &mut Cursor, procedure: &Arc<str>, taken_over: bool, out: &mut Vec<Entry>) {
    let n = c.array().unwrap_or(0);
    out.reserve(n);
    for _ in 0..n {
        if c.array() != Some(2) {
            continue;
        }
        let id = c.bulk();
        // Nil fields: deleted meanwhile.
        let fields = c.array().unwrap_or(0);
        let mut pairs = Vec::with_capacity(fields / 2);
        for _ in 0..fields / 2 {
            if let (Some(k), Some(v)) = (c.bulk(), c.bulk()) {
                pairs.push((k, v));
            }
        }
        let Some(id) = id.and_then(|b| std::str::from_utf8(&b).ok().map(str::to_owned)) else {
            continue;
        };
        if fields == 0 {
            continue;
        }
        out.push(Entry {
            procedure: procedure.clone(),
            id,
            deliveries: 1,
            fields: pairs,
            taken_over,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn frame(reply: &Reply) -> Bytes {
        let mut out = Vec::new();
        resp::write(reply, &mut out);
        Bytes::from(out)
    }

    fn pair(k: &str, v: &str) -> (Bytes, Bytes) {
        (
            Bytes::copy_from_slice(k.as_bytes()),
            Bytes::copy_from_slice(v.as_bytes()),
        )
    }

    #[test]
    fn reads_and_takeovers_parse_into_entries() {
        let p: Arc<str> = Arc::from("p");
        let read = Reply::Array(vec![Reply::Array(vec![
            bulk("{q:p}:stream"),
            Reply::Array(vec![
                Reply::Array(vec![
                    bulk("1-0"),
                    Reply::Array(vec![bulk("event"), bulk("{}")]),
                ]),
                Reply::Array(vec![
                    bulk("2-0"),
                    Reply::Array(vec![bulk("other"), bulk("x")]),
                ]),
            ]),
        ])]);
        let entries = parse_read(&frame(&read), &p);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, "1-0");
        assert_eq!(entries[0].fields, vec![pair("event", "{}")]);
        assert_eq!(
            entries[1].fields,
            vec![pair("other", "x")],
            "handed over as it is"
        );
        let claimed = Reply::Array(vec![
            bulk("0-0"),
            Reply::Array(vec![
                Reply::Array(vec![
                    bulk("3-0"),
                    Reply::Array(vec![bulk("event"), bulk("{}")]),
                ]),
                Reply::Array(vec![bulk("4-0"), Reply::Nil]),
            ]),
            Reply::Array(vec![]),
        ]);
        let (cursor, entries) = parse_autoclaim(&frame(&claimed), &p);
        assert_eq!(cursor.as_deref(), Some("0-0"));
        assert_eq!(entries.len(), 1, "a deleted entry is skipped");
        assert!(entries[0].taken_over);
        assert_eq!(parse_read(&frame(&Reply::Nil), &p), Vec::new());
    }

    #[test]
    fn consumer_rows_give_name_pending_and_idle() {
        let row = Reply::Array(vec![
            bulk("name"),
            bulk("host-1-ab"),
            bulk("pending"),
            Reply::Int(0),
            bulk("idle"),
            Reply::Int(900_000),
            bulk("inactive"),
            Reply::Int(900_000),
        ]);
        assert_eq!(
            consumer_info(&row),
            (Some("host-1-ab".to_owned()), Some(0), Some(900_000))
        );
    }
}
