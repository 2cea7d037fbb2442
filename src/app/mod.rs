//! The event loop: one task owns the router connection (socket and sans-IO
//! session) and the sidecar's state, and `select!`s over the shutdown
//! signal, the link to the router (connecting, reading, waiting to
//! reconnect), the sink's pending reports, and the earliest timer. Between
//! waits it hands every session output to [`Sidecar`] in the order the
//! router sent it, lets it do what needs no waiting, and writes.
//!
//! There is no channel between the socket and the state, so nothing the
//! router sends can be dropped for lack of room: overload is the forwarding
//! core's job (its bounded queue dead-letters the overflow, counted). The
//! socket keeps being read whatever the backends do: their answers come in
//! on it. The forwarding core lives across sessions, so events waiting when
//! the router goes away are delivered on the next session (or, in Redis
//! mode, keep flowing meanwhile).

mod dead_letter_log;
mod procedure_metrics;
mod queue_stage;
mod sidecar;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use self::queue_stage::QueueStage;
use self::sidecar::PendingReport;
pub use self::sidecar::{Core, Sidecar, Token};
use crate::config::{self, Config};
use crate::discovery::Discovery;
use crate::forward::retry::{Backoff, RetryPolicy};
use crate::forward::{
    DeliveryId, Dispatch, Forwarder, GiveUp, MemoryQueue, OverflowPolicy, Settings,
};
use crate::metrics::Metrics;
use crate::sink::Sink;
use crate::sink::redis::{self as redis_sink, RedisSink};
use crate::sink::stream::StreamSink;
use crate::sink::wamp::WampSink;
use crate::status::{self, QueueProbe, RedisProbe, Status, StatusRequest, TargetProbe};
use crate::streams::admit::Admitted;
use crate::streams::admit::{self, AdmitSink};
use crate::streams::carrier::{Carrier, Fields};
use crate::streams::core::{self as queue_core, CommandId, QueueCore};
use crate::streams::{Keys, Target};
use crate::wamp::auth::Credentials;
use crate::wamp::{ClientConfig, CloseReason, ConnectError, Connection, Serializer};

/// After the drain: how long GOODBYE may take.
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

/// Counts reported when the sidecar stops. With the memory queue every
/// accepted event is either forwarded or dead-lettered by then:
/// `accepted() == forwarded + dead_lettered`. On the Redis queue an instance
/// hands what it accepts to Redis (`admitted`, or `admitted_elsewhere` when
/// another instance was first) and delivers what it reads, whoever admitted
/// it: the balance holds for the group, not for one instance.
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
    /// On the Redis queue: accepted events this instance added to a
    /// stream, and those another instance had added first.
    pub admitted: Option<(u64, u64)>,
}

impl Summary {
    fn from_metrics(m: &Metrics, redis_queue: bool) -> Summary {
        Summary {
            admitted: redis_queue
                .then(|| (m.queue_admitted.get(), m.queue_admitted_elsewhere.get())),
            received: m.events_received.get(),
            duplicates: m.events_duplicate.get(),
            unroutable: m.unroutable(false).get() + m.unroutable(true).get(),
            forwarded: m.events_forwarded.get(),
            dead_lettered: GiveUp::ALL.iter().map(|g| m.dead_lettered(*g).get()).sum(),
        }
    }

    /// Events taken on for delivery.
    pub fn accepted(&self) -> u64 {
        self.received - self.duplicates - self.unroutable
    }
}

