//! The client side of one WAMP session as a pure state machine: feed it the
//! messages the router sent and the current time, drain what to send and what
//! happened. It numbers requests (sequentially from 1), remembers what each
//! pending request was for, and resolves every one exactly once: by the
//! router's reply, by its deadline, or by [`Session::abandon`] when the
//! connection is gone. No IO and no clock: time is an argument.
//!
//! Each pending request carries a caller-chosen token `T` (the async client
//! uses the channel its caller waits on), handed back with the reply.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::auth::{AuthError, Credentials};
use super::deadlines::Deadlines;
use super::id::{IdHashing, PublicationId, RegistrationId, RequestId, SessionId, SubscriptionId};
use super::message::{Event, Invocation, Message, Payload, code};
use super::raw::{RawEvent, RawPayload};
use super::value::{Dict, Value};

/// What the session needs to know to join.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub realm: String,
    pub credentials: Credentials,
    /// Sent as HELLO.Details.agent.
    pub agent: String,
}

/// Everything the router told us in WELCOME that callers care about.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    pub session: SessionId,
    pub realm: String,
    pub authid: Option<String>,
    pub authrole: Option<String>,
    pub authmethod: Option<String>,
    /// The whole WELCOME.Details, including Crossbar's `x_cb_*` keys.
    pub details: Dict,
}

/// An ERROR reply from the router or from the peer behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct WampError {
    /// The error URI, e.g. `wamp.error.no_such_procedure`.
    pub error: String,
    pub details: Dict,
    pub payload: Payload,
}

impl WampError {
    /// The first positional argument if it is a string: routers and autobahn
    /// put the human-readable message there.
    pub fn message(&self) -> Option<&str> {
        self.payload.args.first().and_then(Value::as_str)
    }
}

impl std::fmt::Display for WampError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.message() {
            Some(m) => write!(f, "{}: {m}", self.error),
            None => f.write_str(&self.error),
        }
    }
}

/// A successful reply to one of our requests.
#[derive(Debug, Clone, PartialEq)]
pub enum Success {
    Subscribed(SubscriptionId),
    Unsubscribed,
    Published(PublicationId),
    /// Also used for a PUBLISH without `acknowledge`: done once written.
    Sent,
    Result {
        details: Dict,
        payload: Payload,
    },
    Registered(RegistrationId),
    Unregistered,
}

/// Why a request did not succeed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// The router (or the callee) answered with ERROR.
    #[error("{0}")]
    Wamp(WampError),
    /// No answer before the request's deadline. For a CALL a CANCEL was sent.
    #[error("no reply within the timeout")]
    Timeout,
    /// The connection ended before an answer arrived; the request may or may
    /// not have reached the router.
    #[error("connection lost before a reply arrived")]
    ConnectionLost,
    /// The session was not established when the request was made.
    #[error("not joined to a realm")]
    NotJoined,
    /// The request's message is larger than the router takes: it was not
    /// sent (`limit` known), or the router closed the connection over it
    /// (1009, `limit` unknown).
    #[error("message of {size} bytes is over the router's limit{}", .limit.map(|l| format!(" of {l} bytes")).unwrap_or_default())]
    TooLarge { size: usize, limit: Option<usize> },
    /// Not sent: it was still unwritten when the time it had to be written
    /// by passed ([`Session::send_last_by`]), as when the process was
    /// paused between making the request and writing it.
    #[error("not sent: still unwritten when it had to be written by")]
    Fenced,
}

/// Every reply is one of these, delivered exactly once per request.
pub type Reply = Result<Success, RequestError>;

/// What the caller must act on, in order.
#[derive(Debug)]
pub enum Output<T> {
    /// Write this message to the router.
    Send(Message),
    /// Write this CALL, whose payload is kept as received (see `raw`).
    SendRawCall {
        request: RequestId,
        options: Dict,
        procedure: Arc<str>,
        payload: RawPayload,
    },
    /// WELCOME arrived: the session is established.
    Joined(SessionInfo),
    /// A request is resolved.
    Reply {
        token: T,
        reply: Reply,
    },
    Event(Event),
    /// An EVENT fed through [`Session::handle_raw_event`].
    RawEvent(RawEvent),
    Invocation(Invocation),
    /// The router asks us to cancel an invocation we are handling.
    Interrupt {
        request: RequestId,
        options: Dict,
    },
    /// The router revoked one of our subscriptions or registrations
    /// (UNSUBSCRIBED/UNREGISTERED with request 0).
    Revoked {
        kind: &'static str,
        details: Dict,
    },
    /// The session ended with a GOODBYE (ours acknowledged, or the router's,
    /// already answered through a `Send`). The connection may be closed.
    Closed {
        reason: String,
    },
}

