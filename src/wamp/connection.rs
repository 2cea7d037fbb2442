//! One WebSocket connection to the router carrying one WAMP session: the
//! socket half of an event loop. [`Connection::connect`] connects and joins;
//! then the owner drives it from its own loop: [`Connection::wait`] (a
//! cancel-safe `select!` branch) reads whatever the router sent into the
//! sans-IO [`Session`] and keeps the liveness timers, [`Connection::poll_output`]
//! hands over the session's outputs in the order the router caused them
//! (encoding what is to be sent), and [`Connection::flush`] writes. Nothing
//! the router sends is ever dropped here: the owner takes every output.
//!
//! Both the sidecar's event loop (`app`) and the handle-based [`super::Client`]
//! drive their session through this.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::auth::{Credentials, redact_query};
use super::codec::{DecodeError, Serializer};
use super::id::{PublicationId, RequestId, SubscriptionId};
use super::message::{Message, Payload};
use super::raw;
use super::session::{Output, RequestError, Session, SessionConfig, SessionError, SessionInfo};
use super::tls::{self, TlsError};
use super::value::Dict;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How many buffered frames one [`Connection::wait`] takes at most, so that
/// a burst is handled (and answered with one flush) without starving the
/// owner's other work.
const BATCH: usize = 64;

/// The WebSocket read buffer (see `connect_and_join`).
const READ_BUFFER: usize = 16 * 1024;

/// What the socket reads at most in one message: twice the configured
/// limit, so that an EVENT over the limit can still be read, refused and
/// reported (topic, publication, size) without ending the session, while a
/// far larger frame is refused before it is buffered.
fn read_ceiling(max_message_size: usize) -> usize {
    max_message_size.saturating_mul(2)
}

/// An EVENT the router sent that was over `SUBTOCALL_MAX_MESSAGE_SIZE` and
/// was not taken: what could be read of it, for the owner to count and log.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// The message's size in bytes.
    pub size: usize,
    pub limit: usize,
    /// The EVENT's subscription, publication and `Details.topic` (pattern
    /// subscriptions only), when it could be read; `None` when the message
    /// was too large to be read at all (the session then ends).
    pub event: Option<(SubscriptionId, PublicationId, Option<String>)>,
}

/// Connection settings. [`ClientConfig::new`] fills in the defaults.
#[derive(Clone)]
pub struct ClientConfig {
    /// `ws://` or `wss://` URL of the router's WebSocket transport.
    pub url: String,
    pub realm: String,
    pub credentials: Credentials,
    /// Offered in this order as WebSocket subprotocols; the router picks.
    pub serializers: Vec<Serializer>,
    /// TCP + TLS + WebSocket handshake + WAMP join.
    pub connect_timeout: Duration,
    /// Deadline for requests made without an explicit timeout.
    pub request_timeout: Duration,
    /// How often to send a WebSocket ping.
    pub ping_interval: Duration,
    /// The connection is dead when nothing arrives this long after a ping.
    pub ping_timeout: Duration,
    /// Largest incoming message. A larger EVENT, up to twice this size, is
    /// refused (see [`Refused`]) and the session goes on; anything larger
    /// ends the session as a protocol error.
    pub max_message_size: usize,
    /// Largest outgoing request (CALL, PUBLISH): a larger one is not sent
    /// but answered [`RequestError::TooLarge`] at once.
    pub max_call_size: usize,
    /// Extra CA certificates (PEM) trusted for `wss://`.
    pub ca_file: Option<PathBuf>,
    /// Capacity of the incoming event/invocation channel.
    pub incoming_capacity: usize,
    /// Capacity of the command channel from handles to the socket task.
    pub command_capacity: usize,
    /// HELLO.Details.agent.
    pub agent: String,
    /// Hand EVENTs over as [`Output::RawEvent`]s, their payload kept as
    /// received (for a forwarder, which passes it on in a CALL without
    /// decoding it), instead of decoded [`Output::Event`]s.
    pub raw_event_payloads: bool,
}

