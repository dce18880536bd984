//! The MCP server one `/mcp` session (or one stateless request) talks to: the union of the
//! caller's servers, every request going through the pool.
//!
//! Tools and prompts are offered as `{server}__{name}`; resources and resource templates under
//! `mcp-pool://{server}/{original uri}` (see [`crate::mcp::names`] for why that form), also in
//! the resource links and embedded resources of tool results and prompts, so that whatever a
//! client is shown it can read back through here. Resource subscriptions
//! (`resources/subscribe`, `notifications/resources/updated`) are not passed through.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorData,
    GetPromptRequestParams, GetPromptResponse, Implementation, InitializeRequestParams,
    InitializeResult, ListPromptsResult, ListResourceTemplatesResult, ListResourcesResult,
    ListToolsResult, PaginatedRequestParams, ProgressNotificationParam, ProgressToken, Prompt,
    ProtocolVersion, ReadResourceRequestParams, ReadResourceResponse, ResourceContents,
    ServerCapabilities, ServerConfig, SubscriptionFilter, Tool,
};
use rmcp::service::{NotificationContext, RequestContext, SubscriptionContext};
use rmcp::{Peer, RoleServer, ServerHandler};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::McpCaller;
use crate::actors::{CallOptions, EventKind, PoolError, PoolEvent};
use crate::http::HttpState;
use crate::mcp::McpError;
use crate::mcp::Progress;
use crate::mcp::names::{Route, ToolRoute, namespace, namespace_by, resource_route, resource_uri};
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
    /// Namespaced name → (server, prompt), from this session's last `prompts/list`.
    prompts: Mutex<Arc<HashMap<String, Route>>>,
    /// The pool's events, subscribed before a `subscriptions/listen` is acknowledged (see
    /// [`Facade::accepted_subscription_filter`]).
    listening: Mutex<Option<broadcast::Receiver<PoolEvent>>>,
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
            prompts: Mutex::default(),
            listening: Mutex::default(),
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
        }
    }
}

/// Locks a mutex whose value is whole after every statement: a panic elsewhere cannot
/// break it.
fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Progress notifications buffered between a server and a slow client; more are dropped.
const PROGRESS_BUFFER: usize = 64;

/// Which of a user's lists an event changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Changed {
    tools: bool,
    prompts: bool,
    resources: bool,
}

impl Changed {
    const ALL: Changed = Changed {
        tools: true,
        prompts: true,
        resources: true,
    };

    fn any(self) -> bool {
        self.tools || self.prompts || self.resources
    }
}

/// What `event` changes of what `user` sees.
fn changed_by(event: &PoolEvent, user: &UserId) -> Changed {
    if &event.user_id != user {
        return Changed::default();
    }
    match event.kind {
        EventKind::ToolsChanged => Changed {
            tools: true,
            ..Changed::default()
        },
        EventKind::PromptsChanged => Changed {
            prompts: true,
            ..Changed::default()
        },
        EventKind::ResourcesChanged => Changed {
            resources: true,
            ..Changed::default()
        },
        // A server connected or disconnected: its tools, prompts and resources come or go.
        EventKind::CredentialsChanged => Changed::ALL,
        _ => Changed::default(),
    }
}

