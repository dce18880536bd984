//! `oauth_clients`: the OAuth client mcp-pool registered (RFC 7591) at a remote server's
//! authorization server, once per server. The first registration stored wins: a concurrent one
//! is discarded (`INSERT .. ON CONFLICT DO NOTHING`, then the stored row is read back), so all
//! instances and all users of the server share one client.

use chrono::{DateTime, Utc};

use super::{Backend, Scope, Store, now, set_scope};
use crate::ids::{ServerName, UserId};
use crate::store::StoreError;
use crate::store::crypto::{Keyring, TokenField};
use crate::store::secret::Secret;

/// The stand-in user id the client's ciphertexts are bound to (the row belongs to no user).
const CLIENT_OWNER: &str = "registered-client";

/// A registered client. `Debug` redacts the secret.
#[derive(Debug, Clone)]
pub struct RegisteredClientRow {
    pub server: ServerName,
    /// The discovered endpoints, as JSON (public metadata).
    pub endpoints: String,
    pub client_id: Secret,
    pub client_secret: Option<Secret>,
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct RawClient {
    endpoints: String,
    client_id: String,
    client_secret: Option<String>,
    key_version: i32,
    created_at: DateTime<Utc>,
}

/// A row as [`Store::rotate_key`] reads it (in its transaction).
#[derive(sqlx::FromRow)]
pub(super) struct RawClientRotation {
    pub(super) server_name: String,
    client_id: String,
    client_secret: Option<String>,
    pub(super) key_version: i32,
}

impl RawClientRotation {
    /// The client's id and secret sealed again with `keyring`'s current version.
    pub(super) fn reseal(&self, keyring: &Keyring) -> Result<(String, Option<String>), StoreError> {
        let server = ServerName::parse(&self.server_name)
            .map_err(|_| StoreError::Corrupt("oauth client: invalid server_name".into()))?;
        let (client_id, client_secret) = open(
            keyring,
            &server,
            self.key_version,
            &self.client_id,
            self.client_secret.as_deref(),
        )?;
        seal(keyring, &server, &client_id, client_secret.as_ref())
    }
}

fn owner() -> Result<UserId, StoreError> {
    UserId::parse(CLIENT_OWNER).map_err(|_| StoreError::Corrupt("client owner id".into()))
}

/// Decrypts a client's id and secret stored with key `version`.
fn open(
    keyring: &Keyring,
    server: &ServerName,
    version: i32,
    client_id: &str,
    client_secret: Option<&str>,
) -> Result<(Secret, Option<Secret>), StoreError> {
    let version = u32::try_from(version)
        .map_err(|_| StoreError::Corrupt("oauth client: negative key_version".into()))?;
    let owner = owner()?;
    let client_id = keyring.decrypt(&owner, server, TokenField::ClientId, version, client_id)?;
    let client_secret = client_secret
        .map(|sealed| keyring.decrypt(&owner, server, TokenField::ClientSecret, version, sealed))
        .transpose()?;
    Ok((client_id, client_secret))
}

/// Encrypts a client's id and secret with `keyring`'s current version.
fn seal(
    keyring: &Keyring,
    server: &ServerName,
    client_id: &Secret,
    client_secret: Option<&Secret>,
) -> Result<(String, Option<String>), StoreError> {
    let owner = owner()?;
    let client_id = keyring.encrypt(&owner, server, TokenField::ClientId, client_id)?;
    let client_secret = client_secret
        .map(|secret| keyring.encrypt(&owner, server, TokenField::ClientSecret, secret))
        .transpose()?;
    Ok((client_id, client_secret))
}

impl Store {
    /// The client registered for `server`, if any.
    pub async fn oauth_client(
        &self,
        server: &ServerName,
    ) -> Result<Option<RegisteredClientRow>, StoreError> {
        let raw: Option<RawClient> = in_read!(self, Scope::AllUsers, conn => {
            sqlx::query_as(
                "SELECT endpoints, client_id, client_secret, key_version, created_at \
                 FROM oauth_clients WHERE server_name = $1",
            )
            .bind(server.as_str())
            .fetch_optional(conn)
            .await
        })?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        let mut keyring = self.keyring();
        if u32::try_from(raw.key_version).is_ok_and(|v| !keyring.versions().contains(&v)) {
            keyring = self.reload_keyring()?;
        }
        let (client_id, client_secret) = open(
            &keyring,
            server,
            raw.key_version,
            &raw.client_id,
            raw.client_secret.as_deref(),
        )?;
        Ok(Some(RegisteredClientRow {
            server: server.clone(),
            endpoints: raw.endpoints,
            client_id,
            client_secret,
            created_at: raw.created_at,
        }))
    }

    /// Stores `client` unless the server already has one; returns the one stored (which is
    /// another instance's when that one was first).
    pub async fn insert_oauth_client(
        &self,
        client: &RegisteredClientRow,
    ) -> Result<RegisteredClientRow, StoreError> {
        let keyring = self.keyring();
        let server = &client.server;
        let (client_id, client_secret) = seal(
            &keyring,
            server,
            &client.client_id,
            client.client_secret.as_ref(),
        )?;
        in_write_tx!(self, Scope::AllUsers, tx => {
            sqlx::query(
                "INSERT INTO oauth_clients (server_name, endpoints, client_id, client_secret, \
                 key_version, created_at) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (server_name) DO NOTHING",
            )
            .bind(server.as_str())
            .bind(&client.endpoints)
            .bind(&client_id)
            .bind(&client_secret)
            .bind(keyring.current_version() as i32)
            .bind(now())
            .execute(&mut *tx)
            .await?;
        });
        self.oauth_client(server)
            .await?
            .ok_or_else(|| StoreError::Corrupt("oauth client vanished after insert".into()))
    }
}