/// The URL's query values may be credentials (`?token=…`): hidden, like
/// the secrets (whose own Debug hides them).
impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("url", &redact_query(&self.url, |_| true))
            .field("realm", &self.realm)
            .field("credentials", &self.credentials)
            .field("serializers", &self.serializers)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("ping_interval", &self.ping_interval)
            .field("ping_timeout", &self.ping_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("max_call_size", &self.max_call_size)
            .field("ca_file", &self.ca_file)
            .field("agent", &self.agent)
            .field("raw_event_payloads", &self.raw_event_payloads)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    pub fn new(url: impl Into<String>, realm: impl Into<String>) -> ClientConfig {
        ClientConfig {
            url: url.into(),
            realm: realm.into(),
            credentials: Credentials::Anonymous,
            serializers: Serializer::ALL.to_vec(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(5),
            max_message_size: 16 * 1024 * 1024,
            max_call_size: 16 * 1024 * 1024,
            ca_file: None,
            incoming_capacity: 4096,
            command_capacity: 1024,
            agent: concat!("subtocall/", env!("CARGO_PKG_VERSION")).to_owned(),
            raw_event_payloads: false,
        }
    }
}

/// Why [`Client::connect`] failed, classified by what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is not a usable `ws://`/`wss://` URL. Fatal: fix the config.
    #[error("invalid router URL {url:?}: {detail}")]
    InvalidUrl { url: String, detail: String },
    /// TLS could not be configured. Fatal: fix the config.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// TCP, TLS or WebSocket handshake failed. Retry later.
    #[error("cannot connect to {url}: {detail}")]
    Transport { url: String, detail: String },
    /// The router accepted none of our serializers. Fatal.
    #[error("router accepted none of the offered serializers ({offered})")]
    NoSerializer { offered: String },
    /// The WAMP join failed: ABORT (e.g. bad credentials), or a protocol
    /// error. [`ConnectError::is_terminal`] tells whether to retry.
    #[error(transparent)]
    Join(#[from] SessionError),
    /// The connection closed before WELCOME. Retry later.
    #[error("connection closed during the WAMP join: {0}")]
    ClosedDuringJoin(String),
    /// Nothing completed within the connect timeout. Retry later.
    #[error("no WAMP session within {0:?}")]
    Timeout(Duration),
}

impl ConnectError {
    /// Whether retrying with the same configuration can possibly succeed.
    pub fn is_terminal(&self) -> bool {
        match self {
            ConnectError::InvalidUrl { .. }
            | ConnectError::Tls(_)
            | ConnectError::NoSerializer { .. } => true,
            ConnectError::Join(e) => e.is_terminal(),
            ConnectError::Transport { .. }
            | ConnectError::ClosedDuringJoin(_)
            | ConnectError::Timeout(_) => false,
        }
    }
}

/// Why an established session ended.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CloseReason {
    /// GOODBYE: ours acknowledged, or the router's.
    #[error("session closed with {0}")]
    Goodbye(String),
    /// The router sent ABORT.
    #[error("router aborted the session: {reason}")]
    Aborted { reason: String },
    /// The router broke the protocol (malformed or oversized message,
    /// unexpected message type); we sent ABORT and closed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The transport failed or was closed.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// No frame arrived within the ping timeout after a ping.
    #[error("no answer to a WebSocket ping within {0:?}")]
    PingTimeout(Duration),
    /// [`Client::close`] was called, or every handle was dropped.
    #[error("closed by the client")]
    ClosedLocally,
}

/// How a flush ended.
enum Written {
    All,
    /// A fenced frame's deadline passed after it was buffered: nothing of
    /// the buffer was written.
    PausedPastAFence,
}

/// One joined session on its socket. See the module documentation.
pub struct Connection<T> {
    ws: Ws,
    session: Session<T>,
    serializer: Serializer,
    info: SessionInfo,
    /// Decode EVENTs without their payload (see `raw`).
    raw_events: bool,
    ping_interval: Duration,
    ping_timeout: Duration,
    /// When the next ping goes out.
    ping_timer: Pin<Box<Sleep>>,
    /// Set while a ping waits for any frame in return.
    pong_deadline: Option<Instant>,
    /// Fires no later than the session's earliest request deadline (see
    /// `wait`); `armed` is when, if it is armed.
    deadline_timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    /// Encoded frames not yet written, each with the request it carries
    /// and the time it must be written by, if it must
    /// ([`Session::send_last_by`]).
    writes: VecDeque<(WsMessage, Option<(RequestId, std::time::Instant)>)>,
    max_message_size: usize,
    max_call_size: usize,
    /// The largest request written in the last flush, blamed when the
    /// router closes the connection over a message too big (1009).
    largest_written: Option<(RequestId, usize)>,
    /// Requests queued in `writes`, with their size, for `largest_written`.
    queued_requests: Vec<(RequestId, usize)>,
    /// Oversized EVENTs not taken, for the owner.
    refused: VecDeque<Refused>,
    /// Frames were fed to the socket (or a pong queued) since the last flush.
    unflushed: bool,
    /// tungstenite may hold frames it already read from the socket (a burst
    /// cut at `BATCH`, or what came in with the handshake): the stream is
    /// then polled whatever the socket says (`Connection::wait`).
    maybe_buffered: bool,
    /// Frames that must not go out any more wait in the WebSocket's write
    /// buffer (a pause passed a fenced call's deadline after it was
    /// queued): the socket is dropped without writing them.
    discard_writes: bool,
    /// Set when the session has ended; the owner stops driving it.
    close: Option<CloseReason>,
}

