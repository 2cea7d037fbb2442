//! The queue core against a model of Redis: several instances, each a core
//! with a delivery stage that keeps a key's calls one at a time and in
//! order, driven through random interleavings of admissions, network
//! delays, lost replies, cut links, pauses (SIGSTOP), crashes and restarts
//! (with a stable or a new consumer name) and events that crash whoever
//! delivers them. The model executes each command as Redis does (streams,
//! consumer groups and their pending lists, admissions that take what
//! they were granted, leases that expire unless renewed as on a Cluster or
//! that last while their holder heartbeats as on one Redis, a holder being
//! one incarnation of an instance), at a time of its own.
//!
//! Invariants: no two calls of one key overlap at the backend, across
//! instances; the first calls of a key's events follow their admission
//! order; no instance holds more than its window; and once the faults stop,
//! every admitted event is acknowledged or dead-lettered (delivered too
//! often, or rejected) and nothing is left pending.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use proptest::prelude::*;

use super::*;

/// A command that never reached Redis (a cut link).
fn cut_off() -> Failure {
    Failure::Transient("cut off".into())
}

/// A reply lost on its way: the command's outcome is unknown.
fn lost() -> Failure {
    Failure::Transient("reply lost".into())
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
const CLAIM_IDLE_MS: u64 = 2_000;
/// Longest call: well inside the lease margin (a quarter of the claim idle
/// time), the assumption fencing by the clock rests on.
const CALL_MAX_MS: u64 = 300;
/// Longest one-way network delay.
const NET_MAX_MS: u64 = 15;
const MAX_DELIVERIES: u32 = 3;
const PROCEDURES: [&str; 2] = ["p.SUB_a", "p.SUB_b"];
const PARTITIONS: u16 = 3;
const KEYS: u32 = 5;

/// An event as the model stores it.
#[derive(Debug, Clone, PartialEq)]
struct Ev {
    seq: u64,
    /// The ordering key (`None`: unordered, in the plain stream).
    key: Option<u32>,
    /// Delivering it crashes the instance.
    poison: bool,
    /// The backend rejects it (a final error: dead-lettered).
    rejected: bool,
}

#[derive(Debug, Clone)]
struct Pending {
    consumer: String,
    at: Instant,
    count: u32,
}

#[derive(Debug, Default)]
struct Stream {
    entries: BTreeMap<EntryId, Ev>,
    group: bool,
    last: EntryId,
    pel: BTreeMap<EntryId, Pending>,
}

#[derive(Debug, Default)]
struct Redis {
    streams: BTreeMap<Unit, Stream>,
    /// Each lease's holder, and when it expires (`None`: never, with
    /// `live_leases`).
    leases: BTreeMap<Unit, (String, Option<Instant>)>,
    /// Leases held for as long as their holder counts as live (one Redis)
    /// instead of expiring unless renewed one by one (a cluster).
    live_leases: bool,
    live: BTreeMap<String, Instant>,
    /// Instances that went silent or left, so far.
    departures: u64,
    dead: BTreeMap<u64, u32>,
    procedures: BTreeSet<String>,
    next_ms: u64,
    /// Events appended so far, by number, with their place in the order of
    /// appends (an admission appends once).
    appended: BTreeMap<u64, u64>,
}

impl Redis {
    fn stream(&mut self, unit: &Unit) -> &mut Stream {
        self.streams.entry(unit.clone()).or_default()
    }

    /// Appends `ev` unless it was appended already.
    fn add(&mut self, unit: &Unit, ev: Ev) {
        if self.appended.contains_key(&ev.seq) {
            return;
        }
        self.appended.insert(ev.seq, self.appended.len() as u64);
        self.next_ms += 1;
        let id = EntryId(self.next_ms, 0);
        self.procedures.insert(unit.procedure.to_string());
        self.stream(unit).entries.insert(id, ev);
    }

    /// The admission script: appends, then reads up to `count` new entries
    /// for `consumer` (of a partition only if its lease is `holder`'s: the
    /// consumer's incarnation, as `Carrier::holder`).
    fn admit(
        &mut self,
        unit: &Unit,
        ev: Ev,
        consumer: &str,
        holder: &str,
        count: usize,
        now: Instant,
    ) -> Result<Vec<Got<Ev>>, Failure> {
        self.add(unit, ev);
        let fenced = unit.partition.is_some() && self.lease_key(unit, now) != Some(holder);
        if count == 0 || fenced {
            return Ok(Vec::new());
        }
        if !self.stream(unit).group {
            return Err(Failure::NoGroup("NOGROUP".into()));
        }
        Ok(self.read_new(unit, consumer, count, now))
    }

    /// What a GET of `unit`'s lease key returns.
    fn lease_key(&self, unit: &Unit, now: Instant) -> Option<&str> {
        self.leases
            .get(unit)
            .filter(|(_, until)| until.is_none_or(|u| now < u))
            .map(|(h, _)| h.as_str())
    }

    /// Whether `holder` may take `unit`'s lease: nobody holds it, it is
    /// its own, or (live leases) its holder no longer counts as live.
    fn lease_free(&self, unit: &Unit, holder: &str, now: Instant, ttl: Duration) -> bool {
        match self.lease_key(unit, now) {
            None => true,
            Some(h) if h == holder => true,
            Some(h) => {
                self.live_leases
                    && self
                        .live
                        .get(h)
                        .is_none_or(|at| now.saturating_duration_since(*at) >= ttl)
            }
        }
    }

    /// XREADGROUP `>` of one stream.
    fn read_new(
        &mut self,
        unit: &Unit,
        consumer: &str,
        count: usize,
        now: Instant,
    ) -> Vec<Got<Ev>> {
        let s = self.stream(unit);
        let ids: Vec<EntryId> = s
            .entries
            .range((
                std::ops::Bound::Excluded(s.last),
                std::ops::Bound::Unbounded,
            ))
            .take(count)
            .map(|(id, _)| *id)
            .collect();
        let mut got = Vec::new();
        for id in ids {
            s.last = id;
            s.pel.insert(
                id,
                Pending {
                    consumer: consumer.to_owned(),
                    at: now,
                    count: 1,
                },
            );
            got.push(Got {
                id,
                deliveries: 1,
                body: s.entries.get(&id).cloned(),
            });
        }
        got
    }

    /// `command` from `consumer`, whose incarnation holds leases and counts
    /// as live as `holder`.
    fn execute(
        &mut self,
        consumer: &str,
        holder: &str,
        command: &Command,
        now: Instant,
    ) -> Reply<Ev> {
        match command {
            Command::Procedures => Reply::Procedures(self.procedures.iter().cloned().collect()),
            Command::CreateGroups { units } => {
                for unit in units {
                    self.stream(unit).group = true;
                }
                Reply::Done
            }
            Command::Read { units, count, .. } => {
                if units.iter().any(|u| !self.stream(u).group) {
                    return Reply::Failed(Failure::NoGroup("NOGROUP".into()));
                }
                let per: Vec<(Unit, Vec<Got<Ev>>)> = units
                    .iter()
                    .map(|u| (u.clone(), self.read_new(u, consumer, *count, now)))
                    .filter(|(_, got)| !got.is_empty())
                    .collect();
                Reply::Read(per)
            }
            Command::Take {
                unit,
                cursor,
                count,
                min_idle,
                count_own,
            } => {
                let s = self.stream(unit);
                if !s.group {
                    return Reply::Failed(Failure::NoGroup("NOGROUP".into()));
                }
                let ids: Vec<EntryId> = s
                    .pel
                    .range((
                        std::ops::Bound::Excluded(*cursor),
                        std::ops::Bound::Unbounded,
                    ))
                    .map(|(id, _)| *id)
                    .collect();
                let mut got = Vec::new();
                let mut next = EntryId::ZERO;
                for (n, id) in ids.iter().enumerate() {
                    if n >= 10 {
                        // The script looks at so many at a time.
                        next = ids[n - 1];
                        break;
                    }
                    let p = s.pel.get_mut(id).expect("listed");
                    let mine = p.consumer == consumer;
                    let idle = now.saturating_duration_since(p.at);
                    if !mine && min_idle.is_none_or(|m| idle < m) {
                        continue;
                    }
                    let Some(body) = s.entries.get(id).cloned() else {
                        s.pel.remove(id);
                        continue;
                    };
                    if !mine || *count_own {
                        p.count += 1;
                    }
                    p.consumer = consumer.to_owned();
                    p.at = now;
                    got.push(Got {
                        id: *id,
                        deliveries: p.count,
                        body: Some(body),
                    });
                    if got.len() >= *count || p.count > 1 {
                        next = *id;
                        break;
                    }
                }
                Reply::Taken { next, got }
            }
            Command::Scan { units, idle } => Reply::Stale(
                units
                    .iter()
                    .filter(|u| u.partition.is_none())
                    .filter(|u| {
                        self.streams.get(*u).is_some_and(|s| {
                            s.pel
                                .values()
                                .any(|p| now.saturating_duration_since(p.at) >= *idle)
                        })
                    })
                    .cloned()
                    .collect(),
            ),
            Command::Keepalive {
                settle,
                renew,
                take,
                refresh,
                ttl,
            } => {
                let ttl = *ttl;
                for unit in settle {
                    if self.lease_key(unit, now) == Some(holder) {
                        self.leases.remove(unit);
                    }
                }
                // Counted as live without a break since its last heartbeat:
                // with live leases, none of its leases could be taken.
                let fresh = self
                    .live
                    .get(holder)
                    .is_some_and(|at| now.saturating_duration_since(*at) < ttl);
                self.live.insert(holder.to_owned(), now);
                let expiry = (!self.live_leases).then_some(now + ttl);
                let before = self.live.len();
                self.live
                    .retain(|_, at| now.saturating_duration_since(*at) < ttl);
                self.departures += (before - self.live.len()) as u64;
                let mut kept = Kept {
                    instances: self.live.len(),
                    departures: self.departures,
                    ..Kept::default()
                };
                for unit in renew {
                    // The carrier does not ask: the heartbeat renewed them.
                    if self.live_leases && fresh {
                        kept.renewed.push((unit.clone(), true));
                        continue;
                    }
                    let ours = self.lease_key(unit, now) == Some(holder);
                    if ours && !self.live_leases {
                        self.leases
                            .insert(unit.clone(), (holder.to_owned(), expiry));
                    }
                    kept.renewed.push((unit.clone(), ours));
                }
                for (procedure, ks, want) in take {
                    let mut want = *want;
                    for k in ks {
                        let unit = Unit::partition(procedure, *k);
                        if want > 0 && self.lease_free(&unit, holder, now, ttl) {
                            self.leases
                                .insert(unit.clone(), (holder.to_owned(), expiry));
                            let empty = self.streams.get(&unit).is_none_or(|s| s.pel.is_empty());
                            kept.taken.push((unit, empty));
                            want -= 1;
                        }
                    }
                }
                for (unit, ids) in refresh {
                    let s = self.stream(unit);
                    for id in ids {
                        match s.pel.get_mut(id) {
                            Some(p) if p.consumer == consumer => p.at = now,
                            _ => kept.lost.push(Key {
                                unit: unit.clone(),
                                id: *id,
                            }),
                        }
                    }
                }
                Reply::Kept(kept)
            }
            Command::Ack { keys } => {
                for key in keys {
                    let s = self.stream(&key.unit);
                    s.pel.remove(&key.id);
                    s.entries.remove(&key.id);
                }
                Reply::Done
            }
            Command::DeadLetter { key, .. } => {
                let s = self.stream(&key.unit);
                if s.pel.get(&key.id).is_some_and(|p| p.consumer == consumer) {
                    s.pel.remove(&key.id);
                    if let Some(ev) = s.entries.remove(&key.id) {
                        *self.dead.entry(ev.seq).or_default() += 1;
                    }
                }
                Reply::Done
            }
            Command::DeadLetterUnadmitted { .. } => Reply::Done,
            Command::Release { keys, idle } => {
                for key in keys {
                    let s = self.stream(&key.unit);
                    if let Some(p) = s.pel.get_mut(&key.id)
                        && p.consumer == consumer
                    {
                        p.at = now.checked_sub(*idle).unwrap_or(p.at);
                    }
                }
                Reply::Done
            }
            Command::GiveUp { units } | Command::Leave { units } => {
                for unit in units {
                    if self.lease_key(unit, now) == Some(holder) {
                        self.leases.remove(unit);
                    }
                }
                if matches!(command, Command::Leave { .. }) && self.live.remove(holder).is_some() {
                    self.departures += 1;
                }
                Reply::Done
            }
        }
    }
}

/// A call at the backend.
#[derive(Debug, Clone)]
struct Call {
    seq: u64,
    key: u32,
    /// The stream its entry is in, and who called.
    unit: Unit,
    caller: (usize, u32),
    start: Instant,
    end: Instant,
}

/// One instance: a core and its delivery stage.
struct Inst {
    name: String,
    core: QueueCore<Ev>,
    incarnation: u32,
    alive: bool,
    paused: bool,
    /// Messages that arrived while paused.
    inbox: Vec<Msg>,
    /// Handed out, not dispatched yet, in order.
    waiting: Vec<Handed<Ev>>,
    /// Dispatched: key -> its event.
    in_flight: BTreeMap<Key, Ev>,
    /// Commands cut off from Redis until then.
    cut_until: Option<Instant>,
    /// Lose the replies of the next this many commands.
    lose_replies: u32,
    /// Its last admission reaches Redis then: the next not before.
    admitted_until: Instant,
}

#[derive(Debug)]
enum Msg {
    Reply(CommandId, Reply<Ev>),
    Granted(GrantId, Result<Vec<Got<Ev>>, Failure>),
    CallDone(Key, Ev),
}

#[derive(Debug)]
enum What {
    /// A command reaches Redis.
    Execute {
        inst: usize,
        incarnation: u32,
        id: CommandId,
        consumer: String,
        command: Command,
        lose_reply: bool,
    },
    /// An instance's admission of an event reaches Redis.
    ExecuteAdmit {
        inst: usize,
        incarnation: u32,
        consumer: String,
        unit: Unit,
        ev: Ev,
        grant: Option<Grant>,
        /// Acknowledgements it carries.
        ride: Option<(CommandId, Command)>,
        lose_reply: bool,
    },
    /// Something reaches an instance.
    Deliver {
        inst: usize,
        incarnation: u32,
        msg: Msg,
    },
    /// An event is published: every instance offers it.
    Admit(Unit, Ev),
    Fault(Fault),
}

#[derive(Debug, Clone)]
enum Fault {
    Pause(usize, u64),
    Resume(usize),
    Crash(usize),
    Restart(usize, bool),
    Cut(usize, u64),
    LoseReplies(usize, u32),
}

struct World {
    t0: Instant,
    now: Instant,
    rng: u64,
    redis: Redis,
    insts: Vec<Inst>,
    events: BinaryHeap<Reverse<(Instant, u64)>>,
    payloads: BTreeMap<u64, What>,
    next_event: u64,
    calls: Vec<Call>,
    admitted: Vec<Ev>,
    settings: Settings,
    max_in_flight: usize,
    restarts: u32,
    notes: Vec<Note>,
    /// Instances that died (killed, or by a poison event) or froze or were
    /// cut off long enough to lose what they held.
    disruptions: u32,
    /// When each incarnation of an instance was killed.
    died: BTreeMap<(usize, u32), Instant>,
}

impl World {
    fn new(seed: u64, instances: usize, window: usize, live_leases: bool) -> World {
        let t0 = Instant::now();
        let settings = Settings {
            window,
            read_max: 4,
            claim_idle: ms(CLAIM_IDLE_MS),
            partitions: Some(PARTITIONS),
            max_deliveries: MAX_DELIVERIES,
        };
        let insts = (0..instances)
            .map(|i| Inst {
                name: format!("i{i}"),
                core: QueueCore::new(settings.clone(), t0),
                incarnation: 0,
                alive: true,
                paused: false,
                inbox: Vec::new(),
                waiting: Vec::new(),
                in_flight: BTreeMap::new(),
                cut_until: None,
                lose_replies: 0,
                admitted_until: t0,
            })
            .collect();
        World {
            t0,
            now: t0,
            rng: seed | 1,
            redis: Redis {
                live_leases,
                ..Redis::default()
            },
            insts,
            events: BinaryHeap::new(),
            payloads: BTreeMap::new(),
            next_event: 0,
            calls: Vec::new(),
            admitted: Vec::new(),
            settings,
            max_in_flight: 3,
            restarts: 0,
            notes: Vec::new(),
            disruptions: 0,
            died: BTreeMap::new(),
        }
    }

    fn rand(&mut self, n: u64) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x % n.max(1)
    }

    fn at(&mut self, at: Instant, what: What) {
        self.next_event += 1;
        self.events.push(Reverse((at, self.next_event)));
        self.payloads.insert(self.next_event, what);
    }

    fn net(&mut self) -> Duration {
        ms(self.rand(NET_MAX_MS + 1))
    }

    /// Runs until `until`, checking the window after every step.
    fn run(&mut self, until: Instant) -> Result<(), TestCaseError> {
        let mut spins = 0;
        let mut last = self.now;
        loop {
            if self.now == last {
                spins += 1;
                prop_assert!(
                    spins < 10_000,
                    "no progress at {:?}: wakes {:?}",
                    self.now - self.t0,
                    self.insts
                        .iter()
                        .map(|i| (
                            i.alive,
                            i.paused,
                            i.core
                                .next_wake()
                                .map(|w| w.saturating_duration_since(self.t0))
                        ))
                        .collect::<Vec<_>>()
                );
            } else {
                spins = 0;
                last = self.now;
            }
            let wake = self
                .insts
                .iter()
                .filter(|i| i.alive && !i.paused)
                .filter_map(|i| i.core.next_wake())
                .min();
            let event = self.events.peek().map(|Reverse((t, _))| *t);
            let next = [wake, event].into_iter().flatten().min();
            let Some(next) = next.filter(|t| *t <= until) else {
                self.now = until;
                return Ok(());
            };
            self.now = self.now.max(next);
            while let Some(Reverse((t, n))) = self.events.peek().copied() {
                if t > self.now {
                    break;
                }
                self.events.pop();
                let what = self.payloads.remove(&n).expect("scheduled");
                self.handle(what);
            }
            for i in 0..self.insts.len() {
                self.step(i)?;
            }
        }
    }

    /// Instance `i` offers `ev` to Redis, executed at `at` at the
    /// earliest: an instance offers events in the order it received them,
    /// one batch after the other.
    #[allow(clippy::too_many_arguments)]
    fn offer(
        &mut self,
        i: usize,
        at: Instant,
        unit: &Unit,
        ev: &Ev,
        grant: Option<Grant>,
        ride: Option<(CommandId, Command)>,
        lose_reply: bool,
    ) {
        let at = at.max(self.insts[i].admitted_until);
        self.insts[i].admitted_until = at;
        let inst = &self.insts[i];
        let what = What::ExecuteAdmit {
            inst: i,
            incarnation: inst.incarnation,
            consumer: inst.name.clone(),
            unit: unit.clone(),
            ev: ev.clone(),
            grant,
            ride,
            lose_reply,
        };
        self.at(at, what);
    }

    /// What instance `i` sent never reached Redis: `msg` (a failure) comes
    /// back when its command times out.
    fn time_out(&mut self, i: usize, msg: Msg) {
        let at = self.now + ms(50);
        let incarnation = self.insts[i].incarnation;
        self.reply_later_at(at, i, incarnation, msg);
    }

    /// `msg` reaches `inst`'s `incarnation` after a network delay.
    fn reply_later(&mut self, inst: usize, incarnation: u32, msg: Msg) {
        let at = self.now + self.net();
        self.reply_later_at(at, inst, incarnation, msg);
    }

    fn reply_later_at(&mut self, at: Instant, inst: usize, incarnation: u32, msg: Msg) {
        self.at(
            at,
            What::Deliver {
                inst,
                incarnation,
                msg,
            },
        );
    }

    fn handle(&mut self, what: What) {
        let now = self.now;
        match what {
            What::Execute {
                inst,
                incarnation,
                id,
                consumer,
                command,
                lose_reply,
            } => {
                let holder = format!("{consumer}#{incarnation}");
                let reply = self.redis.execute(&consumer, &holder, &command, now);
                let reply = if lose_reply {
                    Reply::Failed(lost())
                } else {
                    reply
                };
                self.reply_later(inst, incarnation, Msg::Reply(id, reply));
            }
            What::ExecuteAdmit {
                inst,
                incarnation,
                consumer,
                unit,
                ev,
                grant,
                ride,
                lose_reply,
            } => {
                let holder = format!("{consumer}#{incarnation}");
                if let Some((id, acks)) = ride {
                    // Acknowledged first, in the same step.
                    self.redis.execute(&consumer, &holder, &acks, now);
                    let reply = if lose_reply {
                        Reply::Failed(lost())
                    } else {
                        Reply::Done
                    };
                    self.reply_later(inst, incarnation, Msg::Reply(id, reply));
                }
                let count = grant.map_or(0, |g| g.count);
                let taken = self.redis.admit(&unit, ev, &consumer, &holder, count, now);
                let Some(grant) = grant else {
                    return;
                };
                let taken = if lose_reply { Err(lost()) } else { taken };
                self.reply_later(inst, incarnation, Msg::Granted(grant.id, taken));
            }
            What::Deliver {
                inst,
                incarnation,
                msg,
            } => {
                let i = &mut self.insts[inst];
                if i.alive && i.incarnation == incarnation {
                    i.inbox.push(msg);
                }
            }
            What::Admit(unit, ev) => {
                self.admitted.push(ev.clone());
                // Every instance that runs receives the event and offers it
                // (one that is frozen does not see it; if none runs, it is
                // appended directly, as if just before).
                let mut offered = false;
                for i in 0..self.insts.len() {
                    if !self.insts[i].alive || self.insts[i].paused {
                        continue;
                    }
                    offered = true;
                    self.insts[i].core.add_procedure(&unit.procedure, now);
                    let grant = self.insts[i].core.grant(&unit, now);
                    let ride = self.insts[i].core.ride_acks(&unit.procedure);
                    let cut = self.insts[i].cut_until.is_some_and(|t| now < t);
                    if let (true, Some(until)) = (cut, self.insts[i].cut_until) {
                        // The admission is retried until Redis answers
                        // again.
                        self.offer(i, until, &unit, &ev, None, None, false);
                        if let Some((id, _)) = ride {
                            self.time_out(i, Msg::Reply(id, Reply::Failed(cut_off())));
                        }
                        if let Some(g) = grant {
                            self.time_out(i, Msg::Granted(g.id, Err(cut_off())));
                        }
                        continue;
                    }
                    let lose_reply =
                        (grant.is_some() || ride.is_some()) && self.insts[i].lose_replies > 0;
                    if lose_reply {
                        self.insts[i].lose_replies -= 1;
                    }
                    // An instance offers events in the order it received
                    // them, one batch after the other.
                    let at = now + self.net();
                    self.offer(i, at, &unit, &ev, grant, ride, lose_reply);
                }
                if !offered {
                    self.redis.stream(&unit).group = true;
                    self.redis.add(&unit, ev);
                }
            }
            What::Fault(fault) => self.fault(fault),
        }
    }

    fn fault(&mut self, fault: Fault) {
        let now = self.now;
        match fault {
            Fault::Pause(i, n) => {
                if self.insts[i].alive && !self.insts[i].paused {
                    if n >= CLAIM_IDLE_MS / 2 {
                        self.disruptions += 1;
                    }
                    self.insts[i].paused = true;
                    self.at(now + ms(n), What::Fault(Fault::Resume(i)));
                }
            }
            Fault::Resume(i) => self.insts[i].paused = false,
            Fault::Crash(i) => self.crash(i),
            Fault::Restart(i, same_name) => {
                self.crash(i);
                self.restarts += 1;
                let inst = &mut self.insts[i];
                inst.alive = true;
                inst.paused = false;
                if !same_name {
                    inst.name = format!("i{i}r{}", self.restarts);
                }
                inst.core = QueueCore::new(self.settings.clone(), now);
            }
            Fault::Cut(i, n) => {
                if n >= CLAIM_IDLE_MS / 2 {
                    self.disruptions += 1;
                }
                self.insts[i].cut_until = Some(now + ms(n));
            }
            Fault::LoseReplies(i, n) => self.insts[i].lose_replies += n,
        }
    }

    fn crash(&mut self, i: usize) {
        let inst = &mut self.insts[i];
        if inst.alive {
            self.disruptions += 1;
            self.died.insert((i, inst.incarnation), self.now);
        }
        inst.alive = false;
        inst.incarnation += 1;
        inst.inbox.clear();
        inst.waiting.clear();
        // Its calls go on at the backend; their answers go nowhere.
        inst.in_flight.clear();
    }

    /// Lets instance `i` take what arrived, tick, and act on what its core
    /// says, until it has nothing more to do.
    fn step(&mut self, i: usize) -> Result<(), TestCaseError> {
        if !self.insts[i].alive || self.insts[i].paused {
            return Ok(());
        }
        let now = self.now;
        let inbox = std::mem::take(&mut self.insts[i].inbox);
        for msg in inbox {
            match msg {
                Msg::Reply(id, reply) => self.insts[i].core.on_reply(id, reply, now),
                Msg::Granted(id, taken) => {
                    if std::env::var("TRACE").is_ok() {
                        eprintln!(
                            "{:?} inst {i} granted {id:?}: {:?}",
                            now - self.t0,
                            taken.as_ref().map(|g| g
                                .iter()
                                .map(|g| (g.id, g.body.as_ref().map(|b| b.seq)))
                                .collect::<Vec<_>>())
                        );
                    }
                    self.insts[i].core.on_granted(id, taken, now)
                }
                Msg::CallDone(key, ev) => {
                    let inst = &mut self.insts[i];
                    if inst.in_flight.remove(&key).is_some() {
                        if ev.rejected {
                            inst.core
                                .dead_letter(&key, vec![("reason", b"rejected".to_vec())]);
                        } else {
                            inst.core.on_delivered(&key);
                        }
                    }
                }
            }
            // The delivery stage goes on as soon as an answer frees a key,
            // before the core's clock is looked at (as the event loop does
            // when a RESULT comes in right after a pause).
            self.dispatch(i)?;
            if !self.insts[i].alive {
                return Ok(());
            }
        }
        loop {
            self.insts[i].core.on_tick(now);
            let mut any = false;
            while let Some(output) = self.insts[i].core.poll() {
                any = true;
                self.output(i, output);
                if !self.insts[i].alive {
                    return Ok(());
                }
            }
            any |= self.dispatch(i)?;
            if !self.insts[i].alive {
                return Ok(());
            }
            let core = &self.insts[i].core;
            prop_assert!(
                core.committed() <= core.window(),
                "{} holds {} (with reads in flight) over its window of {}",
                self.insts[i].name,
                core.committed(),
                core.window()
            );
            prop_assert_eq!(
                core.held(),
                core.held_by_stream(),
                "{}'s count of held entries disagrees with its streams",
                &self.insts[i].name
            );
            prop_assert!(
                core.until_agrees(),
                "{}'s times its entries are ours until disagree with what it holds",
                &self.insts[i].name
            );
            if !any {
                return Ok(());
            }
        }
    }

    fn output(&mut self, i: usize, output: Output<Ev>) {
        let now = self.now;
        match output {
            Output::Send(id, command) => {
                if std::env::var("TRACE").is_ok()
                    && !matches!(
                        command,
                        Command::Keepalive { .. }
                            | Command::Scan { .. }
                            | Command::Procedures
                            | Command::Ack { .. }
                    )
                {
                    eprintln!("{:?} inst {i} sends {id:?} {command:?}", now - self.t0);
                }
                let lose_reply = self.insts[i].lose_replies > 0;
                let cut = self.insts[i].cut_until.is_some_and(|t| now < t);
                let incarnation = self.insts[i].incarnation;
                if cut {
                    // Never reaches Redis: the command times out.
                    self.time_out(i, Msg::Reply(id, Reply::Failed(cut_off())));
                    return;
                }
                if lose_reply {
                    self.insts[i].lose_replies -= 1;
                }
                let at = now + self.net();
                let consumer = self.insts[i].name.clone();
                self.at(
                    at,
                    What::Execute {
                        inst: i,
                        incarnation,
                        id,
                        consumer,
                        command,
                        lose_reply,
                    },
                );
            }
            Output::Deliver(handed) => {
                if std::env::var("TRACE").is_ok() {
                    eprintln!(
                        "{:?} inst {i} handed {:?}",
                        now - self.t0,
                        handed
                            .iter()
                            .map(|h| (h.key.unit.to_string(), h.key.id, h.body.seq))
                            .collect::<Vec<_>>()
                    );
                }
                self.insts[i].waiting.extend(handed);
            }
            Output::Poison(h) => {
                prop_assume_ok(h.deliveries > MAX_DELIVERIES);
                self.insts[i]
                    .core
                    .dead_letter(&h.key, vec![("reason", b"max_deliveries".to_vec())]);
            }
            Output::Withdraw(keys) => {
                let keys: BTreeSet<Key> = keys.into_iter().collect();
                let inst = &mut self.insts[i];
                let mut back = Vec::new();
                inst.waiting.retain(|h| {
                    let take = keys.contains(&h.key);
                    if take {
                        back.push(h.key.clone());
                    }
                    !take
                });
                inst.core.on_withdrawn(&back);
            }
            Output::Note(n) => self.notes.push(n),
            Output::RedisUp(_) => {}
        }
    }

    /// The delivery stage: starts calls in order, a key's one at a time (a
    /// key's later events never pass an earlier one), up to the in-flight
    /// limit; asks the core before each.
    fn dispatch(&mut self, i: usize) -> Result<bool, TestCaseError> {
        let now = self.now;
        let mut any = false;
        let mut blocked: BTreeSet<u32> = self.insts[i]
            .in_flight
            .values()
            .filter_map(|ev| ev.key)
            .collect();
        let mut at = 0;
        while at < self.insts[i].waiting.len() {
            if self.insts[i].in_flight.len() >= self.max_in_flight {
                break;
            }
            let ev = self.insts[i].waiting[at].body.clone();
            if let Some(k) = ev.key
                && !blocked.insert(k)
            {
                at += 1;
                continue;
            }
            let h = self.insts[i].waiting.remove(at);
            any = true;
            if !self.insts[i].core.may_dispatch(&h.key, now) {
                self.insts[i]
                    .core
                    .cancelled(std::slice::from_ref(&h.key), now);
                continue;
            }
            let dur = ms(1 + self.rand(CALL_MAX_MS));
            let caller = (i, self.insts[i].incarnation);
            self.calls.push(Call {
                seq: ev.seq,
                key: ev.key.unwrap_or(u32::MAX),
                unit: h.key.unit.clone(),
                caller,
                start: now,
                end: now + dur,
            });
            if ev.poison {
                // It kills the instance; its supervisor starts it again.
                self.crash(i);
                let same_name = self.rand(2) == 0;
                self.at(now + ms(500), What::Fault(Fault::Restart(i, same_name)));
                return Ok(true);
            }
            let incarnation = self.insts[i].incarnation;
            self.insts[i].in_flight.insert(h.key.clone(), ev.clone());
            self.at(
                now + dur,
                What::Deliver {
                    inst: i,
                    incarnation,
                    msg: Msg::CallDone(h.key, ev),
                },
            );
        }
        Ok(any)
    }

    fn check_calls(&self) -> Result<(), TestCaseError> {
        if std::env::var("TRACE").is_ok() {
            for c in &self.calls {
                eprintln!(
                    "call {:?} {} seq {} key {} {:?}",
                    c.caller,
                    c.unit,
                    c.seq,
                    c.key,
                    c.start - self.t0
                );
            }
            for n in &self.notes {
                eprintln!("{n:?}");
            }
        }
        // An entry is never in two instances' calls at once, but for a call
        // of an unordered event that a killed instance had made (a restart
        // with the same name takes its own entries up at once; nothing can
        // fence a call already on its way).
        let mut by_event: BTreeMap<u64, Vec<&Call>> = BTreeMap::new();
        for c in &self.calls {
            by_event.entry(c.seq).or_default().push(c);
        }
        for (seq, calls) in by_event {
            for (n, c) in calls.iter().enumerate() {
                for other in &calls[..n] {
                    let (first, second) = if other.start <= c.start {
                        (other, c)
                    } else {
                        (c, other)
                    };
                    let killed = self
                        .died
                        .get(&first.caller)
                        .is_some_and(|at| *at <= second.start);
                    prop_assert!(
                        first.caller == second.caller
                            || second.start >= first.end
                            || (killed && c.unit.partition.is_none()),
                        "event {seq} called by {:?} at {:?} and by {:?} at {:?}",
                        other.caller,
                        other.start - self.t0,
                        c.caller,
                        c.start - self.t0
                    );
                }
            }
        }
        // One instance at a time delivers a partition.
        let mut by_unit: BTreeMap<&Unit, Vec<&Call>> = BTreeMap::new();
        for c in self.calls.iter().filter(|c| c.unit.partition.is_some()) {
            by_unit.entry(&c.unit).or_default().push(c);
        }
        for (unit, mut calls) in by_unit {
            calls.sort_by_key(|c| c.start);
            for (n, c) in calls.iter().enumerate() {
                for earlier in &calls[..n] {
                    prop_assert!(
                        earlier.caller == c.caller || c.start >= earlier.end,
                        "{unit}: instance {:?} called event {} at {:?} while instance {:?}'s \
                         call of event {} ran until {:?}",
                        c.caller,
                        c.seq,
                        c.start - self.t0,
                        earlier.caller,
                        earlier.seq,
                        earlier.end - self.t0
                    );
                }
            }
        }
        let mut by_key: BTreeMap<u32, Vec<&Call>> = BTreeMap::new();
        for c in self.calls.iter().filter(|c| c.key != u32::MAX) {
            by_key.entry(c.key).or_default().push(c);
        }
        for (key, mut calls) in by_key {
            calls.sort_by_key(|c| (c.start, c.end));
            for w in calls.windows(2) {
                prop_assert!(
                    w[1].start >= w[0].end,
                    "key {key}: event {} called at {:?} while event {} ran until {:?}",
                    w[1].seq,
                    w[1].start - self.t0,
                    w[0].seq,
                    w[0].end - self.t0
                );
            }
            // In the order they were appended to the stream: the order of
            // admission, which is the order of publication unless an
            // event's only offer was held back (an instance cut off from
            // Redis while the other had not received the event).
            let mut seen = BTreeSet::new();
            let mut last: Option<(u64, u64)> = None;
            for c in calls {
                if seen.insert(c.seq) {
                    let place = self.redis.appended.get(&c.seq).copied().unwrap_or(u64::MAX);
                    prop_assert!(
                        last.is_none_or(|(p, _)| place > p),
                        "key {key}: event {} first called after event {}, appended later",
                        c.seq,
                        last.map_or(0, |(_, s)| s)
                    );
                    last = Some((place, c.seq));
                }
            }
        }
        Ok(())
    }

    fn check_resolved(&self) -> Result<(), TestCaseError> {
        for (unit, s) in &self.redis.streams {
            prop_assert!(
                s.entries.is_empty() && s.pel.is_empty(),
                "{unit}: {} entries left, {} pending: {:?}",
                s.entries.len(),
                s.pel.len(),
                s.pel
            );
        }
        let called: BTreeSet<u64> = self.calls.iter().map(|c| c.seq).collect();
        for (seq, n) in &self.redis.dead {
            prop_assert_eq!(*n, 1, "event {} dead-lettered once", seq);
        }
        for ev in &self.admitted {
            let dead = self.redis.dead.contains_key(&ev.seq);
            if ev.poison {
                prop_assert!(dead, "poison event {} dead-lettered", ev.seq);
            } else if ev.rejected {
                prop_assert!(dead, "rejected event {} dead-lettered", ev.seq);
            } else {
                // Every entry an instance held when it died or froze counts
                // one more delivery when it is taken over: an innocent entry
                // can reach the cap only if that happened as often.
                prop_assert!(
                    !dead || self.disruptions >= MAX_DELIVERIES,
                    "event {} dead-lettered after {} crashes or freezes",
                    ev.seq,
                    self.disruptions
                );
                prop_assert!(
                    dead || called.contains(&ev.seq),
                    "event {} delivered",
                    ev.seq
                );
            }
        }
        Ok(())
    }
}

