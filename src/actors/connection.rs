//! The `ConnectionActor`: owns one MCP server child process, its rmcp session and tool cache,
//! for one (user, server) key.
//!
//! Start-up (credentials file, spawn, initialize, tools/list) runs in a task that reports back
//! with a message, so the actor and its supervisor stay responsive while a slow server starts.
//! Tool calls never pass through the mailbox: callers get a [`Session`] holding a cloneable
//! [`McpClient`], and bookkeeping (last use, calls in flight) is done with atomics.

use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rmcp::model::{
    CallToolResult, GetPromptResult, Prompt, ReadResourceResult, Resource, ResourceTemplate, Tool,
};
use tracing::Instrument;

use super::credential::CredentialHandle;
use super::pool::{EventKind, PoolError, PoolEvents, PoolMsg};
use crate::config::ToolFilter;
pub use crate::ids::SessionKey;
use crate::mcp::prefork::{self, ForkedStart, Zygote};
use crate::mcp::sandbox::{Sandbox, SandboxError, SandboxStatus, ServerPolicy, SessionPaths};
use crate::mcp::{
    ExitReason, McpClient, McpError, McpSession, ProcessRegistry, ProgressSink, SessionLaunch,
};
use crate::oauth::TokenRefresher;
use crate::store::CredentialError;
use crate::store::CredentialWriter;

/// Life-cycle state of a connection as reported in stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    Starting = 0,
    Ready = 1,
    Restarting = 2,
    Failed = 3,
    /// Being closed (idle reap, explicit close, shutdown); takes no new calls.
    Closing = 4,
}

impl SessionState {
    fn from_u8(value: u8) -> SessionState {
        match value {
            0 => SessionState::Starting,
            1 => SessionState::Ready,
            2 => SessionState::Restarting,
            3 => SessionState::Failed,
            _ => SessionState::Closing,
        }
    }
}

/// Milliseconds since the Unix epoch, for cheap atomic timestamps.
fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn ms_to_time(ms: i64) -> Option<DateTime<Utc>> {
    (ms > 0)
        .then(|| DateTime::from_timestamp_millis(ms))
        .flatten()
}

/// What callers and the supervisor share about one key. It outlives each `ConnectionActor`
/// incarnation, so restarts and last use survive a crash.
pub struct SessionShared {
    pub key: SessionKey,
    state: AtomicU8,
    pid: AtomicU32,
    started_at_ms: AtomicI64,
    last_used_ms: AtomicI64,
    /// When the last health check (MCP `ping`) was answered; 0 before the first.
    last_health_check_ms: AtomicI64,
    in_flight: AtomicUsize,
    restarts: AtomicU32,
    client: RwLock<Option<McpClient>>,
    call_timeout: Duration,
    /// `[servers.<name>.tools]`: the tools callers may see and call.
    filter: Arc<ToolFilter>,
    /// How the current (or last) server process is confined.
    sandbox: RwLock<Option<SandboxStatus>>,
    /// How the current (or last) server process started: 0 not yet, 1 spawned, 2 forked.
    started: AtomicU8,
    /// Notified when the last call in flight ends (see [`SessionShared::calls_ended`]).
    calls_ended: tokio::sync::Notify,
}

impl SessionShared {
    pub fn new(
        key: SessionKey,
        call_timeout: Duration,
        filter: Arc<ToolFilter>,
    ) -> Arc<SessionShared> {
        Arc::new(SessionShared {
            key,
            state: AtomicU8::new(SessionState::Starting as u8),
            pid: AtomicU32::new(0),
            started_at_ms: AtomicI64::new(0),
            last_used_ms: AtomicI64::new(now_ms()),
            last_health_check_ms: AtomicI64::new(0),
            in_flight: AtomicUsize::new(0),
            restarts: AtomicU32::new(0),
            client: RwLock::new(None),
            call_timeout,
            filter,
            sandbox: RwLock::new(None),
            started: AtomicU8::new(0),
            calls_ended: tokio::sync::Notify::new(),
        })
    }