impl<T> Connection<T> {
    /// Connects, joins the realm, and returns the established session.
    pub async fn connect(config: &ClientConfig) -> Result<Connection<T>, ConnectError> {
        let limit = config.connect_timeout;
        let (ws, session, serializer) = match timeout(limit, connect_and_join(config)).await {
            Ok(joined) => joined?,
            Err(_) => return Err(ConnectError::Timeout(limit)),
        };
        let Some(info) = session.info().cloned() else {
            // connect_and_join returns only after WELCOME.
            return Err(ConnectError::ClosedDuringJoin("no WELCOME".into()));
        };
        let now = Instant::now();
        Ok(Connection {
            ws,
            session,
            serializer,
            info,
            raw_events: config.raw_event_payloads,
            ping_interval: config.ping_interval,
            ping_timeout: config.ping_timeout,
            ping_timer: Box::pin(sleep_until(now + config.ping_interval)),
            pong_deadline: None,
            deadline_timer: Box::pin(sleep_until(now)),
            armed: None,
            writes: VecDeque::new(),
            max_message_size: config.max_message_size,
            max_call_size: config.max_call_size,
            largest_written: None,
            queued_requests: Vec::new(),
            refused: VecDeque::new(),
            unflushed: false,
            maybe_buffered: true,
            discard_writes: false,
            close: None,
        })
    }

    /// What WELCOME said about this session.
    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// The serializer the router picked.
    pub fn serializer(&self) -> Serializer {
        self.serializer
    }

    /// The session, to make requests on (they go out with the next flush).
    pub fn session(&mut self) -> &mut Session<T> {
        &mut self.session
    }

