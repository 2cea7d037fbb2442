//! The Redis queue's core: a sans-IO state machine for what one instance
//! reads from the shared streams, holds, leases, keeps alive, claims,
//! acknowledges, dead-letters and releases. Inputs are methods (a command's
//! reply, an entry delivered or given up, time passing, shutdown); the
//! driver pulls what to do with [`QueueCore::poll`]: commands to carry to
//! Redis, entries to hand to the delivery stage, entries to take back from
//! it. No IO, no clock: time is an argument. The IO half
//! (`streams::carrier`) turns each [`Command`] into Redis commands and each
//! answer into a [`Reply`].
//!
//! What it promises (the model test in `tests.rs` checks each against a
//! model of Redis, with pauses, lost replies, crashes and restarts):
//!
//! - **One window.** Entries held (read and not yet acknowledged,
//!   dead-lettered, released or dropped), plus what the commands in flight
//!   may bring, never exceed [`Settings::window`], over every stream.
//! - **Reads ride on admissions.** Every instance offers every event, so
//!   the admission of an event is where a stream's new entries are taken:
//!   the admission script appends, then reads for this instance what the
//!   core granted room for ([`QueueCore::grant`]); for a partition only if
//!   the lease in Redis is this instance's. What could not be taken then (no
//!   room, a read in flight) marks the stream to be read when it can, with
//!   reads that never wait; every stream is read once per claim idle time
//!   anyway (what a redrive added, say). No connection waits on streams, and
//!   an idle instance costs Redis nothing per stream.
//! - **Fencing by its own clock.** A partition's entries go out only while
//!   its lease is certainly this instance's: renewed less than the lease
//!   time minus a margin ago, counted from when the renewal was *sent*.
//!   Entries of a plain stream go out only while they were read, claimed or
//!   refreshed (each refresh checks the owner in Redis) less than the claim
//!   idle time minus the margin ago. Past that, the entries are taken back
//!   from the delivery stage ([`Output::Withdraw`]) without being
//!   acknowledged, and a plain stream's own pending entries are read again
//!   (what is still ours comes back; what another instance took does not).
//!   Nothing is ever claimed back from another instance: refreshes check
//!   the owner, and only a partition's lease holder claims its entries.
//! - **In order.** A partition's entries are handed out in stream order: a
//!   new holder claims every entry still pending in it (whoever held them)
//!   before it reads anything new, and a reply that belongs to an earlier
//!   holding (an epoch ago) is dropped and the claim starts over.
//! - **Recovery.** Own pending entries are read first: at start (so a
//!   restarted instance with a stable consumer name takes up its entries at
//!   once) and after any read whose reply was lost.
//! - **A delivery cap.** An entry handed out more than
//!   [`Settings::max_deliveries`] times, takeovers included, is
//!   dead-lettered ([`Output::Poison`]) instead of delivered.
//! - **Acknowledgements ride on admissions.** They wait up to
//!   [`ACK_LINGER`] for an admission of their procedure to carry them
//!   ([`QueueCore::ride_acks`]), then go alone: while events keep coming,
//!   an event costs Redis one request.
//! - **Commits retried.** Acknowledgements, dead letters and releases are
//!   retried on transient errors (the scripts are idempotent and check the
//!   owner), then given up with a count: the entry stays pending and is
//!   delivered again after a takeover, a duplicate, never a loss.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A stream entry's id, `<ms>-<seq>`, as its two numbers; ordered as Redis
/// orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EntryId(pub u64, pub u64);

impl EntryId {
    /// Before every entry (`0-0`).
    pub const ZERO: EntryId = EntryId(0, 0);

    /// `<ms>-<seq>`, as Redis writes it.
    pub fn parse(text: &str) -> Option<EntryId> {
        super::entry_id_numbers(text).map(|(ms, seq)| EntryId(ms, seq))
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// One stream of the queue: a procedure's plain stream (its events without
/// an ordering key, or all of them without ordering), or one of its
/// partitions (keyed events, each partition delivered by the holder of its
/// lease).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Unit {
    pub procedure: Arc<str>,
    pub partition: Option<u16>,
}

impl Unit {
    pub fn plain(procedure: &Arc<str>) -> Unit {
        Unit {
            procedure: procedure.clone(),
            partition: None,
        }
    }

    pub fn partition(procedure: &Arc<str>, k: u16) -> Unit {
        Unit {
            procedure: procedure.clone(),
            partition: Some(k),
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.partition {
            None => f.write_str(&self.procedure),
            Some(k) => write!(f, "{}#{k}", self.procedure),
        }
    }
}

/// One entry of one unit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub unit: Unit,
    pub id: EntryId,
}

/// The core's limits.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Entries held at most, over every stream, counting what the commands
    /// in flight may bring.
    pub window: usize,
    /// Entries one read or claim asks for at most.
    pub read_max: usize,
    /// How long an entry or a lease stays ours without being renewed (the
    /// lease's time to live, and the idle time after which another instance
    /// takes a plain stream's entry over).
    pub claim_idle: Duration,
    /// Partitions per procedure for keyed events (per-key ordering).
    pub partitions: Option<u16>,
    /// Hand-outs of one entry at most; the next one dead-letters it.
    pub max_deliveries: u32,
}

/// Names a command so that its reply finds its way back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommandId(pub u64);

/// What to carry to Redis.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// The set of procedures that have streams.
    Procedures,
    /// Creates each unit's consumer group (and stream) if missing.
    CreateGroups { units: Vec<Unit> },
    /// Reads new entries (`>`) of `units`, at most `count` of each,
    /// without waiting.
    Read { units: Vec<Unit>, count: usize },
    /// Walks `unit`'s pending entries after `cursor`, in order, and takes
    /// up to `count` of them: this consumer's own (counted as a new
    /// delivery only when `count_own`), and, when `min_idle` is given,
    /// other consumers' idle at least that long (claimed: counted). Stops
    /// after the first one taken that had been handed out before. Entries
    /// deleted meanwhile are acknowledged away.
    Take {
        unit: Unit,
        cursor: EntryId,
        count: usize,
        min_idle: Option<Duration>,
        count_own: bool,
    },
    /// Which of `units` have an entry idle at least `idle` (left by an
    /// instance that stopped answering or left); also forgets consumers
    /// long gone. Sent at start, after an instance departed, and every
    /// [`SCAN_BACKSTOP`] claim idle times.
    Scan { units: Vec<Unit>, idle: Duration },
    /// One round of keeping alive (one script per Redis node): give up the
    /// leases in `settle` that are ours in Redis (this instance may hold them
    /// without knowing: a take or a give-up whose reply was lost, a lease it
    /// let go of by its own clock while Redis still counted it as live),
    /// renew the leases in `renew` that are still ours, take up to `want`
    /// free ones of each procedure in `take` (of the partitions listed),
    /// refresh the idle time of the entries in `refresh` that are still
    /// ours, and say this instance is alive (returns how many are, and how
    /// many departed so far).
    Keepalive {
        settle: Vec<Unit>,
        renew: Vec<Unit>,
        take: Vec<(Arc<str>, Vec<u16>, usize)>,
        refresh: Vec<(Unit, Vec<EntryId>)>,
        ttl: Duration,
    },
    /// Acknowledges and deletes delivered entries.
    Ack { keys: Vec<Key> },
    /// If still ours: acknowledges and deletes the entry and adds the
    /// record to its procedure's dead-letter stream, in one step.
    DeadLetter {
        key: Key,
        fields: Vec<(&'static str, Vec<u8>)>,
    },
    /// An event never admitted (given up before it reached Redis): stored
    /// as a dead letter unless another instance admitted it.
    DeadLetterUnadmitted {
        procedure: Arc<str>,
        publication: u64,
        fields: Vec<(&'static str, Vec<u8>)>,
        /// Whether to claim the publication first (an event every instance
        /// may give up: stored once); an event removed from a stream to
        /// make room is stored as it is.
        claim: bool,
    },
    /// If still ours: makes the entries claimable by another instance at
    /// once.
    Release { keys: Vec<Key>, idle: Duration },
    /// Gives up the leases of `units` that are still ours (a handover).
    GiveUp { units: Vec<Unit> },
    /// Gives up the leases of `units` that are still ours, and leaves the
    /// live instances (at shutdown).
    Leave { units: Vec<Unit> },
}

/// An entry as a read or claim brought it.
#[derive(Debug, Clone, PartialEq)]
pub struct Got<T> {
    pub id: EntryId,
    /// Hand-outs so far, this one included.
    pub deliveries: u32,
    /// Its fields; `None` when it was deleted meanwhile.
    pub body: Option<T>,
}

/// What a keepalive round found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Kept {
    /// Live instances (this one included).
    pub instances: usize,
    /// Instances that departed (went silent or left), a counter kept in
    /// Redis: when it moves, what they held is looked for.
    pub departures: u64,
    /// Of the leases asked to renew: whether each is still ours.
    pub renewed: Vec<(Unit, bool)>,
    /// Leases newly ours, each with whether its stream had nothing pending
    /// then (its new entries are read at once, with nothing to take over
    /// first).
    pub taken: Vec<(Unit, bool)>,
    /// Entries asked to refresh that are no longer ours.
    pub lost: Vec<Key>,
}

