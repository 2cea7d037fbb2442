//! Discovery: which topics to subscribe to, given the dealer's registrations.
//!
//! A pure state machine in the rumqtt style: no IO, no tokio, no clock (time
//! is an argument). The async layer feeds it meta events, call results and
//! subscription completions, executes the [`Action`]s that [`Discovery::poll`]
//! returns and logs the [`Note`]s. It may call `crate::wamp` data types and its
//! own submodules: [`meta`] (payload parsing) and [`topic`] (URI mapping).
//!
//! The model: *registrations* (tracked by id, pitfall P10) map to *topics*; a
//! topic is wanted while at least one registration maps to it, and for a grace
//! period after its last one left. Each topic also records where its
//! subscription on the router stands (none, subscribing, subscribed,
//! unsubscribing, failed), and `poll` emits whatever SUBSCRIBE or UNSUBSCRIBE
//! closes the gap between wanted and actual, never two at once for one topic.
//!
//! Driving it:
//!
//! ```text
//! on (re)join:   reset(); subscribe meta::META_TOPICS; await all SUBSCRIBED;
//!                CALL meta::LIST -> on_list_result(list.ids())
//! meta EVENT     -> on_meta_event(parse_meta_event(topic, args)?, now)
//! get answered   -> on_get_result(id, outcome, now)
//! SUBSCRIBED     -> on_subscribed(&key, id)      ERROR -> on_subscribe_failed(&key, err, now)
//! UNSUBSCRIBED   -> on_unsubscribed(id)          ERROR -> on_unsubscribe_failed(id, err)
//! after each of these, and when next_deadline() passes: for out in poll(now) { execute or log }
//! ```

pub mod meta;
pub mod topic;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use regex::Regex;

use crate::forward::dedup::group_mix;
use crate::wamp::id::IdHashing;
use crate::wamp::{RegistrationId, SubscriptionId};

pub use meta::{
    MetaError, MetaEvent, RegistrationInfo, RegistrationList, parse_get_result, parse_list_result,
    parse_meta_event,
};
pub use topic::{Classification, Group, Mapper, Marker, MarkerError, MatchPolicy, TopicKey};

/// How long to wait before retrying a refused SUBSCRIBE or a failed
/// `wamp.registration.get`, unless set with [`Discovery::with_retry_delay`].
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(30);

/// How many deleted registration ids to remember. The memory only has to
/// outlive the `get` calls in flight when a delete arrives, so a thousand
/// covers any realistic burst while staying a few tens of kB.
const RECENTLY_DELETED_CAPACITY: usize = 1024;

/// Something for the async layer to do; each is answered with one completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// SUBSCRIBE to `topic.topic`, with options `{"match": "wildcard"}` for a
    /// wildcard key (and no `match` option for an exact one). Answer with
    /// [`Discovery::on_subscribed`] or [`Discovery::on_subscribe_failed`].
    Subscribe(TopicKey),
    /// UNSUBSCRIBE `subscription`. Answer with [`Discovery::on_unsubscribed`]
    /// or [`Discovery::on_unsubscribe_failed`].
    Unsubscribe {
        topic: TopicKey,
        subscription: SubscriptionId,
    },
    /// CALL `wamp.registration.get [id]`. Answer with
    /// [`Discovery::on_get_result`].
    GetRegistration(RegistrationId),
}

/// Something worth one log line. Actions are not repeated here: the caller
/// logs what it executes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    RegistrationTracked {
        id: RegistrationId,
        uri: String,
        invoke: String,
        topic: TopicKey,
        group: Group,
    },
    RegistrationUntracked {
        id: RegistrationId,
        uri: String,
        topic: TopicKey,
    },
    /// A SUB_-looking prefix registration; said once per registration id.
    PrefixRegistrationIgnored { id: RegistrationId, uri: String },
    /// A SUB_ registration excluded by the include filter.
    RegistrationFilteredOut { id: RegistrationId, uri: String },
    /// A group's last registration left; the group keeps getting events
    /// (and the topic its subscription) for `grace`, in case a backend comes
    /// back (rolling restart).
    GraceStarted {
        topic: TopicKey,
        group: Group,
        grace: Duration,
    },
    /// A registration came back within the grace period: the group simply
    /// continues.
    TopicResumed { topic: TopicKey, group: Group },
    /// A group's grace period ended: it gets no more events. The topic's
    /// subscription stays while another group reads it.
    GroupLeft { topic: TopicKey, group: Group },
    Subscribed {
        topic: TopicKey,
        subscription: SubscriptionId,
    },
    SubscribeFailed {
        topic: TopicKey,
        error: String,
        retry_in: Duration,
    },
    Unsubscribed {
        topic: TopicKey,
        subscription: SubscriptionId,
    },
    /// The subscription is forgotten anyway (see
    /// [`Discovery::on_unsubscribe_failed`]).
    UnsubscribeFailed {
        topic: TopicKey,
        subscription: SubscriptionId,
        error: String,
    },
    GetFailed {
        id: RegistrationId,
        error: String,
        retry_in: Duration,
    },
    /// The initial list and every `get` it needed are answered: ready.
    Synced { registrations: usize },
}

/// A group as log lines name it: "default group" or "group audit", and
/// "default batch group" or "batch group audit".
pub struct GroupName<'a>(pub &'a Group);