    /// Why the session ended, once it has: the owner stops and drops it.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.close.as_ref()
    }

    /// Ends the session from our side without GOODBYE (e.g. to rejoin).
    pub fn close(&mut self, reason: CloseReason) {
        self.close.get_or_insert(reason);
    }

    /// Waits until the router sent something (read into the session, up to
    /// a burst), a ping is due, a request deadline passed, or the router
    /// went silent. Cancel-safe: `StreamExt::next` loses nothing when
    /// another branch wins, and the timers are plain deadlines kept in
    /// `self`. Returns at once if the session has ended.
    pub async fn wait(&mut self) {
        if self.close.is_some() {
            return;
        }
        // The timer only has to fire no later than the earliest deadline:
        // armed earlier, it fires early and is armed again. So it is reset
        // only when a deadline comes before it, not for every request (at
        // a call per event, that was a timer update per event).
        if let Some(at) = self.session.next_deadline().map(Instant::from_std)
            && self.armed.is_none_or(|armed| at < armed)
        {
            self.deadline_timer.as_mut().reset(at);
            self.armed = Some(at);
        }
        let pong_wait = self
            .pong_deadline
            .unwrap_or_else(|| Instant::now() + self.ping_timeout);
        // tungstenite zero-fills its read buffer (`READ_BUFFER`) before every
        // read it tries, so the stream is polled only once the socket has
        // something (or tungstenite may hold frames already): the owner
        // waits here again after everything else that wakes it (a Redis
        // reply, a timer), and each of those polls cost a 16 KiB memset
        // that also pushed the event's working set out of the L1 cache.
        let ws = &mut self.ws;
        let gated = !self.maybe_buffered;
        let next = async move {
            if gated && let MaybeTlsStream::Plain(tcp) = ws.get_ref() {
                // Readiness only (a spurious one costs a read, as before);
                // TLS may hold decrypted bytes the socket does not show.
                let _ = std::future::poll_fn(|cx| tcp.poll_read_ready(cx)).await;
            }
            ws.next().await
        };
        tokio::select! {
            frame = next => {
                self.pong_deadline = None;
                self.on_frame(frame);
                // Take whatever else is already buffered.
                self.maybe_buffered = true;
                for _ in 1..BATCH {
                    if self.close.is_some() {
                        break;
                    }
                    match self.ws.next().now_or_never() {
                        Some(frame) => self.on_frame(frame),
                        // Nothing buffered, the socket read dry.
                        None => {
                            self.maybe_buffered = false;
                            break;
                        }
                    }
                }
            }
            _ = self.deadline_timer.as_mut(), if self.armed.is_some() => {
                self.session.handle_timeouts(Instant::now().into_std());
                self.armed = None;
            }
            _ = self.ping_timer.as_mut() => {
                let now = Instant::now();
                self.ping_timer.as_mut().reset(now + self.ping_interval);
                self.pong_deadline.get_or_insert(now + self.ping_timeout);
                self.writes.push_back((WsMessage::Ping(Default::default()), None));
            }
            _ = sleep_until(pong_wait), if self.pong_deadline.is_some() => {
                self.close(CloseReason::PingTimeout(self.ping_timeout));
            }
        }
    }

    /// The session's next output that is not a message to send, in order.
    /// Messages to send are encoded on the way and go out with the next
    /// [`Connection::flush`]. A GOODBYE ends the connection instead of being
    /// returned.
    pub fn poll_output(&mut self) -> Option<Output<T>> {
        loop {
            let output = self.session.poll_output()?;
            let (encoded, request) = match output {
                Output::Send(msg) => (encode_frame(self.serializer, &msg), sized_request(&msg)),
                Output::SendRawCall {
                    request,
                    options,
                    procedure,
                    payload,
                } => (
                    raw::encode_call(self.serializer, request, options, &procedure, &payload)
                        .map(|bytes| ws_message(self.serializer, bytes)),
                    Some(request),
                ),
                Output::Closed { reason } => {
                    self.close(CloseReason::Goodbye(reason));
                    continue;
                }
                other => return Some(other),
            };
            let frame = match encoded {
                Ok(frame) => frame,
                // Only values a serializer cannot represent get here; the
                // request it belonged to times out.
                Err(e) => {
                    tracing::error!(error = %e, "dropping a message that cannot be encoded");
                    continue;
                }
            };
            let mut fence = None;
            if let Some(request) = request {
                fence = self.session.send_by(request).map(|at| (request, at));
                let size = frame.len();
                if size > self.max_call_size {
                    // The router would close the connection over it.
                    let limit = Some(self.max_call_size);
                    self.session
                        .fail(request, RequestError::TooLarge { size, limit });
                    continue;
                }
                self.queued_requests.push((request, size));
            }
            self.writes.push_back((frame, fence));
        }
    }

    /// Whether the session has outputs for the owner (a flush may leave
    /// some: a request it did not write, failed).
    pub fn has_output(&self) -> bool {
        self.session.has_output()
    }

    /// Whether frames wait to be written.
    pub fn has_writes(&self) -> bool {
        !self.writes.is_empty() || self.unflushed
    }

    /// Writes what is queued and flushes once, with a deadline: a router that
    /// stops reading must not wedge the owner. A failure ends the session.
    pub async fn flush(&mut self) {
        if self.close.is_some() && !matches!(self.close, Some(CloseReason::Goodbye(_))) {
            // Best effort only: whatever was queued (an ABORT) goes with the close.
            self.writes.clear();
            return;
        }
        if !self.has_writes() {
            return;
        }
        if !self.queued_requests.is_empty() {
            self.largest_written = self.queued_requests.drain(..).max_by_key(|(_, size)| *size);
        }
        let limit = self.ping_interval + self.ping_timeout;
        let write = async {
            // The earliest deadline of a fenced frame fed to the buffer.
            let mut earliest: Option<std::time::Instant> = None;
            while let Some((frame, fence)) = self.writes.pop_front() {
                // The clock is read as late as it can be: right before the
                // frame goes to the buffer, and again before the buffer
                // goes to the socket.
                if let Some((request, by)) = fence {
                    if std::time::Instant::now() >= by {
                        self.session.fail(request, RequestError::Fenced);
                        continue;
                    }
                    earliest = Some(earliest.map_or(by, |e| e.min(by)));
                }
                self.ws.feed(frame).await?;
                self.unflushed = true;
            }
            if self.unflushed {
                // Paused since (the process frozen, the host stalled): a
                // fenced call in the buffer must not go out late.
                if earliest.is_some_and(|by| std::time::Instant::now() >= by) {
                    return Ok(Written::PausedPastAFence);
                }
                self.unflushed = false;
                self.ws.flush().await?;
            }
            Ok::<Written, tungstenite::Error>(Written::All)
        };
        match timeout(limit, write).await {
            Ok(Ok(Written::All)) => {}
            Ok(Ok(Written::PausedPastAFence)) => {
                // What the buffer holds is never written: the session ends
                // and its requests fail as for a lost connection.
                self.discard_writes = true;
                self.close(CloseReason::ConnectionLost(
                    "paused past a queue delivery's deadline while writing it; \
                     dropping the connection instead of calling late"
                        .into(),
                ));
            }
            Ok(Err(e)) => self.close(CloseReason::ConnectionLost(e.to_string())),
            Err(_) => self.close(CloseReason::ConnectionLost(format!(
                "router took none of our data for {limit:?}"
            ))),
        }
    }

    /// Resolves every request still pending (connection lost) so that the
    /// owner sees each answered once, then closes the socket (bounded).
    pub async fn shut(&mut self) {
        self.session.abandon();
        if self.discard_writes {
            // A close would flush the buffer first.
            return;
        }
        let _ = timeout(Duration::from_secs(1), self.ws.close(None)).await;
    }

    fn on_frame(&mut self, frame: Option<Result<WsMessage, tungstenite::Error>>) {
        let data = match frame {
            Some(Ok(WsMessage::Text(text))) => text.into(),
            Some(Ok(WsMessage::Binary(bytes))) => bytes,
            Some(Ok(WsMessage::Ping(_))) => {
                // tungstenite queued the pong; it goes out with the next flush.
                self.unflushed = true;
                return;
            }
            Some(Ok(WsMessage::Pong(_) | WsMessage::Frame(_))) => return,
            Some(Ok(WsMessage::Close(frame))) => {
                if let Some(f) = &frame
                    && f.code == CloseCode::Size
                    && let Some((request, size)) = self.largest_written.take()
                {
                    // Our last message was too big for the router: that
                    // request's fault, not a connection to retry it on.
                    let error = RequestError::TooLarge { size, limit: None };
                    self.session.fail(request, error);
                }
                let detail = match frame {
                    Some(f) => format!("router closed the WebSocket ({} {})", f.code, f.reason),
                    None => "router closed the WebSocket".into(),
                };
                self.close(CloseReason::ConnectionLost(detail));
                return;
            }
            Some(Err(tungstenite::Error::Capacity(e))) => {
                let size = match e {
                    tungstenite::error::CapacityError::MessageTooLong { size, .. } => size,
                    _ => 0,
                };
                self.refused.push_back(Refused {
                    size,
                    limit: self.max_message_size,
                    event: None,
                });
                self.protocol_error(format!("message too large: {e}"));
                return;
            }
            // The peer vanished without a close handshake: a lost
            // connection, not a broken protocol.
            Some(Err(tungstenite::Error::Protocol(
                e @ tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            ))) => {
                self.close(CloseReason::ConnectionLost(e.to_string()));
                return;
            }
            Some(Err(tungstenite::Error::Protocol(e))) => {
                self.close(CloseReason::Protocol(format!("WebSocket: {e}")));
                return;
            }
            Some(Err(e)) => {
                self.close(CloseReason::ConnectionLost(e.to_string()));
                return;
            }
            None => {
                self.close(CloseReason::ConnectionLost("connection closed".into()));
                return;
            }
        };
        if data.len() > self.max_message_size {
            return self.refuse(&data);
        }
        if self.raw_events
            && let Some(event) = raw::decode_event_in(self.serializer, &data)
        {
            if let Err(e) = self.session.handle_raw_event(event) {
                self.on_session_error(e);
            }
            return;
        }
        // A RESULT nobody reads (a forwarded call's): its payload is not
        // decoded.
        if let Some(request) = raw::result_request(self.serializer, &data)
            && !self.session.reads_result(request)
        {
            let result = Message::Result {
                request,
                details: Dict::new(),
                payload: Payload::default(),
            };
            if let Err(e) = self.session.handle_message(result) {
                self.on_session_error(e);
            }
            return;
        }
        match self.serializer.decode(&data) {
            Ok(msg) => {
                if let Err(e) = self.session.handle_message(msg) {
                    self.on_session_error(e);
                }
            }
            Err(e @ (DecodeError::Malformed { .. } | DecodeError::Message(_))) => {
                self.protocol_error(e.to_string())
            }
        }
    }

    /// A message over the limit: an EVENT is refused and reported, and the
    /// session goes on; anything else ends it.
    fn refuse(&mut self, data: &[u8]) {
        let size = data.len();
        let limit = self.max_message_size;
        match raw::decode_event(self.serializer, data) {
            Some(event) => {
                let topic = event.details.get_str("topic").map(str::to_owned);
                self.refused.push_back(Refused {
                    size,
                    limit,
                    event: Some((event.subscription, event.publication, topic)),
                });
            }
            None => {
                self.refused.push_back(Refused {
                    size,
                    limit,
                    event: None,
                });
                self.protocol_error(format!(
                    "message too large: {size} bytes, the limit is {limit}"
                ));
            }
        }
    }

    /// The next oversized EVENT not taken (see [`Refused`]).
    pub fn poll_refused(&mut self) -> Option<Refused> {
        self.refused.pop_front()
    }

    fn on_session_error(&mut self, e: SessionError) {
        self.close(match &e {
            SessionError::Aborted { reason, .. } => CloseReason::Aborted {
                reason: reason.clone(),
            },
            _ => CloseReason::Protocol(e.to_string()),
        });
        if let Some(abort) = e.abort_message() {
            self.queue_abort(abort);
        }
    }

    /// The router sent something unusable: tell it with ABORT, then close.
    fn protocol_error(&mut self, detail: String) {
        let abort = SessionError::Protocol(detail.clone()).abort_message();
        self.close(CloseReason::Protocol(detail));
        if let Some(abort) = abort {
            self.queue_abort(abort);
        }
    }

    fn queue_abort(&mut self, abort: Message) {
        if let Ok(frame) = encode_frame(self.serializer, &abort) {
            // Best effort, never blocks: the connection is being dropped.
            if self.ws.feed(frame).now_or_never().is_some() {
                let _ = self.ws.flush().now_or_never();
            }
        }
    }
}

