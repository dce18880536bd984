//! Restart intensity and backoff, one implementation for every place that retries: the pool
//! (per session), the `PoolGuardian` (per pool tree) and the token refresher (per attempt).
//! A leaf module, like [`crate::ids`], so `oauth` and `actors` share it without depending on
//! each other.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Failures inside a sliding window: OTP's restart intensity over a period. Uses tokio's clock,
/// so tests on paused time drive it.
#[derive(Debug, Clone)]
pub struct FailureWindow {
    period: Duration,
    failures: VecDeque<Instant>,
}

impl FailureWindow {
    pub fn new(period: Duration) -> FailureWindow {
        FailureWindow {
            period,
            failures: VecDeque::new(),
        }
    }

    /// Records a failure now; returns how many failures the window holds, this one included.
    pub fn record(&mut self) -> usize {
        let now = Instant::now();
        self.failures.push_back(now);
        while self
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.period)
        {
            self.failures.pop_front();
        }
        self.failures.len()
    }

    /// Failures recorded in the window (as of the last `record`).
    pub fn len(&self) -> usize {
        self.failures.len()
    }

    pub fn is_empty(&self) -> bool {
        self.failures.is_empty()
    }

    /// Forgets the history: a success, or a cool-down served, starts afresh.
    pub fn clear(&mut self) {
        self.failures.clear();
    }
}

/// "Full jitter" backoff: a uniformly random delay in `0..=min(cap, base·2^attempt)`, so that
/// many keys failing together (a server package broken for every user) do not retry in step.
pub fn full_jitter(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .saturating_mul(2u32.saturating_pow(attempt.min(20)))
        .min(cap);
    Duration::from_millis(rand::random_range(0..=ceiling.as_millis().max(1) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_under_the_doubling_ceiling_and_the_cap() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        for attempt in 0..30 {
            let ceiling = (base * 2u32.pow(attempt.min(10))).min(cap);
            for _ in 0..50 {
                assert!(full_jitter(base, cap, attempt) <= ceiling);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_leave_the_window_once_the_period_has_passed() {
        let mut window = FailureWindow::new(Duration::from_secs(60));
        assert_eq!(window.record(), 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(window.record(), 2);
        tokio::time::advance(Duration::from_secs(31)).await;
        // The first failure is now 61 s old; the second, 31 s.
        assert_eq!(window.record(), 2);
        window.clear();
        assert!(window.is_empty());
    }
}
