//! A handle-based WAMP client for tools and tests (`subtocall check`, the
//! benchmark, the integration tests): one task drives a [`Connection`];
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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use super::codec::Serializer;
use super::connection::{ClientConfig, CloseReason, ConnectError, Connection};
use super::id::{PublicationId, RegistrationId, RequestId, SubscriptionId};
use super::message::{Event, Invocation, Payload};
use super::raw::{RawEvent, RawPayload};
use super::session::{Output, Reply, RequestError, SessionInfo, Success};
use super::value::Dict;

type ReplyTx = oneshot::Sender<Reply>;

/// How many ready frames or commands one loop turn takes before writing, so
/// that a burst is written with one flush instead of one syscall per message.
const BATCH: usize = 64;

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
        let conn = Connection::connect(&config).await?;
        Ok(start(config, conn))
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

fn start(config: ClientConfig, conn: Connection<ReplyTx>) -> (Client, IncomingRx) {
    let (command_tx, command_rx) = mpsc::channel(config.command_capacity.max(1));
    let (incoming_tx, incoming_rx) = mpsc::channel(config.incoming_capacity.max(1));
    let shared = Arc::new(Shared {
        info: conn.info().clone(),
        serializer: conn.serializer(),
        request_timeout: config.request_timeout,
        close_reason: OnceLock::new(),
        closed: CancellationToken::new(),
        kill: CancellationToken::new(),
        dropped_incoming: AtomicU64::new(0),
    });
    let task = SocketTask {
        conn,
        incoming: incoming_tx,
        shared: shared.clone(),
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

/// Drives the [`Connection`] for the handles: commands in, outputs out.
struct SocketTask {
    conn: Connection<ReplyTx>,
    incoming: mpsc::Sender<Incoming>,
    shared: Arc<Shared>,
}

impl SocketTask {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let reason = self.run_loop(&mut commands).await;
        tracing::debug!(session = %self.shared.info.session, %reason, "WAMP session ended");
        // Resolve everything still pending, and everything still queued.
        self.conn.shut().await;
        while let Some(output) = self.conn.poll_output() {
            self.deliver(output);
        }
        commands.close();
        while let Ok(command) = commands.try_recv() {
            if let Command::Request { reply, .. } = command {
                let _ = reply.send(Err(RequestError::ConnectionLost));
            }
        }
        let _ = self.shared.close_reason.set(reason);
        self.shared.closed.cancel();
    }

    async fn run_loop(&mut self, commands: &mut mpsc::Receiver<Command>) -> CloseReason {
        loop {
            while let Some(output) = self.conn.poll_output() {
                self.deliver(output);
            }
            self.conn.flush().await;
            if let Some(reason) = self.conn.close_reason() {
                return reason.clone();
            }
            // Every branch is cancel-safe: `Connection::wait` is, and
            // `Receiver::recv` loses nothing when another branch wins.
            tokio::select! {
                _ = self.shared.kill.cancelled() => return CloseReason::ClosedLocally,
                _ = self.conn.wait() => {}
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
                    None => self.conn.session().leave("wamp.close.normal"),
                },
            }
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
            Output::Joined(_)
            | Output::Send(_)
            | Output::SendRawCall { .. }
            | Output::Closed { .. } => {}
        }
    }

    /// Never waits: a full channel means the consumer is behind, and the
    /// socket must keep reading (our own call results come in on it). This
    /// handle-based client is for tools and tests; the sidecar drives its
    /// [`Connection`] itself and takes everything.
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

    fn on_command(&mut self, command: Command) {
        let s = self.conn.session();
        match command {
            Command::Request {
                request,
                reply,
                deadline,
            } => {
                let deadline = Some(deadline.into_std());
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
            Command::Yield { request, payload } => s.yield_result(request, payload),
            Command::YieldError {
                request,
                error,
                payload,
            } => s.yield_error(request, &error, payload),
            Command::Leave { reason } => s.leave(&reason),
        }
    }
}