/// Why the session ended abnormally. After any of these the session is closed
/// and the connection should be dropped; [`SessionError::abort_message`] says
/// what to tell the router first, if anything.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SessionError {
    /// The router refused the join (or ended the session) with ABORT.
    #[error("router aborted the session: {reason}{}", message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Aborted {
        reason: String,
        message: Option<String>,
    },
    /// We could not answer the router's CHALLENGE.
    #[error("authentication failed: {0}")]
    Auth(#[from] AuthError),
    /// The router sent something the protocol does not allow here.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl SessionError {
    /// Whether retrying the same join can succeed. Credentials the router
    /// rejected, or a realm that does not exist, will be rejected again.
    pub fn is_terminal(&self) -> bool {
        match self {
            SessionError::Aborted { reason, .. } => matches!(
                reason.as_str(),
                "wamp.error.not_authorized"
                    | "wamp.error.authentication_failed"
                    | "wamp.error.no_such_realm"
                    | "wamp.error.no_such_role"
                    | "wamp.error.no_auth_method"
            ),
            SessionError::Auth(_) => true,
            SessionError::Protocol(_) => false,
        }
    }

    /// The ABORT to send before closing, for errors that are ours to report.
    pub fn abort_message(&self) -> Option<Message> {
        let (reason, message) = match self {
            SessionError::Aborted { .. } => return None,
            SessionError::Auth(e) => ("wamp.error.authentication_failed", e.to_string()),
            SessionError::Protocol(m) => ("wamp.error.protocol_violation", m.clone()),
        };
        Some(Message::Abort {
            details: Dict::new().with("message", message),
            reason: reason.into(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// HELLO not sent yet.
    Idle,
    /// HELLO sent; waiting for CHALLENGE or WELCOME.
    Joining,
    /// AUTHENTICATE sent; waiting for WELCOME.
    Authenticating,
    Established,
    /// Our GOODBYE sent; waiting for the router's.
    Leaving,
    Closed,
}

impl State {
    /// For "unexpected X while ..." errors.
    fn describe(self) -> &'static str {
        match self {
            State::Idle => "not joined",
            State::Joining => "waiting for WELCOME or CHALLENGE",
            State::Authenticating => "waiting for WELCOME",
            State::Closed => "closed",
            State::Established | State::Leaving => "established",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Subscribe,
    Unsubscribe,
    Publish,
    Call,
    Register,
    Unregister,
}

impl Kind {
    fn request_type(self) -> u64 {
        match self {
            Kind::Subscribe => code::SUBSCRIBE,
            Kind::Unsubscribe => code::UNSUBSCRIBE,
            Kind::Publish => code::PUBLISH,
            Kind::Call => code::CALL,
            Kind::Register => code::REGISTER,
            Kind::Unregister => code::UNREGISTER,
        }
    }
}

struct Pending<T> {
    kind: Kind,
    token: T,
    deadline: Option<Instant>,
    /// Written after this, it is not written at all ([`RequestError::Fenced`]).
    send_by: Option<Instant>,
    /// Its RESULT's payload is read (else it comes back empty).
    read_result: bool,
}

/// Counters of things that are not errors but worth knowing about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Replies for requests we no longer wait for (usually: answered after
    /// their deadline).
    pub stray_replies: u64,
}

/// One WAMP session, client side.
pub struct Session<T> {
    config: SessionConfig,
    state: State,
    info: Option<SessionInfo>,
    /// Whether the router's dealer supports CANCEL (checked in WELCOME).
    call_canceling: bool,
    next_request: RequestId,
    /// The request made last, for [`Session::send_last_by`].
    last_request: Option<RequestId>,
    pending: HashMap<RequestId, Pending<T>, IdHashing>,
    /// Deadlines of pending requests, earliest first.
    deadlines: Deadlines,
    outputs: VecDeque<Output<T>>,
    stats: SessionStats,
}

impl<T> Session<T> {
    pub fn new(config: SessionConfig) -> Session<T> {
        Session {
            config,
            state: State::Idle,
            info: None,
            call_canceling: false,
            next_request: RequestId(1),
            last_request: None,
            pending: HashMap::default(),
            deadlines: Deadlines::default(),
            outputs: VecDeque::new(),
            stats: SessionStats::default(),
        }
    }

    /// Starts the join: queues HELLO.
    pub fn join(&mut self) {
        debug_assert_eq!(self.state, State::Idle, "join() called twice");
        let mut details = Dict::new()
            .with("agent", self.config.agent.as_str())
            .with("roles", client_roles())
            .with(
                "authmethods",
                self.config
                    .credentials
                    .authmethods()
                    .iter()
                    .map(|m| Value::from(*m))
                    .collect::<Vec<_>>(),
            );
        if let Some(authid) = self.config.credentials.authid() {
            details.insert("authid", authid);
        }
        self.state = State::Joining;
        self.send(Message::Hello {
            realm: self.config.realm.clone(),
            details,
        });
    }

    /// Starts a clean close: queues GOODBYE. Pending requests stay pending;
    /// replies that arrive before the router's GOODBYE are still delivered.
    pub fn leave(&mut self, reason: &str) {
        if self.state == State::Established {
            self.state = State::Leaving;
            self.send(Message::Goodbye {
                details: Dict::new(),
                reason: reason.into(),
            });
        }
    }

    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub fn info(&self) -> Option<&SessionInfo> {
        self.info.as_ref()
    }

    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// How many requests are waiting for a reply.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// The next thing to act on, if any.
    pub fn poll_output(&mut self) -> Option<Output<T>> {
        self.outputs.pop_front()
    }

    /// The earliest request deadline; call [`Session::handle_timeouts`] then.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first()
    }

    // ------------------------------------------------------------ requests

    pub fn subscribe(&mut self, topic: &str, options: Dict, token: T, deadline: Option<Instant>) {
        self.request(Kind::Subscribe, token, deadline, |request| {
            Message::Subscribe {
                request,
                options,
                topic: topic.to_owned(),
            }
        });
    }

    pub fn unsubscribe(
        &mut self,
        subscription: SubscriptionId,
        token: T,
        deadline: Option<Instant>,
    ) {
        self.request(Kind::Unsubscribe, token, deadline, |request| {
            Message::Unsubscribe {
                request,
                subscription,
            }
        });
    }

    /// Publishes; with `acknowledge: true` in the options the reply is
    /// `Published`, otherwise `Sent` as soon as the message is queued.
    pub fn publish(
        &mut self,
        topic: &str,
        options: Dict,
        payload: Payload,
        token: T,
        deadline: Option<Instant>,
    ) {
        let acknowledge = matches!(options.get("acknowledge"), Some(Value::Bool(true)));
        if !self.is_established() {
            self.reply(token, Err(RequestError::NotJoined));
            return;
        }
        let request = self.take_request_id();
        self.send(Message::Publish {
            request,
            options,
            topic: topic.to_owned(),
            payload,
        });
        if acknowledge {
            self.track(request, Kind::Publish, token, deadline);
        } else {
            self.reply(token, Ok(Success::Sent));
        }
    }

    /// Calls a procedure. At the deadline the call is resolved as
    /// [`RequestError::Timeout`] and, if the router supports it, cancelled.
    pub fn call(
        &mut self,
        procedure: impl Into<String>,
        options: Dict,
        payload: Payload,
        token: T,
        deadline: Option<Instant>,
    ) {
        // Taking the String (not &str) saves a copy per call: the client
        // hands over the one it already owns.
        let procedure = procedure.into();
        self.request(Kind::Call, token, deadline, |request| Message::Call {
            request,
            options,
            procedure,
            payload,
        });
    }

    /// [`Session::call`] with a payload that is sent on as received.
    pub fn call_raw(
        &mut self,
        procedure: impl Into<Arc<str>>,
        options: Dict,
        payload: RawPayload,
        token: T,
        deadline: Option<Instant>,
    ) {
        self.request_output(Kind::Call, token, deadline, |request| Output::SendRawCall {
            request,
            options,
            procedure: procedure.into(),
            payload,
        });
    }

    pub fn register(
        &mut self,
        procedure: &str,
        options: Dict,
        token: T,
        deadline: Option<Instant>,
    ) {
        self.request(Kind::Register, token, deadline, |request| {
            Message::Register {
                request,
                options,
                procedure: procedure.to_owned(),
            }
        });
    }

    pub fn unregister(
        &mut self,
        registration: RegistrationId,
        token: T,
        deadline: Option<Instant>,
    ) {
        self.request(Kind::Unregister, token, deadline, |request| {
            Message::Unregister {
                request,
                registration,
            }
        });
    }

    /// Answers an INVOCATION successfully.
    pub fn yield_result(&mut self, request: RequestId, payload: Payload) {
        if self.is_established() {
            self.send(Message::Yield {
                request,
                options: Dict::new(),
                payload,
            });
        }
    }

    /// Answers an INVOCATION with an error.
    pub fn yield_error(&mut self, request: RequestId, error: &str, payload: Payload) {
        if self.is_established() {
            self.send(Message::Error {
                request_type: code::INVOCATION,
                request,
                details: Dict::new(),
                error: error.to_owned(),
                payload,
            });
        }
    }

    fn request(
        &mut self,
        kind: Kind,
        token: T,
        deadline: Option<Instant>,
        build: impl FnOnce(RequestId) -> Message,
    ) {
        self.request_output(kind, token, deadline, |request| {
            Output::Send(build(request))
        });
    }

    /// [`Session::request`] for requests whose output is not a plain
    /// message (a CALL with a payload kept as received).
    fn request_output(
        &mut self,
        kind: Kind,
        token: T,
        deadline: Option<Instant>,
        build: impl FnOnce(RequestId) -> Output<T>,
    ) {
        self.last_request = None;
        if !self.is_established() {
            self.reply(token, Err(RequestError::NotJoined));
            return;
        }
        let request = self.take_request_id();
        self.outputs.push_back(build(request));
        self.track(request, kind, token, deadline);
        self.last_request = Some(request);
    }

    /// The request made last (if it was made, and is not yet answered) must
    /// be written to the router before `at`, or not at all: the owner of the
    /// connection checks the clock right before it writes the request, and
    /// one still unwritten at `at` fails with [`RequestError::Fenced`]
    /// instead. For work that is only this client's to do until then (a
    /// queue entry's lease), so that a pause between deciding to call and
    /// writing the call cannot make the call after another took it over.
    pub fn send_last_by(&mut self, at: Instant) {
        if let Some(p) = self.last_request.and_then(|r| self.pending.get_mut(&r)) {
            p.send_by = Some(at);
        }
    }

    /// Nobody reads the RESULT of the request made last (a CALL whose
    /// answer only says "done"): the connection does not decode its payload
    /// or details, and the reply holds them empty.
    pub fn ignore_last_result(&mut self) {
        if let Some(p) = self.last_request.and_then(|r| self.pending.get_mut(&r)) {
            p.read_result = false;
        }
    }

    /// Whether the RESULT of `request` is read (see
    /// [`Session::ignore_last_result`]); an unknown request's is, so that
    /// it is checked in full.
    pub fn reads_result(&self, request: RequestId) -> bool {
        self.pending.get(&request).is_none_or(|p| p.read_result)
    }

    /// When `request` must be written by, if it must.
    pub fn send_by(&self, request: RequestId) -> Option<Instant> {
        self.pending.get(&request).and_then(|p| p.send_by)
    }

    /// Whether outputs wait to be polled.
    pub fn has_output(&self) -> bool {
        !self.outputs.is_empty()
    }

    /// Resolves a pending request with `error` without a word from the
    /// router: its message could not be sent, or cost the connection.
    /// Nothing happens for a request no longer pending.
    pub fn fail(&mut self, request: RequestId, error: RequestError) {
        if let Some(p) = self.pending.remove(&request) {
            if let Some(at) = p.deadline {
                let pending = &self.pending;
                self.deadlines
                    .remove(at, request, pending.len(), waits(pending));
            }
            self.reply(p.token, Err(error));
        }
    }

    fn take_request_id(&mut self) -> RequestId {
        let id = self.next_request;
        self.next_request = id.next();
        id
    }

    fn track(&mut self, request: RequestId, kind: Kind, token: T, deadline: Option<Instant>) {
        self.pending.insert(
            request,
            Pending {
                kind,
                token,
                deadline,
                send_by: None,
                read_result: true,
            },
        );
        if let Some(at) = deadline {
            let pending = &self.pending;
            self.deadlines
                .insert(at, request, pending.len(), waits(pending));
        }
    }

    fn send(&mut self, msg: Message) {
        self.outputs.push_back(Output::Send(msg));
    }

    fn reply(&mut self, token: T, reply: Reply) {
        self.outputs.push_back(Output::Reply { token, reply });
    }

    /// Takes a pending request out, checking it is of the kind the reply is for.
    fn resolve(
        &mut self,
        request: RequestId,
        kind: Kind,
        reply: Reply,
    ) -> Result<(), SessionError> {
        match self.pending.get(&request) {
            None => {
                self.stats.stray_replies += 1;
                Ok(())
            }
            Some(p) if p.kind != kind => Err(SessionError::Protocol(format!(
                "reply of type {kind:?} for request {request}, which is a {:?}",
                p.kind
            ))),
            Some(_) => {
                if let Some(p) = self.pending.remove(&request) {
                    if let Some(at) = p.deadline {
                        let pending = &self.pending;
                        self.deadlines
                            .remove(at, request, pending.len(), waits(pending));
                    }
                    self.reply(p.token, reply);
                }
                Ok(())
            }
        }
    }

    // ------------------------------------------------------------ time

    /// Resolves every request whose deadline is at or before `now` as a
    /// timeout; a timed-out CALL is cancelled at the router when possible.
    pub fn handle_timeouts(&mut self, now: Instant) {
        loop {
            let pending = &self.pending;
            let Some(request) = self.deadlines.pop_due(now, pending.len(), waits(pending)) else {
                break;
            };
            if let Some(p) = self.pending.remove(&request) {
                if p.kind == Kind::Call && self.call_canceling && self.is_established() {
                    self.send(Message::Cancel {
                        request,
                        options: Dict::new().with("mode", "killnowait"),
                    });
                }
                self.reply(p.token, Err(RequestError::Timeout));
            }
        }
    }

    // ------------------------------------------------------------ connection loss

    /// The connection is gone: every pending request is resolved as
    /// [`RequestError::ConnectionLost`] and the session is closed.
    pub fn abandon(&mut self) {
        self.state = State::Closed;
        self.deadlines.clear();
        let pending: Vec<_> = self.pending.drain().collect();
        for (_, p) in pending {
            self.reply(p.token, Err(RequestError::ConnectionLost));
        }
    }

    // ------------------------------------------------------------ input

    /// Feeds one message from the router. An error closes the session; the
    /// caller sends [`SessionError::abort_message`] (if any), calls
    /// [`Session::abandon`] and drops the connection.
    pub fn handle_message(&mut self, msg: Message) -> Result<(), SessionError> {
        let result = self.dispatch(msg);
        if result.is_err() {
            self.state = State::Closed;
        }
        result
    }

    fn dispatch(&mut self, msg: Message) -> Result<(), SessionError> {
        match (self.state, msg) {
            (_, Message::Abort { details, reason }) => Err(SessionError::Aborted {
                reason,
                message: details.get_str("message").map(str::to_owned),
            }),
            (State::Joining, Message::Challenge { authmethod, extra }) => {
                let signature = self.config.credentials.respond(&authmethod, &extra)?;
                self.state = State::Authenticating;
                self.send(Message::Authenticate {
                    signature,
                    extra: Dict::new(),
                });
                Ok(())
            }
            (State::Joining | State::Authenticating, Message::Welcome { session, details }) => {
                self.call_canceling = feature(&details, "dealer", "call_canceling");
                let info = SessionInfo {
                    session,
                    realm: details
                        .get_str("realm")
                        .unwrap_or(&self.config.realm)
                        .to_owned(),
                    authid: details.get_str("authid").map(str::to_owned),
                    authrole: details.get_str("authrole").map(str::to_owned),
                    authmethod: details.get_str("authmethod").map(str::to_owned),
                    details,
                };
                self.state = State::Established;
                self.info = Some(info.clone());
                self.outputs.push_back(Output::Joined(info));
                Ok(())
            }
            (State::Established | State::Leaving, msg) => self.established(msg),
            (state, msg) => Err(SessionError::Protocol(format!(
                "unexpected {} while {}",
                msg.name(),
                state.describe()
            ))),
        }
    }

    /// Feeds an EVENT whose payload was kept undecoded (see `raw`); it comes
    /// out as [`Output::RawEvent`], in order with everything else. Accepted
    /// exactly where [`Session::handle_message`] accepts an EVENT.
    pub fn handle_raw_event(&mut self, event: RawEvent) -> Result<(), SessionError> {
        match self.state {
            State::Established | State::Leaving => {
                self.outputs.push_back(Output::RawEvent(event));
                Ok(())
            }
            state => {
                self.state = State::Closed;
                Err(SessionError::Protocol(format!(
                    "unexpected EVENT while {}",
                    state.describe()
                )))
            }
        }
    }

    fn established(&mut self, msg: Message) -> Result<(), SessionError> {
        match msg {
            Message::Event(event) => {
                self.outputs.push_back(Output::Event(event));
                Ok(())
            }
            Message::Result {
                request,
                details,
                payload,
            } => self.resolve(
                request,
                Kind::Call,
                Ok(Success::Result { details, payload }),
            ),
            Message::Subscribed {
                request,
                subscription,
            } => self.resolve(
                request,
                Kind::Subscribe,
                Ok(Success::Subscribed(subscription)),
            ),
            Message::Unsubscribed { request, details } if request.0 == 0 => {
                self.outputs.push_back(Output::Revoked {
                    kind: "subscription",
                    details,
                });
                Ok(())
            }
            Message::Unsubscribed { request, .. } => {
                self.resolve(request, Kind::Unsubscribe, Ok(Success::Unsubscribed))
            }
            Message::Published {
                request,
                publication,
            } => self.resolve(request, Kind::Publish, Ok(Success::Published(publication))),
            Message::Registered {
                request,
                registration,
            } => self.resolve(
                request,
                Kind::Register,
                Ok(Success::Registered(registration)),
            ),
            Message::Unregistered { request, details } if request.0 == 0 => {
                self.outputs.push_back(Output::Revoked {
                    kind: "registration",
                    details,
                });
                Ok(())
            }
            Message::Unregistered { request, .. } => {
                self.resolve(request, Kind::Unregister, Ok(Success::Unregistered))
            }
            Message::Error {
                request_type,
                request,
                details,
                error,
                payload,
            } => {
                let kind = [
                    Kind::Subscribe,
                    Kind::Unsubscribe,
                    Kind::Publish,
                    Kind::Call,
                    Kind::Register,
                    Kind::Unregister,
                ]
                .into_iter()
                .find(|k| k.request_type() == request_type)
                .ok_or_else(|| {
                    SessionError::Protocol(format!("ERROR for request type {request_type}"))
                })?;
                let err = WampError {
                    error,
                    details,
                    payload,
                };
                self.resolve(request, kind, Err(RequestError::Wamp(err)))
            }
            Message::Invocation(inv) => {
                self.outputs.push_back(Output::Invocation(inv));
                Ok(())
            }
            Message::Interrupt { request, options } => {
                self.outputs
                    .push_back(Output::Interrupt { request, options });
                Ok(())
            }
            Message::Goodbye { reason, .. } => {
                if self.state == State::Established {
                    // The router is closing: acknowledge, as the spec asks.
                    self.send(Message::Goodbye {
                        details: Dict::new(),
                        reason: "wamp.close.goodbye_and_out".into(),
                    });
                }
                self.state = State::Closed;
                self.outputs.push_back(Output::Closed { reason });
                Ok(())
            }
            other => Err(SessionError::Protocol(format!(
                "a router must not send {}",
                other.name()
            ))),
        }
    }
}

/// The roles and features we announce in HELLO.
fn client_roles() -> Dict {
    let features = |names: &[&str]| {
        Dict::new().with(
            "features",
            names
                .iter()
                .map(|n| (*n, Value::Bool(true)))
                .collect::<Dict>(),
        )
    };
    Dict::new()
        .with(
            "caller",
            features(&["call_canceling", "caller_identification"]),
        )
        .with(
            "callee",
            features(&[
                "shared_registration",
                "caller_identification",
                "pattern_based_registration",
            ]),
        )
        .with(
            "publisher",
            features(&["publisher_exclusion", "publisher_identification"]),
        )
        .with(
            "subscriber",
            features(&["publisher_identification", "pattern_based_subscription"]),
        )
}

/// Whether WELCOME.Details.roles.<role>.features.<name> is true.
fn feature(details: &Dict, role: &str, name: &str) -> bool {
    details
        .get("roles")
        .and_then(Value::as_dict)
        .and_then(|r| r.get(role))
        .and_then(Value::as_dict)
        .and_then(|r| r.get("features"))
        .and_then(Value::as_dict)
        .and_then(|f| f.get(name))
        == Some(&Value::Bool(true))
}

/// Whether a request still waits with deadline `at` (for [`Deadlines`]).
fn waits<T>(
    pending: &HashMap<RequestId, Pending<T>, IdHashing>,
) -> impl Fn(RequestId, Instant) -> bool + '_ {
    move |request, at| {
        pending
            .get(&request)
            .is_some_and(|p| p.deadline == Some(at))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::wamp::codec::Serializer;

    fn config(credentials: Credentials) -> SessionConfig {
        SessionConfig {
            realm: "realm1".into(),
            credentials,
            agent: "subtocall-test".into(),
        }
    }

    fn drain<T>(s: &mut Session<T>) -> Vec<Output<T>> {
        std::iter::from_fn(|| s.poll_output()).collect()
    }

    fn sent<T>(outputs: &[Output<T>]) -> Vec<&Message> {
        outputs
            .iter()
            .filter_map(|o| match o {
                Output::Send(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    /// The router's frame as captured from a real Crossbar.
    fn router(frame: &str) -> Message {
        Serializer::Json
            .decode(frame.as_bytes())
            .expect("valid frame")
    }

    const WELCOME: &str = r#"[2,1273811465337858,{"x_cb_node":"vm-9572","realm":"realm1","authid":"backend","authrole":"backend","authmethod":"wampcra","authprovider":"static","roles":{"dealer":{"features":{"call_canceling":true,"shared_registration":true}},"broker":{"features":{}}}}]"#;

    fn joined(credentials: Credentials) -> Session<u32> {
        let mut s = Session::new(config(credentials));
        s.join();
        s.handle_message(router(WELCOME)).unwrap();
        drain(&mut s);
        s
    }

    fn established() -> Session<u32> {
        joined(Credentials::Anonymous)
    }

    fn replies(outputs: Vec<Output<u32>>) -> Vec<(u32, Reply)> {
        outputs
            .into_iter()
            .filter_map(|o| match o {
                Output::Reply { token, reply } => Some((token, reply)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn wampcra_join_answers_the_captured_challenge_and_reports_the_welcome() {
        let mut s: Session<u32> = Session::new(config(Credentials::WampCra {
            authid: "backend".into(),
            secret: "secret123".into(),
        }));
        s.join();
        let out = drain(&mut s);
        let [Message::Hello { realm, details }] = sent(&out)[..] else {
            panic!("expected HELLO, got {out:?}")
        };
        assert_eq!(realm, "realm1");
        assert_eq!(details.get_str("authid"), Some("backend"));
        assert_eq!(
            details.get("authmethods"),
            Some(&Value::List(vec!["wampcra".into()]))
        );

        s.handle_message(router(r#"[4,"wampcra",{"challenge":"{\"authid\": \"backend\", \"authrole\": \"backend\", \"authmethod\": \"wampcra\", \"authprovider\": \"static\", \"session\": 1273811465337858, \"nonce\": \"yaIJ3p4nj8CPXkDIedepnRYwGt6aPAA4jxh37WXvAolxGVmyP79Qtz5tYqw++VWn\", \"timestamp\": \"2026-11-22T10:21:58.893Z\"}"}]"#)).unwrap();
        let out = drain(&mut s);
        let [Message::Authenticate { signature, .. }] = sent(&out)[..] else {
            panic!("expected AUTHENTICATE, got {out:?}")
        };
        assert_eq!(signature, "F9tgUiXwkJiu+vOVgOMvpo9eC/66Y0tteOo/IE/4LOk=");

        s.handle_message(router(WELCOME)).unwrap();
        let out = drain(&mut s);
        let [Output::Joined(info)] = &out[..] else {
            panic!("expected Joined, got {out:?}")
        };
        assert_eq!(info.session, SessionId(1273811465337858));
        assert_eq!(info.authrole.as_deref(), Some("backend"));
        assert!(s.is_established());
    }

    #[test]
    fn abort_on_join_is_a_terminal_error_with_the_routers_reason_and_message() {
        let mut s: Session<u32> = Session::new(config(Credentials::WampCra {
            authid: "nobody".into(),
            secret: "x".into(),
        }));
        s.join();
        let err = s
            .handle_message(router(r#"[3,{"message":"no principal with authid \"nobody\" exists"},"wamp.error.not_authorized"]"#))
            .unwrap_err();
        assert_eq!(
            err,
            SessionError::Aborted {
                reason: "wamp.error.not_authorized".into(),
                message: Some("no principal with authid \"nobody\" exists".into()),
            }
        );
        assert!(err.is_terminal());
        assert!(
            err.abort_message().is_none(),
            "never answer ABORT with ABORT"
        );
        assert!(s.is_closed());
    }

    #[test]
    fn send_last_by_marks_the_request_made_last_and_no_other() {
        let mut s = established();
        let at = Instant::now();
        s.call("a", Dict::new(), Payload::default(), 1, None);
        s.call("b", Dict::new(), Payload::default(), 2, None);
        s.send_last_by(at);
        assert_eq!(s.send_by(RequestId(1)), None);
        assert_eq!(s.send_by(RequestId(2)), Some(at));
        // A request refused at once (not joined) is not pending: marking it
        // must not fall on the one made before.
        s.leave("wamp.close.normal");
        s.call("c", Dict::new(), Payload::default(), 3, None);
        s.send_last_by(at + Duration::from_secs(1));
        assert_eq!(s.send_by(RequestId(2)), Some(at));
        assert_eq!(s.send_by(RequestId(3)), None);
    }

    #[test]
    fn a_result_nobody_reads_is_marked_on_the_request_made_last_alone() {
        let mut s = established();
        s.call("a", Dict::new(), Payload::default(), 1, None);
        s.call("b", Dict::new(), Payload::default(), 2, None);
        s.ignore_last_result();
        assert!(s.reads_result(RequestId(1)));
        assert!(!s.reads_result(RequestId(2)));
        // Unknown requests are read in full (so checked in full).
        assert!(s.reads_result(RequestId(99)));
    }

    #[test]
    fn request_ids_are_sequential_from_one() {
        let mut s = established();
        s.subscribe("a", Dict::new(), 1, None);
        s.call("b", Dict::new(), Payload::default(), 2, None);
        s.register("c", Dict::new(), 3, None);
        let out = drain(&mut s);
        let ids: Vec<u64> = sent(&out)
            .iter()
            .map(|m| match m {
                Message::Subscribe { request, .. }
                | Message::Call { request, .. }
                | Message::Register { request, .. } => request.0,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, [1, 2, 3]);
    }

    #[test]
    fn each_reply_resolves_its_own_request_once() {
        let mut s = established();
        s.subscribe("com.example.status", Dict::new(), 10, None);
        s.call(
            "com.example.SUB_status",
            Dict::new(),
            Payload::default(),
            20,
            None,
        );
        drain(&mut s);
        s.handle_message(router(r#"[50,2,{},["ok"]]"#)).unwrap();
        s.handle_message(router(r#"[33,1,4702470485854943]"#))
            .unwrap();
        // A duplicate reply is stray, not a second resolution.
        s.handle_message(router(r#"[50,2,{},["again"]]"#)).unwrap();
        let got = replies(drain(&mut s));
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, 20);
        assert!(
            matches!(&got[0].1, Ok(Success::Result { payload, .. }) if payload.args == vec![Value::from("ok")])
        );
        assert_eq!(
            got[1],
            (
                10,
                Ok(Success::Subscribed(SubscriptionId(4702470485854943)))
            )
        );
        assert_eq!(s.stats().stray_replies, 1);
        assert_eq!(s.pending_requests(), 0);
    }

    #[test]
    fn error_reply_carries_the_uri_and_message() {
        let mut s = established();
        s.call(
            "com.example.not_registered",
            Dict::new(),
            Payload::default(),
            7,
            None,
        );
        drain(&mut s);
        s.handle_message(router(r#"[8,48,1,{},"wamp.error.no_such_procedure",["no callee registered for procedure <com.example.not_registered>"]]"#)).unwrap();
        let got = replies(drain(&mut s));
        let (7, Err(RequestError::Wamp(e))) = &got[0] else {
            panic!("{got:?}")
        };
        assert_eq!(e.error, "wamp.error.no_such_procedure");
        assert_eq!(
            e.message(),
            Some("no callee registered for procedure <com.example.not_registered>")
        );
    }

    #[test]
    fn reply_of_the_wrong_kind_is_a_protocol_violation() {
        let mut s = established();
        s.subscribe("t", Dict::new(), 1, None);
        drain(&mut s);
        let err = s.handle_message(router(r#"[50,1,{}]"#)).unwrap_err();
        assert!(matches!(err, SessionError::Protocol(_)));
        assert!(
            !err.is_terminal(),
            "a broken router may be fine after a reconnect"
        );
        assert!(
            matches!(err.abort_message(), Some(Message::Abort { reason, .. }) if reason == "wamp.error.protocol_violation")
        );
    }

    #[test]
    fn messages_a_router_must_not_send_are_protocol_violations() {
        for frame in [
            r#"[1,"realm1",{}]"#,
            r#"[48,1,{},"x"]"#,
            r#"[32,1,{},"x"]"#,
            r#"[8,99,1,{},"x"]"#,
        ] {
            let mut s = established();
            assert!(
                matches!(
                    s.handle_message(router(frame)),
                    Err(SessionError::Protocol(_))
                ),
                "{frame}"
            );
        }
        let mut s: Session<u32> = Session::new(config(Credentials::Anonymous));
        s.join();
        assert!(
            s.handle_message(router(r#"[36,1,2,{}]"#)).is_err(),
            "EVENT before WELCOME"
        );
    }

    #[test]
    fn call_deadline_resolves_as_timeout_and_cancels_at_the_router() {
        let t0 = Instant::now();
        let mut s = established();
        s.call(
            "slow",
            Dict::new(),
            Payload::default(),
            1,
            Some(t0 + Duration::from_secs(5)),
        );
        s.call(
            "fast",
            Dict::new(),
            Payload::default(),
            2,
            Some(t0 + Duration::from_secs(10)),
        );
        drain(&mut s);
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(5)));

        s.handle_timeouts(t0 + Duration::from_secs(4));
        assert!(drain(&mut s).is_empty(), "nothing due yet");

        s.handle_timeouts(t0 + Duration::from_secs(5));
        let out = drain(&mut s);
        assert!(matches!(
            sent(&out)[..],
            [Message::Cancel { request: RequestId(1), options }] if options.get_str("mode") == Some("killnowait")
        ));
        assert_eq!(replies(out), vec![(1, Err(RequestError::Timeout))]);
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(10)));

        // The late answer to the cancelled call is stray, not a crash.
        s.handle_message(router(r#"[8,48,1,{},"wamp.error.canceled"]"#))
            .unwrap();
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.stats().stray_replies, 1);
    }

    #[test]
    fn an_answered_call_leaves_no_deadline_behind() {
        let t0 = Instant::now();
        let mut s = established();
        s.call(
            "p",
            Dict::new(),
            Payload::default(),
            1,
            Some(t0 + Duration::from_secs(5)),
        );
        s.handle_message(router(r#"[50,1,{}]"#)).unwrap();
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn connection_loss_resolves_every_pending_request_exactly_once() {
        let mut s = established();
        for token in 0..5 {
            s.call("p", Dict::new(), Payload::default(), token, None);
        }
        s.subscribe("t", Dict::new(), 5, None);
        s.handle_message(router(r#"[50,2,{}]"#)).unwrap();
        drain(&mut s);
        s.abandon();
        let mut tokens: Vec<u32> = replies(drain(&mut s))
            .into_iter()
            .map(|(t, r)| {
                assert_eq!(r, Err(RequestError::ConnectionLost));
                t
            })
            .collect();
        tokens.sort();
        assert_eq!(tokens, [0, 2, 3, 4, 5]);
        assert_eq!(s.pending_requests(), 0);
        s.abandon();
        assert!(
            drain(&mut s).is_empty(),
            "a second abandon resolves nothing twice"
        );
    }

    #[test]
    fn requests_before_the_join_fail_at_once_with_not_joined() {
        let mut s: Session<u32> = Session::new(config(Credentials::Anonymous));
        s.call("p", Dict::new(), Payload::default(), 1, None);
        assert_eq!(
            replies(drain(&mut s)),
            vec![(1, Err(RequestError::NotJoined))]
        );
    }

    #[test]
    fn publish_without_acknowledge_completes_when_queued() {
        let mut s = established();
        s.publish("t", Dict::new(), Payload::default(), 1, None);
        s.publish(
            "t",
            Dict::new().with("acknowledge", true),
            Payload::default(),
            2,
            None,
        );
        let out = drain(&mut s);
        assert_eq!(sent(&out).len(), 2);
        assert_eq!(replies(out), vec![(1, Ok(Success::Sent))]);
        s.handle_message(router(r#"[17,2,5135393630563124]"#))
            .unwrap();
        assert_eq!(
            replies(drain(&mut s)),
            vec![(2, Ok(Success::Published(PublicationId(5135393630563124))))]
        );
    }

    #[test]
    fn router_goodbye_is_acknowledged_and_closes() {
        let mut s = established();
        s.handle_message(router(r#"[6,{},"wamp.close.system_shutdown"]"#))
            .unwrap();
        let out = drain(&mut s);
        assert!(
            matches!(sent(&out)[..], [Message::Goodbye { reason, .. }] if reason == "wamp.close.goodbye_and_out")
        );
        assert!(
            matches!(out.last(), Some(Output::Closed { reason }) if reason == "wamp.close.system_shutdown")
        );
        assert!(s.is_closed());
    }

    #[test]
    fn our_goodbye_waits_for_the_routers_and_still_takes_replies() {
        let mut s = established();
        s.call("p", Dict::new(), Payload::default(), 1, None);
        s.leave("wamp.close.normal");
        let out = drain(&mut s);
        assert!(matches!(sent(&out)[..], [_, Message::Goodbye { .. }]));
        s.handle_message(router(r#"[50,1,{}]"#)).unwrap();
        s.handle_message(router(r#"[6,{},"wamp.close.normal"]"#))
            .unwrap();
        let out = drain(&mut s);
        assert!(
            sent(&out).is_empty(),
            "no GOODBYE echo to an acknowledgement"
        );
        assert!(matches!(
            out[0],
            Output::Reply {
                token: 1,
                reply: Ok(_)
            }
        ));
        assert!(matches!(out[1], Output::Closed { .. }));
    }

    #[test]
    fn events_and_invocations_are_passed_up_in_order() {
        let mut s = established();
        s.handle_message(router(r#"[36,5,6,{},[1]]"#)).unwrap();
        s.handle_message(router(r#"[68,20,7,{"caller":1},[0],{"k":0}]"#))
            .unwrap();
        s.handle_message(router(r#"[36,5,8,{}]"#)).unwrap();
        let out = drain(&mut s);
        assert!(matches!(&out[0], Output::Event(e) if e.publication == PublicationId(6)));
        assert!(matches!(&out[1], Output::Invocation(i) if i.request == RequestId(20)));
        assert!(matches!(&out[2], Output::Event(e) if e.publication == PublicationId(8)));
        s.yield_result(
            RequestId(20),
            Payload::new(vec!["done".into()], Dict::new()),
        );
        assert!(matches!(
            sent(&drain(&mut s))[..],
            [Message::Yield {
                request: RequestId(20),
                ..
            }]
        ));
    }

    #[test]
    fn hello_announces_the_features_we_rely_on() {
        let mut s: Session<u32> = Session::new(config(Credentials::Anonymous));
        s.join();
        let out = drain(&mut s);
        let [Message::Hello { details, .. }] = sent(&out)[..] else {
            panic!()
        };
        let roles = details.get("roles").and_then(Value::as_dict).unwrap();
        for role in ["caller", "callee", "publisher", "subscriber"] {
            assert!(roles.get(role).is_some(), "{role}");
        }
        assert!(feature(details, "subscriber", "pattern_based_subscription"));
        assert!(feature(details, "callee", "shared_registration"));
        assert_eq!(details.get("authid"), None, "anonymous sends no authid");
    }
}
