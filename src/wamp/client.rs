//! The async WAMP client: one task owns the WebSocket and the [`Session`];
//! cheap-clone [`Client`] handles send it commands over a bounded channel, and
//! events and invocations come out of a bounded [`Incoming`] channel that the
//! socket task never waits on (it counts what it cannot hand over). Replies to
//! our own calls arrive on the same socket, so blocking the reader on a slow
//! consumer would deadlock; it never does.
//!
//! One [`Client`] is one session: when the connection ends, every pending
//! request fails with [`RequestError::ConnectionLost`], the incoming channel
//! closes, and [`Client::closed`] tells why. Reconnecting is the caller's job
//! (the app rebuilds its state from scratch on every join anyway).

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use super::auth::{Credentials, redact_query};
use super::codec::{DecodeError, Serializer};
use super::id::{PublicationId, RegistrationId, RequestId, SubscriptionId};
use super::message::{Event, Invocation, Message, Payload};
use super::raw::{self, RawEvent, RawPayload};
use super::session::{
    Output, Reply, RequestError, Session, SessionConfig, SessionError, SessionInfo, Success,
};
use super::tls::{self, TlsError};
use super::value::Dict;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type ReplyTx = oneshot::Sender<Reply>;

/// How many ready frames or commands one loop turn takes before writing, so
/// that a burst is written with one flush instead of one syscall per message.
const BATCH: usize = 64;

/// The WebSocket read buffer (see `connect_and_join`).
const READ_BUFFER: usize = 16 * 1024;

/// Connection settings. [`ClientConfig::new`] fills in the defaults.
#[derive(Debug, Clone)]
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
    /// Largest incoming message; larger is a protocol error.
    pub max_message_size: usize,
    /// Extra CA certificates (PEM) trusted for `wss://`.
    pub ca_file: Option<PathBuf>,
    /// Capacity of the incoming event/invocation channel.
    pub incoming_capacity: usize,
    /// Capacity of the command channel from handles to the socket task.
    pub command_capacity: usize,
    /// HELLO.Details.agent.
    pub agent: String,
    /// Deliver EVENTs as [`Incoming::RawEvent`], their payload kept as
    /// received (for a forwarder, which passes it on with
    /// [`Client::call_raw`]), instead of decoded [`Incoming::Event`]s.
    pub raw_event_payloads: bool,
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

/// What the router pushes to us without being asked.
#[derive(Debug)]
pub enum Incoming {
    Event(Event),
    /// An EVENT with its payload undecoded (`raw_event_payloads`).
    RawEvent(RawEvent),
    Invocation(Invocation),
    Interrupt {
        request: RequestId,
        options: Dict,
    },
    /// The router revoked a subscription or registration of ours.
    Revoked {
        kind: &'static str,
        details: Dict,
    },
}

/// The receiving end of [`Incoming`] messages; `None` once the session ended.
pub type IncomingRx = mpsc::Receiver<Incoming>;

/// A successful CALL's result.
#[derive(Debug, Clone, PartialEq)]
pub struct CallResult {
    pub details: Dict,
    pub payload: Payload,
}

enum Request {
    Subscribe {
        topic: String,
        options: Dict,
    },
    Unsubscribe(SubscriptionId),
    Publish {
        topic: String,
        options: Dict,
        payload: Payload,
    },
    Call {
        procedure: String,
        options: Dict,
        payload: Payload,
    },
    CallRaw {
        procedure: String,
        options: Dict,
        payload: RawPayload,
    },
    Register {
        procedure: String,
        options: Dict,
    },
    Unregister(RegistrationId),
}

enum Command {
    Request {
        request: Request,
        reply: ReplyTx,
        deadline: Instant,
    },
    Yield {
        request: RequestId,
        payload: Payload,
    },
    YieldError {
        request: RequestId,
        error: String,
        payload: Payload,
    },
    Leave {
        reason: String,
    },
}