/// Why a command failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Worth another try (connection lost, no answer in time, a busy,
    /// loading, failing-over or redirecting server).
    Transient(String),
    /// A stream or its consumer group is missing (a Redis that restarted
    /// without persistence): create them again.
    NoGroup(String),
    /// The command is wrong; trying again would fail again.
    Final(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Transient(e) | Failure::NoGroup(e) | Failure::Final(e) => f.write_str(e),
        }
    }
}

/// A command's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply<T> {
    /// Done (groups created, acknowledged, dead-lettered, released, left).
    Done,
    Procedures(Vec<String>),
    /// Entries read, per unit, in stream order.
    Read(Vec<(Unit, Vec<Got<T>>)>),
    /// Entries taken, and where the walk goes on (`0-0`: at the end).
    Taken {
        next: EntryId,
        got: Vec<Got<T>>,
    },
    /// Units with an entry idle too long.
    Stale(Vec<Unit>),
    Kept(Kept),
    Failed(Failure),
}

/// Names an admission's take, granted room by [`QueueCore::grant`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantId(pub u64);

/// Room for an admission to take entries of a stream in the same step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub id: GrantId,
    /// Entries the admission may take at most.
    pub count: usize,
}

/// An entry for the delivery stage.
#[derive(Debug, Clone, PartialEq)]
pub struct Handed<T> {
    pub key: Key,
    /// Hand-outs so far, this one included (earlier ones were attempts).
    pub deliveries: u32,
    /// Taken over from another instance (or from this one's past).
    pub taken_over: bool,
    pub body: T,
}

/// Something worth a log line or a count.
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    /// Entries taken over from instances that stopped answering.
    TakenOver { unit: Unit, entries: usize },
    /// A partition's lease became ours.
    LeaseTaken { unit: Unit },
    /// A partition's lease is no longer certainly ours: its entries were
    /// taken back.
    LeaseLost { unit: Unit },
    /// Handing a partition over to another instance (above our share).
    HandingOver { unit: Unit, instances: usize },
    /// Entries not certainly ours any more (not refreshed in time, or taken
    /// by another instance): taken back without acknowledgement.
    Fenced { entries: usize },
    /// A commit could not be made; its entries stay pending and are
    /// delivered again after a takeover.
    CommitGivenUp {
        what: &'static str,
        keys: usize,
        error: String,
    },
    /// A command failed (logged at debug; the core retries).
    CommandFailed { what: &'static str, error: String },
    /// A procedure's streams are read from now on.
    Reading { procedure: Arc<str> },
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Output<T> {
    /// Carry this command to Redis; report with [`QueueCore::on_reply`].
    Send(CommandId, Command),
    /// Hand these entries to the delivery stage, in order. Report each with
    /// [`QueueCore::on_delivered`], [`QueueCore::dead_letter`],
    /// [`QueueCore::release`] or [`QueueCore::on_withdrawn`].
    Deliver(Vec<Handed<T>>),
    /// Delivered too often: build its dead-letter record (reason
    /// `max_deliveries`) and give it to [`QueueCore::dead_letter`].
    Poison(Handed<T>),
    /// These entries are no longer certainly ours: take back those still
    /// waiting in the delivery stage (report them with
    /// [`QueueCore::on_withdrawn`]); those in flight finish.
    Withdraw(Vec<Key>),
    /// Whether Redis answers.
    RedisUp(bool),
    Note(Note),
}

/// Streams are scanned for entries left idle at start, after each
/// departure of an instance, and every this many claim idle times anyway
/// (what no departure explains: a consumer of another tool, say).
pub const SCAN_BACKSTOP: u32 = 10;
/// Acknowledgements wait this long at most for an admission of their
/// procedure to carry them (one request to Redis per event instead of two,
/// when events keep coming); then they go alone. A crash in that time makes
/// a few more duplicates, nothing else.
pub const ACK_LINGER: Duration = Duration::from_millis(5);
/// Acknowledgements go at once when this many wait.
const ACK_BATCH: usize = 256;
/// How often the procedures set is read again.
const REGISTRY_EVERY: Duration = Duration::from_secs(5);
/// A commit is tried this often at most before it is given up.
const COMMIT_ATTEMPTS: u32 = 8;
/// First pause before a commit or a failed read is tried again.
const RETRY_FIRST: Duration = Duration::from_millis(50);
/// Longest such pause.
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Consecutive failed commands after which Redis counts as not answering.
const DOWN_AFTER: u32 = 2;

/// The lease on a partition, as this instance knows it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Lease {
    /// Not ours (free, or another instance's).
    NotOurs,
    /// Ours until `valid_until` by this instance's clock.
    Ours { valid_until: Instant, leaving: bool },
    /// Being given up (nothing of it is held here any more).
    GivingUp,
}

/// Where a unit is in its reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading new entries.
    Ready,
    /// Taking pending entries (own ones, or those left by others) first,
    /// walking on after `cursor` (see [`Command::Take`]).
    Take {
        cursor: EntryId,
        min_idle: Option<Duration>,
        count_own: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Unknown,
    Creating,
    Ready,
}

/// An entry held and not taken back is ours until `t` (`UnitState::until`).
fn own_until(until: &mut BTreeMap<Instant, u32>, t: Instant) {
    *until.entry(t).or_default() += 1;
}

/// An entry that was ours until `t` is not held any more, or taken back,
/// or ours until another time.
fn disown(until: &mut BTreeMap<Instant, u32>, t: Instant) {
    if let Some(n) = until.get_mut(&t) {
        *n -= 1;
        if *n == 0 {
            until.remove(&t);
        }
    }
}

/// An entry held here.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// A plain stream's entry is ours until then (partitions: the lease).
    owned_until: Instant,
    /// Taken back (fenced): never dispatched again; resolved when the
    /// delivery stage reports it.
    revoked: bool,
}

#[derive(Debug)]
struct UnitState {
    group: Group,
    phase: Phase,
    /// Partitions only.
    lease: Lease,
    /// Bumped whenever the unit's holding changes (a fence, a lease taken):
    /// replies to commands sent before are dropped.
    epoch: u32,
    /// Entries held, by id.
    held: BTreeMap<EntryId, Held>,
    /// How many of them, not taken back, are ours until each time: a plain
    /// stream's deadline is the first, found without a walk over `held`
    /// (which took a tenth of the instance's instructions at the ceiling,
    /// once per acknowledgement).
    until: BTreeMap<Instant, u32>,
    /// Commits of its entries in flight (a handover waits for them).
    commits: u32,
    /// A read or an admission's take of it in flight: nothing else reads
    /// it meanwhile (the replies come back on different connections).
    busy: bool,
    /// Its own pending entries were counted as delivered again once since
    /// this process started (they may be what killed the last one).
    counted: bool,
    /// When something it holds stops being certainly ours (as entered in
    /// `QueueCore::deadlines`).
    deadline: Option<Instant>,
}

impl UnitState {
    fn new(partition: bool) -> UnitState {
        UnitState {
            group: Group::Unknown,
            phase: if partition {
                Phase::Ready
            } else {
                // Own pending entries first: a restarted instance with a
                // stable name takes up what it held (a new delivery each).
                Phase::Take {
                    cursor: EntryId::ZERO,
                    min_idle: None,
                    count_own: true,
                }
            },
            lease: Lease::NotOurs,
            epoch: 0,
            held: BTreeMap::new(),
            until: BTreeMap::new(),
            commits: 0,
            busy: false,
            counted: !partition,
            deadline: None,
        }
    }
}

/// A command in flight, for its reply.
#[derive(Debug)]
enum Sent {
    Procedures,
    CreateGroups(Vec<Unit>),
    Read {
        at: Instant,
        units: Vec<(Unit, u32)>,
        count: usize,
    },
    Take {
        at: Instant,
        unit: Unit,
        epoch: u32,
        reserved: usize,
        claims: bool,
    },
    Scan,
    Keepalive {
        at: Instant,
        renew: Vec<(Unit, u32)>,
        refresh: Vec<(Unit, u32, Vec<EntryId>)>,
        /// The partitions it asked to take, and to settle.
        asked: Vec<Unit>,
    },
    /// Acknowledgements, dead letters, releases: retried.
    Commit {
        command: Command,
        attempts: u32,
    },
    GiveUp(Vec<Unit>),
    Leave,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// No new reads; what is held is finished, then the leases are left.
    Draining,
    /// The leases are being given up.
    Leaving,
    Finished,
}

