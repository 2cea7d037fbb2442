//! The groups kept in Redis (`{ns}:groups`, a hash by procedure), so that
//! groups outlive instances: an instance that starts while a group's
//! backends are away knows the group from here, subscribes for it and
//! admits its events, which wait in its streams for a callee. Every
//! instance writes what it sees (a group with a callee, a group whose last
//! callee left and when, a group gone after its grace period); a write is
//! small and rare (a registration coming or going). `subtocall groups
//! list|forget` reads and edits it.
//!
//! Only exact groups are kept: a pattern registration's procedures depend
//! on each event's topic.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;
use tokio::sync::mpsc;

use super::{Keys, Shared, Target};
use crate::config::Config;
use crate::metrics::Metrics;

/// One group as kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub procedure: String,
    pub topic: String,
    /// The group's name (`None`: the topic's default group).
    pub group: Option<String>,
    pub batch: bool,
    /// When its last callee left; `None` while it has one.
    pub away_since: Option<SystemTime>,
}

impl Kept {
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "topic": self.topic,
            "group": self.group,
            "batch": self.batch,
            "away_since_ms": self.away_since.map(millis),
        })
        .to_string()
    }

    /// A kept group, from its field and value; `None` when the value is
    /// not one of ours.
    pub fn from_json(procedure: &str, json: &str) -> Option<Kept> {
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        Some(Kept {
            procedure: procedure.to_owned(),
            topic: v.get("topic")?.as_str()?.to_owned(),
            group: v.get("group").and_then(|g| g.as_str()).map(str::to_owned),
            batch: v.get("batch").and_then(|b| b.as_bool()).unwrap_or(false),
            away_since: v
                .get("away_since_ms")
                .and_then(|m| m.as_u64())
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
        })
    }

    /// Until when a group away since `away_since` is kept, with this grace
    /// period; one that has a callee (as far as Redis knows) counts as
    /// away from `now`.
    pub fn kept_until(&self, grace: Duration, now: SystemTime) -> SystemTime {
        self.away_since.unwrap_or(now) + grace
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every kept group, in procedure order.
pub async fn load(shared: &Shared, keys: &Keys) -> Result<Vec<Kept>, String> {
    let mut conn = shared.get().await.map_err(|e| e.to_string())?;
    let all: Vec<(String, String)> = conn
        .hgetall(keys.groups())
        .await
        .map_err(|e| format!("cannot read {}: {e}", keys.groups()))?;
    let mut kept: Vec<Kept> = all
        .iter()
        .filter_map(|(p, json)| {
            let k = Kept::from_json(p, json);
            if k.is_none() {
                tracing::warn!(procedure = %p, "ignoring a kept group that is not subtocall's");
            }
            k
        })
        .collect();
    kept.sort_by(|a, b| a.procedure.cmp(&b.procedure));
    Ok(kept)
}

/// A change to the kept groups.
#[derive(Debug)]
pub enum Change {
    Keep(Kept),
    Forget(String),
}

/// Writes the changes the loop sends, in order, on a task of its own: a
/// write that fails is tried again a few times, then given up with a log
/// line and a count (the next change of the group writes it again).
pub fn writer(shared: Shared, keys: Keys, metrics: std::sync::Arc<Metrics>) -> Registry {
    let (tx, mut rx) = mpsc::unbounded_channel::<Change>();
    tokio::spawn(async move {
        while let Some(change) = rx.recv().await {
            let mut tries = 0;
            loop {
                tries += 1;
                match write(&shared, &keys, &change).await {
                    Ok(()) => break,
                    Err(e) if tries < 5 => {
                        tracing::debug!(error = %e, "cannot write a kept group; retrying");
                        tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                    }
                    Err(e) => {
                        metrics.redis_errors.inc();
                        tracing::warn!(error = %e, ?change, "cannot write a kept group to Redis; given up");
                        break;
                    }
                }
            }
        }
    });
    Registry { tx }
}

async fn write(shared: &Shared, keys: &Keys, change: &Change) -> Result<(), String> {
    let mut conn = shared.get().await.map_err(|e| e.to_string())?;
    let done: redis::RedisResult<i64> = match change {
        Change::Keep(k) => conn.hset(keys.groups(), &k.procedure, k.to_json()).await,
        Change::Forget(p) => conn.hdel(keys.groups(), p).await,
    };
    done.map(drop).map_err(|e| e.to_string())
}

/// Where the loop sends its changes to the kept groups.
#[derive(Debug, Clone)]
pub struct Registry {
    tx: mpsc::UnboundedSender<Change>,
}

impl Registry {
    pub fn send(&self, change: Change) {
        // The writer ends only with the runtime.
        let _ = self.tx.send(change);
    }
}

/// What `subtocall groups` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    List,
    /// Forget a group; with `yes`, its backlog too.
    Forget {
        procedure: String,
        yes: bool,
    },
}

