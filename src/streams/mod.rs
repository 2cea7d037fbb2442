//! The Redis queue (`SUBTOCALL_QUEUE=redis`): accepted events wait in Redis
//! Streams shared by every instance with the same queue name, so that an
//! instance's crash or upgrade loses nothing and two instances deliver each
//! event once.
//!
//! - [`admit`]: every instance offers every EVENT; one Lua script per batch
//!   checks the publication's claim key and appends to the procedure's
//!   stream only if nobody admitted it yet (the claim and the append are one
//!   server-side step, so a crash cannot leave one without the other), then
//!   reads for this instance the new entries the core granted room for.
//! - [`core`]: what one instance reads, holds, leases, keeps alive, claims,
//!   acknowledges, dead-letters and releases, as a sans-IO state machine
//!   with fencing by the instance's own clock (a model test drives it
//!   through pauses, lost replies, crashes and restarts).
//! - [`carrier`]: the IO half that takes the core's commands to Redis:
//!   non-blocking reads (most new entries come with the admission that
//!   appended them), takeovers, and scripts that check the owner; a reader
//!   connection and one multiplexed connection per Redis node.
//! - [`entry`]: an entry's binary layout; [`resp`]: the reader's own RESP2
//!   connection; [`dead_letters`]: `subtocall dead-letters list|redrive`.
//!
//! Every key of one procedure shares a hash slot (`{ns:procedure}`), so the
//! scripts work on a Redis Cluster and procedures spread over its masters.

pub mod admit;
pub mod carrier;
pub mod core;
pub mod dead_letters;
pub mod entry;
pub mod groups;
pub mod mux;
pub mod replicas;
pub mod resp;
pub mod retain;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult, Value};
use tokio::sync::Mutex;

/// Deadline of one Redis command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The queue's key names, for one queue name (`SUBTOCALL_QUEUE_NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    name: String,
}

impl Keys {
    pub fn new(name: &str) -> Keys {
        Keys {
            name: name.to_owned(),
        }
    }

    /// The consumer group every instance reads in.
    pub fn group(&self) -> &str {
        &self.name
    }

    /// The stream of events waiting for `unit`: a procedure (its events
    /// without an ordering key, or every event when there is no ordering),
    /// or one of its partitions ([`lane`]), `{ns:P}:stream:K`. All share
    /// the procedure's hash tag.
    pub fn stream(&self, unit: &str) -> String {
        match split_lane(unit) {
            (procedure, None) => format!("{{{}:{procedure}}}:stream", self.name),
            (procedure, Some(k)) => format!("{{{}:{procedure}}}:stream:{k}", self.name),
        }
    }

    /// The lease on partition `k` of `procedure`: who delivers it now.
    pub fn lease(&self, procedure: &str, k: u16) -> String {
        format!("{{{}:{procedure}}}:lease:{k}", self.name)
    }

    /// The dead-letter stream of `unit`'s procedure (one per procedure,
    /// whatever the partition).
    pub fn dead(&self, unit: &str) -> String {
        format!("{{{}:{}}}:dead", self.name, split_lane(unit).0)
    }

    /// The claim key of one publication for `procedure`.
    pub fn seen(&self, procedure: &str, publication: u64) -> String {
        format!("{{{}:{procedure}}}:seen:{publication}", self.name)
    }

    /// The instances reading the queue, scored by when each was last seen
    /// (per-key ordering shares the partitions among them; `/status` lists
    /// them).
    pub fn instances(&self) -> String {
        format!("{}:instances", self.name)
    }

    /// How many instances departed (went silent or left) so far, in the
    /// instances' hash slot: when it moves, the others look for what the
    /// departed held.
    pub fn departures(&self) -> String {
        format!("{{{}:instances}}:departures", self.name)
    }

    /// The groups kept for the instances (`streams::groups`): a hash by
    /// procedure.
    pub fn groups(&self) -> String {
        format!("{}:groups", self.name)
    }