impl fmt::Display for GroupName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let batch = if self.0.batch { "batch " } else { "" };
        match &self.0.name {
            None => write!(f, "default {batch}group"),
            Some(g) => write!(f, "{batch}group {g}"),
        }
    }
}

/// How loud a [`Note`] should be logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
}

impl Note {
    pub fn level(&self) -> Level {
        match self {
            Note::PrefixRegistrationIgnored { .. }
            | Note::SubscribeFailed { .. }
            | Note::UnsubscribeFailed { .. }
            | Note::GetFailed { .. } => Level::Warn,
            Note::RegistrationFilteredOut { .. } => Level::Debug,
            _ => Level::Info,
        }
    }
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Note::RegistrationTracked {
                id,
                uri,
                invoke,
                topic,
                group,
            } => write!(
                f,
                "tracking SUB_ registration {uri} (id {id}, invoke {invoke}) for topic {topic}, {}",
                GroupName(group)
            ),
            Note::RegistrationUntracked { id, uri, topic } => write!(
                f,
                "SUB_ registration {uri} (id {id}) is gone; it was for topic {topic}"
            ),
            Note::PrefixRegistrationIgnored { id, uri } => write!(
                f,
                "ignoring prefix registration {uri} (id {id}): a prefix registration \
                 stands for no single topic; register it exact or wildcard"
            ),
            Note::RegistrationFilteredOut { id, uri } => write!(
                f,
                "ignoring SUB_ registration {uri} (id {id}): excluded by the filter"
            ),
            Note::GraceStarted {
                topic,
                group,
                grace,
            } => write!(
                f,
                "last registration of the {} of topic {topic} is gone; it keeps getting events for {grace:?}",
                GroupName(group)
            ),
            Note::TopicResumed { topic, group } => write!(
                f,
                "the {} of topic {topic} has a registration again within the grace period; nothing missed",
                GroupName(group)
            ),
            Note::GroupLeft { topic, group } => write!(
                f,
                "the {} of topic {topic} left after its grace period; the other groups go on",
                GroupName(group)
            ),
            Note::Subscribed {
                topic,
                subscription,
            } => write!(f, "subscribed to {topic} (subscription {subscription})"),
            Note::SubscribeFailed {
                topic,
                error,
                retry_in,
            } => write!(
                f,
                "subscribing to {topic} failed: {error}; retrying in {retry_in:?}"
            ),
            Note::Unsubscribed {
                topic,
                subscription,
            } => write!(f, "unsubscribed from {topic} (subscription {subscription})"),
            Note::UnsubscribeFailed {
                topic,
                subscription,
                error,
            } => write!(
                f,
                "unsubscribing from {topic} (subscription {subscription}) failed: {error}; \
                 forgetting it"
            ),
            Note::GetFailed {
                id,
                error,
                retry_in,
            } => write!(
                f,
                "wamp.registration.get for {id} failed: {error}; retrying in {retry_in:?}"
            ),
            Note::Synced { registrations } => write!(
                f,
                "registration discovery complete: {registrations} SUB_ registrations"
            ),
        }
    }
}

/// What [`Discovery::poll`] returns, in the order things happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Action(Action),
    Note(Note),
}

/// How a `wamp.registration.get` call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetOutcome {
    Found(RegistrationInfo),
    /// The call failed with [`meta::NO_SUCH_REGISTRATION`]: the registration
    /// was deleted meanwhile (P11). Treated exactly like `on_delete`.
    NoSuchRegistration,
    /// Any other failure (including an unparsable result): retried after the
    /// retry delay; the registration stays unknown until then.
    Failed(String),
}

/// Where one EVENT goes: one procedure per group reading its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<'a> {
    /// The procedures to CALL, one per group: computed once for exact
    /// subscriptions, derived from the event's concrete topic for wildcard
    /// ones. Empty when every group has left (the subscription is being
    /// given up).
    pub procedures: Vec<String>,
    /// The event's concrete topic.
    pub topic: &'a str,
}

/// One group's share of an EVENT (see [`Discovery::route_into`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The procedure to CALL (or the Redis list to push to), shared with
    /// the route: routing an event copies no name.
    pub procedure: Arc<str>,
    /// The group's [`group_mix`], for de-duplication per group.
    pub mix: u64,
    /// Whether the group is served in batches.
    pub batch: bool,
    /// The procedure's hash ([`crate::forward::key::fnv1a64`]): the unit
    /// that waits while the group has no callee, and its batch line.
    pub unit: u64,
    /// The group's policy (`None`: the global settings).
    pub policy: Option<Arc<crate::forward::policy::Policy>>,
}

/// A group of an exact topic as [`Discovery::group_states`] gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    pub procedure: Arc<str>,
    /// The procedure's hash ([`Destination::unit`]).
    pub unit: u64,
    pub topic: TopicKey,
    pub group: Group,
    /// No callee now (its last registration left; within its grace
    /// period): its events wait.
    pub away: bool,
    /// The policy file's rule that applies (its index), and its settings;
    /// `None`: the defaults.
    pub rule: Option<usize>,
    pub policy: Option<Arc<crate::forward::policy::Policy>>,
}

