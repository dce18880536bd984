//! [`PoolHandle`]: the one way into the pool for every caller (REST, chat, MCP).

use std::sync::Arc;
use std::time::Duration;

use ractor::{ActorCell, ActorRef, RpcReplyPort};
use rmcp::model::{GetPromptResult, Prompt, ReadResourceResult, Resource, ResourceTemplate, Tool};
use tokio::time::Instant;

use super::events::{EventKind, PoolEvent, PoolEvents};
use super::{PoolArgs, PoolError, PoolIndex, PoolMetrics, PoolMsg, PoolStats, Warmed};
use crate::actors::connection::{CloseReason, InFlight, Session};
use crate::actors::credential::CredentialError;
use crate::actors::fairness::{MAX_ARGUMENT_DEPTH, UserCallLimiter, arguments_depth};
use crate::cluster::{Cluster, ClusterError, ForwardError, Node, Route};
use crate::ids::{ServerName, SessionKey, UserId};
use crate::mcp::ProgressSink;
use crate::oauth::{Freshness, TokenRefresher};

/// What a caller may add to a tool call.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Receives the server's progress notifications for this call (`/mcp` forwards them to
    /// its client); REST and chat pass none.
    pub progress: Option<ProgressSink>,
}

/// Which bound a request is counted in, besides the session's calls in flight.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// `pool.max_in_flight_per_user` too: tool calls, `prompts/get`, `resources/read`.
    User,
    /// Only the session: listings, which are bounded per listing by its caller instead.
    Session,
}

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
    events: PoolEvents,
    metrics: PoolMetrics,
    /// Cluster mode: placement, leases and forwarding (`None` on a single node).
    cluster: Option<Arc<Cluster>>,
    /// The configured servers: cluster mode refuses an unknown one before it reaches the
    /// lease table or another node.
    servers: Arc<std::collections::BTreeMap<String, crate::config::ServerConfig>>,
    /// This handle serves a request another node forwarded: always here, never forwarded
    /// again (so two nodes with different views of the cluster cannot bounce a request).
    forwarded: bool,
}

/// The local half of a clustered operation.
type LocalCall<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, PoolError>> + Send + 'a>>;