    /// A topic's retained stream (`SUBTOCALL_RETENTION`): one per topic,
    /// whatever its groups.
    pub fn retained(&self, topic: &str) -> String {
        format!("{{{}:topic:{topic}}}:retained", self.name)
    }

    /// Groups that were given their topic's retained events
    /// (`SUBTOCALL_NEW_GROUP_START=retained`), a hash by procedure.
    pub fn started(&self) -> String {
        format!("{}:groups:started", self.name)
    }

    /// The set of every procedure that has a stream.
    pub fn procedures(&self) -> String {
        format!("{}:procedures", self.name)
    }

    /// The stream of a unit.
    pub fn stream_of(&self, unit: &core::Unit) -> String {
        match unit.partition {
            None => format!("{{{}:{}}}:stream", self.name, unit.procedure),
            Some(k) => format!("{{{}:{}}}:stream:{k}", self.name, unit.procedure),
        }
    }

    /// The lease of a partition unit (`None` for a plain stream).
    pub fn lease_of(&self, unit: &core::Unit) -> Option<String> {
        unit.partition.map(|k| self.lease(&unit.procedure, k))
    }
}

/// What a command-line tool of the queue starts with: a connection to its
/// Redis, its keys, and the partitions per procedure (with ordering).
pub(crate) async fn connect_tool(
    config: &crate::config::Config,
) -> Result<(Conn, Keys, Option<u16>), String> {
    let target = Target::from_config(&config.redis, true)?;
    let conn = target
        .shared()?
        .get()
        .await
        .map_err(|e| format!("cannot reach Redis: {e}"))?;
    let keys = Keys::new(&config.queue.name);
    let partitions = config.orders_any().then_some(config.queue.partitions);
    Ok((conn, keys, partitions))
}

/// A stream entry as `XRANGE` gives it: its id, and its fields (names as
/// text, values as bytes).
pub(crate) type RangeEntry = (String, Vec<(String, Vec<u8>)>);

/// The entries of an `XRANGE` reply, in order.
pub(crate) fn xrange_entries(reply: &Value) -> Vec<RangeEntry> {
    let Value::Array(entries) = reply else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| {
            let Value::Array(pair) = entry else {
                return None;
            };
            let id = pair.first().and_then(text)?;
            let Some(Value::Array(raw)) = pair.get(1) else {
                return None;
            };
            let fields = raw
                .chunks(2)
                .filter_map(|kv| match kv {
                    [k, Value::BulkString(v)] => Some((text(k)?, v.clone())),
                    _ => None,
                })
                .collect();
            Some((id, fields))
        })
        .collect()
}

/// A procedure's partition `k` as a stream unit: `procedure#k`. `#` is not
/// allowed in WAMP URIs, so the name is unambiguous.
pub fn lane(procedure: &str, k: u16) -> String {
    format!("{procedure}#{k}")
}

/// A stream unit's procedure and partition.
pub fn split_lane(unit: &str) -> (&str, Option<&str>) {
    match unit.rsplit_once('#') {
        Some((procedure, k)) if !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()) => {
            (procedure, Some(k))
        }
        _ => (unit, None),
    }
}

/// Where the Redis is: one server, a seed node of a cluster, or a master
/// found through Redis Sentinel.
#[derive(Clone)]
pub struct Target {
    url: String,
    cluster: bool,
    /// With Sentinel: who says where the master is now.
    sentinel: Option<Arc<Locator>>,
    /// The same, for the readers' own connections (with Sentinel: the
    /// login, at whatever address the sentinels name).
    endpoint: resp::Endpoint,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("Target")
            .field("cluster", &self.cluster)
            .field("sentinel", &self.sentinel.is_some())
            .finish_non_exhaustive()
    }
}