// ---------------------------------------------------------------- connecting

async fn connect_and_join<T>(
    config: &ClientConfig,
) -> Result<(Ws, Session<T>, Serializer), ConnectError> {
    // As errors show it: a query value may be a credential (`?token=…`).
    let shown_url = redact_query(&config.url, |_| true);
    let invalid = |detail: String| ConnectError::InvalidUrl {
        url: shown_url.clone(),
        detail,
    };
    let mut request = config
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| invalid(e.to_string()))?;
    let tls = match request.uri().scheme_str() {
        Some("wss") => Some(Connector::Rustls(tls::client_config(
            config.ca_file.as_deref(),
        )?)),
        Some("ws") => None,
        other => return Err(invalid(format!("scheme {other:?} is not ws or wss"))),
    };
    let offered = config
        .serializers
        .iter()
        .map(|s| s.subprotocol())
        .collect::<Vec<_>>()
        .join(", ");
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&offered).map_err(|e| invalid(e.to_string()))?,
    );
    let ws_config = WebSocketConfig::default()
        // tungstenite zero-fills this much buffer before every read (128 KiB
        // by default): ~4 µs per read, more than a whole event costs us.
        // 16 KiB still takes a hundred events per read under load; larger
        // messages grow the buffer as needed.
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(read_ceiling(config.max_message_size)))
        .max_frame_size(Some(read_ceiling(config.max_message_size)));
    let (mut ws, response) =
        tokio_tungstenite::connect_async_tls_with_config(request, Some(ws_config), true, tls)
            .await
            .map_err(|e| ConnectError::Transport {
                url: shown_url.clone(),
                detail: e.to_string(),
            })?;
    let serializer = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .and_then(Serializer::from_subprotocol)
        .filter(|s| config.serializers.contains(s))
        .ok_or(ConnectError::NoSerializer { offered })?;

    let mut session = Session::new(SessionConfig {
        realm: config.realm.clone(),
        credentials: config.credentials.clone(),
        agent: config.agent.clone(),
    });
    session.join();
    loop {
        while let Some(output) = session.poll_output() {
            match output {
                Output::Send(msg) => write(&mut ws, serializer, &msg)
                    .await
                    .map_err(ConnectError::ClosedDuringJoin)?,
                Output::Joined(_) => {
                    ws.flush()
                        .await
                        .map_err(|e| ConnectError::ClosedDuringJoin(e.to_string()))?;
                    return Ok((ws, session, serializer));
                }
                // Nothing else can come before WELCOME: no request exists yet.
                _ => {}
            }
        }
        ws.flush()
            .await
            .map_err(|e| ConnectError::ClosedDuringJoin(e.to_string()))?;
        let frame = match ws.next().await {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Err(ConnectError::ClosedDuringJoin(e.to_string())),
            None => return Err(ConnectError::ClosedDuringJoin("EOF".into())),
        };
        let data = match frame {
            WsMessage::Text(t) => t.into(),
            WsMessage::Binary(b) => b,
            WsMessage::Close(f) => {
                return Err(ConnectError::ClosedDuringJoin(format!("close frame {f:?}")));
            }
            _ => continue,
        };
        let result = match serializer.decode(&data) {
            Ok(msg) => {
                derive_key_off_the_event_loop(&config.credentials, &msg).await;
                session.handle_message(msg)
            }
            Err(e) => Err(SessionError::Protocol(e.to_string())),
        };
        if let Err(e) = result {
            if let Some(abort) = e.abort_message() {
                let _ = write(&mut ws, serializer, &abort).await;
            }
            // The router leaves the socket open after ABORT: close it ourselves.
            let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
            return Err(ConnectError::Join(e));
        }
    }
}

