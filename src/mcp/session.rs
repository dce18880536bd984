//! One rmcp client session on a child-process MCP server.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use rmcp::transport::streamable_http_client::StreamableHttpError;
use rmcp::{
    ClientHandler, Peer, RoleClient, ServiceExt as _,
    handler::client::progress::{ProgressDispatcher, ProgressSubscriber},
    model::{
        CallToolRequest, CallToolRequestParams, CallToolResult, CancelledNotification,
        CancelledNotificationParam, ClientConfig, ClientNotification, ClientRequest,
        GetPromptRequest, GetPromptRequestParams, GetPromptResult, Implementation, JsonObject,
        ListPromptsRequest, ListResourceTemplatesRequest, ListResourcesRequest,
        PaginatedRequestParams, ProgressNotificationParam, Prompt, ProtocolVersion,
        ReadResourceRequest, ReadResourceRequestParams, ReadResourceResult, RequestId, Resource,
        ResourceTemplate, ServerCapabilities, ServerResult, Tool,
    },
    service::{
        NotificationContext, PeerRequestOptions, QuitReason, RunningServiceCancellationToken,
    },
};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    sync::watch,
};
use tracing::{debug, info, warn};

use super::{
    McpError, ProcessRegistry, ServerLaunch,
    process::{
        as_pgid, kill_group_now, spawn_server, terminate_group, wait_group_gone, wait_reaped,
    },
    remote::{AuthorizedHttp, RemoteLaunch, is_auth_challenge},
    sandbox::{Confinement, SandboxStatus, SessionCgroup},
};

/// How long a `tools/list` refresh after `notifications/tools/list_changed` may take.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for a killed group to disappear when start-up fails.
const FAILED_START_REAP: Duration = Duration::from_secs(5);
/// Extra time for rmcp to reap the leader after the group was signalled.
const REAP_MARGIN: Duration = Duration::from_secs(5);

/// What a session connects to: a program the pool runs (confined, with a credentials file)
/// or a remote server reached over Streamable HTTP (credentials on each request). Everything
/// above [`McpSession`] treats both alike; a "restart" of a remote session is a reconnect.
#[derive(Debug, Clone)]
pub enum SessionLaunch {
    Process(ServerLaunch),
    Remote(RemoteLaunch),
}

/// Why a session ended, as reported by [`McpSession::ended`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The server closed its stdout: it exited or crashed (or was killed).
    TransportClosed,
    /// The session was closed from our side ([`McpSession::close`]).
    Cancelled,
    /// rmcp's service task failed or was aborted (runtime shutdown, panic).
    Aborted,
}

// === tool cache ===

/// The server's tool list, shared by the session and its notification handler.
struct ToolCache {
    /// Swapped whole on refresh, so readers clone an `Arc` and never block a refresh for long.
    tools: RwLock<Arc<Vec<Tool>>>,
    /// Refreshes are serialised so that a slow, older `tools/list` cannot overwrite a newer one.
    refresh_lock: tokio::sync::Mutex<()>,
    /// Counts refreshes caused by `notifications/tools/list_changed`.
    changes: watch::Sender<u64>,
}

impl ToolCache {
    fn new() -> Self {
        Self {
            tools: RwLock::new(Arc::new(Vec::new())),
            refresh_lock: tokio::sync::Mutex::new(()),
            changes: watch::Sender::new(0),
        }
    }

    fn get(&self) -> Arc<Vec<Tool>> {
        // A poisoned lock still holds a complete `Arc`: writers only ever assign.
        self.tools
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    async fn refresh(&self, peer: &Peer<RoleClient>) -> Result<(), McpError> {
        let _serial = self.refresh_lock.lock().await;
        let fresh = Arc::new(peer.list_all_tools().await?);
        *self
            .tools
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh;
        Ok(())
    }
}

// === prompts and resources ===

/// Pages one listing may follow before the server is deemed to loop.
const MAX_LIST_PAGES: usize = 1000;

/// One list of a server's prompts, resources or resource templates. Unlike tools it is not
/// listed at start-up (most servers have none, and no caller may ever ask): it is listed on
/// first demand and kept until the server's `list_changed` notification drops it. A listing
/// that began before such a drop is answered but not kept (its generation is stale).
struct ListCache<T> {
    /// (generation, the list if known).
    state: std::sync::Mutex<(u64, Option<Arc<Vec<T>>>)>,
}

impl<T> Default for ListCache<T> {
    fn default() -> Self {
        ListCache {
            state: std::sync::Mutex::new((0, None)),
        }
    }
}

impl<T> ListCache<T> {
    fn state(&self) -> std::sync::MutexGuard<'_, (u64, Option<Arc<Vec<T>>>)> {
        // Every write leaves a complete state: a panic elsewhere cannot break it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self) -> (u64, Option<Arc<Vec<T>>>) {
        let state = self.state();
        (state.0, state.1.clone())
    }

    /// Keeps `items`, unless the list was dropped since `generation` was read.
    fn store(&self, generation: u64, items: Arc<Vec<T>>) {
        let mut state = self.state();
        if state.0 == generation {
            state.1 = Some(items);
        }
    }

    fn invalidate(&self) {
        let mut state = self.state();
        state.0 += 1;
        state.1 = None;
    }
}

/// The server's prompts and resources, shared by the session and its notification handler.
#[derive(Default)]
struct Catalog {
    /// `prompts/list`.
    prompts: ListCache<Prompt>,
    /// `resources/list`.
    resources: ListCache<Resource>,
    /// `resources/templates/list`.
    templates: ListCache<ResourceTemplate>,
    /// Counts `notifications/prompts/list_changed` from the server.
    prompts_changed: watch::Sender<u64>,
    /// Counts `notifications/resources/list_changed` from the server.
    resources_changed: watch::Sender<u64>,
}