impl Target {
    pub fn new(url: &str, cluster: bool) -> Result<Target, String> {
        // Checks the URL now rather than at the first use.
        redis::Client::open(url).map_err(|e| e.to_string())?;
        Ok(Target {
            url: url.to_owned(),
            cluster,
            sentinel: None,
            endpoint: resp::Endpoint::from_url(url).map_err(|e| e.to_string())?,
        })
    }

    /// The Redis the configuration names: `REDIS_URL`, a cluster when
    /// `cluster` (and `SUBTOCALL_REDIS_CLUSTER`), or with
    /// `SUBTOCALL_REDIS_SENTINELS` the master the sentinels name (the URL
    /// then gives only the login and database).
    pub fn from_config(
        redis: &crate::config::RedisConfig,
        cluster: bool,
    ) -> Result<Target, String> {
        let mut target = Target::new(redis.url.expose(), cluster && redis.cluster)?;
        if let Some(sentinel) = &redis.sentinel {
            target.sentinel = Some(Arc::new(Locator::new(sentinel, redis.url.expose())?));
        }
        Ok(target)
    }

    /// Where a reader connects: the server, a cluster's seed (for its
    /// login), or the master the sentinels name now.
    pub async fn endpoint(&self) -> RedisResult<resp::Endpoint> {
        match &self.sentinel {
            None => Ok(self.endpoint.clone()),
            Some(locator) => {
                let client = locator.master().await?;
                match client.get_connection_info().addr() {
                    redis::ConnectionAddr::Tcp(host, port) => Ok(self.endpoint.at(host, *port)),
                    other => Err(redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "the sentinels name a master the Redis queue cannot read from",
                        format!("{other:?} (TLS is not supported)"),
                    ))),
                }
            }
        }
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// A handle on a shared, reconnecting connection for ordinary commands;
    /// it connects on first use, so Redis may be down at startup.
    pub fn shared(&self) -> Result<Shared, String> {
        let inner = if let Some(locator) = &self.sentinel {
            SharedInner::Located {
                locator: locator.clone(),
                login: self.endpoint.clone(),
                slot: Arc::new(Mutex::new(None)),
            }
        } else if self.cluster {
            SharedInner::Cluster {
                client: Box::new(self.cluster_client(COMMAND_TIMEOUT)?),
                conn: Arc::new(Mutex::new(None)),
            }
        } else {
            SharedInner::Single(mux::Mux::new(self.endpoint.clone(), COMMAND_TIMEOUT))
        };
        Ok(Shared { inner })
    }

    fn cluster_client(&self, response_timeout: Duration) -> Result<ClusterClient, String> {
        ClusterClient::builder(vec![self.url.as_str()])
            .connection_timeout(COMMAND_TIMEOUT)
            .response_timeout(response_timeout)
            .retries(2)
            .build()
            .map_err(|e| e.to_string())
    }
}

/// Asks the sentinels where the master is (`SENTINEL
/// get-master-addr-by-name`, then `ROLE` on the address, by redis-rs).
pub struct Locator {
    client: Mutex<SentinelClient>,
    master: String,
}

impl Locator {
    /// `url` gives the master's login and database.
    fn new(config: &crate::config::SentinelConfig, url: &str) -> Result<Locator, String> {
        let info = url.into_connection_info().map_err(|e| e.to_string())?;
        let login = info.redis_settings();
        let sentinels = config
            .sentinels
            .iter()
            .map(|(host, port)| redis::ConnectionAddr::Tcp(host.clone(), *port));
        let mut builder =
            SentinelClientBuilder::new(sentinels, &config.master, SentinelServerType::Master)
                .map_err(|e| e.to_string())?
                .set_client_to_redis_db(login.db());
        if let Some(user) = login.username() {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = login.password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if let Some(password) = &config.password {
            builder = builder.set_client_to_sentinel_password(password.expose());
        }
        Ok(Locator {
            client: Mutex::new(builder.build().map_err(|e| e.to_string())?),
            master: config.master.clone(),
        })
    }

    /// A client for the master the sentinels name now. Not finding one
    /// (no sentinel answers, or the one they name is down or no master:
    /// a failover under way) is an IO error, tried again like any other.
    async fn master(&self) -> RedisResult<redis::Client> {
        let mut client = self.client.lock().await;
        let found = tokio::time::timeout(COMMAND_TIMEOUT, client.async_get_client()).await;
        found
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "no answer in time",
                )))
            })
            .map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "the sentinels name no master that answers (a failover under way?)",
                    format!("{}: {e}", self.master),
                ))
            })
    }
}