/// `prop_assert!` for places that cannot return a result.
fn prop_assume_ok(condition: bool) {
    assert!(condition, "a poisoned entry was delivered too often");
}

#[derive(Debug, Clone)]
struct Plan {
    seed: u64,
    instances: usize,
    events: Vec<(u64, u8, bool, bool)>,
    faults: Vec<(u64, Fault)>,
    window: usize,
    /// Leases held while their holder counts as live (one Redis), else
    /// leases that expire unless renewed (a cluster).
    live_leases: bool,
}

fn fault(instances: usize) -> impl Strategy<Value = Fault> {
    let i = 0..instances;
    prop_oneof![
        (i.clone(), 500..8_000u64).prop_map(|(i, ms)| Fault::Pause(i, ms)),
        i.clone().prop_map(Fault::Crash),
        (i.clone(), any::<bool>()).prop_map(|(i, same)| Fault::Restart(i, same)),
        (i.clone(), 200..6_000u64).prop_map(|(i, ms)| Fault::Cut(i, ms)),
        (i, 1..4u32).prop_map(|(i, n)| Fault::LoseReplies(i, n)),
    ]
}

fn plan() -> impl Strategy<Value = Plan> {
    let event = (
        0..15_000u64,
        0..=KEYS as u8,
        prop::bool::weighted(0.03),
        prop::bool::weighted(0.03),
    );
    (2..4usize).prop_flat_map(move |instances| {
        (
            any::<u64>(),
            prop::collection::vec(event.clone(), 1..80),
            // Half the runs publish everything within this many ms: a
            // backlog builds up behind each key.
            prop_oneof![Just(15_000u64), 300..3_000u64],
            prop::collection::vec((0..15_000u64, fault(instances)), 0..6),
            3..24usize,
            any::<bool>(),
        )
            .prop_map(
                move |(seed, mut events, span, mut faults, window, live_leases)| {
                    // The faults strike while the events come in.
                    for e in &mut events {
                        e.0 = e.0 * span / 15_000;
                    }
                    for f in &mut faults {
                        f.0 = f.0 * span / 15_000;
                    }
                    Plan {
                        seed,
                        instances,
                        events,
                        faults,
                        window,
                        live_leases,
                    }
                },
            )
    })
}