/// Which list a request is about, to find its capability and cache.
#[derive(Debug, Clone, Copy)]
enum CatalogList {
    Prompts,
    Resources,
    Templates,
}

impl CatalogList {
    /// Whether the server offers this list at all, and whether it announces changes to it
    /// (only then is a listing kept).
    fn offered(self, capabilities: &ServerCapabilities) -> (bool, bool) {
        match self {
            CatalogList::Prompts => capabilities
                .prompts
                .as_ref()
                .map_or((false, false), |p| (true, p.list_changed == Some(true))),
            CatalogList::Resources | CatalogList::Templates => capabilities
                .resources
                .as_ref()
                .map_or((false, false), |r| (true, r.list_changed == Some(true))),
        }
    }
}

fn unexpected_answer() -> McpError {
    McpError::Protocol(Box::new(rmcp::ServiceError::UnexpectedResponse))
}

// === progress ===

/// One progress notification of a call, as its server sent it (without the server's token).
/// Serialized as the data of REST's `progress` events (and read back from a forwarded call's).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub progress: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where a caller wants a call's progress. Lossy: a sink that is full misses notifications
/// rather than holding up the answer.
pub type ProgressSink = tokio::sync::mpsc::Sender<Progress>;

/// The next progress notification of a subscribed call; never, without a subscription.
async fn next_progress(subscriber: &mut Option<ProgressSubscriber>) -> Option<Progress> {
    use tokio_stream::StreamExt as _;
    match subscriber {
        Some(subscriber) => subscriber.next().await.map(|p| Progress {
            progress: p.progress,
            total: p.total,
            message: p.message,
        }),
        None => std::future::pending().await,
    }
}

/// The client side of the session: it reacts to tool-list changes and routes progress
/// notifications to the call they belong to.
struct PoolClient {
    cache: Arc<ToolCache>,
    catalog: Arc<Catalog>,
    progress: ProgressDispatcher,
}

impl ClientHandler for PoolClient {
    fn get_info(&self) -> ClientConfig {
        // rmcp's default is the 2026-07-28 revision, where list-changed notifications must be
        // requested with `subscriptions/listen`; the session-based revision delivers them to
        // `on_tool_list_changed`, and is what today's servers (Node, Python) speak.
        let mut config =
            ClientConfig::default().with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE);
        config.client_info = Implementation::new("mcp-pool", env!("CARGO_PKG_VERSION"));
        config
    }

    async fn on_tool_list_changed(&self, context: NotificationContext<RoleClient>) {
        // rmcp runs each notification handler in its own task, so awaiting a request here
        // does not stall the session.
        match tokio::time::timeout(REFRESH_TIMEOUT, self.cache.refresh(&context.peer)).await {
            Ok(Ok(())) => {
                self.cache.changes.send_modify(|count| *count += 1);
                debug!(tools = self.cache.get().len(), "tool list refreshed");
            }
            Ok(Err(err)) => warn!(cause = %err, "tool list refresh failed"),
            Err(_) => warn!(timeout = ?REFRESH_TIMEOUT, "tool list refresh timed out"),
        }
    }

    async fn on_prompt_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.catalog.prompts.invalidate();
        self.catalog
            .prompts_changed
            .send_modify(|count| *count += 1);
    }

    async fn on_resource_list_changed(&self, _context: NotificationContext<RoleClient>) {
        // Templates have no notification of their own: the spec's resources/list_changed
        // covers both lists.
        self.catalog.resources.invalidate();
        self.catalog.templates.invalidate();
        self.catalog
            .resources_changed
            .send_modify(|count| *count += 1);
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        // Tokens are rmcp's per-request numbers: a notification for a call nobody subscribed
        // to (or one that ended) is dropped here.
        self.progress.handle_notification(params).await;
    }
}

// === McpSession ===

/// The calling side of a session: cheap to clone and hand to many callers, while the
/// [`McpSession`] that owns the process stays with one owner.
#[derive(Clone)]
pub struct McpClient {
    /// The leader's pid, which is also the process group id.
    pgid: u32,
    /// Cloneable handle for requests; concurrent requests multiplex over the one pipe.
    peer: Peer<RoleClient>,
    /// Tool list from the last `tools/list`.
    cache: Arc<ToolCache>,
    /// Prompts and resources, listed on demand.
    catalog: Arc<Catalog>,
    /// Progress notifications by the token rmcp gave each request.
    progress: ProgressDispatcher,
    /// The session's cgroup, to tell an OOM kill at the memory limit from a crash.
    cgroup: Option<Arc<SessionCgroup>>,
    /// `Some` once rmcp's service task has ended.
    ended: watch::Receiver<Option<ExitReason>>,
    /// A remote session's HTTP side (its credentials), and how to end it from a call.
    remote: Option<RemoteSide>,
}

/// What a remote session's client needs beyond the peer.
#[derive(Clone)]
struct RemoteSide {
    http: AuthorizedHttp,
    /// Ends the session as a crash would (see [`McpSession::kill_now`]).
    kill: Arc<RemoteKill>,
}

/// Ends a remote session from any holder of its client: there is no process to signal, so a
/// broken session is cancelled and its end reported as [`ExitReason::TransportClosed`].
struct RemoteKill {
    cancel: tokio_util::sync::CancellationToken,
    killed: std::sync::atomic::AtomicBool,
}

impl RemoteKill {
    fn kill(&self) {
        self.killed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cancel.cancel();
    }
}

