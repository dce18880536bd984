//! Prometheus families the pool records itself, so every caller (REST, chat, the MCP endpoint)
//! is counted the same way. `/metrics` registers them beside the HTTP layer's own.
//!
//! Labels hold configured server names, outcomes and error codes only: never a user id, so
//! cardinality is bounded by the configuration. The families outlive supervisor restarts
//! (they live in `PoolArgs`), so counters are real counters.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::ids::ServerName;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabel {
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    server: String,
    /// `ok`, `tool_error` (the tool answered `is_error: true`) or the pool error code.
    outcome: String,
}

type Histograms = Family<ServerLabel, Histogram, fn() -> Histogram>;

fn call_histogram() -> Histogram {
    // 1 ms .. ~65 s: a warm echo is sub-millisecond, a call may take the whole call timeout.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn start_histogram() -> Histogram {
    // 5 ms .. ~80 s: a forked or tiny server starts in milliseconds, a Python one in seconds.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Cold starts kept per server for the status page's percentiles.
const RECENT_STARTS: usize = 100;

/// The pool's own metrics. Cheap to clone (every family is shared).
#[derive(Clone)]
pub struct PoolMetrics {
    /// The last cold starts per server (a histogram's buckets are too coarse for a p99).
    recent_starts: Arc<Mutex<HashMap<String, VecDeque<Duration>>>>,
    spawns: Family<ServerLabel, Counter>,
    restarts: Family<ServerLabel, Counter>,
    crashes: Family<ServerLabel, Counter>,
    reaped: Family<ServerLabel, Counter>,
    evicted: Family<ServerLabel, Counter>,
    refreshes: Family<ServerLabel, Counter>,
    refresh_failures: Family<ServerLabel, Counter>,
    cold_start: Histograms,
    tool_calls: Family<CallLabels, Counter>,
    tool_call_duration: Family<CallLabels, Histogram, fn() -> Histogram>,
}

impl Default for PoolMetrics {
    fn default() -> Self {
        PoolMetrics {
            recent_starts: Arc::default(),
            spawns: Family::default(),
            restarts: Family::default(),
            crashes: Family::default(),
            reaped: Family::default(),
            evicted: Family::default(),
            refreshes: Family::default(),
            refresh_failures: Family::default(),
            cold_start: Family::new_with_constructor(start_histogram),
            tool_calls: Family::default(),
            tool_call_duration: Family::new_with_constructor(call_histogram),
        }
    }
}

impl std::fmt::Debug for PoolMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolMetrics").finish_non_exhaustive()
    }
}

fn label(server: &ServerName) -> ServerLabel {
    ServerLabel {
        server: server.to_string(),
    }
}

impl PoolMetrics {
    /// Adds every family to `registry` (counters get their `_total` suffix from the encoder).
    pub fn register(&self, registry: &mut Registry) {
        let counters = [
            (
                "session_spawns",
                "MCP server processes spawned (first starts, restarts, probes), by server",
                &self.spawns,
            ),
            (
                "session_restarts",
                "Restarts scheduled after a crash or a failed start, by server",
                &self.restarts,
            ),
            (
                "session_crashes",
                "Ready sessions whose server exited or stopped answering, by server",
                &self.crashes,
            ),
            (
                "sessions_reaped",
                "Idle sessions closed by the reaper, by server",
                &self.reaped,
            ),
            (
                "sessions_evicted",
                "Sessions closed to make room (least recently used), by server",
                &self.evicted,
            ),
            (
                "token_refreshes",
                "OAuth token refreshes done for a session, by server",
                &self.refreshes,
            ),
            (
                "token_refresh_failures",
                "OAuth token refreshes that failed (revoked grant, provider down), by server",
                &self.refresh_failures,
            ),
        ];
        for (name, help, family) in counters {
            registry.register(name, help, family.clone());
        }
        registry.register_with_unit(
            "session_cold_start",
            "Time from the request that started a session to its first ready, by server",
            Unit::Seconds,
            self.cold_start.clone(),
        );
        registry.register(
            "tool_calls",
            "Tool calls through the pool (REST, chat and MCP alike), by server and outcome",
            self.tool_calls.clone(),
        );
        registry.register_with_unit(
            "tool_call_duration",
            "Latency of tool calls through the pool (a session start included when none was \
             live), by server and outcome",
            Unit::Seconds,
            self.tool_call_duration.clone(),
        );
    }

    pub(crate) fn spawned(&self, server: &ServerName) {
        self.spawns.get_or_create(&label(server)).inc();
    }

    pub(crate) fn restart_scheduled(&self, server: &ServerName) {
        self.restarts.get_or_create(&label(server)).inc();
    }

    pub(crate) fn crashed(&self, server: &ServerName) {
        self.crashes.get_or_create(&label(server)).inc();
    }

    pub(crate) fn reaped(&self, server: &ServerName) {
        self.reaped.get_or_create(&label(server)).inc();
    }

    pub(crate) fn evicted(&self, server: &ServerName) {
        self.evicted.get_or_create(&label(server)).inc();
    }

    pub(crate) fn refreshed(&self, server: &ServerName) {
        self.refreshes.get_or_create(&label(server)).inc();
    }

    pub(crate) fn refresh_failed(&self, server: &ServerName) {
        self.refresh_failures.get_or_create(&label(server)).inc();
    }

    pub(crate) fn started(&self, server: &ServerName, cold_start: Duration) {
        self.cold_start
            .get_or_create(&label(server))
            .observe(cold_start.as_secs_f64());
        let mut recent = self.recent_starts.lock().unwrap_or_else(|p| p.into_inner());
        let starts = recent.entry(server.to_string()).or_default();
        if starts.len() == RECENT_STARTS {
            starts.pop_front();
        }
        starts.push_back(cold_start);
    }

    /// The servers with cold starts on record.
    pub fn servers_started(&self) -> Vec<String> {
        let recent = self.recent_starts.lock().unwrap_or_else(|p| p.into_inner());
        recent.keys().cloned().collect()
    }

    /// p50 and p99 of `server`'s last cold starts (nearest rank); `None` before the first.
    pub fn cold_start_percentiles(&self, server: &str) -> Option<(Duration, Duration)> {
        let recent = self.recent_starts.lock().unwrap_or_else(|p| p.into_inner());
        let mut starts: Vec<Duration> = recent.get(server)?.iter().copied().collect();
        if starts.is_empty() {
            return None;
        }
        starts.sort();
        let rank =
            |p: f64| starts[((p * starts.len() as f64).ceil() as usize).clamp(1, starts.len()) - 1];
        Some((rank(0.50), rank(0.99)))
    }

    pub(crate) fn tool_call(&self, server: &ServerName, outcome: &str, elapsed: Duration) {
        let labels = CallLabels {
            server: server.to_string(),
            outcome: outcome.to_owned(),
        };
        self.tool_calls.get_or_create(&labels).inc();
        self.tool_call_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }
}
