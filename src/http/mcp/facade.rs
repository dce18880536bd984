//! The MCP server one `/mcp` session (or one stateless request) talks to: the union of the
//! caller's servers, every request going through the pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorData,
    Implementation, InitializeRequestParams, InitializeResult, ListToolsResult,
    PaginatedRequestParams, ProgressNotificationParam, ProgressToken, ProtocolVersion,
    ServerCapabilities, ServerConfig, SubscriptionFilter, Tool,
};
use rmcp::service::{NotificationContext, RequestContext, SubscriptionContext};
use rmcp::{Peer, RoleServer, ServerHandler};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::McpCaller;
use crate::actors::{CallOptions, EventKind, PoolError, PoolEvent};
use crate::http::HttpState;
use crate::mcp::Progress;
use crate::mcp::names::{ToolRoute, namespace};
use crate::store::{ServerName, UserId};

/// The protocol revisions served: two with sessions, one without (see the module docs).
const VERSIONS: &[ProtocolVersion] = &[
    ProtocolVersion::V_2025_06_18,
    ProtocolVersion::V_2025_11_25,
    ProtocolVersion::V_2026_07_28,
];

/// One session's handler (rmcp builds one per session, and one per stateless request).
#[derive(Clone)]
pub struct Facade {
    state: HttpState,
    session: Arc<Session>,
}

