//! Wiring: builds the store, the actors and (later) the HTTP facade from a validated [`Config`],
//! and runs them until a shutdown signal.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;

use crate::actors::{
    CredentialArgs, CredentialError, CredentialHandle, GuardianMsg, HeartbeatArgs, HeartbeatHandle,
    PoolArgs, PoolGuardian, PoolHandle, PoolTree, RefreshArgs, TokenRefreshHandle,
};
use crate::config::{Config, ENCRYPTION_KEYS_ENV};
use crate::mcp::prefork::Prefork;
use crate::mcp::sandbox::SandboxSettings;
use crate::mcp::{McpError, ProcessRegistry, Sandbox, SandboxMode};
use crate::oauth::TokenRefresher;
use crate::store::{CredentialFiles, CredentialSpec, ServerName, Store, StoreError, StoreOptions};

/// Why the application could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error("data directory {path}: {cause}")]
    DataDir {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error("credentials directory {path}: {cause}")]
    CredentialsDir {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Process(#[from] McpError),
    #[error("cannot start an actor: {0}")]
    Spawn(#[from] ractor::SpawnErr),
    #[error("HTTP authentication: {0}")]
    Auth(#[from] crate::http::AuthSetupError),
    #[error("OAuth setup: {0}")]
    OAuth(#[from] crate::oauth::OAuthError),
    #[error("cannot listen on {addr}: {cause}")]
    Listen {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
    /// The pool tree kept failing and its guardian gave up: the service stopped so that its
    /// process manager can start it afresh.
    #[error("the connection pool failed repeatedly and was given up; the service stopped")]
    PoolFailed,
    #[error(
        "the configured capacity needs {needed} open files ({per_session} per session × \
         pool.max_connections = {sessions}, + http.max_open_connections = {http}, \
         + database.max_connections = {database}, + {headroom} spare), but RLIMIT_NOFILE allows \
         only {limit} (hard limit); lower pool.max_connections or http.max_open_connections, or \
         raise the hard limit (systemd LimitNOFILE=, ulimit -Hn)"
    )]
    OpenFiles {
        needed: u64,
        limit: u64,
        per_session: u64,
        sessions: usize,
        http: usize,
        database: u32,
        headroom: u64,
    },
    #[error("cannot read or raise RLIMIT_NOFILE: {0}")]
    Rlimit(std::io::Error),
    #[error("cluster secret: {0}")]
    ClusterSecret(crate::http::AuthSetupError),
    #[error("cannot join the cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (the common soft default of 1,024 fits
/// only about 250 sessions) and refuses to start when even the hard limit cannot hold what the
/// configuration allows ([`Config::required_open_files`]). Returns the new soft limit.
pub fn raise_open_files_limit(config: &Config) -> Result<u64, AppError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|errno| AppError::Rlimit(std::io::Error::from(errno)))?;
    let needed = config.required_open_files();
    if needed > hard {
        return Err(AppError::OpenFiles {
            needed,
            limit: hard,
            per_session: crate::config::FDS_PER_SESSION,
            sessions: config.pool.max_connections,
            http: config.http.max_open_connections,
            database: config.database.max_connections,
            headroom: crate::config::FDS_HEADROOM,
        });
    }
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .map_err(|errno| AppError::Rlimit(std::io::Error::from(errno)))?;
        tracing::debug!(
            from = soft,
            to = hard,
            needed,
            "Raised the soft RLIMIT_NOFILE"
        );
    }
    Ok(hard)
}

/// Warns once per configured server whose program cannot be found, naming both. Start-up goes
/// on: other servers may work, and requests for this one get `server_program_not_found`.
pub fn warn_missing_programs(config: &Config) -> usize {
    let mut missing = 0;
    // A remote server (`url`) runs no program here.
    for (name, server) in config.servers.iter().filter(|(_, s)| !s.is_remote()) {
        if let Err(err) = server.resolve_program() {
            missing += 1;
            tracing::warn!(
                server = %name,
                program = %err.program,
                "MCP server `{name}` cannot start on this host: {err}; its requests will fail with server_program_not_found until it is installed"
            );
        }
    }
    missing
}

/// Store options from config and the process environment.
pub fn store_options(config: &Config) -> StoreOptions {
    StoreOptions {
        url: config.database.url.clone(),
        max_connections: config.database.max_connections,
        busy_timeout: config.database.busy_timeout,
        key_file: config.encryption.key_file.clone(),
        env_keys: std::env::var(ENCRYPTION_KEYS_ENV)
            .ok()
            .filter(|v| !v.is_empty()),
    }
}

/// The credential file format of every configured server.
pub fn credential_specs(config: &Config) -> BTreeMap<ServerName, CredentialSpec> {
    config
        .servers
        .iter()
        .filter_map(|(name, server)| {
            // Config validation already rejected bad names.
            let name = ServerName::parse(name).ok()?;
            Some((
                name,
                CredentialSpec::from_config(server, |var| std::env::var(var).ok()),
            ))
        })
        .collect()
}

/// Cluster mode: reads (or creates) the cluster secret and joins with a fresh node id.
async fn join_cluster(
    config: &Config,
    store: &Store,
) -> Result<Arc<crate::cluster::Cluster>, AppError> {
    let cluster = &config.cluster;
    let secret = crate::http::auth::load_or_create_key(
        std::env::var(crate::config::CLUSTER_SECRET_ENV).ok(),
        &cluster.secret_file,
    )
    .map_err(AppError::ClusterSecret)?;
    let settings = crate::cluster::ClusterSettings {
        node_url: cluster.node_url.clone().unwrap_or_default(),
        secret,
        heartbeat_interval: cluster.heartbeat_interval,
        ttl: cluster.ttl,
        placement: cluster.placement,
        session_close: config.pool.close_grace * 2 + Duration::from_secs(1),
        drain: config.http.shutdown_delay,
        // A forwarded request may include a cold start and a whole call.
        forward_timeout: config.pool.startup_timeout
            + config.pool.call_timeout
            + Duration::from_secs(5),
    };
    Ok(crate::cluster::Cluster::join(store.clone(), settings).await?)
}

/// The credential side of mcp-pool: database, key ring, credential files and their writer.
/// Operator commands use it alone; the service adds the pool on top.
pub struct Storage {
    pub store: Store,
    pub credentials: CredentialHandle,
}

impl Storage {
    /// Connects to the database, applies migrations and starts the credential actor.
    /// `periodic_cleanup` is off for one-shot CLI commands.
    pub async fn open(config: &Config, periodic_cleanup: bool) -> Result<Storage, AppError> {
        let store = Store::connect(&store_options(config)).await?;
        store.migrate().await?;
        let files = CredentialFiles::open(&config.credentials.dir).map_err(|cause| {
            AppError::CredentialsDir {
                path: config.credentials.dir.clone(),
                cause,
            }
        })?;
        let cleanup = periodic_cleanup.then_some((
            config.credentials.cleanup_interval,
            config.credentials.cleanup_inactive_after,
        ));
        let (credentials, _) = CredentialHandle::spawn(CredentialArgs {
            store: store.clone(),
            files,
            specs: credential_specs(config),
            cleanup,
        })
        .await?;
        Ok(Storage { store, credentials })
    }

    /// Lets queued credential writes finish, then closes the database pool.
    pub async fn close(self) {
        self.credentials.shutdown().await;
        self.store.close().await;
    }
}

/// The running service.
pub struct App {
    pub config: Config,
    pub storage: Storage,
    pub pool: PoolHandle,
    guardian: ActorRef<GuardianMsg>,
    /// The guardian's task; taken by [`App::serve`], which watches it.
    guardian_ended: Option<tokio::task::JoinHandle<()>>,
    registry: ProcessRegistry,
    /// Background refresh of live sessions' OAuth tokens.
    pub refresh: Option<TokenRefreshHandle>,
    /// Confinement of the servers; its cgroups are removed at the end.
    sandbox: Arc<Sandbox>,
    /// The zygotes of preforked servers.
    prefork: Arc<Prefork>,
    /// Cluster mode: this node's view and its heartbeat.
    cluster: Option<(Arc<crate::cluster::Cluster>, HeartbeatHandle)>,
}

/// `mcp-pool-<hash>` of the data directory: one cgroup parent per instance, stable across
/// restarts of the same instance (so it sweeps its own leftovers) and distinct between
/// instances on one host.
fn instance_name(data_dir: &std::path::Path) -> String {
    use sha2::Digest as _;
    let path = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_owned());
    let digest = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("mcp-pool-{hex}")
}

