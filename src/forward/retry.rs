//! Retry policy, kept apart from the loop that applies it (the forwarding
//! core) and from the classification of failures (`outcome`): how long to
//! wait before another attempt (capped exponential backoff with full jitter)
//! and when to give up (attempts and age). Pure: randomness and time are
//! arguments.

use std::time::{Duration, Instant};

/// Capped exponential backoff: the n-th wait (n from 1) is drawn uniformly
/// from `[0, min(max, initial * 2^(n-1))]` ("full jitter"), so that many
/// retries started by the same outage spread out instead of arriving in
/// lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The upper bound of the n-th wait, before jitter.
    pub fn ceiling(&self, n: u32) -> Duration {
        let exp = n.saturating_sub(1).min(32);
        self.initial
            .checked_mul(1u32 << exp.min(31))
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The n-th wait for a jitter draw in `[0, 1)`.
    pub fn delay(&self, n: u32, jitter: f64) -> Duration {
        self.ceiling(n).mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// How long and how often an event may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included; 1 means never retry.
    pub max_attempts: u32,
    /// No attempt starts later than this after the event was received.
    pub max_age: Duration,
    pub backoff: Backoff,
}

impl RetryPolicy {
    /// When to make the next attempt after `attempts` failed ones, or `None`
    /// when the budget is spent (too many attempts, or the next attempt would
    /// start after `max_age`).
    pub fn next_attempt(
        &self,
        attempts: u32,
        received: Instant,
        now: Instant,
        jitter: f64,
    ) -> Option<Instant> {
        if attempts >= self.max_attempts {
            return None;
        }
        let at = now + self.backoff.delay(attempts, jitter);
        (at.saturating_duration_since(received) <= self.max_age).then_some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn backoff() -> Backoff {
        Backoff {
            initial: 100 * MS,
            max: 5000 * MS,
        }
    }

    #[test]
    fn backoff_ceiling_doubles_from_initial_and_stops_at_the_cap() {
        let ceilings: Vec<u128> = (1..=9).map(|n| backoff().ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(backoff().ceiling(1000), 5000 * MS, "no overflow far out");
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        assert_eq!(backoff().delay(3, 0.0), Duration::ZERO);
        assert_eq!(backoff().delay(3, 0.5), 200 * MS);
        assert_eq!(backoff().delay(3, 1.0), 400 * MS);
        assert_eq!(backoff().delay(3, 7.0), 400 * MS, "jitter is clamped");
    }

    #[test]
    fn retry_budget_ends_at_max_attempts() {
        let policy = RetryPolicy {
            max_attempts: 3,
            max_age: Duration::from_secs(3600),
            backoff: backoff(),
        };
        let t0 = Instant::now();
        assert_eq!(policy.next_attempt(1, t0, t0, 1.0), Some(t0 + 100 * MS));
        assert_eq!(policy.next_attempt(2, t0, t0, 1.0), Some(t0 + 200 * MS));
        assert_eq!(policy.next_attempt(3, t0, t0, 1.0), None);
    }

    #[test]
    fn retry_budget_ends_when_the_next_attempt_would_be_too_late() {
        let policy = RetryPolicy {
            max_attempts: 100,
            max_age: Duration::from_secs(10),
            backoff: backoff(),
        };
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(9);
        assert!(
            policy.next_attempt(7, t0, now, 0.1).is_some(),
            "0.5 s wait fits"
        );
        assert_eq!(
            policy.next_attempt(7, t0, now, 1.0),
            None,
            "5 s wait does not"
        );
    }

    #[test]
    fn default_budget_outlasts_a_rolling_restart_of_all_backends() {
        // The defaults documented in doc/configuration.md: 50 attempts,
        // 120 s, 100 ms .. 5 s. Even with the longest waits, attempts keep
        // coming for well over a minute: a restart that takes tens of seconds
        // loses nothing.
        let policy = RetryPolicy {
            max_attempts: 50,
            max_age: Duration::from_secs(120),
            backoff: backoff(),
        };
        let t0 = Instant::now();
        let (mut now, mut attempts) = (t0, 1);
        while let Some(at) = policy.next_attempt(attempts, t0, now, 1.0) {
            now = at;
            attempts += 1;
        }
        assert!(now - t0 >= Duration::from_secs(60), "{:?}", now - t0);
        // ... and the worst-case gap between attempts stays at the 5 s cap.
        assert!(policy.backoff.ceiling(attempts) <= Duration::from_secs(5));
    }
}
