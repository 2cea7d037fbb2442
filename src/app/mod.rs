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

mod bootstrap;
mod dead_letter_log;
mod fatal;
mod intake;
mod ledger;
mod policies;
mod procedure_metrics;
mod redis_queue;
mod sidecar;
mod stage;
mod summary;
#[cfg(test)]
mod tests;
mod token;
mod view;
mod wiring;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

pub use self::fatal::Fatal;
use self::redis_queue::{QueueEvent, QueueIo};
use self::sidecar::PendingReport;
pub use self::sidecar::Sidecar;
pub use self::summary::Summary;
pub use self::token::Token;
use self::view::Shown;
pub use self::wiring::client_config;
use crate::config::{self, Config};
use crate::forward::retry::Backoff;
use crate::metrics::Metrics;
use crate::status::{Status, StatusRequest};
use crate::wamp::{ClientConfig, CloseReason, ConnectError, Connection};

/// After the drain: how long GOODBYE may take.
const FINAL_GRACE: Duration = Duration::from_secs(3);

/// Runs the sidecar until `shutdown` is cancelled (then drains) or a fatal
/// error. Returns how many events went where.
///
/// `status` brings `/status`'s requests; the loop answers them between
/// other work. Each message on `reloads` (a SIGHUP) reads the policy file
/// again.
pub async fn run(
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    status: Option<mpsc::Receiver<StatusRequest>>,
    reloads: Option<mpsc::Receiver<()>>,
) -> Result<Summary, Fatal> {
    let mut app = App::new(&config, metrics.clone())?;
    app.status_requests = status;
    app.reloads = reloads;
    app.load_kept_groups().await;
    let result = app.run(&shutdown).await;
    app.finish().await;
    let redis_queue = matches!(config.queue.kind, config::QueueKind::Redis);
    let summary = Summary::from_metrics(&metrics, redis_queue);
    summary.log();
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
    /// SIGHUPs: read the policy file again.
    reloads: Option<mpsc::Receiver<()>>,
    shown: Shown,
    /// When the current session joined.
    joined_at: Option<(Instant, std::time::SystemTime)>,
    /// With the Redis queue: where the groups are kept, until loaded.
    kept: Option<(crate::streams::Shared, crate::streams::Keys)>,
}

impl App {
    fn new(config: &Config, metrics: Arc<Metrics>) -> Result<App, Fatal> {
        let parts = wiring::build(config, &metrics)?;
        Ok(App {
            client_config: parts.client_config,
            reconnect: Backoff {
                initial: config.reconnect.initial_backoff,
                max: config.reconnect.max_backoff,
            },
            max_connect_failures: config.reconnect.max_failures.map(|n| n.get()),
            shutdown_timeout: config.shutdown_timeout,
            sidecar: parts.sidecar,
            link: Link::Stopped,
            reports: FuturesUnordered::new(),
            metrics,
            connect_failures: 0,
            sessions: 0,
            drain_deadline: None,
            dead_letter_task: parts.dead_letter_task,
            streams: parts.streams,
            status_requests: None,
            reloads: None,
            shown: parts.shown,
            joined_at: None,
            kept: parts.kept,
        })
    }

    /// With the Redis queue: the groups kept in Redis by every instance,
    /// so that one whose backends are away is read for from the start.
    /// Tried a few times; without an answer the instance starts knowing
    /// only what the router says (said in the log).
    async fn load_kept_groups(&mut self) {
        let Some((shared, keys)) = self.kept.take() else {
            return;
        };
        let mut kept = None;
        for attempt in 1..=3 {
            let load = crate::streams::groups::load(&shared, &keys);
            match tokio::time::timeout(crate::streams::COMMAND_TIMEOUT, load).await {
                Ok(Ok(k)) => {
                    kept = Some(k);
                    break;
                }
                Ok(Err(e)) => {
                    tracing::warn!(attempt, error = %e, "cannot read the groups kept in Redis")
                }
                Err(_) => tracing::warn!(attempt, "reading the groups kept in Redis timed out"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if kept.is_none() {
            tracing::warn!(
                "starting without the groups kept in Redis: a group whose backends are away \
                 is served again only when one of them registers"
            );
        }
        let registry = crate::streams::groups::writer(shared, keys, self.metrics.clone());
        self.sidecar.keep_groups(
            registry,
            kept.unwrap_or_default(),
            std::time::Instant::now(),
        );
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
                event = next_queue_event(&mut self.streams) => {
                    self.sidecar.on_queue_event(event, Instant::now().into_std());
                }
                Some(reply) = next_status_request(&mut self.status_requests) => {
                    let _ = reply.send((self.status(), self.shown.probe.clone()));
                }
                Some(()) = next_reload(&mut self.reloads) => self.reload_policies(),
                _ = timer.sleep.as_mut(), if wake.is_some() => {}
            }
        }
    }

    /// SIGHUP: the policy file read again, if there is one.
    fn reload_policies(&mut self) {
        let path = self
            .sidecar
            .policies()
            .and_then(|p| p.current().source())
            .map(|s| s.path.clone());
        let Some(path) = path else {
            tracing::info!(
                "SIGHUP: no SUBTOCALL_POLICY_FILE to reload (the variables are read only at start); going on as before"
            );
            return;
        };
        tracing::info!(path = %path.display(), "SIGHUP: reading the policy file again");
        // A small file: read in the loop, between two turns.
        let text = std::fs::read_to_string(&path);
        self.sidecar
            .reload_policies(text, Instant::now().into_std());
    }

    /// `/status`, as far as this loop knows it.
    fn status(&self) -> Status {
        let (session, serializer) = match &self.link {
            Link::Up(conn) => (
                Some(conn.info().session.0),
                Some(conn.serializer().to_string()),
            ),
            _ => (None, None),
        };
        let link = view::LinkView {
            joined: self
                .joined_at
                .filter(|_| session.is_some())
                .map(|(at, wall)| (at.into_std(), wall)),
            session,
            serializer,
            reconnects: self.metrics.router_reconnects.get(),
            connect_failures: self.connect_failures,
            draining: self.drain_deadline.is_some(),
        };
        self.shown
            .status(link, &self.sidecar, Instant::now().into_std())
    }

    /// Takes the Redis queue's new commands and admissions into the loop.
    fn take_queue_io(&mut self) {
        if let Some(io) = &mut self.streams {
            self.sidecar.take_queue_io(io);
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
            if self.sidecar.queue_finished() && s.is_empty() {
                return;
            }
            let wake = self.sidecar.next_wake().map(Instant::from_std);
            timer.set(wake);
            tokio::select! {
                event = s.next() => self.sidecar.on_queue_event(event, Instant::now().into_std()),
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

/// The next SIGHUP; never, once the sender is gone.
async fn next_reload(reloads: &mut Option<mpsc::Receiver<()>>) -> Option<()> {
    match reloads.as_mut() {
        Some(rx) => match rx.recv().await {
            Some(()) => Some(()),
            None => {
                *reloads = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
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

/// The next thing the Redis queue's IO brings, if there is one.
async fn next_queue_event(streams: &mut Option<QueueIo>) -> QueueEvent {
    match streams.as_mut() {
        Some(io) => io.next().await,
        None => std::future::pending().await,
    }
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