/// One group of one topic, as [`Discovery::mappings`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping<'a> {
    pub topic: &'a TopicKey,
    pub group: &'a Group,
    /// The procedure called: for a pattern topic, the registration's URI
    /// (each event's procedure is derived from its topic). `None` for a
    /// pattern group in its grace period.
    pub procedure: Option<String>,
    /// The group's tracked registrations (empty in the grace period).
    pub registrations: Vec<RegistrationId>,
    pub subscription: Option<SubscriptionId>,
    /// `none`, `subscribing`, `subscribed`, `unsubscribing` or `refused`.
    pub subscription_state: &'static str,
    /// Its last registration left; it stays for the grace period.
    pub in_grace: bool,
    /// The policy file's rule that applies (its index), and its settings;
    /// `None`: the defaults.
    pub rule: Option<usize>,
    pub policy: Option<&'a crate::forward::policy::Policy>,
}

/// Why an EVENT cannot be routed. Both mean: drop the event and count it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Not a subscription of ours (any more): e.g. an event that was in
    /// flight while we unsubscribed.
    #[error("event for unknown subscription {0}")]
    UnknownSubscription(SubscriptionId),
    /// A pattern subscription's EVENT must carry `details.topic`; without it
    /// the concrete procedure cannot be named.
    #[error("event for {pattern} subscription {subscription} carries no details.topic")]
    MissingTopic {
        subscription: SubscriptionId,
        pattern: TopicKey,
    },
}

/// The discovery state machine. See the module docs for how to drive it.
#[derive(Debug)]
pub struct Discovery {
    mapper: Mapper,
    grace: Duration,
    /// The policy file's rules: each group's policy is resolved once, when
    /// the group is first seen, and again by [`Discovery::set_policies`].
    policies: Option<Arc<crate::policy::Policies>>,
    retry_delay: Duration,
    /// SUB_ registrations, by id: the only thing that makes a topic wanted.
    tracked: HashMap<RegistrationId, Tracked, IdHashing>,
    /// Registrations seen and deliberately ignored (ordinary, filtered out,
    /// prefix), so that a second report of one (`on_create` and `get`) is a
    /// no-op and the prefix warning is given once.
    ignored: HashSet<RegistrationId>,
    /// `wamp.registration.get` calls owed or awaited. Ordered so that `poll`
    /// output is deterministic.
    gets: BTreeMap<RegistrationId, PendingGet>,
    /// Deleted ids, so that a late `get` answer or event cannot resurrect one.
    /// Crossbar picks registration ids at random from 2^53, so an id never
    /// comes back.
    deleted: RecentIds,
    /// Every topic that is wanted or still has a subscription (in flight) on
    /// the router. Ordered for deterministic output.
    topics: BTreeMap<TopicKey, Topic>,
    /// Subscriptions that exist on the router, for routing EVENTs.
    routes: HashMap<SubscriptionId, RouteEntry, IdHashing>,
    /// Groups over every topic, as of the last `poll`.
    group_count: usize,
    sync: SyncState,
    /// Notes gathered by the inputs, handed out (with actions) by `poll`.
    out: Vec<Output>,
}

#[derive(Debug)]
struct Tracked {
    uri: String,
    topic: TopicKey,
    group: Group,
}

#[derive(Debug)]
struct PendingGet {
    state: GetState,
    /// Asked for because of the initial list: readiness waits for it.
    initial: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GetState {
    /// To be emitted by the next `poll`.
    Due,
    InFlight,
    RetryAt(Instant),
}

#[derive(Debug)]
struct Topic {
    /// The groups reading the topic, each with its registrations. A group
    /// whose registrations are all gone stays for the grace period, then
    /// leaves; the subscription stays while any group does.
    groups: BTreeMap<Group, Members>,
    subscription: SubState,
}

#[derive(Debug)]
struct Members {
    /// The tracked registrations of the group. A set, not a count, so that a
    /// registration reported twice can never be counted twice.
    registrations: BTreeSet<RegistrationId>,
    /// Set when the last registration leaves: the group stays until then.
    /// Invariant: only ever set while `registrations` is empty.
    grace_until: Option<Instant>,
    /// For an exact topic, the group's procedure, computed once rather than
    /// per event. `None` for patterns: it depends on each event's topic.
    procedure: Option<Arc<str>>,
    /// The procedure's hash, likewise (0 for patterns).
    unit: u64,
    /// The group's [`group_mix`], for de-duplication per group.
    mix: u64,
    /// The policy file's rule that applies (its index) and its settings;
    /// `None`: the defaults.
    rule: Option<usize>,
    policy: Option<Arc<crate::forward::policy::Policy>>,
}

impl Topic {
    /// Whether some group reads it: one with a registration, or one whose
    /// backends are away (within its grace period), whose events wait for
    /// them.
    fn wanted(&self) -> bool {
        !self.groups.is_empty()
    }
}

impl Members {
    fn new(
        key: &TopicKey,
        group: &Group,
        marker: &Marker,
        policies: Option<&crate::policy::Policies>,
    ) -> Members {
        let procedure: Option<Arc<str>> = (key.policy == MatchPolicy::Exact)
            .then(|| marker.procedure_for(&key.topic, group).into());
        let mut members = Members {
            registrations: BTreeSet::new(),
            grace_until: None,
            unit: procedure
                .as_deref()
                .map_or(0, |p| crate::forward::key::fnv1a64(p.as_bytes())),
            procedure,
            mix: group_mix(group.name.as_deref(), group.batch),
            rule: None,
            policy: None,
        };
        members.resolve(key, group, marker, policies);
        members
    }