/// Remote sessions have no process; they get ids from this counter instead, so that the
/// pool can still tell one incarnation of a key from the next (`stale`). Never shown as a pid.
static REMOTE_SESSION_IDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

impl McpClient {
    /// The leader's pid, which is also the process group id; for a remote session, its
    /// session id (see [`McpClient::is_remote`]).
    pub fn pid(&self) -> u32 {
        self.pgid
    }

    /// Whether this is a session on a remote (Streamable HTTP) server.
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Maps a failed request of a remote session: a 401 the credentials could not answer is
    /// [`McpError::Unauthorized`]; a connection that could not be made sent nothing; anything
    /// else may have reached the server, and the session is ended so the pool restarts it
    /// (reconnects) under its restart policy, as it would a crashed process.
    fn remote_failure(&self, err: &rmcp::ServiceError) -> Option<McpError> {
        let remote = self.remote.as_ref()?;
        let rmcp::ServiceError::TransportSend(transport) = err else {
            return None;
        };
        if is_auth_challenge(transport.error.as_ref()) {
            return Some(McpError::Unauthorized(remote.http.auth_failure()));
        }
        // rmcp's `Client(E)` and `HttpStatus` variants are not reachable through `source()`
        // (one is no source, the other is transparent), so the chain is searched by type.
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(transport.error.as_ref());
        let mut connect = false;
        while let Some(current) = source {
            match current.downcast_ref::<StreamableHttpError<reqwest::Error>>() {
                // Busy or failing, but there: the session stays, the call reports it.
                Some(StreamableHttpError::HttpStatus(status)) => {
                    return Some(McpError::HttpStatus {
                        status: status.status,
                    });
                }
                Some(StreamableHttpError::Client(http)) => {
                    connect = http.is_connect();
                    break;
                }
                _ => {}
            }
            if let Some(http) = current.downcast_ref::<reqwest::Error>() {
                connect = http.is_connect();
                break;
            }
            source = current.source();
        }
        debug!(cause = %transport.error, connect, "remote MCP request failed; ending the session");
        remote.kill.kill();
        Some(if connect {
            McpError::NotSent
        } else {
            McpError::Closed
        })
    }

    /// `Some(limit in bytes)` when the kernel killed a process of this session at its memory
    /// limit: the reason a call failed, if its transport closed.
    pub fn memory_limit_hit(&self) -> Option<u64> {
        let cgroup = self.cgroup.as_ref()?;
        (cgroup.oom_kills() > 0).then(|| cgroup.memory_max.unwrap_or(0))
    }

    /// The cached tool list.
    pub fn tools(&self) -> Arc<Vec<Tool>> {
        self.cache.get()
    }

    /// Whether the transport is closed: requests can no longer be sent.
    pub fn is_closed(&self) -> bool {
        self.peer.is_transport_closed()
    }

    /// Resolves when the session has ended (at once if it has).
    pub async fn ended(&self) -> ExitReason {
        wait_ended(self.ended.clone()).await
    }

    /// Counts tool-list refreshes caused by `notifications/tools/list_changed`; await
    /// `changed()` on it to learn about the next one.
    pub fn tools_changed(&self) -> watch::Receiver<u64> {
        self.cache.changes.subscribe()
    }

    /// Counts `notifications/prompts/list_changed` from the server.
    pub fn prompts_changed(&self) -> watch::Receiver<u64> {
        self.catalog.prompts_changed.subscribe()
    }

    /// Counts `notifications/resources/list_changed` from the server.
    pub fn resources_changed(&self) -> watch::Receiver<u64> {
        self.catalog.resources_changed.subscribe()
    }

    /// The server's prompts: none if it does not offer the capability (no request is sent);
    /// kept after the first listing if it announces changes (`listChanged`), else listed anew
    /// each time. Each page may take up to `timeout`.
    pub async fn list_prompts(&self, timeout: Duration) -> Result<Arc<Vec<Prompt>>, McpError> {
        self.list_catalog(
            CatalogList::Prompts,
            &self.catalog.prompts,
            timeout,
            |params| ClientRequest::ListPromptsRequest(ListPromptsRequest::with_param(params)),
            |answer| match answer {
                ServerResult::ListPromptsResult(page) => Some((page.prompts, page.next_cursor)),
                _ => None,
            },
        )
        .await
    }

    /// The server's resources, as [`McpClient::list_prompts`] lists prompts.
    pub async fn list_resources(&self, timeout: Duration) -> Result<Arc<Vec<Resource>>, McpError> {
        self.list_catalog(
            CatalogList::Resources,
            &self.catalog.resources,
            timeout,
            |params| ClientRequest::ListResourcesRequest(ListResourcesRequest::with_param(params)),
            |answer| match answer {
                ServerResult::ListResourcesResult(page) => Some((page.resources, page.next_cursor)),
                _ => None,
            },
        )
        .await
    }

    /// The server's resource templates, as [`McpClient::list_prompts`] lists prompts.
    pub async fn list_resource_templates(
        &self,
        timeout: Duration,
    ) -> Result<Arc<Vec<ResourceTemplate>>, McpError> {
        self.list_catalog(
            CatalogList::Templates,
            &self.catalog.templates,
            timeout,
            |params| {
                ClientRequest::ListResourceTemplatesRequest(
                    ListResourceTemplatesRequest::with_param(params),
                )
            },
            |answer| match answer {
                ServerResult::ListResourceTemplatesResult(page) => {
                    Some((page.resource_templates, page.next_cursor))
                }
                _ => None,
            },
        )
        .await
    }

