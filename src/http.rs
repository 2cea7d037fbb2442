//! The operations listener: `/metrics` (Prometheus text format, rendered by
//! `prometheus-client`), `/healthz` (the process is alive), `/readyz`
//! (joined, discovery complete, not draining) and `/status` (what the
//! sidecar is doing, as JSON: see [`crate::status`]). Its own accept loop over
//! hyper's HTTP/1 connections (not `axum::serve`, which has no timeouts and
//! no connection limit), so that no client can hold it: see [`Limits`]. May
//! call only `metrics` and `status`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::status::{self, StatusRequest};

/// What the handlers read.
#[derive(Clone)]
struct Ops {
    metrics: Arc<Metrics>,
    /// To the event loop, for `/status`; `None` when nothing answers it.
    status: Option<mpsc::Sender<StatusRequest>>,
}

/// The Content-Type of the OpenMetrics text format that `prometheus-client`
/// writes; Prometheus negotiates it.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How often, at most, the listener logs that it is at its connection limit.
const LIMIT_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// How long a client may hold the listener, and how many may at once. The
/// listener is on `0.0.0.0` by default, so anyone who can reach the port must
/// not be able to starve the health probes or use up the process's open
/// files (which the router link needs too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A complete request head must arrive within this after the connection
    /// opens and after each response. It is the header-read timeout (a
    /// client sending its head byte by byte is closed after it) and the
    /// keep-alive idle timeout (hyper restarts it after each response).
    pub request_head_timeout: Duration,
    /// A connection older than this is closed after its current response,
    /// or dropped if that response is not taken within
    /// `request_head_timeout`: bounds a client that keeps a connection busy
    /// or stops reading.
    pub max_connection_age: Duration,
    /// Connections open at once. At the limit the oldest is dropped to admit
    /// a new one, so a flood of connections cannot lock a probe out and the
    /// listener never holds more file descriptors than this.
    pub max_connections: usize,
}

impl Default for Limits {
    /// Probes and Prometheus send a request head in one packet and need a
    /// handful of connections; a scrape takes milliseconds.
    fn default() -> Limits {
        Limits {
            request_head_timeout: Duration::from_secs(5),
            max_connection_age: Duration::from_secs(60),
            max_connections: 32,
        }
    }
}

/// Binds the listener (so a taken port fails startup, not later).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `shutdown` is cancelled, then lets each connection finish
/// its current response (up to `request_head_timeout`). `/status` asks the
/// event loop through `status`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    status: Option<mpsc::Sender<StatusRequest>>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status_json))
        .with_state(Ops { metrics, status });
    let mut connections = Connections::new(limits.max_connections);
    loop {
        // Every branch is cancel-safe: `accept` and `join_next` lose nothing
        // when another branch wins, and `cancelled` is a plain signal.
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.tasks.join_next(), if !connections.tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let dropped_some = connections.admit(serve_connection(
                        stream,
                        app.clone(),
                        limits,
                        shutdown.clone(),
                    ));
                    // An aborted task closes its socket when the runtime next
                    // runs it: let it, before accepting more (a burst of
                    // accepts would otherwise open far more than the limit).
                    if dropped_some {
                        tokio::task::yield_now().await;
                    }
                }
                // The peer gave up before we accepted: nothing to do.
                Err(e) if is_connection_error(&e) => {}
                // Out of file descriptors (used up elsewhere: ours are
                // capped): wait for some to be freed, as axum does.
                Err(e) => {
                    tracing::warn!(error = %e, "metrics/health listener cannot accept; pausing 1s");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = sleep(Duration::from_secs(1)) => {}
                    }
                }
            },
        }
    }
    // Each connection saw `shutdown` too and ends within `request_head_timeout`.
    while connections.tasks.join_next().await.is_some() {}
}

/// The open connections, owned by the accept loop alone.
struct Connections {
    tasks: JoinSet<()>,
    /// Oldest first; entries of finished tasks are pruned when one is admitted.
    order: VecDeque<AbortHandle>,
    max: usize,
    /// Connections dropped to admit newer ones since the last warning.
    dropped: u64,
    warned_at: Option<Instant>,
}

impl Connections {
    fn new(max: usize) -> Connections {
        Connections {
            tasks: JoinSet::new(),
            order: VecDeque::new(),
            max: max.max(1),
            dropped: 0,
            warned_at: None,
        }
    }

    /// Starts serving a new connection, first dropping the oldest one if
    /// the limit is reached; says whether it did.
    fn admit(&mut self, connection: impl Future<Output = ()> + Send + 'static) -> bool {
        self.order.retain(|task| !task.is_finished());
        let mut dropped_some = false;
        while self.order.len() >= self.max {
            if let Some(oldest) = self.order.pop_front() {
                // Dropping the task closes its socket.
                oldest.abort();
                self.dropped += 1;
                dropped_some = true;
            }
        }
        if self.dropped > 0
            && self
                .warned_at
                .is_none_or(|at| at.elapsed() >= LIMIT_WARNING_INTERVAL)
        {
            tracing::warn!(
                limit = self.max,
                dropped = self.dropped,
                "metrics/health listener is at its connection limit; \
                 dropping the oldest connections to admit new ones"
            );
            self.dropped = 0;
            self.warned_at = Some(Instant::now());
        }
        self.order.push_back(self.tasks.spawn(connection));
        dropped_some
    }
}

/// Serves one connection within `limits`; on `stop`, finishes the current
/// response first.
async fn serve_connection(stream: TcpStream, app: Router, limits: Limits, stop: CancellationToken) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.request_head_timeout);
    let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    let mut connection = std::pin::pin!(connection);
    // Cancel-safe: the connection is pinned here and polled again below if
    // another branch wins; the others are a timer and a signal.
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "metrics/health connection ended");
            }
            return;
        }
        _ = sleep(limits.max_connection_age) => {}
        _ = stop.cancelled() => {}
    }
    connection.as_mut().graceful_shutdown();
    // A client that does not take its response in time is dropped.
    let _ = timeout(limits.request_head_timeout, connection).await;
}

/// Accept errors about one connection, not about the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

async fn metrics_text(State(ops): State<Ops>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], ops.metrics.encode())
}

/// The event loop's answer, completed with what Redis says. 503 when the
/// loop does not answer (stopping, or stuck: which is worth knowing too).
async fn status_json(State(ops): State<Ops>) -> axum::response::Response {
    let unavailable = |why: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("status unavailable: {why}\n"),
        )
            .into_response()
    };
    let Some(requests) = ops.status else {
        return unavailable("this listener serves no sidecar");
    };
    let (tx, rx) = oneshot::channel();
    if requests.try_send(tx).is_err() {
        return unavailable("the sidecar is stopping or busy");
    }
    let (mut answer, probe) = match timeout(status::ANSWER_WITHIN, rx).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => return unavailable("the sidecar is stopping"),
        Err(_) => return unavailable("the event loop did not answer within 2s"),
    };
    if let Some(probe) = probe {
        probe.fill(&mut answer).await;
    }
    match serde_json::to_vec_pretty(&answer) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => unavailable(&e.to_string()),
    }
}

async fn readyz(State(ops): State<Ops>) -> impl IntoResponse {
    if ops.metrics.ready.get() == 1 {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not joined to the router, discovery incomplete, or draining\n",
        )
    }
}
