//! The `CredentialActor`: the single writer of `mcp_connections` and the credential files.
//!
//! Writes arrive as messages and run one at a time, so a row and its file never interleave with
//! another write for the same pair, and SQLite never sees two writers from this process. Reads
//! may go straight to [`Store`]. It also runs the periodic cleanup of inactive credentials.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::Instrument;

use crate::store::{
    BoxFuture, CredentialFiles, CredentialInfo, CredentialSpec, CredentialWriter, KeyRotation,
    ServerName, Store, StoreError, Stored, TokenUpdate, Tokens, UserId,
};

pub use crate::store::CredentialError;

type Reply<T> = RpcReplyPort<Result<T, CredentialError>>;

/// Messages of the [`CredentialActor`]; use [`CredentialHandle`] rather than sending them.
pub enum CredentialMsg {
    /// Store (or replace) credentials and write the file.
    Create {
        user: UserId,
        server: ServerName,
        tokens: Tokens,
        reply: Reply<(CredentialInfo, Stored)>,
    },
    /// Replace tokens (compare-and-swap on `expected_version`) and rewrite the file.
    Update {
        user: UserId,
        server: ServerName,
        expected_version: Option<i64>,
        update: TokenUpdate,
        reply: Reply<CredentialInfo>,
    },
    /// Bump `version` if it is still `expected_version` (a refresh claim across instances).
    ClaimRefresh {
        user: UserId,
        server: ServerName,
        expected_version: i64,
        lease: Duration,
        reply: Reply<Option<i64>>,
    },
    /// End a refresh claim that wrote nothing.
    ReleaseRefresh {
        user: UserId,
        server: ServerName,
        claimed_version: i64,
        reply: Reply<()>,
    },
    /// Soft delete: row inactive, file removed.
    Deactivate {
        user: UserId,
        server: ServerName,
        reply: Reply<bool>,
    },
    /// The provider rejected the refresh token: file removed, row deactivated and marked
    /// `reconnect_required` if it is still at `expected_version`.
    RequireReconnect {
        user: UserId,
        server: ServerName,
        expected_version: i64,
        reply: Reply<bool>,
    },
    /// Hard delete of rows and file.
    Delete {
        user: UserId,
        server: ServerName,
        reply: Reply<u64>,
    },
    /// Hard-delete inactive credentials older than the threshold.
    Cleanup {
        older_than: Duration,
        reply: Reply<usize>,
    },
    /// (Re)write the credentials file from the database; returns its path. Called before a
    /// session starts, so a missing or stale file is repaired rather than fatal.
    PrepareFile {
        user: UserId,
        server: ServerName,
        reply: Reply<PathBuf>,
    },
    /// Re-encrypt every ciphertext with the newest key (optionally adding a new key version
    /// first): credentials, registered OAuth clients and pending connect flows.
    RotateKey {
        add_new_version: bool,
        reply: Reply<KeyRotation>,
    },
    /// Remove credential files that have no active row (left by a crash between file and
    /// row, or by an older layout); returns how many. Run at start-up and with each cleanup.
    SweepOrphanFiles { reply: Reply<usize> },
    /// Periodic cleanup, sent by the actor to itself.
    CleanupTick,
}

/// What the actor is started with.
pub struct CredentialArgs {
    pub store: Store,
    pub files: CredentialFiles,
    /// File format per configured server.
    pub specs: BTreeMap<ServerName, CredentialSpec>,
    /// `(interval, inactive_for)` of the periodic cleanup; `None` disables it.
    pub cleanup: Option<(Duration, Duration)>,
}

pub struct CredentialState {
    store: Store,
    files: CredentialFiles,
    specs: Arc<BTreeMap<ServerName, CredentialSpec>>,
    cleanup_after: Option<Duration>,
}

/// See the module docs.
pub struct CredentialActor;