    /// Its policy under `policies`: the first rule matching its
    /// registration's URI.
    fn resolve(
        &mut self,
        key: &TopicKey,
        group: &Group,
        marker: &Marker,
        policies: Option<&crate::policy::Policies>,
    ) {
        let resolved = policies.map(|p| match &self.procedure {
            Some(procedure) => p.resolve(procedure),
            None => p.resolve(&marker.procedure_for(&key.topic, group)),
        });
        (self.rule, self.policy) = resolved.map_or((None, None), |r| (r.rule, r.policy));
    }

    /// How long it reads after its last registration left.
    fn grace(&self, default: Duration) -> Duration {
        self.policy.as_ref().map_or(default, |p| p.grace_period)
    }
}

/// Where the topic's subscription on the router stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubState {
    None,
    Subscribing,
    Subscribed(SubscriptionId),
    Unsubscribing(SubscriptionId),
    /// The last SUBSCRIBE was refused (e.g. not authorized). Retrying at once
    /// would only hammer the router with the same refusal; permissions can
    /// change at runtime though (dynamic authorizers), so retry after the
    /// retry delay rather than never.
    Failed {
        retry_at: Instant,
    },
}

#[derive(Debug)]
struct RouteEntry {
    topic: TopicKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncState {
    /// The initial `wamp.registration.list` is not answered yet.
    AwaitingList,
    /// Listed; waiting for `get` answers.
    Fetching,
    Synced,
}

impl Discovery {
    /// `grace_period` is how long a topic's subscription outlives its last
    /// registration; zero unsubscribes at once.
    pub fn new(marker: Marker, filter: Option<Regex>, grace_period: Duration) -> Discovery {
        Discovery {
            mapper: Mapper::new(marker, filter),
            grace: grace_period,
            policies: None,
            retry_delay: DEFAULT_RETRY_DELAY,
            tracked: HashMap::default(),
            ignored: HashSet::new(),
            gets: BTreeMap::new(),
            deleted: RecentIds::new(RECENTLY_DELETED_CAPACITY),
            topics: BTreeMap::new(),
            routes: HashMap::default(),
            group_count: 0,
            sync: SyncState::AwaitingList,
            out: Vec::new(),
        }
    }

    /// Sets the delay before a refused SUBSCRIBE or a failed `get` is retried.
    pub fn with_retry_delay(mut self, delay: Duration) -> Discovery {
        self.retry_delay = delay;
        self
    }

    /// How long a group whose last registration left keeps reading
    /// (unless its policy says otherwise).
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Resolves each group's policy from these rules, now and for groups
    /// seen from now on (at startup, and after a reload of the file).
    /// Events accepted from then on carry the new policies.
    pub fn set_policies(&mut self, policies: Arc<crate::policy::Policies>) {
        let policies = (!policies.rules().is_empty()).then_some(policies);
        let marker = self.mapper.marker();
        for (key, topic) in &mut self.topics {
            for (group, members) in &mut topic.groups {
                members.resolve(key, group, marker, policies.as_deref());
            }
        }
        self.policies = policies;
    }

    pub fn marker(&self) -> &Marker {
        self.mapper.marker()
    }

    /// Entries held for registrations, topics and subscriptions (not the
    /// bounded memory of recently deleted ids): zero once everything is gone.
    pub fn footprint(&self) -> usize {
        self.tracked.len()
            + self.ignored.len()
            + self.gets.len()
            + self.topics.len()
            + self.routes.len()
            + self.out.len()
    }

    /// Allocated room of the maps that grow with registrations, in entries.
    pub fn capacity(&self) -> usize {
        self.tracked.capacity() + self.ignored.capacity() + self.routes.capacity()
    }

    /// Gives back the room of maps that a churn of registrations left mostly
    /// empty, so a burst of thousands of registrations does not pin memory.
    fn shrink(&mut self) {
        fn shrink_map<K: std::hash::Hash + Eq, V, S: std::hash::BuildHasher>(
            map: &mut HashMap<K, V, S>,
        ) {
            if map.capacity() > 64 && map.len() < map.capacity() / 4 {
                map.shrink_to(map.len() * 2);
            }
        }
        shrink_map(&mut self.tracked);
        shrink_map(&mut self.routes);
        if self.ignored.capacity() > 64 && self.ignored.len() < self.ignored.capacity() / 4 {
            self.ignored.shrink_to(self.ignored.len() * 2);
        }
    }

    /// Forgets everything but the configuration. Call on every (re)join: the
    /// new session has no subscriptions, and registrations may have changed
    /// while we were away. Completions from the old session must not be fed
    /// in afterwards.
    pub fn reset(&mut self) {
        self.tracked.clear();
        self.ignored.clear();
        self.gets.clear();
        self.deleted = RecentIds::new(RECENTLY_DELETED_CAPACITY);
        self.topics.clear();
        self.routes.clear();
        self.group_count = 0;
        self.sync = SyncState::AwaitingList;
        self.out.clear();
    }

    // ----- inputs: registrations -------------------------------------------

    /// A registration meta event.
    pub fn on_meta_event(&mut self, event: MetaEvent, now: Instant) {
        match event {
            MetaEvent::Created { info, .. } => self.learn(info),
            MetaEvent::Registered { registration, .. } => {
                // Normally known already (`on_create` comes first, or the list
                // has it). If not, asking costs one call and closes any gap.
                if !self.knows(registration) {
                    self.gets.insert(
                        registration,
                        PendingGet {
                            state: GetState::Due,
                            initial: false,
                        },
                    );
                }
            }
            // A callee left, but the registration lives until `on_delete`.
            MetaEvent::Unregistered { .. } => {}
            MetaEvent::Deleted { registration, .. } => self.forget(registration, now),
        }
    }