/// Runs the sidecar until `shutdown` is cancelled (then drains) or a fatal
/// error. Returns how many events went where.
///
/// `status` brings `/status`'s requests; the loop answers them between
/// other work.
pub async fn run(
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    status: Option<mpsc::Receiver<StatusRequest>>,
) -> Result<Summary, Fatal> {
    let mut app = App::new(&config, metrics.clone())?;
    app.status_requests = status;
    let result = app.run(&shutdown).await;
    app.finish().await;
    let redis_queue = matches!(config.queue.kind, config::QueueKind::Redis);
    let summary = Summary::from_metrics(&metrics, redis_queue);
    match summary.admitted {
        None => tracing::info!(
            received = summary.received,
            duplicates = summary.duplicates,
            unroutable = summary.unroutable,
            accepted = summary.accepted(),
            forwarded = summary.forwarded,
            dead_lettered = summary.dead_lettered,
            "subtocall stopped"
        ),
        Some((admitted, elsewhere)) => tracing::info!(
            received = summary.received,
            duplicates = summary.duplicates,
            unroutable = summary.unroutable,
            accepted = summary.accepted(),
            admitted,
            admitted_elsewhere = elsewhere,
            forwarded = summary.forwarded,
            dead_lettered = summary.dead_lettered,
            "subtocall stopped"
        ),
    }
    result.map(|()| summary)
}