/// A cheap-clone handle on the shared connection.
#[derive(Clone)]
pub struct Shared {
    inner: SharedInner,
}

#[derive(Clone)]
enum SharedInner {
    Single(mux::Mux),
    Cluster {
        client: Box<ClusterClient>,
        conn: Arc<Mutex<Option<ClusterConnection>>>,
    },
    /// With Sentinel: a connection to the master the sentinels named, until
    /// it fails or turns out to be a replica; then asked again.
    Located {
        locator: Arc<Locator>,
        /// The login and database, for whichever master it is.
        login: resp::Endpoint,
        slot: Arc<Mutex<Option<LocatedSlot>>>,
    },
}

/// A connection to a located master: its tag, the connection, the master's
/// address.
type LocatedSlot = (u64, mux::Mux, Arc<str>);

/// How many connections to a located master were made (each one's tag).
static LOCATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Shared {
    /// The connection, connecting first if there is none yet.
    pub async fn get(&self) -> RedisResult<Conn> {
        match &self.inner {
            SharedInner::Single(mux) => Ok(Conn::Single(mux.clone())),
            SharedInner::Cluster { client, conn } => {
                let mut slot = conn.lock().await;
                if let Some(c) = slot.as_ref() {
                    return Ok(Conn::Cluster(c.clone()));
                }
                let c = client.get_async_connection().await?;
                *slot = Some(c.clone());
                Ok(Conn::Cluster(c))
            }
            SharedInner::Located {
                locator,
                login,
                slot,
            } => {
                let mut held = slot.lock().await;
                if let Some((tag, c, server)) = held.as_ref() {
                    return Ok(Conn::Located(Located {
                        conn: c.clone(),
                        tag: *tag,
                        server: server.clone(),
                        slot: slot.clone(),
                    }));
                }
                let client = locator.master().await?;
                let (c, server) = match client.get_connection_info().addr() {
                    redis::ConnectionAddr::Tcp(host, port) => {
                        let c = mux::Mux::new(login.at(host, *port), COMMAND_TIMEOUT);
                        c.connect().await?;
                        tracing::info!(master = %locator.master, %host, port, "connected to the master the sentinels name");
                        (c, Arc::<str>::from(format!("{host}:{port}")))
                    }
                    other => {
                        return Err(redis::RedisError::from((
                            redis::ErrorKind::InvalidClientConfig,
                            "the sentinels name a master the Redis queue cannot reach",
                            format!("{other:?} (TLS is not supported)"),
                        )));
                    }
                };
                let tag = LOCATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                *held = Some((tag, c.clone(), server.clone()));
                Ok(Conn::Located(Located {
                    conn: c,
                    tag,
                    server,
                    slot: slot.clone(),
                }))
            }
        }
    }
}

/// A connection to a master found through the sentinels: an error that
/// says it is gone or no master any more (a failover) drops it, so that the
/// next use asks the sentinels again.
#[derive(Clone)]
pub struct Located {
    conn: mux::Mux,
    tag: u64,
    /// The master's address, as the sentinels named it.
    server: Arc<str>,
    slot: Arc<Mutex<Option<LocatedSlot>>>,
}