    /// The answer to the initial `wamp.registration.list` (called after the
    /// meta topics are subscribed). Every id not known yet is fetched with
    /// `get`; discovery is synced once all of those are answered.
    pub fn on_list_result(&mut self, ids: impl IntoIterator<Item = RegistrationId>) {
        for id in ids {
            if self.tracked.contains_key(&id)
                || self.ignored.contains(&id)
                || self.deleted.contains(id)
            {
                continue;
            }
            self.gets
                .entry(id)
                .or_insert(PendingGet {
                    state: GetState::Due,
                    initial: true,
                })
                .initial = true;
        }
        if self.sync == SyncState::AwaitingList {
            self.sync = SyncState::Fetching;
        }
        self.check_synced();
    }

    /// How the `wamp.registration.get` call for `id` ended.
    pub fn on_get_result(&mut self, id: RegistrationId, outcome: GetOutcome, now: Instant) {
        match outcome {
            GetOutcome::Found(info) => {
                self.gets.remove(&id);
                self.learn(info);
                self.check_synced();
            }
            GetOutcome::NoSuchRegistration => self.forget(id, now),
            GetOutcome::Failed(error) => {
                // A get dropped meanwhile (the id was deleted) needs no retry.
                if let Some(get) = self.gets.get_mut(&id) {
                    get.state = GetState::RetryAt(now + self.retry_delay);
                    self.out.push(Output::Note(Note::GetFailed {
                        id,
                        error,
                        retry_in: self.retry_delay,
                    }));
                }
            }
        }
    }

    // ----- inputs: subscription completions --------------------------------

    /// SUBSCRIBED for an [`Action::Subscribe`]. A completion for a topic with
    /// no SUBSCRIBE in flight is ignored.
    pub fn on_subscribed(&mut self, key: &TopicKey, subscription: SubscriptionId) {
        let Some(topic) = self.topics.get_mut(key) else {
            return;
        };
        if topic.subscription != SubState::Subscribing {
            return;
        }
        topic.subscription = SubState::Subscribed(subscription);
        self.routes
            .insert(subscription, RouteEntry { topic: key.clone() });
        self.out.push(Output::Note(Note::Subscribed {
            topic: key.clone(),
            subscription,
        }));
    }

    /// SUBSCRIBE failed (e.g. `wamp.error.not_authorized`). The topic is not
    /// retried before `retry_delay` has passed; if its registrations all go
    /// meanwhile it is dropped, and subscribed afresh when one comes back.
    pub fn on_subscribe_failed(&mut self, key: &TopicKey, error: String, now: Instant) {
        let Some(topic) = self.topics.get_mut(key) else {
            return;
        };
        if topic.subscription != SubState::Subscribing {
            return;
        }
        topic.subscription = SubState::Failed {
            retry_at: now + self.retry_delay,
        };
        self.out.push(Output::Note(Note::SubscribeFailed {
            topic: key.clone(),
            error,
            retry_in: self.retry_delay,
        }));
    }

    /// UNSUBSCRIBED for an [`Action::Unsubscribe`]. Also the right call when
    /// the router revokes a subscription on its own: the topic is then
    /// subscribed again if still wanted.
    pub fn on_unsubscribed(&mut self, subscription: SubscriptionId) {
        if let Some(topic) = self.drop_subscription(subscription) {
            self.out.push(Output::Note(Note::Unsubscribed {
                topic,
                subscription,
            }));
        }
    }

    /// UNSUBSCRIBE failed. The subscription is forgotten all the same: the
    /// usual cause is that the router no longer has it, and if it does, its
    /// events count as "unknown subscription" and are dropped. Retrying an
    /// UNSUBSCRIBE that failed once is unlikely to help.
    pub fn on_unsubscribe_failed(&mut self, subscription: SubscriptionId, error: String) {
        if let Some(topic) = self.drop_subscription(subscription) {
            self.out.push(Output::Note(Note::UnsubscribeFailed {
                topic,
                subscription,
                error,
            }));
        }
    }

    // ----- outputs ---------------------------------------------------------

    /// Fires due timers and returns everything to do and to log since the last
    /// call, in order. Call after every input and whenever
    /// [`Discovery::next_deadline`] has passed.
    pub fn poll(&mut self, now: Instant) -> Vec<Output> {
        for (id, get) in &mut self.gets {
            let due = match get.state {
                GetState::Due => true,
                GetState::RetryAt(at) => at <= now,
                GetState::InFlight => false,
            };
            if due {
                get.state = GetState::InFlight;
                self.out.push(Output::Action(Action::GetRegistration(*id)));
            }
        }
        let out = &mut self.out;
        let mut groups = 0;
        let synced = self.sync == SyncState::Synced;
        self.topics.retain(|key, topic| {
            let keep = topic.reconcile(key, now, synced, out);
            groups += if keep { topic.groups.len() } else { 0 };
            keep
        });
        self.group_count = groups;
        std::mem::take(&mut self.out)
    }