/// The router link's state.
enum Link {
    Waiting {
        until: Instant,
    },
    Connecting(BoxFuture<'static, Result<Box<Connection<Token>>, ConnectError>>),
    Up(Box<Connection<Token>>),
    /// Draining: no new session.
    Stopped,
}

enum LinkEvent {
    RetryDue,
    Connected(Result<Box<Connection<Token>>, ConnectError>),
    /// The connection read something or a timer of its own fired.
    Io,
}

struct App {
    client_config: ClientConfig,
    reconnect: Backoff,
    max_connect_failures: Option<u32>,
    shutdown_timeout: Duration,
    sidecar: Sidecar,
    link: Link,
    /// Reports that sink futures (Redis pushes) will bring.
    reports: FuturesUnordered<PendingReport>,
    metrics: Arc<Metrics>,
    /// Consecutive failures to reach a healthy session: failed connects and
    /// sessions that ended before discovery completed. Reset only by a
    /// session that became ready.
    connect_failures: u32,
    sessions: u64,
    drain_deadline: Option<Instant>,
    dead_letter_task: Option<JoinHandle<()>>,
    /// The Redis queue's commands in flight and wake-ups, when there is one.
    streams: Option<QueueIo>,
    /// `/status`'s requests, and what it shows that does not change.
    status_requests: Option<mpsc::Receiver<StatusRequest>>,
    shown: Shown,
    /// When the current session joined.
    joined_at: Option<(Instant, std::time::SystemTime)>,
}

/// What `/status` shows that is fixed at startup.
struct Shown {
    started: Instant,
    url: String,
    realm: String,
    settings: Vec<status::Setting>,
    delivery: &'static str,
    queue_kind: &'static str,
    capacity: usize,
    max_in_flight: usize,
    queue_name: Option<String>,
    consumer: Option<String>,
    probe: Option<RedisProbe>,
}

/// The Redis queue's IO, awaited by the loop: commands on their way to
/// Redis (the queue core's replies come back through them) and admission
/// batches (which also bring what they read).
struct QueueIo {
    commands: FuturesUnordered<queue_stage::PendingCommand>,
    admissions: FuturesUnordered<queue_stage::PendingAdmission>,
    /// What `/status` reads of the queue.
    probe: QueueProbe,
}

impl App {
    fn new(config: &Config, metrics: Arc<Metrics>) -> Result<App, Fatal> {
        let marker = config
            .discovery
            .marker()
            .map_err(|e| Fatal::Setup(e.to_string()))?;
        let discovery = Discovery::new(
            marker,
            config.discovery.filter.clone(),
            config.discovery.grace_period,
        );
        let f = &config.forward;
        let redis_timeout = Duration::from_secs(5);
        let needs_redis = f.mode == config::Mode::Redis || config.redis.dead_letter_key.is_some();
        let stream_target = config.redis.target == config::RedisTarget::Stream;
        let redis = if needs_redis {
            Some(
                RedisSink::new(
                    config.redis.url.expose(),
                    &config.redis.prefix,
                    redis_timeout,
                )
                .map_err(|e| Fatal::Setup(format!("Redis: {e}")))?,
            )
        } else {
            None
        };
        let sink: Box<dyn Sink<Token> + Send> = match (&f.mode, &redis) {
            (config::Mode::Redis, Some(redis))
                if config.redis.target == config::RedisTarget::Stream =>
            {
                let sink = StreamSink::new(
                    redis.clone(),
                    &config.redis.consumer_group,
                    config.redis.max_backlog,
                    f.overflow == config::Overflow::DropOldest,
                    metrics.clone(),
                );
                tokio::spawn(sink.clone().watch());
                Box::new(sink)
            }
            (config::Mode::Redis, Some(redis)) => Box::new(redis.clone()),
            _ => Box::new(WampSink {
                call_timeout: f.call_timeout,
                details_kwarg: f.details_kwarg.as_deref().map(Arc::from),
            }),
        };
        let settings = Settings {
            capacity: f.queue_capacity,
            overflow: match f.overflow {
                config::Overflow::DropNewest => OverflowPolicy::DropNewest,
                config::Overflow::DropOldest => OverflowPolicy::DropOldest,
            },
            max_in_flight: f.max_in_flight,
            dispatch: sink.dispatch(),
            retry: RetryPolicy {
                max_attempts: f.retry.max_attempts,
                max_age: f.retry.max_age,
                backoff: Backoff {
                    initial: f.retry.initial_backoff,
                    max: f.retry.max_backoff,
                },
            },
            batching: f.batching,
        };
        let targets = match (&f.mode, &redis) {
            (config::Mode::Redis, Some(redis)) => Some(TargetProbe {
                redis: redis.clone(),
                stream: stream_target,
                metrics: metrics.clone(),
            }),
            _ => None,
        };
        let now = std::time::Instant::now();
        let (core, sink, queue, streams) = match config.queue.kind {
            config::QueueKind::Memory => (
                Forwarder::new(MemoryQueue::new(), settings, rand::random()),
                sink,
                None,
                None,
            ),
            config::QueueKind::Redis => {
                let (admit, queue, tasks) = start_streams(config, settings, sink, &metrics, now)?;
                let admit_settings = Settings {
                    max_in_flight: admit::BATCH,
                    dispatch: Dispatch::Pipeline { max: admit::BATCH },
                    // Events wait for Redis as long as there is room for them.
                    retry: RetryPolicy {
                        max_attempts: u32::MAX,
                        max_age: Duration::MAX,
                        backoff: Backoff {
                            initial: Duration::from_millis(100),
                            max: Duration::from_secs(2),
                        },
                    },
                    ..settings
                };
                let core = Forwarder::new(MemoryQueue::new(), admit_settings, rand::random());
                let admit: Box<dyn Sink<Token> + Send> = Box::new(admit);
                (core, admit, Some(queue), Some(tasks))
            }
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
        let client_config = client_config(config);
        let sidecar = Sidecar::new(
            discovery,
            core,
            sink,
            metrics.clone(),
            dead_letter_tx,
            client_config.request_timeout,
            now,
        )
        .with_order_by(f.order_by.clone())
        .with_procedure_metrics(config.metrics_max_procedures);
        let sidecar = match queue {
            Some(queue) => sidecar
                .with_queue(queue, now)
                .with_lanes(partitions(config)),
            None => sidecar,
        };
        let queue_probe = streams.as_ref().map(|s: &QueueIo| s.probe.clone());
        let shown = Shown {
            started: Instant::now(),
            url: config.wamp.url.to_string(),
            realm: config.wamp.realm.clone(),
            settings: config.settings().to_vec(),
            delivery: match (&f.mode, stream_target) {
                (config::Mode::Wamp, _) => "wamp",
                (config::Mode::Redis, false) => "redis-list",
                (config::Mode::Redis, true) => "redis-stream",
            },
            queue_kind: match config.queue.kind {
                config::QueueKind::Memory => "memory",
                config::QueueKind::Redis => "redis",
            },
            capacity: f.queue_capacity,
            max_in_flight: f.max_in_flight,
            queue_name: queue_probe.as_ref().map(|_| config.queue.name.clone()),
            consumer: queue_probe.as_ref().map(|q| q.consumer.clone()),
            probe: (queue_probe.is_some() || targets.is_some()).then(|| RedisProbe {
                queue: queue_probe,
                targets,
            }),
        };
        Ok(App {
            client_config,
            reconnect: Backoff {
                initial: config.reconnect.initial_backoff,
                max: config.reconnect.max_backoff,
            },
            max_connect_failures: config.reconnect.max_failures.map(|n| n.get()),
            shutdown_timeout: config.shutdown_timeout,
            sidecar,
            link: Link::Stopped,
            reports: FuturesUnordered::new(),
            metrics,
            connect_failures: 0,
            sessions: 0,
            drain_deadline: None,
            dead_letter_task,
            streams,
            status_requests: None,
            shown,
            joined_at: None,
        })
    }

    async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), Fatal> {
        self.link = Link::Connecting(self.connect());
        let mut timer = Timer::new();
        loop {
            let now = Instant::now();
            self.pump(now)?;
            if let Link::Up(conn) = &mut self.link {
                conn.flush().await;
                if let Some(reason) = conn.close_reason() {
                    let reason = reason.clone();
                    self.on_session_end(reason)?;
                    continue;
                }
                if conn.has_output() {
                    // A call the flush did not write (fenced) is answered
                    // already: take it in before waiting.
                    continue;
                }
            }
            if self.drain_deadline.is_some() {
                if self.sidecar.is_stopped() {
                    tracing::warn!("shutdown deadline reached before everything was delivered");
                    return Ok(());
                }
                if self.sidecar.is_idle() {
                    tracing::info!("drained: every accepted event is delivered or dead-lettered");
                    return Ok(());
                }
            }
            let wake = self.sidecar.next_wake().map(Instant::from_std);
            timer.set(wake);
            // Every branch is cancel-safe: the link future is polled by
            // reference and stays in `self.link` (and `Connection::wait` is
            // cancel-safe); `FuturesUnordered::next` loses nothing when
            // another branch wins; the timer is set again on every turn.
            tokio::select! {
                _ = shutdown.cancelled(), if self.drain_deadline.is_none() => self.begin_drain(now),
                event = next_link_event(&mut self.link) => self.on_link_event(event)?,
                Some((id, report)) = self.reports.next(), if !self.reports.is_empty() => {
                    self.sidecar.on_report(id, report, Instant::now().into_std());
                }
                event = next_queue_event(&mut self.streams) => match event {
                    QueueEvent::Reply(id, reply) => {
                        self.sidecar.on_queue_reply(id, reply, Instant::now().into_std());
                    }
                    QueueEvent::Admitted(id, admitted) => {
                        self.sidecar.on_admitted(id, admitted, Instant::now().into_std());
                    }
                },
                Some(reply) = next_status_request(&mut self.status_requests) => {
                    let _ = reply.send((self.status(), self.shown.probe.clone()));
                }
                _ = timer.sleep.as_mut(), if wake.is_some() => {}
            }
        }
    }