    /// `prompts/get`.
    pub async fn get_prompt(
        &self,
        name: &str,
        arguments: Option<JsonObject>,
        timeout: Duration,
    ) -> Result<GetPromptResult, McpError> {
        let mut params = GetPromptRequestParams::new(name);
        params.arguments = arguments;
        let request = ClientRequest::GetPromptRequest(GetPromptRequest::new(params));
        match self.request(request, timeout).await? {
            ServerResult::GetPromptResult(result) => Ok(result),
            _ => Err(unexpected_answer()),
        }
    }

    /// `resources/read` of `uri`, as the server spells it.
    pub async fn read_resource(
        &self,
        uri: &str,
        timeout: Duration,
    ) -> Result<ReadResourceResult, McpError> {
        let request = ClientRequest::ReadResourceRequest(ReadResourceRequest::new(
            ReadResourceRequestParams::new(uri),
        ));
        match self.request(request, timeout).await? {
            ServerResult::ReadResourceResult(result) => Ok(result),
            _ => Err(unexpected_answer()),
        }
    }

    /// Every page of one of the catalog's lists, or the kept list (see
    /// [`McpClient::list_prompts`]).
    async fn list_catalog<T>(
        &self,
        list: CatalogList,
        cache: &ListCache<T>,
        timeout: Duration,
        request: impl Fn(PaginatedRequestParams) -> ClientRequest,
        page: impl Fn(ServerResult) -> Option<(Vec<T>, Option<String>)>,
    ) -> Result<Arc<Vec<T>>, McpError> {
        let (offered, announced) = self
            .peer
            .peer_info()
            .map_or((false, false), |info| list.offered(&info.capabilities));
        if !offered {
            return Ok(Arc::new(Vec::new()));
        }
        let (generation, kept) = cache.get();
        if announced && let Some(items) = kept {
            return Ok(items);
        }
        let mut items = Vec::new();
        let mut cursor = None;
        for _ in 0..MAX_LIST_PAGES {
            let params = PaginatedRequestParams::default().with_cursor(cursor.take());
            let answer = self.request(request(params), timeout).await?;
            let (more, next) = page(answer).ok_or_else(unexpected_answer)?;
            items.extend(more);
            if next.is_none() {
                let items = Arc::new(items);
                if announced {
                    cache.store(generation, items.clone());
                }
                return Ok(items);
            }
            cursor = next;
        }
        warn!(
            ?list,
            pages = MAX_LIST_PAGES,
            "the server's listing never ended"
        );
        Err(unexpected_answer())
    }

    /// Sends one request and waits up to `timeout` for its answer (the request is then
    /// cancelled on the server), telling a request that was never written
    /// ([`McpError::NotSent`]) from one that may have reached the server, as tool calls do.
    async fn request(
        &self,
        request: ClientRequest,
        timeout: Duration,
    ) -> Result<ServerResult, McpError> {
        if self.peer.is_transport_closed() {
            return Err(McpError::NotSent);
        }
        let handle = match self
            .peer
            .send_request_with_option(request, PeerRequestOptions::no_options())
            .await
        {
            Ok(handle) => handle,
            Err(rmcp::ServiceError::TransportClosed) => return Err(McpError::NotSent),
            Err(err) => return Err(self.remote_failure(&err).unwrap_or_else(|| err.into())),
        };
        let mut guard = CancelOnDrop {
            peer: self.peer.clone(),
            id: Some(handle.id.clone()),
        };
        let answer = match tokio::time::timeout(timeout, handle.await_response()).await {
            Ok(answer) => {
                guard.id = None;
                answer
            }
            Err(_) => return Err(McpError::Timeout(timeout)),
        };
        match answer {
            Ok(result) => Ok(result),
            Err(err) if self.remote.is_some() => {
                Err(self.remote_failure(&err).unwrap_or_else(|| err.into()))
            }
            Err(rmcp::ServiceError::TransportSend(_)) => Err(McpError::NotSent),
            Err(err) => Err(err.into()),
        }
    }

    /// Calls tool `name`; on timeout the request is cancelled on the server and
    /// [`McpError::Timeout`] returned. A tool that fails comes back as `Ok` with
    /// `is_error: Some(true)`, as MCP specifies.
    ///
    /// A transport that was closed before the request was written gives
    /// [`McpError::NotSent`] (safe to retry elsewhere); one that closed after gives
    /// [`McpError::Closed`] (the server may have run the tool).
    pub async fn call_tool(
        &self,
        name: &str,
        args: Option<serde_json::Map<String, serde_json::Value>>,
        timeout: Duration,
    ) -> Result<CallToolResult, McpError> {
        self.call_tool_with_progress(name, args, timeout, None)
            .await
    }