/// Internal routes of cluster mode (served by `crate::http::internal`).
pub mod internal_paths {
    pub const LIST_TOOLS: &str = "/internal/v1/tools/list";
    pub const CALL_TOOL: &str = "/internal/v1/tools/call";
    pub const LIST_PROMPTS: &str = "/internal/v1/prompts/list";
    pub const GET_PROMPT: &str = "/internal/v1/prompts/get";
    pub const LIST_RESOURCES: &str = "/internal/v1/resources/list";
    pub const LIST_RESOURCE_TEMPLATES: &str = "/internal/v1/resources/templates/list";
    pub const READ_RESOURCE: &str = "/internal/v1/resources/read";
    pub const CLOSE_SESSION: &str = "/internal/v1/sessions/close";
    pub const CLOSE_USER: &str = "/internal/v1/users/close";
    pub const STATS: &str = "/internal/v1/stats";
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
            events: args.events.clone(),
            metrics: args.metrics.clone(),
            cluster: args.cluster.clone(),
            servers: args.servers.clone(),
            forwarded: false,
        }
    }

    /// The handle internal routes use: it serves every request on this node.
    pub fn serving_forwarded(&self) -> PoolHandle {
        PoolHandle {
            forwarded: true,
            ..self.clone()
        }
    }

    /// This node's cluster view, in cluster mode.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// The cluster, when a request here may be forwarded (cluster mode, not itself forwarded).
    fn forwarding(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref().filter(|_| !self.forwarded)
    }

    /// Whether this node may use its session of `key` now: always on a single node; in
    /// cluster mode only while it holds the key's lease within its local deadline.
    fn may_use(&self, key: &SessionKey) -> bool {
        self.cluster
            .as_ref()
            .is_none_or(|cluster| cluster.holds(key))
    }

    /// Runs `local` here or sends `forward` to the node that owns `key` (see `crate::cluster`).
    /// An owner that does not answer before the request is written is retried, for as long as
    /// a failover takes (its leases expire and the key is placed again); one that fails after
    /// the request was written is retried only when `forward.idempotent`.
    async fn clustered<'a, T>(
        &'a self,
        key: &SessionKey,
        forward: Forward<'_, impl FnOnce() -> serde_json::Value>,
        // A boxed future rather than an async closure: the latter's futures are not `Send`
        // for every lifetime, which `tokio::spawn` of a caller needs.
        local: impl Fn() -> LocalCall<'a, T>,
        decode: impl Fn(serde_json::Value) -> Result<T, PoolError>,
    ) -> Result<T, PoolError> {
        let Some(cluster) = self.forwarding() else {
            let result = local().await;
            if let Some(cluster) = &self.cluster {
                cluster.note_arrival(key, true);
            }
            return result;
        };
        if !self.servers.contains_key(key.server.as_str()) {
            return Err(PoolError::UnknownServer(key.server.clone()));
        }
        let Forward {
            path,
            body,
            idempotent,
            progress,
        } = forward;
        let body = body();
        let give_up = Instant::now() + cluster.failover_wait();
        let mut next: Option<Node> = None;
        loop {
            let route = match next.take() {
                Some(owner) => Route::Remote(owner),
                None => cluster.route(key).await.map_err(PoolError::cluster)?,
            };
            let node = match route {
                Route::Local => match local().await {
                    Err(PoolError::Cluster(err)) => match &*err {
                        // Taken by another node since we looked: go there.
                        ClusterError::LeasedElsewhere(owner) if Instant::now() < give_up => {
                            next = Some(owner.clone());
                            continue;
                        }
                        // Moving away from here: retried below once the lease is released.
                        ClusterError::Moving if Instant::now() < give_up => None,
                        _ => return Err(PoolError::Cluster(err)),
                    },
                    other => {
                        cluster.note_arrival(key, false);
                        return other;
                    }
                },
                Route::Remote(node) => Some(node),
            };
            let outcome = match node {
                Some(node) => Some(cluster.forward(&node, path, &body, progress).await),
                None => None,
            };
            match outcome {
                None => {}
                Some(Ok(value)) => return decode(value),
                // The other node found the lease held elsewhere (a move or a failover in
                // progress), or is leaving and refused before any work: look again after a
                // pause (its leases are released once its sessions closed).
                Some(Err(ForwardError::Answered(remote)))
                    if matches!(remote.code, "session_moved" | "shutting_down") => {}
                Some(Err(ForwardError::Answered(remote))) => {
                    return Err(PoolError::Forwarded(Arc::new(remote)));
                }
                Some(Err(ForwardError::NotSent)) => {}
                Some(Err(ForwardError::Lost)) if idempotent => {}
                Some(Err(ForwardError::Lost)) => {
                    return Err(PoolError::cluster(ClusterError::OwnerLost));
                }
                Some(Err(ForwardError::Malformed(problem))) => {
                    return Err(PoolError::cluster(ClusterError::BadAnswer(problem)));
                }
            }
            // The owner did not answer: place the key again after a pause; once the owner's
            // lease expired (or it released it on shutdown), another node takes over.
            cluster.forget_owner(key);
            if Instant::now() >= give_up {
                return Err(PoolError::cluster(ClusterError::OwnerUnreachable));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A catalog listing of `server` (prompts, resources, templates): here with `list`, or
    /// from the owner node's `route.0`, whose answer holds it under `route.1`.
    async fn listing<T, F, Fut>(
        &self,
        user: &UserId,
        server: &ServerName,
        route: (&'static str, &'static str),
        list: F,
    ) -> Result<Arc<Vec<T>>, PoolError>
    where
        T: serde::de::DeserializeOwned + Send + Sync,
        F: Fn(Session, InFlight) -> Fut + Send + Sync,
        Fut: std::future::Future<Output = Result<Arc<Vec<T>>, PoolError>> + Send,
    {
        let (path, field) = route;
        self.clustered(
            &SessionKey::new(user, server),
            Forward {
                path,
                body: || key_body(user, server),
                idempotent: true,
                progress: None,
            },
            || Box::pin(self.with_session(user, server, Limit::Session, &list)),
            |value| decode_field(value, field).map(Arc::new),
        )
        .await
    }

    /// Events from now on: starts, crashes, restarts, closes, refreshes, tool-list and
    /// credential changes, for every user (filter by `user_id` when serving one user).
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<PoolEvent> {
        self.events.subscribe()
    }

    /// The most recent events, oldest first.
    pub fn recent_events(&self) -> Vec<PoolEvent> {
        self.events.recent()
    }

    /// `user`'s credentials for `server` were just stored. A replacement closes the live
    /// session, which read the old ones at start (the next use starts a fresh one). Listeners
    /// are told either way: the servers the user may use changed.
    pub async fn credentials_stored(&self, user: &UserId, server: &ServerName, replaced: bool) {
        if replaced && let Err(err) = self.close_session(user, server).await {
            tracing::warn!(cause = %err, "could not close the session after new credentials");
        }
        self.events.publish(
            &SessionKey::new(user, server),
            EventKind::CredentialsChanged,
        );
    }

    /// `user`'s credentials for `server` were just deactivated or deleted: closes the session,
    /// which must not go on with them, and tells listeners. Returns whether one was live.
    pub async fn credentials_removed(&self, user: &UserId, server: &ServerName) -> bool {
        let closed = self
            .close_session(user, server)
            .await
            .unwrap_or_else(|err| {
                tracing::warn!(cause = %err, "could not close the session");
                false
            });
        self.events.publish(
            &SessionKey::new(user, server),
            EventKind::CredentialsChanged,
        );
        closed
    }

    /// The pool's Prometheus families, for `/metrics` to register.
    pub fn metrics(&self) -> &PoolMetrics {
        &self.metrics
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

    /// A ready session for (user, server), starting the server only if none is live.
    pub async fn get_session(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<Session, PoolError> {
        let key = SessionKey::new(user, server);
        if let Some(session) = self.index.ready(&key)
            && self.may_use(&key)
        {
            return Ok(session);
        }
        self.fetch_session(key, None).await
    }

    /// Cluster mode: takes `key`'s lease if this node does not hold it, and registers the
    /// start with the supervisor before letting go of the key's lock, so the heartbeat's
    /// release of a closed session's lease can never overtake the new session.
    async fn lease(&self, key: &SessionKey) -> Result<(), PoolError> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        if !self.servers.contains_key(key.server.as_str()) {
            return Err(PoolError::UnknownServer(key.server.clone()));
        }
        let _guard = cluster.lock_key(key).await;
        cluster
            .ensure_lease(key)
            .await
            .map_err(PoolError::cluster)?;
        let keys = vec![key.clone()];
        self.ask(|reply| PoolMsg::Warm { keys, reply }).await?;
        Ok(())
    }

    /// Asks the supervisor for `key`'s session; with `stale`, not the session of that pid.
    async fn fetch_session(
        &self,
        key: SessionKey,
        stale: Option<u32>,
    ) -> Result<Session, PoolError> {
        self.lease(&key).await?;
        // A session reaped between lookup and use is fetched again, once.
        for _ in 0..2 {
            let key = key.clone();
            match self
                .ask(|reply| PoolMsg::GetSession { key, stale, reply })
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
        let keys: Vec<SessionKey> = servers
            .iter()
            .map(|server| SessionKey::new(user, server))
            .collect();
        if self.cluster.is_some() {
            return Ok(self.warm_clustered(keys).await);
        }
        self.ask(|reply| PoolMsg::Warm { keys, reply }).await
    }

    /// Warm-up in cluster mode: a key placed here takes its lease and starts; one placed
    /// elsewhere is started there by a tool listing in the background.
    async fn warm_clustered(&self, keys: Vec<SessionKey>) -> Vec<Result<Warmed, PoolError>> {
        let mut outcomes = Vec::with_capacity(keys.len());
        for key in keys {
            let route = match self.forwarding() {
                Some(cluster) => cluster.route(&key).await.map_err(PoolError::cluster),
                None => Ok(Route::Local),
            };
            let outcome = match route {
                Ok(Route::Local) => match self.lease(&key).await {
                    Ok(()) => {
                        let keys = vec![key];
                        self.ask(|reply| PoolMsg::Warm { keys, reply })
                            .await
                            .and_then(|mut one| one.pop().unwrap_or(Err(PoolError::Unavailable)))
                    }
                    Err(PoolError::Cluster(err))
                        if matches!(*err, ClusterError::LeasedElsewhere(_)) =>
                    {
                        self.warm_elsewhere(key);
                        Ok(Warmed::Started)
                    }
                    Err(err) => Err(err),
                },
                Ok(Route::Remote(_)) => {
                    self.warm_elsewhere(key);
                    Ok(Warmed::Started)
                }
                Err(err) => Err(err),
            };
            outcomes.push(outcome);
        }
        outcomes
    }

    fn warm_elsewhere(&self, key: SessionKey) {
        let pool = self.clone();
        tokio::spawn(async move {
            if let Err(err) = pool.list_tools(&key.user, &key.server).await {
                tracing::debug!(user_id = %key.user, server = %key.server, cause = %err, "warm-up on another node failed");
            }
        });
    }

    /// The cached tool list; a restart in progress is waited for transparently. OAuth tokens
    /// due for a refresh are refreshed first.
    pub async fn list_tools(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<Arc<Vec<Tool>>, PoolError> {
        self.clustered(
            &SessionKey::new(user, server),
            Forward {
                path: internal_paths::LIST_TOOLS,
                body: || key_body(user, server),
                idempotent: true,
                progress: None,
            },
            || {
                Box::pin(async move {
                    self.ensure_fresh(user, server).await?;
                    Ok(self.get_session(user, server).await?.tools())
                })
            },
            |value| decode_field(value, "tools").map(Arc::new),
        )
        .await
    }

    /// The tool lists of several of `user`'s servers, in the order given, listed concurrently
    /// with at most `parallel` at once (each cold one also waits for one of
    /// `pool.max_concurrent_starts`). One server's failure is its own entry, never the others'.
    pub async fn list_tools_of(
        &self,
        user: &UserId,
        servers: &[ServerName],
        parallel: usize,
    ) -> Vec<Result<Arc<Vec<Tool>>, PoolError>> {
        self.each_server(user, servers, parallel, |pool, user, server| async move {
            pool.list_tools(&user, &server).await
        })
        .await
    }

    /// The server's prompts. Like a tool list, with token freshness first and a restart in
    /// progress waited for; unlike it, listed from the server on first demand and kept while
    /// the server announces changes (see [`crate::mcp::McpClient::list_prompts`]). A listing
    /// that reaches the server counts as in flight on the session (never in
    /// `pool.max_in_flight_per_user`, as for tool lists) and is retried once if it was not sent.
    pub async fn list_prompts(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<Arc<Vec<Prompt>>, PoolError> {
        self.listing(
            user,
            server,
            (internal_paths::LIST_PROMPTS, "prompts"),
            |session, slot| async move { session.list_prompts(slot).await },
        )
        .await
    }

    /// [`PoolHandle::list_prompts`] of several servers, as [`PoolHandle::list_tools_of`].
    pub async fn list_prompts_of(
        &self,
        user: &UserId,
        servers: &[ServerName],
        parallel: usize,
    ) -> Vec<Result<Arc<Vec<Prompt>>, PoolError>> {
        self.each_server(user, servers, parallel, |pool, user, server| async move {
            pool.list_prompts(&user, &server).await
        })
        .await
    }

    /// The server's resources, as [`PoolHandle::list_prompts`].
    pub async fn list_resources(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<Arc<Vec<Resource>>, PoolError> {
        self.listing(
            user,
            server,
            (internal_paths::LIST_RESOURCES, "resources"),
            |session, slot| async move { session.list_resources(slot).await },
        )
        .await
    }

    /// [`PoolHandle::list_resources`] of several servers, as [`PoolHandle::list_tools_of`].
    pub async fn list_resources_of(
        &self,
        user: &UserId,
        servers: &[ServerName],
        parallel: usize,
    ) -> Vec<Result<Arc<Vec<Resource>>, PoolError>> {
        self.each_server(user, servers, parallel, |pool, user, server| async move {
            pool.list_resources(&user, &server).await
        })
        .await
    }

    /// The server's resource templates, as [`PoolHandle::list_prompts`].
    pub async fn list_resource_templates(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<Arc<Vec<ResourceTemplate>>, PoolError> {
        self.listing(
            user,
            server,
            (
                internal_paths::LIST_RESOURCE_TEMPLATES,
                "resource_templates",
            ),
            |session, slot| async move { session.list_resource_templates(slot).await },
        )
        .await
    }

    /// [`PoolHandle::list_resource_templates`] of several servers, as
    /// [`PoolHandle::list_tools_of`].
    pub async fn list_resource_templates_of(
        &self,
        user: &UserId,
        servers: &[ServerName],
        parallel: usize,
    ) -> Vec<Result<Arc<Vec<ResourceTemplate>>, PoolError>> {
        self.each_server(user, servers, parallel, |pool, user, server| async move {
            pool.list_resource_templates(&user, &server).await
        })
        .await
    }

    /// `prompts/get`, treated as a tool call: token freshness, `pool.max_in_flight_per_user`,
    /// the call timeout, in flight on the session, the one retry of a request never sent.
    pub async fn get_prompt(
        &self,
        user: &UserId,
        server: &ServerName,
        name: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<GetPromptResult, PoolError> {
        if arguments_depth(arguments.as_ref()) > MAX_ARGUMENT_DEPTH {
            return Err(PoolError::ArgumentsTooDeep {
                max: MAX_ARGUMENT_DEPTH,
            });
        }
        let arguments = &arguments;
        self.clustered(
            &SessionKey::new(user, server),
            Forward {
                path: internal_paths::GET_PROMPT,
                body: || {
                    serde_json::json!({
                        "user_id": user, "server": server, "name": name, "arguments": arguments,
                    })
                },
                idempotent: true,
                progress: None,
            },
            || {
                Box::pin(
                    self.with_session(user, server, Limit::User, |session, slot| async move {
                        session.get_prompt(slot, name, arguments.clone()).await
                    }),
                )
            },
            decode,
        )
        .await
    }

    /// `resources/read` of `uri` (as the server spells it), treated as a tool call (see
    /// [`PoolHandle::get_prompt`]).
    pub async fn read_resource(
        &self,
        user: &UserId,
        server: &ServerName,
        uri: &str,
    ) -> Result<ReadResourceResult, PoolError> {
        self.clustered(
            &SessionKey::new(user, server),
            Forward {
                path: internal_paths::READ_RESOURCE,
                body: || serde_json::json!({ "user_id": user, "server": server, "uri": uri }),
                idempotent: true,
                progress: None,
            },
            || {
                Box::pin(
                    self.with_session(user, server, Limit::User, |session, slot| async move {
                        session.read_resource(slot, uri).await
                    }),
                )
            },
            decode,
        )
        .await
    }

    /// Runs `list` for each of `servers` concurrently, at most `parallel` at once; the
    /// results in the order given, one server's failure never the others'.
    async fn each_server<T, F, Fut>(
        &self,
        user: &UserId,
        servers: &[ServerName],
        parallel: usize,
        list: F,
    ) -> Vec<Result<T, PoolError>>
    where
        T: Send + 'static,
        F: Fn(PoolHandle, UserId, ServerName) -> Fut,
        Fut: std::future::Future<Output = Result<T, PoolError>> + Send + 'static,
    {
        let limit = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for (index, server) in servers.iter().enumerate() {
            let listing = list(self.clone(), user.clone(), server.clone());
            let limit = limit.clone();
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                (index, listing.await)
            });
        }
        let mut listed: Vec<_> = servers
            .iter()
            .map(|_| Err(PoolError::Unavailable))
            .collect();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((index, result)) => listed[index] = result,
                Err(err) => tracing::error!(cause = %err, "listing a server panicked"),
            }
        }
        listed
    }

    /// Calls a tool, after refreshing OAuth tokens due for a refresh (an in-memory check when
    /// none is). Retried only if the session was closed before the call was sent.
    /// Refused at once, before anything starts, when the arguments nest deeper than
    /// [`MAX_ARGUMENT_DEPTH`] or the user already has `pool.max_in_flight_per_user` calls in
    /// flight.
    ///
    /// Dropping the returned future cancels the call: the server gets `notifications/cancelled`.
    pub async fn call_tool(
        &self,
        user: &UserId,
        server: &ServerName,
        tool: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<rmcp::model::CallToolResult, PoolError> {
        self.call_tool_with(user, server, tool, arguments, CallOptions::default())
            .await
    }

    /// [`PoolHandle::call_tool`] with options (the server's progress notifications of the
    /// call). Every call goes through here. In cluster mode a call for a key owned by another
    /// node is forwarded there (without its progress notifications) and counted there.
    pub async fn call_tool_with(
        &self,
        user: &UserId,
        server: &ServerName,
        tool: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
        options: CallOptions,
    ) -> Result<rmcp::model::CallToolResult, PoolError> {
        // Single node: nothing to route. A call forwarded here still goes through `clustered`,
        // which counts its arrival (receiver placement moves keys by it).
        if self.cluster.is_none() {
            return self
                .call_tool_here(user, server, tool, arguments, options)
                .await;
        }
        let arguments = &arguments;
        self.clustered(
            &SessionKey::new(user, server),
            Forward {
                path: internal_paths::CALL_TOOL,
                body: || {
                    serde_json::json!({
                        "user_id": user, "server": server, "tool": tool, "arguments": arguments,
                    })
                },
                idempotent: false,
                progress: options.progress.as_ref(),
            },
            || {
                let (arguments, options) = (arguments.clone(), options.clone());
                Box::pin(async move {
                    self.call_tool_here(user, server, tool, arguments, options)
                        .await
                })
            },
            decode,
        )
        .await
    }

    /// A tool call on this node's session, with its metrics.
    async fn call_tool_here(
        &self,
        user: &UserId,
        server: &ServerName,
        tool: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
        options: CallOptions,
    ) -> Result<rmcp::model::CallToolResult, PoolError> {
        let began = Instant::now();
        let result = self
            .call_tool_once(user, server, tool, arguments, options)
            .await;
        let outcome = match &result {
            Ok(done) if done.is_error == Some(true) => "tool_error",
            Ok(_) => "ok",
            Err(err) => err.code(),
        };
        // Only configured servers get a label: an unknown name would let callers grow the
        // label set.
        if !matches!(result, Err(PoolError::UnknownServer(_))) {
            self.metrics.tool_call(server, outcome, began.elapsed());
        }
        result
    }

    async fn call_tool_once(
        &self,
        user: &UserId,
        server: &ServerName,
        tool: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
        options: CallOptions,
    ) -> Result<rmcp::model::CallToolResult, PoolError> {
        if arguments_depth(arguments.as_ref()) > MAX_ARGUMENT_DEPTH {
            return Err(PoolError::ArgumentsTooDeep {
                max: MAX_ARGUMENT_DEPTH,
            });
        }
        let (arguments, progress) = (&arguments, &options.progress);
        self.with_session(user, server, Limit::User, |session, slot| async move {
            session
                .call_reserved(slot, tool, arguments.clone(), progress.clone())
                .await
        })
        .await
    }

    /// The one path of every request that reaches a server (tool calls, prompts, resources):
    /// the user's bound on calls in flight (with [`Limit::User`]), token freshness, a ready
    /// session, the request counted in flight on it (`send`, given the session and its slot,
    /// makes the request). A request that never reached the server is sent again, once, on
    /// another session; one that may have run reports `ServerCrashed` (a tool need not be
    /// idempotent). A remote server that refused the user's credentials closes the session.
    async fn with_session<T, F, Fut>(
        &self,
        user: &UserId,
        server: &ServerName,
        limit: Limit,
        send: F,
    ) -> Result<T, PoolError>
    where
        F: Fn(Session, InFlight) -> Fut,
        Fut: std::future::Future<Output = Result<T, PoolError>>,
    {
        // Held until the request returns (or its future is dropped).
        let _permit = match limit {
            Limit::User => Some(self.user_calls.try_acquire(user).ok_or(
                PoolError::TooManyCalls {
                    retry_after: Duration::from_secs(1),
                },
            )?),
            Limit::Session => None,
        };
        self.ensure_fresh(user, server).await?;
        let session = self.get_session(user, server).await?;
        let result = match session.reserve() {
            Some(slot) => send(session.clone(), slot).await,
            // It started closing, and the pool no longer hands it out.
            None => {
                return self.retry(user, server, None, &send).await;
            }
        };
        match result {
            Err(PoolError::Reconnect) => {
                // The session is broken (its transport closed, or a write to the server
                // failed): the retry must not be handed the same session back.
                self.retry(user, server, Some(session.pid()), &send).await
            }
            // A remote server refused the user's credentials and they could not be replaced:
            // as after a revoked grant found by a freshness check, the session is closed.
            Err(PoolError::Credentials(cause))
                if matches!(*cause, CredentialError::ReconnectRequired(_)) =>
            {
                if let Err(close) = self.close_session(user, server).await {
                    tracing::warn!(cause = %close, "could not close the session after a refused token");
                }
                Err(PoolError::Credentials(cause))
            }
            other => other,
        }
    }

    /// The one retry of [`PoolHandle::with_session`], on a session other than `stale`'s.
    async fn retry<T, F, Fut>(
        &self,
        user: &UserId,
        server: &ServerName,
        stale: Option<u32>,
        send: &F,
    ) -> Result<T, PoolError>
    where
        F: Fn(Session, InFlight) -> Fut,
        Fut: std::future::Future<Output = Result<T, PoolError>>,
    {
        tracing::debug!(user_id = %user, server = %server, ?stale, "retrying a request that was not sent");
        let session = self
            .fetch_session(SessionKey::new(user, server), stale)
            .await?;
        let slot = session.reserve().ok_or(PoolError::Reconnect)?;
        send(session, slot).await
    }

    /// Closes `user`'s session of `server`, wherever it lives in the cluster.
    pub async fn close_session(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<bool, PoolError> {
        let key = SessionKey::new(user, server);
        let closed_here = {
            let key = key.clone();
            self.ask(|reply| PoolMsg::Close { key, reply }).await?
        };
        let Some(cluster) = self.forwarding() else {
            return Ok(closed_here);
        };
        // A live lease of another node means its session is there.
        match cluster
            .owner_elsewhere(&key)
            .await
            .map_err(PoolError::cluster)?
        {
            Some(owner) => {
                match cluster
                    .forward(
                        &owner,
                        internal_paths::CLOSE_SESSION,
                        &key_body(user, server),
                        None,
                    )
                    .await
                {
                    Ok(value) => Ok(closed_here || value["closed"].as_bool().unwrap_or(false)),
                    // A node that does not answer serves nothing; its lease expires.
                    Err(ForwardError::NotSent) => Ok(closed_here),
                    Err(ForwardError::Answered(remote)) => {
                        Err(PoolError::Forwarded(Arc::new(remote)))
                    }
                    Err(_) => Err(PoolError::cluster(ClusterError::OwnerLost)),
                }
            }
            None => Ok(closed_here),
        }
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
        let key = SessionKey::new(user, server);
        match &checked {
            Ok(Freshness::Refreshed) => {
                self.metrics.refreshed(server);
                self.events.publish(&key, EventKind::TokenRefreshed);
            }
            Err(err) => {
                self.metrics.refresh_failed(server);
                self.events.publish(
                    &key,
                    EventKind::TokenRefreshFailed {
                        code: err.code().to_owned(),
                    },
                );
            }
            Ok(_) => {}
        }
        match checked {
            Ok(fresh @ (Freshness::Refreshed | Freshness::RefreshedElsewhere))
                if self
                    .refresher
                    .as_ref()
                    .is_some_and(|r| r.restarts_on_refresh(server)) =>
            {
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
                    && let Err(close) = self.close_session(user, server).await
                {
                    tracing::warn!(cause = %close, "could not close the session after invalid_grant");
                }
                Err(PoolError::from_credentials(err))
            }
        }
    }

    /// Closes every session of `user`, on every node of the cluster.
    pub async fn close_user_sessions(&self, user: &UserId) -> Result<usize, PoolError> {
        let mut closed = {
            let user = user.clone();
            self.ask(|reply| PoolMsg::CloseUser { user, reply }).await?
        };
        if let Some(cluster) = self.forwarding() {
            let body = serde_json::json!({ "user_id": user });
            for node in cluster.live_nodes() {
                if node.id == cluster.node().id {
                    continue;
                }
                match cluster
                    .forward(&node, internal_paths::CLOSE_USER, &body, None)
                    .await
                {
                    Ok(value) => {
                        closed +=
                            usize::try_from(value["closed"].as_u64().unwrap_or(0)).unwrap_or(0);
                    }
                    Err(err) => {
                        tracing::warn!(node = %node.id, ?err, "could not close a user's sessions on another node");
                    }
                }
            }
        }
        Ok(closed)
    }

    // === cluster bookkeeping (the heartbeat actor) ===

    /// Keys with a session here, starting, ready or still closing.
    pub async fn live_keys(&self) -> Result<std::collections::HashSet<SessionKey>, PoolError> {
        self.ask(|reply| PoolMsg::LiveKeys { reply }).await
    }

    /// Whether `key` has a session here, starting, ready or still closing.
    pub async fn has_session(&self, key: &SessionKey) -> Result<bool, PoolError> {
        let key = key.clone();
        self.ask(|reply| PoolMsg::HasKey { key, reply }).await
    }

    /// Closes the sessions of `keys` that are ready with no call in flight (a busy one is left
    /// for a later attempt); returns those closed.
    pub async fn close_idle(
        &self,
        keys: Vec<SessionKey>,
        reason: CloseReason,
    ) -> Result<Vec<SessionKey>, PoolError> {
        self.ask(|reply| PoolMsg::CloseIdle {
            keys,
            reason,
            reply,
        })
        .await
    }

    /// Closes the sessions of `keys` at once, calls in flight or not (their lease is lost).
    pub async fn close_now(
        &self,
        keys: Vec<SessionKey>,
        reason: CloseReason,
    ) -> Result<usize, PoolError> {
        self.ask(|reply| PoolMsg::CloseKeys {
            keys,
            reason,
            reply,
        })
        .await
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

    /// Every session as the supervisor knows it: cheap, for request paths (no `/proc`, no
    /// per-server summary).
    pub async fn stats(&self) -> Result<PoolStats, PoolError> {
        self.ask(|reply| PoolMsg::Stats { reply }).await
    }

    /// [`PoolHandle::stats`] plus each session's cost and a summary per server, for the
    /// operator (`/v1/stats`, `/metrics`). Reading `/proc` happens here, on a blocking thread,
    /// off the supervisor's mailbox and off every user's request.
    pub async fn stats_with_usage(&self) -> Result<PoolStats, PoolError> {
        let mut stats = self.stats().await?;
        let metrics = self.metrics.clone();
        tokio::task::spawn_blocking(move || {
            stats.complete(&metrics);
            stats
        })
        .await
        .map_err(|_| PoolError::Unavailable)
    }

    /// Stops taking work and closes every session; returns how many were closed.
    pub async fn shutdown(&self) -> Result<usize, PoolError> {
        self.ask(|reply| PoolMsg::Shutdown { reply }).await
    }
}

/// How a request reaches the node that owns its key, when that is not this one.
struct Forward<'p, B> {
    /// The owner's internal route (`internal_paths`).
    path: &'static str,
    /// Built only when the request leaves this node.
    body: B,
    /// Whether it may be sent again after the connection broke once it was written.
    idempotent: bool,
    /// Where a forwarded call's progress goes (the owner streams it back).
    progress: Option<&'p ProgressSink>,
}

/// The body of a forwarded request that names only its key.
fn key_body(user: &UserId, server: &ServerName) -> serde_json::Value {
    serde_json::json!({ "user_id": user, "server": server })
}

/// An owner node's answer, as the type its internal route serializes.
fn decode<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, PoolError> {
    serde_json::from_value(value)
        .map_err(|err| PoolError::cluster(ClusterError::BadAnswer(err.to_string())))
}

/// The list under `field` of an owner node's answer (`{"tools": [...]}`, ...).
fn decode_field<T: serde::de::DeserializeOwned>(
    mut value: serde_json::Value,
    field: &str,
) -> Result<T, PoolError> {
    decode(value[field].take())
}
