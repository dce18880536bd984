//! What `PoolHandle::stats` reports: one line per session, and the pool's totals.

use chrono::{DateTime, Utc};

use crate::actors::connection::SessionState;
use crate::ids::{ServerName, UserId};

/// How one connection looks in [`PoolStats`].
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
    /// Events since this supervisor started, for `/metrics`.
    pub counters: PoolCounters,
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
