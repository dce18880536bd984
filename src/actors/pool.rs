//! The `PoolSupervisor`: one `ConnectionActor` per (user, server), started on first use,
//! restarted on crash (OTP-style intensity and backoff), reaped when idle, capped in size.
//!
//! Its handlers never wait for a server to start: `spawn_linked` only awaits a trivial
//! `pre_start`, and readiness arrives later as [`PoolMsg::Ready`]. Concurrent first requests
//! for one key queue as waiters of the single start.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use tokio::time::Instant;

use super::connection::{
    CloseReason, ConnKey, ConnShared, ConnState, Connection, ConnectionActor, ConnectionArgs,
    ConnectionMsg, HealthPolicy, StartFailure,
};
use super::credential::{CredentialError, CredentialHandle};
use super::fairness::{MAX_ARGUMENT_DEPTH, UserCallLimiter, arguments_depth};
use crate::config::{Config, PoolConfig, SandboxConfig, ServerConfig};
use crate::mcp::{McpError, ProcessRegistry, Sandbox, ServerLaunch, base_environment};
use crate::oauth::{Freshness, TokenRefresher};
use crate::store::{ServerName, UserId};

/// Why the pool could not serve a request. Cheap to clone: one failed start answers every
/// request that waited for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    #[error("unknown server `{0}`")]
    UnknownServer(ServerName),
    #[error("no credentials stored for server `{0}`")]
    NoCredentials(ServerName),
    #[error("credentials unavailable: {0}")]
    Credentials(Arc<CredentialError>),
    #[error("connection pool is full; retry in {}s", retry_after.as_secs().max(1))]
    PoolFull { retry_after: Duration },
    #[error("server keeps crashing; new sessions refused for {}s", retry_after.as_secs().max(1))]
    CircuitOpen { retry_after: Duration },
    #[error("MCP server failed to start: {0}")]
    StartFailed(Arc<McpError>),
    /// The server's configured program is not installed (or not executable) on this host.
    #[error("MCP server `{server}` cannot start: {problem}")]
    ServerProgramNotFound {
        server: ServerName,
        /// What is wrong, naming the program (e.g. "program `pipx` was not found in PATH").
        problem: String,
    },
    /// The user already has `pool.max_in_flight_per_user` calls in flight.
    #[error("too many tool calls in flight for this user; retry in {}s", retry_after.as_secs().max(1))]
    TooManyCalls { retry_after: Duration },
    /// The arguments nest deeper than [`MAX_ARGUMENT_DEPTH`]; nothing was sent.
    #[error("tool arguments nest deeper than {max} levels")]
    ArgumentsTooDeep { max: usize },
    #[error("MCP server exited during the call; it may or may not have run, and is not retried")]
    ServerCrashed,
    /// The kernel killed the server at its memory limit (`sandbox.memory_max`) during the call.
    #[error(
        "MCP server was killed for exceeding its memory limit of {} MiB during the call; it restarts on the next request",
        .0 / (1024 * 1024)
    )]
    MemoryLimit(u64),
    /// The server must run confined (`sandbox.mode = "enforce"`) and this host cannot.
    #[error("MCP server refused to start: {0}")]
    SandboxUnavailable(String),
    #[error("tool call timed out after {0:?}; the request was cancelled")]
    CallTimeout(Duration),
    #[error("unknown tool `{0}`")]
    UnknownTool(String),
    #[error("MCP error: {0}")]
    Mcp(Arc<McpError>),
    /// The session was closed before the call reached the server (it started closing, or
    /// its transport was already gone); `PoolHandle::call_tool` retries it once.
    #[error("connection was closed before the call; fetch a fresh one")]
    Reconnect,
    #[error("the pool is shutting down")]
    ShuttingDown,
    #[error("the pool is not running")]
    Unavailable,
}

impl PoolError {
    /// A credential problem as the pool reports it: no stored credentials are their own case.
    pub(crate) fn from_credentials(err: CredentialError) -> PoolError {
        match err {
            CredentialError::NotFound(server) => PoolError::NoCredentials(server),
            other => PoolError::Credentials(Arc::new(other)),
        }
    }

    /// The stable, machine-readable code of this error, the one mapping shared by the HTTP
    /// error body and the chat trace (`tests/error_codes.rs` holds HTTP to it), so a revoked
    /// grant is `reconnect_required` for every caller.
    pub fn code(&self) -> &'static str {
        match self {
            PoolError::UnknownServer(_) => "unknown_server",
            PoolError::NoCredentials(_) => "no_credentials",
            PoolError::Credentials(cause) => cause.code(),
            PoolError::PoolFull { .. } => "pool_full",
            PoolError::CircuitOpen { .. } => "circuit_open",
            PoolError::StartFailed(_) => "server_start_failed",
            PoolError::ServerProgramNotFound { .. } => "server_program_not_found",
            PoolError::TooManyCalls { .. } => "too_many_calls",
            PoolError::ArgumentsTooDeep { .. } => "arguments_too_deep",
            PoolError::ServerCrashed => "server_crashed",
            PoolError::MemoryLimit(_) => "server_memory_limit",
            PoolError::SandboxUnavailable(_) => "sandbox_unavailable",
            PoolError::CallTimeout(_) => "call_timeout",
            PoolError::UnknownTool(_) => "unknown_tool",
            PoolError::Mcp(cause) => mcp_code(cause),
            PoolError::Reconnect => "reconnect",
            PoolError::ShuttingDown => "shutting_down",
            PoolError::Unavailable => "pool_unavailable",
        }
    }
}

