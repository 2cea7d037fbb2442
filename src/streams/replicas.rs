//! Replica acknowledgement (`SUBTOCALL_REDIS_WAIT_REPLICAS`): Redis
//! replicates asynchronously, so a master that fails right after
//! acknowledging an admission may take the event with it. After each
//! admission batch the admission connection asks `WAIT N timeout`; until
//! the replicas confirm the batch, this instance keeps its own copy of the
//! batch's events. When the connection fails or lands on another master (a
//! Sentinel failover), the copies are offered again before anything new:
//! the claim and the entry were written in one step, so on the new master
//! either both survived (the offer is refused) or neither did (the event is
//! admitted again). Delivery never waits for the answer.
//!
//! [`Copies`] is the bookkeeping, without IO; the admission sink
//! (`admit.rs`) does the writes and the WAITs, and a watch task asks again
//! once a second while copies are held or replicas are missing.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::WaitConfig;
use crate::metrics::Metrics;

/// How often WAIT is asked while the last answer fell short, and how often
/// the watch task looks.
pub const ASK_EVERY: Duration = Duration::from_secs(1);

/// A WAIT unanswered this long (past any WAIT timeout and command deadline)
/// no longer holds the next one back.
const OVERDUE: Duration = Duration::from_secs(20);

/// One admission call's events, as they were offered: enough to offer them
/// again.
#[derive(Debug, Clone)]
pub struct Copy {
    pub stream: String,
    /// The partition's lease key (the script's second key), or the stream.
    pub lease: String,
    /// One claim key and one stored entry per event.
    pub claims: Vec<Bytes>,
    pub entries: Vec<Bytes>,
}

/// A batch of copies, numbered in the order they were written.
#[derive(Debug)]
struct Held {
    seq: u64,
    at: Instant,
    copies: Vec<Copy>,
}

/// What one WAIT is to confirm: the batches written up to `seq` on the
/// connection `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub seq: u64,
    pub epoch: Option<u64>,
}

/// The unconfirmed copies and what is known of the replicas.
#[derive(Debug)]
pub struct Copies {
    wanted: u32,
    bound: usize,
    /// Copies older than this are let go (their claims may have expired:
    /// offered again they could be admitted twice).
    window: Duration,
    held: VecDeque<Held>,
    /// The claim key of every event still owed (not confirmed, not
    /// delivered here), with its batch: an event delivered by this instance
    /// leaves it and is not offered again.
    owed: HashMap<Bytes, u64>,
    next: u64,
    /// The connection the held copies were written on (a Sentinel-located
    /// master's tag; `None` for one that cannot tell).
    written_on: Option<u64>,
    /// A write or a WAIT failed since the copies were written: they are
    /// offered again before the next admission.
    suspect: bool,
    /// The last WAIT found fewer replicas than wanted.
    short: bool,
    last_asked: Option<Instant>,
    /// WAITs asked and not answered yet; while one is, a batch kept asks
    /// for one more when it answers (on this connection), not at once.
    outstanding: u32,
    wait_owed: Option<Option<u64>>,
    /// Counted since the last [`Copies::publish`].
    let_go: u64,
    offered_again: u64,
    replicas: Option<i64>,
}

impl Copies {
    pub fn new(wait: &WaitConfig, window: Duration) -> Copies {
        Copies {
            wanted: wait.replicas,
            bound: wait.copies,
            window,
            held: VecDeque::new(),
            owed: HashMap::new(),
            next: 0,
            written_on: None,
            suspect: false,
            short: false,
            last_asked: None,
            outstanding: 0,
            wait_owed: None,
            let_go: 0,
            offered_again: 0,
            replicas: None,
        }
    }

    /// Events held.
    pub fn events(&self) -> usize {
        self.owed.len()
    }

    /// The copies to offer again before writing on connection `epoch`:
    /// every event still owed when a write failed since or the connection
    /// is not the one they were written on. Copies past the window are let
    /// go first.
    pub fn to_offer_again(&mut self, epoch: Option<u64>, now: Instant) -> Vec<Copy> {
        self.expire(now);
        if self.owed.is_empty() {
            self.suspect = false;
            self.written_on = epoch;
            return Vec::new();
        }
        if !self.suspect && self.written_on == epoch {
            return Vec::new();
        }
        let mut again = Vec::new();
        for h in &self.held {
            for copy in &h.copies {
                let mut owed = Copy {
                    stream: copy.stream.clone(),
                    lease: copy.lease.clone(),
                    claims: Vec::new(),
                    entries: Vec::new(),
                };
                for (claim, entry) in copy.claims.iter().zip(&copy.entries) {
                    if self.owed.contains_key(claim) {
                        owed.claims.push(claim.clone());
                        owed.entries.push(entry.clone());
                    }
                }
                if !owed.claims.is_empty() {
                    again.push(owed);
                }
            }
        }
        self.offered_again += self.owed.len() as u64;
        again
    }