    pub fn state(&self) -> SessionState {
        SessionState::from_u8(self.state.load(Ordering::SeqCst))
    }

    pub(crate) fn set_state(&self, state: SessionState) {
        self.state.store(state as u8, Ordering::SeqCst);
    }

    /// Ready → Closing unless a call is in flight. Paired with [`InFlight::enter`] (which
    /// increments first, then checks the state) so a call and a close never both proceed.
    pub(crate) fn try_begin_close(&self) -> bool {
        if self
            .state
            .compare_exchange(
                SessionState::Ready as u8,
                SessionState::Closing as u8,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_err()
        {
            return false;
        }
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            self.set_state(SessionState::Ready);
            return false;
        }
        true
    }

    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::Relaxed)).filter(|pid| *pid != 0)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Resolves once no call is in flight (at once if none is): woken by the end of the last
    /// call, never by polling.
    pub(crate) async fn calls_ended(&self) {
        loop {
            // Registered before the check: a call ending in between still wakes it.
            let ended = self.calls_ended.notified();
            if self.in_flight() == 0 {
                return;
            }
            ended.await;
        }
    }

    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::Relaxed)
    }

    pub(crate) fn count_restart(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn last_used(&self) -> Option<DateTime<Utc>> {
        ms_to_time(self.last_used_ms.load(Ordering::Relaxed))
    }

    /// Time since the last use ended (zero while a call is in flight).
    pub fn idle_for(&self) -> Duration {
        if self.in_flight() > 0 {
            return Duration::ZERO;
        }
        let idle = now_ms() - self.last_used_ms.load(Ordering::Relaxed);
        Duration::from_millis(idle.max(0) as u64)
    }

    /// When a health check (MCP `ping`) was last answered, by this or an earlier incarnation.
    pub fn last_health_check(&self) -> Option<DateTime<Utc>> {
        ms_to_time(self.last_health_check_ms.load(Ordering::Relaxed))
    }

    pub fn started_at(&self) -> Option<DateTime<Utc>> {
        ms_to_time(self.started_at_ms.load(Ordering::Relaxed))
    }

    pub fn client(&self) -> Option<McpClient> {
        self.client
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_client(&self, client: Option<McpClient>) {
        *self
            .client
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = client;
    }

    /// How the session's server is confined; `None` before its first start.
    pub fn sandbox(&self) -> Option<SandboxStatus> {
        self.sandbox
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// `forked` (from the server's zygote) or `spawned`; `None` before the first start.
    pub fn started(&self) -> Option<&'static str> {
        match self.started.load(Ordering::Relaxed) {
            1 => Some("spawned"),
            2 => Some("forked"),
            _ => None,
        }
    }

    fn set_sandbox(&self, status: SandboxStatus) {
        *self
            .sandbox
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(status);
    }

    pub fn tool_count(&self) -> usize {
        self.client()
            .map(|c| self.offered(c.tools()).len())
            .unwrap_or(0)
    }

    /// The server's tools that `[servers.<name>.tools]` lets callers see.
    fn offered(&self, tools: Arc<Vec<Tool>>) -> Arc<Vec<Tool>> {
        if self.filter.is_open() {
            return tools;
        }
        Arc::new(
            tools
                .iter()
                .filter(|tool| self.filter.permits(&tool.name))
                .cloned()
                .collect(),
        )
    }

    fn touch(&self) {
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
    }
}

/// Counts a call as in flight for as long as it lives.
pub(crate) struct InFlight(Arc<SessionShared>);

impl InFlight {
    /// `None` if the connection started closing: the caller should fetch a fresh one.
    fn enter(shared: &Arc<SessionShared>) -> Option<InFlight> {
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        shared.touch();
        if shared.state() == SessionState::Closing {
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(InFlight(shared.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.calls_ended.notify_waiters();
        }
    }
}

/// A ready connection, handed out by the pool. Cheap to clone; calls run concurrently.
#[derive(Clone)]
pub struct Session {
    shared: Arc<SessionShared>,
    client: McpClient,
}

impl Session {
    pub fn key(&self) -> &SessionKey {
        &self.shared.key
    }

    /// Pid of the server process (also its process group id).
    pub fn pid(&self) -> u32 {
        self.client.pid()
    }

    /// Whether the session's transport is closed: no request can be sent on it any more.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The cached tool list, less the tools the server's `tools` filter withholds: no server
    /// round trip.
    pub fn tools(&self) -> Arc<Vec<Tool>> {
        self.shared.touch();
        self.shared.offered(self.client.tools())
    }

    /// Calls a tool with the configured call timeout. A tool that fails is `Ok` with
    /// `is_error: Some(true)`; transport failures are never retried here (side effects).
    pub async fn call_tool(
        &self,
        name: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<CallToolResult, PoolError> {
        let slot = self.reserve().ok_or(PoolError::Reconnect)?;
        self.call_reserved(slot, name, arguments, None).await
    }

    /// Counts a call as in flight before it is made, so the reaper and a concurrent close leave
    /// the connection alone; `None` once it started closing (fetch a fresh connection).
    pub(crate) fn reserve(&self) -> Option<InFlight> {
        InFlight::enter(&self.shared)
    }

    /// Makes a call in a slot from [`Session::reserve`].
    pub(crate) async fn call_reserved(
        &self,
        _slot: InFlight,
        name: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
        progress: Option<ProgressSink>,
    ) -> Result<CallToolResult, PoolError> {
        // A tool the filter withholds is as unknown as one the server does not have.
        if !self.shared.filter.permits(name)
            || !self.client.tools().iter().any(|tool| tool.name == name)
        {
            return Err(PoolError::UnknownTool(name.to_owned()));
        }
        self.client
            .call_tool_with_progress(name, arguments, self.shared.call_timeout, progress)
            .await
            .map_err(|err| self.failure(err))
    }

    /// The server's prompts (see [`McpClient::list_prompts`]), in a slot from
    /// [`Session::reserve`]: a listing that reaches the server counts as in flight.
    pub(crate) async fn list_prompts(
        &self,
        _slot: InFlight,
    ) -> Result<Arc<Vec<Prompt>>, PoolError> {
        self.client
            .list_prompts(self.shared.call_timeout)
            .await
            .map_err(|err| self.failure(err))
    }

    /// The server's resources, as [`Session::list_prompts`].
    pub(crate) async fn list_resources(
        &self,
        _slot: InFlight,
    ) -> Result<Arc<Vec<Resource>>, PoolError> {
        self.client
            .list_resources(self.shared.call_timeout)
            .await
            .map_err(|err| self.failure(err))
    }

    /// The server's resource templates, as [`Session::list_prompts`].
    pub(crate) async fn list_resource_templates(
        &self,
        _slot: InFlight,
    ) -> Result<Arc<Vec<ResourceTemplate>>, PoolError> {
        self.client
            .list_resource_templates(self.shared.call_timeout)
            .await
            .map_err(|err| self.failure(err))
    }

    /// `prompts/get` with the call timeout, in a slot from [`Session::reserve`].
    pub(crate) async fn get_prompt(
        &self,
        _slot: InFlight,
        name: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<GetPromptResult, PoolError> {
        self.client
            .get_prompt(name, arguments, self.shared.call_timeout)
            .await
            .map_err(|err| self.failure(err))
    }

    /// `resources/read` with the call timeout, in a slot from [`Session::reserve`].
    pub(crate) async fn read_resource(
        &self,
        _slot: InFlight,
        uri: &str,
    ) -> Result<ReadResourceResult, PoolError> {
        self.client
            .read_resource(uri, self.shared.call_timeout)
            .await
            .map_err(|err| self.failure(err))
    }

    /// A failed request as the pool reports it.
    fn failure(&self, err: McpError) -> PoolError {
        match err {
            McpError::Timeout(after) => PoolError::CallTimeout(after),
            // Nothing reached the server: the pool retries it on a fresh session.
            McpError::NotSent => PoolError::Reconnect,
            McpError::Closed => match self.client.memory_limit_hit() {
                Some(limit) => PoolError::MemoryLimit(limit),
                None => PoolError::ServerCrashed,
            },
            unauthorized @ McpError::Unauthorized(_) => {
                unauthorized_error(&self.shared.key, unauthorized)
            }
            other => PoolError::Mcp(Arc::new(other)),
        }
    }

    pub(crate) fn new(shared: Arc<SessionShared>, client: McpClient) -> Session {
        Session { shared, client }
    }
}

/// Publishes `kind` each time the session's server announces a change of that list. Ends with
/// the session (the watch's sender goes with it).
fn publish_changes(
    mut changes: tokio::sync::watch::Receiver<u64>,
    kind: EventKind,
    events: PoolEvents,
    key: SessionKey,
) {
    tokio::spawn(async move {
        changes.mark_unchanged();
        while changes.changed().await.is_ok() {
            events.publish(&key, kind.clone());
        }
    });
}

// === ConnectionActor ===

/// Why a connection is being closed on purpose (never restarted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Idle,
    Requested,
    Evicted,
    /// Its OAuth tokens were refreshed and its server reads them only at start-up.
    Refresh,
    Shutdown,
    /// Cluster mode: the key now hashes to another node (one joined, or this one is leaving).
    Rebalance,
    /// Cluster mode: this node lost the key's lease (taken over, or not renewed in time).
    LeaseLost,
}

impl CloseReason {
    /// As events and logs name it.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::Requested => "requested",
            CloseReason::Evicted => "evicted",
            CloseReason::Refresh => "refresh",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Rebalance => "rebalance",
            CloseReason::LeaseLost => "lease_lost",
        }
    }
}

/// Messages of the [`ConnectionActor`]. Only the pool sends them (and the actor to itself).
pub enum ConnectionMsg {
    /// The start-up task finished.
    /// Boxed: a session is large next to the other messages.
    Connected(Result<Box<McpSession>, PoolError>),
    /// The session ended (the child exited or crashed).
    Ended(ExitReason),
    /// The session of `pid` cannot serve: a health check went unanswered for
    /// `pool.ping_timeout` (alive but hung), or the pool found that a request could not be
    /// written to it. Its group is killed, and the session's end is then handled as a crash.
    Unresponsive { pid: u32 },
    /// Close the session (stdin EOF, grace, SIGTERM, grace, SIGKILL of the group) and stop.
    Close {
        reason: CloseReason,
        reply: Option<RpcReplyPort<()>>,
    },
}

/// What a `ConnectionActor` is started with.
pub struct ConnectionArgs {
    pub shared: Arc<SessionShared>,
    pub launch: SessionLaunch,
    pub sandbox: Arc<Sandbox>,
    /// The server's zygote, when it is preforked: sessions start by fork, or spawn if that
    /// fails.
    pub prefork: Option<Arc<Zygote>>,
    pub policy: ServerPolicy,
    /// Started as a restart after a crash: runs at the backoff CPU weight until ready.
    pub restarting: bool,
    /// Environment variable through which the server learns its credentials file.
    pub credentials_env: String,
    pub credentials: CredentialHandle,
    /// Refreshes OAuth tokens about to expire before the server reads them.
    pub refresher: Option<TokenRefresher>,
    pub registry: Option<ProcessRegistry>,
    pub startup_timeout: Duration,
    /// The pool's start slots (`pool.max_concurrent_starts`).
    pub start_slots: Arc<tokio::sync::Semaphore>,
    /// How often an idle ready session is pinged, and how long a ping may take.
    pub health: HealthPolicy,
    pub close_grace: Duration,
    pub pool: ActorRef<PoolMsg>,
    /// Where a changed tool list is announced.
    pub events: PoolEvents,
}

/// `pool.health_interval` and `pool.ping_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct HealthPolicy {
    pub interval: Duration,
    pub ping_timeout: Duration,
}

pub struct ConnectionActorState {
    shared: Arc<SessionShared>,
    session: Option<McpSession>,
    health: HealthPolicy,
    close_grace: Duration,
    pool: ActorRef<PoolMsg>,
    events: PoolEvents,
    /// Set once a close was asked for while the start-up task was still running.
    pending_close: Option<(CloseReason, Option<RpcReplyPort<()>>)>,
    /// Whether the start-up task is still running.
    starting: bool,
}

/// See the module docs.
pub struct ConnectionActor;

/// A failed start, carried to the supervisor inside `ActorFailed`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartFailure(pub PoolError);

/// Why a connection failed; reaching the supervisor as `ActorFailed` triggers a restart.
#[derive(Debug, thiserror::Error)]
#[error("MCP server for {key} exited unexpectedly ({reason:?})")]
pub struct ChildExited {
    key: SessionKey,
    reason: ExitReason,
}

/// What a session start needs besides the key.
struct SessionStart {
    launch: SessionLaunch,
    sandbox: Arc<Sandbox>,
    prefork: Option<Arc<Zygote>>,
    policy: ServerPolicy,
    restarting: bool,
    credentials_env: String,
    credentials: CredentialHandle,
    refresher: Option<TokenRefresher>,
    registry: Option<ProcessRegistry>,
    startup_timeout: Duration,
    start_slots: Arc<tokio::sync::Semaphore>,
    events: PoolEvents,
}

async fn start_session(
    key: SessionKey,
    start: SessionStart,
    shared: Arc<SessionShared>,
) -> Result<McpSession, PoolError> {
    let SessionStart {
        launch,
        sandbox,
        prefork,
        policy,
        restarting,
        credentials_env,
        credentials,
        refresher,
        registry,
        startup_timeout,
        start_slots,
        events,
    } = start;
    // Refreshes OAuth tokens about to expire (a token still valid is used even if that failed
    // for now), then writes the file the server reads.
    if let Some(refresher) = &refresher {
        refresher
            .check_now(&key.user, &key.server)
            .await
            .map_err(PoolError::from_credentials)?;
    }
    let mut launch = match launch {
        SessionLaunch::Process(launch) => launch,
        SessionLaunch::Remote(remote) => {
            tracing::info!(
                "Connecting to remote MCP server {} for user {}",
                key.server,
                key.user
            );
            shared.set_sandbox(SandboxStatus::Remote);
            let _slot = start_slots
                .acquire_owned()
                .await
                .map_err(|_| PoolError::Unavailable)?;
            return McpSession::connect_remote(&remote, startup_timeout)
                .await
                .map_err(|err| match err {
                    unauthorized @ McpError::Unauthorized(_) => {
                        unauthorized_error(&key, unauthorized)
                    }
                    other => PoolError::StartFailed(Arc::new(other)),
                });
        }
    };
    let path = credentials
        .prepare_file(&key.user, &key.server)
        .await
        .map_err(PoolError::from_credentials)?;
    tracing::info!(
        credentials = %path.display(),
        "Starting MCP server {} for user {}",
        key.server,
        key.user
    );
    let start_failed = |err: McpError| PoolError::StartFailed(Arc::new(err));
    // Resolved by the pool (through the server's PATH) before this start was scheduled.
    let program = std::path::PathBuf::from(&launch.command);
    let credentials_dir = path.parent().unwrap_or(&path).to_owned();
    let paths = SessionPaths {
        user: key.user.as_str(),
        server: key.server.as_str(),
        program: &program,
        args: &launch.args,
        credentials_dir: &credentials_dir,
    };
    if let Some(zygote) = &prefork {
        let _slot = start_slots
            .acquire()
            .await
            .map_err(|_| PoolError::Unavailable)?;
        let forked = prefork::connect_forked(
            zygote,
            ForkedStart {
                sandbox: &sandbox,
                policy: &policy,
                session: paths,
                restarting,
                env: &launch.env,
                credentials: Some((credentials_env.as_str(), &path)),
                startup_timeout,
                registry: registry.as_ref(),
            },
        )
        .await;
        match forked {
            Ok(session) => {
                shared.set_sandbox(session.sandbox().clone());
                shared.started.store(2, Ordering::Relaxed);
                return Ok(session);
            }
            Err(err) => {
                tracing::warn!(cause = %err, "Cannot start {} by fork; spawning it", key.server);
                zygote.count_fallback(&err);
                events.publish(
                    &key,
                    EventKind::PreforkFallback {
                        cause: err.to_string(),
                    },
                );
            }
        }
    }
    shared.started.store(1, Ordering::Relaxed);
    let confinement = sandbox
        .prepare(&policy, paths, restarting)
        .map_err(|err| match err {
            SandboxError::Unavailable(missing) => PoolError::SandboxUnavailable(missing),
            other => start_failed(McpError::Sandbox(other)),
        })?;
    let state_dir = confinement.state_dir.to_string_lossy().into_owned();
    launch.command = program.to_string_lossy().into_owned();
    launch.cwd = Some(confinement.state_dir.clone());
    launch.env.insert("HOME".to_owned(), state_dir.clone());
    launch.env.insert("TMPDIR".to_owned(), state_dir);
    launch
        .env
        .insert(credentials_env, path.to_string_lossy().into_owned());
    shared.set_sandbox(confinement.status.clone());
    // Held from the spawn until the session is ready (or failed), so at most
    // `max_concurrent_starts` servers start at once. Taken after the preparation above and
    // before `connect`, which starts the `startup_timeout` clock: time spent queueing for a
    // slot is never charged to the server.
    let _slot = start_slots
        .acquire_owned()
        .await
        .map_err(|_| PoolError::Unavailable)?;
    McpSession::connect(
        &launch,
        Some(confinement),
        startup_timeout,
        registry.as_ref(),
    )
    .await
    .map_err(start_failed)
}

/// Credentials a remote server refused, as the pool reports them: the user's to fix (at start
/// they are not counted as a crash). A refusal with no known cause is a server that still said
/// 401 after the one retry: "reconnect required".
fn unauthorized_error(key: &SessionKey, err: McpError) -> PoolError {
    match err {
        McpError::Unauthorized(Some(cause)) => match &*cause {
            CredentialError::NotFound(server) => PoolError::NoCredentials(server.clone()),
            _ => PoolError::Credentials(cause),
        },
        McpError::Unauthorized(None) => PoolError::Credentials(Arc::new(
            CredentialError::ReconnectRequired(key.server.clone()),
        )),
        other => PoolError::Mcp(Arc::new(other)),
    }
}

impl Actor for ConnectionActor {
    type Msg = ConnectionMsg;
    type State = ConnectionActorState;
    type Arguments = ConnectionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ConnectionMsg>,
        args: ConnectionArgs,
    ) -> Result<ConnectionActorState, ActorProcessingErr> {
        // Nothing slow here: the supervisor awaits pre_start inside its own handler.
        let key = args.shared.key.clone();
        let span = tracing::info_span!("connection", user_id = %key.user, server = %key.server);
        let startup = start_session(
            key,
            SessionStart {
                launch: args.launch,
                sandbox: args.sandbox,
                prefork: args.prefork,
                policy: args.policy,
                restarting: args.restarting,
                credentials_env: args.credentials_env,
                credentials: args.credentials,
                refresher: args.refresher,
                registry: args.registry,
                startup_timeout: args.startup_timeout,
                start_slots: args.start_slots,
                events: args.events.clone(),
            },
            args.shared.clone(),
        );
        tokio::spawn(
            async move {
                let result = startup.await;
                if let Err(unsent) =
                    myself.send_message(ConnectionMsg::Connected(result.map(Box::new)))
                    && let ractor::MessagingErr::SendErr(ConnectionMsg::Connected(Ok(session))) =
                        unsent
                {
                    // The actor is gone (killed with its supervisor): nobody else will close it.
                    session.close(Duration::from_secs(1)).await;
                }
            }
            .instrument(span),
        );
        Ok(ConnectionActorState {
            shared: args.shared,
            session: None,
            health: args.health,
            close_grace: args.close_grace,
            pool: args.pool,
            events: args.events,
            pending_close: None,
            starting: true,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ConnectionMsg>,
        message: ConnectionMsg,
        state: &mut ConnectionActorState,
    ) -> Result<(), ActorProcessingErr> {
        let key = state.shared.key.clone();
        let span = tracing::info_span!("connection", user_id = %key.user, server = %key.server);
        async move {
            match message {
                ConnectionMsg::Connected(result) => {
                    state.on_connected(&myself, result.map(|s| *s)).await
                }
                ConnectionMsg::Ended(reason) => {
                    if state.shared.state() == SessionState::Closing {
                        return Ok(());
                    }
                    state.shared.set_client(None);
                    state.shared.set_state(SessionState::Restarting);
                    if let Some(session) = state.session.take() {
                        // Reaps the dead leader, kills any grandchild, clears the record.
                        session.close(state.close_grace).await;
                    }
                    tracing::warn!(?reason, "MCP server for {key} exited unexpectedly");
                    Err(Box::new(ChildExited {
                        key: key.clone(),
                        reason,
                    }) as ActorProcessingErr)
                }
                ConnectionMsg::Unresponsive { pid } => {
                    match &state.session {
                        Some(session)
                            if session.pid() == pid
                                && state.shared.state() != SessionState::Closing =>
                        {
                            tracing::warn!(pid, "MCP server for {key} cannot serve; killing it");
                            // SIGKILL works on a stopped process too; the session's end then
                            // arrives as `Ended` and goes through the restart policy.
                            session.kill_now();
                        }
                        // Closing anyway, or a session that has already gone.
                        _ => {}
                    }
                    Ok(())
                }
                ConnectionMsg::Close { reason, reply } => {
                    if state.starting {
                        state.shared.set_state(SessionState::Closing);
                        state.pending_close = Some((reason, reply));
                        return Ok(());
                    }
                    state.close(&myself, reason, reply).await;
                    Ok(())
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// Pings the session every `health.interval` while it is ready and no call is in flight (a
/// busy session is watched by its calls' timeouts), until the session ends. A ping answered
/// records the time; one unanswered within `health.ping_timeout` tells the actor, which kills
/// the hung server. Pings never count as use, so they keep no session from the idle reaper.
fn spawn_health_checks(
    actor: ActorRef<ConnectionMsg>,
    shared: Arc<SessionShared>,
    client: McpClient,
    health: HealthPolicy,
) {
    tokio::spawn(async move {
        let first = tokio::time::Instant::now() + health.interval;
        let mut ticks = tokio::time::interval_at(first, health.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = client.ended() => return,
                _ = ticks.tick() => {}
            }
            match shared.state() {
                SessionState::Ready if shared.in_flight() == 0 => {}
                SessionState::Ready | SessionState::Starting => continue,
                // Closing, or already being restarted: nothing left to check.
                SessionState::Restarting | SessionState::Failed | SessionState::Closing => return,
            }
            match client.ping(health.ping_timeout).await {
                Ok(()) => shared
                    .last_health_check_ms
                    .store(now_ms(), Ordering::Relaxed),
                Err(McpError::Timeout(after)) => {
                    tracing::warn!(
                        user_id = %shared.key.user, server = %shared.key.server, pid = client.pid(),
                        "MCP server did not answer a ping within {after:?}; restarting it"
                    );
                    let _ = actor.send_message(ConnectionMsg::Unresponsive { pid: client.pid() });
                    return;
                }
                // Closed: the watcher reports the end. Anything else (a server that answers
                // ping with nonsense) is no sign of a hang; it is logged and left alone.
                Err(McpError::Closed | McpError::NotSent) => return,
                Err(err) => tracing::debug!(cause = %err, "health check answered oddly"),
            }
        }
    });
}

// === impl ConnectionActorState ===

impl ConnectionActorState {
    async fn on_connected(
        &mut self,
        myself: &ActorRef<ConnectionMsg>,
        result: Result<McpSession, PoolError>,
    ) -> Result<(), ActorProcessingErr> {
        self.starting = false;
        let key = &self.shared.key;
        match result {
            Ok(session) => {
                let client = session.client();
                let names: Vec<String> =
                    client.tools().iter().map(|t| t.name.to_string()).collect();
                tracing::info!(
                    pid = session.pid(),
                    "Successfully connected to {} MCP server",
                    key.server
                );
                tracing::info!("Dynamically loaded {} tools: {:?}", key.server, names);
                // A remote session has no process: its id stays internal (stats show no pid).
                let pid = if session.is_remote() {
                    0
                } else {
                    session.pid()
                };
                self.shared.pid.store(pid, Ordering::Relaxed);
                self.shared.started_at_ms.store(now_ms(), Ordering::Relaxed);
                self.shared.set_client(Some(client.clone()));
                let mut ended = session.ended();
                self.session = Some(session);
                if let Some((reason, reply)) = self.pending_close.take() {
                    self.close(myself, reason, reply).await;
                    return Ok(());
                }
                self.shared.set_state(SessionState::Ready);
                let watcher = myself.clone();
                tokio::spawn(async move {
                    let reason = match ended.wait_for(Option::is_some).await {
                        Ok(reason) => reason.unwrap_or(ExitReason::Aborted),
                        Err(_) => ExitReason::Aborted,
                    };
                    let _ = watcher.send_message(ConnectionMsg::Ended(reason));
                });
                spawn_health_checks(
                    myself.clone(),
                    self.shared.clone(),
                    client.clone(),
                    self.health,
                );
                for (changes, kind) in [
                    (client.tools_changed(), EventKind::ToolsChanged),
                    (client.prompts_changed(), EventKind::PromptsChanged),
                    (client.resources_changed(), EventKind::ResourcesChanged),
                ] {
                    publish_changes(changes, kind, self.events.clone(), key.clone());
                }
                let _ = self.pool.send_message(PoolMsg::Ready {
                    actor: myself.get_id(),
                    session: Session::new(self.shared.clone(), client),
                });
                Ok(())
            }
            Err(err) => {
                tracing::warn!(cause = %err, "MCP server for {key} failed to start");
                if let Some((_, reply)) = self.pending_close.take() {
                    if let Some(reply) = reply {
                        let _ = reply.send(());
                    }
                    myself.stop(Some("closed while starting".into()));
                    return Ok(());
                }
                // Reported through supervision (not a message), so the supervisor sees the typed
                // cause before it could mistake this for an ordinary stop.
                Err(Box::new(StartFailure(err)) as ActorProcessingErr)
            }
        }
    }

    async fn close(
        &mut self,
        myself: &ActorRef<ConnectionMsg>,
        reason: CloseReason,
        reply: Option<RpcReplyPort<()>>,
    ) {
        self.shared.set_state(SessionState::Closing);
        self.shared.set_client(None);
        if let Some(session) = self.session.take() {
            session.close(self.close_grace).await;
        }
        tracing::debug!(?reason, "Closed MCP connection {}", self.shared.key);
        if let Some(reply) = reply {
            let _ = reply.send(());
        }
        myself.stop(Some(format!("{reason:?}")));
    }
}