/// State shared by the handles and the socket task. Only written by the
/// socket task (the close reason, once) and the atomics.
struct Shared {
    info: SessionInfo,
    serializer: Serializer,
    request_timeout: Duration,
    close_reason: OnceLock<CloseReason>,
    /// Cancelled by the socket task when it is gone.
    closed: CancellationToken,
    /// Cancelled by a handle to make the socket task stop at once.
    kill: CancellationToken,
    /// Events and invocations dropped because the incoming channel was full.
    dropped_incoming: AtomicU64,
}

/// A handle to one WAMP session. Clone freely; the session closes when the
/// last handle is dropped.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session", &self.shared.info.session)
            .field("serializer", &self.shared.serializer)
            .finish()
    }
}

impl Client {
    /// Connects, joins the realm, and starts the socket task. Returns the
    /// handle and the channel of incoming events and invocations.
    pub async fn connect(config: ClientConfig) -> Result<(Client, IncomingRx), ConnectError> {
        let limit = config.connect_timeout;
        match timeout(limit, connect_and_join(&config)).await {
            Ok(Ok((ws, session, serializer))) => Ok(start(config, ws, session, serializer)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ConnectError::Timeout(limit)),
        }
    }

    /// What WELCOME said about this session.
    pub fn session(&self) -> &SessionInfo {
        &self.shared.info
    }

    /// The serializer the router picked.
    pub fn serializer(&self) -> Serializer {
        self.shared.serializer
    }

    /// Events and invocations dropped because nobody took them fast enough.
    pub fn dropped_incoming(&self) -> u64 {
        self.shared.dropped_incoming.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// Waits until the session has ended and says why.
    pub async fn closed(&self) -> CloseReason {
        self.shared.closed.cancelled().await;
        self.close_reason()
            .unwrap_or(CloseReason::ConnectionLost("socket task ended".into()))
    }

    /// Why the session ended, if it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.close_reason.get().cloned()
    }

    pub async fn subscribe(
        &self,
        topic: &str,
        options: Dict,
    ) -> Result<SubscriptionId, RequestError> {
        let request = Request::Subscribe {
            topic: topic.to_owned(),
            options,
        };
        match self.request(request, None).await? {
            Success::Subscribed(id) => Ok(id),
            other => Err(unexpected(other)),
        }
    }

    pub async fn unsubscribe(&self, subscription: SubscriptionId) -> Result<(), RequestError> {
        self.request(Request::Unsubscribe(subscription), None)
            .await
            .map(drop)
    }