    /// The copies offered again made it to connection `epoch`.
    pub fn offered(&mut self, epoch: Option<u64>) {
        if self.suspect || self.written_on != epoch {
            // Written again now: a WAIT asked before covers none of them.
            self.next += 1;
            for h in &mut self.held {
                h.seq = self.next;
            }
            for seq in self.owed.values_mut() {
                *seq = self.next;
            }
        }
        self.suspect = false;
        self.written_on = epoch;
    }

    /// A write failed: the connection may have lost what it acknowledged.
    pub fn failed(&mut self) {
        self.suspect = true;
    }

    /// This instance delivered the event of `claim`: nothing to offer again.
    pub fn delivered(&mut self, claim: &[u8]) {
        self.owed.remove(claim);
    }

    /// Keeps a batch just written on connection `epoch` (only the events
    /// it admitted: those another instance admitted are that one's to
    /// keep), and says whether to ask WAIT now (always while the replicas
    /// keep up; once a second while they do not).
    pub fn keep(&mut self, copies: Vec<Copy>, epoch: Option<u64>, now: Instant) -> Option<Ask> {
        let copies: Vec<Copy> = copies
            .into_iter()
            .filter(|c| !c.claims.is_empty())
            .collect();
        if !copies.is_empty() {
            self.next += 1;
            for copy in &copies {
                for claim in &copy.claims {
                    self.owed.insert(claim.clone(), self.next);
                }
            }
            self.held.push_back(Held {
                seq: self.next,
                at: now,
                copies,
            });
            if self.written_on != epoch {
                // Written on another connection than the copies before:
                // those are offered again (`to_offer_again` saw to it
                // unless this connection is new since).
                self.suspect = true;
            }
        }
        while self.owed.len() > self.bound {
            let Some(oldest) = self.held.pop_front() else {
                break;
            };
            self.let_go += self.forget(&oldest);
        }
        self.ask(epoch, now)
    }

    /// Drops what `h` still owes; returns how many events that was.
    fn forget(&mut self, h: &Held) -> u64 {
        let mut n = 0;
        for claim in h.copies.iter().flat_map(|c| &c.claims) {
            if self.owed.get(claim) == Some(&h.seq) {
                self.owed.remove(claim);
                n += 1;
            }
        }
        n
    }

    /// Whether to ask WAIT now for what connection `epoch` wrote: at once
    /// while the replicas keep up and no WAIT is outstanding (one that is
    /// makes the next wait for its answer: one WAIT covers every batch
    /// written meanwhile), once a second while they do not.
    pub fn ask(&mut self, epoch: Option<u64>, now: Instant) -> Option<Ask> {
        if self.wanted == 0 {
            return None;
        }
        let due = self
            .last_asked
            .is_none_or(|at| now.saturating_duration_since(at) >= ASK_EVERY);
        if self.short && !due {
            return None;
        }
        if self.outstanding > 0 {
            self.wait_owed = Some(epoch);
            return None;
        }
        Some(self.asked(epoch, now))
    }

    fn asked(&mut self, epoch: Option<u64>, now: Instant) -> Ask {
        self.last_asked = Some(now);
        self.outstanding += 1;
        Ask {
            seq: self.next,
            epoch,
        }
    }

    /// The watch task's tick: asks when nothing else asked for a second
    /// (even past an outstanding WAIT, if that one is long overdue).
    pub fn tick(&mut self, epoch: Option<u64>, now: Instant) -> Option<Ask> {
        let since = self
            .last_asked
            .map_or(Duration::MAX, |at| now.saturating_duration_since(at));
        if self.wanted == 0 || since < ASK_EVERY {
            return None;
        }
        if self.outstanding > 0 && since < OVERDUE {
            return None;
        }
        Some(self.asked(epoch, now))
    }