    /// [`McpClient::call_tool`], passing the server's progress notifications of this call to
    /// `progress` while it runs.
    pub async fn call_tool_with_progress(
        &self,
        name: &str,
        args: Option<serde_json::Map<String, serde_json::Value>>,
        timeout: Duration,
        progress: Option<ProgressSink>,
    ) -> Result<CallToolResult, McpError> {
        if self.peer.is_transport_closed() {
            return Err(McpError::NotSent);
        }
        let mut params = CallToolRequestParams::new(name.to_owned());
        if let Some(args) = args {
            params = params.with_arguments(args);
        }
        // Sending and awaiting are split (rather than `Peer::call_tool`) to know which side of
        // the write a closed transport is on.
        let request = ClientRequest::CallToolRequest(CallToolRequest::new(params));
        let handle = match self
            .peer
            .send_request_with_option(request, PeerRequestOptions::no_options())
            .await
        {
            Ok(handle) => handle,
            // The service task had already stopped reading its queue: nothing was written.
            Err(rmcp::ServiceError::TransportClosed) => return Err(McpError::NotSent),
            Err(err) => return Err(self.remote_failure(&err).unwrap_or_else(|| err.into())),
        };
        // Sends `notifications/cancelled` when this future is dropped before the answer (an
        // outer timeout, a caller that gives up), as `Peer::call_tool` would.
        let mut guard = CancelOnDrop {
            peer: self.peer.clone(),
            id: Some(handle.id.clone()),
        };
        // Subscribed right after the request was queued, before it can have been written, so
        // no notification of this call arrives unrouted.
        let mut subscriber = match &progress {
            Some(_) => Some(self.progress.subscribe(handle.progress_token.clone()).await),
            None => None,
        };
        let response = handle.await_response();
        let answer = tokio::time::timeout(timeout, async {
            tokio::pin!(response);
            let forward = |update| {
                if let Some(sink) = &progress {
                    let _ = sink.try_send(update);
                }
            };
            let answer = loop {
                tokio::select! {
                    // Progress already queued goes out before the answer.
                    biased;
                    Some(update) = next_progress(&mut subscriber) => forward(update),
                    answer = &mut response => break answer,
                }
            };
            // rmcp runs notification handlers in tasks of their own, so the last progress
            // notification can reach the dispatcher just after the answer: give it a turn.
            if subscriber.is_some() {
                tokio::task::yield_now().await;
                while let Ok(Some(update)) =
                    tokio::time::timeout(Duration::ZERO, next_progress(&mut subscriber)).await
                {
                    forward(update);
                }
            }
            answer
        })
        .await;
        let answer = match answer {
            Ok(answer) => {
                guard.id = None;
                answer
            }
            Err(_) => return Err(McpError::Timeout(timeout)),
        };
        match answer {
            Ok(ServerResult::CallToolResult(result)) => Ok(result),
            // A server that answers a call with an empty result ran it and said nothing.
            Ok(ServerResult::EmptyResult(_)) => Ok(CallToolResult::default()),
            Ok(_) => Err(McpError::Protocol(Box::new(
                rmcp::ServiceError::UnexpectedResponse,
            ))),
            Err(err) if self.remote.is_some() => {
                Err(self.remote_failure(&err).unwrap_or_else(|| err.into()))
            }
            // The write itself failed: the server's stdin was already closed (EPIPE), so the
            // server can no longer read it, and a request without its closing newline is
            // never parsed as one.
            Err(rmcp::ServiceError::TransportSend(_)) => Err(McpError::NotSent),
            Err(err) => Err(err.into()),
        }
    }

    /// Sends an MCP `ping` and waits up to `timeout` for the answer.
    pub async fn ping(&self, timeout: Duration) -> Result<(), McpError> {
        if self.peer.is_transport_closed() {
            return Err(McpError::Closed);
        }
        let request = ClientRequest::PingRequest(Default::default());
        let answer = match self
            .peer
            .send_request_with_option(request, PeerRequestOptions::with_timeout(timeout))
            .await
        {
            Ok(handle) => handle.await_response().await,
            Err(err) => Err(err),
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(err) => return Err(self.remote_failure(&err).unwrap_or_else(|| err.into())),
        };
        match answer {
            ServerResult::EmptyResult(_) => Ok(()),
            _ => Err(McpError::Protocol(Box::new(
                rmcp::ServiceError::UnexpectedResponse,
            ))),
        }
    }
}

/// Tells the server about a call whose caller stopped waiting (best effort).
struct CancelOnDrop {
    peer: Peer<RoleClient>,
    /// `None` once the answer arrived.
    id: Option<RequestId>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let peer = self.peer.clone();
        runtime.spawn(async move {
            let cancelled = CancelledNotification::new(CancelledNotificationParam::new(
                Some(id),
                Some("request abandoned by the caller".to_owned()),
            ));
            let _ = peer
                .send_notification(ClientNotification::CancelledNotification(cancelled))
                .await;
        });
    }
}

/// A server process that exists, before its MCP session does.
struct Started {
    /// The leader's pid, which is also the process group id.
    pgid: u32,
    /// The leader's start time, to tell it from a later process that reuses its pid.
    start_time: Option<u64>,
    cgroup: Option<Arc<SessionCgroup>>,
    sandbox: SandboxStatus,
    ready_cpu_weight: Option<u32>,
    /// When `initialize` and `tools/list` must be done, and the limit it came from.
    deadline: tokio::time::Instant,
    startup_timeout: Duration,
}

/// A live MCP client session on a child process that leads its own process group.
///
/// Close it with [`McpSession::close`]; dropping it only SIGKILLs the group as a last resort.
pub struct McpSession {
    /// The leader's pid, which is also the process group id.
    pgid: u32,
    /// What callers use; see [`McpSession::client`].
    client: McpClient,
    /// Stops rmcp's service task; taken by `close`.
    cancel: Option<RunningServiceCancellationToken>,
    /// `Some` once rmcp's service task has ended.
    ended: watch::Receiver<Option<ExitReason>>,
    /// Where the group is recorded, if anywhere.
    registry: Option<ProcessRegistry>,
    /// Set by `close`, so that `Drop` knows there is nothing left to do.
    closed: bool,
    /// How the server is confined (`Remote` for a remote server).
    sandbox: SandboxStatus,
    /// `Some` for a remote session: there is no process group, and ending it is a cancel.
    remote: Option<Arc<RemoteKill>>,
}

