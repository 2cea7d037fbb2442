//! Retention (`SUBTOCALL_RETENTION`): every admitted event is also kept, one
//! copy per topic whatever its groups, in the topic's retained stream
//! (`{ns:topic:T}:retained`), trimmed by age and bounded in length. It is
//! written in the admission step, right after the admission script (the
//! topic's keys live in another hash slot than a procedure's), by a script
//! of its own per topic. The copy kept is the topic's first group's (the
//! intake marks it, [`SharedEvent::retain`]), and only the instance whose
//! admission appended that copy keeps it: the admission's claim already
//! makes that one instance, so retention needs no claim of its own. (While
//! instances disagree on a topic's groups, for a moment when one comes or
//! goes, an event may be kept twice or, if the group whose copy it was
//! leaves, not at all.)
//!
//! What is retained can be put back: `subtocall replay` into one
//! procedure's queue, each event once per run and marked replayed; and a
//! new group's start from the past (`SUBTOCALL_NEW_GROUP_START=retained`),
//! admitted like live events (the claims make each go in once).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redis::Value;

use super::{Conn, Keys, entry};
use crate::config::Config;
use crate::discovery::{Classification, Mapper, MatchPolicy};

/// KEYS[1] the topic's retained stream; ARGV[1] the oldest entry id to
/// keep (milliseconds; 0 keeps all), ARGV[2] the most entries to keep,
/// then the stored events (`streams::entry`). Appends each, then trims by
/// age. Returns how many it kept.
const RETAIN: &str = r"
for i = 3, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], '*', 'e', ARGV[i])
end
if ARGV[1] ~= '0' then
  redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
end
return #ARGV - 2
";

/// How events are retained.
#[derive(Debug, Clone)]
pub struct Retention {
    keys: Arc<Keys>,
    keep: Duration,
    max_events: u64,
}

impl Retention {
    pub fn new(keys: Arc<Keys>, keep: Duration, max_events: u64) -> Self {
        Retention {
            keys,
            keep,
            max_events,
        }
    }

    /// The retained stream of `topic`.
    pub fn key(&self, topic: &str) -> String {
        self.keys.retained(topic)
    }

    /// The oldest entry id to keep now, in milliseconds (0: all).
    pub fn oldest_ms(&self) -> u64 {
        SystemTime::now()
            .checked_sub(self.keep)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64)
    }

    /// The most entries a retained stream keeps.
    pub fn max_events(&self) -> u64 {
        self.max_events
    }

    /// One script call per topic of `events` (their topic and stored
    /// form, in order), in the order of each topic's first event.
    pub fn commands<'a>(&self, events: &[(&'a str, &'a [u8])]) -> Vec<redis::Cmd> {
        let oldest = self.oldest_ms();
        let topics = crate::sink::groups_in_order(events.iter().map(|(t, _)| *t));
        let mut out = Vec::with_capacity(topics.len());
        for (topic, at) in topics {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(retain_hash())
                .arg(1)
                .arg(self.keys.retained(topic))
                .arg(oldest)
                .arg(self.max_events);
            for i in at {
                cmd.arg(events[i].1);
            }
            out.push(cmd);
        }
        out
    }
}

/// Runs a retention script call, sending the script itself when the
/// server does not have it yet.
pub async fn run(cmd: &redis::Cmd, c: &mut Conn) -> redis::RedisResult<Value> {
    match cmd.query_async::<Value>(c).await {
        Err(e) if e.code() == Some("NOSCRIPT") => {
            let mut eval = redis::cmd("EVAL");
            eval.arg(RETAIN);
            for arg in cmd.args_iter().skip(2) {
                if let redis::Arg::Simple(bytes) = arg {
                    eval.arg(bytes);
                }
            }
            eval.query_async::<Value>(c).await
        }
        other => other,
    }
}

fn retain_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| redis::Script::new(RETAIN).get_hash().to_owned())
}

/// A retained entry: its id's milliseconds and the stored event.
pub struct Retained {
    pub at_ms: u64,
    pub id: String,
    pub stored: Bytes,
}

/// How many entries one read of the retained stream brings.
pub const CHUNK: usize = 500;

/// The retained entries of `topic` added from `from_ms` on (and up to
/// `until_ms`, if given), in order, at most [`CHUNK`] after `after` (an
/// entry id, exclusive) when given.
pub async fn read_chunk(
    conn: &mut Conn,
    keys: &Keys,
    topic: &str,
    from_ms: u64,
    until_ms: Option<u64>,
    after: Option<&str>,
) -> Result<Vec<Retained>, String> {
    let start = match after {
        Some(id) => format!("({id}"),
        None => format!("{from_ms}-0"),
    };
    let end = until_ms.map_or_else(|| "+".to_owned(), |ms| format!("{ms}-{}", u64::MAX));
    let reply: Value = redis::cmd("XRANGE")
        .arg(keys.retained(topic))
        .arg(start)
        .arg(end)
        .arg("COUNT")
        .arg(CHUNK)
        .query_async(conn)
        .await
        .map_err(|e| format!("cannot read {}: {e}", keys.retained(topic)))?;
    Ok(super::xrange_entries(&reply)
        .into_iter()
        .filter_map(|(id, fields)| {
            let stored = fields
                .into_iter()
                .find_map(|(k, v)| (k == entry::FIELD).then(|| Bytes::from(v)))?;
            let at_ms = super::entry_id_numbers(&id)?.0;
            Some(Retained { at_ms, id, stored })
        })
        .collect())
}

