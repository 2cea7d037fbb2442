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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use super::{Conn, Keys, Shared, Target, text};

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
    /// Its field/value pairs (see `streams::entry`).
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
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
}

impl Readers {
    /// Runs readers until `stop`, starting one per procedure it learns of.
    pub async fn run(self, mut new_procedures: mpsc::UnboundedReceiver<String>) {
        let this = Arc::new(self);
        let mut running: HashSet<String> = HashSet::new();
        let mut tasks = JoinSet::new();
        let mut next_scan = Instant::now();
        loop {
            let mut found = Vec::new();
            tokio::select! {
                _ = this.stop.cancelled() => break,
                Some(p) = new_procedures.recv() => found.push(p),
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
                    tasks.spawn(async move { this.read(Arc::from(procedure)).await });
                }
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn registry(&self) -> redis::RedisResult<Vec<String>> {
        let mut c = self.shared.get().await?;
        redis::cmd("SMEMBERS")
            .arg(self.keys.procedures())
            .query_async(&mut c)
            .await
    }

    /// One stream's reader, until `stop`.
    async fn read(&self, procedure: Arc<str>) {
        let stream = self.keys.stream(&procedure);
        let mut conn: Option<Conn> = None;
        let mut group_ready = false;
        let mut next_claim = Instant::now();
        let mut failures = 0u32;
        while !self.stop.is_cancelled() {
            let step = async {
                let c = match &mut conn {
                    Some(c) => c,
                    None => conn.insert(
                        self.target
                            .dedicated(BLOCK * 2 + super::COMMAND_TIMEOUT)
                            .await?,
                    ),
                };
                if !group_ready {
                    create_group(c, &stream, self.keys.group()).await?;
                    group_ready = true;
                }
                if Instant::now() >= next_claim {
                    self.take_over(c, &procedure, &stream).await?;
                    next_claim = Instant::now() + self.claim_idle / 2;
                }
                // Wait for room in the window: a chunk of it, so that a full
                // window is topped up in a few reads rather than one per
                // acknowledgement.
                let room = tokio::select! {
                    _ = self.stop.cancelled() => return Ok(()),
                    permit = self.credits.acquire_many(self.read_chunk) => match permit {
                        Ok(p) => { drop(p); self.credits.available_permits().clamp(1, READ_MAX) }
                        Err(_) => return Ok(()),
                    },
                };
                let block = BLOCK
                    .min(next_claim.saturating_duration_since(Instant::now()))
                    .max(Duration::from_millis(1));
                let read: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(self.keys.group())
                    .arg(&self.consumer)
                    .arg("COUNT")
                    .arg(room)
                    .arg("BLOCK")
                    .arg(block.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(">")
                    .query_async(c)
                    .await?;
                let entries = parse_read(read, &procedure);
                self.hand_over(entries).await;
                Ok::<(), redis::RedisError>(())
            };
            match step.await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(%procedure, "queue stream readable again");
                        let _ = self.out.send(FromReaders::RedisUp(true));
                    }
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    if e.code() == Some("NOGROUP") {
                        // The stream or group vanished (a Redis without persistence restarted).
                        group_ready = false;
                    } else {
                        conn = None;
                    }
                    let _ = self.out.send(FromReaders::RedisUp(false));
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(%procedure, error = %e, "cannot read the queue stream; retrying");
                    }
                    let delay = Duration::from_millis(100 * u64::from(failures.min(20)));
                    tokio::select! {
                        _ = self.stop.cancelled() => {}
                        _ = sleep(delay) => {}
                    }
                }
            }
        }
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

    /// Takes over what another consumer left idle for `claim_idle`.
    async fn take_over(
        &self,
        c: &mut Conn,
        procedure: &Arc<str>,
        stream: &str,
    ) -> redis::RedisResult<()> {
        let mut cursor = "0-0".to_owned();
        loop {
            let room = self.credits.available_permits().clamp(1, READ_MAX);
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(self.keys.group())
                .arg(&self.consumer)
                .arg(self.claim_idle.as_millis() as u64)
                .arg(&cursor)
                .arg("COUNT")
                .arg(room)
                .query_async(c)
                .await?;
            let (next, mut entries) = parse_autoclaim(reply, procedure);
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
    async fn forget_gone_consumers(&self, c: &mut Conn, stream: &str) -> redis::RedisResult<()> {
        let gone_after = (self.claim_idle * 10).max(GONE_AFTER);
        let reply: Value = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(stream)
            .arg(self.keys.group())
            .query_async(&mut *c)
            .await?;
        let Value::Array(consumers) = reply else {
            return Ok(());
        };
        for consumer in consumers {
            let info = consumer_info(&consumer);
            let (Some(name), Some(0), Some(idle)) = (info.0, info.1, info.2) else {
                continue;
            };
            if name != self.consumer && idle > gone_after.as_millis() as i64 {
                redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(stream)
                    .arg(self.keys.group())
                    .arg(&name)
                    .query_async::<i64>(&mut *c)
                    .await?;
                tracing::debug!(consumer = %name, stream, "removed a gone consumer from the group");
            }
        }
        Ok(())
    }

    async fn delivery_counts(
        &self,
        c: &mut Conn,
        stream: &str,
        entries: &[Entry],
    ) -> redis::RedisResult<HashMap<String, u64>> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(HashMap::new());
        };
        let reply: Value = redis::cmd("XPENDING")
            .arg(stream)
            .arg(self.keys.group())
            .arg(&first.id)
            .arg(&last.id)
            .arg(entries.len() * 2 + 16)
            .arg(&self.consumer)
            .query_async(c)
            .await?;
        let mut counts = HashMap::new();
        if let Value::Array(rows) = reply {
            for row in rows {
                if let Value::Array(f) = row
                    && let (Some(id), Some(Value::Int(n))) = (f.first().and_then(text), f.get(3))
                {
                    counts.insert(id, *n as u64);
                }
            }
        }
        Ok(counts)
    }
}