impl std::fmt::Debug for McpSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpSession")
            .field("pgid", &self.pgid)
            .field("tools", &self.client.tools().len())
            .field("ended", &*self.ended.borrow())
            .finish()
    }
}

impl McpSession {
    /// Starts the server, runs the `initialize` handshake and lists its tools, all within
    /// `startup_timeout`; on any failure the whole process group is killed and reaped.
    ///
    /// With a `confinement` the server runs inside it (see [`super::sandbox`]); its cgroup is
    /// removed when the session ends.
    pub async fn connect(
        launch: &ServerLaunch,
        confinement: Option<Confinement>,
        startup_timeout: Duration,
        registry: Option<&ProcessRegistry>,
    ) -> Result<McpSession, McpError> {
        let deadline = tokio::time::Instant::now() + startup_timeout;
        let (plan, cgroup, sandbox, ready_cpu_weight) = match confinement {
            Some(c) => (c.plan, c.cgroup, c.status, c.ready_cpu_weight),
            None => (None, None, SandboxStatus::Off, None),
        };
        let spawned = match spawn_server(launch, plan).await {
            Ok(spawned) => spawned,
            Err(err) => {
                remove_cgroup(cgroup).await;
                return Err(err);
            }
        };
        debug!(pgid = spawned.pgid, command = %launch.command, "spawned MCP server");
        let started = Started {
            pgid: spawned.pgid,
            start_time: spawned.start_time,
            cgroup,
            sandbox,
            ready_cpu_weight,
            deadline,
            startup_timeout,
        };
        Self::establish(spawned.transport, spawned.stderr, started, registry).await
    }

    /// Runs the session on a server forked from its zygote (see [`super::prefork`]): the same
    /// handshake, tool cache, end watch and close as a spawned one, over the pipes the child
    /// was given. `forked.pid` leads the child's own process group.
    pub(crate) async fn connect_forked(
        forked: super::prefork::ForkedServer,
        confinement: Confinement,
        startup_timeout: Duration,
        deadline: tokio::time::Instant,
        registry: Option<&ProcessRegistry>,
    ) -> Result<McpSession, McpError> {
        let super::prefork::ForkedServer {
            pid,
            start_time,
            stdin,
            stdout,
            stderr,
        } = forked;
        let started = Started {
            pgid: pid,
            start_time,
            cgroup: confinement.cgroup,
            sandbox: confinement.status,
            ready_cpu_weight: confinement.ready_cpu_weight,
            deadline,
            startup_timeout,
        };
        let pipes = tokio::net::unix::pipe::Receiver::from_owned_fd(stdout).and_then(|stdout| {
            Ok((
                stdout,
                tokio::net::unix::pipe::Sender::from_owned_fd(stdin)?,
            ))
        });
        let stderr = tokio::net::unix::pipe::Receiver::from_owned_fd(stderr).ok();
        let transport = match pipes {
            Ok(transport) => transport,
            Err(err) => {
                fail_start(pid, start_time, None).await;
                remove_cgroup(started.cgroup).await;
                return Err(McpError::Spawn {
                    command: "forked server".to_owned(),
                    source: err,
                });
            }
        };
        Self::establish(transport, stderr, started, registry).await
    }

    /// Everything after the server process exists: records its group, forwards its stderr,
    /// runs `initialize` and `tools/list` before `deadline`, and watches for its end.
    async fn establish<T, E, A>(
        transport: T,
        stderr: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>,
        started: Started,
        registry: Option<&ProcessRegistry>,
    ) -> Result<McpSession, McpError>
    where
        T: rmcp::transport::IntoTransport<RoleClient, E, A> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let Started {
            pgid,
            start_time,
            cgroup,
            sandbox,
            ready_cpu_weight,
            deadline,
            startup_timeout,
        } = started;
        if let Some(registry) = registry
            && let Err(err) = registry.register(pgid)
        {
            // The registry is a backstop for crashes; a session without it still works.
            warn!(pgid, cause = %err, "cannot record the process group");
        }
        if let Some(stderr) = stderr {
            tokio::spawn(forward_stderr(stderr, pgid));
        }

        let cache = Arc::new(ToolCache::new());
        let progress = ProgressDispatcher::new();
        let catalog = Arc::new(Catalog::default());
        let handler = PoolClient {
            cache: cache.clone(),
            catalog: catalog.clone(),
            progress: progress.clone(),
        };
        // rmcp's `serve` has no timeout of its own: a server that never answers would hang it.
        let running = match tokio::time::timeout_at(deadline, handler.serve(transport)).await {
            Ok(Ok(running)) => running,
            Ok(Err(err)) => {
                fail_start(pgid, start_time, registry).await;
                remove_cgroup(cgroup).await;
                return Err(McpError::Handshake(Box::new(err)));
            }
            Err(_) => {
                // Dropping the `serve` future dropped the transport, whose cleanup task
                // kills and reaps the leader; `fail_start` takes care of the rest.
                fail_start(pgid, start_time, registry).await;
                remove_cgroup(cgroup).await;
                return Err(McpError::StartupTimeout(startup_timeout));
            }
        };
        let listed = tokio::time::timeout_at(deadline, cache.refresh(running.peer())).await;
        if let Err(err) = listed
            .map_err(|_| McpError::StartupTimeout(startup_timeout))
            .and_then(|r| r)
        {
            kill_group_now(as_pgid(pgid));
            // Awaiting the service task lets rmcp reap the leader it owns.
            let _ = tokio::time::timeout(FAILED_START_REAP, running.cancel()).await;
            fail_start(pgid, start_time, registry).await;
            remove_cgroup(cgroup).await;
            return Err(err);
        }
        if let (Some(cgroup), Some(weight)) = (&cgroup, ready_cpu_weight) {
            cgroup.set_cpu_weight(weight);
        }

