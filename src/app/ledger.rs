//! What became of each event, written down once: the metrics (global and
//! per procedure), the log lines (dead letters rate-limited into
//! summaries), and the dead-letter store. The stages' outputs say what
//! happened; this is the one place that counts it.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::mpsc;

use super::dead_letter_log::{DeadLetterLog, LINES_PER_WINDOW, Summary};
use super::procedure_metrics::ProcedureMetrics;
use crate::forward::envelope::SharedEvent;
use crate::forward::{Failure, GiveUp, Job};
use crate::metrics::Metrics;
use crate::sink::Report;

pub struct Ledger {
    pub metrics: Arc<Metrics>,
    /// `subtocall_procedure_*`, and each procedure's counts for `/status`.
    pub per_procedure: ProcedureMetrics,
    /// Which dead letters get a line of their own.
    dead_letter_log: DeadLetterLog,
    /// Dead-letter records for the Redis store task, if one is configured.
    dead_letter_store: Option<mpsc::Sender<Vec<u8>>>,
}

impl Ledger {
    pub fn new(
        metrics: Arc<Metrics>,
        per_procedure: ProcedureMetrics,
        dead_letter_store: Option<mpsc::Sender<Vec<u8>>>,
    ) -> Ledger {
        Ledger {
            metrics,
            per_procedure,
            dead_letter_log: DeadLetterLog::default(),
            dead_letter_store,
        }
    }

    /// `pushed`: delivered by an RPUSH (Redis mode), not a CALL.
    pub fn delivered(&mut self, job: &Job<Box<SharedEvent>>, pushed: bool, now: Instant) {
        let latency = now.saturating_duration_since(job.received);
        self.metrics.events_forwarded.inc();
        self.per_procedure.forwarded(&job.item.procedure, latency);
        if pushed {
            self.metrics.redis_pushes.inc();
        }
        self.metrics.forward_latency.observe(latency.as_secs_f64());
        tracing::debug!(
            procedure = %job.item.procedure,
            publication = %job.item.publication,
            attempts = job.attempts,
            "event delivered"
        );
    }

    /// Counted, logged (or summarised) and sent to the dead-letter store.
    pub fn dead_letter(&mut self, job: &Job<Box<SharedEvent>>, why: GiveUp, now: Instant) {
        self.metrics.dead_lettered(why).inc();
        self.per_procedure
            .dead_lettered(&job.item.procedure, why.as_str());
        let error = match &job.last_error {
            Some(e) => format!("dead-lettered ({}): {e}", why.as_str()),
            None => format!("dead-lettered ({})", why.as_str()),
        };
        self.per_procedure.failed(&job.item.procedure, error);
        let ev = &job.item;
        if self.dead_letter_log.admit(now, why.as_str(), &ev.procedure) {
            tracing::error!(
            target: "subtocall::dead_letter",
            reason = why.as_str(),
            procedure = %ev.procedure,
            topic = %ev.topic,
            publication = %ev.publication,
            attempts = job.attempts,
            last_error = job.last_error.as_deref().unwrap_or(""),
            "event dead-lettered"
            );
        }
        if let Some(store) = &self.dead_letter_store {
            let record = ev.dead_letter_json(
                why.as_str(),
                job.attempts,
                job.last_error.as_deref(),
                SystemTime::now(),
            );
            if store.try_send(record).is_err() {
                self.metrics.dead_letter_store_errors.inc();
                tracing::warn!(publication = %ev.publication, "dead-letter store is behind; record only logged");
            }
        }
    }

    /// A dead-lettered event let the next of its ordering key go ahead.
    pub fn key_released(&mut self) {
        self.metrics.order_released.inc();
        tracing::info!(
            keys = self.metrics.order_released.get(),
            "a dead-lettered event released its ordering key: the next event of the key went ahead"
        );
    }

    /// A delivery's failed attempts: each logged (debug) and kept as its
    /// procedure's last error; with `redis`, counted as Redis errors.
    pub fn failures(&mut self, jobs: &[Job<Box<SharedEvent>>], report: &Report, redis: bool) {
        log_failures(jobs, report, &mut self.per_procedure);
        if redis {
            count_redis_errors(&self.metrics, jobs.len(), report);
        }
    }

    /// Logs the dead-letter summary when its window ended.
    pub fn flush(&mut self, now: Instant) {
        if let Some(summary) = self.dead_letter_log.flush(now) {
            log_summary(&summary);
        }
    }

    /// Logs what the dead-letter summary holds, whatever its window.
    pub fn finish(&mut self) {
        if let Some(summary) = self.dead_letter_log.take_summary() {
            log_summary(&summary);
        }
    }

    /// When the dead-letter summary is due.
    pub fn next_flush(&self) -> Option<Instant> {
        self.dead_letter_log.next_flush()
    }

    /// Closes the dead-letter store channel so its task can finish.
    pub fn close_dead_letter_store(&mut self) {
        self.dead_letter_store = None;
    }
}

/// Counts the failed Redis pushes of a delivery (Redis mode).
fn count_redis_errors(metrics: &Metrics, events: usize, report: &Report) {
    match report {
        Report::All(Ok(())) => {}
        Report::All(Err(error)) => {
            metrics.redis_errors.inc();
            tracing::warn!(events, %error, "Redis push failed; the batch waits and is retried in order");
        }
        Report::Each(outcomes) => {
            // An event refused at a backlog bound is no Redis error.
            let failed = outcomes
                .iter()
                .filter(|o| o.is_err() && !matches!(o, Err(Failure::Backlog { .. })))
                .count();
            metrics.redis_errors.inc_by(failed as u64);
        }
    }
}

/// Logs each failed attempt (debug) and keeps it as its procedure's last
/// error.
fn log_failures(
    jobs: &[Job<Box<SharedEvent>>],
    report: &Report,
    per_procedure: &mut ProcedureMetrics,
) {
    let failures: Box<dyn Iterator<Item = (&Job<Box<SharedEvent>>, &Failure)>> = match report {
        Report::All(Ok(())) => return,
        Report::All(Err(f)) => Box::new(jobs.iter().map(move |j| (j, f))),
        Report::Each(outcomes) => Box::new(
            jobs.iter()
                .zip(outcomes)
                .filter_map(|(j, o)| o.as_ref().err().map(|f| (j, f))),
        ),
    };
    // A failed batch or pipeline shares one error: kept once per procedure,
    // not formatted again for each of its events.
    let mut last: Option<(&str, &Failure)> = None;
    for (job, error) in failures {
        if last.is_none_or(|(p, e)| p != &*job.item.procedure || !std::ptr::eq(e, error)) {
            per_procedure.failed(&job.item.procedure, error.to_string());
            last = Some((&job.item.procedure, error));
        }
        tracing::debug!(
            procedure = %job.item.procedure,
            publication = %job.item.publication,
            attempts = job.attempts,
            %error,
            "delivery attempt failed"
        );
    }
}

fn log_summary(summary: &Summary) {
    tracing::error!(
        target: "subtocall::dead_letter",
        events = summary.events,
        by = %summary.by,
        "dead letters summarised (more than {LINES_PER_WINDOW} in a second; the metrics count each)"
    );
}
