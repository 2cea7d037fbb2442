//! The async side of delivery: owns the [`DeliveryQueue`], starts attempts
//! through the configured sink, applies their outcomes, and dead-letters what
//! is given up (a log line always, a counter always, a Redis record when a
//! dead-letter list is configured). Lives as long as the process, across
//! router sessions. Driven by the app loop; never blocks it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::mpsc;

use crate::forward::envelope::SharedEvent;
use crate::forward::queue::{Attempt, DeliveryQueue, Finished, GiveUp, Job};
use crate::forward::retry::RetryAction;
use crate::metrics::Metrics;
use crate::sink;
use crate::sink::redis::{BatchResult, RedisSink};
use crate::wamp::Client;

/// How many events one Redis pipeline carries at most.
const REDIS_BATCH: usize = 512;

/// Where events go.
pub enum Sink {
    Wamp {
        call_timeout: Duration,
        /// Shared, so starting a call does not copy it.
        details_kwarg: Option<Arc<str>>,
    },
    Redis(RedisSink),
}

/// A finished attempt, as the in-flight futures report it.
// The large variant is the common one (one per event in WAMP mode); boxing it
// would cost an allocation per event to save stack space nobody needs.
#[allow(clippy::large_enum_variant)]
pub enum Completion {
    Call(Job<SharedEvent>, Attempt),
    Batch(Vec<Job<SharedEvent>>, BatchResult),
}

pub struct Delivery {
    queue: DeliveryQueue<SharedEvent>,
    sink: Sink,
    in_flight: FuturesUnordered<BoxFuture<'static, Completion>>,
    /// Dead-letter records for the Redis store task, if one is configured.
    dead_letter_store: Option<mpsc::Sender<Vec<u8>>>,
    metrics: Arc<Metrics>,
    /// Set at the shutdown deadline: failures are dead-lettered, not retried.
    final_attempts: bool,
}

impl Delivery {
    pub fn new(
        queue: DeliveryQueue<SharedEvent>,
        sink: Sink,
        dead_letter_store: Option<mpsc::Sender<Vec<u8>>>,
        metrics: Arc<Metrics>,
    ) -> Delivery {
        Delivery {
            queue,
            sink,
            in_flight: FuturesUnordered::new(),
            dead_letter_store,
            metrics,
            final_attempts: false,
        }
    }

    /// Accepts an event; dead-letters whatever overflow pushes out.
    pub fn accept(&mut self, event: SharedEvent, now: Instant) {
        if let Some(dropped) = self.queue.offer(Job::new(event, now)) {
            self.dead_letter(dropped, GiveUp::Overflow);
        }
    }

    /// Starts as many attempts as the in-flight limit allows. WAMP mode needs
    /// a session; without one, events wait.
    pub fn start(&mut self, client: Option<&Client>, now: Instant) {
        match &self.sink {
            Sink::Wamp {
                call_timeout,
                details_kwarg,
            } => {
                let Some(client) = client else { return };
                while let Some(job) = self.queue.start(now) {
                    let client = client.clone();
                    let timeout = *call_timeout;
                    let kwarg = details_kwarg.clone();
                    self.in_flight.push(Box::pin(async move {
                        let attempt =
                            sink::wamp::deliver(&client, &job.item, kwarg.as_deref(), timeout)
                                .await;
                        Completion::Call(job, attempt)
                    }));
                }
            }
            Sink::Redis(redis) => {
                // One pipeline at a time keeps each list in order.
                if !self.in_flight.is_empty() {
                    return;
                }
                let batch = self.queue.start_batch(now, REDIS_BATCH);
                if batch.is_empty() {
                    return;
                }
                let items = batch
                    .iter()
                    .map(|j| (j.item.procedure.clone(), j.item.envelope_json()))
                    .collect();
                let push = redis.push_batch(items);
                self.in_flight.push(Box::pin(async move {
                    let result = push.await;
                    Completion::Batch(batch, result)
                }));
            }
        }
        self.update_gauges();
    }

    pub fn has_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// The next finished attempt. Pending forever when nothing is in flight:
    /// guard the `select!` branch with [`Delivery::has_in_flight`].
    pub async fn next_completion(&mut self) -> Option<Completion> {
        self.in_flight.next().await
    }

