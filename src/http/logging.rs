//! Logging of error responses without flooding: faults of the service are logged where they
//! happen, at ERROR (a 500's cause, a panic); refused requests (4xx, and the expected 5xx:
//! `circuit_open`, `shutting_down`, ...) are one DEBUG line each plus at most one WARN line per
//! error code and [`SUMMARY_WINDOW`], which says how many of that code were refused since the
//! previous line. A circuit that refuses 17,000 requests in 8 s thus writes one WARN line.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::StatusCode;

/// At most one WARN summary line per error code per window.
pub const SUMMARY_WINDOW: Duration = Duration::from_secs(10);

/// Per-code windows of refused requests.
#[derive(Debug)]
pub struct RefusalLog {
    window: Duration,
    codes: Mutex<HashMap<&'static str, Window>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    /// When the last WARN line for the code was written.
    logged_at: Instant,
    /// Refusals of the code since then (not yet reported).
    suppressed: u64,
}

impl RefusalLog {
    pub fn new(window: Duration) -> RefusalLog {
        RefusalLog {
            window,
            codes: Mutex::new(HashMap::new()),
        }
    }

    /// Records one error response and logs it as described in the module docs.
    pub fn note(&self, code: &'static str, status: StatusCode) {
        tracing::debug!(status = status.as_u16(), code, "request refused");
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            return; // a fault: already logged at ERROR with its cause
        }
        if let Some(earlier) = self.due(code, Instant::now()) {
            tracing::warn!(
                status = status.as_u16(),
                code,
                refused_since_last = earlier + 1,
                "Refusing requests with `{code}` ({} since the last such line)",
                earlier + 1
            );
        }
    }

    /// `Some(suppressed)` when a WARN line for `code` is due at `now` (with how many refusals
    /// went unreported before this one); `None` while the window runs.
    pub fn due(&self, code: &'static str, now: Instant) -> Option<u64> {
        let mut codes = self
            .codes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match codes.get_mut(code) {
            Some(window) if now.duration_since(window.logged_at) < self.window => {
                window.suppressed += 1;
                None
            }
            Some(window) => {
                let suppressed = window.suppressed;
                *window = Window {
                    logged_at: now,
                    suppressed: 0,
                };
                Some(suppressed)
            }
            None => {
                codes.insert(
                    code,
                    Window {
                        logged_at: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_code_and_window() {
        let log = RefusalLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.due("circuit_open", t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(log.due("circuit_open", t0 + Duration::from_millis(i)), None);
        }
        // Another code has its own window.
        assert_eq!(log.due("pool_full", t0), Some(0));
        // After the window: one line reporting the 1,000 suppressed.
        assert_eq!(
            log.due("circuit_open", t0 + Duration::from_secs(11)),
            Some(1000)
        );
        assert_eq!(log.due("circuit_open", t0 + Duration::from_secs(12)), None);
    }
}