impl App {
    /// Opens storage, kills servers left behind by a previous crash, and starts the pool.
    pub async fn build(config: Config) -> Result<App, AppError> {
        raise_open_files_limit(&config)?;
        warn_missing_programs(&config);
        // Keys, the SQLite file and process records live here: private before anything else.
        crate::store::files::create_private_dir(&config.service.data_dir).map_err(|cause| {
            AppError::DataDir {
                path: config.service.data_dir.clone(),
                cause,
            }
        })?;
        let registry_dir = config.service.data_dir.join("pgids");
        let registry = ProcessRegistry::open(&registry_dir)?;
        let leftovers = registry.reap_leftovers();
        if leftovers > 0 {
            tracing::warn!(
                count = leftovers,
                "Killed MCP servers left behind by a previous run"
            );
        }
        let storage = Storage::open(&config, true).await?;
        // A crash between a file and its row (or an older layout) can leave plaintext
        // credentials nobody owns; they go before any server could be granted them.
        match storage.credentials.sweep_orphan_files().await {
            Ok(0) => {}
            Ok(count) => tracing::warn!(count, "Removed credential files without an active row"),
            Err(err) => tracing::warn!(cause = %err, "Cannot sweep orphaned credential files"),
        }
        let sandbox = Sandbox::new(SandboxSettings {
            state_dir: config.sandbox.state_dir.clone(),
            cgroup_root: config.sandbox.cgroup_root.clone(),
            read: config.sandbox.read.clone(),
            protected: config.protected_paths(),
            instance: instance_name(&config.service.data_dir),
        });
        for (name, server) in &config.servers {
            match server.sandbox_policy(&config.sandbox).mode {
                SandboxMode::Off => {
                    tracing::warn!(server = %name, "MCP server runs unconfined (sandbox.mode = off)")
                }
                SandboxMode::BestEffort => tracing::info!(
                    server = %name,
                    "MCP server runs with whatever confinement the host offers (best_effort)"
                ),
                SandboxMode::Enforce => {}
            }
        }
        // Token freshness has one owner, the pool; the refresher writes through the
        // credential writer like everyone else.
        let refresher = TokenRefresher::from_config(
            &config,
            std::sync::Arc::new(storage.credentials.clone()),
            &|var| std::env::var(var).ok(),
        )?;
        // Remote servers whose client was registered before this start: their tokens are
        // refreshed with it (no network here; discovery itself waits for a connect flow).
        let discovery_http = crate::oauth::provider::http_client()?;
        for (name, server) in config.servers.iter().filter(|(_, s)| s.uses_discovery()) {
            let Ok(name) = crate::store::ServerName::parse(name) else {
                continue;
            };
            if let Err(err) = crate::oauth::discovery::load_provider(
                &refresher,
                &storage.store,
                &name,
                server,
                &discovery_http,
            )
            .await
            {
                tracing::warn!(server = %name, cause = %err, "cannot load the registered OAuth client");
            }
        }
        let interval = refresher
            .min_refresh_before()
            .map(TokenRefreshHandle::interval_for);
        let prefork = Prefork::from_config(&config, sandbox.clone(), Some(registry.clone()));
        prefork.start_all();
        let mut args = PoolArgs::from_config(
            &config,
            storage.credentials.clone(),
            Some(refresher),
            Some(registry.clone()),
            sandbox.clone(),
            prefork.clone(),
        );
        let cluster = if config.cluster.enabled {
            Some(join_cluster(&config, &storage.store).await?)
        } else {
            None
        };
        args.cluster = cluster.clone();
        let PoolTree {
            pool,
            guardian,
            ended,
        } = PoolGuardian::start(args).await?;
        let refresh = Some(
            TokenRefreshHandle::spawn(RefreshArgs {
                pool: pool.clone(),
                interval,
            })
            .await?,
        );
        let cluster = match cluster {
            Some(cluster) => {
                let heartbeat = HeartbeatHandle::spawn(HeartbeatArgs {
                    cluster: cluster.clone(),
                    pool: pool.clone(),
                })
                .await?;
                Some((cluster, heartbeat))
            }
            None => None,
        };
        Ok(App {
            cluster,
            config,
            storage,
            pool,
            guardian,
            guardian_ended: Some(ended),
            registry,
            refresh,
            sandbox,
            prefork,
        })
    }

