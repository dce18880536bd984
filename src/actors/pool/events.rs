//! What happens in the pool, as events: starts, crashes, restarts, closes, refreshes, tool-list
//! and credential changes. Published by the supervisor, its sessions and the handle; read by
//! the status page's live feed and by the MCP endpoint's `list_changed` notifications.
//!
//! Events carry user ids (the operator's feed shows who), never a secret and never a tool's
//! arguments or results.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use crate::ids::{ServerName, SessionKey, UserId};

/// How many recent events are kept for a listener that has just arrived.
const RECENT: usize = 200;
/// How far a slow listener may fall behind before it misses events (it is told how many).
const CHANNEL: usize = 1024;

/// One thing that happened to one (user, server) key.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct PoolEvent {
    pub at: DateTime<Utc>,
    pub user_id: UserId,
    pub server: ServerName,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// A session became ready.
    Started {
        pid: Option<u32>,
        /// From the request that started it to ready, queueing for a start slot included.
        cold_start_ms: u64,
        /// Whether the pool started it after a crash or failed start (not on a request).
        restart: bool,
    },
    /// A start failed (nothing was ready); `code` is the pool error code.
    StartFailed { code: String },
    /// A ready session's server exited or stopped answering.
    Crashed { cause: String },
    /// The pool will start the key again after `backoff_ms`.
    RestartScheduled { attempt: usize, backoff_ms: u64 },
    /// Too many failures in the restart window: new sessions are refused for a while.
    CircuitOpened { cooldown_secs: u64 },
    /// A session was closed on purpose: `idle`, `evicted`, `requested`, `refresh`, `shutdown`.
    Closed { reason: String },
    /// The server told its session that its tool list changed, and the cache was refreshed.
    ToolsChanged,
    /// The server announced that its prompts changed (`notifications/prompts/list_changed`).
    PromptsChanged,
    /// The server announced that its resources or resource templates changed
    /// (`notifications/resources/list_changed`).
    ResourcesChanged,
    /// The user's OAuth tokens for this server were refreshed.
    TokenRefreshed,
    /// A token refresh failed; `code` is the credential error code (`reconnect_required`…).
    TokenRefreshFailed { code: String },
    /// The user's stored credentials for this server were created, replaced, deactivated or
    /// deleted.
    CredentialsChanged,
    /// A preforked server's session could not start by fork (zygote down, backing off or
    /// disabled, or the fork failed) and is being spawned instead.
    PreforkFallback { cause: String },
}

/// The pool's event stream: a broadcast channel plus a short history. Shared by every
/// supervisor incarnation, so a listener survives a supervisor restart.
#[derive(Clone)]
pub struct PoolEvents {
    sender: broadcast::Sender<PoolEvent>,
    recent: Arc<Mutex<VecDeque<PoolEvent>>>,
}

impl Default for PoolEvents {
    fn default() -> Self {
        PoolEvents {
            sender: broadcast::Sender::new(CHANNEL),
            recent: Arc::new(Mutex::new(VecDeque::with_capacity(RECENT))),
        }
    }
}

impl PoolEvents {
    /// Records `kind` for `key` now, and tells every listener. Never blocks.
    pub fn publish(&self, key: &SessionKey, kind: EventKind) {
        let event = PoolEvent {
            at: Utc::now(),
            user_id: key.user.clone(),
            server: key.server.clone(),
            kind,
        };
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(event.clone());
        }
        // No listener is not an error.
        let _ = self.sender.send(event);
    }

    /// Events from now on. A listener that lags more than the channel's capacity gets
    /// `RecvError::Lagged(n)` and goes on from the oldest event still held.
    pub fn subscribe(&self) -> broadcast::Receiver<PoolEvent> {
        self.sender.subscribe()
    }

    /// The last events, oldest first (at most a couple of hundred).
    pub fn recent(&self) -> Vec<PoolEvent> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().cloned().collect()
    }
}

impl std::fmt::Debug for PoolEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolEvents")
            .field("listeners", &self.sender.receiver_count())
            .finish_non_exhaustive()
    }
}
