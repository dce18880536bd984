//! The `mcp_connections` repository on SQLite (embedded default) or PostgreSQL (production).
//!
//! Two native sqlx pools behind one type: sqlx's `Any` driver cannot decode booleans or
//! timestamps. Both backends run the same `$n` SQL text, expanded per backend by `on_backend!`.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use uuid::Uuid;

use super::StoreError;
use super::crypto::{CryptoError, Keyring, TokenField};
use super::secret::Secret;
use crate::ids::{ServerName, UserId};

pub use cluster::{LeaseRow, NodeRow, SessionKeyRow};
pub use oauth_clients::RegisteredClientRow;
pub use oauth_states::{NewOAuthState, OAuthState};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

macro_rules! columns {
    () => {
        "id, user_id, server_name, credentials_path, access_token, refresh_token, token_expiry, \
         is_active, reconnect_required, key_version, version, created_at, updated_at"
    };
}

/// Runs `$body` with `$pool` bound to whichever native pool this store uses.
macro_rules! on_backend {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite($pool) => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

/// Runs `$body` inside a write transaction bound to `$tx`. SQLite writers take the lock up front
/// (`BEGIN IMMEDIATE`): a deferred transaction that reads then writes can fail with SQLITE_BUSY
/// whatever the busy timeout. On PostgreSQL the transaction first sets its row-level-security
/// `$scope` (see [`Scope`]).
macro_rules! in_write_tx {
    ($store:expr, $scope:expr, $tx:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite(pool) => {
                let mut $tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let out = $body;
                $tx.commit().await?;
                out
            }
            Backend::Postgres(pool) => {
                let mut $tx = pool.begin().await?;
                set_scope(&mut $tx, $scope).await?;
                let out = $body;
                $tx.commit().await?;
                out
            }
        }
    };
}

/// Runs the read `$body` with `$conn` bound to an executor: the SQLite pool itself, or on
/// PostgreSQL a transaction that first sets its row-level-security `$scope`. `$body` yields a
/// `Result<_, sqlx::Error>`.
macro_rules! in_read {
    ($store:expr, $scope:expr, $conn:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite(pool) => {
                let $conn = pool;
                $body
            }
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                set_scope(&mut tx, $scope).await?;
                let out = {
                    let $conn = &mut *tx;
                    $body
                };
                if out.is_ok() {
                    tx.commit().await?;
                }
                out
            }
        }
    };
}

/// Whose rows a PostgreSQL transaction may touch under row-level security
/// (`migrations/postgres/0002_rls.sql`).
///
/// Per-user work sets `app.user_id`, so a query that lost its `WHERE user_id = ...` (a bug)
/// still sees only that user's rows. The few operations that need every row (cleanup, key
/// rotation, the operator's list) set `app.all_users`; they are the only callers of
/// [`Scope::AllUsers`]. Both settings are transaction-local (`set_config(.., true)`), so a pooled
/// connection never carries one user's scope into the next transaction. SQLite has no RLS and
/// ignores the scope.
#[derive(Debug, Clone, Copy)]
enum Scope<'a> {
    User(&'a UserId),
    AllUsers,
    /// The unauthenticated OAuth callback: only the `oauth_states` row with this state hash
    /// (`migrations/postgres/0003_oauth_states.sql`).
    OAuthState(&'a str),
}

async fn set_scope(conn: &mut sqlx::PgConnection, scope: Scope<'_>) -> Result<(), sqlx::Error> {
    match scope {
        Scope::User(user) => {
            sqlx::query("SELECT set_config('app.user_id', $1, true)")
                .bind(user.as_str())
                .execute(&mut *conn)
                .await?
        }
        Scope::AllUsers => {
            sqlx::query("SELECT set_config('app.all_users', 'on', true)")
                .execute(&mut *conn)
                .await?
        }
        Scope::OAuthState(state_hash) => {
            sqlx::query("SELECT set_config('app.oauth_state', $1, true)")
                .bind(state_hash)
                .execute(&mut *conn)
                .await?
        }
    };
    Ok(())
}

/// Whether `_sqlx_migrations` lists exactly this binary's migrations, applied and unchanged
/// (what sqlx's `run` would accept without doing anything). Any doubt (no such table, no SELECT
/// on it, a dirty, missing, extra or changed migration) answers false, and `run` then applies
/// or reports it.
async fn postgres_up_to_date(pool: &PgPool) -> bool {
    let Ok(applied) = sqlx::query_as::<_, (i64, Vec<u8>)>(
        "SELECT version, checksum FROM _sqlx_migrations WHERE success",
    )
    .fetch_all(pool)
    .await
    else {
        return false;
    };
    let ours: Vec<_> = POSTGRES_MIGRATIONS
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .collect();
    applied.len() == ours.len()
        && ours.iter().all(|m| {
            applied
                .iter()
                .any(|(version, checksum)| *version == m.version && **checksum == *m.checksum)
        })
}

#[derive(Debug, Clone)]
enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Which database a URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Sqlite,
    Postgres,
}