/// The frozen instance: a burst of events on a few keys (a backlog
/// behind each), and one instance frozen for longer than the claim idle
/// time while it delivers.
fn frozen() -> impl Strategy<Value = Plan> {
    (
        any::<u64>(),
        2..4usize,
        1..4u8,
        20..80usize,
        300..2_000u64,
        0..2_000u64,
        2_500..7_000u64,
        3..24usize,
    )
        .prop_flat_map(|(seed, instances, keys, n, span, at, pause, window)| {
            (0..instances, any::<bool>()).prop_map(move |(who, live_leases)| Plan {
                seed,
                instances,
                events: (0..n as u64)
                    .map(|i| {
                        (
                            i * span / n as u64,
                            (i % u64::from(keys)) as u8,
                            false,
                            false,
                        )
                    })
                    .collect(),
                faults: vec![(at, Fault::Pause(who, pause))],
                window,
                live_leases,
            })
        })
}

fn run(plan: &Plan) -> Result<World, TestCaseError> {
    let mut w = World::new(plan.seed, plan.instances, plan.window, plan.live_leases);
    let t0 = w.t0;
    // Numbered in admission order (what "in order" means).
    let mut events = plan.events.clone();
    events.sort_by_key(|e| e.0);
    for (n, (at, key, poison, rejected)) in events.iter().enumerate() {
        let procedure: Arc<str> = Arc::from(PROCEDURES[n % PROCEDURES.len()]);
        let key = (u32::from(*key) < KEYS).then_some(u32::from(*key));
        let unit = match key {
            Some(k) => Unit::partition(&procedure, (k % u32::from(PARTITIONS)) as u16),
            None => Unit::plain(&procedure),
        };
        let ev = Ev {
            seq: n as u64 + 1,
            key: key.map(|k| k + 100 * (n % PROCEDURES.len()) as u32),
            poison: *poison,
            rejected: *rejected && !*poison,
        };
        w.at(t0 + ms(*at), What::Admit(unit, ev));
    }
    for (at, f) in &plan.faults {
        w.at(t0 + ms(*at), What::Fault(f.clone()));
    }
    // Instances that crashed come back when the faults are over.
    w.run(t0 + ms(25_000))?;
    for i in 0..w.insts.len() {
        if !w.insts[i].alive {
            w.fault(Fault::Restart(i, false));
        }
    }
    w.run(t0 + ms(120_000))?;
    w.check_calls()?;
    w.check_resolved()?;
    Ok(w)
}