    /// The earliest time at which `poll` has something new to do on its own
    /// (a grace period ending, a retry falling due), if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        let gets = self.gets.values().filter_map(|g| match g.state {
            GetState::RetryAt(at) => Some(at),
            GetState::Due | GetState::InFlight => None,
        });
        let topics = self.topics.values().filter_map(|t| {
            let grace = t.groups.values().filter_map(|m| m.grace_until).min();
            match t.subscription {
                SubState::Failed { retry_at } if t.wanted() => {
                    Some(grace.map_or(retry_at, |g| g.min(retry_at)))
                }
                _ => grace,
            }
        });
        gets.chain(topics).min()
    }

    // ----- queries ---------------------------------------------------------

    /// True once the initial list is answered and so is every `get` it needed
    /// (found or deleted meanwhile). Stays true until [`Discovery::reset`].
    pub fn is_synced(&self) -> bool {
        self.sync == SyncState::Synced
    }

    /// How many SUB_ registrations are tracked (a metric).
    pub fn tracked_registrations(&self) -> usize {
        self.tracked.len()
    }

    /// How many subscriptions exist on the router (a metric), counting ones
    /// in their grace period and ones being unsubscribed.
    pub fn active_subscriptions(&self) -> usize {
        self.routes.len()
    }

    /// Every subscription we hold at the router (to unsubscribe on shutdown).
    pub fn subscriptions(&self) -> impl Iterator<Item = SubscriptionId> + '_ {
        self.routes.keys().copied()
    }

    /// The topic and match policy of one of our subscriptions. EVENTs carry
    /// only the subscription id, and exact ones no topic at all.
    pub fn topic_for_subscription(
        &self,
        subscription: SubscriptionId,
    ) -> Option<(&str, MatchPolicy)> {
        self.routes
            .get(&subscription)
            .map(|r| (r.topic.topic.as_str(), r.topic.policy))
    }

    /// Where an EVENT on `subscription` goes. `details_topic` is the EVENT's
    /// `Details.topic`, which the router sends for pattern subscriptions only.
    /// Events for a topic in its grace period are routed as usual: the backend
    /// may be mid-restart, and the forwarder retries.
    pub fn route<'a>(
        &'a self,
        subscription: SubscriptionId,
        details_topic: Option<&'a str>,
    ) -> Result<Route<'a>, RouteError> {
        let mut procedures = Vec::new();
        let topic = self.route_into(subscription, details_topic, &mut procedures)?;
        Ok(Route {
            procedures: procedures
                .into_iter()
                .map(|d| d.procedure.to_string())
                .collect(),
            topic,
        })
    }

    /// [`Discovery::route`] without allocating a list per event: pushes the
    /// groups' destinations onto `procedures` (a buffer the caller reuses)
    /// and returns the event's concrete topic.
    pub fn route_into<'a>(
        &'a self,
        subscription: SubscriptionId,
        details_topic: Option<&'a str>,
        procedures: &mut Vec<Destination>,
    ) -> Result<&'a str, RouteError> {
        let entry = self
            .routes
            .get(&subscription)
            .ok_or(RouteError::UnknownSubscription(subscription))?;
        let Some(groups) = self.topics.get(&entry.topic).map(|t| &t.groups) else {
            return Ok(&entry.topic.topic);
        };
        if entry.topic.policy == MatchPolicy::Exact {
            for (group, m) in groups {
                if let Some(p) = &m.procedure {
                    procedures.push(Destination {
                        procedure: p.clone(),
                        mix: m.mix,
                        batch: group.batch,
                        unit: m.unit,
                        policy: m.policy.clone(),
                    });
                }
            }
            return Ok(&entry.topic.topic);
        }
        let topic = details_topic.ok_or_else(|| RouteError::MissingTopic {
            subscription,
            pattern: entry.topic.clone(),
        })?;
        let marker = self.mapper.marker();
        for (group, m) in groups {
            let procedure: Arc<str> = marker.procedure_for(topic, group).into();
            procedures.push(Destination {
                unit: crate::forward::key::fnv1a64(procedure.as_bytes()),
                procedure,
                mix: m.mix,
                batch: group.batch,
                policy: m.policy.clone(),
            });
        }
        Ok(topic)
    }

    /// How many groups read our topics, as of the last [`Discovery::poll`]
    /// (a metric; the default group of a topic counts as one).
    pub fn group_count(&self) -> usize {
        self.group_count
    }

    /// Whether the SUB_ registration `id` is tracked.
    pub fn tracks(&self, id: RegistrationId) -> bool {
        self.tracked.contains_key(&id)
    }

    /// Every (topic, group) we serve or still hold, in topic order: what
    /// `/status` lists.
    pub fn mappings(&self) -> Vec<Mapping<'_>> {
        let mut out = Vec::new();
        for (key, topic) in &self.topics {
            let (subscription, state) = match topic.subscription {
                SubState::None => (None, "none"),
                SubState::Subscribing => (None, "subscribing"),
                SubState::Subscribed(id) => (Some(id), "subscribed"),
                SubState::Unsubscribing(id) => (Some(id), "unsubscribing"),
                SubState::Failed { .. } => (None, "refused"),
            };
            for (group, members) in &topic.groups {
                let registrations: Vec<RegistrationId> =
                    members.registrations.iter().copied().collect();
                let procedure = members.procedure.as_deref().map(str::to_owned).or_else(|| {
                    registrations
                        .iter()
                        .find_map(|id| self.tracked.get(id).map(|t| t.uri.clone()))
                });
                out.push(Mapping {
                    topic: key,
                    group,
                    procedure,
                    registrations,
                    subscription,
                    subscription_state: state,
                    in_grace: members.grace_until.is_some(),
                    rule: members.rule,
                    policy: members.policy.as_deref(),
                });
            }
        }
        out
    }

    /// Every group of a pattern topic: its registration's URI (a wildcard
    /// URI) and its policy (`None`: the defaults). A pattern group's events
    /// go to procedures derived from their topics; an entry read back from
    /// the Redis queue finds its group's policy by matching them.
    pub fn pattern_policies(&self) -> Vec<(String, Option<Arc<crate::forward::policy::Policy>>)> {
        let marker = self.mapper.marker();
        self.topics
            .iter()
            .filter(|(key, _)| key.policy != MatchPolicy::Exact)
            .flat_map(|(key, t)| {
                t.groups.iter().map(move |(group, m)| {
                    (marker.procedure_for(&key.topic, group), m.policy.clone())
                })
            })
            .collect()
    }

    /// Every group of an exact topic, with whether its backends are away
    /// (pattern groups have no one procedure).
    pub fn group_states(&self) -> impl Iterator<Item = GroupState> + '_ {
        self.topics.iter().flat_map(|(key, t)| {
            t.groups.iter().filter_map(move |(group, m)| {
                Some(GroupState {
                    procedure: m.procedure.clone()?,
                    unit: m.unit,
                    topic: key.clone(),
                    group: group.clone(),
                    away: m.registrations.is_empty(),
                    rule: m.rule,
                    policy: m.policy.clone(),
                })
            })
        })
    }

    /// Every exact group's procedure and until when it is kept without a
    /// registration: the end of its grace period, or for a group with
    /// registrations `now` + the grace period. What a rejoin carries over
    /// ([`Discovery::remember`] after [`Discovery::reset`]): registrations
    /// that do not come back with the new session leave their group
    /// waiting for its grace period, not gone at once.
    pub fn snapshot(&self, now: Instant) -> Vec<(Arc<str>, Instant)> {
        self.topics
            .values()
            .flat_map(|t| t.groups.values())
            .filter_map(|m| {
                let until = m.grace_until.unwrap_or(now + m.grace(self.grace));
                Some((m.procedure.clone()?, until))
            })
            .collect()
    }

    /// A group known from before (an earlier session, or kept in Redis by
    /// the instances): `procedure` (an exact registration's URI) reads its
    /// topic until `until` unless a registration of it comes. Its topic is
    /// subscribed; its events wait for a callee. Returns false when the
    /// URI stands for no group here (not a SUB_ procedure, filtered out).
    pub fn remember(&mut self, procedure: &str, until: Instant, now: Instant) -> bool {
        let Classification::Shared(key, group) =
            self.mapper.classify(procedure, MatchPolicy::Exact)
        else {
            return false;
        };
        if until <= now {
            return true;
        }
        let marker = self.mapper.marker();
        let policies = self.policies.as_deref();
        let topic = self.topics.entry(key.clone()).or_insert_with(|| Topic {
            groups: BTreeMap::new(),
            subscription: SubState::None,
        });
        let members = topic
            .groups
            .entry(group.clone())
            .or_insert_with(|| Members::new(&key, &group, marker, policies));
        if members.registrations.is_empty() {
            members.grace_until = Some(members.grace_until.map_or(until, |u| u.max(until)));
        }
        true
    }

    /// The groups reading each topic we want or hold.
    pub fn groups(&self) -> impl Iterator<Item = (&TopicKey, &Group)> + '_ {
        self.topics
            .iter()
            .flat_map(|(key, t)| t.groups.keys().map(move |g| (key, g)))
    }

    // ----- internals -------------------------------------------------------

    fn knows(&self, id: RegistrationId) -> bool {
        self.tracked.contains_key(&id)
            || self.ignored.contains(&id)
            || self.gets.contains_key(&id)
            || self.deleted.contains(id)
    }

    /// A registration reported by `on_create` or `get`: classify and track it,
    /// unless it is known already or deleted.
    fn learn(&mut self, info: RegistrationInfo) {
        let id = info.id;
        if !(self.deleted.contains(id)
            || self.tracked.contains_key(&id)
            || self.ignored.contains(&id))
        {
            self.classify_and_track(info);
        }
        // Known now, so no `get` is owed; one still in flight will find it
        // known when it lands.
        if self.gets.remove(&id).is_some() {
            self.check_synced();
        }
    }

    fn classify_and_track(&mut self, info: RegistrationInfo) {
        let id = info.id;
        let (key, group) = match self.mapper.classify(&info.uri, info.match_policy) {
            Classification::Shared(key, group) => (key, group),
            Classification::Ordinary => {
                self.ignored.insert(id);
                return;
            }
            Classification::FilteredOut => {
                self.ignored.insert(id);
                self.note(Note::RegistrationFilteredOut { id, uri: info.uri });
                return;
            }
            Classification::Prefix => {
                self.ignored.insert(id);
                self.note(Note::PrefixRegistrationIgnored { id, uri: info.uri });
                return;
            }
        };
        let topic = self.topics.entry(key.clone()).or_insert_with(|| Topic {
            groups: BTreeMap::new(),
            subscription: SubState::None,
        });
        let marker = self.mapper.marker();
        let policies = self.policies.as_deref();
        let members = topic
            .groups
            .entry(group.clone())
            .or_insert_with(|| Members::new(&key, &group, marker, policies));
        members.registrations.insert(id);
        let resumed = members.grace_until.take().is_some();
        self.out.push(Output::Note(Note::RegistrationTracked {
            id,
            uri: info.uri.clone(),
            invoke: info.invoke,
            topic: key.clone(),
            group: group.clone(),
        }));
        if resumed {
            self.note(Note::TopicResumed {
                topic: key.clone(),
                group: group.clone(),
            });
        }
        self.tracked.insert(
            id,
            Tracked {
                uri: info.uri,
                topic: key,
                group,
            },
        );
    }

    /// A registration is gone (`on_delete`, or `get` said so).
    fn forget(&mut self, id: RegistrationId, now: Instant) {
        self.deleted.insert(id);
        self.ignored.remove(&id);
        if self.gets.remove(&id).is_some() {
            self.check_synced();
        }
        let Some(Tracked {
            uri,
            topic: key,
            group,
        }) = self.tracked.remove(&id)
        else {
            self.shrink();
            return;
        };
        self.shrink();
        self.note(Note::RegistrationUntracked {
            id,
            uri,
            topic: key.clone(),
        });
        let Some(topic) = self.topics.get_mut(&key) else {
            return;
        };
        let Some(members) = topic.groups.get_mut(&group) else {
            return;
        };
        members.registrations.remove(&id);
        if !members.registrations.is_empty() {
            return;
        }
        let grace = members.grace(self.grace);
        members.grace_until = Some(now + grace);
        let holds_subscription = matches!(
            topic.subscription,
            SubState::Subscribing | SubState::Subscribed(_)
        );
        if holds_subscription && !grace.is_zero() {
            self.note(Note::GraceStarted {
                topic: key,
                group,
                grace,
            });
        }
    }

    /// Forgets a subscription that no longer exists on the router; returns its
    /// topic if it was one of ours.
    fn drop_subscription(&mut self, subscription: SubscriptionId) -> Option<TopicKey> {
        let entry = self.routes.remove(&subscription)?;
        self.shrink();
        if let Some(topic) = self.topics.get_mut(&entry.topic)
            && matches!(
                topic.subscription,
                SubState::Subscribed(s) | SubState::Unsubscribing(s) if s == subscription
            )
        {
            topic.subscription = SubState::None;
        }
        Some(entry.topic)
    }

    fn check_synced(&mut self) {
        if self.sync == SyncState::Fetching && !self.gets.values().any(|g| g.initial) {
            self.sync = SyncState::Synced;
            let registrations = self.tracked.len();
            self.note(Note::Synced { registrations });
        }
    }

    fn note(&mut self, note: Note) {
        self.out.push(Output::Note(note));
    }
}

