//! The sidecar: keeps a WAMP session with the router (reconnecting with
//! capped, jittered backoff), rebuilds discovery from nothing on every join,
//! turns EVENTs into deliveries, and drains on shutdown.
//!
//! One task owns all of this state and `select!`s over: the shutdown signal,
//! the link to the router (connecting, incoming messages, waiting to
//! reconnect), discovery requests, finished deliveries, and the earliest
//! timer. Delivery lives across sessions, so events queued or in flight when
//! the router goes away are retried on the next session (or, in Redis mode,
//! keep flowing while the router is away).

pub mod delivery;
mod rpc;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use self::delivery::{Delivery, Sink};
use self::rpc::{Rpc, RpcDone};
use crate::config::{self, Config};
use crate::discovery::meta;
use crate::discovery::{self, Action, Discovery, GetOutcome, Marker, Note};
use crate::forward::dedup::{DEFAULT_CAPACITY, Dedup};
use crate::forward::envelope::SharedEvent;
use crate::forward::queue::{DeliveryQueue, GiveUp, OverflowPolicy};
use crate::forward::retry::{Backoff, RetryPolicy};
use crate::metrics::Metrics;
use crate::sink::redis::{self as redis_sink, RedisSink};
use crate::wamp::auth::Credentials;
use crate::wamp::id::IdHashing;
use crate::wamp::{
    Client, ClientConfig, ConnectError, Dict, Event, Incoming, IncomingRx, PublicationId,
    RequestError, Serializer, SubscriptionId, Value,
};

/// How many incoming messages one loop turn takes before doing other work.
const INCOMING_BATCH: usize = 256;
/// After the shutdown deadline: how long GOODBYE and the last in-flight
/// answers may take.
const FINAL_GRACE: Duration = Duration::from_secs(3);

/// Why the sidecar stops with a non-zero exit code.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    /// The router refused us for good (credentials, realm, TLS, URL).
    #[error("cannot join the router: {0}")]
    Connect(ConnectError),
    #[error("giving up after {attempts} consecutive failed connection attempts; last: {last}")]
    TooManyFailures { attempts: u32, last: String },
    /// The router does not let our role use the registration meta API.
    #[error(
        "{what} was refused: {error}. The sidecar's role needs {permission} (see doc/crossbar.md)"
    )]
    MetaApi {
        what: String,
        error: String,
        permission: &'static str,
    },
    #[error("cannot start: {0}")]
    Setup(String),
}

/// Counts reported when the sidecar stops. Every accepted event is either
/// forwarded or dead-lettered by then: `accepted() == forwarded + dead_lettered`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// EVENTs received on forwarding subscriptions.
    pub received: u64,
    /// Skipped: the same publication was already accepted.
    pub duplicates: u64,
    /// Skipped: no procedure to route them to.
    pub unroutable: u64,
    pub forwarded: u64,
    pub dead_lettered: u64,
}

impl Summary {
    fn from_metrics(m: &Metrics) -> Summary {
        Summary {
            received: m.events_received.get(),
            duplicates: m.events_duplicate.get(),
            unroutable: m.unroutable(false).get() + m.unroutable(true).get(),
            forwarded: m.events_forwarded.get(),
            dead_lettered: [
                GiveUp::Overflow,
                GiveUp::Rejected,
                GiveUp::Exhausted,
                GiveUp::Shutdown,
            ]
            .into_iter()
            .map(|g| m.dead_lettered(g).get())
            .sum(),
        }
    }

    /// Events taken on for delivery.
    pub fn accepted(&self) -> u64 {
        self.received - self.duplicates - self.unroutable
    }
}