/// An admission's take in flight, for its answer.
#[derive(Debug)]
struct Granted {
    unit: Unit,
    epoch: u32,
    at: Instant,
    count: usize,
}

/// The Redis queue's core for one instance; `T` is an entry's body (its
/// fields), carried through untouched.
#[derive(Debug)]
pub struct QueueCore<T> {
    s: Settings,
    /// Taken off the lease time: a renewal sent at `t` makes a lease (or an
    /// entry) ours until `t + claim_idle - margin` by our clock.
    margin: Duration,
    /// Keepalive period.
    every: Duration,
    procedures: BTreeSet<Arc<str>>,
    /// Procedures without a callee: their streams are not read (their
    /// events wait in Redis, not in this instance).
    paused: BTreeSet<Arc<str>>,
    /// Procedures whose policy sets its own `max_deliveries`.
    max_deliveries_of: HashMap<Arc<str>, u32>,
    units: BTreeMap<Unit, UnitState>,
    // Indexes over `units`, so that a tick costs nothing per idle stream.
    /// Streams that may have entries not read yet (plain ones, and
    /// partitions whose lease is ours).
    dirty: BTreeSet<Unit>,
    /// Streams in `Phase::Take`.
    taking: BTreeSet<Unit>,
    /// Partitions whose lease is ours (or being given up).
    leased: BTreeSet<Unit>,
    /// Partitions whose lease may be ours in Redis without this instance
    /// knowing it, to give up (`Command::Keepalive`'s `settle`) from when on:
    /// on one Redis a lease does not lapse while its holder heartbeats.
    unsure: BTreeMap<Unit, Instant>,
    /// Streams whose consumer group is to be created.
    no_group: BTreeSet<Unit>,
    /// When what a stream holds stops being certainly ours, by time.
    deadlines: BTreeSet<(Instant, Unit)>,
    /// Entries held, all streams together.
    held: usize,
    /// Room promised to the reads, takes and grants in flight.
    reserved: usize,
    next_id: u64,
    sent: HashMap<CommandId, Sent>,
    grants: HashMap<GrantId, Granted>,
    outputs: VecDeque<Output<T>>,
    read_in_flight: bool,
    /// Where the next read starts among the dirty streams (when not all
    /// fit).
    read_from: Option<Unit>,
    /// A `Take` in flight.
    side_in_flight: bool,
    scan_in_flight: bool,
    keepalive_in_flight: bool,
    registry_in_flight: bool,
    groups_in_flight: bool,
    next_keepalive: Instant,
    next_scan: Instant,
    next_registry: Instant,
    /// Every stream is read again then.
    next_sweep: Instant,
    /// After failed reads, the next waits until then.
    read_pause_until: Option<Instant>,
    read_failures: u32,
    /// Acknowledgements waiting to ride on an admission of their procedure
    /// ([`QueueCore::ride_acks`]), or to be sent alone after [`ACK_LINGER`].
    acks: Vec<Key>,
    /// When the oldest of them was first seen by a tick.
    acks_since: Option<Instant>,
    /// Commits waiting for another try: when, what, tries so far.
    retries: Vec<(Instant, Command, u32)>,
    /// Live instances, as the last keepalive counted them.
    instances: usize,
    /// Plain streams whose group became ready since the last scan: scanned
    /// at once (a departure before this instance knew them is not seen).
    unscanned: BTreeSet<Unit>,
    /// The departures counter as the last keepalive read it.
    departures: Option<u64>,
    /// Scans still to send soon after a departure (the departed instance's
    /// entries may have been refreshed a little after its last heartbeat).
    scans_after: u8,
    /// A taken-over entry out now: the next is taken once it is resolved.
    probation: Option<Key>,
    /// Consecutive failed commands.
    failures: u32,
    redis_up: Option<bool>,
    state: State,
}

impl<T> QueueCore<T> {
    pub fn new(settings: Settings, now: Instant) -> QueueCore<T> {
        let s = Settings {
            window: settings.window.max(1),
            read_max: settings.read_max.max(1),
            max_deliveries: settings.max_deliveries.max(1),
            ..settings
        };
        let margin = s.claim_idle / 4;
        let every = s.claim_idle / 3;
        QueueCore {
            next_sweep: now + s.claim_idle,
            s,
            margin,
            every,
            procedures: BTreeSet::new(),
            paused: BTreeSet::new(),
            max_deliveries_of: HashMap::new(),
            units: BTreeMap::new(),
            dirty: BTreeSet::new(),
            taking: BTreeSet::new(),
            leased: BTreeSet::new(),
            unsure: BTreeMap::new(),
            no_group: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            held: 0,
            reserved: 0,
            next_id: 0,
            sent: HashMap::new(),
            grants: HashMap::new(),
            outputs: VecDeque::new(),
            read_in_flight: false,
            read_from: None,
            side_in_flight: false,
            scan_in_flight: false,
            keepalive_in_flight: false,
            registry_in_flight: false,
            groups_in_flight: false,
            next_keepalive: now,
            next_scan: now,
            next_registry: now,
            read_pause_until: None,
            read_failures: 0,
            acks: Vec::new(),
            acks_since: None,
            retries: Vec::new(),
            instances: 1,
            unscanned: BTreeSet::new(),
            departures: None,
            scans_after: 0,
            probation: None,
            failures: 0,
            redis_up: None,
            state: State::Running,
        }
    }

    // ------------------------------------------------------------ inputs
    //
    // Inputs change state and may queue outputs; commands that fall due are
    // sent by `on_tick`, which the driver calls after each round of inputs
    // (so that acknowledgements go out together).

    /// A procedure whose streams this instance reads (admission offered one
    /// of its events, or the procedures set lists it).
    pub fn add_procedure(&mut self, procedure: &str, now: Instant) {
        if self.procedures.contains(procedure) {
            return;
        }
        let procedure: Arc<str> = Arc::from(procedure);
        self.procedures.insert(procedure.clone());
        let plain = Unit::plain(&procedure);
        self.units.insert(plain.clone(), UnitState::new(false));
        self.no_group.insert(plain.clone());
        // Own pending entries first (see `UnitState::new`).
        self.taking.insert(plain);
        for k in 0..self.s.partitions.unwrap_or(0) {
            let unit = Unit::partition(&procedure, k);
            self.units.insert(unit.clone(), UnitState::new(true));
            self.no_group.insert(unit);
        }
        self.outputs
            .push_back(Output::Note(Note::Reading { procedure }));
        if self.s.partitions.is_some() {
            // Its leases are to be taken.
            self.next_keepalive = now;
        }
    }

    /// `procedure` has no callee: its streams are not read (nor its
    /// pending entries taken) until [`QueueCore::resume`]; what it holds
    /// stays held and kept alive.
    pub fn pause(&mut self, procedure: &str) {
        if !self.paused.contains(procedure) {
            self.paused.insert(Arc::from(procedure));
        }
    }

    /// Hand-outs of `procedure`'s entries before they are dead-lettered:
    /// its policy's (`Some`), or [`Settings::max_deliveries`].
    pub fn set_max_deliveries(&mut self, procedure: &str, max: Option<u32>) {
        match max {
            Some(max) => {
                self.max_deliveries_of
                    .insert(Arc::from(procedure), max.max(1));
            }
            None => {
                self.max_deliveries_of.remove(procedure);
            }
        }
    }

    /// `procedure` has a callee again: its streams are read at once.
    pub fn resume(&mut self, procedure: &str) {
        if !self.paused.remove(procedure) {
            return;
        }
        let units: Vec<Unit> = self
            .units
            .keys()
            .filter(|u| &*u.procedure == procedure)
            .cloned()
            .collect();
        for unit in units {
            self.mark_dirty(&unit);
        }
    }

    /// Room for an admission of `unit`'s events to take new entries of it
    /// in the same step, if it may be read now; `None` marks it to be read
    /// as soon as it can. Answer with [`QueueCore::on_granted`].
    pub fn grant(&mut self, unit: &Unit, now: Instant) -> Option<Grant> {
        let room = self.room().min(self.s.read_max);
        if room == 0 || !self.readable(unit, now) {
            self.mark_dirty(unit);
            return None;
        }
        let u = self.units.get_mut(unit)?;
        u.busy = true;
        let epoch = u.epoch;
        self.dirty.remove(unit);
        self.reserved += room;
        self.next_id += 1;
        let id = GrantId(self.next_id);
        self.grants.insert(
            id,
            Granted {
                unit: unit.clone(),
                epoch,
                at: now,
                count: room,
            },
        );
        Some(Grant { id, count: room })
    }

