//! The supervisor's state and its event handlers: per-key entries, starts, the restart policy
//! (intensity window, backoff, circuit), closing, reaping and shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorRef, RpcReplyPort};
use tokio::time::Instant;

use super::events::EventKind;
use super::{
    PoolArgs, PoolCounters, PoolError, PoolMsg, PoolStats, RefreshRestart, SessionReply,
    SessionStats, Warmed,
};
use crate::actors::connection::{
    CloseReason, ConnectionActor, ConnectionArgs, ConnectionMsg, HealthPolicy, Session,
    SessionShared, SessionState,
};
use crate::backoff::{AfterFailure, Circuit, RestartPolicy};
use crate::config::RemoteAuth;
use crate::config::ServerConfig;
use crate::ids::{ServerName, SessionKey, UserId};
use crate::mcp::{
    AuthScheme, RemoteCredentials, RemoteLaunch, ServerLaunch, SessionLaunch, base_environment,
};
use crate::oauth::remote::StoredCredentials;
use crate::store::CredentialWriter;
use reqwest::header::HeaderName;

/// Per-key bookkeeping of the supervisor.
struct Entry {
    shared: Arc<SessionShared>,
    actor: Option<ActorRef<ConnectionMsg>>,
    waiters: Vec<SessionReply>,
    /// Failures (crashes and failed starts) inside the restart window, and the circuit they
    /// open.
    circuit: Circuit,
    /// When the current start was asked for (cold-start time is measured from it).
    start_requested: Option<Instant>,
    /// Whether this key has ever been ready: only those restart in the background.
    ever_ready: bool,
    /// Set while the session must restart after a token refresh, once no call is in flight.
    restart_pending: bool,
}

impl Entry {
    /// No process, none coming, not refused: only failure history is kept.
    fn is_dormant(&self) -> bool {
        self.actor.is_none()
            && !self.circuit.is_open()
            && self.shared.state() != SessionState::Restarting
    }

    /// Whether `actor` is this key's current incarnation.
    fn runs(&self, actor: ActorId) -> bool {
        self.actor.as_ref().is_some_and(|a| a.get_id() == actor)
    }
}

pub struct PoolState {
    args: PoolArgs,
    entries: HashMap<SessionKey, Entry>,
    by_actor: HashMap<ActorId, SessionKey>,
    shutting_down: bool,
    counters: PoolCounters,
}

impl PoolState {
    pub(super) fn new(args: PoolArgs) -> PoolState {
        PoolState {
            args,
            entries: HashMap::new(),
            by_actor: HashMap::new(),
            shutting_down: false,
            counters: PoolCounters::default(),
        }
    }

    /// The key `actor` served, forgetting the link (its supervision event has arrived).
    pub(super) fn unlink(&mut self, actor: ActorId) -> Option<SessionKey> {
        self.by_actor.remove(&actor)
    }

    /// Starts closing every session of `user`; returns how many were live.
    pub(super) fn close_user(&mut self, user: &UserId) -> usize {
        let keys: Vec<SessionKey> = self
            .entries
            .keys()
            .filter(|key| &key.user == user)
            .cloned()
            .collect();
        keys.iter()
            .filter(|key| self.close(key, CloseReason::Requested))
            .count()
    }

    /// The last call in flight on `key` ended: finish a restart a token refresh asked for.
    pub(super) fn calls_ended(&mut self, myself: &ActorRef<PoolMsg>, key: &SessionKey) {
        if self
            .entries
            .get(key)
            .is_some_and(|entry| entry.restart_pending)
        {
            self.restart_after_refresh(myself, key);
        }
    }