/// Runs the sidecar until `shutdown` is cancelled (then drains) or a fatal
/// error. Returns how many events went where.
pub async fn run(
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<Summary, Fatal> {
    let mut app = App::new(&config, metrics.clone())?;
    let result = app.run(&shutdown).await;
    app.finish().await;
    let summary = Summary::from_metrics(&metrics);
    tracing::info!(
        received = summary.received,
        duplicates = summary.duplicates,
        unroutable = summary.unroutable,
        accepted = summary.accepted(),
        forwarded = summary.forwarded,
        dead_lettered = summary.dead_lettered,
        "subtocall stopped"
    );
    result.map(|()| summary)
}

/// The router link's state.
enum Link {
    Waiting {
        until: Instant,
    },
    Connecting(BoxFuture<'static, Result<(Client, IncomingRx), ConnectError>>),
    Up(Box<Up>),
    /// Draining: no new session.
    Stopped,
}

struct Up {
    client: Client,
    incoming: IncomingRx,
    /// Our subscriptions to the registration meta topics.
    meta: HashMap<SubscriptionId, &'static str, IdHashing>,
    /// Meta subscriptions not yet confirmed; the list call waits for all.
    meta_pending: usize,
    /// `Client::dropped_incoming` already counted in the metrics.
    dropped_seen: u64,
}

enum LinkEvent {
    RetryDue,
    Connected(Result<(Client, IncomingRx), ConnectError>),
    Incoming(Option<Incoming>),
}

struct App {
    client_config: ClientConfig,
    reconnect: Backoff,
    max_connect_failures: Option<u32>,
    shutdown_timeout: Duration,
    discovery: Discovery,
    dedup: Dedup,
    delivery: Delivery,
    link: Link,
    rpcs: FuturesUnordered<Rpc>,
    metrics: Arc<Metrics>,
    connect_failures: u32,
    sessions: u64,
    drain_deadline: Option<Instant>,
    dead_letter_task: Option<JoinHandle<()>>,
}

impl App {
    fn new(config: &Config, metrics: Arc<Metrics>) -> Result<App, Fatal> {
        let marker = Marker::new(config.discovery.marker.clone())
            .map_err(|e| Fatal::Setup(e.to_string()))?;
        let discovery = Discovery::new(
            marker,
            config.discovery.filter.clone(),
            config.discovery.grace_period,
        );
        let f = &config.forward;
        let retry = RetryPolicy {
            max_attempts: f.retry.max_attempts,
            max_age: f.retry.max_age,
            backoff: Backoff {
                initial: f.retry.initial_backoff,
                max: f.retry.max_backoff,
            },
        };
        let overflow = match f.overflow {
            config::Overflow::DropNewest => OverflowPolicy::DropNewest,
            config::Overflow::DropOldest => OverflowPolicy::DropOldest,
        };
        let queue = DeliveryQueue::new(f.queue_capacity, f.max_in_flight, overflow, retry);

        let redis_url = config.redis.url.expose();
        let redis_timeout = Duration::from_secs(5);
        let needs_redis = f.mode == config::Mode::Redis || config.redis.dead_letter_key.is_some();
        let redis = if needs_redis {
            Some(
                RedisSink::new(redis_url, &config.redis.prefix, redis_timeout)
                    .map_err(|e| Fatal::Setup(format!("Redis: {e}")))?,
            )
        } else {
            None
        };
        let sink = match (&f.mode, &redis) {
            (config::Mode::Redis, Some(redis)) => Sink::Redis(redis.clone()),
            _ => Sink::Wamp {
                call_timeout: f.call_timeout,
                details_kwarg: f.details_kwarg.as_deref().map(Arc::from),
            },
        };
        let (dead_letter_tx, dead_letter_task) = match (&config.redis.dead_letter_key, redis) {
            (Some(key), Some(redis)) => {
                let (tx, rx) = mpsc::channel(4096);
                let task = tokio::spawn(redis_sink::store_dead_letters(
                    redis,
                    key.clone(),
                    rx,
                    metrics.clone(),
                ));
                (Some(tx), Some(task))
            }
            _ => (None, None),
        };
        let delivery = Delivery::new(queue, sink, dead_letter_tx, metrics.clone());

        Ok(App {
            client_config: client_config(config),
            reconnect: Backoff {
                initial: config.reconnect.initial_backoff,
                max: config.reconnect.max_backoff,
            },
            max_connect_failures: config.reconnect.max_failures.map(|n| n.get()),
            shutdown_timeout: config.shutdown_timeout,
            discovery,
            dedup: Dedup::new(DEFAULT_CAPACITY),
            delivery,
            link: Link::Stopped,
            rpcs: FuturesUnordered::new(),
            metrics,
            connect_failures: 0,
            sessions: 0,
            drain_deadline: None,
            dead_letter_task,
        })
    }

    async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), Fatal> {
        self.link = Link::Connecting(self.connect());
        loop {
            let now = Instant::now();
            self.pump(now);
            if let Some(deadline) = self.drain_deadline {
                if self.delivery.is_idle() {
                    tracing::info!("drained: every accepted event is delivered or dead-lettered");
                    return Ok(());
                }
                if now >= deadline {
                    tracing::warn!(
                        waiting = self.delivery.waiting(),
                        in_flight = self.delivery.in_flight(),
                        "shutdown deadline reached before everything was delivered"
                    );
                    return Ok(());
                }
            }
            let wake = self.next_wake();
            // Every branch is cancel-safe: the link future is polled by
            // reference and stays in `self.link`; `FuturesUnordered::next` and
            // `Receiver::recv` lose nothing when another branch wins; the
            // timer is recomputed on every turn.
            tokio::select! {
                _ = shutdown.cancelled(), if self.drain_deadline.is_none() => self.begin_drain(now),
                event = next_link_event(&mut self.link) => self.on_link_event(event)?,
                Some(done) = self.rpcs.next(), if !self.rpcs.is_empty() => self.on_rpc(done)?,
                Some(completion) = self.delivery.next_completion(), if self.delivery.has_in_flight() => {
                    self.delivery.complete(completion, Instant::now().into_std());
                }
                _ = sleep_until(wake.unwrap_or(now + Duration::from_secs(3600))), if wake.is_some() => {}
            }
        }
    }

    fn connect(&self) -> BoxFuture<'static, Result<(Client, IncomingRx), ConnectError>> {
        Box::pin(Client::connect(self.client_config.clone()))
    }

    /// Does everything that needs no waiting: discovery actions, starting
    /// deliveries, gauges.
    fn pump(&mut self, now: Instant) {
        let now_std = now.into_std();
        if let Link::Up(up) = &mut self.link {
            let dropped = up.client.dropped_incoming();
            if dropped > up.dropped_seen {
                self.metrics
                    .events_dropped_consumer_behind
                    .inc_by(dropped - up.dropped_seen);
                up.dropped_seen = dropped;
            }
            if self.drain_deadline.is_none() {
                for output in self.discovery.poll(now_std) {
                    match output {
                        discovery::Output::Action(action) => {
                            self.rpcs.push(execute(&up.client, action))
                        }
                        discovery::Output::Note(note) => log_note(&note),
                    }
                }
            }
        }
        let client = match &self.link {
            Link::Up(up) => Some(&up.client),
            _ => None,
        };
        self.delivery.start(client, now_std);
        let m = &self.metrics;
        m.registrations_tracked
            .set(self.discovery.tracked_registrations() as i64);
        m.subscriptions_active
            .set(self.discovery.active_subscriptions() as i64);
        let ready = matches!(&self.link, Link::Up(up) if up.meta_pending == 0)
            && self.discovery.is_synced()
            && self.drain_deadline.is_none();
        m.ready.set(i64::from(ready));
    }

    fn next_wake(&self) -> Option<Instant> {
        let mut wake = self.delivery.next_deadline().map(Instant::from_std);
        if matches!(self.link, Link::Up(_)) && self.drain_deadline.is_none() {
            wake = earliest(wake, self.discovery.next_deadline().map(Instant::from_std));
        }
        earliest(wake, self.drain_deadline)
    }

    fn on_link_event(&mut self, event: LinkEvent) -> Result<(), Fatal> {
        match event {
            LinkEvent::RetryDue => self.link = Link::Connecting(self.connect()),
            LinkEvent::Connected(Ok((client, incoming))) => self.on_joined(client, incoming),
            LinkEvent::Connected(Err(e)) => self.on_connect_failed(e)?,
            LinkEvent::Incoming(Some(first)) => {
                self.on_incoming(first);
                for _ in 1..INCOMING_BATCH {
                    let Link::Up(up) = &mut self.link else { break };
                    match up.incoming.try_recv() {
                        Ok(next) => self.on_incoming(next),
                        Err(_) => break,
                    }
                }
            }
            LinkEvent::Incoming(None) => self.on_session_end(),
        }
        Ok(())
    }

    fn on_joined(&mut self, client: Client, incoming: IncomingRx) {
        self.connect_failures = 0;
        self.sessions += 1;
        if self.sessions > 1 {
            self.metrics.router_reconnects.inc();
        }
        self.metrics.router_connected.set(1);
        let info = client.session();
        tracing::info!(
            session = %info.session,
            realm = %info.realm,
            authid = info.authid.as_deref().unwrap_or(""),
            authrole = info.authrole.as_deref().unwrap_or(""),
            serializer = %client.serializer(),
            "joined the router; discovering SUB_ registrations"
        );
        // State is rebuilt from nothing on every join; answers to requests of
        // the previous session are dropped with their futures.
        self.discovery.reset();
        self.rpcs = FuturesUnordered::new();
        for topic in meta::META_TOPICS {
            self.rpcs.push(rpc::meta_subscribe(&client, topic));
        }
        self.link = Link::Up(Box::new(Up {
            client,
            incoming,
            meta: HashMap::default(),
            meta_pending: meta::META_TOPICS.len(),
            dropped_seen: 0,
        }));
    }

    fn on_connect_failed(&mut self, error: ConnectError) -> Result<(), Fatal> {
        self.metrics.router_connect_failures.inc();
        if error.is_terminal() {
            return Err(Fatal::Connect(error));
        }
        self.connect_failures += 1;
        if let Some(max) = self.max_connect_failures
            && self.connect_failures >= max
        {
            return Err(Fatal::TooManyFailures {
                attempts: self.connect_failures,
                last: error.to_string(),
            });
        }
        let delay = self.reconnect.delay(self.connect_failures, rand::random());
        tracing::warn!(
            attempt = self.connect_failures,
            error = %error,
            retry_in = ?delay,
            "cannot connect to the router"
        );
        self.link = Link::Waiting {
            until: Instant::now() + delay,
        };
        Ok(())
    }

    fn on_session_end(&mut self) {
        let reason = match &self.link {
            Link::Up(up) => up.client.close_reason().map(|r| r.to_string()),
            _ => None,
        };
        self.metrics.router_connected.set(0);
        self.rpcs = FuturesUnordered::new();
        if self.drain_deadline.is_some() {
            tracing::info!(
                reason = reason.as_deref().unwrap_or("unknown"),
                "router session ended while draining"
            );
            self.link = Link::Stopped;
            return;
        }
        let delay = self.reconnect.delay(1, rand::random());
        tracing::warn!(
            reason = reason.as_deref().unwrap_or("unknown"),
            retry_in = ?delay,
            queued = self.delivery.waiting(),
            in_flight = self.delivery.in_flight(),
            "router session ended; reconnecting"
        );
        self.link = Link::Waiting {
            until: Instant::now() + delay,
        };
    }

    fn on_incoming(&mut self, incoming: Incoming) {
        let Link::Up(up) = &mut self.link else { return };
        let now = Instant::now().into_std();
        match incoming {
            Incoming::RawEvent(event) => {
                if let Some(&topic) = up.meta.get(&event.subscription) {
                    match event.payload.decode() {
                        Ok(payload) => self.on_meta_event(topic, &payload.args, now),
                        Err(e) => {
                            tracing::warn!(topic, error = %e, "ignoring malformed meta event")
                        }
                    }
                } else if let Some((procedure, topic)) =
                    self.accept(event.subscription, event.publication, &event.details)
                {
                    let shared = SharedEvent::from_raw(procedure, topic, event, SystemTime::now());
                    self.delivery.accept(shared, Instant::now().into_std());
                }
            }
            Incoming::Event(event) => {
                if let Some(&topic) = up.meta.get(&event.subscription) {
                    self.on_meta_event(topic, &event.payload.args, now);
                } else {
                    self.on_event(event);
                }
            }
            Incoming::Revoked { kind, details } => {
                let id = details.get_u64("subscription").map(SubscriptionId);
                match id {
                    Some(id) if up.meta.contains_key(&id) => {
                        // Without meta events discovery would go stale:
                        // start over with a new session.
                        tracing::warn!("router revoked a meta subscription; rejoining");
                        rejoin(&up.client);
                    }
                    Some(id) => self.discovery.on_unsubscribed(id),
                    None => tracing::warn!(kind, "router revoked a {kind} we do not hold"),
                }
            }
            Incoming::Invocation(inv) => {
                tracing::warn!(registration = %inv.registration, "unexpected INVOCATION: subtocall registers nothing");
            }
            Incoming::Interrupt { .. } => {}
        }
    }

    fn on_meta_event(&mut self, topic: &'static str, args: &[Value], now: std::time::Instant) {
        match meta::parse_meta_event(topic, args) {
            Ok(meta_event) => self.discovery.on_meta_event(meta_event, now),
            Err(e) => tracing::warn!(topic, error = %e, "ignoring malformed meta event"),
        }
    }

    fn on_event(&mut self, event: Event) {
        if let Some((procedure, topic)) =
            self.accept(event.subscription, event.publication, &event.details)
        {
            let shared = SharedEvent::new(procedure, topic, event, SystemTime::now());
            self.delivery.accept(shared, Instant::now().into_std());
        }
    }

    /// Routes an EVENT of a forwarding subscription and de-duplicates it:
    /// the procedure and concrete topic when it is to be forwarded.
    fn accept(
        &mut self,
        subscription: SubscriptionId,
        publication: PublicationId,
        details: &Dict,
    ) -> Option<(String, String)> {
        self.metrics.events_received.inc();
        let route = match self.discovery.route(subscription, details.get_str("topic")) {
            Ok(route) => (route.procedure.into_owned(), route.topic.to_owned()),
            Err(e) => {
                let missing_topic = matches!(e, discovery::RouteError::MissingTopic { .. });
                self.metrics.unroutable(missing_topic).inc();
                tracing::debug!(error = %e, %publication, "event not routable");
                return None;
            }
        };
        // An event matching several of our subscriptions is forwarded once.
        if !self.dedup.first_time(publication) {
            self.metrics.events_duplicate.inc();
            return None;
        }
        tracing::debug!(procedure = %route.0, %publication, "event accepted");
        Some(route)
    }

    fn on_rpc(&mut self, done: RpcDone) -> Result<(), Fatal> {
        let now = Instant::now().into_std();
        let Link::Up(up) = &mut self.link else {
            return Ok(());
        };
        match done {
            RpcDone::MetaSubscribed(topic, Ok(id)) => {
                up.meta.insert(id, topic);
                up.meta_pending -= 1;
                if up.meta_pending == 0 {
                    // Listing only after every meta subscription is in place
                    // means nothing registered meanwhile can be missed.
                    self.rpcs.push(rpc::list(&up.client));
                }
            }
            RpcDone::MetaSubscribed(topic, Err(RequestError::Wamp(e))) => {
                return Err(Fatal::MetaApi {
                    what: format!("SUBSCRIBE to {topic}"),
                    error: e.to_string(),
                    permission: "'subscribe' on wamp.registration.* (e.g. a 'wamp.' prefix rule)",
                });
            }
            RpcDone::Listed(Err(RequestError::Wamp(e))) => {
                return Err(Fatal::MetaApi {
                    what: format!("CALL to {}", meta::LIST),
                    error: e.to_string(),
                    permission: "'call' on wamp.registration.* (e.g. a 'wamp.' prefix rule)",
                });
            }
            RpcDone::MetaSubscribed(_, Err(e)) | RpcDone::Listed(Err(e)) => {
                // Timeout or lost connection during the bootstrap: start over.
                tracing::warn!(error = %e, "discovery bootstrap failed; rejoining");
                rejoin(&up.client);
            }
            RpcDone::Listed(Ok(result)) => match meta::parse_list_result(&result.payload.args) {
                Ok(list) => {
                    tracing::info!(registrations = list.ids().count(), "registrations listed");
                    self.discovery.on_list_result(list.ids());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "malformed wamp.registration.list result; rejoining");
                    rejoin(&up.client);
                }
            },
            RpcDone::Got(id, result) => {
                let outcome = match result {
                    Ok(r) => match meta::parse_get_result(&r.payload.args) {
                        Ok(info) => GetOutcome::Found(info),
                        Err(e) => GetOutcome::Failed(e.to_string()),
                    },
                    Err(RequestError::Wamp(e)) if e.error == meta::NO_SUCH_REGISTRATION => {
                        GetOutcome::NoSuchRegistration
                    }
                    Err(e) => GetOutcome::Failed(e.to_string()),
                };
                self.discovery.on_get_result(id, outcome, now);
            }
            RpcDone::Subscribed(key, Ok(id)) => self.discovery.on_subscribed(&key, id),
            RpcDone::Subscribed(key, Err(e)) => {
                self.discovery.on_subscribe_failed(&key, e.to_string(), now)
            }
            RpcDone::Unsubscribed(id, Ok(())) => self.discovery.on_unsubscribed(id),
            RpcDone::Unsubscribed(id, Err(e)) => {
                self.discovery.on_unsubscribe_failed(id, e.to_string())
            }
        }
        Ok(())
    }

    fn begin_drain(&mut self, now: Instant) {
        let deadline = now + self.shutdown_timeout;
        self.drain_deadline = Some(deadline);
        self.metrics.ready.set(0);
        tracing::info!(
            waiting = self.delivery.waiting(),
            in_flight = self.delivery.in_flight(),
            deadline_in = ?self.shutdown_timeout,
            "shutdown requested: no new subscriptions, draining accepted events"
        );
        match &self.link {
            Link::Up(up) => {
                // Stop the router sending us more; events already on their
                // way are still accepted and delivered.
                for id in self.discovery.subscriptions() {
                    self.rpcs.push(rpc::unsubscribe(&up.client, id));
                }
            }
            Link::Waiting { .. } | Link::Connecting(_) => self.link = Link::Stopped,
            Link::Stopped => {}
        }
    }

    /// After the run loop: whatever could not be delivered is dead-lettered,
    /// GOODBYE is said, the last answers are collected (bounded).
    async fn finish(&mut self) {
        if self.delivery.waiting() > 0 {
            self.delivery.give_up_waiting();
        }
        let link = std::mem::replace(&mut self.link, Link::Stopped);
        let leave = async {
            if let Link::Up(up) = link {
                up.client.leave(FINAL_GRACE).await;
            }
        };
        let delivery = &mut self.delivery;
        let collect = async {
            while delivery.has_in_flight() {
                if let Some(completion) = delivery.next_completion().await {
                    delivery.complete(completion, Instant::now().into_std());
                }
            }
        };
        // GOODBYE makes in-flight calls resolve (answered, or connection lost
        // and then dead-lettered, since no more retries happen now).
        let _ = timeout(FINAL_GRACE * 2, async { tokio::join!(leave, collect) }).await;
        if self.delivery.has_in_flight() {
            tracing::error!(
                in_flight = self.delivery.in_flight(),
                "deliveries still unanswered at exit: their outcome is unknown"
            );
        }
        self.delivery.close_dead_letter_store();
        if let Some(task) = self.dead_letter_task.take() {
            let _ = timeout(FINAL_GRACE, task).await;
        }
        self.metrics.router_connected.set(0);
    }
}