/// The code of an MCP error met during a call, by its cause.
fn mcp_code(err: &McpError) -> &'static str {
    match err {
        McpError::Server(data) if data.code == rmcp::model::ErrorCode::INVALID_PARAMS => {
            "invalid_arguments"
        }
        McpError::Server(data) if data.code == rmcp::model::ErrorCode::METHOD_NOT_FOUND => {
            "unknown_tool"
        }
        McpError::Server(_) => "server_error",
        McpError::Timeout(_) => "call_timeout",
        McpError::Closed => "server_crashed",
        McpError::NotSent => "reconnect",
        McpError::Spawn { .. }
        | McpError::StartupTimeout(_)
        | McpError::Handshake(_)
        | McpError::Registry { .. }
        | McpError::Sandbox(_)
        | McpError::DemoServer(_) => "server_start_failed",
        McpError::Protocol(_) => "server_protocol_error",
    }
}

/// How one connection looks in [`PoolStats`].
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ConnectionStats {
    pub user_id: UserId,
    pub server: ServerName,
    pub state: ConnState,
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
    pub connections: Vec<ConnectionStats>,
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

type ConnReply = RpcReplyPort<Result<Connection, PoolError>>;

/// Messages of the [`PoolSupervisor`]; use [`PoolHandle`] rather than sending them.
pub enum PoolMsg {
    GetConnection {
        key: ConnKey,
        /// The pid of a session the caller found dead before its request was written: if the
        /// key still shows it as ready, the caller waits for its restart instead.
        stale: Option<u32>,
        reply: ConnReply,
    },
    /// Start the sessions of `keys` that are not live, answering at once with what each key
    /// is doing (nobody waits for the starts).
    Warm {
        keys: Vec<ConnKey>,
        reply: RpcReplyPort<Vec<Result<Warmed, PoolError>>>,
    },
    /// A `ConnectionActor` finished starting.
    Ready {
        actor: ActorId,
        connection: Connection,
    },
    /// Backoff elapsed: start the key again.
    Restart {
        key: ConnKey,
    },
    Close {
        key: ConnKey,
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
    /// Stop taking work and close every connection; replies with how many were closed.
    Shutdown {
        reply: RpcReplyPort<usize>,
    },
    /// `key`'s tokens were refreshed and its server reads them only at start-up: restart its
    /// session between calls, never during one.
    RestartAfterRefresh {
        key: ConnKey,
        reply: RpcReplyPort<RefreshRestart>,
    },
    /// The last call in flight on `key`'s session ended (sent by a watcher that
    /// `RestartAfterRefresh` armed).
    CallsEnded {
        key: ConnKey,
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

/// Ready connections by key, readable without the supervisor: a warm `get_connection` is a
/// read lock and a hash lookup rather than a mailbox round trip. Only the supervisor writes it;
/// a fresh supervisor starts it empty.
#[derive(Clone, Default)]
pub struct PoolIndex(Arc<std::sync::RwLock<HashMap<ConnKey, Arc<ConnShared>>>>);

impl PoolIndex {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<ConnKey, Arc<ConnShared>>> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<ConnKey, Arc<ConnShared>>> {
        self.0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Forgets every connection (their supervisor is gone).
    pub(crate) fn clear(&self) {
        self.write().clear();
    }

    /// The connection of `key` if it is ready now.
    fn ready(&self, key: &ConnKey) -> Option<Connection> {
        let shared = self.read().get(key)?.clone();
        if shared.state() != ConnState::Ready {
            return None;
        }
        let client = shared.client()?;
        Some(Connection::new(shared, client))
    }
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
}

impl PoolArgs {
    pub fn from_config(
        config: &Config,
        credentials: CredentialHandle,
        refresher: Option<TokenRefresher>,
        registry: Option<ProcessRegistry>,
        sandbox: Arc<Sandbox>,
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
        }
    }
}

/// Per-key bookkeeping of the supervisor.
struct Entry {
    shared: Arc<ConnShared>,
    actor: Option<ActorRef<ConnectionMsg>>,
    waiters: Vec<ConnReply>,
    /// Failures (crashes and failed starts) inside the restart window.
    failures: VecDeque<Instant>,
    /// Set while the key is refused after too many failures.
    failed_until: Option<Instant>,
    /// Whether this key has ever been ready: only those restart in the background.
    ever_ready: bool,
    /// Set while the session must restart after a token refresh, once no call is in flight.
    restart_pending: bool,
}

impl Entry {
    /// No process, none coming, not refused: only failure history is kept.
    fn is_dormant(&self) -> bool {
        self.actor.is_none()
            && self.failed_until.is_none()
            && self.shared.state() != ConnState::Restarting
    }

    /// Whether `actor` is this key's current incarnation.
    fn runs(&self, actor: ActorId) -> bool {
        self.actor.as_ref().is_some_and(|a| a.get_id() == actor)
    }
}

pub struct PoolState {
    args: PoolArgs,
    entries: HashMap<ConnKey, Entry>,
    by_actor: HashMap<ActorId, ConnKey>,
    shutting_down: bool,
    counters: PoolCounters,
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
        Ok(PoolState {
            args,
            entries: HashMap::new(),
            by_actor: HashMap::new(),
            shutting_down: false,
            counters: PoolCounters::default(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<PoolMsg>,
        message: PoolMsg,
        state: &mut PoolState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            PoolMsg::GetConnection { key, stale, reply } => {
                let _ = state.get_connection(&myself, key, stale, Some(reply)).await;
            }
            PoolMsg::Warm { keys, reply } => {
                let mut outcomes = Vec::with_capacity(keys.len());
                for key in keys {
                    outcomes.push(state.get_connection(&myself, key, None, None).await);
                }
                let _ = reply.send(outcomes);
            }
            PoolMsg::Ready { actor, connection } => state.on_ready(&myself, actor, connection),
            PoolMsg::Restart { key } => state.on_restart(&myself, key).await,
            PoolMsg::Close { key, reply } => {
                let _ = reply.send(state.close(&key, CloseReason::Requested));
            }
            PoolMsg::CloseUser { user, reply } => {
                let keys: Vec<ConnKey> = state
                    .entries
                    .keys()
                    .filter(|k| k.user == user)
                    .cloned()
                    .collect();
                let closed = keys
                    .iter()
                    .filter(|key| state.close(key, CloseReason::Requested))
                    .count();
                let _ = reply.send(closed);
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
            PoolMsg::CallsEnded { key } => {
                if state
                    .entries
                    .get(&key)
                    .is_some_and(|entry| entry.restart_pending)
                {
                    state.restart_after_refresh(&myself, &key);
                }
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
                let Some(key) = state.by_actor.remove(&actor) else {
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
                if let Some(key) = state.by_actor.remove(&cell.get_id()) {
                    state.on_terminated(&key, cell.get_id());
                }
            }
            _ => {}
        }
        Ok(())
    }
}

// === impl PoolState ===

fn full_jitter(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .saturating_mul(2u32.saturating_pow(attempt.min(20)))
        .min(cap);
    let millis = ceiling.as_millis().max(1) as u64;
    Duration::from_millis(rand::random_range(0..=millis))
}

impl PoolState {
    /// Drops `key` from the map and from the handles' index.
    fn forget(&mut self, key: &ConnKey) {
        self.entries.remove(key);
        self.args.index.write().remove(key);
    }

    fn server_config(&self, server: &ServerName) -> Option<&ServerConfig> {
        self.args.servers.get(server.as_str())
    }

    fn live_count(&self, user: Option<&UserId>) -> usize {
        self.entries
            .iter()
            .filter(|(key, entry)| {
                entry.actor.is_some()
                    && entry.shared.state() != ConnState::Closing
                    && user.is_none_or(|u| &key.user == u)
            })
            .count()
    }

    /// Closes the least recently used idle connection (of `user`, if given) to make room.
    fn evict_lru(&mut self, user: Option<&UserId>) -> bool {
        let victim = self
            .entries
            .iter()
            .filter(|(key, entry)| {
                entry.actor.is_some()
                    && entry.shared.state() == ConnState::Ready
                    && entry.shared.in_flight() == 0
                    && user.is_none_or(|u| &key.user == u)
            })
            .max_by_key(|(_, entry)| entry.shared.idle_for())
            .map(|(key, _)| key.clone());
        match victim {
            Some(key) => {
                tracing::info!(user_id = %key.user, server = %key.server, "Evicting least recently used connection {key}");
                self.counters.evicted += 1;
                self.close(&key, CloseReason::Evicted)
            }
            None => false,
        }
    }

    fn make_room(&mut self, user: &UserId) -> Result<(), PoolError> {
        let pool = &self.args.pool;
        let (max_user, max_all) = (pool.max_connections_per_user, pool.max_connections);
        let full = || PoolError::PoolFull {
            retry_after: Duration::from_secs(5),
        };
        if self.live_count(Some(user)) >= max_user && !self.evict_lru(Some(user)) {
            return Err(full());
        }
        if self.live_count(None) >= max_all && !self.evict_lru(None) {
            return Err(full());
        }
        Ok(())
    }

    /// Answers `reply` with `key`'s connection (now, or once its start ends), starting it if
    /// nothing is live. Without `reply` (warm-up) only the start is made. Returns what it found
    /// or did; an error is also sent to `reply`.
    async fn get_connection(
        &mut self,
        myself: &ActorRef<PoolMsg>,
        key: ConnKey,
        stale: Option<u32>,
        reply: Option<ConnReply>,
    ) -> Result<Warmed, PoolError> {
        let refuse = |reply: Option<ConnReply>, err: PoolError| {
            if let Some(reply) = reply {
                let _ = reply.send(Err(err.clone()));
            }
            Err(err)
        };
        if self.shutting_down {
            return refuse(reply, PoolError::ShuttingDown);
        }
        if self.server_config(&key.server).is_none() {
            return refuse(reply, PoolError::UnknownServer(key.server));
        }
        let now = Instant::now();
        if let Some(entry) = self.entries.get_mut(&key) {
            if let Some(until) = entry.failed_until {
                if now < until {
                    let retry_after = until - now;
                    return refuse(reply, PoolError::CircuitOpen { retry_after });
                }
                // Cool-down over: this request is the one probe start.
                tracing::info!(user_id = %key.user, server = %key.server, "Cool-down over; probing {key}");
                entry.failed_until = None;
                entry.failures.clear();
            }
            match (entry.shared.state(), &entry.actor) {
                (ConnState::Ready, Some(_)) => {
                    let client = entry.shared.client();
                    if let (Some(pid), Some(actor)) = (stale, &entry.actor)
                        && client.as_ref().map(|c| c.pid()) == Some(pid)
                    {
                        // A request could not be written to it: nobody else should get this
                        // session either. Killing it (a no-op for a group already dead) makes
                        // sure its end arrives as `Ended`, whose crash handling restarts the key
                        // and then answers this waiter, even for a server that closed its stdin
                        // and lingers.
                        entry.shared.set_state(ConnState::Restarting);
                        entry.waiters.extend(reply);
                        let _ = actor.send_message(ConnectionMsg::Unresponsive { pid });
                        return Ok(Warmed::Starting);
                    }
                    match (client, reply) {
                        (Some(client), Some(reply)) => {
                            let _ = reply.send(Ok(Connection::new(entry.shared.clone(), client)));
                        }
                        (Some(_), None) => {}
                        (None, reply) => {
                            entry.waiters.extend(reply);
                            return Ok(Warmed::Starting);
                        }
                    }
                    return Ok(Warmed::Ready);
                }
                (ConnState::Starting | ConnState::Restarting, _) => {
                    entry.waiters.extend(reply);
                    // A restart is already scheduled, or a start is running.
                    if entry.actor.is_some() || entry.ever_ready {
                        return Ok(Warmed::Starting);
                    }
                }
                _ => entry.waiters.extend(reply),
            }
        } else {
            let shared = ConnShared::new(key.clone(), self.args.pool.call_timeout);
            self.args.index.write().insert(key.clone(), shared.clone());
            self.entries.insert(
                key.clone(),
                Entry {
                    shared,
                    actor: None,
                    waiters: reply.into_iter().collect(),
                    failures: VecDeque::new(),
                    failed_until: None,
                    ever_ready: false,
                    restart_pending: false,
                },
            );
        }
        // A closing actor of this key may still be shutting down; a new one takes its place.
        if let Err(err) = self.make_room(&key.user) {
            self.fail_waiters(&key, err.clone());
            return Err(err);
        }
        self.start(myself, &key).await;
        Ok(Warmed::Started)
    }

    /// Spawns a `ConnectionActor` for `key`. Fast: the actor connects in a task of its own.
    async fn start(&mut self, myself: &ActorRef<PoolMsg>, key: &ConnKey) {
        let Some(server) = self.server_config(&key.server).cloned() else {
            return;
        };
        let mut env = base_environment(&server.env_passthrough);
        env.extend(server.env.clone());
        // Checked before every spawn, with the server's own PATH: a missing program is a
        // configuration problem, reported as such and not counted as a crash (nothing ran).
        let launch = match server.resolve_program_in(env.get("PATH").map(std::ffi::OsStr::new)) {
            Ok(command) => ServerLaunch {
                command: command.to_string_lossy().into_owned(),
                args: server.args.clone(),
                env,
                cwd: None,
            },
            Err(err) => {
                tracing::debug!(server = %key.server, cause = %err, "MCP server program not found");
                // Like missing credentials: not retried in the background. A key whose restart
                // found the program gone must not stay "restarting" with nothing scheduled, or
                // its next request would wait for a start that never comes.
                if let Some(entry) = self.entries.get_mut(key) {
                    entry.ever_ready = false;
                    if entry.shared.state() == ConnState::Restarting {
                        entry.shared.set_state(ConnState::Starting);
                    }
                }
                self.fail_waiters(
                    key,
                    PoolError::ServerProgramNotFound {
                        server: key.server.clone(),
                        problem: err.to_string(),
                    },
                );
                return;
            }
        };
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        let restarting = entry.shared.state() == ConnState::Restarting;
        if !restarting {
            entry.shared.set_state(ConnState::Starting);
        }
        // This incarnation reads the tokens as they are now: no restart for an earlier refresh.
        entry.restart_pending = false;
        let args = ConnectionArgs {
            shared: entry.shared.clone(),
            launch,
            sandbox: self.args.sandbox.clone(),
            policy: server.sandbox_policy(&self.args.sandbox_defaults),
            restarting,
            credentials_env: server.credentials_env.clone(),
            credentials: self.args.credentials.clone(),
            refresher: self.args.refresher.clone(),
            registry: self.args.registry.clone(),
            startup_timeout: self.args.pool.startup_timeout,
            start_slots: self.args.start_slots.clone(),
            health: HealthPolicy {
                interval: self.args.pool.health_interval,
                ping_timeout: self.args.pool.ping_timeout,
            },
            close_grace: self.args.pool.close_grace,
            pool: myself.clone(),
        };
        match Actor::spawn_linked(None, ConnectionActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.counters.spawns += 1;
                self.by_actor.insert(actor.get_id(), key.clone());
                if let Some(entry) = self.entries.get_mut(key) {
                    entry.actor = Some(actor);
                }
            }
            Err(err) => {
                tracing::error!(cause = %err, "cannot spawn a connection actor for {key}");
                self.fail_waiters(key, PoolError::Unavailable);
            }
        }
    }

    fn fail_waiters(&mut self, key: &ConnKey, err: PoolError) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        for waiter in entry.waiters.drain(..) {
            let _ = waiter.send(Err(err.clone()));
        }
        // The entry stays, dormant, so its failure history can trip the circuit; the reaper
        // forgets it once that history is old.
    }

    fn entry_of(&mut self, actor: ActorId) -> Option<(&ConnKey, &mut Entry)> {
        let key = self.by_actor.get(&actor)?;
        let entry = self.entries.get_mut(key)?;
        entry.runs(actor).then_some((key, entry))
    }

    fn on_ready(&mut self, myself: &ActorRef<PoolMsg>, actor: ActorId, connection: Connection) {
        let Some((key, entry)) = self.entry_of(actor) else {
            return;
        };
        entry.ever_ready = true;
        for waiter in entry.waiters.drain(..) {
            let _ = waiter.send(Ok(connection.clone()));
        }
        // Tokens were refreshed while this session started: it may have read the old ones.
        if entry.restart_pending {
            let key = key.clone();
            self.restart_after_refresh(myself, &key);
        }
    }

    /// Records a failure; returns the backoff before the next attempt, or `None` when the key
    /// just exceeded its intensity and is now refused for the cool-down.
    fn record_failure(&mut self, key: &ConnKey) -> Option<Duration> {
        let pool = &self.args.pool;
        let entry = self.entries.get_mut(key)?;
        let now = Instant::now();
        entry.failures.push_back(now);
        while entry
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > pool.restart_window)
        {
            entry.failures.pop_front();
        }
        let attempts = entry.failures.len() as u32;
        if attempts > pool.max_restarts {
            entry.failed_until = Some(now + pool.failed_cooldown);
            entry.shared.set_state(ConnState::Failed);
            tracing::error!(
                user_id = %key.user, server = %key.server, attempts,
                "Connection {key} failed {attempts} times within {:?}; refusing it for {:?}",
                pool.restart_window, pool.failed_cooldown
            );
            return None;
        }
        Some(full_jitter(
            pool.restart_backoff_base,
            pool.restart_backoff_cap,
            attempts.saturating_sub(1),
        ))
    }

    fn on_start_failed(
        &mut self,
        myself: &ActorRef<PoolMsg>,
        key: ConnKey,
        actor: ActorId,
        error: PoolError,
    ) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        if !entry.runs(actor) {
            return;
        }
        entry.actor = None;
        // Configuration problems are not crashes: report them, do not count or retry them.
        if matches!(
            error,
            PoolError::NoCredentials(_) | PoolError::Credentials(_)
        ) {
            if let Some(entry) = self.entries.get_mut(&key) {
                entry.ever_ready = false;
            }
            self.fail_waiters(&key, error);
            return;
        }
        let backoff = self.record_failure(&key);
        let ever_ready = self.entries.get(&key).is_some_and(|e| e.ever_ready);
        match backoff {
            Some(delay) if ever_ready => self.schedule_restart(myself, &key, delay),
            Some(_) => self.fail_waiters(&key, error),
            None => self.fail_waiters(&key, error),
        }
    }

    fn on_crash(&mut self, myself: &ActorRef<PoolMsg>, key: ConnKey, actor: ActorId, cause: &str) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        if !entry.runs(actor) {
            return;
        }
        entry.actor = None;
        if self.shutting_down {
            self.forget(&key);
            return;
        }
        tracing::warn!(user_id = %key.user, server = %key.server, cause, "Connection {key} crashed");
        match self.record_failure(&key) {
            Some(delay) => self.schedule_restart(myself, &key, delay),
            None => {
                let retry_after = self.args.pool.failed_cooldown;
                self.fail_waiters(&key, PoolError::CircuitOpen { retry_after });
            }
        }
    }

    fn schedule_restart(&mut self, myself: &ActorRef<PoolMsg>, key: &ConnKey, delay: Duration) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        entry.shared.set_state(ConnState::Restarting);
        entry.shared.count_restart();
        self.counters.restarts += 1;
        let attempt = entry.failures.len();
        tracing::warn!(
            user_id = %key.user, server = %key.server, attempt, backoff_ms = delay.as_millis() as u64,
            "Restarting MCP connection {key} (attempt {attempt}) in {delay:?}"
        );
        let key = key.clone();
        myself.send_after(delay, move || PoolMsg::Restart { key });
    }

    async fn on_restart(&mut self, myself: &ActorRef<PoolMsg>, key: ConnKey) {
        let Some(entry) = self.entries.get(&key) else {
            return;
        };
        if self.shutting_down
            || entry.actor.is_some()
            || entry.shared.state() != ConnState::Restarting
        {
            return;
        }
        self.start(myself, &key).await;
    }

    fn on_terminated(&mut self, key: &ConnKey, actor: ActorId) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        // A closed actor's key may already hold a newer incarnation: leave that alone.
        if !entry.runs(actor) {
            return;
        }
        entry.actor = None;
        if entry.failed_until.is_none() && entry.shared.state() != ConnState::Restarting {
            let waiters = std::mem::take(&mut entry.waiters);
            self.forget(key);
            for waiter in waiters {
                let _ = waiter.send(Err(PoolError::Reconnect));
            }
        }
    }

    /// Starts closing `key`'s connection; returns whether there was a live one.
    fn close(&mut self, key: &ConnKey, reason: CloseReason) -> bool {
        let Some(entry) = self.entries.get_mut(key) else {
            return false;
        };
        let Some(actor) = entry.actor.take() else {
            // Nothing running (failed or awaiting a restart): forget the key.
            self.forget(key);
            return false;
        };
        entry.shared.set_state(ConnState::Closing);
        let waiters = std::mem::take(&mut entry.waiters);
        self.forget(key);
        for waiter in waiters {
            let _ = waiter.send(Err(PoolError::Reconnect));
        }
        // by_actor keeps the id until ActorTerminated, so that event is recognised and ignored.
        let _ = actor.send_message(ConnectionMsg::Close {
            reason,
            reply: None,
        });
        true
    }

    /// Restarts `key`'s session after a token refresh, between calls: closes it now if it is
    /// ready with no call in flight (the `try_begin_close` handshake the idle reaper uses, so a
    /// call and this close never both proceed); otherwise marks it and closes it when the last
    /// call in flight ends (a watcher sends `CallsEnded`) or when a starting session is ready.
    fn restart_after_refresh(
        &mut self,
        myself: &ActorRef<PoolMsg>,
        key: &ConnKey,
    ) -> RefreshRestart {
        let Some(entry) = self.entries.get_mut(key) else {
            return RefreshRestart::NotLive;
        };
        if entry.actor.is_none() {
            return RefreshRestart::NotLive;
        }
        match entry.shared.state() {
            ConnState::Ready if entry.shared.try_begin_close() => {
                entry.restart_pending = false;
                tracing::info!(user_id = %key.user, server = %key.server, "Restarting the session after a token refresh");
                self.close(key, CloseReason::Requested);
                RefreshRestart::Now
            }
            ConnState::Ready => {
                entry.restart_pending = true;
                // Woken by the last call's end, not by polling; a call ends within its timeout.
                let (shared, myself, key) = (entry.shared.clone(), myself.clone(), key.clone());
                tokio::spawn(async move {
                    shared.calls_ended().await;
                    let _ = myself.send_message(PoolMsg::CallsEnded { key });
                });
                RefreshRestart::AfterCalls
            }
            ConnState::Starting => {
                entry.restart_pending = true;
                RefreshRestart::AfterCalls
            }
            ConnState::Restarting | ConnState::Failed | ConnState::Closing => {
                RefreshRestart::NotLive
            }
        }
    }

    fn reap_idle(&mut self) -> usize {
        let idle_timeout = self.args.pool.idle_timeout;
        let idle: Vec<ConnKey> = self
            .entries
            .iter()
            .filter(|(_, entry)| {
                entry.actor.is_some()
                    && entry.shared.idle_for() > idle_timeout
                    && entry.shared.try_begin_close()
            })
            .map(|(key, _)| key.clone())
            .collect();
        self.counters.reaped += idle.len() as u64;
        for key in &idle {
            self.close(key, CloseReason::Idle);
            tracing::info!(user_id = %key.user, server = %key.server, "Cleaned up idle connection: {key}");
        }
        // Failed keys whose cool-down is long over are forgotten, so the map does not grow.
        let now = Instant::now();
        self.entries.retain(|_, entry| {
            entry.actor.is_some()
                || !entry.waiters.is_empty()
                || entry.shared.state() == ConnState::Restarting
                || entry
                    .failed_until
                    .is_some_and(|until| until + idle_timeout > now)
        });
        self.args
            .index
            .write()
            .retain(|key, _| self.entries.contains_key(key));
        tracing::info!(
            count = idle.len(),
            "Cleaned up {} idle MCP connections",
            idle.len()
        );
        idle.len()
    }

    fn stats(&self) -> PoolStats {
        let mut connections: Vec<ConnectionStats> = self
            .entries
            .iter()
            .filter(|(_, entry)| !entry.is_dormant())
            .map(|(key, entry)| ConnectionStats {
                user_id: key.user.clone(),
                server: key.server.clone(),
                state: entry.shared.state(),
                pid: entry.shared.pid().filter(|_| entry.actor.is_some()),
                tool_count: entry.shared.tool_count(),
                restarts: entry.shared.restarts(),
                started_at: entry.shared.started_at(),
                last_used: entry.shared.last_used(),
                last_health_check: entry.shared.last_health_check(),
                in_flight: entry.shared.in_flight(),
                sandbox: entry.shared.sandbox().map(|status| status.to_string()),
            })
            .collect();
        connections.sort_by(|a, b| (&a.user_id, &a.server).cmp(&(&b.user_id, &b.server)));
        let live: Vec<&ConnectionStats> = connections
            .iter()
            .filter(|c| c.state != ConnState::Failed)
            .collect();
        let mut user_breakdown = std::collections::BTreeMap::new();
        for conn in &live {
            *user_breakdown.entry(conn.user_id.to_string()).or_insert(0) += 1;
        }
        PoolStats {
            total_connections: live.len(),
            active_connections: live.iter().filter(|c| c.state == ConnState::Ready).count(),
            user_breakdown,
            connections,
            counters: self.counters,
        }
    }

    fn shutdown(&mut self, reply: RpcReplyPort<usize>) {
        self.shutting_down = true;
        let mut closing = Vec::new();
        self.args.index.write().clear();
        for (key, mut entry) in self.entries.drain() {
            for waiter in entry.waiters.drain(..) {
                let _ = waiter.send(Err(PoolError::ShuttingDown));
            }
            if let Some(actor) = entry.actor.take() {
                entry.shared.set_state(ConnState::Closing);
                closing.push((key, actor));
            }
        }
        let count = closing.len();
        // Closing takes up to the grace periods; run it off the mailbox.
        tokio::spawn(async move {
            let closes = closing.into_iter().map(|(key, actor)| async move {
                let closed = actor
                    .call(
                        |reply| ConnectionMsg::Close {
                            reason: CloseReason::Shutdown,
                            reply: Some(reply),
                        },
                        None,
                    )
                    .await;
                if closed.is_err() {
                    tracing::warn!("connection {key} was already gone at shutdown");
                }
            });
            futures_join_all(closes).await;
            tracing::info!(count, "Closed {count} MCP connections");
            let _ = reply.send(count);
        });
    }
}