    /// `/status`, as far as this loop knows it.
    fn status(&self) -> Status {
        let now = Instant::now();
        let shown = &self.shown;
        let (session, serializer) = match &self.link {
            Link::Up(conn) => (
                Some(conn.info().session.0),
                Some(conn.serializer().to_string()),
            ),
            _ => (None, None),
        };
        let joined = self.joined_at.filter(|_| session.is_some());
        let (waiting, in_flight) = self.sidecar.held();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ready: self.sidecar.is_ready(),
            draining: self.drain_deadline.is_some() || self.sidecar.is_draining(),
            uptime_seconds: status::seconds(now - shown.started),
            router: status::Router {
                url: shown.url.clone(),
                realm: shown.realm.clone(),
                connected: session.is_some(),
                session,
                joined_at: joined.map(|(_, at)| status::rfc3339(at)),
                joined_seconds: joined.map(|(at, _)| status::seconds(now - at)),
                serializer,
                reconnects: self.metrics.router_reconnects.get(),
                connect_failures: self.connect_failures,
            },
            delivery: shown.delivery.to_owned(),
            queue: status::Queue {
                kind: shown.queue_kind.to_owned(),
                waiting: waiting as u64,
                in_flight: in_flight as u64,
                capacity: shown.capacity as u64,
                max_in_flight: shown.max_in_flight as u64,
                name: shown.queue_name.clone(),
                consumer: shown.consumer.clone(),
                redis_up: self.sidecar.redis_up(),
                ..status::Queue::default()
            },
            mappings: self.sidecar.mappings(now.into_std()),
            redis_targets: Vec::new(),
            configuration: shown.settings.clone(),
        }
    }