impl BackendKind {
    pub fn of_url(url: &str) -> Option<BackendKind> {
        if url.starts_with("sqlite:") {
            Some(BackendKind::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(BackendKind::Postgres)
        } else {
            None
        }
    }
}

#[derive(sqlx::FromRow)]
struct RawRow {
    id: Uuid,
    user_id: String,
    server_name: String,
    credentials_path: String,
    access_token: Option<String>,
    refresh_token: Option<String>,
    token_expiry: Option<DateTime<Utc>>,
    is_active: bool,
    reconnect_required: bool,
    key_version: i32,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// A row of `mcp_connections` without its tokens: safe to list, log or return over HTTP.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CredentialInfo {
    pub id: Uuid,
    pub user_id: UserId,
    pub server_name: ServerName,
    pub credentials_path: PathBuf,
    pub token_expiry: Option<DateTime<Utc>>,
    pub has_access_token: bool,
    pub has_refresh_token: bool,
    pub is_active: bool,
    /// Deactivated because the provider rejected the refresh token: the user must connect
    /// again. Cleared by the next connect.
    pub reconnect_required: bool,
    /// Bumped by every write; the compare-and-swap token of [`Store::update_tokens`].
    pub version: i64,
    /// Encryption key version of the tokens.
    pub key_version: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Decrypted tokens. `Debug` shows `[REDACTED]` for each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    pub access_token: Option<Secret>,
    pub refresh_token: Option<Secret>,
    pub token_expiry: Option<DateTime<Utc>>,
}

/// A row with its decrypted tokens.
#[derive(Debug, Clone)]
pub struct CredentialRecord {
    pub info: CredentialInfo,
    pub tokens: Tokens,
}

/// A partial token update; `None` keeps the stored value (a provider that does not rotate the
/// refresh token returns none).
#[derive(Debug, Clone, Default)]
pub struct TokenUpdate {
    pub access_token: Option<Secret>,
    pub refresh_token: Option<Secret>,
    pub token_expiry: Option<DateTime<Utc>>,
}

/// What [`Store::create`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Created,
    Replaced,
}

/// The repository. Cheap to clone; reads may run anywhere, writes go through the
/// `CredentialActor` so they happen one at a time.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    keyring: Arc<KeyringSlot>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.kind())
            .finish()
    }
}

/// The keyring plus how to reload it, so rows re-encrypted by `credentials rotate-key` in
/// another process are readable without a restart.
struct KeyringSlot {
    current: RwLock<Arc<Keyring>>,
    key_file: PathBuf,
    env_value: Option<String>,
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub url: String,
    pub max_connections: u32,
    pub busy_timeout: Duration,
    pub key_file: PathBuf,
    /// Value of `MCP_POOL_ENCRYPTION_KEYS`, if set.
    pub env_keys: Option<String>,
}

fn now() -> DateTime<Utc> {
    // PostgreSQL keeps microseconds; truncating keeps values equal after a round trip.
    Utc::now().trunc_subsecs(6)
}