proptest! {
    // 256 cases unless PROPTEST_CASES says otherwise.
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn keys_never_overlap_stay_in_order_and_every_event_is_resolved(plan in plan()) {
        run(&plan)?;
    }

    #[test]
    fn a_frozen_instance_never_calls_what_another_took_over(plan in frozen()) {
        run(&plan)?;
    }
}

/// Scans for entries left idle go out at start, at once when the departures
/// counter moves (and once more half a claim idle time later, for entries
/// refreshed just after the departed instance's last heartbeat), and
/// otherwise only every `SCAN_BACKSTOP` claim idle times: an idle instance
/// does not look at every stream twice per claim idle time, and nobody
/// waits that long for what a departed instance held.
#[test]
fn a_departure_brings_a_scan_at_once_and_scans_are_rare_otherwise() {
    let t0 = Instant::now();
    let claim_idle = ms(CLAIM_IDLE_MS);
    let mut core: QueueCore<Ev> = QueueCore::new(
        Settings {
            window: 8,
            read_max: 4,
            claim_idle,
            partitions: None,
            max_deliveries: MAX_DELIVERIES,
        },
        t0,
    );
    core.add_procedure(PROCEDURES[0], t0);
    let departed_at = ms(7_000);
    let mut scans = Vec::new();
    let mut now = t0;
    while now < t0 + claim_idle * (2 * SCAN_BACKSTOP) + ms(500) {
        core.on_tick(now);
        while let Some(output) = core.poll() {
            let Output::Send(id, command) = output else {
                continue;
            };
            let reply = match command {
                Command::Procedures => Reply::Procedures(vec![PROCEDURES[0].to_owned()]),
                Command::Scan { .. } => {
                    scans.push(now - t0);
                    Reply::Stale(vec![])
                }
                Command::Keepalive { .. } => Reply::Kept(Kept {
                    instances: 2,
                    departures: u64::from(now - t0 >= departed_at),
                    ..Kept::default()
                }),
                Command::Read { .. } => Reply::Read(vec![]),
                _ => Reply::Done,
            };
            core.on_reply(id, reply, now);
        }
        now += ms(50);
    }
    let keepalive = claim_idle / 3;
    assert!(
        scans[0] <= ms(200),
        "at start, as soon as the stream's group is ready: {scans:?}"
    );
    assert!(
        scans[1] >= departed_at && scans[1] <= departed_at + keepalive + ms(100),
        "at the first keepalive that sees the departure: {scans:?}"
    );
    assert!(
        scans[2] >= scans[1] + claim_idle / 2 && scans[2] <= scans[1] + claim_idle / 2 + ms(100),
        "once more half a claim idle time later: {scans:?}"
    );
    assert_eq!(
        scans.len(),
        4,
        "then only one more, a backstop claim idle times later: {scans:?}"
    );
    assert!(
        scans[3] >= scans[2] + claim_idle * SCAN_BACKSTOP,
        "{scans:?}"
    );
}