    /// Takes the Redis queue's new commands and admissions into the loop.
    fn take_queue_io(&mut self) {
        let Some(s) = &mut self.streams else {
            return;
        };
        if let Some((commands, admissions)) = self.sidecar.take_queue_io() {
            s.commands.extend(commands);
            s.admissions.extend(admissions);
        }
    }

    /// After the drain: the Redis queue's last commands, until its leases
    /// are given up.
    async fn finish_queue(&mut self) {
        let mut timer = Timer::new();
        loop {
            let now = Instant::now().into_std();
            self.sidecar.pump(None, now);
            self.take_queue_io();
            let Some(s) = &mut self.streams else {
                return;
            };
            if self.sidecar.queue_finished() && s.commands.is_empty() && s.admissions.is_empty() {
                return;
            }
            let wake = self.sidecar.next_wake().map(Instant::from_std);
            timer.set(wake);
            tokio::select! {
                Some((id, reply)) = s.commands.next(), if !s.commands.is_empty() => {
                    self.sidecar.on_queue_reply(id, reply, Instant::now().into_std());
                }
                Some((id, admitted)) = s.admissions.next(), if !s.admissions.is_empty() => {
                    self.sidecar.on_admitted(id, admitted, Instant::now().into_std());
                }
                _ = timer.sleep.as_mut(), if wake.is_some() => {}
            }
        }
    }