/// Name, pending count and idle milliseconds of one `XINFO CONSUMERS` row
/// (a flat field/value array in RESP2, a map in RESP3).
fn consumer_info(row: &Value) -> (Option<String>, Option<i64>, Option<i64>) {
    let pairs: Vec<(&Value, &Value)> = match row {
        Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|kv| match kv {
                [k, v] => Some((k, v)),
                _ => None,
            })
            .collect(),
        Value::Map(map) => map.iter().map(|(k, v)| (k, v)).collect(),
        _ => Vec::new(),
    };
    let mut info = (None, None, None);
    for (k, v) in pairs {
        match (text(k).as_deref(), v) {
            (Some("name"), v) => info.0 = text(v),
            (Some("pending"), Value::Int(n)) => info.1 = Some(*n),
            (Some("idle"), Value::Int(n)) => info.2 = Some(*n),
            _ => {}
        }
    }
    info
}

async fn create_group(c: &mut Conn, stream: &str, group: &str) -> redis::RedisResult<()> {
    let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(c)
        .await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other.map(drop),
    }
}

/// Entries of an XREADGROUP reply (`[[stream, [[id, [f, v, ...]], ...]]]`,
/// RESP2, or a map in RESP3), taken apart without copying the values.
fn parse_read(reply: Value, procedure: &Arc<str>) -> Vec<Entry> {
    let streams: Vec<Value> = match reply {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(pair) => pair.into_iter().nth(1),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    streams
        .into_iter()
        .flat_map(|entries| parse_entries(entries, procedure, false))
        .collect()
}

/// The cursor and the entries of an XAUTOCLAIM reply; deleted entries
/// (nil fields) are skipped (Redis drops them from the pending list).
fn parse_autoclaim(reply: Value, procedure: &Arc<str>) -> (Option<String>, Vec<Entry>) {
    match reply {
        Value::Array(parts) if parts.len() >= 2 => {
            let mut parts = parts.into_iter();
            let cursor = parts.next().as_ref().and_then(text);
            let entries = parts
                .next()
                .map(|e| parse_entries(e, procedure, true))
                .unwrap_or_default();
            (cursor, entries)
        }
        _ => (None, Vec::new()),
    }
}

fn parse_entries(entries: Value, procedure: &Arc<str>, taken_over: bool) -> Vec<Entry> {
    let Value::Array(entries) = entries else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(pair) = entry else {
                return None;
            };
            let mut pair = pair.into_iter();
            let id = pair.next().as_ref().and_then(text)?;
            let fields = match pair.next() {
                Some(Value::Array(fields)) => fields,
                // Deleted meanwhile.
                _ => return None,
            };
            let mut pairs = Vec::with_capacity(fields.len() / 2);
            let mut it = fields.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let (Value::BulkString(k), Value::BulkString(v)) = (k, v) {
                    pairs.push((k, v));
                }
            }
            Some(Entry {
                procedure: procedure.clone(),
                id,
                deliveries: 1,
                fields: pairs,
                taken_over,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn reads_and_takeovers_parse_into_entries() {
        let p: Arc<str> = Arc::from("p");
        let read = Value::Array(vec![Value::Array(vec![
            bulk("{q:p}:stream"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("event"), bulk("{}")]),
                ]),
                Value::Array(vec![
                    bulk("2-0"),
                    Value::Array(vec![bulk("other"), bulk("x")]),
                ]),
            ]),
        ])]);
        let entries = parse_read(read, &p);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, "1-0");
        assert_eq!(entries[0].fields, vec![(b"event".to_vec(), b"{}".to_vec())]);
        assert_eq!(
            entries[1].fields,
            vec![(b"other".to_vec(), b"x".to_vec())],
            "handed over as it is"
        );
        let claimed = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("3-0"),
                    Value::Array(vec![bulk("event"), bulk("{}")]),
                ]),
                Value::Array(vec![bulk("4-0"), Value::Nil]),
            ]),
            Value::Array(vec![]),
        ]);
        let (cursor, entries) = parse_autoclaim(claimed, &p);
        assert_eq!(cursor.as_deref(), Some("0-0"));
        assert_eq!(entries.len(), 1, "a deleted entry is skipped");
        assert!(entries[0].taken_over);
        assert_eq!(parse_read(Value::Nil, &p), Vec::new());
    }

    #[test]
    fn consumer_rows_give_name_pending_and_idle() {
        let row = Value::Array(vec![
            bulk("name"),
            bulk("host-1-ab"),
            bulk("pending"),
            Value::Int(0),
            bulk("idle"),
            Value::Int(900_000),
            bulk("inactive"),
            Value::Int(900_000),
        ]);
        assert_eq!(
            consumer_info(&row),
            (Some("host-1-ab".to_owned()), Some(0), Some(900_000))
        );
    }
}
