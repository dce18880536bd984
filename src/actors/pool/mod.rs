//! The `PoolSupervisor`: one `ConnectionActor` per (user, server), started on first use,
//! restarted on crash (OTP-style intensity and backoff), reaped when idle, capped in size.
//!
//! Its handlers never wait for a server to start: `spawn_linked` only awaits a trivial
//! `pre_start`, and readiness arrives later as [`PoolMsg::Ready`]. Concurrent first requests
//! for one key queue as waiters of the single start.
//! # Layout
//! - [`error`]: [`PoolError`] and its stable codes;
//! - [`stats`]: what `/v1/stats` reports;
//! - [`index`]: ready sessions by key, read by handles without a mailbox round trip;
//! - [`state`]: the supervisor's bookkeeping and restart policy;
//! - [`handle`]: [`PoolHandle`], the typed way in;
//! - [`events`]: what happened in the pool, broadcast to whoever listens;
//! - [`metrics`]: Prometheus families recorded by the pool itself.

mod error;
mod events;
mod handle;
mod index;
mod metrics;
mod state;
mod stats;

use std::sync::Arc;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::connection::{CloseReason, Session, StartFailure};
use super::credential::CredentialHandle;
use super::fairness::UserCallLimiter;
use crate::config::{Config, PoolConfig, SandboxConfig, ServerConfig};
use crate::ids::{SessionKey, UserId};
use crate::mcp::prefork::Prefork;
use crate::mcp::{ProcessRegistry, Sandbox};
use crate::oauth::TokenRefresher;

pub use error::PoolError;
pub use events::{EventKind, PoolEvent, PoolEvents};
pub use handle::{CallOptions, PoolHandle, internal_paths};
pub use index::PoolIndex;
pub use metrics::PoolMetrics;
use state::PoolState;
pub use stats::{PoolCounters, PoolStats, ServerSummary, SessionStats};

type SessionReply = RpcReplyPort<Result<Session, PoolError>>;

/// Messages of the [`PoolSupervisor`]; use [`PoolHandle`] rather than sending them.
pub enum PoolMsg {
    GetSession {
        key: SessionKey,
        /// The pid of a session the caller found dead before its request was written: if the
        /// key still shows it as ready, the caller waits for its restart instead.
        stale: Option<u32>,
        reply: SessionReply,
    },
    /// Start the sessions of `keys` that are not live, answering at once with what each key
    /// is doing (nobody waits for the starts).
    Warm {
        keys: Vec<SessionKey>,
        reply: RpcReplyPort<Vec<Result<Warmed, PoolError>>>,
    },
    /// A `ConnectionActor` finished starting.
    Ready {
        actor: ActorId,
        session: Session,
    },
    /// Backoff elapsed: start the key again.
    Restart {
        key: SessionKey,
    },
    Close {
        key: SessionKey,
        reply: RpcReplyPort<bool>,
    },
    CloseUser {
        user: UserId,
        reply: RpcReplyPort<usize>,
    },
    /// Close connections idle longer than `idle_timeout` (from the reaper).
    ReapIdle {
        reply: Option<RpcReplyPort<usize>>,
    },
    Stats {
        reply: RpcReplyPort<PoolStats>,
    },
    /// Stop taking work and close every session; replies with how many were closed.
    Shutdown {
        reply: RpcReplyPort<usize>,
    },
    /// `key`'s tokens were refreshed and its server reads them only at start-up: restart its
    /// session between calls, never during one.
    RestartAfterRefresh {
        key: SessionKey,
        reply: RpcReplyPort<RefreshRestart>,
    },
    /// The last call in flight on `key`'s session ended (sent by a watcher that
    /// `RestartAfterRefresh` armed).
    CallsEnded {
        key: SessionKey,
    },
    /// Cluster mode: keys with a session here (starting, ready, restarting or still closing).
    LiveKeys {
        reply: RpcReplyPort<std::collections::HashSet<SessionKey>>,
    },
    /// Cluster mode: whether `key` has a session here, in the sense of `LiveKeys`.
    HasKey {
        key: SessionKey,
        reply: RpcReplyPort<bool>,
    },
    /// Cluster mode: close those of `keys` that are ready with no call in flight.
    CloseIdle {
        keys: Vec<SessionKey>,
        reason: CloseReason,
        reply: RpcReplyPort<Vec<SessionKey>>,
    },
    /// Cluster mode: close `keys` now (their leases are lost).
    CloseKeys {
        keys: Vec<SessionKey>,
        reason: CloseReason,
        reply: RpcReplyPort<usize>,
    },
}

/// What a request for a key's session found or did, as warm-up reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Warmed {
    /// Its session is ready already.
    Ready,
    /// A start (or a restart) was already under way.
    Starting,
    /// A start began now.
    Started,
}

/// What [`PoolMsg::RestartAfterRefresh`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshRestart {
    /// The session was ready with no call in flight and is now closing; the next request
    /// starts a fresh one, which reads the new tokens.
    Now,
    /// Calls are in flight (or the session is still starting): it is closed when the last of
    /// them ends (or once it is ready).
    AfterCalls,
    /// No live session for the key: the next start reads the new tokens anyway.
    NotLive,
}