    fn connect(&self) -> BoxFuture<'static, Result<Box<Connection<Token>>, ConnectError>> {
        let config = self.client_config.clone();
        Box::pin(async move { Connection::connect(&config).await.map(Box::new) })
    }

    /// Hands every session output to the sidecar, in order, and lets it do
    /// what needs no waiting, until nothing more comes of it.
    fn pump(&mut self, now: Instant) -> Result<(), Fatal> {
        let now = now.into_std();
        match &mut self.link {
            Link::Up(conn) => loop {
                self.sidecar.pump(Some(conn.session()), now);
                let mut any = false;
                while let Some(output) = conn.poll_output() {
                    any = true;
                    self.sidecar
                        .on_session_output(output, conn.session(), now)?;
                }
                while let Some(refused) = conn.poll_refused() {
                    self.sidecar.on_refused(refused);
                }
                if !any {
                    break;
                }
            },
            _ => self.sidecar.pump(None, now),
        }
        if let (Link::Up(conn), Some(why)) = (&mut self.link, self.sidecar.take_rejoin()) {
            tracing::warn!(reason = %why, "rejoining the router");
            conn.close(CloseReason::ClosedLocally);
        }
        if self.sidecar.was_healthy() {
            self.connect_failures = 0;
        }
        self.reports.extend(self.sidecar.take_started());
        self.take_queue_io();
        Ok(())
    }

    fn on_link_event(&mut self, event: LinkEvent) -> Result<(), Fatal> {
        match event {
            LinkEvent::RetryDue => self.link = Link::Connecting(self.connect()),
            LinkEvent::Connected(Ok(conn)) => self.on_joined(conn),
            LinkEvent::Connected(Err(e)) => self.on_connect_failed(e)?,
            LinkEvent::Io => {}
        }
        Ok(())
    }

    fn on_joined(&mut self, mut conn: Box<Connection<Token>>) {
        self.sessions += 1;
        if self.sessions > 1 {
            self.metrics.router_reconnects.inc();
        }
        self.metrics.router_connected.set(1);
        let info = conn.info();
        tracing::info!(
            session = %info.session,
            realm = %info.realm,
            authid = info.authid.as_deref().unwrap_or(""),
            authrole = info.authrole.as_deref().unwrap_or(""),
            serializer = %conn.serializer(),
            "joined the router; discovering SUB_ registrations"
        );
        self.joined_at = Some((Instant::now(), std::time::SystemTime::now()));
        let now = Instant::now().into_std();
        self.sidecar.on_joined(conn.session(), now);
        self.link = Link::Up(conn);
    }

    fn on_connect_failed(&mut self, error: ConnectError) -> Result<(), Fatal> {
        self.metrics.router_connect_failures.inc();
        if error.is_terminal() {
            return Err(Fatal::Connect(error));
        }
        self.schedule_reconnect(error.to_string(), "cannot connect to the router")
    }

    /// Counts a failure to reach a healthy session and waits before the next
    /// attempt, or gives up after `SUBTOCALL_MAX_CONNECT_FAILURES`.
    fn schedule_reconnect(&mut self, error: String, message: &'static str) -> Result<(), Fatal> {
        self.connect_failures += 1;
        if let Some(max) = self.max_connect_failures
            && self.connect_failures >= max
        {
            return Err(Fatal::TooManyFailures {
                attempts: self.connect_failures,
                last: error,
            });
        }
        let delay = self.reconnect.delay(self.connect_failures, rand::random());
        tracing::warn!(
            attempt = self.connect_failures,
            %error,
            retry_in = ?delay,
            "{message}"
        );
        self.link = Link::Waiting {
            until: Instant::now() + delay,
        };
        Ok(())
    }

    /// The session ended: answer what it left pending, then reconnect
    /// (unless draining). A session that never became ready counts as a
    /// failed attempt, so a router that breaks right after WELCOME meets
    /// the growing backoff and the failure limit.
    fn on_session_end(&mut self, reason: CloseReason) -> Result<(), Fatal> {
        let Link::Up(mut conn) = std::mem::replace(&mut self.link, Link::Stopped) else {
            return Ok(());
        };
        let now = Instant::now().into_std();
        let healthy = self.sidecar.was_healthy();
        // First the sidecar learns the session is gone (no more deliveries
        // start on it), then it takes the answers to what it left pending.
        self.sidecar.on_session_end(now);
        conn.session().abandon();
        while let Some(output) = conn.poll_output() {
            self.sidecar
                .on_session_output(output, conn.session(), now)?;
        }
        while let Some(refused) = conn.poll_refused() {
            self.sidecar.on_refused(refused);
        }
        self.metrics.router_connected.set(0);
        // Closing politely may take a moment; the loop does not wait for it.
        tokio::spawn(async move { conn.shut().await });
        if self.drain_deadline.is_some() {
            tracing::info!(%reason, "router session ended while draining");
            return Ok(());
        }
        if healthy {
            let delay = self.reconnect.delay(1, rand::random());
            tracing::warn!(
                %reason,
                retry_in = ?delay,
                queued = self.sidecar.held().0,
                in_flight = self.sidecar.held().1,
                "router session ended; reconnecting"
            );
            self.link = Link::Waiting {
                until: Instant::now() + delay,
            };
            return Ok(());
        }
        self.schedule_reconnect(
            reason.to_string(),
            "router session ended before discovery completed; reconnecting",
        )
    }

    fn begin_drain(&mut self, now: Instant) {
        let deadline = now + self.shutdown_timeout;
        self.drain_deadline = Some(deadline);
        self.metrics.ready.set(0);
        let session = match &mut self.link {
            Link::Up(conn) => Some(conn.session()),
            _ => None,
        };
        self.sidecar
            .begin_drain(session, deadline.into_std(), now.into_std());
        if !matches!(self.link, Link::Up(_)) {
            self.link = Link::Stopped;
        }
    }

    /// After the run loop: whatever is unfinished is dead-lettered, GOODBYE
    /// is said (bounded), the dead-letter store is flushed.
    async fn finish(&mut self) {
        self.sidecar.stop(Instant::now().into_std());
        if let Link::Up(conn) = &mut self.link {
            conn.session().leave("wamp.close.normal");
            let goodbye = async {
                while conn.close_reason().is_none() {
                    while conn.poll_output().is_some() {}
                    conn.flush().await;
                    if conn.close_reason().is_some() {
                        break;
                    }
                    conn.wait().await;
                }
            };
            let _ = timeout(FINAL_GRACE, goodbye).await;
            conn.shut().await;
        }
        self.link = Link::Stopped;
        self.sidecar.close_dead_letter_store();
        if let Some(task) = self.dead_letter_task.take() {
            let _ = timeout(FINAL_GRACE, task).await;
        }
        if self.streams.is_some() {
            // Acknowledgements, releases and the leases given up must reach
            // Redis before we go.
            if timeout(FINAL_GRACE, self.finish_queue()).await.is_err() {
                tracing::warn!(
                    "the last Redis queue updates did not finish; those entries are delivered \
                     again after a takeover, and the leases lapse after SUBTOCALL_CLAIM_IDLE"
                );
            }
        }
        self.metrics.router_connected.set(0);
        self.metrics.ready.set(0);
    }
}

