//! The credentials of a remote session (`mcp::RemoteCredentials`) on the store and the token
//! refresher: the user's own row, and nothing else, is read for the (user, server) the session
//! belongs to, so a token can only ever be sent on its owner's session.

use crate::config::RemoteAuth;
use crate::mcp::{CurrentSecret, RemoteCredentials};
use crate::store::{BoxFuture, CredentialError, Secret, ServerName, Store, UserId};

use super::TokenRefresher;

/// One user's credentials for one remote server.
pub struct StoredCredentials {
    user: UserId,
    server: ServerName,
    store: Store,
    refresher: Option<TokenRefresher>,
    mode: RemoteAuth,
}

impl StoredCredentials {
    pub fn new(
        user: UserId,
        server: ServerName,
        store: Store,
        refresher: Option<TokenRefresher>,
        mode: RemoteAuth,
    ) -> StoredCredentials {
        StoredCredentials {
            user,
            server,
            store,
            refresher,
            mode,
        }
    }

    async fn read(&self) -> Result<CurrentSecret, CredentialError> {
        let record = self
            .store
            .get(&self.user, &self.server)
            .await?
            .ok_or_else(|| CredentialError::NotFound(self.server.clone()))?;
        let secret = record
            .tokens
            .access_token
            .filter(|t| !t.expose().is_empty())
            .ok_or_else(|| CredentialError::NotFound(self.server.clone()))?;
        Ok(CurrentSecret {
            secret,
            // An API key has no expiry of ours; a token is read again once it has expired
            // (the pool's freshness check has usually refreshed it by then).
            expires_at: match self.mode {
                RemoteAuth::Oauth => record.tokens.token_expiry,
                RemoteAuth::ApiKey | RemoteAuth::None => None,
            },
        })
    }
}

impl RemoteCredentials for StoredCredentials {
    fn current(&self) -> BoxFuture<'_, Result<CurrentSecret, CredentialError>> {
        Box::pin(self.read())
    }

    fn rejected<'a>(
        &'a self,
        rejected: &'a Secret,
    ) -> BoxFuture<'a, Result<CurrentSecret, CredentialError>> {
        Box::pin(async move {
            if self.mode == RemoteAuth::Oauth
                && let Some(refresher) = &self.refresher
                && refresher.manages(&self.server)
            {
                refresher
                    .refresh_rejected(&self.user, &self.server, rejected)
                    .await?;
            }
            // Whatever is stored now, if it is not what the server refused (a key stored again
            // by the user, a token refreshed here or by another instance).
            match self.read().await {
                Ok(current) if current.secret != *rejected => Ok(current),
                Ok(_) => Err(CredentialError::ReconnectRequired(self.server.clone())),
                Err(CredentialError::NotFound(server)) => {
                    Err(CredentialError::ReconnectRequired(server))
                }
                Err(err) => Err(err),
            }
        })
    }
}
