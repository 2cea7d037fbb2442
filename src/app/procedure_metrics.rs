//! Metrics per procedure (`subtocall_procedure_*`), labelled by procedure
//! and group: received, forwarded, dead-lettered by reason and the
//! receipt-to-acknowledgement latency as events go, and, refreshed every
//! second from the forwarding cores, what is in flight, what waits and how
//! long the oldest has waited. At most `SUBTOCALL_METRICS_MAX_PROCEDURES`
//! procedures get labels of their own; the events of the others are counted
//! under `procedure="other"` (and `subtocall_metrics_procedures_other` says
//! how many procedures that is), so the metrics' cardinality is bounded
//! whatever the registrations. `/status` reads each procedure's counts
//! from the same counters (a procedure beyond the cap has counters of its
//! own, unlabelled, which `other` sums): each count has one owner.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::discovery::Marker;
use crate::metrics::{Metrics, ProcedureLabel, ProcedureReason};

/// How often in flight, waiting and the oldest waiting age are refreshed.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// The label of events beyond the cap.
const OTHER: &str = "other";

/// One procedure's handles. Each count has one owner: a procedure with a
/// label of its own counts in the metrics' own counters, which `/status`
/// reads back; one beyond the cap counts in counters of its own (for
/// `/status`), and `other`'s, their sum, is added to beside them.
#[derive(Clone)]
struct Handles {
    label: ProcedureLabel,
    received: Counter,
    forwarded: Counter,
    /// `other`'s received and forwarded (beyond the cap only).
    other: Option<(Counter, Counter)>,
    latency: Histogram,
    /// Dead letters by reason and the last error (shared by the clones).
    tally: Arc<Tally>,
}

/// A procedure's dead letters by reason, and its last error.
#[derive(Debug, Default)]
pub struct Tally {
    dead_lettered: Mutex<BTreeMap<&'static str, Counter>>,
    last_error: Mutex<Option<(String, SystemTime)>>,
}

/// What a procedure (or a label) has in flight and waiting, and since when
/// the oldest waiting event waits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Live {
    pub in_flight: u64,
    pub waiting: u64,
    pub oldest: Option<Instant>,
}

impl Live {
    /// Counts one job, received at `received`.
    pub fn add_job(&mut self, received: Instant, in_flight: bool) {
        if in_flight {
            self.in_flight += 1;
        } else {
            self.add(Live {
                in_flight: 0,
                waiting: 1,
                oldest: Some(received),
            });
        }
    }

    /// Adds `other`'s jobs.
    pub fn add(&mut self, other: Live) {
        self.in_flight += other.in_flight;
        self.waiting += other.waiting;
        self.oldest = match (self.oldest, other.oldest) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// What [`ProcedureMetrics::tally`] reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub received: u64,
    pub forwarded: u64,
    pub dead_lettered: BTreeMap<&'static str, u64>,
    pub last_error: Option<(String, SystemTime)>,
}

impl Counts {
    /// Adds `other`'s counts; the later last error wins.
    pub fn add(&mut self, other: Counts) {
        self.received += other.received;
        self.forwarded += other.forwarded;
        for (reason, n) in other.dead_lettered {
            *self.dead_lettered.entry(reason).or_default() += n;
        }
        if other.last_error.as_ref().map(|e| e.1) > self.last_error.as_ref().map(|e| e.1) {
            self.last_error = other.last_error;
        }
    }
}

impl Handles {
    fn read(&self) -> Counts {
        Counts {
            received: self.received.get(),
            forwarded: self.forwarded.get(),
            dead_lettered: self
                .tally
                .dead_lettered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(reason, n)| (*reason, n.get()))
                .collect(),
            last_error: self
                .tally
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// The procedure's dead letters of `reason`, and `other`'s beyond the cap.
    fn dead_lettered(&self, metrics: &Metrics, reason: &'static str) {
        let of = |label: &ProcedureLabel| {
            metrics
                .procedure_dead_lettered
                .get_or_create(&ProcedureReason {
                    procedure: label.procedure.clone(),
                    group: label.group.clone(),
                    reason,
                })
                .clone()
        };
        let mut counts = self
            .tally
            .dead_lettered
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let own = self.other.is_none();
        counts
            .entry(reason)
            .or_insert_with(|| {
                if own {
                    of(&self.label)
                } else {
                    Counter::default()
                }
            })
            .inc();
        if !own {
            of(&self.label).inc();
        }
    }
}

pub struct ProcedureMetrics {
    metrics: Arc<Metrics>,
    max: usize,
    marker: Marker,
    /// Every procedure seen, with the handles its events count in.
    handles: HashMap<String, Handles>,
    /// The procedure looked up last and its handles: events mostly come in
    /// runs of one procedure, and this spares hashing its name per event.
    last: Option<(String, Handles)>,
    /// Procedures with labels of their own.
    own: usize,
    /// Procedures counted under `other`.
    others: usize,
    next_refresh: Option<Instant>,
    /// The labels whose gauges were set at the last refresh.
    shown: Vec<ProcedureLabel>,
}

impl ProcedureMetrics {
    pub fn new(metrics: Arc<Metrics>, max: usize, marker: Marker) -> ProcedureMetrics {
        ProcedureMetrics {
            metrics,
            max,
            marker,
            handles: HashMap::new(),
            last: None,
            own: 0,
            others: 0,
            next_refresh: None,
            shown: Vec::new(),
        }
    }

