//! Wiring: builds the store, the actors and (later) the HTTP facade from a validated [`Config`],
//! and runs them until a shutdown signal.

use std::collections::BTreeMap;
use std::future::Future;

use crate::actors::{CredentialArgs, CredentialError, CredentialHandle};
use crate::config::{Config, ENCRYPTION_KEYS_ENV};
use crate::store::{CredentialFiles, CredentialSpec, ServerName, Store, StoreError, StoreOptions};

/// Why the application could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error("credentials directory {path}: {cause}")]
    CredentialsDir {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot start an actor: {0}")]
    Spawn(#[from] ractor::SpawnErr),
}

/// The running parts of mcp-pool.
pub struct App {
    pub config: Config,
    pub store: Store,
    pub credentials: CredentialHandle,
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

impl App {
    /// Connects to the database, applies migrations and starts the credential actor.
    /// `periodic_cleanup` is off for one-shot CLI commands.
    pub async fn build(config: Config, periodic_cleanup: bool) -> Result<App, AppError> {
        let store = Store::connect(&store_options(&config)).await?;
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
        let (credentials, _) = CredentialHandle::spawn(
            CredentialArgs {
                store: store.clone(),
                files,
                specs: credential_specs(&config),
                cleanup,
            },
            None,
        )
        .await?;
        Ok(App {
            config,
            store,
            credentials,
        })
    }

    /// Serves until `shutdown` resolves, then stops the actors in order and closes the store.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AppError> {
        tracing::info!(
            listen = %self.config.service.listen,
            backend = ?self.store.kind(),
            servers = ?self.config.servers.keys().collect::<Vec<_>>(),
            "mcp-pool started"
        );
        shutdown.await;
        tracing::info!("Shutting down");
        self.stop().await;
        tracing::info!("mcp-pool stopped");
        Ok(())
    }

    /// Lets queued credential writes finish, then closes the database pool.
    pub async fn stop(self) {
        self.credentials.shutdown().await;
        self.store.close().await;
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stopping");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("Received SIGTERM"),
        _ = int.recv() => tracing::info!("Received SIGINT"),
    }
}