impl Actor for CredentialActor {
    type Msg = CredentialMsg;
    type State = CredentialState;
    type Arguments = CredentialArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: CredentialArgs,
    ) -> Result<CredentialState, ActorProcessingErr> {
        if let Some((interval, _)) = args.cleanup {
            myself.send_interval(interval, || CredentialMsg::CleanupTick);
        }
        Ok(CredentialState {
            store: args.store,
            files: args.files,
            specs: Arc::new(args.specs),
            cleanup_after: args.cleanup.map(|(_, after)| after),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: CredentialMsg,
        state: &mut CredentialState,
    ) -> Result<(), ActorProcessingErr> {
        // Every error goes back to the caller: a failed write must not kill the only writer.
        match message {
            CredentialMsg::Create {
                user,
                server,
                tokens,
                reply,
            } => {
                let span =
                    tracing::info_span!("credentials.create", user_id = %user, server = %server);
                let result = state.create(&user, &server, &tokens).instrument(span).await;
                let _ = reply.send(result);
            }
            CredentialMsg::Update {
                user,
                server,
                expected_version,
                update,
                reply,
            } => {
                let span =
                    tracing::info_span!("credentials.update", user_id = %user, server = %server);
                let result = state
                    .update(&user, &server, expected_version, &update)
                    .instrument(span)
                    .await;
                let _ = reply.send(result);
            }
            CredentialMsg::ClaimRefresh {
                user,
                server,
                expected_version,
                lease,
                reply,
            } => {
                let result = state
                    .store
                    .claim_refresh(&user, &server, expected_version, lease)
                    .await
                    .map_err(Into::into);
                let _ = reply.send(result);
            }
            CredentialMsg::ReleaseRefresh {
                user,
                server,
                claimed_version,
                reply,
            } => {
                let result = state
                    .store
                    .release_refresh(&user, &server, claimed_version)
                    .await
                    .map_err(Into::into);
                let _ = reply.send(result);
            }
            CredentialMsg::Deactivate {
                user,
                server,
                reply,
            } => {
                let span = tracing::info_span!("credentials.deactivate", user_id = %user, server = %server);
                let result = state.deactivate(&user, &server).instrument(span).await;
                let _ = reply.send(result);
            }
            CredentialMsg::RequireReconnect {
                user,
                server,
                expected_version,
                reply,
            } => {
                let span = tracing::info_span!("credentials.require_reconnect", user_id = %user, server = %server);
                let result = state
                    .require_reconnect(&user, &server, expected_version)
                    .instrument(span)
                    .await;
                let _ = reply.send(result);
            }
            CredentialMsg::Delete {
                user,
                server,
                reply,
            } => {
                let span =
                    tracing::info_span!("credentials.delete", user_id = %user, server = %server);
                let result = state.delete(&user, &server).instrument(span).await;
                let _ = reply.send(result);
            }
            CredentialMsg::Cleanup { older_than, reply } => {
                let _ = reply.send(state.cleanup(older_than).await);
            }
            CredentialMsg::PrepareFile {
                user,
                server,
                reply,
            } => {
                let span = tracing::info_span!("credentials.prepare_file", user_id = %user, server = %server);
                let result = state.prepare_file(&user, &server).instrument(span).await;
                let _ = reply.send(result);
            }
            CredentialMsg::RotateKey {
                add_new_version,
                reply,
            } => {
                let result = state
                    .store
                    .rotate_key(add_new_version)
                    .await
                    .map_err(Into::into);
                let _ = reply.send(result);
            }
            CredentialMsg::SweepOrphanFiles { reply } => {
                let _ = reply.send(state.sweep_orphan_files().await);
            }
            CredentialMsg::CleanupTick => {
                if let Some(after) = state.cleanup_after {
                    match state.cleanup(after).await {
                        Ok(count) => {
                            tracing::info!(count, "Cleaned up {count} inactive credentials")
                        }
                        Err(err) => tracing::error!(cause = %err, "Credential cleanup failed"),
                    }
                }
            }
        }
        Ok(())
    }
}

// === impl CredentialState ===

impl CredentialState {
    fn spec(&self, server: &ServerName) -> Result<&CredentialSpec, CredentialError> {
        self.specs
            .get(server)
            .ok_or_else(|| CredentialError::UnknownServer(server.clone()))
    }

    fn write_file(
        &self,
        user: &UserId,
        server: &ServerName,
        tokens: &Tokens,
    ) -> Result<PathBuf, CredentialError> {
        let spec = self.spec(server)?;
        if !spec.file {
            return Ok(self.files.path_for(user, server));
        }
        let bytes = spec.render(tokens);
        self.files
            .write(user, server, &bytes)
            .map_err(|cause| CredentialError::File {
                path: self.files.path_for(user, server),
                cause,
            })
    }

    fn remove_file(&self, user: &UserId, server: &ServerName) -> Result<(), CredentialError> {
        self.files
            .remove(user, server)
            .map_err(|cause| CredentialError::File {
                path: self.files.path_for(user, server),
                cause,
            })
    }

    async fn create(
        &self,
        user: &UserId,
        server: &ServerName,
        tokens: &Tokens,
    ) -> Result<(CredentialInfo, Stored), CredentialError> {
        self.spec(server)?;
        let path = self.files.path_for(user, server);
        // The row is the source of truth and is written first; if the file write then fails,
        // PrepareFile rewrites the file from the row before the next session starts.
        let (record, stored) = self.store.create(user, server, &path, tokens).await?;
        self.write_file(user, server, &record.tokens)?;
        tracing::info!(path = %path.display(), ?stored, "Stored credentials");
        Ok((record.info, stored))
    }

    async fn update(
        &self,
        user: &UserId,
        server: &ServerName,
        expected_version: Option<i64>,
        update: &TokenUpdate,
    ) -> Result<CredentialInfo, CredentialError> {
        self.spec(server)?;
        let record = self
            .store
            .update_tokens(user, server, expected_version, update)
            .await
            .map_err(|err| match err {
                StoreError::NotFound => CredentialError::NotFound(server.clone()),
                other => other.into(),
            })?;
        self.write_file(user, server, &record.tokens)?;
        tracing::info!(version = record.info.version, "Updated credentials");
        Ok(record.info)
    }

    async fn deactivate(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<bool, CredentialError> {
        // File first: a crash in between leaves an active row whose file the next session
        // start rewrites, never a plaintext file without a row.
        self.remove_file(user, server)?;
        let found = self.store.deactivate(user, server).await?;
        tracing::info!(found, "Deactivated credentials");
        Ok(found)
    }

    async fn require_reconnect(
        &self,
        user: &UserId,
        server: &ServerName,
        expected_version: i64,
    ) -> Result<bool, CredentialError> {
        // File first, as in `deactivate`. If the row moved on meanwhile (it stays active), the
        // next session start rewrites the file from it.
        self.remove_file(user, server)?;
        let marked = self
            .store
            .require_reconnect(user, server, expected_version)
            .await?;
        tracing::info!(marked, "Credentials deactivated: reconnect required");
        Ok(marked)
    }

    async fn delete(&self, user: &UserId, server: &ServerName) -> Result<u64, CredentialError> {
        // File first, for the same reason as in `deactivate`.
        self.remove_file(user, server)?;
        let rows = self.store.delete(user, server).await?;
        tracing::info!(rows, "Deleted credentials");
        Ok(rows)
    }

    async fn cleanup(&self, older_than: Duration) -> Result<usize, CredentialError> {
        // Pending connect flows past their expiry go with the same sweep.
        let states = self.store.cleanup_oauth_states().await?;
        if states > 0 {
            tracing::info!(count = states, "Removed expired OAuth connect states");
        }
        let removed = self.store.cleanup_inactive(older_than).await?;
        for (user, server) in &removed {
            // Another instance may have re-created the pair since; its file stays.
            if self.store.get(user, server).await?.is_none() {
                self.remove_file(user, server)?;
            }
        }
        let orphans = self.sweep_orphan_files().await?;
        if orphans > 0 {
            tracing::warn!(
                count = orphans,
                "Removed credential files without an active row"
            );
        }
        Ok(removed.len())
    }

    async fn sweep_orphan_files(&self) -> Result<usize, CredentialError> {
        let io_error = |cause| CredentialError::File {
            path: self.files.root().to_owned(),
            cause,
        };
        let mut removed = self.files.remove_legacy_files().map_err(io_error)?;
        for (user, server) in self.files.list().map_err(io_error)? {
            if self.store.get(&user, &server).await?.is_none() {
                self.remove_file(&user, &server)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn prepare_file(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<PathBuf, CredentialError> {
        let record = self
            .store
            .get(user, server)
            .await?
            .ok_or_else(|| CredentialError::NotFound(server.clone()))?;
        self.write_file(user, server, &record.tokens)
    }
}

// === CredentialHandle ===

/// Typed handle to the [`CredentialActor`]; cheap to clone.
#[derive(Clone)]
pub struct CredentialHandle {
    actor: ActorRef<CredentialMsg>,
    store: Store,
}

impl CredentialHandle {
    /// Spawns the actor (unnamed and unsupervised: see actors.md for why).
    pub async fn spawn(
        args: CredentialArgs,
    ) -> Result<(CredentialHandle, tokio::task::JoinHandle<()>), ractor::SpawnErr> {
        let store = args.store.clone();
        let (actor, join) = Actor::spawn(None, CredentialActor, args).await?;
        Ok((CredentialHandle { actor, store }, join))
    }

    async fn ask<T: Send + 'static>(
        &self,
        build: impl FnOnce(Reply<T>) -> CredentialMsg,
    ) -> Result<T, CredentialError> {
        match self.actor.call(build, None).await {
            Ok(ractor::rpc::CallResult::Success(result)) => result,
            _ => Err(CredentialError::Unavailable),
        }
    }

    pub async fn delete(&self, user: &UserId, server: &ServerName) -> Result<u64, CredentialError> {
        let (user, server) = (user.clone(), server.clone());
        self.ask(|reply| CredentialMsg::Delete {
            user,
            server,
            reply,
        })
        .await
    }

    pub async fn cleanup_inactive(&self, older_than: Duration) -> Result<usize, CredentialError> {
        self.ask(|reply| CredentialMsg::Cleanup { older_than, reply })
            .await
    }

    /// Removes credential files that have no active row; returns how many.
    pub async fn sweep_orphan_files(&self) -> Result<usize, CredentialError> {
        self.ask(|reply| CredentialMsg::SweepOrphanFiles { reply })
            .await
    }

    pub async fn rotate_key(&self, add_new_version: bool) -> Result<KeyRotation, CredentialError> {
        self.ask(|reply| CredentialMsg::RotateKey {
            add_new_version,
            reply,
        })
        .await
    }

    /// Stops the actor after the writes already queued, and waits for it.
    pub async fn shutdown(&self) {
        let _ = self
            .actor
            .drain_and_wait(Some(Duration::from_secs(30)))
            .await;
    }
}

/// The writer as `oauth` and the HTTP layer see it (`oauth` depends on `store`, not on the
/// actors): each write is one message to the actor.
impl CredentialWriter for CredentialHandle {
    fn store(&self) -> &Store {
        &self.store
    }

    fn create<'a>(
        &'a self,
        user: &'a UserId,
        server: &'a ServerName,
        tokens: Tokens,
    ) -> BoxFuture<'a, Result<(CredentialInfo, Stored), CredentialError>> {
        let (user, server) = (user.clone(), server.clone());
        Box::pin(self.ask(|reply| CredentialMsg::Create {
            user,
            server,
            tokens,
            reply,
        }))
    }

    fn update<'a>(
        &'a self,
        user: &'a UserId,
        server: &'a ServerName,
        expected_version: Option<i64>,
        update: TokenUpdate,
    ) -> BoxFuture<'a, Result<CredentialInfo, CredentialError>> {
        let (user, server) = (user.clone(), server.clone());
        Box::pin(self.ask(move |reply| CredentialMsg::Update {
            user,
            server,
            expected_version,
            update,
            reply,
        }))
    }

    fn claim_refresh<'a>(
        &'a self,
        user: &'a UserId,
        server: &'a ServerName,
        expected_version: i64,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<i64>, CredentialError>> {
        let (user, server) = (user.clone(), server.clone());
        Box::pin(self.ask(move |reply| CredentialMsg::ClaimRefresh {
            user,
            server,
            expected_version,
            lease,
            reply,
        }))
    }

    fn release_refresh<'a>(
        &'a self,
        user: &'a UserId,
        server: &'a ServerName,
        claimed_version: i64,
    ) -> BoxFuture<'a, Result<(), CredentialError>> {
        let (user, server) = (user.clone(), server.clone());
        Box::pin(self.ask(move |reply| CredentialMsg::ReleaseRefresh {
            user,
            server,
            claimed_version,
            reply,
        }))
    }

    fn deactivate<'a>(
        &'a self,
        user: &'a UserId,
        server: &'a ServerName,
    ) -> BoxFuture<'a, Result<bool, CredentialError>> {
        let (user, server) = (user.clone(), server.clone());
        Box::pin(self.ask(|reply| CredentialMsg::Deactivate {
            user,
            server,
            reply,
        }))
    }

    fn require_reconnect<'a>(
        &'a self,
        user: &'a UserId,
        server: &'a ServerName,
        expected_version: i64,
    ) -> BoxFuture<'a, Result<bool, CredentialError>> {
        let (user, server) = (user.clone(), server.clone());
        Box::pin(self.ask(move |reply| CredentialMsg::RequireReconnect {
            user,
            server,
            expected_version,
            reply,
        }))
    }

    fn prepare_file<'a>(
        &'a self,
        user: &'a UserId,
        server: &'a ServerName,
    ) -> BoxFuture<'a, Result<PathBuf, CredentialError>> {
        let (user, server) = (user.clone(), server.clone());
        Box::pin(self.ask(|reply| CredentialMsg::PrepareFile {
            user,
            server,
            reply,
        }))
    }
}
