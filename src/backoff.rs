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

/// The restart policy's numbers (`[pool]`: `max_restarts`, `restart_window`,
/// `failed_cooldown`, `restart_backoff_base`, `restart_backoff_cap`).
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// More failures than this inside `window` open the circuit.
    pub max_restarts: u32,
    pub window: Duration,
    /// How long an open circuit refuses new starts.
    pub cooldown: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

/// What one more failure leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Start again after `delay` (full jitter); `attempt` counts failures in the window.
    Retry { attempt: u32, delay: Duration },
    /// Too many failures in the window: refuse new starts for `cooldown`.
    Open { cooldown: Duration },
}

/// One key's restart history: its failures inside the window, and the circuit that opens
/// when they exceed the policy's intensity (OTP's intensity and period, plus a cool-down).
#[derive(Debug, Clone)]
pub struct Circuit {
    policy: RestartPolicy,
    failures: FailureWindow,
    open_until: Option<Instant>,
}

impl Circuit {
    pub fn new(policy: RestartPolicy) -> Circuit {
        Circuit {
            policy,
            failures: FailureWindow::new(policy.window),
            open_until: None,
        }
    }

    /// Records a crash or a failed start.
    pub fn record_failure(&mut self) -> AfterFailure {
        let attempt = self.failures.record() as u32;
        if attempt > self.policy.max_restarts {
            self.open_until = Some(Instant::now() + self.policy.cooldown);
            return AfterFailure::Open {
                cooldown: self.policy.cooldown,
            };
        }
        AfterFailure::Retry {
            attempt,
            delay: full_jitter(
                self.policy.backoff_base,
                self.policy.backoff_cap,
                attempt - 1,
            ),
        }
    }

    /// Before a start asked for by a request: `Err(retry_after)` while the circuit is open.
    /// Once the cool-down is over the circuit closes with its history forgotten, and
    /// `Ok(true)` says that this start is the probe.
    pub fn admit(&mut self) -> Result<bool, Duration> {
        let Some(until) = self.open_until else {
            return Ok(false);
        };
        let now = Instant::now();
        if now < until {
            return Err(until - now);
        }
        self.open_until = None;
        self.failures.clear();
        Ok(true)
    }

    /// Whether new starts are refused (until [`Circuit::admit`] finds the cool-down over).
    pub fn is_open(&self) -> bool {
        self.open_until.is_some()
    }

    /// When the cool-down of an open circuit ends.
    pub fn open_until(&self) -> Option<Instant> {
        self.open_until
    }

    /// Failures inside the window, as of the last one.
    pub fn attempts(&self) -> usize {
        self.failures.len()
    }
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

    fn policy() -> RestartPolicy {
        RestartPolicy {
            max_restarts: 3,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(300),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_then_open_the_circuit_for_the_cool_down() {
        let mut circuit = Circuit::new(policy());
        for expected in 1..=3u32 {
            match circuit.record_failure() {
                AfterFailure::Retry { attempt, delay } => {
                    assert_eq!(attempt, expected);
                    assert!(delay <= Duration::from_millis(500) * 2u32.pow(expected - 1));
                }
                open => panic!("failure {expected} opened the circuit: {open:?}"),
            }
            assert_eq!(circuit.admit(), Ok(false), "still closed");
        }
        assert_eq!(
            circuit.record_failure(),
            AfterFailure::Open {
                cooldown: Duration::from_secs(300)
            }
        );
        assert!(circuit.is_open());
        assert_eq!(circuit.admit(), Err(Duration::from_secs(300)));

        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(
            circuit.admit(),
            Err(Duration::from_secs(200)),
            "counts down"
        );
        tokio::time::advance(Duration::from_secs(199)).await;
        assert_eq!(
            circuit.admit(),
            Err(Duration::from_secs(1)),
            "no early probe"
        );

        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            circuit.admit(),
            Ok(true),
            "the first request after is the probe"
        );
        assert!(!circuit.is_open());
        assert_eq!(circuit.attempts(), 0, "history forgotten");
        assert_eq!(circuit.admit(), Ok(false), "only one probe");
        assert!(matches!(
            circuit.record_failure(),
            AfterFailure::Retry { attempt: 1, .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_spread_wider_than_the_window_never_open_it() {
        let mut circuit = Circuit::new(policy());
        for _ in 0..20 {
            assert!(matches!(
                circuit.record_failure(),
                AfterFailure::Retry { .. }
            ));
            // One failure every 21 s: never more than three inside 60 s.
            tokio::time::advance(Duration::from_secs(21)).await;
        }
        assert!(!circuit.is_open());
        assert!(circuit.attempts() <= 3);
    }
}
