//! Persistence: the `mcp_connections` repository, token encryption, credential files.
//!
//! - [`repo`]: [`Store`] on SQLite or PostgreSQL, with migrations per backend; also the
//!   `oauth_states` of pending OAuth connect flows.
//! - [`crypto`]: [`Keyring`], XChaCha20-Poly1305 with row-bound associated data.
//! - [`files`]: [`CredentialFiles`], private, atomically written credential files.
//! - validated [`UserId`] and [`ServerName`] live in [`crate::ids`] (re-exported here, since
//!   every repository call takes them).
//! - [`secret`]: [`Secret`], a string whose `Debug`/`Display` print `[REDACTED]`.
//! - [`writer`]: [`CredentialWriter`], the single writer of credentials as `oauth` sees it
//!   (the `CredentialActor` implements it), and [`CredentialError`].

pub mod crypto;
pub mod files;
pub mod repo;
pub mod secret;
pub mod writer;

pub use crate::ids::{IdError, ServerName, UserId};
pub use crypto::{CryptoError, Keyring};
pub use files::{CredentialFiles, CredentialSpec};
pub use repo::{
    BackendKind, CredentialInfo, CredentialRecord, KeyRotation, LeaseRow, NewOAuthState, NodeRow,
    RegisteredClientRow, SessionKeyRow, Store, StoreOptions, Stored, TokenUpdate, Tokens,
};
pub use secret::Secret;
pub use writer::{BoxFuture, CredentialError, CredentialWriter};

/// Why a repository operation failed. Never carries a token.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("database URL must start with sqlite:, postgres:// or postgresql://")]
    UnsupportedUrl,
    #[error("cannot create the database directory: {0}")]
    DataDir(std::io::Error),
    #[error("no active credentials")]
    NotFound,
    #[error("credentials changed concurrently (expected version {expected}, found {actual})")]
    Conflict { expected: i64, actual: i64 },
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("duration out of range")]
    DurationOutOfRange,
    /// Cluster tables exist on PostgreSQL only (config validation refuses cluster mode on SQLite).
    #[error("cluster mode needs PostgreSQL")]
    ClusterNeedsPostgres,
}