        let peer = running.peer().clone();
        let cancel = running.cancellation_token();
        let (ended_tx, ended) = watch::channel(None);
        let session_cgroup = cgroup.clone();
        tokio::spawn(async move {
            let reason = match running.waiting().await {
                Ok(QuitReason::Cancelled) => ExitReason::Cancelled,
                Ok(QuitReason::Closed) => ExitReason::TransportClosed,
                Ok(_) | Err(_) => ExitReason::Aborted,
            };
            if reason != ExitReason::Cancelled {
                // The server went away on its own; whatever it started must not linger until
                // the owner gets round to `close`.
                kill_group_now(as_pgid(pgid));
                info!(pgid, ?reason, "MCP session ended");
            }
            let _ = ended_tx.send(Some(reason));
            // Once the leader is reaped, nothing of the session may remain in its cgroup.
            remove_cgroup(session_cgroup).await;
        });

        Ok(McpSession {
            pgid,
            client: McpClient {
                pgid,
                peer,
                cache,
                catalog,
                progress,
                cgroup,
                ended: ended.clone(),
                remote: None,
            },
            cancel: Some(cancel),
            ended,
            registry: registry.cloned(),
            closed: false,
            sandbox,
            remote: None,
        })
    }

    /// Connects to a remote server over Streamable HTTP: `initialize` and `tools/list` within
    /// `startup_timeout`, with the user's credentials (read first, so missing ones fail with
    /// their own error). rmcp keeps the `Mcp-Session-Id`, and when the server answers 404 for
    /// it (the session expired, e.g. the server restarted) it initializes again and retries
    /// the request once, which is safe because a 404 means the request was not processed.
    pub async fn connect_remote(
        launch: &RemoteLaunch,
        startup_timeout: Duration,
    ) -> Result<McpSession, McpError> {
        use rmcp::transport::StreamableHttpClientTransport;
        use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;

        let deadline = tokio::time::Instant::now() + startup_timeout;
        let http = AuthorizedHttp::new(launch);
        http.preload()
            .await
            .map_err(|err| McpError::Unauthorized(Some(Arc::new(err))))?;
        let config = StreamableHttpClientTransportConfig::with_uri(launch.url.as_str())
            .reinit_on_expired_session(true);
        let transport = StreamableHttpClientTransport::with_client(http.clone(), config);
        let cache = Arc::new(ToolCache::new());
        let progress = ProgressDispatcher::new();
        let catalog = Arc::new(Catalog::default());
        let handler = PoolClient {
            cache: cache.clone(),
            catalog: catalog.clone(),
            progress: progress.clone(),
        };
        let kill = Arc::new(RemoteKill {
            cancel: tokio_util::sync::CancellationToken::new(),
            killed: std::sync::atomic::AtomicBool::new(false),
        });
        let running = match tokio::time::timeout_at(
            deadline,
            handler.serve_with_ct(transport, kill.cancel.clone()),
        )
        .await
        {
            Ok(Ok(running)) => running,
            Ok(Err(err)) => {
                let unauthorized = err.auth_challenge().is_some();
                return Err(if unauthorized {
                    McpError::Unauthorized(http.auth_failure())
                } else {
                    McpError::Handshake(Box::new(err))
                });
            }
            Err(_) => return Err(McpError::StartupTimeout(startup_timeout)),
        };
        let listed = tokio::time::timeout_at(deadline, cache.refresh(running.peer())).await;
        if let Err(err) = listed
            .map_err(|_| McpError::StartupTimeout(startup_timeout))
            .and_then(|r| r)
        {
            let _ = tokio::time::timeout(FAILED_START_REAP, running.cancel()).await;
            return Err(err);
        }
        let id = REMOTE_SESSION_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let peer = running.peer().clone();
        let cancel = running.cancellation_token();
        let (ended_tx, ended) = watch::channel(None);
        let watched = kill.clone();
        tokio::spawn(async move {
            let reason = match running.waiting().await {
                // Cancelled by a failed call or an unanswered ping: that is a crash.
                Ok(QuitReason::Cancelled)
                    if watched.killed.load(std::sync::atomic::Ordering::SeqCst) =>
                {
                    ExitReason::TransportClosed
                }
                Ok(QuitReason::Cancelled) => ExitReason::Cancelled,
                Ok(QuitReason::Closed) => ExitReason::TransportClosed,
                Ok(_) | Err(_) => ExitReason::Aborted,
            };
            if reason != ExitReason::Cancelled {
                info!(session = id, ?reason, "remote MCP session ended");
            }
            let _ = ended_tx.send(Some(reason));
        });
        Ok(McpSession {
            pgid: id,
            client: McpClient {
                pgid: id,
                peer,
                cache,
                catalog,
                cgroup: None,
                ended: ended.clone(),
                progress,
                remote: Some(RemoteSide {
                    http,
                    kill: kill.clone(),
                }),
            },
            cancel: Some(cancel),
            ended,
            registry: None,
            closed: false,
            sandbox: SandboxStatus::Remote,
            remote: Some(kill),
        })
    }

    /// Whether this is a session on a remote server (its "pid" is then a session id).
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// The leader's pid, which is also the process group id.
    pub fn pid(&self) -> u32 {
        self.pgid
    }

    /// How the server is confined.
    pub fn sandbox(&self) -> &SandboxStatus {
        &self.sandbox
    }

    /// The calling side, to hand out to callers.
    pub fn client(&self) -> McpClient {
        self.client.clone()
    }

    /// The cached tool list.
    pub fn tools(&self) -> Arc<Vec<Tool>> {
        self.client.tools()
    }

    /// Counts tool-list refreshes caused by `notifications/tools/list_changed`.
    pub fn tools_changed(&self) -> watch::Receiver<u64> {
        self.client.tools_changed()
    }

    /// `Some(reason)` once the session has ended; await `changed()`/`wait_for` on it.
    pub fn ended(&self) -> watch::Receiver<Option<ExitReason>> {
        self.ended.clone()
    }

    /// Resolves when the session ends, with the reason.
    pub async fn closed(&self) -> ExitReason {
        wait_ended(self.ended.clone()).await
    }

    /// Calls tool `name`; see [`McpClient::call_tool`].
    pub async fn call_tool(
        &self,
        name: &str,
        args: Option<serde_json::Map<String, serde_json::Value>>,
        timeout: Duration,
    ) -> Result<CallToolResult, McpError> {
        self.client.call_tool(name, args, timeout).await
    }

    /// Closes the session: stdin EOF, up to `grace` for the server to exit, then
    /// [`terminate_group`] (grandchildren survive their leader's graceful exit), then waits for
    /// the leader to be reaped and forgets the group in the registry.
    ///
    /// Takes at most about `3 * grace + 5 s`; a well-behaved server exits on EOF at once.
    pub async fn close(mut self, grace: Duration) {
        self.closed = true;
        if self.remote.is_some() {
            // rmcp's worker sends the `DELETE` of the session before it ends.
            if let Some(cancel) = self.cancel.take() {
                cancel.cancel();
            }
            if tokio::time::timeout(grace, wait_ended(self.ended.clone()))
                .await
                .is_err()
            {
                warn!(
                    session = self.pgid,
                    "remote MCP session did not end in time"
                );
            }
            return;
        }
        let pgid = as_pgid(self.pgid);
        if let Some(cancel) = self.cancel.take() {
            // rmcp then closes stdin and waits for the child, with SIGTERM/SIGKILL of the
            // leader only after fixed 3 s delays; the group signals below do not wait for that.
            cancel.cancel();
        }
        let exited = tokio::time::timeout(grace, wait_ended(self.ended.clone()))
            .await
            .is_ok();
        terminate_group(pgid, grace).await;
        if tokio::time::timeout(grace + REAP_MARGIN, wait_ended(self.ended.clone()))
            .await
            .is_err()
        {
            warn!(pgid, "MCP server was not reaped in time");
        }
        debug!(pgid, graceful = exited, "MCP session closed");
        if let Some(registry) = &self.registry
            && let Err(err) = registry.unregister(self.pgid)
        {
            warn!(pgid, cause = %err, "cannot remove the process group record");
        }
    }

    /// Emergency stop: SIGKILLs the whole group now. rmcp then sees EOF, reaps the leader and
    /// the session ends with [`ExitReason::TransportClosed`]; `close` is still the way to
    /// clean up the registry record.
    pub fn kill_now(&self) {
        match &self.remote {
            Some(kill) => kill.kill(),
            None => kill_group_now(as_pgid(self.pgid)),
        }
    }
}

