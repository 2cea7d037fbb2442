//! The session bootstrap: on every join, discovery starts from nothing
//! (meta subscriptions first, then the registration list and each
//! registration), and from then on follows the meta events; it subscribes
//! and unsubscribes the topics the registrations stand for, and counts each
//! registration's callees for `/status`. It owns [`Discovery`] and makes
//! its requests on the loop's session; the replies come back here by their
//! [`Token`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::fatal::Fatal;
use super::token::Token;
use crate::discovery::meta;
use crate::discovery::topic::MatchPolicy;
use crate::discovery::{self, Action, Discovery, GetOutcome, Note};
use crate::metrics::Metrics;
use crate::wamp::id::IdHashing;
use crate::wamp::session::{Session, Success};
use crate::wamp::{Dict, Payload, RegistrationId, RequestError, SubscriptionId, Value};

pub struct Bootstrap {
    discovery: Discovery,
    /// Deadline given to discovery's requests.
    request_timeout: Duration,
    /// This session's subscriptions to the registration meta topics.
    meta: HashMap<SubscriptionId, &'static str, IdHashing>,
    /// Meta subscriptions not yet confirmed; the list call waits for all.
    meta_pending: usize,
    joined: bool,
    /// Set when the session must be dropped and joined anew.
    rejoin: Option<String>,
    /// Callees of each tracked registration, as the router last counted.
    callees: HashMap<RegistrationId, u64, IdHashing>,
    /// The router refused `count_callees` (said once).
    callees_refused: bool,
    /// Groups known from before this process (kept in Redis), each until
    /// when it is kept without a registration: remembered at the first
    /// join.
    kept: Vec<(String, Instant)>,
}

impl Bootstrap {
    pub fn new(discovery: Discovery, request_timeout: Duration) -> Bootstrap {
        Bootstrap {
            discovery,
            request_timeout,
            meta: HashMap::default(),
            meta_pending: 0,
            joined: false,
            rejoin: None,
            callees: HashMap::default(),
            callees_refused: false,
            kept: Vec::new(),
        }
    }

    /// Groups known from before this process, each until when it is kept
    /// without a registration (see [`Discovery::remember`]).
    pub fn keep_groups(&mut self, kept: Vec<(String, Instant)>) {
        self.kept = kept;
    }

    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    pub fn discovery_mut(&mut self) -> &mut Discovery {
        &mut self.discovery
    }

    /// A new session: discovery starts from nothing, meta topics first,
    /// but for the groups it knew (and those kept from before this
    /// process): they read their topics for their grace period unless
    /// their registrations come back, their events waiting for a callee.
    pub fn on_joined(&mut self, session: &mut Session<Token>, now: Instant) {
        let mut known = self.discovery.snapshot(now);
        known.extend(
            std::mem::take(&mut self.kept)
                .into_iter()
                .map(|(p, until)| (std::sync::Arc::from(p), until)),
        );
        self.discovery.reset();
        for (procedure, until) in known {
            if !self.discovery.remember(&procedure, until, now) {
                tracing::warn!(%procedure, "a kept group's procedure is not a SUB_ registration here (marker or filter changed?); not kept");
            }
        }
        self.callees.clear();
        self.meta.clear();
        self.meta_pending = meta::META_TOPICS.len();
        self.joined = true;
        self.rejoin = None;
        let deadline = Some(now + self.request_timeout);
        for topic in meta::META_TOPICS {
            session.subscribe(topic, Dict::new(), Token::MetaSubscribe(topic), deadline);
        }
    }

    /// The session is gone.
    pub fn on_session_end(&mut self) {
        self.joined = false;
        self.meta.clear();
        self.meta_pending = 0;
    }

    pub fn is_joined(&self) -> bool {
        self.joined
    }

    /// Joined, meta subscriptions in place and discovery complete.
    pub fn is_synced(&self) -> bool {
        self.joined && self.meta_pending == 0 && self.discovery.is_synced()
    }

    /// Why the session must be dropped and joined anew, once.
    pub fn take_rejoin(&mut self) -> Option<String> {
        self.rejoin.take()
    }