async fn next_status_request(
    requests: &mut Option<mpsc::Receiver<StatusRequest>>,
) -> Option<StatusRequest> {
    match requests.as_mut() {
        Some(rx) => match rx.recv().await {
            Some(request) => Some(request),
            None => {
                *requests = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// What the Redis queue's IO brought.
enum QueueEvent {
    Reply(CommandId, queue_core::Reply<Fields>),
    Admitted(DeliveryId, Admitted),
}

/// The next thing the Redis queue's IO brings. Cancel safe:
/// `FuturesUnordered::next` loses nothing when another branch wins.
async fn next_queue_event(streams: &mut Option<QueueIo>) -> QueueEvent {
    match streams.as_mut() {
        Some(s) if !s.commands.is_empty() || !s.admissions.is_empty() => tokio::select! {
            Some((id, reply)) = s.commands.next(), if !s.commands.is_empty() => {
                QueueEvent::Reply(id, reply)
            }
            Some((id, admitted)) = s.admissions.next(), if !s.admissions.is_empty() => {
                QueueEvent::Admitted(id, admitted)
            }
        },
        _ => std::future::pending().await,
    }
}

/// The Redis queue: the admission sink, and the delivery stage (its queue
/// core and carrier, delivering through `sink`, the real destination).
fn start_streams(
    config: &Config,
    settings: Settings,
    sink: Box<dyn Sink<Token> + Send>,
    metrics: &Arc<Metrics>,
    now: std::time::Instant,
) -> Result<(AdmitSink, QueueStage, QueueIo), Fatal> {
    let q = &config.queue;
    let target = Target::new(config.redis.url.expose(), config.redis.cluster)
        .map_err(|e| Fatal::Setup(format!("Redis: {e}")))?;
    let shared = target
        .shared()
        .map_err(|e| Fatal::Setup(format!("Redis: {e}")))?;
    let keys = Arc::new(Keys::new(&q.name));
    let consumer = match &q.instance_id {
        Some(id) => id.clone(),
        None => consumer_name(),
    };
    let probe = QueueProbe {
        shared: shared.clone(),
        keys: keys.clone(),
        consumer: consumer.clone(),
        partitions: partitions(config),
    };
    tracing::info!(queue = %q.name, %consumer, cluster = config.redis.cluster, "using the Redis queue");
    // The window: entries held here (waiting or in flight) at most, over
    // every stream: what may be in flight, plus what one read brings.
    let read_max = match sink.dispatch() {
        Dispatch::Each => settings
            .max_in_flight
            .max(settings.batching.max_events)
            .clamp(16, 512),
        Dispatch::Pipeline { max } => max,
    };
    let window = settings.max_in_flight + read_max;
    let carrier = Carrier::new(
        target.clone(),
        shared.clone(),
        keys.clone(),
        &consumer,
        q.dedup_window,
        q.claim_idle,
    );
    let queue = QueueCore::new(
        queue_core::Settings {
            window,
            read_max,
            claim_idle: q.claim_idle,
            partitions: partitions(config),
            max_deliveries: q.max_deliveries,
        },
        now,
    );
    let admit = AdmitSink::new(
        shared,
        keys,
        &consumer,
        carrier.holder(),
        q.dedup_window,
        metrics.clone(),
    );
    let deliver = Settings {
        // Never reached: the queue core holds no more than the window.
        capacity: 2 * window,
        ..settings
    };
    let core = Forwarder::new(MemoryQueue::new(), deliver, rand::random())
        .with_ids_from(queue_stage::IDS_FROM);
    let stage = QueueStage::new(core, sink, queue, carrier, admit.clone());
    let io = QueueIo {
        commands: FuturesUnordered::new(),
        admissions: FuturesUnordered::new(),
        probe,
    };
    Ok((admit, stage, io))
}

/// Partitions per procedure for keyed events: with per-key ordering on the
/// Redis queue.
fn partitions(config: &Config) -> Option<u16> {
    (config.forward.order_by != config::OrderBy::None).then_some(config.queue.partitions)
}

/// This process's consumer name in the group: host, pid and a random part,
/// so that a restarted instance is a new consumer.
fn consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "subtocall".to_owned());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

async fn next_link_event(link: &mut Link) -> LinkEvent {
    match link {
        Link::Waiting { until } => {
            sleep_until(*until).await;
            LinkEvent::RetryDue
        }
        Link::Connecting(connecting) => LinkEvent::Connected(connecting.await),
        Link::Up(conn) => {
            conn.wait().await;
            LinkEvent::Io
        }
        Link::Stopped => std::future::pending().await,
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
    c.max_call_size = w.max_call_size;
    c.ca_file = w.ca_file.clone();
    // EVENT payloads are kept as received: forwarded undecoded in a CALL,
    // or decoded once when the event is accepted (Redis envelope, details
    // kwarg).
    c.raw_event_payloads = true;
    c
}

/// The loop's one timer, kept across turns and moved only when the next
/// deadline changes: a new timer on every turn costs the runtime a wake-up
/// of its own (tokio unparks its driver whenever a timer is registered
/// earlier than the deadline it last slept towards).
struct Timer {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    deadline: Option<Instant>,
}

impl Timer {
    fn new() -> Timer {
        Timer {
            sleep: Box::pin(sleep_until(Instant::now())),
            deadline: None,
        }
    }

    /// Fires at `deadline` (`None`: the caller does not wait on it).
    fn set(&mut self, deadline: Option<Instant>) {
        if let Some(d) = deadline
            && self.deadline != Some(d)
        {
            self.sleep.as_mut().reset(d);
            self.deadline = Some(d);
        }
    }
}