/// Before a salted WAMP-CRA CHALLENGE is answered: derives its key on tokio's
/// blocking pool, because PBKDF2 may take a second and this runtime has one
/// thread. The session's answer then finds the key cached (`auth`).
async fn derive_key_off_the_event_loop(credentials: &Credentials, msg: &Message) {
    if let Message::Challenge { authmethod, extra } = msg
        && let Some(derivation) = credentials.derivation(authmethod, extra)
    {
        // Fails only if the runtime is shutting down; the session would then
        // derive the key itself.
        let _ = tokio::task::spawn_blocking(move || derivation.run()).await;
    }
}

async fn write(ws: &mut Ws, serializer: Serializer, msg: &Message) -> Result<(), String> {
    let frame = encode_frame(serializer, msg).map_err(|e| e.to_string())?;
    ws.feed(frame).await.map_err(|e| e.to_string())
}

fn encode_frame(
    serializer: Serializer,
    msg: &Message,
) -> Result<WsMessage, super::codec::EncodeError> {
    Ok(ws_message(serializer, serializer.encode(msg)?))
}

/// The request id of a message whose size the router limits (it carries a
/// payload we send): CALL and PUBLISH.
fn sized_request(msg: &Message) -> Option<RequestId> {
    match msg {
        Message::Call { request, .. } | Message::Publish { request, .. } => Some(*request),
        _ => None,
    }
}

/// An encoded message as a WebSocket frame: text for JSON, binary otherwise.
fn ws_message(serializer: Serializer, bytes: Vec<u8>) -> WsMessage {
    if serializer.is_text() {
        match String::from_utf8(bytes) {
            Ok(text) => WsMessage::Text(text.into()),
            // serde_json only writes UTF-8; keep the frame rather than panic.
            Err(e) => WsMessage::Binary(e.into_bytes().into()),
        }
    } else {
        WsMessage::Binary(bytes.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_query_values_of_the_url_and_the_secret() {
        let mut config = ClientConfig::new("ws://r:8080/ws?token=s3cr3t-Quokka", "realm1");
        config.credentials = Credentials::Ticket {
            authid: "svc".into(),
            ticket: "t1cket-Wombat".into(),
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cr3t-Quokka"), "{shown}");
        assert!(!shown.contains("t1cket-Wombat"), "{shown}");
        assert!(shown.contains("ws://r:8080/ws?token="), "{shown}");
    }

    #[test]
    fn the_read_ceiling_is_twice_the_limit_without_overflow() {
        assert_eq!(read_ceiling(1024), 2048);
        assert_eq!(read_ceiling(usize::MAX), usize::MAX);
    }
}
