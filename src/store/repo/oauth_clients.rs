//! `oauth_clients`: the OAuth client mcp-pool registered (RFC 7591) at a remote server's
//! authorization server, once per server. The first registration stored wins: a concurrent one
//! is discarded (`INSERT .. ON CONFLICT DO NOTHING`, then the stored row is read back), so all
//! instances and all users of the server share one client.

use chrono::{DateTime, Utc};

use super::{Backend, Scope, Store, now, set_scope};
use crate::ids::{ServerName, UserId};
use crate::store::StoreError;
use crate::store::crypto::TokenField;
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

fn owner() -> Result<UserId, StoreError> {
    UserId::parse(CLIENT_OWNER).map_err(|_| StoreError::Corrupt("client owner id".into()))
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
        let version = u32::try_from(raw.key_version)
            .map_err(|_| StoreError::Corrupt("oauth client: negative key_version".into()))?;
        let mut keyring = self.keyring();
        if !keyring.versions().contains(&version) {
            keyring = self.reload_keyring()?;
        }
        let owner = owner()?;
        let client_id = keyring.decrypt(
            &owner,
            server,
            TokenField::ClientId,
            version,
            &raw.client_id,
        )?;
        let client_secret = match &raw.client_secret {
            Some(sealed) => {
                Some(keyring.decrypt(&owner, server, TokenField::ClientSecret, version, sealed)?)
            }
            None => None,
        };
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
        let owner = owner()?;
        let server = &client.server;
        let client_id = keyring.encrypt(&owner, server, TokenField::ClientId, &client.client_id)?;
        let client_secret = match &client.client_secret {
            Some(secret) => {
                Some(keyring.encrypt(&owner, server, TokenField::ClientSecret, secret)?)
            }
            None => None,
        };
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