async fn next_link_event(link: &mut Link) -> LinkEvent {
    match link {
        Link::Waiting { until } => {
            sleep_until(*until).await;
            LinkEvent::RetryDue
        }
        Link::Connecting(connecting) => LinkEvent::Connected(connecting.await),
        Link::Up(up) => LinkEvent::Incoming(up.incoming.recv().await),
        Link::Stopped => std::future::pending().await,
    }
}

/// Drops the session so that the link reconnects and discovery starts over.
fn rejoin(client: &Client) {
    let client = client.clone();
    tokio::spawn(async move { client.close().await });
}

fn execute(client: &Client, action: Action) -> Rpc {
    match action {
        Action::Subscribe(key) => rpc::subscribe(client, key),
        Action::Unsubscribe { subscription, .. } => rpc::unsubscribe(client, subscription),
        Action::GetRegistration(id) => rpc::get(client, id),
    }
}

fn log_note(note: &Note) {
    match note.level() {
        discovery::Level::Debug => tracing::debug!("{note}"),
        discovery::Level::Info => tracing::info!("{note}"),
        discovery::Level::Warn => tracing::warn!("{note}"),
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The WAMP client settings derived from the configuration.
pub fn client_config(config: &Config) -> ClientConfig {
    let w = &config.wamp;
    let mut c = ClientConfig::new(w.url.as_str(), &w.realm);
    c.credentials = match &w.auth {
        config::Auth::Anonymous => Credentials::Anonymous,
        config::Auth::WampCra { authid, secret } => Credentials::WampCra {
            authid: authid.clone(),
            secret: secret.expose().to_owned(),
        },
        config::Auth::Ticket { authid, ticket } => Credentials::Ticket {
            authid: authid.clone(),
            ticket: ticket.expose().to_owned(),
        },
    };
    c.serializers = match w.serializer {
        config::Serializer::MsgPack => vec![Serializer::MsgPack, Serializer::Json],
        config::Serializer::Json => vec![Serializer::Json, Serializer::MsgPack],
    };
    c.connect_timeout = w.connect_timeout;
    c.ping_interval = w.ping_interval;
    c.ping_timeout = w.ping_timeout;
    c.max_message_size = w.max_message_size;
    c.ca_file = w.ca_file.clone();
    // Events are forwarded without decoding their payload where nothing
    // needs to look inside it: a CALL with the args and kwargs as received.
    // Redis envelopes and the details kwarg need it decoded.
    c.raw_event_payloads =
        config.forward.mode == config::Mode::Wamp && config.forward.details_kwarg.is_none();
    c
}
