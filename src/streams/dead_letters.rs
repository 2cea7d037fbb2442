//! `subtocall dead-letters list|redrive [--procedure P] [--limit N]`: the
//! dead-letter streams of the Redis queue, read and put back into the queue
//! (like an SQS redrive). A redriven event is a new entry with a fresh
//! retry budget; it keeps its envelope (publication, received_at). With
//! per-key ordering, a keyed event goes back to its key's partition (the
//! same `forward::key` hash admission uses). Each letter moves once, in one
//! step, even when two redrives run at once.

use std::io::Write;

use redis::Value;

use super::{Conn, Keys};
use crate::config::Config;
use crate::forward::envelope::SharedEvent;

/// KEYS[1] the dead-letter stream, KEYS[2] the queue stream; ARGV[1] the
/// dead-letter entry id, ARGV[2] the stored event (`streams::entry`). Moves
/// one event back, if it is still a dead letter: returns 1, or 0 when
/// another redrive moved it first. The instances find it at their next
/// sweep (every claim idle time).
const REDRIVE: &str = r"
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
return 1
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    List,
    Redrive,
}

/// What was asked on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub action: Action,
    pub procedure: Option<String>,
    pub limit: Option<usize>,
}

/// One dead letter as stored.
struct DeadLetter {
    procedure: String,
    id: String,
    fields: Vec<(String, Vec<u8>)>,
}

impl DeadLetter {
    fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    fn text(&self, name: &str) -> String {
        String::from_utf8_lossy(self.field(name).unwrap_or_default()).into_owned()
    }

    fn json(&self) -> serde_json::Value {
        let event = self.field("event").unwrap_or_default();
        serde_json::json!({
            "id": self.id,
            "procedure": self.procedure,
            "reason": self.text("reason"),
            "attempts": self.text("attempts").parse::<u64>().unwrap_or(0),
            "last_error": self.text("last_error"),
            "dead_lettered_at": self.text("dead_lettered_at"),
            "event": serde_json::from_slice::<serde_json::Value>(event)
                .unwrap_or_else(|_| String::from_utf8_lossy(event).into_owned().into()),
        })
    }
}

/// Runs the request against the queue `config` names, writing its output
/// to `out`. Returns how many dead letters it listed or redrove.
pub async fn run(
    config: &Config,
    request: &Request,
    out: &mut impl Write,
) -> Result<usize, String> {
    let (mut conn, keys, partitions) = super::connect_tool(config).await?;
    let procedures = match &request.procedure {
        Some(p) => vec![p.clone()],
        None => {
            let mut all: Vec<String> = redis::cmd("SMEMBERS")
                .arg(keys.procedures())
                .query_async(&mut conn)
                .await
                .map_err(|e| format!("cannot read {}: {e}", keys.procedures()))?;
            all.sort();
            all
        }
    };
    let mut done = 0;
    let mut skipped = 0;
    let mut elsewhere = 0;
    for procedure in procedures {
        let room = request.limit.map_or(usize::MAX, |l| l.saturating_sub(done));
        if room == 0 {
            break;
        }
        let letters = read(&mut conn, &keys, &procedure, room).await?;
        for letter in letters {
            match request.action {
                Action::List => {
                    writeln!(out, "{}", letter.json()).map_err(|e| e.to_string())?;
                }
                Action::Redrive => {
                    let Some(event) = letter
                        .field("event")
                        .and_then(|json| SharedEvent::from_envelope(json).ok())
                    else {
                        skipped += 1;
                        continue;
                    };
                    // Keyed: back into its key's partition.
                    let partition = partitions.and_then(|n| {
                        crate::forward::key::key_of(&config.order_by_of(&procedure), &event)
                            .key()
                            .map(|k| k.partition(n))
                    });
                    let unit = super::core::Unit {
                        procedure: std::sync::Arc::from(procedure.as_str()),
                        partition,
                    };
                    let stored = super::entry::encode(&event);
                    ensure_group(&mut conn, &keys, &unit).await?;
                    let moved = redis::cmd("EVAL")
                        .arg(REDRIVE)
                        .arg(2)
                        .arg(keys.dead(&procedure))
                        .arg(keys.stream_of(&unit))
                        .arg(&letter.id)
                        .arg(&stored)
                        .query_async::<i64>(&mut conn)
                        .await
                        .map_err(|e| format!("cannot redrive {} of {procedure}: {e}", letter.id))?;
                    if moved == 0 {
                        // Another redrive moved it first.
                        elsewhere += 1;
                        continue;
                    }
                }
            }
            done += 1;
        }
        if request.action == Action::Redrive {
            // So that every instance reads the stream, even one never used.
            redis::cmd("SADD")
                .arg(keys.procedures())
                .arg(&procedure)
                .query_async::<i64>(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    if request.action == Action::Redrive {
        writeln!(out, "redriven {}", done - skipped).map_err(|e| e.to_string())?;
        if elsewhere > 0 {
            eprintln!(
                "subtocall dead-letters: {elsewhere} dead letters were moved by another redrive meanwhile"
            );
        }
        if skipped > 0 {
            eprintln!(
                "subtocall dead-letters: {skipped} dead letters hold no event (malformed entries) and stay where they are"
            );
        }
    }
    Ok(done - skipped)
}

/// The consumer group of `unit`'s stream, created if missing (a stream no
/// instance has read yet).
async fn ensure_group(
    conn: &mut Conn,
    keys: &Keys,
    unit: &super::core::Unit,
) -> Result<(), String> {
    ensure_stream_group(conn, keys, &keys.stream_of(unit)).await
}

/// The queue's consumer group on `stream`, created (from its first entry)
/// if missing.
pub(super) async fn ensure_stream_group(
    conn: &mut Conn,
    keys: &Keys,
    stream: &str,
) -> Result<(), String> {
    let created = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(keys.group())
        .arg(0)
        .arg("MKSTREAM")
        .query_async::<redis::Value>(conn)
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(format!("cannot create the group of {stream}: {e}")),
    }
}

/// Up to `limit` dead letters of `procedure`, oldest first.
async fn read(
    conn: &mut Conn,
    keys: &Keys,
    procedure: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, String> {
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(keys.dead(procedure)).arg("-").arg("+");
    if limit != usize::MAX {
        cmd.arg("COUNT").arg(limit);
    }
    let reply: Value = cmd
        .query_async(conn)
        .await
        .map_err(|e| format!("cannot read {}: {e}", keys.dead(procedure)))?;
    Ok(super::xrange_entries(&reply)
        .into_iter()
        .map(|(id, fields)| DeadLetter {
            procedure: procedure.to_owned(),
            id,
            fields,
        })
        .collect())
}
