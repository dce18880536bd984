//! [`PoolHandle`]: the one way into the pool for every caller (REST, chat, MCP).

use std::sync::Arc;
use std::time::Duration;

use ractor::{ActorCell, ActorRef, RpcReplyPort};
use rmcp::model::{GetPromptResult, Prompt, ReadResourceResult, Resource, ResourceTemplate, Tool};
use tokio::time::Instant;

use super::events::{EventKind, PoolEvent, PoolEvents};
use super::{PoolArgs, PoolError, PoolIndex, PoolMetrics, PoolMsg, PoolStats, Warmed};
use crate::actors::connection::{InFlight, Session};
use crate::actors::credential::CredentialError;
use crate::actors::fairness::{MAX_ARGUMENT_DEPTH, UserCallLimiter, arguments_depth};
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
        }
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
        if let Some(session) = self.index.ready(&key) {
            return Ok(session);
        }
        self.fetch_session(key, None).await
    }

    /// Asks the supervisor for `key`'s session; with `stale`, not the session of that pid.
    async fn fetch_session(
        &self,
        key: SessionKey,
        stale: Option<u32>,
    ) -> Result<Session, PoolError> {
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
        let keys = servers
            .iter()
            .map(|server| SessionKey::new(user, server))
            .collect();
        self.ask(|reply| PoolMsg::Warm { keys, reply }).await
    }

    /// The cached tool list; a restart in progress is waited for transparently. OAuth tokens
    /// due for a refresh are refreshed first.
    pub async fn list_tools(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<Arc<Vec<Tool>>, PoolError> {
        self.ensure_fresh(user, server).await?;
        Ok(self.get_session(user, server).await?.tools())
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
        self.with_session(user, server, Limit::Session, |session, slot| async move {
            session.list_prompts(slot).await
        })
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
        self.with_session(user, server, Limit::Session, |session, slot| async move {
            session.list_resources(slot).await
        })
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
        self.with_session(user, server, Limit::Session, |session, slot| async move {
            session.list_resource_templates(slot).await
        })
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
        self.with_session(user, server, Limit::User, |session, slot| async move {
            session.get_prompt(slot, name, arguments.clone()).await
        })
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
        self.with_session(user, server, Limit::User, |session, slot| async move {
            session.read_resource(slot, uri).await
        })
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
    /// call). Every call goes through here.
    pub async fn call_tool_with(
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

    pub async fn close_session(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<bool, PoolError> {
        let key = SessionKey::new(user, server);
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

    pub async fn close_user_sessions(&self, user: &UserId) -> Result<usize, PoolError> {
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