/// Everything the pool needs from the outside.
#[derive(Clone)]
pub struct PoolArgs {
    pub pool: PoolConfig,
    /// Shared with every [`PoolHandle`].
    pub index: PoolIndex,
    pub servers: Arc<std::collections::BTreeMap<String, ServerConfig>>,
    pub credentials: CredentialHandle,
    /// Token freshness has one owner, the pool: it consults the refresher before every tool
    /// call, tool listing and session start. `None`: no OAuth tokens to look after.
    pub refresher: Option<TokenRefresher>,
    pub registry: Option<ProcessRegistry>,
    /// Confines every server this pool starts.
    pub sandbox: Arc<Sandbox>,
    /// `[sandbox]`: the defaults each server's policy starts from.
    pub sandbox_defaults: SandboxConfig,
    /// Tool calls in flight per user, shared with every [`PoolHandle`].
    pub user_calls: UserCallLimiter,
    /// Slots for server processes starting at once (`pool.max_concurrent_starts`); shared by
    /// every supervisor incarnation, so a replaced supervisor's starts still count.
    pub start_slots: Arc<tokio::sync::Semaphore>,
    /// What happens in the pool, for the status page and the MCP endpoint.
    pub events: PoolEvents,
    /// Counters and histograms recorded by the pool.
    pub metrics: PoolMetrics,
    /// The HTTP client of every remote session (`mcp::remote::http_client`); `None` if it
    /// could not be built (remote sessions then fail to start, saying so).
    pub remote_http: Option<reqwest::Client>,
    /// The zygotes of preforked servers, which start their sessions by fork.
    pub prefork: Arc<Prefork>,
    /// Cluster mode: leases, placement and forwarding, for every [`PoolHandle`].
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl PoolArgs {
    pub fn from_config(
        config: &Config,
        credentials: CredentialHandle,
        refresher: Option<TokenRefresher>,
        registry: Option<ProcessRegistry>,
        sandbox: Arc<Sandbox>,
        prefork: Arc<Prefork>,
    ) -> PoolArgs {
        PoolArgs {
            pool: config.pool.clone(),
            index: PoolIndex::default(),
            servers: Arc::new(config.servers.clone()),
            credentials,
            refresher,
            registry,
            sandbox,
            sandbox_defaults: config.sandbox.clone(),
            user_calls: UserCallLimiter::new(config.pool.max_in_flight_per_user),
            start_slots: Arc::new(tokio::sync::Semaphore::new(
                config.pool.max_concurrent_starts,
            )),
            events: PoolEvents::default(),
            metrics: PoolMetrics::default(),
            remote_http: crate::mcp::remote::http_client()
                .inspect_err(|err| {
                    tracing::error!(cause = %err, "cannot build the HTTP client of remote MCP servers");
                })
                .ok(),
            prefork,
            cluster: None,
        }
    }
}

/// See the module docs.
pub struct PoolSupervisor;

impl Actor for PoolSupervisor {
    type Msg = PoolMsg;
    type State = PoolState;
    type Arguments = PoolArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<PoolMsg>,
        args: PoolArgs,
    ) -> Result<PoolState, ActorProcessingErr> {
        // A supervisor replacing a failed one must not serve its predecessor's connections.
        args.index.clear();
        Ok(PoolState::new(args))
    }

    async fn handle(
        &self,
        myself: ActorRef<PoolMsg>,
        message: PoolMsg,
        state: &mut PoolState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            PoolMsg::GetSession { key, stale, reply } => {
                let _ = state.get_session(&myself, key, stale, Some(reply)).await;
            }
            PoolMsg::Warm { keys, reply } => {
                let mut outcomes = Vec::with_capacity(keys.len());
                for key in keys {
                    outcomes.push(state.get_session(&myself, key, None, None).await);
                }
                let _ = reply.send(outcomes);
            }
            PoolMsg::Ready { actor, session } => state.on_ready(&myself, actor, session),
            PoolMsg::Restart { key } => state.on_restart(&myself, key).await,
            PoolMsg::Close { key, reply } => {
                let _ = reply.send(state.close(&key, CloseReason::Requested));
            }
            PoolMsg::CloseUser { user, reply } => {
                let _ = reply.send(state.close_user(&user));
            }
            PoolMsg::ReapIdle { reply } => {
                let reaped = state.reap_idle();
                if let Some(reply) = reply {
                    let _ = reply.send(reaped);
                }
            }
            PoolMsg::Stats { reply } => {
                let _ = reply.send(state.stats());
            }
            PoolMsg::Shutdown { reply } => state.shutdown(reply),
            PoolMsg::RestartAfterRefresh { key, reply } => {
                let _ = reply.send(state.restart_after_refresh(&myself, &key));
            }
            PoolMsg::CallsEnded { key } => state.calls_ended(&myself, &key),
            PoolMsg::LiveKeys { reply } => {
                let _ = reply.send(state.live_keys());
            }
            PoolMsg::HasKey { key, reply } => {
                let _ = reply.send(state.has_key(&key));
            }
            PoolMsg::CloseIdle {
                keys,
                reason,
                reply,
            } => {
                let _ = reply.send(state.close_idle(&keys, reason));
            }
            PoolMsg::CloseKeys {
                keys,
                reason,
                reply,
            } => {
                let closed = keys.iter().filter(|key| state.close(key, reason)).count();
                let _ = reply.send(closed);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<PoolMsg>,
        event: SupervisionEvent,
        state: &mut PoolState,
    ) -> Result<(), ActorProcessingErr> {
        // Overridden: ractor's default stops the supervisor whenever a child dies.
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                let actor = cell.get_id();
                let Some(key) = state.unlink(actor) else {
                    return Ok(());
                };
                match err.downcast_ref::<StartFailure>() {
                    Some(StartFailure(error)) => {
                        state.on_start_failed(&myself, key, actor, error.clone())
                    }
                    None => state.on_crash(&myself, key, actor, &err.to_string()),
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(key) = state.unlink(cell.get_id()) {
                    state.on_terminated(&key, cell.get_id());
                }
            }
            _ => {}
        }
        Ok(())
    }
}