/// Runs `subtocall groups list|forget` against the queue `config` names.
pub async fn run(config: &Config, request: &Request, out: &mut impl Write) -> Result<(), String> {
    if config.queue.kind != crate::config::QueueKind::Redis {
        return Err("groups are kept only with the Redis queue (SUBTOCALL_QUEUE=redis)".into());
    }
    let target = Target::from_config(&config.redis, true)?;
    let shared = target.shared()?;
    let keys = Keys::new(&config.queue.name);
    let io = |e: std::io::Error| e.to_string();
    match request {
        Request::List => {
            let now = SystemTime::now();
            let grace = config.discovery.grace_period;
            for k in load(&shared, &keys).await? {
                let backlog = backlog(&shared, &keys, &k.procedure, config).await?;
                let state = match k.away_since {
                    None => "callee".to_owned(),
                    Some(t) => format!(
                        "away {} (kept until {})",
                        humantime::format_duration(round(
                            now.duration_since(t).unwrap_or_default()
                        )),
                        humantime::format_rfc3339_seconds(k.kept_until(grace, now)),
                    ),
                };
                let group = k.group.as_deref().unwrap_or("default");
                writeln!(
                    out,
                    "{}  topic {}  group {}{}  {}  backlog {}",
                    k.procedure,
                    k.topic,
                    group,
                    if k.batch { " (batch)" } else { "" },
                    state,
                    backlog
                )
                .map_err(io)?;
            }
            Ok(())
        }
        Request::Forget { procedure, yes } => {
            let kept = load(&shared, &keys).await?;
            if !kept.iter().any(|k| &k.procedure == procedure) {
                return Err(format!(
                    "no group is kept for {procedure} (see subtocall groups list)"
                ));
            }
            let backlog = backlog(&shared, &keys, procedure, config).await?;
            if !yes {
                writeln!(
                    out,
                    "would forget {procedure} and drop its backlog of {backlog} events; \
                     run again with --yes to do it"
                )
                .map_err(io)?;
                return Err("not confirmed (--yes)".into());
            }
            let mut conn = shared.get().await.map_err(|e| e.to_string())?;
            let _: i64 = conn
                .hdel(keys.groups(), procedure)
                .await
                .map_err(|e| e.to_string())?;
            // Registered again later, it is a new group.
            let _: i64 = conn
                .hdel(keys.started(), procedure)
                .await
                .map_err(|e| e.to_string())?;
            let mut dropped = 0;
            for stream in streams(&keys, procedure, config) {
                dropped += conn
                    .del::<_, i64>(&stream)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let _: i64 = conn
                .srem(keys.procedures(), procedure)
                .await
                .map_err(|e| e.to_string())?;
            writeln!(
                out,
                "forgot {procedure}: {backlog} events dropped ({dropped} streams deleted); \
                 a running instance lets it go at the end of its grace period"
            )
            .map_err(io)?;
            Ok(())
        }
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// The streams of a procedure: plain, and its partitions with ordering.
fn streams(keys: &Keys, procedure: &str, config: &Config) -> Vec<String> {
    let mut all = vec![keys.stream(procedure)];
    if config.orders_any() {
        for k in 0..config.queue.partitions {
            all.push(keys.stream(&super::lane(procedure, k)));
        }
    }
    all
}

/// Entries waiting in a procedure's streams.
async fn backlog(
    shared: &Shared,
    keys: &Keys,
    procedure: &str,
    config: &Config,
) -> Result<u64, String> {
    let mut conn = shared.get().await.map_err(|e| e.to_string())?;
    let mut total = 0;
    for stream in streams(keys, procedure, config) {
        total += conn
            .xlen::<_, u64>(&stream)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_group_reads_back_as_written() {
        let k = Kept {
            procedure: "com.example.SUB_status__audit".into(),
            topic: "com.example.status".into(),
            group: Some("audit".into()),
            batch: false,
            away_since: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
        };
        assert_eq!(Kept::from_json(&k.procedure, &k.to_json()), Some(k.clone()));
        let present = Kept {
            away_since: None,
            ..k.clone()
        };
        assert_eq!(
            Kept::from_json(&k.procedure, &present.to_json()),
            Some(present)
        );
        assert_eq!(Kept::from_json("p", "not json"), None);
        assert_eq!(Kept::from_json("p", "{\"group\": null}"), None);
        let t = UNIX_EPOCH + Duration::from_secs(100);
        assert_eq!(
            k.kept_until(Duration::from_secs(60), t),
            UNIX_EPOCH + Duration::from_millis(1_700_000_060_123)
        );
    }
}