    fn handles(&mut self, procedure: &str) -> &Handles {
        if self.last.as_ref().is_some_and(|(p, _)| p == procedure) {
            return &self.last.as_ref().expect("checked").1;
        }
        let handles = self.lookup(procedure).clone();
        &self.last.insert((procedure.to_owned(), handles)).1
    }

    fn lookup(&mut self, procedure: &str) -> &Handles {
        if !self.handles.contains_key(procedure) {
            let label = if self.own < self.max {
                self.own += 1;
                let group = match self.marker.parse(procedure) {
                    Some((_, g)) => g.name.unwrap_or_else(|| "default".to_owned()),
                    None => "default".to_owned(),
                };
                ProcedureLabel {
                    procedure: procedure.to_owned(),
                    group,
                }
            } else {
                self.others += 1;
                self.metrics.procedures_other.set(self.others as i64);
                ProcedureLabel {
                    procedure: OTHER.to_owned(),
                    group: OTHER.to_owned(),
                }
            };
            let m = &self.metrics;
            let own = label.procedure != OTHER;
            let received = m.procedure_received.get_or_create(&label).clone();
            let forwarded = m.procedure_forwarded.get_or_create(&label).clone();
            let (received, forwarded, other) = if own {
                (received, forwarded, None)
            } else {
                let counted = (received, forwarded);
                (Counter::default(), Counter::default(), Some(counted))
            };
            let handles = Handles {
                received,
                forwarded,
                other,
                latency: m.procedure_latency.get_or_create(&label).clone(),
                tally: Arc::default(),
                label,
            };
            self.handles.insert(procedure.to_owned(), handles);
        }
        &self.handles[procedure]
    }

    pub fn received(&mut self, procedure: &str) {
        let h = self.handles(procedure);
        h.received.inc();
        if let Some((other, _)) = &h.other {
            other.inc();
        }
    }

    pub fn forwarded(&mut self, procedure: &str, latency: Duration) {
        let h = self.handles(procedure);
        h.forwarded.inc();
        if let Some((_, other)) = &h.other {
            other.inc();
        }
        h.latency.observe(latency.as_secs_f64());
    }

    /// A delivery attempt to `procedure` failed with `error`: its last error.
    pub fn failed(&mut self, procedure: &str, error: String) {
        let h = self.handles(procedure);
        *h.tally.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((error, SystemTime::now()));
    }

    /// The counts of `procedure` (zero if it never had an event).
    pub fn tally(&self, procedure: &str) -> Counts {
        self.handles
            .get(procedure)
            .map(Handles::read)
            .unwrap_or_default()
    }

    /// Every procedure that had an event, with its counts.
    pub fn tallies(&self) -> impl Iterator<Item = (&str, Counts)> + '_ {
        self.handles.iter().map(|(p, h)| (p.as_str(), h.read()))
    }

    pub fn dead_lettered(&mut self, procedure: &str, reason: &'static str) {
        let metrics = self.metrics.clone();
        self.handles(procedure).dead_lettered(&metrics, reason);
    }