    /// What an admission took under a grant (or why it failed: then it may
    /// have taken entries whose answer was lost, read again as our own).
    pub fn on_granted(&mut self, id: GrantId, taken: Result<Vec<Got<T>>, Failure>, now: Instant) {
        let Some(g) = self.grants.remove(&id) else {
            return;
        };
        self.reserved -= g.count;
        if let Some(u) = self.units.get_mut(&g.unit) {
            u.busy = false;
        }
        match taken {
            Ok(got) => {
                self.answered();
                if got.len() >= g.count {
                    // Full: more may be waiting.
                    self.mark_dirty(&g.unit);
                }
                self.take_in(&g.unit, g.epoch, got, false, g.at, now);
            }
            Err(f) => {
                self.failed("admit and read", &f);
                let no_group = matches!(f, Failure::NoGroup(_));
                self.recover(&g.unit, g.epoch, no_group);
            }
        }
    }

    /// A command's answer.
    pub fn on_reply(&mut self, id: CommandId, reply: Reply<T>, now: Instant) {
        let Some(sent) = self.sent.remove(&id) else {
            return;
        };
        match &reply {
            Reply::Failed(_) => {}
            _ => self.answered(),
        }
        match sent {
            Sent::Procedures => {
                self.registry_in_flight = false;
                match reply {
                    Reply::Procedures(list) => {
                        for p in list {
                            self.add_procedure(&p, now);
                        }
                    }
                    Reply::Failed(f) => self.failed("read the queue's procedures", &f),
                    _ => {}
                }
            }
            Sent::CreateGroups(units) => {
                self.groups_in_flight = false;
                let ok = match &reply {
                    Reply::Failed(f) => {
                        self.failed("create the consumer groups", f);
                        false
                    }
                    _ => true,
                };
                for unit in units {
                    self.set_group(&unit, if ok { Group::Ready } else { Group::Unknown });
                    if ok && unit.partition.is_none() {
                        self.unscanned.insert(unit);
                    }
                }
            }
            Sent::Read { at, units, count } => {
                self.read_in_flight = false;
                self.reserved -= count * units.len();
                for (unit, _) in &units {
                    if let Some(u) = self.units.get_mut(unit) {
                        u.busy = false;
                    }
                }
                match reply {
                    Reply::Read(mut per_unit) => {
                        self.read_failures = 0;
                        for (unit, epoch) in units {
                            let got = per_unit
                                .iter_mut()
                                .find(|(u, _)| *u == unit)
                                .map(|(_, got)| std::mem::take(got))
                                .unwrap_or_default();
                            if got.len() >= count {
                                // Full: more may be waiting.
                                self.mark_dirty(&unit);
                            }
                            self.take_in(&unit, epoch, got, false, at, now);
                        }
                    }
                    Reply::Failed(f) => {
                        self.read_failed(&f, now);
                        // What the lost reply brought is pending for us:
                        // our own pending entries are read before anything
                        // new.
                        let no_group = matches!(f, Failure::NoGroup(_));
                        for (unit, epoch) in units {
                            self.recover(&unit, epoch, no_group);
                        }
                    }
                    _ => {}
                }
            }
            Sent::Take {
                at,
                unit,
                epoch,
                reserved,
                claims,
            } => {
                self.side_in_flight = false;
                self.reserved -= reserved;
                match reply {
                    Reply::Taken { next, got } => {
                        self.read_failures = 0;
                        let taken = self.take_in(&unit, epoch, got, true, at, now);
                        if taken > 0 && claims {
                            self.outputs.push_back(Output::Note(Note::TakenOver {
                                unit: unit.clone(),
                                entries: taken,
                            }));
                        }
                        self.advance(&unit, epoch, next);
                    }
                    Reply::Failed(f) => {
                        self.read_failed(&f, now);
                        if matches!(f, Failure::NoGroup(_)) {
                            self.set_group(&unit, Group::Unknown);
                        }
                    }
                    _ => {}
                }
            }
            Sent::Scan => {
                self.scan_in_flight = false;
                match reply {
                    Reply::Stale(units) => {
                        for unit in units {
                            self.claim_stale(&unit);
                        }
                    }
                    Reply::Failed(f) => self.failed("look for entries left idle", &f),
                    _ => {}
                }
            }
            Sent::Keepalive {
                at,
                renew,
                refresh,
                asked,
            } => {
                self.keepalive_in_flight = false;
                match reply {
                    Reply::Kept(kept) => {
                        // Settled; what it took is in `kept`.
                        for unit in &asked {
                            if self.unsure.get(unit).is_some_and(|t| *t <= at) {
                                self.unsure.remove(unit);
                            }
                        }
                        self.on_kept(at, renew, refresh, kept, now)
                    }
                    Reply::Failed(f) => {
                        // It may have taken some of them, or not settled
                        // them: none was called for, so they may be given
                        // up at once.
                        for unit in asked {
                            self.unsure.entry(unit).or_insert(now);
                        }
                        self.failed("keep leases and entries alive", &f)
                    }
                    _ => {}
                }
            }
            Sent::Commit { command, attempts } => {
                self.count_commits(&command, false);
                if let Reply::Failed(f) = reply {
                    self.commit_failed(command, attempts, f, now);
                }
            }
            Sent::GiveUp(units) => {
                if let Reply::Failed(f) = &reply {
                    self.failed("hand partitions over", f);
                    // Handed over with nothing of them left here.
                    for unit in &units {
                        self.unsure.entry(unit.clone()).or_insert(now);
                    }
                }
                // Given up or not, they are no longer read here; an
                // unanswered one is settled by the next keepalive.
                for unit in units {
                    if self
                        .units
                        .get(&unit)
                        .is_some_and(|u| u.lease == Lease::GivingUp)
                    {
                        self.set_lease(&unit, Lease::NotOurs);
                        self.bump(&unit);
                        self.set_phase(&unit, Phase::Ready);
                    }
                }
            }
            Sent::Leave => {
                if let Reply::Failed(f) = &reply {
                    self.failed("give up the leases", f);
                }
                let leaving: Vec<Unit> = self.leased.iter().cloned().collect();
                for unit in leaving {
                    self.set_lease(&unit, Lease::NotOurs);
                    self.bump(&unit);
                }
                self.state = State::Finished;
            }
        }
    }

    /// An entry was delivered: it is acknowledged with the next tick.
    pub fn on_delivered(&mut self, key: &Key) {
        if self.forget(key) {
            self.acks.push(key.clone());
        }
    }

    /// The acknowledgements waiting for `procedure`'s streams, to be carried
    /// by an admission of that procedure (its keys share a slot): report
    /// the outcome with [`QueueCore::on_reply`] under the id given.
    pub fn ride_acks(&mut self, procedure: &str) -> Option<(CommandId, Command)> {
        if !self.acks.iter().any(|k| &*k.unit.procedure == procedure) {
            return None;
        }
        let (keys, stay): (Vec<Key>, Vec<Key>) = std::mem::take(&mut self.acks)
            .into_iter()
            .partition(|k| &*k.unit.procedure == procedure);
        self.acks = stay;
        if self.acks.is_empty() {
            self.acks_since = None;
        }
        let command = Command::Ack { keys };
        self.count_commits(&command, true);
        self.next_id += 1;
        let id = CommandId(self.next_id);
        self.sent.insert(
            id,
            Sent::Commit {
                command: command.clone(),
                attempts: 1,
            },
        );
        Some((id, command))
    }