    /// WAIT's answer to `ask`: `replicas` acknowledged everything written
    /// on that connection before it. Enough of them confirm the batches up
    /// to `ask.seq`, if they were written on that connection. Returns the
    /// WAIT to ask next, if batches kept meanwhile are owed one.
    pub fn answered(&mut self, ask: Ask, replicas: Result<i64, ()>, now: Instant) -> Option<Ask> {
        self.outstanding = self.outstanding.saturating_sub(1);
        match replicas {
            Err(()) => self.suspect = true,
            Ok(replicas) => {
                self.replicas = Some(replicas);
                self.short = replicas < i64::from(self.wanted);
                if !self.short && ask.epoch == self.written_on && !self.suspect {
                    while self.held.front().is_some_and(|h| h.seq <= ask.seq) {
                        if let Some(h) = self.held.pop_front() {
                            self.forget(&h);
                        }
                    }
                }
            }
        }
        let epoch = self.wait_owed.take()?;
        self.ask(epoch, now)
    }

    fn expire(&mut self, now: Instant) {
        while self
            .held
            .front()
            .is_some_and(|h| now.saturating_duration_since(h.at) >= self.window)
        {
            if let Some(h) = self.held.pop_front() {
                self.let_go += self.forget(&h);
            }
        }
    }

    /// Brings the metrics up to date.
    pub fn publish(&mut self, metrics: &Metrics) {
        metrics.queue_unconfirmed.set(self.owed.len() as i64);
        metrics
            .queue_unprotected
            .inc_by(std::mem::take(&mut self.let_go));
        metrics
            .queue_reoffered
            .inc_by(std::mem::take(&mut self.offered_again));
        if let Some(r) = self.replicas {
            metrics.redis_replicas_acknowledging.set(r);
        }
    }
}

/// The copies, shared by the admission sink's clones and its watch task.
pub type Shared = Arc<Mutex<Copies>>;

/// `WAIT <replicas> <timeout in ms>`.
pub fn wait_cmd(wait: &WaitConfig) -> redis::Cmd {
    let mut cmd = redis::cmd("WAIT");
    cmd.arg(wait.replicas)
        .arg(wait.timeout.as_millis().max(1) as u64);
    cmd
}

/// WAIT after writes that keep no copies (dead letters, Redis mode
/// pushes): asked after each write while the replicas keep up, at most once
/// a second while they do not; writes it finds short are counted
/// (`subtocall_redis_writes_unconfirmed_total`).
pub struct Gate {
    wait: WaitConfig,
    /// Whether the last WAIT fell short, and when one was last asked.
    state: Mutex<(bool, Option<Instant>)>,
    metrics: Arc<Metrics>,
}

impl Gate {
    /// `None` when no replica is wanted.
    pub fn new(wait: &WaitConfig, metrics: Arc<Metrics>) -> Option<Arc<Gate>> {
        (wait.replicas > 0).then(|| {
            Arc::new(Gate {
                wait: *wait,
                state: Mutex::new((false, None)),
                metrics,
            })
        })
    }

