//! The one retry policy of the service: exponential backoff with full jitter. Kinesis
//! and CloudWatch calls, lake flushes and notification deliveries all wait by it.
//!
//! The schedule (first wait, doubling, ceiling, number of retries) is `backon`'s
//! [`ExponentialBuilder`]; each wait is then drawn uniformly between zero and the
//! schedule's value ("full jitter"), so that callers throttled together spread out
//! instead of retrying in step. (`backon`'s own jitter adds up to one more wait on
//! top, which would double the ceiling.)

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// How long to wait between attempts, and how many to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The schedule's first wait.
    pub first: Duration,
    /// The schedule's longest wait.
    pub max: Duration,
    /// Retries after the first attempt; `None`: retry forever.
    pub retries: Option<usize>,
}

impl RetryPolicy {
    /// Retries forever, `first` doubling up to `max`.
    pub const fn forever(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            retries: None,
        }
    }

    /// `attempts` attempts in all (at least one), `first` doubling up to `max`.
    pub const fn attempts(first: Duration, max: Duration, attempts: u32) -> Self {
        let retries = if attempts == 0 { 0 } else { attempts - 1 };
        Self {
            first,
            max,
            retries: Some(retries as usize),
        }
    }

    /// The waits before each retry, in order; `None` once the retries are spent.
    pub fn waits(&self) -> Waits {
        Waits {
            policy: *self,
            schedule: self.schedule(),
        }
    }

    fn schedule(&self) -> ExponentialBackoff {
        let builder = ExponentialBuilder::new()
            .with_factor(2.0)
            .with_min_delay(self.first)
            .with_max_delay(self.max);
        match self.retries {
            Some(retries) => builder.with_max_times(retries),
            None => builder.without_max_times(),
        }
        .build()
    }
}

/// The waits of one run of retries (see [`RetryPolicy::waits`]).
#[derive(Debug)]
pub struct Waits {
    policy: RetryPolicy,
    schedule: ExponentialBackoff,
}

impl Waits {
    /// The next wait of a loop that retries forever (past a finite policy's
    /// retries: its longest wait).
    pub fn next_wait(&mut self) -> Duration {
        self.next().unwrap_or(self.policy.max)
    }

    /// Starts over at the first wait (after a success, for a loop that runs on).
    pub fn reset(&mut self) {
        self.schedule = self.policy.schedule();
    }
}

impl Iterator for Waits {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.schedule
            .next()
            .map(|ceiling| ceiling.mul_f64(fastrand::f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn waits_stay_under_a_doubling_ceiling_and_spread_out() {
        let policy = RetryPolicy::attempts(200 * MS, 20 * 1000 * MS, 10);
        let mut all = Vec::new();
        for _ in 0..200 {
            let waits: Vec<Duration> = policy.waits().collect();
            assert_eq!(waits.len(), 9, "10 attempts, 9 waits");
            for (i, wait) in waits.iter().enumerate() {
                let ceiling = (200 * MS * (1 << i)).min(20 * 1000 * MS);
                assert!(*wait <= ceiling, "wait {i}: {wait:?} > {ceiling:?}");
            }
            all.push(waits[8]);
        }
        // Full jitter: the last waits (ceiling 20 s) are spread over it.
        assert!(all.iter().any(|w| *w < 5 * 1000 * MS), "{all:?}");
        assert!(all.iter().any(|w| *w > 15 * 1000 * MS), "{all:?}");
    }

    #[test]
    fn a_loop_that_runs_on_retries_forever_and_starts_over_after_a_reset() {
        let policy = RetryPolicy::forever(500 * MS, 30 * 1000 * MS);
        let mut waits = policy.waits();
        for _ in 0..1000 {
            assert!(waits.next().unwrap() <= 30 * 1000 * MS);
        }
        waits.reset();
        assert!(waits.next().unwrap() <= 500 * MS);
        assert!(waits.next().unwrap() <= 1000 * MS);
        assert_eq!(RetryPolicy::attempts(MS, MS, 1).waits().next(), None);
        assert_eq!(RetryPolicy::attempts(MS, MS, 0).waits().next(), None);
    }
}
