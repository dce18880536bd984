//! The connect flow (authorization code with PKCE), independent of HTTP.
//!
//! [`start`] makes a random state and PKCE verifier, stores the state's hash and the encrypted
//! verifier (bound to the user and server, expiring after [`STATE_TTL`]) and returns the
//! provider's authorization URL. [`complete`] consumes the state (once, whatever happens next),
//! checks it belongs to this server and has not expired, exchanges the code with the stored
//! verifier and stores the tokens through the `CredentialActor` (row and credentials file).
//! Nothing is stored unless every step succeeded.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::provider::Provider;
use super::{OAuthError, TokenRefresher, pkce};
use crate::store::{
    CredentialError, CredentialInfo, CredentialWriter, NewOAuthState, Secret, ServerName, Store,
    StoreError, Stored, Tokens, UserId,
};

/// How long a started flow may take (the user's time on the provider's page).
pub const STATE_TTL: Duration = Duration::from_secs(10 * 60);

/// Longest state accepted from a callback (ours are 43 characters).
const MAX_STATE_LEN: usize = 256;

/// A started flow.
#[derive(Debug, Clone)]
pub struct StartedFlow {
    /// Where the chat app sends the user.
    pub authorization_url: String,
    pub expires_at: DateTime<Utc>,
}

/// The callback's query, as the provider sent it.
#[derive(Debug, Default, serde::Deserialize)]
pub struct CallbackParams {
    pub code: Option<Secret>,
    pub state: Option<Secret>,
    /// Set instead of `code` when the user declined or the provider failed.
    pub error: Option<String>,
    /// RFC 9207: the issuer of the authorization server that answered.
    pub iss: Option<String>,
}

/// Why a callback did not connect. [`CallbackError::code`] goes into the error redirect.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("unknown, already used or malformed state")]
    InvalidState,
    #[error("the state expired")]
    StateExpired,
    #[error("the state was issued for another server")]
    StateMismatch,
    #[error("the user declined access")]
    AccessDenied,
    #[error("the provider reported an error ({0})")]
    ProviderError(String),
    #[error("the callback has no code")]
    MissingCode,
    #[error("the callback's issuer is wrong: {0}")]
    Issuer(#[from] super::provider::IssuerProblem),
    #[error("the token endpoint refused the code: {0}")]
    ExchangeRejected(OAuthError),
    #[error("the token endpoint is unavailable: {0}")]
    ProviderUnavailable(OAuthError),
    #[error("this server has no connect flow configured")]
    NotConfigured,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Credentials(#[from] CredentialError),
}

impl CallbackError {
    /// The `error=` value of the redirect: stable and free of detail.
    pub fn code(&self) -> &'static str {
        match self {
            CallbackError::InvalidState | CallbackError::StateMismatch => "invalid_state",
            CallbackError::StateExpired => "state_expired",
            CallbackError::AccessDenied => "access_denied",
            CallbackError::ProviderError(_) => "provider_error",
            CallbackError::MissingCode => "invalid_request",
            CallbackError::Issuer(_) => "issuer_mismatch",
            CallbackError::ExchangeRejected(_) => "token_exchange_failed",
            CallbackError::ProviderUnavailable(_) => "provider_unavailable",
            CallbackError::NotConfigured => "oauth_not_configured",
            CallbackError::Store(_) | CallbackError::Credentials(_) => "internal",
        }
    }
}

/// Starts a flow for `user` at `provider`'s server.
pub async fn start(
    store: &Store,
    provider: &Provider,
    user: &UserId,
) -> Result<StartedFlow, FlowStartError> {
    if !provider.connect_flow_enabled() {
        return Err(FlowStartError::NotConfigured);
    }
    let state = pkce::random_token()?;
    let verifier = pkce::random_token()?;
    let challenge = pkce::s256_challenge(&verifier);
    let url = provider.authorization_url(&state, &challenge)?;
    let expires_at = Utc::now()
        + chrono::Duration::from_std(STATE_TTL).map_err(|_| StoreError::DurationOutOfRange)?;
    store
        .insert_oauth_state(&NewOAuthState {
            state_hash: pkce::state_hash(state.expose()),
            user: user.clone(),
            server: provider.server().clone(),
            code_verifier: verifier,
            expires_at,
        })
        .await?;
    tracing::info!(user_id = %user, server = %provider.server(), "Started an OAuth connect flow");
    Ok(StartedFlow {
        authorization_url: url.into(),
        expires_at,
    })
}

/// Why a flow could not start.
#[derive(Debug, thiserror::Error)]
pub enum FlowStartError {
    #[error("this server has no connect flow configured")]
    NotConfigured,
    #[error(transparent)]
    OAuth(#[from] OAuthError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a successful callback stored.
#[derive(Debug, Clone)]
pub struct Connected {
    pub user: UserId,
    pub info: CredentialInfo,
    pub stored: Stored,
}

/// Completes the flow whose callback reached `server`'s route.
pub async fn complete(
    refresher: &TokenRefresher,
    credentials: &dyn CredentialWriter,
    server: &ServerName,
    params: CallbackParams,
) -> Result<Connected, CallbackError> {
    let provider = refresher
        .provider(server)
        .filter(|p| p.connect_flow_enabled())
        .ok_or(CallbackError::NotConfigured)?;
    let state = params
        .state
        .filter(|s| !s.expose().is_empty() && s.expose().len() <= MAX_STATE_LEN)
        .ok_or(CallbackError::InvalidState)?;
    // Consumed here, before anything else is looked at: a state works at most once.
    let flow = credentials
        .store()
        .take_oauth_state(&pkce::state_hash(state.expose()))
        .await?
        .ok_or(CallbackError::InvalidState)?;
    if &flow.server != server {
        return Err(CallbackError::StateMismatch);
    }
    if flow.expires_at <= Utc::now() {
        return Err(CallbackError::StateExpired);
    }
    // Before the error too: an error response of another server is no answer to this flow.
    provider.check_issuer(params.iss.as_deref())?;
    if let Some(error) = params.error {
        return Err(if error == "access_denied" {
            CallbackError::AccessDenied
        } else {
            CallbackError::ProviderError(
                error
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .take(64)
                    .collect(),
            )
        });
    }
    let code = params
        .code
        .filter(|c| !c.expose().is_empty())
        .ok_or(CallbackError::MissingCode)?;
    let tokens = provider
        .exchange_code(&code, &flow.code_verifier)
        .await
        .map_err(|err| {
            if err.is_transient() {
                CallbackError::ProviderUnavailable(err)
            } else {
                CallbackError::ExchangeRejected(err)
            }
        })?;
    let (info, stored) = credentials
        .create(
            &flow.user,
            server,
            Tokens {
                access_token: Some(tokens.access_token),
                refresh_token: tokens.refresh_token,
                token_expiry: Some(tokens.expires_at),
            },
        )
        .await?;
    refresher.forget(&flow.user, server);
    tracing::info!(
        user_id = %flow.user, server = %server, ?stored, has_refresh_token = info.has_refresh_token,
        "Connected through OAuth"
    );
    Ok(Connected {
        user: flow.user,
        info,
        stored,
    })
}