    /// Drops `key` from the map and from the handles' index.
    fn forget(&mut self, key: &SessionKey) {
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
                    && entry.shared.state() != SessionState::Closing
                    && user.is_none_or(|u| &key.user == u)
            })
            .count()
    }

    /// Closes the least recently used idle session (of `user`, if given) to make room.
    fn evict_lru(&mut self, user: Option<&UserId>) -> bool {
        let victim = self
            .entries
            .iter()
            .filter(|(key, entry)| {
                entry.actor.is_some()
                    && entry.shared.state() == SessionState::Ready
                    && entry.shared.in_flight() == 0
                    && user.is_none_or(|u| &key.user == u)
            })
            .max_by_key(|(_, entry)| entry.shared.idle_for())
            .map(|(key, _)| key.clone());
        match victim {
            Some(key) => {
                tracing::info!(user_id = %key.user, server = %key.server, "Evicting least recently used session {key}");
                self.counters.evicted += 1;
                self.args.metrics.evicted(&key.server);
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

    /// Answers `reply` with `key`'s session (now, or once its start ends), starting it if
    /// nothing is live. Without `reply` (warm-up) only the start is made. Returns what it found
    /// or did; an error is also sent to `reply`.
    pub(super) async fn get_session(
        &mut self,
        myself: &ActorRef<PoolMsg>,
        key: SessionKey,
        stale: Option<u32>,
        reply: Option<SessionReply>,
    ) -> Result<Warmed, PoolError> {
        let refuse = |reply: Option<SessionReply>, err: PoolError| {
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
        let restart_policy = self.restart_policy();
        if let Some(entry) = self.entries.get_mut(&key) {
            match entry.circuit.admit() {
                Err(retry_after) => {
                    return refuse(reply, PoolError::CircuitOpen { retry_after });
                }
                Ok(true) => {
                    tracing::info!(user_id = %key.user, server = %key.server, "Cool-down over; probing {key}");
                }
                Ok(false) => {}
            }
            match (entry.shared.state(), &entry.actor) {
                (SessionState::Ready, Some(_)) => {
                    let client = entry.shared.client();
                    if let (Some(pid), Some(actor)) = (stale, &entry.actor)
                        && client.as_ref().map(|c| c.pid()) == Some(pid)
                    {
                        // A request could not be written to it: nobody else should get this
                        // session either. Killing it (a no-op for a group already dead) makes
                        // sure its end arrives as `Ended`, whose crash handling restarts the key
                        // and then answers this waiter, even for a server that closed its stdin
                        // and lingers.
                        entry.shared.set_state(SessionState::Restarting);
                        entry.waiters.extend(reply);
                        let _ = actor.send_message(ConnectionMsg::Unresponsive { pid });
                        return Ok(Warmed::Starting);
                    }
                    match (client, reply) {
                        (Some(client), Some(reply)) => {
                            let _ = reply.send(Ok(Session::new(entry.shared.clone(), client)));
                        }
                        (Some(_), None) => {}
                        (None, reply) => {
                            entry.waiters.extend(reply);
                            return Ok(Warmed::Starting);
                        }
                    }
                    return Ok(Warmed::Ready);
                }
                (SessionState::Starting | SessionState::Restarting, _) => {
                    entry.waiters.extend(reply);
                    // A restart is already scheduled, or a start is running.
                    if entry.actor.is_some() || entry.ever_ready {
                        return Ok(Warmed::Starting);
                    }
                }
                _ => entry.waiters.extend(reply),
            }
        } else {
            let filter = self
                .args
                .servers
                .get(key.server.as_str())
                .map(|server| Arc::new(server.tools.clone()))
                .unwrap_or_default();
            let shared = SessionShared::new(key.clone(), self.args.pool.call_timeout, filter);
            self.args.index.write().insert(key.clone(), shared.clone());
            self.entries.insert(
                key.clone(),
                Entry {
                    shared,
                    actor: None,
                    waiters: reply.into_iter().collect(),
                    circuit: Circuit::new(restart_policy),
                    start_requested: None,
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
    async fn start(&mut self, myself: &ActorRef<PoolMsg>, key: &SessionKey) {
        let Some(server) = self.server_config(&key.server).cloned() else {
            return;
        };
        let mut env = base_environment(&server.env_passthrough);
        env.extend(server.env.clone());
        // Checked before every spawn, with the server's own PATH: a missing program is a
        // configuration problem, reported as such and not counted as a crash (nothing ran).
        let program = match &server.url {
            Some(url) => match self.remote_launch(key, &server, url) {
                Some(launch) => Ok(launch),
                None => {
                    self.fail_waiters(key, PoolError::Unavailable);
                    return;
                }
            },
            None => server
                .resolve_program_in(env.get("PATH").map(std::ffi::OsStr::new))
                .map(|command| {
                    SessionLaunch::Process(ServerLaunch {
                        command: command.to_string_lossy().into_owned(),
                        args: server.args.clone(),
                        env,
                        cwd: None,
                    })
                }),
        };
        let launch = match program {
            Ok(launch) => launch,
            Err(err) => {
                tracing::debug!(server = %key.server, cause = %err, "MCP server program not found");
                // Like missing credentials: not retried in the background. A key whose restart
                // found the program gone must not stay "restarting" with nothing scheduled, or
                // its next request would wait for a start that never comes.
                if let Some(entry) = self.entries.get_mut(key) {
                    entry.ever_ready = false;
                    if entry.shared.state() == SessionState::Restarting {
                        entry.shared.set_state(SessionState::Starting);
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
        let restarting = entry.shared.state() == SessionState::Restarting;
        entry.start_requested.get_or_insert_with(Instant::now);
        if !restarting {
            entry.shared.set_state(SessionState::Starting);
        }
        // This incarnation reads the tokens as they are now: no restart for an earlier refresh.
        entry.restart_pending = false;
        let args = ConnectionArgs {
            shared: entry.shared.clone(),
            launch,
            sandbox: self.args.sandbox.clone(),
            prefork: self.args.prefork.zygote(key.server.as_str()),
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
            events: self.args.events.clone(),
        };
        match Actor::spawn_linked(None, ConnectionActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.counters.spawns += 1;
                self.args.metrics.spawned(&key.server);
                self.by_actor.insert(actor.get_id(), key.clone());
                if let Some(entry) = self.entries.get_mut(key) {
                    entry.actor = Some(actor);
                }
            }
            Err(err) => {
                tracing::error!(cause = %err, "cannot spawn a session actor for {key}");
                self.fail_waiters(key, PoolError::Unavailable);
            }
        }
    }

    /// A remote server's session: its URL, and the user's own credentials (read from the
    /// user's row for this server only) in the form the server takes them.
    fn remote_launch(
        &self,
        key: &SessionKey,
        server: &ServerConfig,
        url: &str,
    ) -> Option<SessionLaunch> {
        let source = || -> Arc<dyn RemoteCredentials> {
            Arc::new(StoredCredentials::new(
                key.user.clone(),
                key.server.clone(),
                self.args.credentials.store().clone(),
                self.args.refresher.clone(),
                server.auth,
            ))
        };
        let auth = match (server.auth, &server.api_key_header) {
            (RemoteAuth::None, _) => None,
            (RemoteAuth::ApiKey, Some(header)) => HeaderName::from_bytes(header.as_bytes())
                .ok()
                .map(|name| (AuthScheme::Header(name), source())),
            (RemoteAuth::Oauth | RemoteAuth::ApiKey, _) => Some((AuthScheme::Bearer, source())),
        };
        Some(SessionLaunch::Remote(RemoteLaunch {
            url: url.to_owned(),
            auth,
            http: self.args.remote_http.clone()?,
        }))
    }

    fn fail_waiters(&mut self, key: &SessionKey, err: PoolError) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        for waiter in entry.waiters.drain(..) {
            let _ = waiter.send(Err(err.clone()));
        }
        // The entry stays, dormant, so its failure history can trip the circuit; the reaper
        // forgets it once that history is old.
    }

    fn entry_of(&mut self, actor: ActorId) -> Option<(&SessionKey, &mut Entry)> {
        let key = self.by_actor.get(&actor)?;
        let entry = self.entries.get_mut(key)?;
        entry.runs(actor).then_some((key, entry))
    }

    pub(super) fn on_ready(
        &mut self,
        myself: &ActorRef<PoolMsg>,
        actor: ActorId,
        session: Session,
    ) {
        let (metrics, events) = (self.args.metrics.clone(), self.args.events.clone());
        let Some((key, entry)) = self.entry_of(actor) else {
            return;
        };
        let restart = entry.ever_ready;
        entry.ever_ready = true;
        let cold_start = entry
            .start_requested
            .take()
            .map(|since| since.elapsed())
            .unwrap_or_default();
        metrics.started(&key.server, cold_start);
        events.publish(
            key,
            EventKind::Started {
                pid: Some(session.pid()),
                cold_start_ms: cold_start.as_millis() as u64,
                restart,
            },
        );
        for waiter in entry.waiters.drain(..) {
            let _ = waiter.send(Ok(session.clone()));
        }
        // Tokens were refreshed while this session started: it may have read the old ones.
        if entry.restart_pending {
            let key = key.clone();
            self.restart_after_refresh(myself, &key);
        }
    }

    /// Records a failure; returns the backoff before the next attempt, or `None` when the key
    /// just exceeded its intensity and is now refused for the cool-down.
    fn record_failure(&mut self, key: &SessionKey) -> Option<Duration> {
        let entry = self.entries.get_mut(key)?;
        match entry.circuit.record_failure() {
            AfterFailure::Retry { delay, .. } => Some(delay),
            AfterFailure::Open { cooldown } => {
                entry.shared.set_state(SessionState::Failed);
                let attempts = entry.circuit.attempts();
                tracing::error!(
                    user_id = %key.user, server = %key.server, attempts,
                    "Session {key} failed {attempts} times within {:?}; refusing it for {cooldown:?}",
                    self.args.pool.restart_window
                );
                self.args.events.publish(
                    key,
                    EventKind::CircuitOpened {
                        cooldown_secs: cooldown.as_secs(),
                    },
                );
                None
            }
        }
    }

    /// `[pool]`'s restart intensity, backoff and cool-down.
    fn restart_policy(&self) -> RestartPolicy {
        let pool = &self.args.pool;
        RestartPolicy {
            max_restarts: pool.max_restarts,
            window: pool.restart_window,
            cooldown: pool.failed_cooldown,
            backoff_base: pool.restart_backoff_base,
            backoff_cap: pool.restart_backoff_cap,
        }
    }

    pub(super) fn on_start_failed(
        &mut self,
        myself: &ActorRef<PoolMsg>,
        key: SessionKey,
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
        entry.start_requested = None;
        self.args.events.publish(
            &key,
            EventKind::StartFailed {
                code: error.code().to_owned(),
            },
        );
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

    pub(super) fn on_crash(
        &mut self,
        myself: &ActorRef<PoolMsg>,
        key: SessionKey,
        actor: ActorId,
        cause: &str,
    ) {
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
        tracing::warn!(user_id = %key.user, server = %key.server, cause, "Session {key} crashed");
        self.args.metrics.crashed(&key.server);
        self.args.events.publish(
            &key,
            EventKind::Crashed {
                cause: cause.to_owned(),
            },
        );
        match self.record_failure(&key) {
            Some(delay) => self.schedule_restart(myself, &key, delay),
            None => {
                let retry_after = self.args.pool.failed_cooldown;
                self.fail_waiters(&key, PoolError::CircuitOpen { retry_after });
            }
        }
    }

    fn schedule_restart(&mut self, myself: &ActorRef<PoolMsg>, key: &SessionKey, delay: Duration) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        entry.shared.set_state(SessionState::Restarting);
        entry.shared.count_restart();
        self.counters.restarts += 1;
        self.args.metrics.restart_scheduled(&key.server);
        let attempt = entry.circuit.attempts();
        self.args.events.publish(
            key,
            EventKind::RestartScheduled {
                attempt,
                backoff_ms: delay.as_millis() as u64,
            },
        );
        tracing::warn!(
            user_id = %key.user, server = %key.server, attempt, backoff_ms = delay.as_millis() as u64,
            "Restarting MCP session {key} (attempt {attempt}) in {delay:?}"
        );
        let key = key.clone();
        myself.send_after(delay, move || PoolMsg::Restart { key });
    }

    pub(super) async fn on_restart(&mut self, myself: &ActorRef<PoolMsg>, key: SessionKey) {
        let Some(entry) = self.entries.get(&key) else {
            return;
        };
        if self.shutting_down
            || entry.actor.is_some()
            || entry.shared.state() != SessionState::Restarting
        {
            return;
        }
        self.start(myself, &key).await;
    }

    pub(super) fn on_terminated(&mut self, key: &SessionKey, actor: ActorId) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        // A closed actor's key may already hold a newer incarnation: leave that alone.
        if !entry.runs(actor) {
            return;
        }
        entry.actor = None;
        if !entry.circuit.is_open() && entry.shared.state() != SessionState::Restarting {
            let waiters = std::mem::take(&mut entry.waiters);
            self.forget(key);
            for waiter in waiters {
                let _ = waiter.send(Err(PoolError::Reconnect));
            }
        }
    }

    /// Starts closing `key`'s session; returns whether there was a live one.
    pub(super) fn close(&mut self, key: &SessionKey, reason: CloseReason) -> bool {
        let Some(entry) = self.entries.get_mut(key) else {
            return false;
        };
        let Some(actor) = entry.actor.take() else {
            // Nothing running (failed or awaiting a restart): forget the key.
            self.forget(key);
            return false;
        };
        entry.shared.set_state(SessionState::Closing);
        let waiters = std::mem::take(&mut entry.waiters);
        self.forget(key);
        for waiter in waiters {
            let _ = waiter.send(Err(PoolError::Reconnect));
        }
        self.args.events.publish(
            key,
            EventKind::Closed {
                reason: reason.as_str().to_owned(),
            },
        );
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
    pub(super) fn restart_after_refresh(
        &mut self,
        myself: &ActorRef<PoolMsg>,
        key: &SessionKey,
    ) -> RefreshRestart {
        let Some(entry) = self.entries.get_mut(key) else {
            return RefreshRestart::NotLive;
        };
        if entry.actor.is_none() {
            return RefreshRestart::NotLive;
        }
        match entry.shared.state() {
            SessionState::Ready if entry.shared.try_begin_close() => {
                entry.restart_pending = false;
                tracing::info!(user_id = %key.user, server = %key.server, "Restarting the session after a token refresh");
                self.close(key, CloseReason::Refresh);
                RefreshRestart::Now
            }
            SessionState::Ready => {
                entry.restart_pending = true;
                // Woken by the last call's end, not by polling; a call ends within its timeout.
                let (shared, myself, key) = (entry.shared.clone(), myself.clone(), key.clone());
                tokio::spawn(async move {
                    shared.calls_ended().await;
                    let _ = myself.send_message(PoolMsg::CallsEnded { key });
                });
                RefreshRestart::AfterCalls
            }
            SessionState::Starting => {
                entry.restart_pending = true;
                RefreshRestart::AfterCalls
            }
            SessionState::Restarting | SessionState::Failed | SessionState::Closing => {
                RefreshRestart::NotLive
            }
        }
    }

    /// Keys with a session here in any stage, including one still closing (its actor has not
    /// terminated): cluster mode keeps the lease until the process is gone.
    pub(super) fn live_keys(&self) -> std::collections::HashSet<SessionKey> {
        self.entries
            .keys()
            .chain(self.by_actor.values())
            .cloned()
            .collect()
    }

    pub(super) fn has_key(&self, key: &SessionKey) -> bool {
        self.entries.contains_key(key) || self.by_actor.values().any(|k| k == key)
    }

    /// Closes those of `keys` that are ready with no call in flight, with the handshake the
    /// idle reaper uses (a call and this close never both proceed).
    pub(super) fn close_idle(
        &mut self,
        keys: &[SessionKey],
        reason: CloseReason,
    ) -> Vec<SessionKey> {
        let idle: Vec<SessionKey> = keys
            .iter()
            .filter(|key| {
                self.entries.get(*key).is_some_and(|entry| {
                    entry.actor.is_some()
                        && entry.shared.state() == SessionState::Ready
                        && entry.shared.try_begin_close()
                })
            })
            .cloned()
            .collect();
        for key in &idle {
            tracing::info!(user_id = %key.user, server = %key.server, reason = reason.as_str(), "Closing a session that belongs on another node");
            self.close(key, reason);
        }
        idle
    }

    pub(super) fn reap_idle(&mut self) -> usize {
        let idle_timeout = self.args.pool.idle_timeout;
        let idle: Vec<SessionKey> = self
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
            self.args.metrics.reaped(&key.server);
            self.close(key, CloseReason::Idle);
            tracing::info!(user_id = %key.user, server = %key.server, "Cleaned up idle session: {key}");
        }
        // Failed keys whose cool-down is long over are forgotten, so the map does not grow.
        let now = Instant::now();
        self.entries.retain(|_, entry| {
            entry.actor.is_some()
                || !entry.waiters.is_empty()
                || entry.shared.state() == SessionState::Restarting
                || entry
                    .circuit
                    .open_until()
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

    pub(super) fn stats(&self) -> PoolStats {
        let mut connections: Vec<SessionStats> = self
            .entries
            .iter()
            .filter(|(_, entry)| !entry.is_dormant())
            .map(|(key, entry)| SessionStats {
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
                failures: entry.circuit.attempts(),
                memory_bytes: None,
                cpu_seconds: None,
                started: entry.shared.started(),
            })
            .collect();
        connections.sort_by(|a, b| (&a.user_id, &a.server).cmp(&(&b.user_id, &b.server)));
        let live: Vec<&SessionStats> = connections
            .iter()
            .filter(|c| c.state != SessionState::Failed)
            .collect();
        let mut user_breakdown = std::collections::BTreeMap::new();
        for conn in &live {
            *user_breakdown.entry(conn.user_id.to_string()).or_insert(0) += 1;
        }
        PoolStats {
            total_connections: live.len(),
            active_connections: live
                .iter()
                .filter(|c| c.state == SessionState::Ready)
                .count(),
            user_breakdown,
            connections,
            servers: Default::default(),
            counters: self.counters,
            prefork: self.args.prefork.stats(),
        }
    }

    pub(super) fn shutdown(&mut self, reply: RpcReplyPort<usize>) {
        self.shutting_down = true;
        let mut closing = Vec::new();
        self.args.index.write().clear();
        for (key, mut entry) in self.entries.drain() {
            for waiter in entry.waiters.drain(..) {
                let _ = waiter.send(Err(PoolError::ShuttingDown));
            }
            if let Some(actor) = entry.actor.take() {
                entry.shared.set_state(SessionState::Closing);
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
                    tracing::warn!("session {key} was already gone at shutdown");
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