    /// Applies a finished attempt.
    pub fn complete(&mut self, completion: Completion, now: Instant) {
        let jitter = rand::random::<f64>();
        match completion {
            Completion::Call(job, attempt) => self.finish(job, attempt, now, jitter),
            Completion::Batch(batch, result) => self.finish_batch(batch, result, now, jitter),
        }
        self.update_gauges();
    }

    fn finish(&mut self, job: Job<SharedEvent>, attempt: Attempt, now: Instant, jitter: f64) {
        // Only failures need these, for the log line; taken before the job
        // moves into the queue.
        let failure = match &attempt {
            Attempt::Failed { error, .. } => Some((
                error.clone(),
                job.item.procedure.clone(),
                job.item.publication,
            )),
            Attempt::Delivered => None,
        };
        let attempts = job.attempts;
        match self.queue.finish(job, attempt, now, jitter) {
            Finished::Delivered(job) => self.delivered(&job, now),
            Finished::Retrying { at } => {
                self.metrics.events_retried.inc();
                if let Some((error, procedure, publication)) = failure {
                    tracing::debug!(
                        %procedure,
                        %publication,
                        attempts,
                        %error,
                        retry_in = ?at.saturating_duration_since(now),
                        "delivery failed, will retry"
                    );
                }
                if self.final_attempts {
                    self.give_up_waiting();
                }
            }
            Finished::GivenUp(job, why) => self.dead_letter(job, why),
        }
    }

    fn finish_batch(
        &mut self,
        batch: Vec<Job<SharedEvent>>,
        result: BatchResult,
        now: Instant,
        jitter: f64,
    ) {
        match result {
            BatchResult::Pushed => {
                self.metrics.redis_pushes.inc_by(batch.len() as u64);
                for job in batch {
                    let attempt = Attempt::Delivered;
                    self.finish(job, attempt, now, jitter);
                }
            }
            BatchResult::Failed(error) => {
                self.metrics.redis_errors.inc();
                tracing::warn!(events = batch.len(), %error, "Redis push failed; the batch waits and is retried in order");
                for job in self.queue.requeue_front(batch, &error, now, jitter) {
                    self.dead_letter(job, GiveUp::Exhausted);
                }
                self.metrics.events_retried.inc();
                if self.final_attempts {
                    self.give_up_waiting();
                }
            }
            BatchResult::Partial(results) => {
                for (job, result) in batch.into_iter().zip(results) {
                    let attempt = match result {
                        Ok(()) => {
                            self.metrics.redis_pushes.inc();
                            Attempt::Delivered
                        }
                        Err((error, transient)) => {
                            self.metrics.redis_errors.inc();
                            let action = if transient {
                                RetryAction::Retry
                            } else {
                                RetryAction::Final
                            };
                            Attempt::Failed { action, error }
                        }
                    };
                    self.finish(job, attempt, now, jitter);
                }
            }
        }
    }

    fn delivered(&self, job: &Job<SharedEvent>, now: Instant) {
        self.metrics.events_forwarded.inc();
        self.metrics
            .forward_latency
            .observe(now.saturating_duration_since(job.received).as_secs_f64());
        tracing::debug!(
            procedure = %job.item.procedure,
            publication = %job.item.publication,
            attempts = job.attempts,
            "event delivered"
        );
    }

    /// When a backoff ends or a paused queue may resume.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queue.next_deadline()
    }

    pub fn is_idle(&self) -> bool {
        self.queue.is_idle() && self.in_flight.is_empty()
    }

    pub fn waiting(&self) -> usize {
        self.queue.waiting()
    }

    pub fn in_flight(&self) -> usize {
        self.queue.in_flight()
    }

    /// Shutdown deadline: dead-letters everything waiting, and from now on
    /// attempts in flight that fail are dead-lettered instead of retried.
    pub fn give_up_waiting(&mut self) {
        self.final_attempts = true;
        for job in self.queue.drain_waiting() {
            self.dead_letter(job, GiveUp::Shutdown);
        }
        self.update_gauges();
    }

    /// Closes the dead-letter store channel so its task can finish.
    pub fn close_dead_letter_store(&mut self) {
        self.dead_letter_store = None;
    }

    fn dead_letter(&self, job: Job<SharedEvent>, why: GiveUp) {
        self.metrics.dead_lettered(why).inc();
        let ev = &job.item;
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

    fn update_gauges(&self) {
        self.metrics.queue_depth.set(self.queue.waiting() as i64);
        self.metrics
            .calls_in_flight
            .set(self.queue.in_flight() as i64);
    }
}