impl Located {
    async fn forget_if<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &result
            && (e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout()
                || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING")))
        {
            let mut held = self.slot.lock().await;
            if held.as_ref().is_some_and(|(tag, _, _)| *tag == self.tag) {
                *held = None;
            }
        }
        result
    }
}

/// One connection of any kind.
#[derive(Clone)]
pub enum Conn {
    Single(mux::Mux),
    Cluster(ClusterConnection),
    Located(Located),
}

impl Conn {
    /// Which connection to a Sentinel-located master this is: another
    /// number, another connection (perhaps another master). `None` for the
    /// kinds that reconnect by themselves.
    pub fn epoch(&self) -> Option<u64> {
        match self {
            Conn::Located(c) => Some(c.tag),
            Conn::Single(_) | Conn::Cluster(_) => None,
        }
    }

    /// Whether `other` certainly talks to the same server: two connections
    /// to the one address of `REDIS_URL`, or to the master the sentinels
    /// named at the same address. Never on a cluster.
    pub fn same_server(&self, other: &Conn) -> bool {
        match (self, other) {
            (Conn::Single(_), Conn::Single(_)) => true,
            (Conn::Located(a), Conn::Located(b)) => a.server == b.server,
            _ => false,
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Located(c) => Box::pin(async move {
                let result = c.conn.req_packed_command(cmd).await;
                c.forget_if(result).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Located(c) => Box::pin(async move {
                let result = c.conn.req_packed_commands(pipeline, offset, count).await;
                c.forget_if(result).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Located(c) => c.conn.get_db(),
        }
    }
}

/// A stream entry id `<ms>-<seq>` as its two numbers; the first is when
/// the entry was added, in milliseconds since the Unix epoch.
pub fn entry_id_numbers(id: &str) -> Option<(u64, u64)> {
    // By hand (`resp::digits`): this runs twice per event delivered.
    let (ms, seq) = id.split_once('-')?;
    Some((resp::digits(ms.as_bytes())?, resp::digits(seq.as_bytes())?))
}

/// Text of a Redis bulk or simple string value.
pub(crate) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_procedure_shares_one_hash_tag() {
        let k = Keys::new("subtocall");
        let tag = "{subtocall:com.example.SUB_a}";
        assert_eq!(k.stream("com.example.SUB_a"), format!("{tag}:stream"));
        assert_eq!(k.dead("com.example.SUB_a"), format!("{tag}:dead"));
        assert_eq!(k.seen("com.example.SUB_a", 7), format!("{tag}:seen:7"));
        assert_eq!(k.group(), "subtocall");
        assert_eq!(k.procedures(), "subtocall:procedures");
        // A partition's stream and lease share the procedure's tag; its dead
        // letters go to the procedure's one dead-letter stream.
        let unit = lane("com.example.SUB_a", 3);
        assert_eq!(k.stream(&unit), format!("{tag}:stream:3"));
        assert_eq!(k.dead(&unit), format!("{tag}:dead"));
        assert_eq!(k.lease("com.example.SUB_a", 3), format!("{tag}:lease:3"));
        assert_eq!(split_lane(&unit), ("com.example.SUB_a", Some("3")));
        assert_eq!(split_lane("a#b"), ("a#b", None));
    }

    #[test]
    fn entry_ids_tell_when_they_were_added() {
        assert_eq!(
            entry_id_numbers("1700000000123-4"),
            Some((1_700_000_000_123, 4))
        );
        assert_eq!(
            entry_id_numbers("5"),
            None,
            "Redis always writes both parts"
        );
        assert_eq!(entry_id_numbers("x-1"), None);
        assert_eq!(entry_id_numbers("1-"), None);
        assert_eq!(entry_id_numbers("-1"), None);
        assert_eq!(entry_id_numbers("1-+2"), None);
        assert_eq!(
            entry_id_numbers("18446744073709551615-0"),
            Some((u64::MAX, 0))
        );
        assert_eq!(entry_id_numbers("18446744073709551616-0"), None);
    }
}