/// What one session remembers.
struct Session {
    /// The user who initialized it; every later request must come from them.
    user: OnceLock<UserId>,
    /// Namespaced name → (server, tool), from this session's last `tools/list`.
    routes: Mutex<Arc<HashMap<String, ToolRoute>>>,
    /// Ends the session's `list_changed` forwarder when rmcp drops the session's handler.
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl Default for Session {
    fn default() -> Self {
        let stop = CancellationToken::new();
        Session {
            user: OnceLock::new(),
            routes: Mutex::default(),
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
        }
    }
}

/// Progress notifications buffered between a server and a slow client; more are dropped.
const PROGRESS_BUFFER: usize = 64;

/// Whether `event` changes what `user` sees in `tools/list`.
fn changes_tools_of(event: &PoolEvent, user: &UserId) -> bool {
    &event.user_id == user
        && matches!(
            event.kind,
            EventKind::ToolsChanged | EventKind::CredentialsChanged
        )
}

/// Waits for the next event that changes `user`'s tool list; `false` once the pool's event
/// stream is gone. A listener that fell behind assumes it missed one.
async fn next_tools_change(events: &mut broadcast::Receiver<PoolEvent>, user: &UserId) -> bool {
    loop {
        match events.recv().await {
            Ok(event) if changes_tools_of(&event, user) => return true,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return true,
            Err(broadcast::error::RecvError::Closed) => return false,
        }
    }
}

/// Sends `notifications/tools/list_changed` to a session's client whenever `user`'s tools
/// change, until the session ends.
async fn forward_list_changed(
    mut events: broadcast::Receiver<PoolEvent>,
    user: UserId,
    peer: Peer<RoleServer>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = next_tools_change(&mut events, &user) => {
                if !changed || peer.notify_tool_list_changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Relays a call's progress to the client under the client's own token.
async fn forward_progress(
    mut updates: mpsc::Receiver<Progress>,
    token: ProgressToken,
    peer: Peer<RoleServer>,
) {
    while let Some(update) = updates.recv().await {
        let mut param = ProgressNotificationParam::new(token.clone(), update.progress);
        param.total = update.total;
        param.message = update.message;
        if peer.notify_progress(param).await.is_err() {
            return;
        }
    }
}

impl Facade {
    pub fn new(state: HttpState) -> Facade {
        Facade {
            state,
            session: Arc::new(Session::default()),
        }
    }

    /// The verified caller of this request (from [`super::gate`]), who must be the session's
    /// user. Never serves a request without one.
    fn caller(&self, context: &RequestContext<RoleServer>) -> Result<UserId, ErrorData> {
        let user = context
            .extensions
            .get::<axum::http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<McpCaller>())
            .map(|caller| caller.0.clone())
            .ok_or_else(|| {
                tracing::error!("an /mcp request reached the handler without a verified user");
                ErrorData::internal_error("unauthenticated request", None)
            })?;
        match self.session.user.get() {
            Some(owner) if owner != &user => {
                // The gate refuses this first; kept so the handler holds the rule on its own.
                Err(ErrorData::invalid_request(
                    "this session belongs to another user",
                    None,
                ))
            }
            _ => Ok(user),
        }
    }

    /// The servers the user has active credentials for, that are still configured.
    async fn servers_of(&self, user: &UserId) -> Result<Vec<ServerName>, ErrorData> {
        let rows = self
            .state
            .store
            .list(Some(user), false)
            .await
            .map_err(|err| {
                tracing::error!(cause = %err, "listing the user's credentials failed");
                ErrorData::internal_error("internal error; it has been logged", None)
            })?;
        let mut servers: Vec<ServerName> = rows
            .into_iter()
            .map(|row| row.server_name)
            .filter(|server| self.state.config.server(server).is_some())
            .collect();
        servers.dedup();
        Ok(servers)
    }

    /// Every server's tools, listed concurrently (at most `mcp.max_parallel_starts` at once,
    /// which bounds how many cold servers one listing starts); a server that fails is left out
    /// and logged. Only a pool that is shutting down or gone fails the listing.
    async fn gather(&self, user: &UserId) -> Result<Vec<(ServerName, Arc<Vec<Tool>>)>, ErrorData> {
        let servers = self.servers_of(user).await?;
        let parallel = self.state.config.mcp.max_parallel_starts;
        let listed = self
            .state
            .pool
            .list_tools_of(user, &servers, parallel)
            .await;
        let mut available = Vec::with_capacity(servers.len());
        for (server, result) in servers.into_iter().zip(listed) {
            match result {
                Ok(tools) => available.push((server, tools)),
                Err(err @ (PoolError::ShuttingDown | PoolError::Unavailable)) => {
                    return Err(ErrorData::internal_error(err.to_string(), None));
                }
                Err(err) => {
                    tracing::warn!(user_id = %user, server = %server, code = err.code(), cause = %err,
                        "/mcp tools/list leaves out a server that cannot list its tools");
                }
            }
        }
        Ok(available)
    }

    /// The namespaced tools of `user`, remembering the routes for later calls.
    async fn list(&self, user: &UserId) -> Result<Vec<Tool>, ErrorData> {
        let listed = self.gather(user).await?;
        let named = namespace(
            listed
                .iter()
                .map(|(server, tools)| (server, tools.as_slice())),
        );
        let mut routes = HashMap::with_capacity(named.len());
        let mut tools = Vec::with_capacity(named.len());
        for entry in named {
            let mut tool = entry.tool.clone();
            tool.name = entry.name.clone().into();
            routes.insert(
                entry.name,
                ToolRoute {
                    server: entry.server.clone(),
                    tool: entry.tool.name.to_string(),
                },
            );
            tools.push(tool);
        }
        *self.routes() = Arc::new(routes);
        Ok(tools)
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, Arc<HashMap<String, ToolRoute>>> {
        self.session
            .routes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Where `name` leads: this session's last listing, else a fresh one (a client may call
    /// without listing, and a stateless request always does).
    async fn route(&self, user: &UserId, name: &str) -> Result<ToolRoute, ErrorData> {
        if let Some(route) = self.routes().get(name) {
            return Ok(route.clone());
        }
        self.list(user).await?;
        self.routes()
            .get(name)
            .cloned()
            .ok_or_else(|| ErrorData::invalid_params(format!("unknown tool `{name}`"), None))
    }
}

/// A pool error as MCP wants it: requests that cannot be routed or whose arguments are wrong
/// are protocol errors; everything that went wrong running the tool is a result with
/// `isError`, so the model (and the user) read what happened.
fn call_outcome(err: PoolError) -> Result<CallToolResult, ErrorData> {
    match &err {
        PoolError::UnknownTool(_) | PoolError::ArgumentsTooDeep { .. } => {
            Err(ErrorData::invalid_params(err.to_string(), None))
        }
        PoolError::Mcp(cause) => match cause.as_ref() {
            // The server's own JSON-RPC error (bad arguments, unknown tool, ...), passed on.
            crate::mcp::McpError::Server(data) => Err((**data).clone()),
            _ => Ok(tool_failure(&err)),
        },
        PoolError::ShuttingDown | PoolError::Unavailable => {
            Err(ErrorData::internal_error(err.to_string(), None))
        }
        // The same cases, answered by the node the call was forwarded to (cluster mode).
        PoolError::Forwarded(remote)
            if matches!(
                remote.code,
                "unknown_tool" | "arguments_too_deep" | "invalid_arguments"
            ) =>
        {
            Err(ErrorData::invalid_params(remote.message.clone(), None))
        }
        _ => Ok(tool_failure(&err)),
    }
}

fn tool_failure(err: &PoolError) -> CallToolResult {
    let mut result = CallToolResult::error(vec![ContentBlock::text(format!(
        "{} ({})",
        err,
        err.code()
    ))]);
    result.structured_content =
        Some(serde_json::json!({ "error": { "code": err.code(), "message": err.to_string() } }));
    result
}

impl ServerHandler for Facade {
    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        // Subscribed before the client can list, so no change after its first listing is
        // missed.
        if let Some(user) = self.session.user.get() {
            tokio::spawn(forward_list_changed(
                self.state.pool.subscribe_events(),
                user.clone(),
                context.peer,
                self.session.stop.clone(),
            ));
        }
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        // 2026-07-28 has no sessions: a client asks for notifications with
        // `subscriptions/listen`, and only tool-list changes are offered.
        let mut accepted = SubscriptionFilter::new();
        accepted.tools_list_changed = requested.tools_list_changed;
        Some(accepted)
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
        let user = self.caller(context.request_context())?;
        let mut events = self.state.pool.subscribe_events();
        loop {
            tokio::select! {
                () = context.cancelled() => return Ok(()),
                changed = next_tools_change(&mut events, &user) => {
                    if !changed || context.sink().notify_tool_list_changed().await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
        .with_server_info(Implementation::new("mcp-pool", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "The tools of every MCP server you have connected, named `{server}__{tool}`.",
        )
    }

    fn supported_protocol_versions(&self) -> std::borrow::Cow<'static, [ProtocolVersion]> {
        std::borrow::Cow::Borrowed(VERSIONS)
    }

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        let user = self.caller(&context)?;
        let _ = self.session.user.set(user);
        context.peer.set_peer_info(request.clone());
        self.negotiate_initialize(&request)
    }

    #[tracing::instrument(skip_all, fields(user_id))]
    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let user = self.caller(&context)?;
        tracing::Span::current().record("user_id", user.as_str());
        Ok(ListToolsResult::with_all_items(self.list(&user).await?))
    }

    #[tracing::instrument(skip_all, fields(user_id, server))]
    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let user = self.caller(&context)?;
        let span = tracing::Span::current();
        span.record("user_id", user.as_str());
        let route = self.route(&user, &request.name).await?;
        span.record("server", route.server.as_str());
        let mut options = CallOptions::default();
        let mut forwarder = None;
        if let Some(token) = context.meta.get_progress_token() {
            let (sink, updates) = mpsc::channel(PROGRESS_BUFFER);
            options.progress = Some(sink);
            forwarder = Some(tokio::spawn(forward_progress(
                updates,
                token,
                context.peer.clone(),
            )));
        }
        let call = self.state.pool.call_tool_with(
            &user,
            &route.server,
            &route.tool,
            request.arguments,
            options,
        );
        // Dropping the call on the client's `notifications/cancelled` cancels it upstream
        // (the server gets its own `notifications/cancelled`).
        let result = tokio::select! {
            result = call => result,
            () = context.ct.cancelled() => {
                return Err(ErrorData::internal_error("cancelled by the client", None));
            }
        };
        // The sink went with the call: the forwarder ends after the last update, so every
        // progress notification goes out before the result.
        if let Some(forwarder) = forwarder {
            let _ = forwarder.await;
        }
        match result {
            Ok(result) => Ok(result.into()),
            Err(err) => call_outcome(err).map(Into::into),
        }
    }
}
