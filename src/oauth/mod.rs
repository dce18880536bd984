//! OAuth 2 for MCP servers that act on a user's Google (or other provider) account.
//!
//! - [`provider`]: one server's OAuth client: the authorization URL (PKCE S256), the code
//!   exchange and the refresh at the token endpoint, form-encoded, with client authentication.
//! - [`pkce`]: random states and verifiers, S256 challenges, the stored hash of a state.
//! - [`flow`]: the connect flow: `start` stores a single-use state, `complete` consumes it,
//!   exchanges the code and stores the tokens through the `CredentialActor`.
//! - [`refresh`]: [`TokenRefresher`], automatic refresh with exactly one refresh at a time per
//!   (user, server) in this process and a compare-and-swap on the row's `version` across
//!   processes.
//! - [`remote`]: the credentials of a remote MCP server's session, read from the user's row
//!   and replaced after a 401 through the refresher.
//!
//! Secrets (codes, verifiers, states, tokens, the client secret) are [`Secret`]s or hashed:
//! they never reach a log line, an error message or an HTTP response.
//!
//! [`Secret`]: crate::store::Secret

pub mod discovery;
pub mod flow;
pub mod pkce;
pub mod provider;
pub mod refresh;
pub mod remote;

use std::time::Duration;

pub use flow::{CallbackError, CallbackParams};
pub use provider::Provider;
pub use refresh::{Freshness, TokenRefresher};

/// Why a request to the provider failed. Carries the provider's error *code* at most, never a
/// token, a code or the client secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OAuthError {
    /// The grant (code or refresh token) is invalid, expired or revoked.
    #[error("the provider rejected the grant (invalid_grant)")]
    InvalidGrant,
    /// Any other refusal (4xx): misconfigured client, bad request, wrong PKCE verifier, ...
    #[error("the token endpoint refused the request: HTTP {status} ({error})")]
    Rejected { status: u16, error: String },
    /// 5xx, 429 or 408: worth retrying later.
    #[error("the token endpoint failed with HTTP {0}")]
    ServerError(u16),
    #[error("the token endpoint did not answer within {0:?}")]
    Timeout(Duration),
    /// Connection refused, reset, TLS failure, ...
    #[error("cannot reach the token endpoint: {0}")]
    Transport(String),
    #[error("malformed token response: {0}")]
    Malformed(String),
    #[error("this server has no OAuth {0} configured")]
    NotConfigured(&'static str),
    #[error("cannot set up the OAuth HTTP client: {0}")]
    Setup(String),
    #[error("cannot gather randomness: {0}")]
    Random(String),
}

impl OAuthError {
    /// Whether trying again later may succeed (the credentials are kept).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            OAuthError::ServerError(_) | OAuthError::Timeout(_) | OAuthError::Transport(_)
        )
    }
}