    /// The HTTP facade's state, with authentication from the `[auth]` section and `env` for
    /// the variables it names (`MCP_POOL_API_KEY`, `MCP_POOL_ADMIN_KEY`, the JWT secret);
    /// production passes `std::env::var`.
    pub fn http_state(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<crate::http::HttpState, AppError> {
        let auth = crate::http::Auth::from_config(&self.config.auth, env)?;
        Ok(crate::http::HttpState::new(
            self.pool.clone(),
            self.storage.credentials.clone(),
            self.storage.store.clone(),
            std::sync::Arc::new(self.config.clone()),
            auth,
        ))
    }

    /// Binds `service.listen` and serves until `shutdown` resolves (see [`App::serve`]).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let state = self.http_state(|name| std::env::var(name).ok())?;
        let addr = self.config.service.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|cause| AppError::Listen { addr, cause })?;
        self.serve(listener, state, shutdown).await
    }

    /// Serves the HTTP facade on `listener` until `shutdown` resolves or the pool tree gives
    /// up, drains in-flight requests, then stops everything in order (see actors.md). Returns
    /// [`AppError::PoolFailed`] in the second case, so the process exits non-zero.
    pub async fn serve(
        mut self,
        listener: tokio::net::TcpListener,
        state: crate::http::HttpState,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        // The bound address, not the configured one: port 0 picks a free port.
        let bound = listener.local_addr().unwrap_or(self.config.service.listen);
        tracing::info!(
            listen = %bound,
            backend = ?self.storage.store.kind(),
            servers = ?self.config.servers.keys().collect::<Vec<_>>(),
            "mcp-pool started"
        );
        // The guardian ends before `stop` only when it gave up: then the pool will never serve
        // again, and running on would answer 503 forever.
        let pool_failed = tokio_util::sync::CancellationToken::new();
        let watcher = {
            let (ended, pool_failed) = (self.guardian_ended.take(), pool_failed.clone());
            tokio::spawn(async move {
                if let Some(ended) = ended {
                    let _ = ended.await;
                    pool_failed.cancel();
                }
            })
        };
        let stop_serving = {
            let pool_failed = pool_failed.clone();
            let cluster = self.cluster.as_ref().map(|(cluster, _)| cluster.clone());
            async move {
                tokio::select! {
                    () = shutdown => {}
                    () = pool_failed.cancelled() => {
                        tracing::error!("The connection pool was given up; shutting down");
                    }
                }
                // Before draining: other nodes stop placing new keys here, while the sessions
                // still here keep serving until the pool closes them.
                if let Some(cluster) = cluster
                    && let Err(err) = cluster.begin_leaving().await
                {
                    tracing::warn!(cause = %err, "could not announce leaving the cluster");
                }
            }
        };
        let peers = match crate::http::serve(listener, state, stop_serving).await {
            Ok(peers) => Some(peers),
            Err(err) => {
                tracing::error!(cause = %err, "HTTP server failed");
                None
            }
        };
        watcher.abort();
        let failed = pool_failed.is_cancelled();
        tracing::info!("Shutting down");
        self.stop_with(peers).await;
        tracing::info!("mcp-pool stopped");
        if failed {
            return Err(AppError::PoolFailed);
        }
        Ok(())
    }

    /// Closes every connection within `shutdown_grace` (SIGKILLing whatever is left after it),
    /// stops the actor tree, then the credential writer and the database.
    pub async fn stop(self) {
        self.stop_with(None).await;
    }

    /// [`App::stop`], closing other nodes' HTTP connections (`peers`) once this node's leases
    /// are released and the other nodes no longer route here.
    async fn stop_with(self, mut peers: Option<crate::http::PeerConnections>) {
        if let Some(refresh) = &self.refresh {
            refresh.stop().await;
        }
        let grace = self.config.service.shutdown_grace;
        match tokio::time::timeout(grace, self.pool.shutdown()).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => tracing::warn!(cause = %err, "pool shutdown failed"),
            Err(_) => tracing::warn!(
                ?grace,
                "connections did not close within the shutdown grace"
            ),
        }
        // After the sessions: their leases are released only once their processes are gone.
        if let Some((cluster, heartbeat)) = &self.cluster {
            heartbeat.stop().await;
            if let Err(err) = cluster.leave().await {
                tracing::warn!(cause = %err, "could not release this node's leases; they expire after cluster.ttl");
            }
            // Another node routes here for at most one heartbeat interval after the release
            // (its cached owner); what it sends meanwhile is refused with `shutting_down`.
            if peers.as_mut().is_some_and(|peers| peers.open() > 0) {
                tokio::time::sleep(cluster.heartbeat_interval() * 2).await;
            }
        }
        if let Some(peers) = peers {
            peers.close().await;
        }
        // After the sessions: a zygote's end takes its forked children with it.
        self.prefork.shutdown(self.config.pool.close_grace).await;
        // Whatever is still recorded did not close in time (or its actor died): kill it.
        let killed = self.registry.reap_leftovers();
        if killed > 0 {
            tracing::warn!(
                killed,
                "SIGKILLed MCP servers that outlived the shutdown grace"
            );
        }
        let _ = self.guardian.stop_and_wait(None, Some(grace)).await;
        self.sandbox.shutdown();
        self.storage.close().await;
    }
}

/// Installs SIGINT/SIGTERM handlers now (so a signal sent right after start-up is not lost to
/// the default action) and returns a future that resolves on the first of them.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stopping");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("Received SIGTERM"),
            _ = int.recv() => tracing::info!("Received SIGINT"),
        }
    }
}