    /// Sends WAIT on `conn` (the connection `writes` writes were just made
    /// on) unless the replicas were short less than a second ago, without
    /// holding up the caller.
    pub fn after(self: &Arc<Gate>, mut conn: super::Conn, writes: u64) {
        let now = Instant::now();
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let (short, last) = *state;
            if short && last.is_some_and(|at| now.saturating_duration_since(at) < ASK_EVERY) {
                self.metrics.redis_writes_unconfirmed.inc_by(writes);
                return;
            }
            state.1 = Some(now);
        }
        let gate = self.clone();
        tokio::spawn(async move {
            let answer = wait_cmd(&gate.wait).query_async::<i64>(&mut conn).await;
            let short = answer
                .as_ref()
                .is_ok_and(|n| *n < i64::from(gate.wait.replicas));
            if short || answer.is_err() {
                gate.metrics.redis_writes_unconfirmed.inc_by(writes);
            }
            let mut state = gate.state.lock().unwrap_or_else(|p| p.into_inner());
            state.0 = short;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` events of claim keys `c<k>` (and entries `e<k>`), `k` counting on
    /// from the last call's.
    fn copy(n: usize) -> Copy {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let first = NEXT.fetch_add(n, Ordering::Relaxed);
        Copy {
            stream: "s".into(),
            lease: "s".into(),
            claims: (first..first + n)
                .map(|i| Bytes::from(format!("c{i}")))
                .collect(),
            entries: (first..first + n)
                .map(|i| Bytes::from(format!("e{i}")))
                .collect(),
        }
    }

    fn wait(replicas: u32, copies: usize) -> WaitConfig {
        WaitConfig {
            replicas,
            timeout: Duration::from_millis(100),
            copies,
        }
    }

    #[test]
    fn a_wait_that_reaches_the_replicas_lets_go_of_what_it_covers() {
        let t0 = Instant::now();
        let mut c = Copies::new(&wait(1, 100), Duration::from_secs(60));
        assert!(c.to_offer_again(Some(1), t0).is_empty());
        let first = c.keep(vec![copy(3)], Some(1), t0).expect("asks");
        assert!(
            c.keep(vec![copy(2)], Some(1), t0).is_none(),
            "one WAIT at a time"
        );
        assert_eq!(c.events(), 5);
        let second = c
            .answered(first, Ok(1), t0)
            .expect("the batch kept meanwhile is owed a WAIT");
        assert_eq!(c.events(), 2, "only the batches the WAIT covers");
        assert!(c.answered(second, Ok(0), t0).is_none());
        assert_eq!(c.events(), 2, "too few replicas: kept");
        assert!(
            c.keep(vec![copy(1)], Some(1), t0).is_none(),
            "short: asked again only after a second"
        );
        let later = c.ask(Some(1), t0 + ASK_EVERY).expect("due");
        c.answered(later, Ok(2), t0 + ASK_EVERY);
        assert_eq!(c.events(), 0);
    }

    #[test]
    fn a_new_master_or_a_failed_write_gets_every_copy_again() {
        let t0 = Instant::now();
        let mut c = Copies::new(&wait(1, 100), Duration::from_secs(60));
        c.to_offer_again(Some(1), t0);
        let ask = c.keep(vec![copy(3), copy(1)], Some(1), t0).unwrap();
        assert!(c.to_offer_again(Some(1), t0).is_empty(), "same connection");
        assert_eq!(c.to_offer_again(Some(2), t0).len(), 2, "another master");
        // The old connection's WAIT fails with it: still owed.
        c.answered(ask, Err(()), t0);
        assert_eq!(c.events(), 4);
        let stale = c.ask(Some(1), t0).unwrap();
        c.offered(Some(2));
        c.answered(stale, Ok(1), t0);
        assert_eq!(
            c.events(),
            4,
            "a WAIT on another connection confirms nothing here"
        );
        assert!(c.to_offer_again(Some(2), t0).is_empty());
        c.failed();
        assert_eq!(c.to_offer_again(Some(2), t0).len(), 2, "after a failure");
        c.offered(Some(2));
        let ask = c.ask(Some(2), t0 + ASK_EVERY).unwrap();
        c.answered(ask, Ok(1), t0 + ASK_EVERY);
        assert_eq!(c.events(), 0);
        let m = Metrics::new();
        c.publish(&m);
        assert_eq!(m.queue_reoffered.get(), 8);
    }

    #[test]
    fn an_event_delivered_here_is_not_offered_again() {
        let t0 = Instant::now();
        let mut c = Copies::new(&wait(1, 100), Duration::from_secs(60));
        c.to_offer_again(Some(1), t0);
        let three = copy(3);
        let (claims, entries) = (three.claims.clone(), three.entries.clone());
        c.keep(vec![three], Some(1), t0);
        c.delivered(&claims[1]);
        assert_eq!(c.events(), 2);
        let again = c.to_offer_again(Some(2), t0);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].claims, vec![claims[0].clone(), claims[2].clone()]);
        assert_eq!(
            again[0].entries,
            vec![entries[0].clone(), entries[2].clone()]
        );
    }

    #[test]
    fn copies_past_the_bound_or_the_window_are_let_go_and_counted() {
        let t0 = Instant::now();
        let mut c = Copies::new(&wait(1, 4), Duration::from_secs(10));
        c.keep(vec![copy(2)], None, t0);
        c.keep(vec![copy(2)], None, t0 + Duration::from_secs(5));
        c.keep(vec![copy(1)], None, t0 + Duration::from_secs(5));
        assert_eq!(c.events(), 3, "the oldest batch went");
        c.to_offer_again(None, t0 + Duration::from_secs(15));
        assert_eq!(c.events(), 0, "older than the window");
        let m = Metrics::new();
        c.publish(&m);
        assert_eq!(m.queue_unprotected.get(), 5);
        assert_eq!(m.queue_unconfirmed.get(), 0);
    }

    #[test]
    fn nothing_is_asked_when_no_replica_is_wanted() {
        let t0 = Instant::now();
        let mut c = Copies::new(&wait(0, 4), Duration::from_secs(10));
        assert!(c.keep(vec![], None, t0).is_none());
        assert!(c.tick(None, t0).is_none());
    }

    /// A model of what the copies are for: a master, its replica, failovers
    /// that promote the replica (losing what it lacked), WAITs answered as
    /// Redis would (or failing with their connection), deliveries, and the
    /// admission's order of work (offer again what is owed, then write).
    /// Whatever the interleaving, once what is owed has been offered again,
    /// every admitted event is delivered or in the master.
    mod model {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeSet;

        #[derive(Debug, Clone)]
        enum Op {
            Admit(usize),
            Replicate,
            Answer,
            Deliver(usize),
            Failover,
            FailWrite,
            Tick,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (1usize..4).prop_map(Op::Admit),
                2 => Just(Op::Replicate),
                3 => Just(Op::Answer),
                2 => (0usize..64).prop_map(Op::Deliver),
                1 => Just(Op::Failover),
                1 => Just(Op::FailWrite),
                1 => Just(Op::Tick),
            ]
        }

        struct World {
            copies: Copies,
            master: BTreeSet<Bytes>,
            replica: BTreeSet<Bytes>,
            epoch: u64,
            /// WAITs asked: what the master held then, on which epoch.
            asked: VecDeque<(Ask, BTreeSet<Bytes>, u64)>,
            admitted: Vec<Bytes>,
            delivered: BTreeSet<Bytes>,
            now: Instant,
        }

        impl World {
            fn offer_again(&mut self) {
                let again = self.copies.to_offer_again(Some(self.epoch), self.now);
                for copy in again {
                    // The claim and the entry together: admitted again if absent.
                    self.master.extend(copy.claims);
                }
                self.copies.offered(Some(self.epoch));
            }

            fn apply(&mut self, op: Op) {
                match op {
                    Op::Admit(n) => {
                        self.offer_again();
                        let first = self.admitted.len();
                        let claims: Vec<Bytes> = (first..first + n)
                            .map(|i| Bytes::from(format!("ev{i}")))
                            .collect();
                        self.admitted.extend(claims.iter().cloned());
                        self.master.extend(claims.iter().cloned());
                        let copy = Copy {
                            stream: "s".into(),
                            lease: "s".into(),
                            entries: claims.clone(),
                            claims,
                        };
                        if let Some(ask) = self.copies.keep(vec![copy], Some(self.epoch), self.now)
                        {
                            self.asked.push_back((ask, self.master.clone(), self.epoch));
                        }
                    }
                    Op::Replicate => self.replica = self.master.clone(),
                    Op::Answer => {
                        if let Some((ask, held, epoch)) = self.asked.pop_front() {
                            let mut answer = if epoch != self.epoch {
                                Err(()) // its connection went with the old master
                            } else {
                                Ok(i64::from(held.is_subset(&self.replica)))
                            };
                            let mut ask = ask;
                            // A WAIT owed goes on the same connection (as
                            // `AdmitSink::ask_wait` does), or fails at once
                            // if the batches were written on another one.
                            while let Some(next) = self.copies.answered(ask, answer, self.now) {
                                if next.epoch == Some(epoch) {
                                    self.asked.push_back((next, self.master.clone(), epoch));
                                    break;
                                }
                                ask = next;
                                answer = Err(());
                            }
                        }
                    }
                    Op::Deliver(i) => {
                        if let Some(claim) = self.admitted.get(i)
                            && self.master.contains(claim)
                        {
                            self.delivered.insert(claim.clone());
                            self.copies.delivered(claim);
                        }
                    }
                    Op::Failover => {
                        self.master = self.replica.clone();
                        self.epoch += 1;
                    }
                    Op::FailWrite => self.copies.failed(),
                    Op::Tick => {
                        self.now += ASK_EVERY;
                        if let Some(ask) = self.copies.tick(Some(self.epoch), self.now) {
                            self.asked.push_back((ask, self.master.clone(), self.epoch));
                        }
                    }
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

            #[test]
            fn nothing_admitted_is_lost_to_a_failover(ops in prop::collection::vec(op(), 0..80)) {
                let wait = WaitConfig { replicas: 1, timeout: Duration::from_millis(100), copies: 1_000_000 };
                let mut w = World {
                    copies: Copies::new(&wait, Duration::from_secs(1_000_000)),
                    master: BTreeSet::new(),
                    replica: BTreeSet::new(),
                    epoch: 0,
                    asked: VecDeque::new(),
                    admitted: Vec::new(),
                    delivered: BTreeSet::new(),
                    now: Instant::now(),
                };
                for op in ops {
                    w.apply(op);
                }
                w.offer_again();
                for claim in &w.admitted {
                    prop_assert!(
                        w.delivered.contains(claim) || w.master.contains(claim),
                        "{claim:?} lost"
                    );
                }
                prop_assert!(w.copies.events() <= w.admitted.len());
            }
        }
    }
}