impl Drop for McpSession {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        // Only a backstop for an owner that forgot `close`: without it, rmcp's service task
        // would keep the child alive for as long as the runtime runs.
        if let Some(cancel) = self.cancel.take() {
            cancel.cancel();
        }
        // A remote session has no group: the cancel above is all there is.
        if self.remote.is_none() && self.ended.borrow().is_none() {
            warn!(
                pgid = self.pgid,
                "McpSession dropped without close(); killing its group"
            );
            kill_group_now(as_pgid(self.pgid));
        }
    }
}

async fn wait_ended(mut ended: watch::Receiver<Option<ExitReason>>) -> ExitReason {
    match ended.wait_for(Option::is_some).await {
        Ok(reason) => reason.unwrap_or(ExitReason::Aborted),
        // The sender lives in the service-watching task; it is gone only if that task was
        // dropped, i.e. the runtime is shutting down.
        Err(_) => ExitReason::Aborted,
    }
}

/// Kills what a failed start left behind and waits for the leader to be reaped (by the task
/// rmcp spawns when its transport is dropped, or by the cancelled service).
async fn fail_start(pgid: u32, start_time: Option<u64>, registry: Option<&ProcessRegistry>) {
    kill_group_now(as_pgid(pgid));
    if !wait_group_gone(as_pgid(pgid), FAILED_START_REAP).await {
        warn!(pgid, "process group still running after a failed start");
    }
    if !wait_reaped(pgid, start_time, FAILED_START_REAP).await {
        warn!(pgid, "MCP server not reaped after a failed start");
    }
    if let Some(registry) = registry
        && let Err(err) = registry.unregister(pgid)
    {
        warn!(pgid, cause = %err, "cannot remove the process group record");
    }
}

/// Kills what is left in a session's cgroup and removes it (on a blocking thread: removal
/// waits for killed processes to exit).
async fn remove_cgroup(cgroup: Option<Arc<SessionCgroup>>) {
    if let Some(cgroup) = cgroup {
        let _ = tokio::task::spawn_blocking(move || cgroup.remove()).await;
    }
}

/// Forwards the server's stderr to tracing, line by line, until EOF.
async fn forward_stderr(stderr: impl tokio::io::AsyncRead + Unpin, pgid: u32) {
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => debug!(target: "mcp_pool::mcp::server_stderr", pgid, "{line}"),
            Ok(None) => break,
            Err(err) => {
                debug!(pgid, cause = %err, "stopped reading server stderr");
                break;
            }
        }
    }
}