    /// Publishes an event. With `acknowledge: true` in `options` waits for the
    /// router's PUBLISHED and returns the publication id.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Payload,
        options: Dict,
    ) -> Result<Option<PublicationId>, RequestError> {
        let request = Request::Publish {
            topic: topic.to_owned(),
            options,
            payload,
        };
        match self.request(request, None).await? {
            Success::Published(id) => Ok(Some(id)),
            Success::Sent => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// Calls a procedure; `timeout` defaults to the configured request
    /// timeout. A call that times out is cancelled at the router.
    pub async fn call(
        &self,
        procedure: &str,
        payload: Payload,
        options: Dict,
        timeout: Option<Duration>,
    ) -> Result<CallResult, RequestError> {
        let request = Request::Call {
            procedure: procedure.to_owned(),
            options,
            payload,
        };
        self.call_request(request, timeout).await
    }

    /// [`Client::call`] with a payload received in an EVENT, sent on as it
    /// arrived (transcoded if this session's serializer differs).
    pub async fn call_raw(
        &self,
        procedure: &str,
        payload: RawPayload,
        options: Dict,
        timeout: Option<Duration>,
    ) -> Result<CallResult, RequestError> {
        let request = Request::CallRaw {
            procedure: procedure.to_owned(),
            options,
            payload,
        };
        self.call_request(request, timeout).await
    }

    async fn call_request(
        &self,
        request: Request,
        timeout: Option<Duration>,
    ) -> Result<CallResult, RequestError> {
        match self.request(request, timeout).await? {
            Success::Result { details, payload } => Ok(CallResult { details, payload }),
            other => Err(unexpected(other)),
        }
    }

    pub async fn register(
        &self,
        procedure: &str,
        options: Dict,
    ) -> Result<RegistrationId, RequestError> {
        let request = Request::Register {
            procedure: procedure.to_owned(),
            options,
        };
        match self.request(request, None).await? {
            Success::Registered(id) => Ok(id),
            other => Err(unexpected(other)),
        }
    }

    pub async fn unregister(&self, registration: RegistrationId) -> Result<(), RequestError> {
        self.request(Request::Unregister(registration), None)
            .await
            .map(drop)
    }

    /// Answers an invocation with a result.
    pub async fn yield_result(
        &self,
        request: RequestId,
        payload: Payload,
    ) -> Result<(), RequestError> {
        self.command(Command::Yield { request, payload }).await
    }

    /// Answers an invocation with an error URI.
    pub async fn yield_error(
        &self,
        request: RequestId,
        error: &str,
        payload: Payload,
    ) -> Result<(), RequestError> {
        let error = error.to_owned();
        self.command(Command::YieldError {
            request,
            error,
            payload,
        })
        .await
    }

    /// Says GOODBYE and waits (up to `within`) for the router's; closes the
    /// connection either way.
    pub async fn leave(&self, within: Duration) -> CloseReason {
        let reason = "wamp.close.normal".to_owned();
        if self.command(Command::Leave { reason }).await.is_ok() {
            let _ = timeout(within, self.shared.closed.cancelled()).await;
        }
        self.close().await
    }

    /// Drops the connection at once, without GOODBYE.
    pub async fn close(&self) -> CloseReason {
        self.shared.kill.cancel();
        self.closed().await
    }

    async fn command(&self, command: Command) -> Result<(), RequestError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| RequestError::ConnectionLost)
    }

    async fn request(
        &self,
        request: Request,
        timeout: Option<Duration>,
    ) -> Result<Success, RequestError> {
        let deadline = Instant::now() + timeout.unwrap_or(self.shared.request_timeout);
        let (reply, rx) = oneshot::channel();
        self.command(Command::Request {
            request,
            reply,
            deadline,
        })
        .await?;
        // The socket task resolves every request exactly once; a dropped
        // sender means the task died before it could.
        rx.await.unwrap_or(Err(RequestError::ConnectionLost))
    }
}

fn unexpected(success: Success) -> RequestError {
    RequestError::Wamp(super::session::WampError {
        error: "subtocall.error.unexpected_reply".into(),
        details: Dict::new(),
        payload: Payload::new(vec![format!("{success:?}").into()], Dict::new()),
    })
}

// ---------------------------------------------------------------- connecting