/// One instance alone, serving `PROCEDURES[0]` with no ordering: the core,
/// the procedure and its plain stream.
fn lone_core(t0: Instant) -> (QueueCore<Ev>, &'static str, Unit) {
    let mut core: QueueCore<Ev> = QueueCore::new(
        Settings {
            window: 8,
            read_max: 4,
            claim_idle: ms(CLAIM_IDLE_MS),
            partitions: None,
            max_deliveries: MAX_DELIVERIES,
        },
        t0,
    );
    let procedure = PROCEDURES[0];
    core.add_procedure(procedure, t0);
    (core, procedure, Unit::plain(&Arc::from(procedure)))
}

/// What Redis answers `lone_core`'s commands other than reads: the one
/// procedure, nothing stale, one live instance, done.
fn quiet_reply(procedure: &str, command: Command) -> Reply<Ev> {
    match command {
        Command::Procedures => Reply::Procedures(vec![procedure.to_owned()]),
        Command::Scan { units, .. } => Reply::Stale(units),
        Command::Keepalive { .. } => Reply::Kept(Kept {
            instances: 1,
            departures: 0,
            ..Kept::default()
        }),
        _ => Reply::Done,
    }
}

/// A procedure without a callee: its streams are neither granted to
/// admissions nor read nor taken from (its events wait in Redis), until it
/// has one again; then they are read at once.
#[test]
fn a_procedure_without_a_callee_is_not_read_until_it_has_one() {
    let t0 = Instant::now();
    let (mut core, procedure, unit) = lone_core(t0);
    let mut reads = Vec::new();
    let run = |core: &mut QueueCore<Ev>, from: u64, to: u64, reads: &mut Vec<u64>| {
        for step in from..to {
            let now = t0 + ms(50 * step);
            core.on_tick(now);
            while let Some(output) = core.poll() {
                let Output::Send(id, command) = output else {
                    continue;
                };
                let reply = match command {
                    Command::Read { .. } => {
                        reads.push(step);
                        Reply::Read(vec![])
                    }
                    Command::Take { .. } => {
                        reads.push(step);
                        Reply::Taken {
                            next: EntryId::ZERO,
                            got: vec![],
                        }
                    }
                    other => quiet_reply(procedure, other),
                };
                core.on_reply(id, reply, now);
            }
        }
    };
    // Its own pending entries taken, then read like any stream.
    run(&mut core, 0, 10, &mut reads);
    assert!(!reads.is_empty());
    reads.clear();
    core.pause(procedure);
    // Longer than a sweep: a sweep does not read it either.
    let away = 10 + 3 * CLAIM_IDLE_MS / 50;
    run(&mut core, 10, away, &mut reads);
    assert!(
        reads.is_empty(),
        "nothing of it read while it has no callee: {reads:?}"
    );
    assert_eq!(core.grant(&unit, t0 + ms(50 * away)), None);
    core.resume(procedure);
    run(&mut core, away, away + 2, &mut reads);
    assert_eq!(reads.first(), Some(&away), "read at once when it has one");
}

