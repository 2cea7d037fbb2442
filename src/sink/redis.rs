//! Redis mode: RPUSH each event's JSON envelope onto `<prefix><procedure>`,
//! many events per round trip (a pipeline), through redis-rs's reconnecting
//! `ConnectionManager`; each batch is one MULTI/EXEC transaction. Also stores
//! dead letters when a dead-letter list is configured.

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Server error codes that mean "try again later", not "this push is wrong".
const TRANSIENT_CODES: &[&str] = &["LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN"];

/// A cheap-clone handle for pushing to Redis.
#[derive(Clone)]
pub struct RedisSink {
    conn: ConnectionManager,
    prefix: String,
}

/// How a pipelined batch went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchResult {
    /// Every envelope was pushed.
    Pushed,
    /// The pipeline ran; some commands failed. One entry per envelope, in
    /// order: `Ok`, or the error and whether it is worth retrying.
    Partial(Vec<Result<(), (String, bool)>>),
    /// Nothing is known to have been pushed (connection refused, lost,
    /// timed out): retry the whole batch.
    Failed(String),
}

impl RedisSink {
    /// Creates the sink without connecting: Redis may be down at startup;
    /// pushes fail (and are retried) until it is up.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<RedisSink, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // Our own retry loop does the backing off; the manager should
            // just try once per use.
            .set_number_of_retries(1);
        let conn =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|e| e.to_string())?;
        Ok(RedisSink {
            conn,
            prefix: prefix.to_owned(),
        })
    }

    /// The list an event for `procedure` goes to.
    pub fn key(&self, procedure: &str) -> String {
        format!("{}{procedure}", self.prefix)
    }

    /// Pushes `(procedure, envelope)` pairs in order, in one pipeline.
    pub fn push_batch(
        &self,
        items: Vec<(String, Vec<u8>)>,
    ) -> impl Future<Output = BatchResult> + Send + 'static {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        // MULTI/EXEC: Redis applies the whole batch or none of it, so a
        // connection lost mid-batch cannot leave half of it pushed and the
        // retry cannot duplicate that half. (A batch whose EXEC ran but
        // whose reply was lost is still pushed twice: at-least-once.)
        // Per-command errors such as WRONGTYPE still come back one by one.
        pipe.atomic().ignore_errors();
        for (procedure, envelope) in &items {
            pipe.cmd("RPUSH")
                .arg(self.key(procedure))
                .arg(envelope.as_slice());
        }
        async move {
            match pipe
                .query_async::<Vec<redis::RedisResult<i64>>>(&mut conn)
                .await
            {
                Err(e) => BatchResult::Failed(e.to_string()),
                Ok(results) if results.iter().all(Result::is_ok) => BatchResult::Pushed,
                Ok(results) => BatchResult::Partial(
                    results
                        .into_iter()
                        .map(|r| {
                            r.map(drop).map_err(|e| {
                                let transient =
                                    e.code().is_some_and(|c| TRANSIENT_CODES.contains(&c))
                                        || e.is_io_error()
                                        || e.is_timeout()
                                        || e.is_connection_dropped();
                                (e.to_string(), transient)
                            })
                        })
                        .collect(),
                ),
            }
        }
    }
}

/// Pushes dead-letter records to `key` until the channel closes. A record
/// that cannot be stored was already logged; it is counted and dropped.
pub async fn store_dead_letters(
    sink: RedisSink,
    key: String,
    mut records: mpsc::Receiver<Vec<u8>>,
    metrics: std::sync::Arc<Metrics>,
) {
    let mut batch = Vec::new();
    while records.recv_many(&mut batch, 256).await > 0 {
        let n = batch.len() as u64;
        let mut conn = sink.conn.clone();
        let mut cmd = redis::cmd("RPUSH");
        cmd.arg(&key);
        for record in batch.drain(..) {
            cmd.arg(record);
        }
        match cmd.query_async::<i64>(&mut conn).await {
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