async fn connect_and_join(
    config: &ClientConfig,
) -> Result<(Ws, Session<ReplyTx>, Serializer), ConnectError> {
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
        .max_message_size(Some(config.max_message_size))
        .max_frame_size(Some(config.max_message_size));
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

fn start(
    config: ClientConfig,
    ws: Ws,
    session: Session<ReplyTx>,
    serializer: Serializer,
) -> (Client, IncomingRx) {
    let (command_tx, command_rx) = mpsc::channel(config.command_capacity.max(1));
    let (incoming_tx, incoming_rx) = mpsc::channel(config.incoming_capacity.max(1));
    let info = session
        .info()
        .cloned()
        .unwrap_or_else(|| unreachable!("start() is only called after WELCOME"));
    let shared = Arc::new(Shared {
        info,
        serializer,
        request_timeout: config.request_timeout,
        close_reason: OnceLock::new(),
        closed: CancellationToken::new(),
        kill: CancellationToken::new(),
        dropped_incoming: AtomicU64::new(0),
    });
    let task = SocketTask {
        ws,
        session,
        serializer,
        incoming: incoming_tx,
        shared: shared.clone(),
        ping_interval: config.ping_interval,
        ping_timeout: config.ping_timeout,
        raw_events: config.raw_event_payloads,
        unflushed: false,
        close: None,
    };
    tokio::spawn(task.run(command_rx));
    (
        Client {
            commands: command_tx,
            shared,
        },
        incoming_rx,
    )
}

// ---------------------------------------------------------------- the socket task

enum WsWrite {
    Feed(WsMessage),
    Flush,
}

struct SocketTask {
    ws: Ws,
    session: Session<ReplyTx>,
    serializer: Serializer,
    incoming: mpsc::Sender<Incoming>,
    shared: Arc<Shared>,
    ping_interval: Duration,
    ping_timeout: Duration,
    /// Decode EVENTs without their payload (see `raw`).
    raw_events: bool,
    /// Frames were fed to the sink (or a pong queued) since the last flush.
    unflushed: bool,
    /// Set when the session has ended; the loop stops.
    close: Option<CloseReason>,
}

impl SocketTask {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let reason = self.run_loop(&mut commands).await;
        tracing::debug!(session = %self.shared.info.session, %reason, "WAMP session ended");
        // Resolve everything still pending, and everything still queued.
        self.session.abandon();
        self.deliver_outputs();
        commands.close();
        while let Ok(command) = commands.try_recv() {
            if let Command::Request { reply, .. } = command {
                let _ = reply.send(Err(RequestError::ConnectionLost));
            }
        }
        let _ = self.shared.close_reason.set(reason);
        self.shared.closed.cancel();
        let _ = timeout(Duration::from_secs(1), self.ws.close(None)).await;
    }

    async fn run_loop(&mut self, commands: &mut mpsc::Receiver<Command>) -> CloseReason {
        let mut ping_at = Instant::now() + self.ping_interval;
        let mut pong_deadline: Option<Instant> = None;
        // One timer for request deadlines, re-armed only when the earliest
        // deadline changes (creating a timer per loop turn costs at high rates).
        let mut deadline_timer: Pin<Box<Sleep>> = Box::pin(sleep_until(Instant::now()));
        let mut armed: Option<Instant> = None;
        loop {
            if let Err(reason) = self.write_outputs().await {
                return reason;
            }
            if let Some(reason) = self.close.take() {
                return reason;
            }
            let next_deadline = self.session.next_deadline().map(Instant::from_std);
            if next_deadline != armed {
                if let Some(at) = next_deadline {
                    deadline_timer.as_mut().reset(at);
                }
                armed = next_deadline;
            }
            let pong_wait = pong_deadline.unwrap_or_else(|| Instant::now() + self.ping_timeout);
            // Every branch is cancel-safe: `StreamExt::next` and `Receiver::recv`
            // lose nothing when another branch wins, and the timers are plain
            // deadlines that are re-evaluated on the next turn.
            tokio::select! {
                _ = self.shared.kill.cancelled() => return CloseReason::ClosedLocally,
                frame = self.ws.next() => {
                    pong_deadline = None;
                    self.on_frame(frame);
                    // Take whatever else is already buffered before writing.
                    for _ in 1..BATCH {
                        if self.close.is_some() {
                            break;
                        }
                        match self.ws.next().now_or_never() {
                            Some(frame) => self.on_frame(frame),
                            None => break,
                        }
                    }
                }
                command = commands.recv() => match command {
                    Some(command) => {
                        self.on_command(command);
                        for _ in 1..BATCH {
                            match commands.try_recv() {
                                Ok(command) => self.on_command(command),
                                Err(_) => break,
                            }
                        }
                    }
                    // Every handle is gone: nobody can use the session any more.
                    None => self.session.leave("wamp.close.normal"),
                },
                _ = deadline_timer.as_mut(), if armed.is_some() => {
                    self.session.handle_timeouts(Instant::now().into_std());
                    armed = None;
                }
                _ = sleep_until(ping_at) => {
                    ping_at = Instant::now() + self.ping_interval;
                    if pong_deadline.is_none() {
                        pong_deadline = Some(Instant::now() + self.ping_timeout);
                    }
                    if let Err(reason) = self.write(WsWrite::Feed(WsMessage::Ping(Default::default()))).await {
                        return reason;
                    }
                    self.unflushed = true;
                }
                _ = sleep_until(pong_wait), if pong_deadline.is_some() => {
                    return CloseReason::PingTimeout(self.ping_timeout);
                }
            }
        }
    }

    /// Hands non-send outputs over, writes the sends, flushes once.
    async fn write_outputs(&mut self) -> Result<(), CloseReason> {
        while let Some(output) = self.session.poll_output() {
            let encoded = match output {
                Output::Send(msg) => encode_frame(self.serializer, &msg),
                Output::SendRawCall {
                    request,
                    options,
                    procedure,
                    payload,
                } => raw::encode_call(self.serializer, request, options, procedure, &payload)
                    .map(|bytes| ws_message(self.serializer, bytes)),
                other => {
                    self.deliver(other);
                    continue;
                }
            };
            let frame = match encoded {
                Ok(frame) => frame,
                Err(e) => {
                    // Only values a serializer cannot represent get here;
                    // the request it belonged to times out.
                    tracing::error!(error = %e, "dropping a message that cannot be encoded");
                    continue;
                }
            };
            self.write(WsWrite::Feed(frame)).await?;
            self.unflushed = true;
        }
        if self.unflushed {
            self.unflushed = false;
            self.write(WsWrite::Flush).await?;
        }
        Ok(())
    }

    /// Writes with a deadline: a router that stops reading must not wedge us.
    async fn write(&mut self, op: WsWrite) -> Result<(), CloseReason> {
        let limit = self.ping_interval + self.ping_timeout;
        let result = match op {
            WsWrite::Feed(frame) => timeout(limit, self.ws.feed(frame)).await,
            WsWrite::Flush => timeout(limit, self.ws.flush()).await,
        };
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CloseReason::ConnectionLost(e.to_string())),
            Err(_) => Err(CloseReason::ConnectionLost(format!(
                "router took none of our data for {limit:?}"
            ))),
        }
    }

    /// Delivers outputs without writing (used once the socket is gone).
    fn deliver_outputs(&mut self) {
        // `deliver` ignores what would have been written.
        while let Some(output) = self.session.poll_output() {
            self.deliver(output);
        }
    }

    fn deliver(&mut self, output: Output<ReplyTx>) {
        match output {
            Output::Reply { token, reply } => {
                // The caller may have stopped waiting; that is its business.
                let _ = token.send(reply);
            }
            Output::Event(event) => self.hand_over(Incoming::Event(event)),
            Output::RawEvent(event) => self.hand_over(Incoming::RawEvent(event)),
            Output::Invocation(inv) => self.hand_over(Incoming::Invocation(inv)),
            Output::Interrupt { request, options } => {
                self.hand_over(Incoming::Interrupt { request, options })
            }
            Output::Revoked { kind, details } => {
                tracing::warn!(kind, ?details, "router revoked a {kind}");
                self.hand_over(Incoming::Revoked { kind, details })
            }
            Output::Closed { reason } => self.close = Some(CloseReason::Goodbye(reason)),
            Output::Joined(_) | Output::Send(_) | Output::SendRawCall { .. } => {}
        }
    }

    /// Never waits: a full channel means the consumer is behind, and the
    /// socket must keep reading (our own call results come in on it).
    fn hand_over(&mut self, incoming: Incoming) {
        if let Err(e) = self.incoming.try_send(incoming) {
            let n = self.shared.dropped_incoming.fetch_add(1, Ordering::Relaxed) + 1;
            let full = matches!(e, mpsc::error::TrySendError::Full(_));
            // First drop, then every 1000th, so a flood cannot flood the log.
            if n == 1 || n.is_multiple_of(1000) {
                tracing::warn!(
                    dropped_total = n,
                    consumer_gone = !full,
                    "incoming event or invocation dropped: consumer not keeping up"
                );
            }
        }
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
                let detail = match frame {
                    Some(f) => format!("router closed the WebSocket ({} {})", f.code, f.reason),
                    None => "router closed the WebSocket".into(),
                };
                self.close = Some(CloseReason::ConnectionLost(detail));
                return;
            }
            Some(Err(tungstenite::Error::Capacity(e))) => {
                self.protocol_error(format!("message too large: {e}"));
                return;
            }
            // The peer vanished without a close handshake: a lost
            // connection, not a broken protocol.
            Some(Err(tungstenite::Error::Protocol(
                e @ tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            ))) => {
                self.close = Some(CloseReason::ConnectionLost(e.to_string()));
                return;
            }
            Some(Err(tungstenite::Error::Protocol(e))) => {
                self.close = Some(CloseReason::Protocol(format!("WebSocket: {e}")));
                return;
            }
            Some(Err(e)) => {
                self.close = Some(CloseReason::ConnectionLost(e.to_string()));
                return;
            }
            None => {
                self.close = Some(CloseReason::ConnectionLost("connection closed".into()));
                return;
            }
        };
        if self.raw_events
            && let Some(event) = raw::decode_event(self.serializer, &data)
        {
            if let Err(e) = self.session.handle_raw_event(event) {
                self.on_session_error(e);
            }
            return;
        }
        match self.serializer.decode(&data) {
            Ok(msg) => self.on_message(msg),
            Err(e @ (DecodeError::Malformed { .. } | DecodeError::Message(_))) => {
                self.protocol_error(e.to_string())
            }
        }
    }

    fn on_message(&mut self, msg: Message) {
        if let Err(e) = self.session.handle_message(msg) {
            self.on_session_error(e);
        }
    }

    fn on_session_error(&mut self, e: SessionError) {
        self.close = Some(match &e {
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
        self.close = Some(CloseReason::Protocol(detail));
        if let Some(abort) = abort {
            self.queue_abort(abort);
        }
    }

    fn queue_abort(&mut self, abort: Message) {
        if let Ok(frame) = encode_frame(self.serializer, &abort) {
            // Best effort, never blocks: the connection is being dropped.
            if self.ws.feed(frame).now_or_never().is_some() {
                self.unflushed = true;
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Request {
                request,
                reply,
                deadline,
            } => {
                let deadline = Some(deadline.into_std());
                let s = &mut self.session;
                match request {
                    Request::Subscribe { topic, options } => {
                        s.subscribe(&topic, options, reply, deadline)
                    }
                    Request::Unsubscribe(id) => s.unsubscribe(id, reply, deadline),
                    Request::Publish {
                        topic,
                        options,
                        payload,
                    } => s.publish(&topic, options, payload, reply, deadline),
                    Request::Call {
                        procedure,
                        options,
                        payload,
                    } => s.call(procedure, options, payload, reply, deadline),
                    Request::CallRaw {
                        procedure,
                        options,
                        payload,
                    } => s.call_raw(procedure, options, payload, reply, deadline),
                    Request::Register { procedure, options } => {
                        s.register(&procedure, options, reply, deadline)
                    }
                    Request::Unregister(id) => s.unregister(id, reply, deadline),
                }
            }
            Command::Yield { request, payload } => self.session.yield_result(request, payload),
            Command::YieldError {
                request,
                error,
                payload,
            } => self.session.yield_error(request, &error, payload),
            Command::Leave { reason } => self.session.leave(&reason),
        }
    }
}
