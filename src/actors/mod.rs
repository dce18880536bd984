//! The ractor actor tree. One file per actor: its message enum, its state, its typed handle.
//! `actors.md` at the repository root describes the tree, every message and the restart policy.
//! [`fairness`] is no actor: the per-user bound of calls in flight and the argument depth bound
//! that every `PoolHandle::call_tool` applies.

pub mod connection;
pub mod credential;
pub mod fairness;
pub mod guardian;
pub mod heartbeat;
pub mod pool;
pub mod reaper;
pub mod refresh;

pub use connection::SessionState;
pub use credential::{CredentialArgs, CredentialError, CredentialHandle};
pub use guardian::{GuardianMsg, PoolGuardian, PoolTree};
pub use heartbeat::{HeartbeatArgs, HeartbeatHandle};
pub use pool::{
    CallOptions, EventKind, PoolArgs, PoolError, PoolEvent, PoolHandle, PoolMetrics, PoolStats,
    SessionStats, Warmed,
};
pub use refresh::{RefreshArgs, TokenRefreshHandle};