/// Waits for the next event that changes one of `user`'s lists; `None` once the pool's event
/// stream is gone. A listener that fell behind assumes it missed every kind.
async fn next_change(
    events: &mut broadcast::Receiver<PoolEvent>,
    user: &UserId,
) -> Option<Changed> {
    loop {
        match events.recv().await {
            Ok(event) => {
                let changed = changed_by(&event, user);
                if changed.any() {
                    return Some(changed);
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => return Some(Changed::ALL),
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

/// Sends a session's client `notifications/{tools,prompts,resources}/list_changed` whenever
/// those lists of `user` change, until the session ends.
async fn forward_list_changed(
    mut events: broadcast::Receiver<PoolEvent>,
    user: UserId,
    peer: Peer<RoleServer>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = next_change(&mut events, &user) => {
                let Some(changed) = changed else { return };
                if notify_session(&peer, changed).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn notify_session(
    peer: &Peer<RoleServer>,
    changed: Changed,
) -> Result<(), rmcp::ServiceError> {
    if changed.tools {
        peer.notify_tool_list_changed().await?;
    }
    if changed.prompts {
        peer.notify_prompt_list_changed().await?;
    }
    if changed.resources {
        peer.notify_resource_list_changed().await?;
    }
    Ok(())
}

/// The same for a 2026-07-28 subscription: only the kinds its filter accepted.
async fn notify_subscription(
    context: &SubscriptionContext,
    changed: Changed,
) -> Result<(), rmcp::service::SubscriptionSendError> {
    let (accepted, sink) = (context.accepted(), context.sink());
    if changed.tools && accepted.tools_list_changed == Some(true) {
        sink.notify_tool_list_changed().await?;
    }
    if changed.prompts && accepted.prompts_list_changed == Some(true) {
        sink.notify_prompt_list_changed().await?;
    }
    if changed.resources && accepted.resources_list_changed == Some(true) {
        sink.notify_resource_list_changed().await?;
    }
    Ok(())
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

    /// One list (`what`) of every server of the user, listed by `list` concurrently (at most
    /// `mcp.max_parallel_starts` at once, which bounds how many cold servers one listing
    /// starts); a server that fails is left out and logged. Only a pool that is shutting down
    /// or gone fails the listing.
    async fn gather<T, F, Fut>(
        &self,
        user: &UserId,
        what: &'static str,
        list: F,
    ) -> Result<Vec<(ServerName, T)>, ErrorData>
    where
        F: FnOnce(Vec<ServerName>, usize) -> Fut,
        Fut: std::future::Future<Output = Vec<Result<T, PoolError>>>,
    {
        let servers = self.servers_of(user).await?;
        let parallel = self.state.config.mcp.max_parallel_starts;
        let listed = list(servers.clone(), parallel).await;
        let mut available = Vec::with_capacity(servers.len());
        for (server, result) in servers.into_iter().zip(listed) {
            match result {
                Ok(items) => available.push((server, items)),
                Err(err @ (PoolError::ShuttingDown | PoolError::Unavailable)) => {
                    return Err(ErrorData::internal_error(err.to_string(), None));
                }
                Err(err) => {
                    tracing::warn!(user_id = %user, server = %server, code = err.code(), cause = %err,
                        what, "/mcp leaves out a server that cannot list");
                }
            }
        }
        Ok(available)
    }

    /// The namespaced tools of `user`, remembering the routes for later calls.
    async fn list(&self, user: &UserId) -> Result<Vec<Tool>, ErrorData> {
        let pool = &self.state.pool;
        let listed = self
            .gather(user, "tools", |servers, parallel| async move {
                pool.list_tools_of(user, &servers, parallel).await
            })
            .await?;
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
        *locked(&self.session.routes) = Arc::new(routes);
        Ok(tools)
    }

    /// Where `name` leads: this session's last listing, else a fresh one (a client may call
    /// without listing, and a stateless request always does).
    async fn route(&self, user: &UserId, name: &str) -> Result<ToolRoute, ErrorData> {
        if let Some(route) = locked(&self.session.routes).get(name) {
            return Ok(route.clone());
        }
        self.list(user).await?;
        locked(&self.session.routes)
            .get(name)
            .cloned()
            .ok_or_else(|| ErrorData::invalid_params(format!("unknown tool `{name}`"), None))
    }

    /// The namespaced prompts of `user`, remembering the routes for later `prompts/get`.
    async fn prompts(&self, user: &UserId) -> Result<Vec<Prompt>, ErrorData> {
        let pool = &self.state.pool;
        let listed = self
            .gather(user, "prompts", |servers, parallel| async move {
                pool.list_prompts_of(user, &servers, parallel).await
            })
            .await?;
        let named = namespace_by(
            listed
                .iter()
                .map(|(server, prompts)| (server, prompts.as_slice())),
            |prompt: &Prompt| prompt.name.as_str(),
        );
        let mut routes = HashMap::with_capacity(named.len());
        let mut prompts = Vec::with_capacity(named.len());
        for entry in named {
            let mut prompt = entry.item.clone();
            prompt.name.clone_from(&entry.name);
            routes.insert(
                entry.name,
                Route {
                    server: entry.server.clone(),
                    name: entry.item.name.clone(),
                },
            );
            prompts.push(prompt);
        }
        *locked(&self.session.prompts) = Arc::new(routes);
        Ok(prompts)
    }

    /// Where prompt `name` leads, as [`Facade::route`] for tools.
    async fn prompt_route(&self, user: &UserId, name: &str) -> Result<Route, ErrorData> {
        if let Some(route) = locked(&self.session.prompts).get(name) {
            return Ok(route.clone());
        }
        self.prompts(user).await?;
        locked(&self.session.prompts)
            .get(name)
            .cloned()
            .ok_or_else(|| ErrorData::invalid_params(format!("unknown prompt `{name}`"), None))
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
            McpError::Server(data) => Err((**data).clone()),
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

/// A pool error of `prompts/get` or `resources/read`: these have no `isError` result, so every
/// failure is a JSON-RPC error; the server's own (unknown prompt, resource not found, ...) is
/// passed on as it is, the pool's carries its code in `data.code`.
fn request_error(err: PoolError) -> ErrorData {
    if let PoolError::Mcp(cause) = &err
        && let McpError::Server(data) = cause.as_ref()
    {
        return (**data).clone();
    }
    // By code, so the answer of the node a request was forwarded to (cluster mode) maps alike.
    if matches!(err.code(), "arguments_too_deep" | "invalid_arguments") {
        return ErrorData::invalid_params(err.to_string(), None);
    }
    ErrorData::internal_error(
        format!("{} ({})", err, err.code()),
        Some(serde_json::json!({ "code": err.code() })),
    )
}

/// Gives the resources inside content from `server` the URIs `/mcp` hands out, so a client can
/// read what a tool result or a prompt links to or embeds.
fn map_content(server: &ServerName, content: &mut ContentBlock) {
    match content {
        ContentBlock::ResourceLink(link) => link.uri = resource_uri(server, &link.uri),
        ContentBlock::Resource(embedded) => map_contents(server, &mut embedded.resource),
        _ => {}
    }
}

fn map_contents(server: &ServerName, contents: &mut ResourceContents) {
    match contents {
        ResourceContents::TextResourceContents { uri, .. }
        | ResourceContents::BlobResourceContents { uri, .. } => {
            *uri = resource_uri(server, uri);
        }
        _ => {}
    }
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
        // `subscriptions/listen`. List changes are offered; resource updates are not.
        // Subscribed here, before rmcp acknowledges the subscription, so that no change after
        // the client has seen the acknowledgment is missed.
        *locked(&self.session.listening) = Some(self.state.pool.subscribe_events());
        let mut accepted = SubscriptionFilter::new();
        accepted.tools_list_changed = requested.tools_list_changed;
        accepted.prompts_list_changed = requested.prompts_list_changed;
        accepted.resources_list_changed = requested.resources_list_changed;
        Some(accepted)
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
        let user = self.caller(context.request_context())?;
        let subscribed = locked(&self.session.listening).take();
        let mut events = subscribed.unwrap_or_else(|| self.state.pool.subscribe_events());
        loop {
            tokio::select! {
                () = context.cancelled() => return Ok(()),
                changed = next_change(&mut events, &user) => {
                    let Some(changed) = changed else { return Ok(()) };
                    if notify_subscription(&context, changed).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_prompts()
                .enable_prompts_list_changed()
                .enable_resources()
                .enable_resources_list_changed()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
        .with_server_info(Implementation::new("mcp-pool", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "The tools and prompts of every MCP server you have connected, named \
             `{server}__{name}`, and their resources under `mcp-pool://{server}/{uri}`.",
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
            Ok(mut result) => {
                for content in &mut result.content {
                    map_content(&route.server, content);
                }
                Ok(result.into())
            }
            Err(err) => call_outcome(err).map(Into::into),
        }
    }

    #[tracing::instrument(skip_all, fields(user_id))]
    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        let user = self.caller(&context)?;
        tracing::Span::current().record("user_id", user.as_str());
        Ok(ListPromptsResult::with_all_items(
            self.prompts(&user).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(user_id, server))]
    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        let user = self.caller(&context)?;
        let span = tracing::Span::current();
        span.record("user_id", user.as_str());
        let route = self.prompt_route(&user, &request.name).await?;
        span.record("server", route.server.as_str());
        let get = self
            .state
            .pool
            .get_prompt(&user, &route.server, &route.name, request.arguments);
        let mut result = tokio::select! {
            result = get => result.map_err(request_error)?,
            () = context.ct.cancelled() => {
                return Err(ErrorData::internal_error("cancelled by the client", None));
            }
        };
        for message in &mut result.messages {
            map_content(&route.server, &mut message.content);
        }
        Ok(result.into())
    }

    #[tracing::instrument(skip_all, fields(user_id))]
    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let user = self.caller(&context)?;
        tracing::Span::current().record("user_id", user.as_str());
        let (pool, user) = (&self.state.pool, &user);
        let listed = self
            .gather(user, "resources", |servers, parallel| async move {
                pool.list_resources_of(user, &servers, parallel).await
            })
            .await?;
        let mut resources = Vec::new();
        for (server, items) in &listed {
            for item in items.iter() {
                let mut resource = item.clone();
                resource.uri = resource_uri(server, &item.uri);
                resource.name = format!("{server}__{}", item.name);
                resources.push(resource);
            }
        }
        Ok(ListResourcesResult::with_all_items(resources))
    }

    #[tracing::instrument(skip_all, fields(user_id))]
    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        let user = self.caller(&context)?;
        tracing::Span::current().record("user_id", user.as_str());
        let (pool, user) = (&self.state.pool, &user);
        let listed = self
            .gather(user, "resource templates", |servers, parallel| async move {
                pool.list_resource_templates_of(user, &servers, parallel)
                    .await
            })
            .await?;
        let mut templates = Vec::new();
        for (server, items) in &listed {
            for item in items.iter() {
                // The same mapping as resources: filling the mapped template fills the
                // server's own (see `crate::mcp::names`).
                let mut template = item.clone();
                template.uri_template = resource_uri(server, &item.uri_template);
                template.name = format!("{server}__{}", item.name);
                templates.push(template);
            }
        }
        Ok(ListResourceTemplatesResult::with_all_items(templates))
    }

    #[tracing::instrument(skip_all, fields(user_id, server))]
    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let user = self.caller(&context)?;
        let span = tracing::Span::current();
        span.record("user_id", user.as_str());
        // One answer for a URI that is not ours and one that names a server the caller has
        // not connected: which servers other users have is nobody else's business.
        let not_found =
            || ErrorData::resource_not_found(format!("unknown resource `{}`", request.uri), None);
        let (server, original) = resource_route(&request.uri).ok_or_else(not_found)?;
        // The URI names a server, never a user: it is only ever resolved among the caller's
        // own servers.
        if !self.servers_of(&user).await?.contains(&server) {
            return Err(not_found());
        }
        span.record("server", server.as_str());
        let read = self.state.pool.read_resource(&user, &server, original);
        let mut result = tokio::select! {
            result = read => result.map_err(request_error)?,
            () = context.ct.cancelled() => {
                return Err(ErrorData::internal_error("cancelled by the client", None));
            }
        };
        for contents in &mut result.contents {
            map_contents(&server, contents);
        }
        Ok(result.into())
    }
}