async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl IntoIterator<Item = F>,
) {
    let mut set = tokio::task::JoinSet::new();
    for future in futures {
        set.spawn(future);
    }
    while set.join_next().await.is_some() {}
}

// === PoolHandle ===

/// Typed handle to the pool; cheap to clone. Survives a restart of the supervisor (see
/// [`super::guardian`]): it reads the current supervisor from a shared slot.
#[derive(Clone)]
pub struct PoolHandle {
    slot: Arc<std::sync::RwLock<ActorRef<PoolMsg>>>,
    index: PoolIndex,
    /// The `PoolGuardian`: once it has given up, no supervisor will come back.
    guardian: ActorCell,
    refresher: Option<TokenRefresher>,
    user_calls: UserCallLimiter,
}

impl PoolHandle {
    pub(crate) fn new(
        slot: Arc<std::sync::RwLock<ActorRef<PoolMsg>>>,
        args: &PoolArgs,
        guardian: ActorCell,
    ) -> PoolHandle {
        PoolHandle {
            slot,
            index: args.index.clone(),
            guardian,
            refresher: args.refresher.clone(),
            user_calls: args.user_calls.clone(),
        }
    }

    /// The token refresher the pool consults (its OAuth providers serve the connect flow too).
    pub fn refresher(&self) -> Option<&TokenRefresher> {
        self.refresher.as_ref()
    }

