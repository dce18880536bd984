//! [`CredentialWriter`]: the single writer of credentials, as the modules that write through it
//! see it, and [`CredentialError`], why a credential operation failed.
//!
//! The writer is the `CredentialActor` (`actors::credential`); `oauth` stores and refreshes
//! tokens through this trait, so it depends on `store` and never on the actors.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use super::{CredentialInfo, ServerName, Store, StoreError, Stored, TokenUpdate, Tokens, UserId};

/// A boxed future, so the trait can be used as `dyn CredentialWriter`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a credential operation failed. Never carries a token.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("unknown server `{0}`")]
    UnknownServer(ServerName),
    #[error("no active credentials for server `{0}`")]
    NotFound(ServerName),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("credentials file {path}: {cause}")]
    File {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("the credential writer is not running")]
    Unavailable,
    /// The provider answered `invalid_grant`: the credentials were deactivated and the user
    /// must connect again.
    #[error("the authorization for server `{0}` was revoked or expired; reconnect required")]
    ReconnectRequired(ServerName),
    /// The access token expired and the token endpoint is failing (5xx, timeout, network);
    /// the credentials are kept and the refresh is retried with backoff.
    #[error("cannot refresh the access token for server `{0}` right now")]
    RefreshUnavailable(ServerName),
    /// The access token expired and the token endpoint refused the refresh for a reason other
    /// than `invalid_grant` (e.g. a misconfigured client); the credentials are kept.
    #[error("the token endpoint refused to refresh the access token for server `{0}`")]
    RefreshRejected(ServerName),
}

impl CredentialError {
    /// The stable, machine-readable code of this error: the `error.code` of an HTTP body and
    /// the `code` of a chat trace alike (through `PoolError::code`).
    pub fn code(&self) -> &'static str {
        match self {
            CredentialError::UnknownServer(_) => "unknown_server",
            CredentialError::NotFound(_) | CredentialError::Store(StoreError::NotFound) => {
                "no_credentials"
            }
            CredentialError::Store(StoreError::Conflict { .. }) => "conflict",
            CredentialError::Store(_) | CredentialError::File { .. } => "internal",
            CredentialError::Unavailable => "credentials_unavailable",
            CredentialError::ReconnectRequired(_) => "reconnect_required",
            CredentialError::RefreshUnavailable(_) => "token_refresh_unavailable",
            CredentialError::RefreshRejected(_) => "token_refresh_failed",
        }
    }
}

/// Writes of credentials: each one to the row and the credentials file together, one at a
/// time. Reads go straight to [`CredentialWriter::store`].
pub trait CredentialWriter: Send + Sync + 'static {
    /// Read access; reads do not need to queue behind writes.
    fn store(&self) -> &Store;

    /// Stores (or replaces) credentials and writes the file.
    fn create<'a>(
        &'a self,
        user: &'a UserId,
        server: &'a ServerName,
        tokens: Tokens,
    ) -> BoxFuture<'a, Result<(CredentialInfo, Stored), CredentialError>>;

    /// Replaces tokens (compare-and-swap on `expected_version` when given) and rewrites the
    /// file; a missing refresh token keeps the stored one.
    fn update<'a>(
        &'a self,
        user: &'a UserId,
        server: &'a ServerName,
        expected_version: Option<i64>,
        update: TokenUpdate,
    ) -> BoxFuture<'a, Result<CredentialInfo, CredentialError>>;

    /// Claims the refresh of (user, server) at `expected_version` for `lease`; see
    /// [`Store::claim_refresh`].
    fn claim_refresh<'a>(
        &'a self,
        user: &'a UserId,
        server: &'a ServerName,
        expected_version: i64,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<i64>, CredentialError>>;

    /// Ends a refresh claim that wrote nothing; see [`Store::release_refresh`].
    fn release_refresh<'a>(
        &'a self,
        user: &'a UserId,
        server: &'a ServerName,
        claimed_version: i64,
    ) -> BoxFuture<'a, Result<(), CredentialError>>;

    /// Soft delete: row inactive, file removed; whether there was an active row.
    fn deactivate<'a>(
        &'a self,
        user: &'a UserId,
        server: &'a ServerName,
    ) -> BoxFuture<'a, Result<bool, CredentialError>>;

    /// The provider rejected the refresh token: removes the file, and deactivates the row
    /// and marks it `reconnect_required` if it is still at `expected_version`; see
    /// [`Store::require_reconnect`]. Returns whether it was marked.
    fn require_reconnect<'a>(
        &'a self,
        user: &'a UserId,
        server: &'a ServerName,
        expected_version: i64,
    ) -> BoxFuture<'a, Result<bool, CredentialError>>;

    /// (Re)writes the credentials file from the row; returns its path.
    fn prepare_file<'a>(
        &'a self,
        user: &'a UserId,
        server: &'a ServerName,
    ) -> BoxFuture<'a, Result<PathBuf, CredentialError>>;
}