    /// Whether [`ProcedureMetrics::refresh`] is due.
    pub fn refresh_due(&self, now: Instant) -> bool {
        self.next_refresh.is_none_or(|at| now >= at)
    }

    /// Sets in flight, waiting and the oldest waiting age of every
    /// procedure from what each has `live`.
    pub fn refresh<'a>(&mut self, live: impl IntoIterator<Item = (&'a str, Live)>, now: Instant) {
        self.next_refresh = Some(now + REFRESH_EVERY);
        let mut seen: HashMap<ProcedureLabel, Live> = HashMap::new();
        for (procedure, l) in live {
            let label = self.handles(procedure).label.clone();
            seen.entry(label).or_default().add(l);
        }
        let m = &self.metrics;
        // Labels shown before and idle now go back to zero.
        for label in std::mem::take(&mut self.shown) {
            if !seen.contains_key(&label) {
                m.procedure_in_flight.get_or_create(&label).set(0);
                m.procedure_waiting.get_or_create(&label).set(0);
                m.procedure_oldest_waiting.get_or_create(&label).set(0.0);
            }
        }
        for (label, s) in seen {
            m.procedure_in_flight
                .get_or_create(&label)
                .set(s.in_flight as i64);
            m.procedure_waiting
                .get_or_create(&label)
                .set(s.waiting as i64);
            let age = s
                .oldest
                .map_or(0.0, |o| now.saturating_duration_since(o).as_secs_f64());
            m.procedure_oldest_waiting.get_or_create(&label).set(age);
            self.shown.push(label);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, sample: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
    }

    #[test]
    fn procedures_beyond_the_cap_are_counted_under_other() {
        let metrics = Arc::new(Metrics::new());
        let mut p = ProcedureMetrics::new(metrics.clone(), 1, Marker::default());
        p.received("a.SUB_x__audit");
        p.received("a.SUB_x__audit");
        p.received("a.SUB_y");
        p.received("a.SUB_z");
        p.dead_lettered("a.SUB_z", "rejected");
        let t0 = Instant::now();
        let mut x = Live::default();
        x.add_job(t0, true);
        let mut y = Live::default();
        y.add_job(t0, false);
        p.refresh(
            [("a.SUB_x__audit", x), ("a.SUB_y", y)],
            t0 + Duration::from_secs(2),
        );
        let text = metrics.encode();
        let own = r#"{procedure="a.SUB_x__audit",group="audit"}"#;
        let other = r#"{procedure="other",group="other"}"#;
        assert_eq!(
            value(
                &text,
                &format!("subtocall_procedure_events_received_total{own}")
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &text,
                &format!("subtocall_procedure_events_received_total{other}")
            ),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "subtocall_metrics_procedures_other"),
            Some(2.0)
        );
        assert_eq!(
            value(&text, &format!("subtocall_procedure_in_flight{own}")),
            Some(1.0)
        );
        assert_eq!(
            value(&text, &format!("subtocall_procedure_waiting{other}")),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                &format!("subtocall_procedure_oldest_waiting_seconds{other}")
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &text,
                r#"subtocall_procedure_events_dead_lettered_total{procedure="other",group="other",reason="rejected"}"#
            ),
            Some(1.0)
        );
        // `/status` reads each procedure's own counts, exact beyond the cap.
        assert_eq!(p.tally("a.SUB_x__audit").received, 2);
        assert_eq!(p.tally("a.SUB_y").received, 1);
        let z = p.tally("a.SUB_z");
        assert_eq!((z.received, z.dead_lettered.get("rejected")), (1, Some(&1)));
        assert!(p.tally("a.SUB_y").dead_lettered.is_empty());
        // A procedure with a label of its own: what `/status` reads is the
        // metric itself, not a second count kept beside it.
        metrics
            .procedure_received
            .get_or_create(&ProcedureLabel {
                procedure: "a.SUB_x__audit".into(),
                group: "audit".into(),
            })
            .inc();
        assert_eq!(p.tally("a.SUB_x__audit").received, 3);
        // Nothing left: the gauges go back to zero.
        p.refresh([], t0 + Duration::from_secs(3));
        let text = metrics.encode();
        assert_eq!(
            value(&text, &format!("subtocall_procedure_waiting{other}")),
            Some(0.0)
        );
    }
}
