//! Wiring: builds the store, the actors and (later) the HTTP facade from a validated [`Config`],
//! and runs them until a shutdown signal.

use std::collections::BTreeMap;
use std::future::Future;

use ractor::ActorRef;

use crate::actors::{
    CredentialArgs, CredentialError, CredentialHandle, GuardianMsg, PoolArgs, PoolGuardian,
    PoolHandle, RefreshArgs, TokenRefreshHandle,
};
use crate::config::{Config, ENCRYPTION_KEYS_ENV};
use crate::mcp::{McpError, ProcessRegistry};
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
    for (name, server) in &config.servers {
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
        // The refresher writes through a handle without itself attached; everyone else (the
        // pool, the HTTP facade) gets the handle with it, so they share one single flight.
        let refresher = TokenRefresher::from_config(config, credentials.clone(), &|var| {
            std::env::var(var).ok()
        })?;
        let credentials = credentials.with_refresher(refresher);
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
    registry: ProcessRegistry,
    /// Background refresh of live sessions' OAuth tokens.
    pub refresh: Option<TokenRefreshHandle>,
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
        let args =
            PoolArgs::from_config(&config, storage.credentials.clone(), Some(registry.clone()));
        let (pool, guardian) = PoolGuardian::start(args).await?;
        let refresh = match storage.credentials.refresher() {
            Some(refresher) => {
                refresher.attach_pool(pool.clone());
                let interval = refresher
                    .min_refresh_before()
                    .map(TokenRefreshHandle::interval_for);
                Some(
                    TokenRefreshHandle::spawn(RefreshArgs {
                        refresher: refresher.clone(),
                        pool: pool.clone(),
                        interval,
                    })
                    .await?,
                )
            }
            None => None,
        };
        Ok(App {
            config,
            storage,
            pool,
            guardian,
            registry,
            refresh,
        })
    }

    /// Serves the HTTP facade until `shutdown` resolves and in-flight requests drained, then
    /// stops everything in order (see actors.md).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let state = crate::http::HttpState::from_app(&self)?;
        let addr = self.config.service.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|cause| AppError::Listen { addr, cause })?;
        // The bound address, not the configured one: port 0 picks a free port.
        let bound = listener.local_addr().unwrap_or(addr);
        tracing::info!(
            listen = %bound,
            backend = ?self.storage.store.kind(),
            servers = ?self.config.servers.keys().collect::<Vec<_>>(),
            "mcp-pool started"
        );
        if let Err(err) = crate::http::serve(listener, state, shutdown).await {
            tracing::error!(cause = %err, "HTTP server failed");
        }
        tracing::info!("Shutting down");
        self.stop().await;
        tracing::info!("mcp-pool stopped");
        Ok(())
    }

    /// Closes every connection within `shutdown_grace` (SIGKILLing whatever is left after it),
    /// stops the actor tree, then the credential writer and the database.
    pub async fn stop(self) {
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
        // Whatever is still recorded did not close in time (or its actor died): kill it.
        let killed = self.registry.reap_leftovers();
        if killed > 0 {
            tracing::warn!(
                killed,
                "SIGKILLed MCP servers that outlived the shutdown grace"
            );
        }
        let _ = self.guardian.stop_and_wait(None, Some(grace)).await;
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
