//! What `PoolHandle::stats` reports: one line per session, and the pool's totals.

use chrono::{DateTime, Utc};

use crate::actors::connection::SessionState;
use crate::ids::{ServerName, UserId};

/// How one session looks in [`PoolStats`].
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct SessionStats {
    pub user_id: UserId,
    pub server: ServerName,
    pub state: SessionState,
    pub pid: Option<u32>,
    pub tool_count: usize,
    pub restarts: u32,
    pub started_at: Option<DateTime<Utc>>,
    pub last_used: Option<DateTime<Utc>>,
    /// When the last health check (MCP `ping`, every `pool.health_interval` while idle) was
    /// answered; `None` before the first.
    pub last_health_check: Option<DateTime<Utc>>,
    pub in_flight: usize,
    /// `enforced`, `partial (missing: …)` or `off`; `None` before the first start.
    pub sandbox: Option<String>,
    /// Crashes and failed starts inside the restart window.
    pub failures: usize,
    /// Memory of the session's processes (its process group): their proportional set size,
    /// shared pages divided among their sharers, from `/proc`.
    pub memory_bytes: Option<u64>,
    /// CPU time the session's processes have used, in seconds.
    pub cpu_seconds: Option<f64>,
    /// `forked` (from the server's zygote) or `spawned`; `None` before the first start.
    pub started: Option<&'static str>,
}

/// One configured server across every user, for the status page.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct ServerSummary {
    /// Sessions live or starting.
    pub live: usize,
    pub ready: usize,
    /// Crashes and failed starts inside the restart window, summed over its users.
    pub failures: usize,
    /// Users whose circuit is open (new sessions refused for the cool-down).
    pub circuits_open: usize,
    /// Cold starts over the last (at most 100) starts, in milliseconds.
    pub cold_start_p50_ms: Option<u64>,
    pub cold_start_p99_ms: Option<u64>,
    /// Memory (proportional set size) and CPU time of its live sessions, summed.
    pub memory_bytes: u64,
    pub cpu_seconds: f64,
}

/// Pool statistics, as the design names them.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct PoolStats {
    /// Keys with a live or starting session (failed keys excluded).
    pub total_connections: usize,
    /// Keys whose session is ready.
    pub active_connections: usize,
    /// Live sessions per user.
    pub user_breakdown: std::collections::BTreeMap<String, usize>,
    pub connections: Vec<SessionStats>,
    /// Per configured server that has or had a session.
    pub servers: std::collections::BTreeMap<String, ServerSummary>,
    /// Events since this supervisor started.
    pub counters: PoolCounters,
    /// One entry per preforked server: its zygote, forks and fallbacks to a plain spawn.
    pub prefork: Vec<crate::mcp::prefork::ZygoteStats>,
}

impl PoolStats {
    /// Fills in what the supervisor does not know: each session's cost (one pass over `/proc`)
    /// and the per-server summary.
    pub(super) fn complete(&mut self, metrics: &super::PoolMetrics) {
        let groups: Vec<u32> = self.connections.iter().filter_map(|s| s.pid).collect();
        let usage = crate::mcp::usage::by_process_group(&groups);
        for session in &mut self.connections {
            if let Some(used) = session.pid.and_then(|pid| usage.get(&pid)) {
                session.memory_bytes = Some(used.memory_bytes);
                session.cpu_seconds = Some(used.cpu_seconds);
            }
        }
        let mut servers: std::collections::BTreeMap<String, ServerSummary> = Default::default();
        for session in &self.connections {
            let summary = servers.entry(session.server.to_string()).or_default();
            match session.state {
                SessionState::Failed => summary.circuits_open += 1,
                SessionState::Ready => {
                    summary.live += 1;
                    summary.ready += 1;
                }
                SessionState::Starting | SessionState::Restarting => summary.live += 1,
                SessionState::Closing => {}
            }
            summary.failures += session.failures;
            summary.memory_bytes += session.memory_bytes.unwrap_or(0);
            summary.cpu_seconds += session.cpu_seconds.unwrap_or(0.0);
        }
        // A server whose sessions all ended keeps its line while its cold starts are recent.
        for server in metrics.servers_started() {
            servers.entry(server).or_default();
        }
        for (server, summary) in &mut servers {
            if let Some((p50, p99)) = metrics.cold_start_percentiles(server) {
                summary.cold_start_p50_ms = Some(p50.as_millis() as u64);
                summary.cold_start_p99_ms = Some(p99.as_millis() as u64);
            }
        }
        self.servers = servers;
    }
}

/// Monotonic event counts of one supervisor incarnation (a supervisor restart resets them,
/// which Prometheus reads as a counter reset).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, utoipa::ToSchema)]
pub struct PoolCounters {
    /// `ConnectionActor`s spawned (first starts, restarts, probes).
    pub spawns: u64,
    /// Restarts scheduled after a crash or a failed start.
    pub restarts: u64,
    /// Connections closed by the idle reaper.
    pub reaped: u64,
    /// Connections closed to make room (LRU).
    pub evicted: u64,
}