/// A plain stream's entries held through a freeze longer than their claim,
/// with nothing in the delivery stage to notice first, are taken back by
/// the clock alone: withdrawn at the first tick after the freeze, never
/// dispatchable again, and read back as the instance's own pending
/// entries. (The model test's delivery stage looks at the clock before the
/// core does after a pause, so it never reaches this branch of the fence.)
#[test]
fn a_plain_streams_entries_held_through_a_freeze_are_taken_back_by_the_clock() {
    let t0 = Instant::now();
    let (mut core, procedure, unit) = lone_core(t0);
    let ev = |seq| Ev {
        seq,
        key: None,
        poison: false,
        rejected: false,
    };
    let ids: Vec<EntryId> = (1..=3)
        .map(|n| EntryId::parse(&format!("{n}-0")).expect("an id"))
        .collect();
    #[derive(Default)]
    struct Seen {
        handed: Vec<Key>,
        withdrawn: Vec<Key>,
        own_reads: usize,
        served: bool,
    }
    let tick = |core: &mut QueueCore<Ev>, seen: &mut Seen, now: Instant| {
        core.on_tick(now);
        while let Some(output) = core.poll() {
            let command = match output {
                Output::Send(id, command) => (id, command),
                Output::Deliver(h) => {
                    seen.handed.extend(h.into_iter().map(|h| h.key));
                    continue;
                }
                Output::Withdraw(keys) => {
                    seen.withdrawn.extend(keys);
                    continue;
                }
                _ => continue,
            };
            let (id, command) = command;
            let reply = match command {
                Command::Read { units, .. } if !seen.served => {
                    seen.served = true;
                    let got = ids
                        .iter()
                        .enumerate()
                        .map(|(n, id)| Got {
                            id: *id,
                            deliveries: 1,
                            body: Some(ev(n as u64 + 1)),
                        })
                        .collect();
                    Reply::Read(vec![(units[0].clone(), got)])
                }
                Command::Read { .. } => Reply::Read(vec![]),
                Command::Take { .. } => {
                    seen.own_reads += 1;
                    Reply::Taken {
                        next: EntryId::ZERO,
                        got: vec![],
                    }
                }
                other => quiet_reply(procedure, other),
            };
            core.on_reply(id, reply, now);
        }
    };
    let mut seen = Seen::default();
    let mut now = t0;
    while !seen.served && now < t0 + ms(2_000) {
        now += ms(50);
        tick(&mut core, &mut seen, now);
    }
    assert_eq!(
        seen.handed.len(),
        3,
        "the read entries go to the delivery stage"
    );
    let key = |id: &EntryId| Key {
        unit: unit.clone(),
        id: *id,
    };
    assert!(core.may_dispatch(&key(&ids[0]), now));
    let takes_before = seen.own_reads;
    // Frozen for three claim idle times: nothing ran, nothing was refreshed.
    now += ms(3 * CLAIM_IDLE_MS);
    tick(&mut core, &mut seen, now);
    let mut got: Vec<EntryId> = seen.withdrawn.iter().map(|k| k.id).collect();
    got.sort_unstable();
    assert_eq!(got, ids, "every entry held is taken back");
    assert!(ids.iter().all(|id| !core.may_dispatch(&key(id), now)));
    assert!(core.until_agrees());
    // What the delivery stage gave back is read again as our own pending
    // entries (whatever another instance did not take meanwhile).
    core.on_withdrawn(&seen.withdrawn);
    for _ in 0..4 {
        now += ms(50);
        tick(&mut core, &mut seen, now);
    }
    assert!(
        seen.own_reads > takes_before,
        "its own pending entries read again"
    );
}