    /// Whether the pool can take requests now: its guardian runs and so does the current
    /// supervisor (false for the moment between a supervisor's failure and its replacement,
    /// and for good once the guardian gave up).
    pub fn is_available(&self) -> bool {
        let running = |cell: &ActorCell| cell.get_status() == ractor::ActorStatus::Running;
        running(&self.guardian) && running(&self.actor().get_cell())
    }

    fn actor(&self) -> ActorRef<PoolMsg> {
        self.slot
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn supervisor_cell(&self) -> ActorCell {
        self.actor().get_cell()
    }

    async fn ask<T: Send + 'static>(
        &self,
        build: impl FnOnce(RpcReplyPort<T>) -> PoolMsg,
    ) -> Result<T, PoolError> {
        match self.actor().call(build, None).await {
            Ok(ractor::rpc::CallResult::Success(value)) => Ok(value),
            _ => Err(PoolError::Unavailable),
        }
    }

    /// A ready connection for (user, server), starting the server only if none is live.
    pub async fn get_connection(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<Connection, PoolError> {
        let key = ConnKey {
            user: user.clone(),
            server: server.clone(),
        };
        if let Some(connection) = self.index.ready(&key) {
            return Ok(connection);
        }
        self.fetch_connection(key, None).await
    }

    /// Asks the supervisor for `key`'s connection; with `stale`, not the session of that pid.
    async fn fetch_connection(
        &self,
        key: ConnKey,
        stale: Option<u32>,
    ) -> Result<Connection, PoolError> {
        // A connection reaped between lookup and use is fetched again, once.
        for _ in 0..2 {
            let key = key.clone();
            match self
                .ask(|reply| PoolMsg::GetConnection { key, stale, reply })
                .await?
            {
                Err(PoolError::Reconnect) => continue,
                other => return other,
            }
        }
        Err(PoolError::Reconnect)
    }

    /// Starts, in the background, the sessions of `user` on `servers` that are not live, and
    /// answers at once with what each key is doing (in the order given).
    pub async fn warm(
        &self,
        user: &UserId,
        servers: &[ServerName],
    ) -> Result<Vec<Result<Warmed, PoolError>>, PoolError> {
        let keys = servers
            .iter()
            .map(|server| ConnKey::new(user, server))
            .collect();
        self.ask(|reply| PoolMsg::Warm { keys, reply }).await
    }

    /// The cached tool list; a restart in progress is waited for transparently. OAuth tokens
    /// due for a refresh are refreshed first.
    pub async fn list_tools(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<Arc<Vec<rmcp::model::Tool>>, PoolError> {
        self.ensure_fresh(user, server).await?;
        Ok(self.get_connection(user, server).await?.tools())
    }

    /// Calls a tool, after refreshing OAuth tokens due for a refresh (an in-memory check when
    /// none is). Retried only if the connection was closed before the call was sent.
    /// Refused at once, before anything starts, when the arguments nest deeper than
    /// [`MAX_ARGUMENT_DEPTH`] or the user already has `pool.max_in_flight_per_user` calls in
    /// flight.
    pub async fn call_tool(
        &self,
        user: &UserId,
        server: &ServerName,
        tool: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<rmcp::model::CallToolResult, PoolError> {
        if arguments_depth(arguments.as_ref()) > MAX_ARGUMENT_DEPTH {
            return Err(PoolError::ArgumentsTooDeep {
                max: MAX_ARGUMENT_DEPTH,
            });
        }
        // Held until the call returns (or its future is dropped).
        let _permit = self
            .user_calls
            .try_acquire(user)
            .ok_or(PoolError::TooManyCalls {
                retry_after: Duration::from_secs(1),
            })?;
        self.ensure_fresh(user, server).await?;
        let connection = self.get_connection(user, server).await?;
        let Some(slot) = connection.reserve() else {
            // It started closing, and the pool no longer hands it out.
            return self.retry_call(user, server, None, tool, arguments).await;
        };
        match connection
            .call_reserved(slot, tool, arguments.clone())
            .await
        {
            // A call that never reached the server is tried again, once, on another session;
            // one that may have run reports `ServerCrashed` (a tool need not be idempotent).
            Err(PoolError::Reconnect) => {
                // The session is broken (its transport closed, or a write to the server
                // failed): the retry must not be handed the same session back.
                self.retry_call(user, server, Some(connection.pid()), tool, arguments)
                    .await
            }
            other => other,
        }
    }

    /// The one retry of [`PoolHandle::call_tool`], on a session other than `stale`'s.
    async fn retry_call(
        &self,
        user: &UserId,
        server: &ServerName,
        stale: Option<u32>,
        tool: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<rmcp::model::CallToolResult, PoolError> {
        tracing::debug!(user_id = %user, server = %server, ?stale, "retrying a call that was not sent");
        let connection = self
            .fetch_connection(ConnKey::new(user, server), stale)
            .await?;
        let slot = connection.reserve().ok_or(PoolError::Reconnect)?;
        connection.call_reserved(slot, tool, arguments).await
    }

    pub async fn close_connection(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<bool, PoolError> {
        let key = ConnKey {
            user: user.clone(),
            server: server.clone(),
        };
        self.ask(|reply| PoolMsg::Close { key, reply }).await
    }

    // === token freshness ===

    /// Before a session is used: refreshes its OAuth tokens if they expire within the server's
    /// `refresh_before`. Cheap when they do not (no database read, no message).
    async fn ensure_fresh(&self, user: &UserId, server: &ServerName) -> Result<(), PoolError> {
        let Some(refresher) = &self.refresher else {
            return Ok(());
        };
        let checked = refresher.ensure_fresh(user, server).await;
        self.settle_freshness(user, server, checked).await?;
        Ok(())
    }

    /// The background sweep's check of one live session: always reads the row, and acts on
    /// the outcome like a call would.
    pub async fn refresh_now(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<Freshness, PoolError> {
        let Some(refresher) = &self.refresher else {
            return Ok(Freshness::Unmanaged);
        };
        let checked = refresher.check_now(user, server).await;
        self.settle_freshness(user, server, checked).await
    }

    /// What a freshness check means for the session: a server that reads its token only at
    /// start-up is restarted between calls after a refresh (the first attempt before this
    /// returns, so the caller's own call runs on the new session when nothing else is in
    /// flight); a revoked grant closes the session, which must not go on with the old token.
    async fn settle_freshness(
        &self,
        user: &UserId,
        server: &ServerName,
        checked: Result<Freshness, CredentialError>,
    ) -> Result<Freshness, PoolError> {
        match checked {
            Ok(fresh @ (Freshness::Refreshed | Freshness::RefreshedElsewhere))
                if self
                    .refresher
                    .as_ref()
                    .is_some_and(|r| r.restarts_on_refresh(server)) =>
            {
                let key = ConnKey::new(user, server);
                if let Err(err) = self
                    .ask(|reply| PoolMsg::RestartAfterRefresh { key, reply })
                    .await
                {
                    tracing::warn!(cause = %err, "could not restart the session after a token refresh");
                }
                Ok(fresh)
            }
            Ok(fresh) => Ok(fresh),
            Err(err) => {
                if matches!(err, CredentialError::ReconnectRequired(_))
                    && let Err(close) = self.close_connection(user, server).await
                {
                    tracing::warn!(cause = %close, "could not close the session after invalid_grant");
                }
                Err(PoolError::from_credentials(err))
            }
        }
    }

    pub async fn close_user_connections(&self, user: &UserId) -> Result<usize, PoolError> {
        let user = user.clone();
        self.ask(|reply| PoolMsg::CloseUser { user, reply }).await
    }

    /// Asks for an idle sweep without waiting for it (the reaper's tick).
    pub fn request_reap(&self) {
        let _ = self.actor().send_message(PoolMsg::ReapIdle { reply: None });
    }

    /// Runs an idle sweep now; returns how many connections were closed.
    pub async fn reap_idle(&self) -> Result<usize, PoolError> {
        self.ask(|reply| PoolMsg::ReapIdle { reply: Some(reply) })
            .await
    }

    pub async fn stats(&self) -> Result<PoolStats, PoolError> {
        self.ask(|reply| PoolMsg::Stats { reply }).await
    }

    /// Stops taking work and closes every connection; returns how many were closed.
    pub async fn shutdown(&self) -> Result<usize, PoolError> {
        self.ask(|reply| PoolMsg::Shutdown { reply }).await
    }
}