    /// An entry was given up here: it goes to the dead-letter stream (if it
    /// is still ours) with this record.
    pub fn dead_letter(&mut self, key: &Key, fields: Vec<(&'static str, Vec<u8>)>) {
        if self.forget(key) {
            self.commit(Command::DeadLetter {
                key: key.clone(),
                fields,
            });
        }
    }

    /// An event that never reached the queue was given up: it is stored as
    /// a dead letter unless another instance admitted it.
    pub fn dead_letter_unadmitted(
        &mut self,
        procedure: &str,
        publication: u64,
        fields: Vec<(&'static str, Vec<u8>)>,
        claim: bool,
    ) {
        self.commit(Command::DeadLetterUnadmitted {
            procedure: Arc::from(procedure),
            publication,
            fields,
            claim,
        });
    }

    /// An entry not finished here (the shutdown deadline): left to the other
    /// instances at once.
    pub fn release(&mut self, key: &Key) {
        if self.forget(key) && key.unit.partition.is_none() {
            // A partition's next holder claims all that is pending anyway.
            let idle = self.release_idle();
            self.commit(Command::Release {
                keys: vec![key.clone()],
                idle,
            });
        }
    }

    /// Entries the delivery stage gave back after [`Output::Withdraw`]:
    /// forgotten here, not acknowledged.
    pub fn on_withdrawn(&mut self, keys: &[Key]) {
        let fenced = keys.iter().filter(|key| self.forget(key)).count();
        if fenced > 0 {
            self.outputs
                .push_back(Output::Note(Note::Fenced { entries: fenced }));
        }
    }

    /// A delivery was cancelled before it started because one of its
    /// entries may not be dispatched now ([`QueueCore::may_dispatch`]):
    /// its entries are forgotten here. A stream that is still ours but lost
    /// an entry that way has all its waiting entries taken back too and is
    /// read again from its pending entries, so that its order holds.
    pub fn cancelled(&mut self, keys: &[Key], now: Instant) {
        let mut units: Vec<(Unit, bool)> = Vec::new();
        for key in keys {
            let valid = self.may_dispatch(key, now);
            match units.iter_mut().find(|(u, _)| *u == key.unit) {
                Some(u) => u.1 |= valid,
                None => units.push((key.unit.clone(), valid)),
            }
        }
        self.on_withdrawn(keys);
        for (unit, still_ours) in units {
            if !still_ours {
                // The fence takes the rest back at the next tick.
                continue;
            }
            let withdraw = self.revoke_all(&unit);
            if !withdraw.is_empty() {
                self.outputs.push_back(Output::Withdraw(withdraw));
            }
            let epoch = self.units.get(&unit).map_or(0, |u| u.epoch);
            self.recover(&unit, epoch, false);
        }
    }

    /// Whether an entry may be dispatched now: held, not taken back, and
    /// certainly still ours.
    pub fn may_dispatch(&self, key: &Key, now: Instant) -> bool {
        self.certain_until(key).is_some_and(|until| now < until)
    }

    /// Until when an entry held and not taken back is certainly ours (its
    /// partition's lease, or its own claim); `None` when it is not held.
    pub fn certain_until(&self, key: &Key) -> Option<Instant> {
        let u = self.units.get(&key.unit)?;
        match u.held.get(&key.id) {
            Some(held) if !held.revoked => match (key.unit.partition, &u.lease) {
                (Some(_), Lease::Ours { valid_until, .. }) => Some(*valid_until),
                (Some(_), _) => None,
                (None, _) => Some(held.owned_until),
            },
            _ => None,
        }
    }

    /// Time passed (and inputs were taken): what is not certainly ours any
    /// more is taken back; what is due is sent.
    pub fn on_tick(&mut self, now: Instant) {
        self.fence(now);
        if self.state == State::Finished {
            return;
        }
        if !self.keepalive_in_flight && now >= self.next_keepalive {
            self.keepalive(now);
        }
        self.retry_commits(now);
        if self.acks.is_empty() {
            self.acks_since = None;
        } else {
            let since = *self.acks_since.get_or_insert(now);
            if now >= since + ACK_LINGER
                || self.acks.len() >= ACK_BATCH
                || self.state != State::Running
            {
                self.acks_since = None;
                let keys = std::mem::take(&mut self.acks);
                self.commit(Command::Ack { keys });
            }
        }
        match self.state {
            State::Running => {
                self.hand_over();
                if !self.registry_in_flight && now >= self.next_registry {
                    self.registry_in_flight = true;
                    self.next_registry = now + REGISTRY_EVERY.min(self.s.claim_idle);
                    self.send(Command::Procedures, Sent::Procedures);
                }
                self.create_groups();
                if !self.scan_in_flight && (now >= self.next_scan || !self.unscanned.is_empty()) {
                    self.scan(now);
                }
                if now >= self.next_sweep {
                    // Every stream read once per claim idle time, whatever
                    // admission saw (a redrive, a stream left full).
                    self.next_sweep = now + self.s.claim_idle;
                    let all: Vec<Unit> = self
                        .units
                        .keys()
                        .filter(|u| u.partition.is_none())
                        .chain(self.leased.iter())
                        .cloned()
                        .collect();
                    self.dirty.extend(all);
                }
                // After failed reads, the next ones wait a little.
                if self.read_pause_until.is_some_and(|t| now < t) {
                    return;
                }
                self.read_pause_until = None;
                self.side_read(now);
                self.read(now);
            }
            State::Draining => {
                let busy = self.held > 0
                    || !self.retries.is_empty()
                    || self.units.values().any(|u| u.commits > 0)
                    || self.read_in_flight
                    || self.side_in_flight
                    || !self.grants.is_empty();
                if !busy {
                    self.leave();
                }
            }
            State::Leaving | State::Finished => {}
        }
    }

    /// Begins the drain: nothing new is read; what is held is finished or
    /// released by the driver; then the leases are given up.
    pub fn shutdown(&mut self) {
        if self.state == State::Running {
            self.state = State::Draining;
        }
    }

    // ------------------------------------------------------------ outputs

    pub fn poll(&mut self) -> Option<Output<T>> {
        self.outputs.pop_front()
    }

    /// Whether [`QueueCore::poll`] has something.
    pub fn has_output(&self) -> bool {
        !self.outputs.is_empty()
    }

    /// When [`QueueCore::on_tick`] has something to do.
    pub fn next_wake(&self) -> Option<Instant> {
        if self.state == State::Finished {
            return None;
        }
        let mut wake = self.deadlines.first().map(|(t, _)| *t);
        let mut at = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        if !self.keepalive_in_flight {
            at(self.next_keepalive);
        }
        if let Some(since) = self.acks_since {
            at(since + ACK_LINGER);
        }
        if self.state == State::Running {
            if !self.scan_in_flight {
                at(self.next_scan);
            }
            if !self.registry_in_flight {
                at(self.next_registry);
            }
            at(self.next_sweep);
            if let Some(t) = self.read_pause_until {
                at(t);
            }
        }
        for (t, _, _) in &self.retries {
            at(*t);
        }
        wake
    }

    /// Entries held (waiting or in flight in the delivery stage).
    pub fn held(&self) -> usize {
        self.held
    }

    /// Entries held, counted stream by stream: the one record of what is
    /// held, which `held` sums up as it changes (the model test checks that
    /// they agree after every step).
    #[cfg(test)]
    pub(crate) fn held_by_stream(&self) -> usize {
        self.units.values().map(|u| u.held.len()).sum()
    }

    /// Whether every stream's `until` counts exactly its entries held and
    /// not taken back, by the time each is ours until (the model test
    /// checks it after every step: the fence's deadlines come from it).
    #[cfg(test)]
    pub(crate) fn until_agrees(&self) -> bool {
        self.units.values().all(|u| {
            let mut until: BTreeMap<Instant, u32> = BTreeMap::new();
            for h in u.held.values().filter(|h| !h.revoked) {
                own_until(&mut until, h.owned_until);
            }
            until == u.until
        })
    }

    /// Entries held plus what the reads, takes and grants in flight may
    /// bring: never above the window.
    pub fn committed(&self) -> usize {
        self.held + self.reserved
    }

    pub fn window(&self) -> usize {
        self.s.window
    }

    /// The partitions whose lease is ours now.
    pub fn leases(&self) -> impl Iterator<Item = &Unit> {
        self.leased.iter().filter(|u| {
            self.units
                .get(*u)
                .is_some_and(|s| matches!(s.lease, Lease::Ours { .. }))
        })
    }

    /// The drain is over and the leases are given up.
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    // ------------------------------------------------------------ indexes

    fn set_phase(&mut self, unit: &Unit, phase: Phase) {
        let Some(u) = self.units.get_mut(unit) else {
            return;
        };
        u.phase = phase;
        match phase {
            Phase::Take { .. } => {
                self.taking.insert(unit.clone());
            }
            Phase::Ready => {
                self.taking.remove(unit);
            }
        }
    }

    fn set_lease(&mut self, unit: &Unit, lease: Lease) {
        let Some(u) = self.units.get_mut(unit) else {
            return;
        };
        u.lease = lease;
        match lease {
            Lease::NotOurs => {
                self.leased.remove(unit);
                self.dirty.remove(unit);
            }
            Lease::Ours { .. } | Lease::GivingUp => {
                self.leased.insert(unit.clone());
            }
        }
        self.update_deadline(unit);
    }

    fn set_group(&mut self, unit: &Unit, group: Group) {
        let Some(u) = self.units.get_mut(unit) else {
            return;
        };
        u.group = group;
        if group == Group::Unknown {
            self.no_group.insert(unit.clone());
        } else {
            self.no_group.remove(unit);
        }
    }

    /// A new holding of `unit` (a fence, a lease taken, a recovery):
    /// replies to what was sent before are dropped.
    fn bump(&mut self, unit: &Unit) {
        if let Some(u) = self.units.get_mut(unit) {
            u.epoch += 1;
        }
    }

    /// `unit` may have entries not read yet (a plain stream, or a partition
    /// whose lease is ours).
    fn mark_dirty(&mut self, unit: &Unit) {
        if unit.partition.is_none() || self.leased.contains(unit) {
            self.dirty.insert(unit.clone());
        }
    }

    /// Recomputes when what `unit` holds stops being certainly ours.
    fn update_deadline(&mut self, unit: &Unit) {
        let Some(u) = self.units.get_mut(unit) else {
            return;
        };
        let deadline = match (unit.partition, u.lease) {
            (Some(_), Lease::Ours { valid_until, .. }) => Some(valid_until),
            (Some(_), _) => None,
            (None, _) => u.until.keys().next().copied(),
        };
        if u.deadline == deadline {
            return;
        }
        if let Some(old) = u.deadline.take() {
            self.deadlines.remove(&(old, unit.clone()));
        }
        u.deadline = deadline;
        if let Some(new) = deadline {
            self.deadlines.insert((new, unit.clone()));
        }
    }

    // ------------------------------------------------------------ inside

    fn send(&mut self, command: Command, sent: Sent) {
        self.next_id += 1;
        let id = CommandId(self.next_id);
        self.sent.insert(id, sent);
        self.outputs.push_back(Output::Send(id, command));
    }

    fn commit(&mut self, command: Command) {
        self.send_commit(command, 0);
    }

    fn send_commit(&mut self, command: Command, attempts: u32) {
        self.count_commits(&command, true);
        self.send(
            command.clone(),
            Sent::Commit {
                command,
                attempts: attempts + 1,
            },
        );
    }

    /// Counts a commit of each of its streams in flight (or done).
    fn count_commits(&mut self, command: &Command, more: bool) {
        for key in command_keys(command) {
            if let Some(u) = self.units.get_mut(&key.unit) {
                u.commits = if more {
                    u.commits + 1
                } else {
                    u.commits.saturating_sub(1)
                };
            }
        }
    }

    fn commit_failed(&mut self, command: Command, attempts: u32, f: Failure, now: Instant) {
        let what = match &command {
            Command::Ack { .. } => "acknowledge delivered entries",
            Command::DeadLetter { .. } => "dead-letter an entry",
            Command::DeadLetterUnadmitted { .. } => "store a dead letter",
            Command::Release { .. } => "release entries",
            _ => "update the queue",
        };
        self.failed(what, &f);
        if attempts >= COMMIT_ATTEMPTS || matches!(f, Failure::Final(_)) {
            self.outputs.push_back(Output::Note(Note::CommitGivenUp {
                what,
                keys: command_keys(&command).len(),
                error: f.to_string(),
            }));
            return;
        }
        // Counted in flight while it waits: a handover waits for it too.
        self.count_commits(&command, true);
        self.retries
            .push((now + backoff(attempts), command, attempts));
    }

    /// A command failed: noted, and Redis counts as down after a few.
    fn failed(&mut self, what: &'static str, f: &Failure) {
        self.outputs.push_back(Output::Note(Note::CommandFailed {
            what,
            error: f.to_string(),
        }));
        if matches!(f, Failure::Transient(_)) {
            self.failures += 1;
            if self.failures >= DOWN_AFTER && self.redis_up != Some(false) {
                self.redis_up = Some(false);
                self.outputs.push_back(Output::RedisUp(false));
            }
        }
    }

    fn answered(&mut self) {
        self.failures = 0;
        if self.redis_up != Some(true) {
            self.redis_up = Some(true);
            self.outputs.push_back(Output::RedisUp(true));
        }
    }

    fn read_failed(&mut self, f: &Failure, now: Instant) {
        self.failed("read the queue's streams", f);
        self.read_failures += 1;
        self.read_pause_until = Some(now + backoff(self.read_failures));
    }

    /// A take of `unit` answered: the walk goes on after `next`, or (at the
    /// end) the stream reads new entries now, unless its epoch moved on.
    fn advance(&mut self, unit: &Unit, epoch: u32, next: EntryId) {
        let Some(u) = self.units.get(unit) else {
            return;
        };
        if u.epoch != epoch {
            return;
        }
        match u.phase {
            Phase::Take {
                min_idle,
                count_own,
                ..
            } if next != EntryId::ZERO => {
                let phase = Phase::Take {
                    cursor: next,
                    min_idle,
                    count_own,
                };
                self.set_phase(unit, phase);
            }
            _ => {
                self.set_phase(unit, Phase::Ready);
                self.mark_dirty(unit);
            }
        }
    }

    /// `unit`'s own pending entries are read again before anything new: a
    /// read's reply was lost, or entries were dropped because they came
    /// from an earlier holding. A partition's holder takes everything
    /// pending in it again instead (its own entries included), in order.
    fn recover(&mut self, unit: &Unit, epoch: u32, no_group: bool) {
        if no_group {
            self.set_group(unit, Group::Unknown);
        }
        let Some(u) = self.units.get_mut(unit) else {
            return;
        };
        if u.epoch != epoch {
            // A later holding already started over.
            return;
        }
        let min_idle = match unit.partition {
            Some(_) if matches!(u.lease, Lease::Ours { .. }) => Some(Duration::ZERO),
            Some(_) => return,
            None => None,
        };
        let count_own = !u.counted;
        u.counted = true;
        u.epoch += 1;
        self.set_phase(
            unit,
            Phase::Take {
                cursor: EntryId::ZERO,
                min_idle,
                count_own,
            },
        );
    }

    /// Takes in the entries a read, a take or an admission brought for
    /// `unit` (sent at `at`, in epoch `epoch`): hands out those that may
    /// go, dead-letters those delivered too often, and drops everything
    /// when the stream's holding changed meanwhile or is not certainly ours
    /// (such entries stay pending in Redis and are read or taken again, in
    /// order). Returns how many were handed out or dead-lettered.
    fn take_in(
        &mut self,
        unit: &Unit,
        epoch: u32,
        got: Vec<Got<T>>,
        taken_over: bool,
        at: Instant,
        now: Instant,
    ) -> usize {
        if got.is_empty() {
            return 0;
        }
        let running = self.state == State::Running;
        let max = self
            .max_deliveries_of
            .get(&unit.procedure)
            .copied()
            .unwrap_or(self.s.max_deliveries);
        let owned_until = at + self.s.claim_idle - self.margin;
        let release_idle = self.release_idle();
        let Some(u) = self.units.get_mut(unit) else {
            return 0;
        };
        let valid = match unit.partition {
            Some(_) => matches!(u.lease, Lease::Ours { valid_until, .. } if now < valid_until),
            None => now < owned_until,
        };
        if u.epoch != epoch || !valid || !running {
            let dropped: Vec<Key> = got
                .iter()
                .filter(|g| g.body.is_some() && !u.held.contains_key(&g.id))
                .map(|g| Key {
                    unit: unit.clone(),
                    id: g.id,
                })
                .collect();
            if dropped.is_empty() {
                return 0;
            }
            if running {
                let e = u.epoch;
                self.recover(unit, e, false);
            } else if unit.partition.is_none() {
                // Shutting down: left to the other instances at once.
                self.commit(Command::Release {
                    keys: dropped,
                    idle: release_idle,
                });
            }
            return 0;
        }
        let mut handed = Vec::new();
        let mut deleted = Vec::new();
        let mut poisoned = 0;
        let mut probation = None;
        for g in got {
            if u.held.contains_key(&g.id) {
                // Already here (in flight since before a recovery read or a
                // take): it stays as it is.
                continue;
            }
            let key = Key {
                unit: unit.clone(),
                id: g.id,
            };
            let Some(body) = g.body else {
                // Deleted but still pending (an acknowledgement that did
                // not finish): acknowledged away.
                deleted.push(key);
                continue;
            };
            u.held.insert(
                g.id,
                Held {
                    owned_until,
                    revoked: false,
                },
            );
            own_until(&mut u.until, owned_until);
            let h = Handed {
                key,
                deliveries: g.deliveries,
                taken_over: taken_over && g.deliveries > 1,
                body,
            };
            if taken_over && g.deliveries > 1 {
                probation = Some(h.key.clone());
            }
            if g.deliveries > max {
                poisoned += 1;
                self.outputs.push_back(Output::Poison(h));
            } else {
                handed.push(h);
            }
        }
        let n = handed.len() + poisoned;
        self.held += n;
        if probation.is_some() {
            self.probation = probation;
        }
        if !handed.is_empty() {
            self.outputs.push_back(Output::Deliver(handed));
        }
        self.acks.extend(deleted);
        self.update_deadline(unit);
        n
    }

    /// Forgets a held entry; false if it was not held.
    fn forget(&mut self, key: &Key) -> bool {
        let Some(u) = self.units.get_mut(&key.unit) else {
            return false;
        };
        let Some(held) = u.held.remove(&key.id) else {
            return false;
        };
        if self.probation.as_ref() == Some(key) {
            self.probation = None;
        }
        self.held -= 1;
        if !held.revoked {
            disown(&mut u.until, held.owned_until);
        }
        if key.unit.partition.is_none() && !held.revoked && u.deadline == Some(held.owned_until) {
            self.update_deadline(&key.unit);
        }
        true
    }

    /// Idle time set on released entries: past any instance's claim
    /// threshold.
    fn release_idle(&self) -> Duration {
        self.s.claim_idle * 2 + Duration::from_secs(1)
    }

    /// A plain stream has entries idle too long: they are taken (then new
    /// entries are read again).
    fn claim_stale(&mut self, unit: &Unit) {
        if unit.partition.is_some() {
            return;
        }
        if self
            .units
            .get(unit)
            .is_some_and(|u| u.phase == Phase::Ready)
        {
            let phase = Phase::Take {
                cursor: EntryId::ZERO,
                min_idle: Some(self.s.claim_idle),
                count_own: false,
            };
            self.set_phase(unit, phase);
        }
    }

    fn on_kept(
        &mut self,
        at: Instant,
        renew: Vec<(Unit, u32)>,
        refresh: Vec<(Unit, u32, Vec<EntryId>)>,
        kept: Kept,
        now: Instant,
    ) {
        self.instances = kept.instances.max(1);
        if self.departures.is_some_and(|d| d != kept.departures) {
            // An instance went silent or left: what it held is claimable
            // (at once if it released it, after the claim idle time if it
            // died), so look for it now and once more a little later.
            self.next_scan = self.next_scan.min(now);
            self.scans_after = 1;
        }
        self.departures = Some(kept.departures);
        let valid_until = at + self.s.claim_idle - self.margin;
        let asked: HashMap<Unit, u32> = renew.into_iter().collect();
        for (unit, ours) in kept.renewed {
            let Some(u) = self.units.get(&unit) else {
                continue;
            };
            if asked.get(&unit) != Some(&u.epoch) {
                continue;
            }
            match (ours, u.lease) {
                (true, Lease::Ours { leaving, .. }) => self.set_lease(
                    &unit,
                    Lease::Ours {
                        valid_until,
                        leaving,
                    },
                ),
                (false, Lease::Ours { .. }) => self.lose_lease(&unit),
                _ => {}
            }
        }
        let running = self.state == State::Running;
        for (unit, empty) in kept.taken {
            let Some(u) = self.units.get_mut(&unit) else {
                continue;
            };
            u.epoch += 1;
            let count_own = !u.counted;
            u.counted = true;
            self.set_lease(
                &unit,
                Lease::Ours {
                    valid_until,
                    // Taken just as we stop: given up with the rest.
                    leaving: !running,
                },
            );
            if empty {
                // Nothing pending: its new entries are read at once.
                self.set_phase(&unit, Phase::Ready);
                self.mark_dirty(&unit);
            } else {
                // Everything still pending in it first, whoever held it
                // (our own from before a restart count as delivered again).
                self.set_phase(
                    &unit,
                    Phase::Take {
                        cursor: EntryId::ZERO,
                        min_idle: Some(Duration::ZERO),
                        count_own,
                    },
                );
            }
            self.outputs
                .push_back(Output::Note(Note::LeaseTaken { unit: unit.clone() }));
        }
        let lost: BTreeSet<Key> = kept.lost.into_iter().collect();
        let mut withdraw = Vec::new();
        for (unit, epoch, ids) in refresh {
            let Some(u) = self.units.get_mut(&unit) else {
                continue;
            };
            if u.epoch != epoch {
                continue;
            }
            for id in ids {
                let Some(held) = u.held.get_mut(&id) else {
                    continue;
                };
                if held.revoked {
                    continue;
                }
                let key = Key {
                    unit: unit.clone(),
                    id,
                };
                let was = held.owned_until;
                if lost.contains(&key) {
                    held.revoked = true;
                    withdraw.push(key);
                } else {
                    held.owned_until = valid_until;
                }
                disown(&mut u.until, was);
                if !held.revoked {
                    own_until(&mut u.until, valid_until);
                }
            }
            self.update_deadline(&unit);
        }
        if !withdraw.is_empty() {
            self.outputs.push_back(Output::Withdraw(withdraw));
        }
        self.balance();
    }

    /// Above our share of a procedure's partitions (another instance
    /// joined): the last ones are handed over.
    fn balance(&mut self) {
        let Some(partitions) = self.s.partitions else {
            return;
        };
        if self.state != State::Running {
            return;
        }
        let share = usize::from(partitions).div_ceil(self.instances);
        let mut staying: BTreeMap<Arc<str>, Vec<Unit>> = BTreeMap::new();
        for unit in &self.leased {
            if self
                .units
                .get(unit)
                .is_some_and(|u| matches!(u.lease, Lease::Ours { leaving: false, .. }))
            {
                staying
                    .entry(unit.procedure.clone())
                    .or_default()
                    .push(unit.clone());
            }
        }
        for units in staying.values() {
            let excess = units.len().saturating_sub(share);
            for unit in units.iter().rev().take(excess) {
                if let Some(Lease::Ours { valid_until, .. }) = self.units.get(unit).map(|u| u.lease)
                {
                    self.set_lease(
                        unit,
                        Lease::Ours {
                            valid_until,
                            leaving: true,
                        },
                    );
                    self.dirty.remove(unit);
                    self.outputs.push_back(Output::Note(Note::HandingOver {
                        unit: unit.clone(),
                        instances: self.instances,
                    }));
                }
            }
        }
    }

    /// Partitions being handed over with nothing of them left here are
    /// given up.
    fn hand_over(&mut self) {
        if self.side_in_flight {
            return;
        }
        let done: Vec<Unit> = self
            .leased
            .iter()
            .filter(|unit| {
                self.units.get(*unit).is_some_and(|u| {
                    matches!(u.lease, Lease::Ours { leaving: true, .. })
                        && u.held.is_empty()
                        && u.commits == 0
                        && !u.busy
                })
            })
            .cloned()
            .collect();
        if done.is_empty() {
            return;
        }
        for unit in &done {
            self.set_lease(unit, Lease::GivingUp);
        }
        self.send(
            Command::GiveUp {
                units: done.clone(),
            },
            Sent::GiveUp(done),
        );
    }

    /// Marks every entry `unit` holds as taken back; returns them.
    fn revoke_all(&mut self, unit: &Unit) -> Vec<Key> {
        let Some(u) = self.units.get_mut(unit) else {
            return Vec::new();
        };
        let mut keys = Vec::new();
        for (id, held) in u.held.iter_mut() {
            if !held.revoked {
                held.revoked = true;
                disown(&mut u.until, held.owned_until);
                keys.push(Key {
                    unit: unit.clone(),
                    id: *id,
                });
            }
        }
        self.update_deadline(unit);
        keys
    }

    /// A partition is not (certainly) ours any more: its entries are taken
    /// back.
    fn lose_lease(&mut self, unit: &Unit) {
        // It may still be ours in Redis (let go of by our clock, a quarter
        // of the lease time early): given up only when it would have lapsed,
        // so that a call already made for it ends before anybody takes it.
        if let Some(UnitState {
            lease: Lease::Ours { valid_until, .. },
            ..
        }) = self.units.get(unit)
        {
            let at = *valid_until + self.margin;
            self.unsure.insert(unit.clone(), at);
        }
        self.set_lease(unit, Lease::NotOurs);
        self.bump(unit);
        self.set_phase(unit, Phase::Ready);
        let keys = self.revoke_all(unit);
        self.outputs
            .push_back(Output::Note(Note::LeaseLost { unit: unit.clone() }));
        if !keys.is_empty() {
            self.outputs.push_back(Output::Withdraw(keys));
        }
    }

    /// Takes back what is not certainly ours any more.
    fn fence(&mut self, now: Instant) {
        while let Some((t, unit)) = self.deadlines.first().cloned() {
            if t > now {
                return;
            }
            match unit.partition {
                Some(_) => self.lose_lease(&unit),
                None => {
                    let Some(u) = self.units.get_mut(&unit) else {
                        self.deadlines.remove(&(t, unit));
                        continue;
                    };
                    let mut withdraw = Vec::new();
                    for (id, held) in u.held.iter_mut() {
                        if !held.revoked && now >= held.owned_until {
                            held.revoked = true;
                            disown(&mut u.until, held.owned_until);
                            withdraw.push(Key {
                                unit: unit.clone(),
                                id: *id,
                            });
                        }
                    }
                    let epoch = u.epoch;
                    self.update_deadline(&unit);
                    if !withdraw.is_empty() {
                        self.outputs.push_back(Output::Withdraw(withdraw));
                        // What is still ours comes back with a read of our
                        // own pending entries (sent after the delivery stage
                        // gave the others up).
                        self.recover(&unit, epoch, false);
                    }
                }
            }
        }
    }

    fn room(&self) -> usize {
        self.s.window.saturating_sub(self.held + self.reserved)
    }

    /// Whether `unit`'s new entries may be read now.
    fn readable(&self, unit: &Unit, now: Instant) -> bool {
        self.state == State::Running
            && !self.paused.contains(&unit.procedure)
            && self.units.get(unit).is_some_and(|u| {
                u.group == Group::Ready
                    && u.phase == Phase::Ready
                    && !u.busy
                    && match unit.partition {
                        None => true,
                        Some(_) => matches!(
                            u.lease,
                            Lease::Ours { valid_until, leaving: false } if now < valid_until
                        ),
                    }
            })
    }

    fn keepalive(&mut self, now: Instant) {
        self.next_keepalive = now + self.every;
        let running = self.state == State::Running;
        let mut renew = Vec::new();
        for unit in &self.leased {
            if let Some(u) = self.units.get(unit)
                && matches!(u.lease, Lease::Ours { .. })
            {
                renew.push((unit.clone(), u.epoch));
            }
        }
        let mut take = Vec::new();
        if let (Some(partitions), true) = (self.s.partitions, running) {
            let share = usize::from(partitions).div_ceil(self.instances);
            for p in &self.procedures {
                let mut staying = 0;
                let mut free = Vec::new();
                for k in 0..partitions {
                    let unit = Unit::partition(p, k);
                    match self.units.get(&unit) {
                        Some(u) if matches!(u.lease, Lease::Ours { leaving: false, .. }) => {
                            staying += 1
                        }
                        // Not one that may still be ours in Redis before it
                        // is given up (`unsure`).
                        Some(u)
                            if u.lease == Lease::NotOurs
                                && u.group == Group::Ready
                                && self.unsure.get(&unit).is_none_or(|t| *t <= now) =>
                        {
                            free.push(k)
                        }
                        _ => {}
                    }
                }
                let want = share.saturating_sub(staying);
                if want > 0 && !free.is_empty() {
                    take.push((p.clone(), free, want));
                }
            }
        }
        let mut refresh = Vec::new();
        for (unit, u) in &self.units {
            if unit.partition.is_some() || u.held.is_empty() {
                continue;
            }
            let ids: Vec<EntryId> = u
                .held
                .iter()
                .filter(|(_, h)| !h.revoked)
                .map(|(id, _)| *id)
                .collect();
            if !ids.is_empty() {
                refresh.push((unit.clone(), u.epoch, ids));
            }
        }
        let settle: Vec<Unit> = self
            .unsure
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(u, _)| u.clone())
            .collect();
        let asked: Vec<Unit> = take
            .iter()
            .flat_map(|(p, ks, _)| ks.iter().map(|k| Unit::partition(p, *k)))
            .chain(settle.iter().cloned())
            .collect();
        let command = Command::Keepalive {
            settle,
            renew: renew.iter().map(|(u, _)| u.clone()).collect(),
            take,
            refresh: refresh
                .iter()
                .map(|(u, _, ids)| (u.clone(), ids.clone()))
                .collect(),
            ttl: self.s.claim_idle,
        };
        self.keepalive_in_flight = true;
        self.send(
            command,
            Sent::Keepalive {
                at: now,
                renew,
                refresh,
                asked,
            },
        );
    }

    fn retry_commits(&mut self, now: Instant) {
        if self.retries.iter().all(|(at, _, _)| *at > now) {
            return;
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retries)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.retries = later;
        for (_, command, attempts) in due {
            self.count_commits(&command, false);
            self.send_commit(command, attempts);
        }
    }

    fn create_groups(&mut self) {
        if self.groups_in_flight || self.no_group.is_empty() {
            return;
        }
        let units: Vec<Unit> = std::mem::take(&mut self.no_group).into_iter().collect();
        for unit in &units {
            if let Some(u) = self.units.get_mut(unit) {
                u.group = Group::Creating;
            }
        }
        self.groups_in_flight = true;
        self.send(
            Command::CreateGroups {
                units: units.clone(),
            },
            Sent::CreateGroups(units),
        );
    }

    /// Takes of pending entries (own ones, or those left by others), before
    /// the streams' new entries are read.
    ///
    /// An entry handed out before goes out alone: the next is taken only
    /// once it is resolved. If it is what killed its last holder, no other
    /// entry should be out with it (every entry an instance held when it
    /// died counts one more delivery when it is taken over, and would reach
    /// the delivery cap along with the poison).
    fn side_read(&mut self, now: Instant) {
        if self.side_in_flight || self.probation.is_some() {
            return;
        }
        let room = self.room().min(self.s.read_max);
        if room == 0 {
            return;
        }
        let next = self.taking.iter().find_map(|unit| {
            let u = self.units.get(unit)?;
            let Phase::Take {
                cursor,
                min_idle,
                count_own,
            } = u.phase
            else {
                return None;
            };
            if u.group != Group::Ready || u.busy || self.paused.contains(&unit.procedure) {
                return None;
            }
            // A partition is taken from only by its holder.
            let holding = matches!(
                u.lease,
                Lease::Ours { valid_until, leaving: false } if now < valid_until
            );
            if unit.partition.is_some() && !holding {
                return None;
            }
            Some((unit.clone(), u.epoch, cursor, min_idle, count_own))
        });
        let Some((unit, epoch, cursor, min_idle, count_own)) = next else {
            return;
        };
        self.side_in_flight = true;
        self.reserved += room;
        self.send(
            Command::Take {
                unit: unit.clone(),
                cursor,
                count: room,
                min_idle,
                count_own,
            },
            Sent::Take {
                at: now,
                unit,
                epoch,
                reserved: room,
                claims: min_idle.is_some_and(|idle| idle > Duration::ZERO),
            },
        );
    }

    /// Every stream when one is due (at start, after a departure, as a
    /// backstop), else the streams no scan covered yet.
    fn scan(&mut self, now: Instant) {
        let units: Vec<Unit> = if now >= self.next_scan {
            self.next_scan = if self.scans_after > 0 {
                self.scans_after -= 1;
                now + self.s.claim_idle / 2
            } else {
                now + self.s.claim_idle * SCAN_BACKSTOP
            };
            self.unscanned.clear();
            self.units
                .iter()
                .filter(|(_, u)| u.group == Group::Ready)
                .map(|(unit, _)| unit.clone())
                .collect()
        } else {
            std::mem::take(&mut self.unscanned)
                .into_iter()
                .filter(|unit| {
                    self.units
                        .get(unit)
                        .is_some_and(|u| u.group == Group::Ready)
                })
                .collect()
        };
        if units.is_empty() {
            return;
        }
        self.scan_in_flight = true;
        self.send(
            Command::Scan {
                units,
                idle: self.s.claim_idle,
            },
            Sent::Scan,
        );
    }

    /// A read of the streams marked dirty, if there is room and none in
    /// flight: a share of the room each, or (when more are dirty than the
    /// room holds) one entry each of as many as fit, in turn.
    fn read(&mut self, now: Instant) {
        if self.read_in_flight || self.dirty.is_empty() {
            return;
        }
        let room = self.room();
        if room == 0 {
            return;
        }
        let start = self.read_from.take();
        let after = start
            .as_ref()
            .map(|u| self.dirty.range(u.clone()..))
            .into_iter()
            .flatten();
        let before = match &start {
            Some(u) => self.dirty.range(..u.clone()),
            None => self.dirty.range(..),
        };
        let mut units: Vec<(Unit, u32)> = Vec::new();
        let mut gone: Vec<Unit> = Vec::new();
        for unit in after.chain(before) {
            if units.len() >= room {
                self.read_from = Some(unit.clone());
                break;
            }
            if self.readable(unit, now) {
                units.push((unit.clone(), self.units.get(unit).map_or(0, |u| u.epoch)));
            } else if unit.partition.is_some() && !self.leased.contains(unit) {
                gone.push(unit.clone());
            }
        }
        for unit in gone {
            self.dirty.remove(&unit);
        }
        if units.is_empty() {
            return;
        }
        let count = (room / units.len()).clamp(1, self.s.read_max);
        for (unit, _) in &units {
            self.dirty.remove(unit);
            if let Some(u) = self.units.get_mut(unit) {
                u.busy = true;
            }
        }
        self.reserved += count * units.len();
        self.read_in_flight = true;
        self.send(
            Command::Read {
                units: units.iter().map(|(u, _)| u.clone()).collect(),
                count,
            },
            Sent::Read {
                at: now,
                units,
                count,
            },
        );
    }

    /// Gives up every lease and leaves the live instances (after the
    /// drain).
    fn leave(&mut self) {
        let leased: Vec<Unit> = self.leased.iter().cloned().collect();
        let mut units = Vec::new();
        for unit in leased {
            if self
                .units
                .get(&unit)
                .is_some_and(|u| matches!(u.lease, Lease::Ours { .. }))
            {
                self.set_lease(&unit, Lease::GivingUp);
                units.push(unit);
            }
        }
        self.state = State::Leaving;
        self.send(Command::Leave { units }, Sent::Leave);
    }
}

/// The entries a commit is about.
fn command_keys(command: &Command) -> &[Key] {
    match command {
        Command::Ack { keys } | Command::Release { keys, .. } => keys,
        Command::DeadLetter { key, .. } => std::slice::from_ref(key),
        _ => &[],
    }
}

/// The pause before try `n + 1` (`n` >= 1).
fn backoff(n: u32) -> Duration {
    let doublings = n.saturating_sub(1).min(10);
    (RETRY_FIRST * (1u32 << doublings)).min(RETRY_MAX)
}

#[cfg(test)]
mod tests;