    /// The meta topic `subscription` is ours for, if it is one.
    pub fn meta_topic(&self, subscription: SubscriptionId) -> Option<&'static str> {
        self.meta.get(&subscription).copied()
    }

    /// The router revoked a subscription or registration of ours.
    pub fn on_revoked(&mut self, kind: &str, details: &Dict) {
        tracing::warn!(kind, ?details, "router revoked a {kind}");
        match details.get_u64("subscription").map(SubscriptionId) {
            Some(id) if self.meta.contains_key(&id) => {
                // Without meta events discovery would go stale.
                self.rejoin = Some("the router revoked a meta subscription".into());
            }
            Some(id) => self.discovery.on_unsubscribed(id),
            None => tracing::warn!(kind, "router revoked a {kind} we do not hold"),
        }
    }

    /// The reply to one of the bootstrap's requests (every token but
    /// `Deliver`, which is a stage's).
    pub fn on_reply(
        &mut self,
        token: Token,
        reply: Result<Success, RequestError>,
        session: &mut Session<Token>,
        now: Instant,
    ) -> Result<(), Fatal> {
        match (token, reply) {
            (Token::Deliver(id), _) => {
                tracing::debug!(delivery = %id, "a delivery's reply reached the bootstrap")
            }
            // A previous session's discovery answer (answered "connection
            // lost" when it ended): the new session starts from nothing.
            (_, Err(RequestError::ConnectionLost)) if !self.joined => {}
            (Token::MetaSubscribe(topic), Ok(Success::Subscribed(id))) => {
                self.meta.insert(id, topic);
                self.meta_pending -= 1;
                if self.meta_pending == 0 {
                    // Listing only after every meta subscription is in place
                    // means nothing registered meanwhile can be missed.
                    let deadline = Some(now + self.request_timeout);
                    session.call(
                        meta::LIST,
                        Dict::new(),
                        Payload::default(),
                        Token::List,
                        deadline,
                    );
                }
            }
            (Token::MetaSubscribe(topic), Err(RequestError::Wamp(e))) => {
                return Err(Fatal::MetaApi {
                    what: format!("SUBSCRIBE to {topic}"),
                    error: e.to_string(),
                    permission: "'subscribe' on wamp.registration.* (e.g. a 'wamp.' prefix rule)",
                });
            }
            (Token::List, Err(RequestError::Wamp(e))) => {
                return Err(Fatal::MetaApi {
                    what: format!("CALL to {}", meta::LIST),
                    error: e.to_string(),
                    permission: "'call' on wamp.registration.* (e.g. a 'wamp.' prefix rule)",
                });
            }
            (Token::MetaSubscribe(_) | Token::List, Err(e)) => {
                // Timeout or lost connection during the bootstrap: start over.
                self.rejoin = Some(format!("discovery bootstrap failed: {e}"));
            }
            (Token::List, Ok(Success::Result { payload, .. })) => {
                match meta::parse_list_result(&payload.args) {
                    Ok(list) => {
                        tracing::info!(registrations = list.ids().count(), "registrations listed");
                        self.discovery.on_list_result(list.ids());
                    }
                    Err(e) => {
                        self.rejoin = Some(format!("malformed wamp.registration.list result: {e}"))
                    }
                }
            }
            (Token::Get(id), result) => {
                let outcome = match result {
                    Ok(Success::Result { payload, .. }) => {
                        match meta::parse_get_result(&payload.args) {
                            Ok(info) => GetOutcome::Found(info),
                            Err(e) => GetOutcome::Failed(e.to_string()),
                        }
                    }
                    Ok(other) => GetOutcome::Failed(format!("unexpected reply {other:?}")),
                    Err(RequestError::Wamp(e)) if e.error == meta::NO_SUCH_REGISTRATION => {
                        GetOutcome::NoSuchRegistration
                    }
                    Err(e) => GetOutcome::Failed(e.to_string()),
                };
                self.discovery.on_get_result(id, outcome, now);
                self.count_callees(id, session, now);
            }
            (Token::CountCallees(id), Ok(Success::Result { payload, .. })) => {
                match payload.args.first().and_then(Value::as_u64) {
                    Some(n) if self.discovery.tracks(id) => {
                        self.callees.insert(id, n);
                    }
                    Some(_) => {}
                    None => tracing::debug!(registration = %id, "unexpected count_callees result"),
                }
            }
            (Token::CountCallees(id), result) => {
                self.callees.remove(&id);
                match result {
                    Err(RequestError::Wamp(e)) if e.error == "wamp.error.not_authorized" => {
                        if !self.callees_refused {
                            self.callees_refused = true;
                            tracing::warn!(
                                error = %e,
                                "the router refused {}: /status shows callee counts as unknown \
                                 (grant 'call' on it to subtocall's role, see doc/crossbar.md)",
                                meta::COUNT_CALLEES
                            );
                        }
                    }
                    other => {
                        tracing::debug!(registration = %id, result = ?other.err(), "callees not counted")
                    }
                }
            }
            (Token::Subscribe(key), Ok(Success::Subscribed(id))) => {
                self.discovery.on_subscribed(&key, id)
            }
            (Token::Subscribe(key), result) => {
                let error = match result {
                    Err(e) => e.to_string(),
                    Ok(other) => format!("unexpected reply {other:?}"),
                };
                self.discovery.on_subscribe_failed(&key, error, now)
            }
            (Token::Unsubscribe(id), Ok(_)) => self.discovery.on_unsubscribed(id),
            (Token::Unsubscribe(id), Err(e)) => {
                self.discovery.on_unsubscribe_failed(id, e.to_string())
            }
            (token @ (Token::MetaSubscribe(_) | Token::List), Ok(other)) => {
                self.rejoin = Some(format!("unexpected reply to {token:?}: {other:?}"));
            }
        }
        Ok(())
    }

    /// An event on one of the meta subscriptions.
    pub fn on_meta_event(
        &mut self,
        topic: &'static str,
        args: &[Value],
        session: &mut Session<Token>,
        now: Instant,
    ) {
        match meta::parse_meta_event(topic, args) {
            Ok(meta_event) => {
                let counted = match &meta_event {
                    meta::MetaEvent::Registered { registration, .. }
                    | meta::MetaEvent::Unregistered { registration, .. } => Some(*registration),
                    meta::MetaEvent::Deleted { registration, .. } => {
                        self.callees.remove(registration);
                        None
                    }
                    meta::MetaEvent::Created { .. } => None,
                };
                self.discovery.on_meta_event(meta_event, now);
                if let Some(id) = counted {
                    self.count_callees(id, session, now);
                }
            }
            Err(e) => tracing::warn!(topic, error = %e, "ignoring malformed meta event"),
        }
    }

    /// Asks the router how many callees a tracked registration has now
    /// (after each change: the last answer is the current count).
    fn count_callees(&mut self, id: RegistrationId, session: &mut Session<Token>, now: Instant) {
        if !self.discovery.tracks(id) || self.callees_refused {
            return;
        }
        let args = Payload::new(vec![Value::UInt(id.0)], Dict::new());
        let deadline = Some(now + self.request_timeout);
        session.call(
            meta::COUNT_CALLEES,
            Dict::new(),
            args,
            Token::CountCallees(id),
            deadline,
        );
    }

    /// The callees of registration `id`, as the router last counted them.
    pub fn callees(&self, id: RegistrationId) -> Option<u64> {
        self.callees.get(&id).copied()
    }

    /// Makes discovery's requests and logs its notes; `tracked` is told
    /// of each exact registration newly tracked (its destination may
    /// prepare for it). Whether discovery had anything to say (its groups
    /// may have changed).
    pub fn poll(
        &mut self,
        session: &mut Session<Token>,
        now: Instant,
        mut tracked: impl FnMut(&str),
    ) -> bool {
        let outputs = self.discovery.poll(now);
        let changed = !outputs.is_empty();
        for output in outputs {
            match output {
                discovery::Output::Action(action) => self.execute(action, session, now),
                discovery::Output::Note(note) => {
                    if let Note::RegistrationTracked { uri, topic, .. } = &note
                        && topic.policy == MatchPolicy::Exact
                    {
                        tracked(uri);
                    }
                    log_note(&note);
                }
            }
        }
        changed
    }

    fn execute(&mut self, action: Action, session: &mut Session<Token>, now: Instant) {
        let deadline = Some(now + self.request_timeout);
        match action {
            Action::Subscribe(key) => {
                let options = match key.policy {
                    MatchPolicy::Wildcard => Dict::new().with("match", "wildcard"),
                    // Prefix topics are never subscribed (discovery ignores
                    // prefix registrations); exact needs no option.
                    MatchPolicy::Prefix => Dict::new().with("match", "prefix"),
                    MatchPolicy::Exact => Dict::new(),
                };
                let topic = key.topic.clone();
                session.subscribe(&topic, options, Token::Subscribe(key), deadline);
            }
            Action::Unsubscribe { subscription, .. } => {
                session.unsubscribe(subscription, Token::Unsubscribe(subscription), deadline)
            }
            Action::GetRegistration(id) => {
                let args = Payload::new(vec![Value::UInt(id.0)], Dict::new());
                session.call(meta::GET, Dict::new(), args, Token::Get(id), deadline);
            }
        }
    }

    /// Draining: every forwarding subscription is given up (events already
    /// on their way are still delivered).
    pub fn unsubscribe_all(&mut self, session: &mut Session<Token>, now: Instant) {
        let subscriptions: Vec<_> = self.discovery.subscriptions().collect();
        for id in subscriptions {
            let at = Some(now + self.request_timeout);
            session.unsubscribe(id, Token::Unsubscribe(id), at);
        }
    }

    /// When discovery next has something to do (a grace period ending, a
    /// request to retry).
    pub fn next_wake(&self) -> Option<Instant> {
        self.discovery.next_deadline()
    }

    /// Registrations, groups and subscriptions, as gauges.
    pub fn set_gauges(&self, m: &Metrics) {
        m.registrations_tracked
            .set(self.discovery.tracked_registrations() as i64);
        m.groups.set(self.discovery.group_count() as i64);
        m.subscriptions_active
            .set(self.discovery.active_subscriptions() as i64);
    }
}

fn log_note(note: &Note) {
    match note.level() {
        discovery::Level::Debug => tracing::debug!("{note}"),
        discovery::Level::Info => tracing::info!("{note}"),
        discovery::Level::Warn => tracing::warn!("{note}"),
    }
}
