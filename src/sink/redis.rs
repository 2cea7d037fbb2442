//! Redis mode: RPUSH each event's JSON envelope (built when the event was
//! accepted) onto `<prefix><procedure>`, many events per round trip, through
//! a shared reconnecting connection (`streams::Shared`: one server, or the
//! master the sentinels name); each batch is one MULTI/EXEC
//! transaction. Also stores dead letters when a dead-letter list is
//! configured.

use crate::forward::policy::Policy;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::{Report, Sink, Started};
use crate::forward::envelope::{Outgoing, SharedEvent};
use crate::forward::{DeliveryId, Dispatch, Failure, Job};
use crate::metrics::Metrics;
use crate::streams::replicas::Gate;
use crate::streams::{Conn, Shared, Target};
use crate::wamp::session::Session;

/// How many events one Redis pipeline carries at most.
const PIPELINE: usize = 512;

/// A cheap-clone handle for pushing to Redis.
#[derive(Clone)]
pub struct RedisSink {
    conn: Shared,
    prefix: String,
    /// With `SUBTOCALL_REDIS_WAIT_REPLICAS`: WAIT after each push.
    gate: Option<Arc<Gate>>,
}

impl RedisSink {
    /// Creates the sink without connecting: Redis may be down at startup;
    /// pushes fail (and are retried) until it is up.
    pub fn new(target: &Target, prefix: &str) -> Result<RedisSink, String> {
        Ok(RedisSink {
            conn: target.shared()?,
            prefix: prefix.to_owned(),
            gate: None,
        })
    }

    /// Asks the replicas after each push (`SUBTOCALL_REDIS_WAIT_REPLICAS`).
    pub fn with_wait(mut self, wait: &crate::config::WaitConfig, metrics: Arc<Metrics>) -> Self {
        self.gate = Gate::new(wait, metrics);
        self
    }

    /// The shared connection (connecting first if there is none).
    pub async fn connection(&self) -> redis::RedisResult<Conn> {
        self.conn.get().await
    }

    /// WAIT after writes, when replicas are wanted.
    pub fn gate(&self) -> Option<&Arc<Gate>> {
        self.gate.as_ref()
    }

    /// The list (or stream) an event for `procedure` goes to.
    pub fn key(&self, procedure: &str) -> String {
        format!("{}{procedure}", self.prefix)
    }
}

impl<T> Sink<T> for RedisSink {
    fn prepare(&self, event: &SharedEvent, _policy: Option<&Policy>) -> Outgoing {
        Outgoing::Envelope(event.envelope_json())
    }

    fn dispatch(&self) -> Dispatch {
        // One pipeline at a time keeps each list in order.
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
        let mut pipe = redis::pipe();
        // MULTI/EXEC: Redis applies the whole batch or none of it, so a
        // connection lost mid-batch cannot leave half of it pushed and the
        // retry cannot duplicate that half. (A batch whose EXEC ran but
        // whose reply was lost is still pushed twice: at-least-once.)
        // Per-command errors such as WRONGTYPE still come back one by one.
        pipe.atomic().ignore_errors();
        for job in jobs {
            let event = &job.item;
            // Built once at accept time (`prepare`); an event accepted
            // otherwise still gets its envelope, never an empty push.
            let envelope = match &event.outgoing {
                Outgoing::Envelope(bytes) => Cow::Borrowed(bytes.as_slice()),
                _ => Cow::Owned(event.envelope_json()),
            };
            pipe.cmd("RPUSH")
                .arg(self.key(&event.procedure))
                .arg(envelope.as_ref());
        }
        let conn = self.conn.clone();
        let gate = self.gate.clone();
        let writes = jobs.len() as u64;
        Started::Pending(Box::pin(async move {
            let pushed = match conn.get().await {
                Ok(mut conn) => {
                    let pushed = pipe
                        .query_async::<Vec<redis::RedisResult<i64>>>(&mut conn)
                        .await;
                    if let (Some(gate), Ok(_)) = (&gate, &pushed) {
                        gate.after(conn, writes);
                    }
                    pushed
                }
                Err(e) => Err(e),
            };
            match pushed {
                Err(e) => Report::All(Err(Failure::Redis(e))),
                Ok(results) if results.iter().all(Result::is_ok) => Report::All(Ok(())),
                Ok(results) => Report::Each(
                    results
                        .into_iter()
                        .map(|r| r.map(drop).map_err(Failure::Redis))
                        .collect(),
                ),
            }
        }))
    }
}

/// Pushes dead-letter records to `key` until the channel closes. A record
/// that cannot be stored was already logged; it is counted and dropped.
pub async fn store_dead_letters(
    sink: RedisSink,
    key: String,
    mut records: mpsc::Receiver<Vec<u8>>,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::new();
    while records.recv_many(&mut batch, 256).await > 0 {
        let n = batch.len() as u64;
        let mut cmd = redis::cmd("RPUSH");
        cmd.arg(&key);
        for record in batch.drain(..) {
            cmd.arg(record);
        }
        let stored = match sink.connection().await {
            Ok(mut conn) => {
                let stored = cmd.query_async::<i64>(&mut conn).await;
                if let (Some(gate), Ok(_)) = (&sink.gate, &stored) {
                    gate.after(conn, n);
                }
                stored
            }
            Err(e) => Err(e),
        };
        match stored {
            Ok(_) => {
                metrics.dead_letters_stored.inc_by(n);
            }
            Err(e) => {
                metrics.dead_letter_store_errors.inc_by(n);
                tracing::error!(key, error = %e, records = n, "could not store dead letters in Redis (they were logged)");
            }
        }
    }
}
