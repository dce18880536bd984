//! `oauth_states`: the server-side half of a pending OAuth connect flow.
//!
//! A row is created by `POST /v1/oauth/{server}/start` and consumed, at most once, by the
//! callback: [`Store::take_oauth_state`] deletes and returns it in one statement, so two
//! callbacks racing with the same state cannot both get it. The table holds the SHA-256 of the
//! state (never the state) and the PKCE verifier encrypted like the tokens.

use chrono::{DateTime, Utc};

use super::{Backend, Scope, Store, now, set_scope};
use crate::ids::{ServerName, UserId};
use crate::store::StoreError;
use crate::store::crypto::{Keyring, TokenField};
use crate::store::secret::Secret;

/// A flow to remember.
#[derive(Debug, Clone)]
pub struct NewOAuthState {
    /// Hex SHA-256 of the random state sent to the provider.
    pub state_hash: String,
    pub user: UserId,
    pub server: ServerName,
    pub code_verifier: Secret,
    pub expires_at: DateTime<Utc>,
}

/// A consumed flow. `Debug` redacts the verifier.
#[derive(Debug, Clone)]
pub struct OAuthState {
    pub user: UserId,
    pub server: ServerName,
    pub code_verifier: Secret,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct RawState {
    user_id: String,
    server_name: String,
    code_verifier: String,
    key_version: i32,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

/// A row as [`Store::rotate_key`] reads it (in its transaction).
#[derive(sqlx::FromRow)]
pub(super) struct RawStateRotation {
    pub(super) state_hash: String,
    user_id: String,
    server_name: String,
    code_verifier: String,
    pub(super) key_version: i32,
}

impl RawStateRotation {
    /// The verifier sealed again with `keyring`'s current version.
    pub(super) fn reseal(&self, keyring: &Keyring) -> Result<String, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("oauth state: {what}"));
        let user = UserId::parse(&self.user_id).map_err(|_| corrupt("invalid user_id"))?;
        let server =
            ServerName::parse(&self.server_name).map_err(|_| corrupt("invalid server_name"))?;
        let version =
            u32::try_from(self.key_version).map_err(|_| corrupt("negative key_version"))?;
        let verifier = keyring.decrypt(
            &user,
            &server,
            TokenField::PkceVerifier,
            version,
            &self.code_verifier,
        )?;
        Ok(keyring.encrypt(&user, &server, TokenField::PkceVerifier, &verifier)?)
    }
}

impl Store {
    /// Stores a pending flow; also forgets the user's expired ones.
    pub async fn insert_oauth_state(&self, state: &NewOAuthState) -> Result<(), StoreError> {
        let keyring = self.keyring();
        let verifier = keyring.encrypt(
            &state.user,
            &state.server,
            TokenField::PkceVerifier,
            &state.code_verifier,
        )?;
        let at = now();
        in_write_tx!(self, Scope::User(&state.user), tx => {
            sqlx::query("DELETE FROM oauth_states WHERE user_id = $1 AND expires_at < $2")
                .bind(state.user.as_str())
                .bind(at)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO oauth_states (state_hash, user_id, server_name, code_verifier, \
                 key_version, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&state.state_hash)
            .bind(state.user.as_str())
            .bind(state.server.as_str())
            .bind(&verifier)
            .bind(keyring.current_version() as i32)
            .bind(at)
            .bind(state.expires_at)
            .execute(&mut *tx)
            .await?;
        });
        Ok(())
    }

    /// Deletes and returns the flow with this state hash, expired or not (the caller checks
    /// expiry and the server): whatever happens next, a state works at most once.
    pub async fn take_oauth_state(
        &self,
        state_hash: &str,
    ) -> Result<Option<OAuthState>, StoreError> {
        let raw: Option<RawState> = in_write_tx!(self, Scope::OAuthState(state_hash), tx => {
            sqlx::query_as(
                "DELETE FROM oauth_states WHERE state_hash = $1 RETURNING user_id, server_name, \
                 code_verifier, key_version, created_at, expires_at",
            )
            .bind(state_hash)
            .fetch_optional(&mut *tx)
            .await?
        });
        let Some(raw) = raw else {
            return Ok(None);
        };
        let corrupt = |what: &str| StoreError::Corrupt(format!("oauth state: {what}"));
        let user = UserId::parse(&raw.user_id).map_err(|_| corrupt("invalid user_id"))?;
        let server =
            ServerName::parse(&raw.server_name).map_err(|_| corrupt("invalid server_name"))?;
        let version =
            u32::try_from(raw.key_version).map_err(|_| corrupt("negative key_version"))?;
        let mut keyring = self.keyring();
        if !keyring.versions().contains(&version) {
            keyring = self.reload_keyring()?;
        }
        let code_verifier = keyring.decrypt(
            &user,
            &server,
            TokenField::PkceVerifier,
            version,
            &raw.code_verifier,
        )?;
        Ok(Some(OAuthState {
            user,
            server,
            code_verifier,
            created_at: raw.created_at,
            expires_at: raw.expires_at,
        }))
    }

    /// Deletes every expired flow; returns how many.
    pub async fn cleanup_oauth_states(&self) -> Result<u64, StoreError> {
        let at = now();
        let done = in_write_tx!(self, Scope::AllUsers, tx => sqlx::query(
            "DELETE FROM oauth_states WHERE expires_at < $1",
        )
        .bind(at)
        .execute(&mut *tx)
        .await?
        .rows_affected());
        Ok(done)
    }
}