impl Store {
    /// Connects (creating the SQLite file and its directory if needed) without migrating.
    pub async fn connect(options: &StoreOptions) -> Result<Store, StoreError> {
        let keyring = Keyring::load(&options.key_file, options.env_keys.as_deref())?;
        let backend = match BackendKind::of_url(&options.url) {
            Some(BackendKind::Sqlite) => {
                let connect = SqliteConnectOptions::from_str(&options.url)?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(options.busy_timeout)
                    .foreign_keys(true);
                let file = connect.get_filename();
                if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
                    super::files::create_private_dir(dir).map_err(StoreError::DataDir)?;
                }
                Backend::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(options.max_connections)
                        .connect_with(connect)
                        .await?,
                )
            }
            Some(BackendKind::Postgres) => {
                let connect = PgConnectOptions::from_str(&options.url)?;
                Backend::Postgres(
                    PgPoolOptions::new()
                        .max_connections(options.max_connections)
                        .acquire_timeout(Duration::from_secs(10))
                        .connect_with(connect)
                        .await?,
                )
            }
            None => return Err(StoreError::UnsupportedUrl),
        };
        Ok(Store {
            backend,
            keyring: Arc::new(KeyringSlot {
                current: RwLock::new(Arc::new(keyring)),
                key_file: options.key_file.clone(),
                env_value: options.env_keys.clone(),
            }),
        })
    }

    pub fn kind(&self) -> BackendKind {
        match self.backend {
            Backend::Sqlite(_) => BackendKind::Sqlite,
            Backend::Postgres(_) => BackendKind::Postgres,
        }
    }

    /// Applies pending migrations of this backend.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await?,
            // sqlx's `run` always starts with `CREATE TABLE IF NOT EXISTS _sqlx_migrations`,
            // which PostgreSQL refuses to a role without CREATE on the schema even when the
            // table exists: the non-owner role the service should run as (0002_rls.sql) could
            // not even start. So `run` only when something is not applied yet, which takes the
            // owner (`mcp-pool migrate`) anyway.
            Backend::Postgres(pool) => {
                if !postgres_up_to_date(pool).await {
                    POSTGRES_MIGRATIONS.run(pool).await?
                }
            }
        }
        Ok(())
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_backend!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    pub async fn close(&self) {
        on_backend!(self, pool => pool.close().await)
    }

    fn keyring(&self) -> Arc<Keyring> {
        match self.keyring.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn reload_keyring(&self) -> Result<Arc<Keyring>, StoreError> {
        let fresh = Arc::new(Keyring::load(
            &self.keyring.key_file,
            self.keyring.env_value.as_deref(),
        )?);
        match self.keyring.current.write() {
            Ok(mut guard) => *guard = fresh.clone(),
            Err(poisoned) => *poisoned.into_inner() = fresh.clone(),
        }
        Ok(fresh)
    }

    fn info(raw: &RawRow) -> Result<CredentialInfo, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("row {}: {what}", raw.id));
        Ok(CredentialInfo {
            id: raw.id,
            user_id: UserId::parse(&raw.user_id).map_err(|_| corrupt("invalid user_id"))?,
            server_name: ServerName::parse(&raw.server_name)
                .map_err(|_| corrupt("invalid server_name"))?,
            credentials_path: PathBuf::from(&raw.credentials_path),
            token_expiry: raw.token_expiry,
            has_access_token: raw.access_token.is_some(),
            has_refresh_token: raw.refresh_token.is_some(),
            is_active: raw.is_active,
            reconnect_required: raw.reconnect_required,
            version: raw.version,
            key_version: u32::try_from(raw.key_version)
                .map_err(|_| corrupt("negative key_version"))?,
            created_at: raw.created_at,
            updated_at: raw.updated_at,
        })
    }

    fn decrypt_row(&self, raw: RawRow) -> Result<CredentialRecord, StoreError> {
        let info = Self::info(&raw)?;
        let mut keyring = self.keyring();
        if !keyring.versions().contains(&info.key_version) {
            keyring = self.reload_keyring()?;
        }
        let open = |field, value: &Option<String>| -> Result<Option<Secret>, CryptoError> {
            value
                .as_deref()
                .map(|ct| {
                    keyring.decrypt(
                        &info.user_id,
                        &info.server_name,
                        field,
                        info.key_version,
                        ct,
                    )
                })
                .transpose()
        };
        let tokens = Tokens {
            access_token: open(TokenField::Access, &raw.access_token)?,
            refresh_token: open(TokenField::Refresh, &raw.refresh_token)?,
            token_expiry: raw.token_expiry,
        };
        Ok(CredentialRecord { info, tokens })
    }

    fn seal(
        keyring: &Keyring,
        user: &UserId,
        server: &ServerName,
        tokens: &Tokens,
    ) -> Result<(Option<String>, Option<String>), StoreError> {
        let seal = |field, value: &Option<Secret>| {
            value
                .as_ref()
                .map(|secret| keyring.encrypt(user, server, field, secret))
                .transpose()
        };
        Ok((
            seal(TokenField::Access, &tokens.access_token)?,
            seal(TokenField::Refresh, &tokens.refresh_token)?,
        ))
    }

    /// Stores credentials for (user, server): inserts a row, or replaces the tokens of the
    /// existing row (reactivating it if it was deactivated).
    pub async fn create(
        &self,
        user: &UserId,
        server: &ServerName,
        credentials_path: &Path,
        tokens: &Tokens,
    ) -> Result<(CredentialRecord, Stored), StoreError> {
        let keyring = self.keyring();
        let (access, refresh) = Self::seal(&keyring, user, server, tokens)?;
        let key_version = keyring.current_version() as i32;
        let path = credentials_path.to_string_lossy().into_owned();
        let at = now();
        let (raw, stored) = in_write_tx!(self, Scope::User(user), tx => {
            let existing: Option<(Uuid, bool)> = sqlx::query_as(
                "SELECT id, is_active FROM mcp_connections WHERE user_id = $1 AND server_name = $2 \
                 ORDER BY is_active DESC, updated_at DESC LIMIT 1",
            )
            .bind(user.as_str())
            .bind(server.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            match existing {
                Some((id, was_active)) => {
                    let raw: RawRow = sqlx::query_as(concat!(
                        "UPDATE mcp_connections SET credentials_path = $1, access_token = $2, \
                         refresh_token = $3, token_expiry = $4, key_version = $5, is_active = TRUE, \
                         reconnect_required = FALSE, version = version + 1, updated_at = $6, refresh_lease_until = NULL \
                         WHERE id = $7 RETURNING ",
                        columns!()
                    ))
                    .bind(&path)
                    .bind(&access)
                    .bind(&refresh)
                    .bind(tokens.token_expiry)
                    .bind(key_version)
                    .bind(at)
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?;
                    (raw, if was_active { Stored::Replaced } else { Stored::Created })
                }
                None => {
                    let raw: RawRow = sqlx::query_as(concat!(
                        "INSERT INTO mcp_connections (id, user_id, server_name, credentials_path, \
                         access_token, refresh_token, token_expiry, is_active, key_version, version, \
                         created_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, TRUE, $8, 1, $9, $9) RETURNING ",
                        columns!()
                    ))
                    .bind(Uuid::new_v4())
                    .bind(user.as_str())
                    .bind(server.as_str())
                    .bind(&path)
                    .bind(&access)
                    .bind(&refresh)
                    .bind(tokens.token_expiry)
                    .bind(key_version)
                    .bind(at)
                    .fetch_one(&mut *tx)
                    .await?;
                    (raw, Stored::Created)
                }
            }
        });
        Ok((self.decrypt_row(raw)?, stored))
    }

    /// The active credentials of (user, server), decrypted.
    pub async fn get(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<Option<CredentialRecord>, StoreError> {
        let raw: Option<RawRow> = in_read!(self, Scope::User(user), conn => sqlx::query_as(concat!(
            "SELECT ", columns!(),
            " FROM mcp_connections WHERE user_id = $1 AND server_name = $2 AND is_active"
        ))
        .bind(user.as_str())
        .bind(server.as_str())
        .fetch_optional(conn)
        .await)?;
        raw.map(|raw| self.decrypt_row(raw)).transpose()
    }

    /// Rows without tokens, optionally of one user only, newest first.
    pub async fn list(
        &self,
        user: Option<&UserId>,
        include_inactive: bool,
    ) -> Result<Vec<CredentialInfo>, StoreError> {
        let scope = user.map_or(Scope::AllUsers, Scope::User);
        let raws: Vec<RawRow> = in_read!(self, scope, conn => sqlx::query_as(concat!(
            "SELECT ", columns!(),
            " FROM mcp_connections WHERE ($1 IS NULL OR user_id = $1) AND (is_active OR $2) \
             ORDER BY user_id, server_name, updated_at DESC"
        ))
        .bind(user.map(UserId::as_str))
        .bind(include_inactive)
        .fetch_all(conn)
        .await)?;
        raws.iter().map(Self::info).collect()
    }

    /// Replaces tokens of the active row if its version is still `expected_version` (when
    /// given): the compare-and-swap that keeps two instances from both writing a refresh.
    pub async fn update_tokens(
        &self,
        user: &UserId,
        server: &ServerName,
        expected_version: Option<i64>,
        update: &TokenUpdate,
    ) -> Result<CredentialRecord, StoreError> {
        let raw = in_write_tx!(self, Scope::User(user), tx => {
            let current: Option<RawRow> = sqlx::query_as(concat!(
                "SELECT ", columns!(),
                " FROM mcp_connections WHERE user_id = $1 AND server_name = $2 AND is_active"
            ))
            .bind(user.as_str())
            .bind(server.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            let current = current.ok_or(StoreError::NotFound)?;
            if expected_version.is_some_and(|expected| expected != current.version) {
                return Err(StoreError::Conflict {
                    expected: expected_version.unwrap_or_default(),
                    actual: current.version,
                });
            }
            let (id, version) = (current.id, current.version);
            let old = self.decrypt_row(current)?.tokens;
            let merged = Tokens {
                access_token: update.access_token.clone().or(old.access_token),
                refresh_token: update.refresh_token.clone().or(old.refresh_token),
                token_expiry: update.token_expiry.or(old.token_expiry),
            };
            let keyring = self.keyring();
            let (access, refresh) = Self::seal(&keyring, user, server, &merged)?;
            let raw: Option<RawRow> = sqlx::query_as(concat!(
                "UPDATE mcp_connections SET access_token = $1, refresh_token = $2, \
                 token_expiry = $3, key_version = $4, version = version + 1, updated_at = $5, \
                 refresh_lease_until = NULL WHERE id = $6 AND version = $7 RETURNING ",
                columns!()
            ))
            .bind(&access)
            .bind(&refresh)
            .bind(merged.token_expiry)
            .bind(keyring.current_version() as i32)
            .bind(now())
            .bind(id)
            .bind(version)
            .fetch_optional(&mut *tx)
            .await?;
            raw.ok_or(StoreError::Conflict {
                expected: version,
                actual: version + 1,
            })?
        });
        self.decrypt_row(raw)
    }

    /// Claims the right to refresh the active row's tokens: bumps `version` if it is still
    /// `expected_version`, and returns the new version (`None`: another writer, e.g. another
    /// instance's claim, got there first). The claimer then writes with
    /// [`update_tokens`](Self::update_tokens) on the returned version; every other instance sees
    /// the bump and waits for that write instead of sending its own token request.
    ///
    /// The claim also sets a lease (`refresh_lease_until = now + lease`) and fails while
    /// another claim's lease runs, so an instance that read the row *after* another's claim
    /// (and so sees the bumped version) cannot claim it again before that instance wrote or its
    /// lease ran out.
    pub async fn claim_refresh(
        &self,
        user: &UserId,
        server: &ServerName,
        expected_version: i64,
        lease: Duration,
    ) -> Result<Option<i64>, StoreError> {
        let at = now();
        let until =
            at + chrono::Duration::from_std(lease).map_err(|_| StoreError::DurationOutOfRange)?;
        let claimed: Option<(i64,)> = in_write_tx!(self, Scope::User(user), tx => sqlx::query_as(
            "UPDATE mcp_connections SET version = version + 1, refresh_lease_until = $4 \
             WHERE user_id = $1 AND server_name = $2 AND is_active AND version = $3 \
             AND (refresh_lease_until IS NULL OR refresh_lease_until < $5) \
             RETURNING version",
        )
        .bind(user.as_str())
        .bind(server.as_str())
        .bind(expected_version)
        .bind(until)
        .bind(at)
        .fetch_optional(&mut *tx)
        .await?);
        Ok(claimed.map(|(version,)| version))
    }

    /// Ends this instance's refresh claim early (its refresh failed and wrote nothing), if the
    /// row still has the claimed version: others may claim again at once.
    pub async fn release_refresh(
        &self,
        user: &UserId,
        server: &ServerName,
        claimed_version: i64,
    ) -> Result<(), StoreError> {
        in_write_tx!(self, Scope::User(user), tx => {
            sqlx::query(
                "UPDATE mcp_connections SET refresh_lease_until = NULL \
                 WHERE user_id = $1 AND server_name = $2 AND is_active AND version = $3",
            )
            .bind(user.as_str())
            .bind(server.as_str())
            .bind(claimed_version)
            .execute(&mut *tx)
            .await?;
        });
        Ok(())
    }

    /// The provider rejected the refresh token of the active row at `expected_version`:
    /// deactivates it and marks it `reconnect_required`, in one statement. Returns false when
    /// the row moved on meanwhile (a concurrent refresh rotated it, or the user reconnected):
    /// then the grant was not revoked.
    pub async fn require_reconnect(
        &self,
        user: &UserId,
        server: &ServerName,
        expected_version: i64,
    ) -> Result<bool, StoreError> {
        let done = in_write_tx!(self, Scope::User(user), tx => sqlx::query(
            "UPDATE mcp_connections SET is_active = FALSE, reconnect_required = TRUE, \
             version = version + 1, updated_at = $1, refresh_lease_until = NULL \
             WHERE user_id = $2 AND server_name = $3 AND is_active AND version = $4",
        )
        .bind(now())
        .bind(user.as_str())
        .bind(server.as_str())
        .bind(expected_version)
        .execute(&mut *tx)
        .await?
        .rows_affected());
        Ok(done > 0)
    }

    /// Whether (user, server) has no active credentials because its grant was revoked (the
    /// newest row says `reconnect_required`).
    pub async fn reconnect_required(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<bool, StoreError> {
        let newest: Option<(bool, bool)> = in_read!(self, Scope::User(user), conn => sqlx::query_as(
            "SELECT is_active, reconnect_required FROM mcp_connections \
             WHERE user_id = $1 AND server_name = $2 ORDER BY is_active DESC, updated_at DESC LIMIT 1",
        )
        .bind(user.as_str())
        .bind(server.as_str())
        .fetch_optional(conn)
        .await)?;
        Ok(newest.is_some_and(|(active, required)| !active && required))
    }

    /// Soft delete: marks the active row inactive. Returns whether there was one.
    pub async fn deactivate(&self, user: &UserId, server: &ServerName) -> Result<bool, StoreError> {
        let done = in_write_tx!(self, Scope::User(user), tx => sqlx::query(
            "UPDATE mcp_connections SET is_active = FALSE, version = version + 1, updated_at = $1 \
             WHERE user_id = $2 AND server_name = $3 AND is_active",
        )
        .bind(now())
        .bind(user.as_str())
        .bind(server.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected());
        Ok(done > 0)
    }

    /// Hard delete of every row of (user, server). Returns how many rows went.
    pub async fn delete(&self, user: &UserId, server: &ServerName) -> Result<u64, StoreError> {
        let done = in_write_tx!(self, Scope::User(user), tx => sqlx::query(
            "DELETE FROM mcp_connections WHERE user_id = $1 AND server_name = $2",
        )
        .bind(user.as_str())
        .bind(server.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected());
        Ok(done)
    }

    /// Hard-deletes inactive rows not updated for `older_than`; returns their (user, server)
    /// pairs so the caller can remove any file left behind.
    pub async fn cleanup_inactive(
        &self,
        older_than: Duration,
    ) -> Result<Vec<(UserId, ServerName)>, StoreError> {
        let cutoff = now()
            - chrono::Duration::from_std(older_than).map_err(|_| StoreError::DurationOutOfRange)?;
        let rows: Vec<(String, String)> = in_write_tx!(self, Scope::AllUsers, tx => sqlx::query_as(
            "DELETE FROM mcp_connections WHERE NOT is_active AND updated_at < $1 \
             RETURNING user_id, server_name",
        )
        .bind(cutoff)
        .fetch_all(&mut *tx)
        .await?);
        Ok(rows
            .into_iter()
            .filter_map(|(user, server)| {
                Some((UserId::parse(&user).ok()?, ServerName::parse(&server).ok()?))
            })
            .collect())
    }

    /// Adds a new key version (key-file mode) and re-encrypts, with the newest version, every
    /// ciphertext on an older one: the tokens of every `mcp_connections` row (active or not),
    /// the registered OAuth clients (`oauth_clients`) and the PKCE verifiers of pending connect
    /// flows (`oauth_states`).
    ///
    /// One transaction for all three tables: a rotation that fails half-way (a ciphertext that
    /// does not decrypt, the database gone) leaves every row as it was, and one that commits
    /// leaves nothing on an older key, so the operator may then retire it. On SQLite that
    /// transaction holds the write lock throughout (rows are re-encrypted in memory, a few µs
    /// each); on PostgreSQL it locks each row as it rewrites it, so a concurrent refresh of
    /// that row waits for the commit rather than failing.
    pub async fn rotate_key(&self, add_new_version: bool) -> Result<KeyRotation, StoreError> {
        if add_new_version {
            Keyring::load(&self.keyring.key_file, self.keyring.env_value.as_deref())?
                .add_version()?;
        }
        // Reloaded either way: another process may have added a version since start-up.
        let keyring = self.reload_keyring()?;
        let target = keyring.current_version();
        let target_column = target as i32;
        let mut rotation = KeyRotation {
            version: target,
            ..KeyRotation::default()
        };
        in_write_tx!(self, Scope::AllUsers, tx => {
            loop {
                let batch: Vec<RawRow> = sqlx::query_as(concat!(
                    "SELECT ", columns!(),
                    " FROM mcp_connections WHERE key_version <> $1 ORDER BY id LIMIT 100"
                ))
                .bind(target_column)
                .fetch_all(&mut *tx)
                .await?;
                if batch.is_empty() {
                    break;
                }
                for raw in batch {
                    let (id, version) = (raw.id, raw.version);
                    let record = self.decrypt_row(raw)?;
                    let (access, refresh) = Self::seal(
                        &keyring,
                        &record.info.user_id,
                        &record.info.server_name,
                        &record.tokens,
                    )?;
                    // version is left alone: rotation changes no credential, so it must not
                    // make a concurrent refresh's compare-and-swap fail. The version check
                    // keeps rotation from overwriting a row another instance wrote after the
                    // SELECT (PostgreSQL re-checks it on the committed row); such a row is
                    // picked up again by the next batch if it is still on an older key.
                    rotation.credentials += sqlx::query(
                        "UPDATE mcp_connections SET access_token = $1, refresh_token = $2, \
                         key_version = $3 WHERE id = $4 AND version = $5 AND key_version <> $3",
                    )
                    .bind(&access)
                    .bind(&refresh)
                    .bind(target_column)
                    .bind(id)
                    .bind(version)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                }
            }

            // One row per remote server: no batching needed.
            let clients: Vec<oauth_clients::RawClientRotation> = sqlx::query_as(
                "SELECT server_name, client_id, client_secret, key_version FROM oauth_clients \
                 WHERE key_version <> $1",
            )
            .bind(target_column)
            .fetch_all(&mut *tx)
            .await?;
            for raw in clients {
                let (client_id, client_secret) = raw.reseal(&keyring)?;
                rotation.clients += sqlx::query(
                    "UPDATE oauth_clients SET client_id = $1, client_secret = $2, \
                     key_version = $3 WHERE server_name = $4 AND key_version = $5",
                )
                .bind(&client_id)
                .bind(&client_secret)
                .bind(target_column)
                .bind(&raw.server_name)
                .bind(raw.key_version)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }

            // Pending flows live ten minutes at most, but a callback arriving after the old
            // key was retired must still find its verifier.
            let states: Vec<oauth_states::RawStateRotation> = sqlx::query_as(
                "SELECT state_hash, user_id, server_name, code_verifier, key_version \
                 FROM oauth_states WHERE key_version <> $1",
            )
            .bind(target_column)
            .fetch_all(&mut *tx)
            .await?;
            for raw in states {
                let verifier = raw.reseal(&keyring)?;
                rotation.states += sqlx::query(
                    "UPDATE oauth_states SET code_verifier = $1, key_version = $2 \
                     WHERE state_hash = $3 AND key_version = $4",
                )
                .bind(&verifier)
                .bind(target_column)
                .bind(&raw.state_hash)
                .bind(raw.key_version)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
        });
        Ok(rotation)
    }
}

/// What [`Store::rotate_key`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyRotation {
    /// The key version that now encrypts.
    pub version: u32,
    /// `mcp_connections` rows re-encrypted.
    pub credentials: u64,
    /// Registered OAuth clients (`oauth_clients` rows) re-encrypted.
    pub clients: u64,
    /// Pending connect flows (`oauth_states` rows) re-encrypted.
    pub states: u64,
}

// Declared after the macros above, which it uses (macro_rules! scoping is textual).
mod cluster;
mod oauth_clients;
mod oauth_states;