/// What `subtocall replay` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub procedure: String,
    pub from: Start,
    pub until: Option<SystemTime>,
    pub dry_run: bool,
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// This long before now.
    Since(Duration),
    At(SystemTime),
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The topic of an exact SUB_ procedure, as this configuration maps it.
pub fn topic_of(config: &Config, procedure: &str) -> Result<String, String> {
    let marker = config.discovery.marker().map_err(|e| e.to_string())?;
    let mapper = Mapper::new(marker, None);
    match mapper.classify(procedure, MatchPolicy::Exact) {
        Classification::Shared(key, _) => Ok(key.topic),
        _ => Err(format!(
            "{procedure} is not a SUB_ procedure (SUBTOCALL_MARKER), so it stands for no topic"
        )),
    }
}

/// Runs `subtocall replay`: puts the retained events of the procedure's
/// topic in the window back into its queue, each once, in order (keyed
/// events into their partitions), marked replayed. Returns how many.
pub async fn replay(
    config: &Config,
    request: &Request,
    out: &mut impl Write,
) -> Result<u64, String> {
    if config.queue.kind != crate::config::QueueKind::Redis {
        return Err("replay needs the Redis queue (SUBTOCALL_QUEUE=redis): the memory queue keeps no history".into());
    }
    if config.queue.retention.is_zero() {
        return Err(
            "nothing is retained: SUBTOCALL_RETENTION is 0 (set it, as on the instances, to keep events for replay)"
                .into(),
        );
    }
    let procedure = request.procedure.as_str();
    let topic = topic_of(config, procedure)?;
    let now = SystemTime::now();
    let from = match request.from {
        Start::Since(d) => now.checked_sub(d).unwrap_or(UNIX_EPOCH),
        Start::At(t) => t,
    };
    if let Some(until) = request.until
        && until < from
    {
        return Err("--until is before the start of the window".into());
    }
    let (mut conn, keys, partitions) = super::connect_tool(config).await?;
    let mut after: Option<String> = None;
    let mut total = 0u64;
    let mut groups_made: Vec<String> = Vec::new();
    let started = std::time::Instant::now();
    loop {
        let chunk = read_chunk(
            &mut conn,
            &keys,
            &topic,
            millis(from),
            request.until.map(millis),
            after.as_deref(),
        )
        .await?;
        let Some(last) = chunk.last() else {
            break;
        };
        after = Some(last.id.clone());
        let mut pipe = redis::pipe();
        for r in &chunk {
            let stream = match partitions {
                Some(n) => {
                    let event = entry::decode(procedure, r.stored.clone())?;
                    let lane = crate::forward::key::key_of(&config.order_by_of(procedure), &event)
                        .key()
                        .map(|k| k.partition(n));
                    keys.stream_of(&super::core::Unit {
                        procedure: Arc::from(procedure),
                        partition: lane,
                    })
                }
                None => keys.stream(procedure),
            };
            if !request.dry_run && !groups_made.contains(&stream) {
                super::dead_letters::ensure_stream_group(&mut conn, &keys, &stream).await?;
                groups_made.push(stream.clone());
            }
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg(entry::FIELD)
                .arg(&r.stored[..])
                .arg(entry::REPLAYED)
                .arg(1)
                .ignore();
        }
        if !request.dry_run {
            pipe.query_async::<()>(&mut conn).await.map_err(|e| {
                format!(
                    "cannot put events back into {procedure}'s queue: {e} ({total} put back so far)"
                )
            })?;
        }
        total += chunk.len() as u64;
    }
    if !request.dry_run && total > 0 {
        // So that every instance reads the streams, even one never used.
        redis::cmd("SADD")
            .arg(keys.procedures())
            .arg(procedure)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
    }
    let window = format!(
        "from {}{}",
        humantime::format_rfc3339_seconds(from),
        request
            .until
            .map(|u| format!(" until {}", humantime::format_rfc3339_seconds(u)))
            .unwrap_or_default()
    );
    let io = |e: std::io::Error| e.to_string();
    if request.dry_run {
        writeln!(
            out,
            "would replay {total} events of topic {topic} into {procedure} ({window}); nothing changed"
        )
        .map_err(io)?;
    } else {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        writeln!(
            out,
            "replayed {total} events of topic {topic} into {procedure} ({window}; {:.0} events/s)",
            total as f64 / secs
        )
        .map_err(io)?;
    }
    Ok(total)
}