impl Topic {
    /// Moves the topic's subscription one step towards what is wanted and
    /// says whether the topic is still worth keeping.
    /// A topic only remembered (no group has a registration) is subscribed
    /// once discovery is `synced`: the registration list comes first, as
    /// on a fresh start.
    fn reconcile(
        &mut self,
        key: &TopicKey,
        now: Instant,
        synced: bool,
        out: &mut Vec<Output>,
    ) -> bool {
        // Groups whose grace period ended leave; the others are untouched.
        let mut left = Vec::new();
        self.groups.retain(|group, m| {
            if m.grace_until.is_some_and(|until| until <= now) {
                m.grace_until = None;
            }
            let stays = !m.registrations.is_empty() || m.grace_until.is_some();
            if !stays {
                left.push(group.clone());
            }
            stays
        });
        // Said only while other groups remain: the last one leaving is the
        // unsubscribe.
        if !self.groups.is_empty() && matches!(self.subscription, SubState::Subscribed(_)) {
            for group in left {
                out.push(Output::Note(Note::GroupLeft {
                    topic: key.clone(),
                    group,
                }));
            }
        }
        let wanted = self.wanted();
        // A topic whose groups are all in their grace period keeps what it
        // has but starts nothing.
        let keep = !self.groups.is_empty();
        let registered = self.groups.values().any(|m| !m.registrations.is_empty());
        match self.subscription {
            SubState::None => {
                if !wanted {
                    return false;
                }
                if !registered && !synced {
                    return true;
                }
                self.subscription = SubState::Subscribing;
                out.push(Output::Action(Action::Subscribe(key.clone())));
            }
            SubState::Failed { retry_at } => {
                if !wanted {
                    return false;
                }
                if retry_at <= now {
                    self.subscription = SubState::Subscribing;
                    out.push(Output::Action(Action::Subscribe(key.clone())));
                }
            }
            SubState::Subscribed(subscription) => {
                if !keep {
                    self.subscription = SubState::Unsubscribing(subscription);
                    out.push(Output::Action(Action::Unsubscribe {
                        topic: key.clone(),
                        subscription,
                    }));
                }
            }
            // Wait for the completion; the next poll after it moves on.
            SubState::Subscribing | SubState::Unsubscribing(_) => {}
        }
        true
    }
}

/// A bounded set of recently seen ids: the oldest is forgotten first.
#[derive(Debug)]
struct RecentIds {
    capacity: usize,
    order: VecDeque<RegistrationId>,
    set: HashSet<RegistrationId>,
}

impl RecentIds {
    fn new(capacity: usize) -> RecentIds {
        RecentIds {
            capacity,
            order: VecDeque::new(),
            set: HashSet::new(),
        }
    }

    fn contains(&self, id: RegistrationId) -> bool {
        self.set.contains(&id)
    }

    fn insert(&mut self, id: RegistrationId) {
        if !self.set.insert(id) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
    }
}
