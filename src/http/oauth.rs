//! `/v1/oauth/{server}`: the connect flow. (Token freshness before tool use is the pool's.)
//!
//! - `POST /v1/oauth/{server}/start` (the user, authenticated) → `{ "authorization_url" }`;
//!   the chat app sends the user's browser there.
//! - `GET /v1/oauth/{server}/callback?code&state` (unauthenticated: the single-use state is
//!   the proof) → `303` to `success_redirect?connected={server}`, or to
//!   `error_redirect?error=<code>&server={server}`.
//!
//! Neither answer ever carries a code, a state, a verifier or a token; failures are logged by
//! kind only.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};

use super::error::ApiError;
use super::openapi::{ErrorBody, UserAuthErrors};
use super::{AuthUser, HttpState, ServerParam};
use crate::oauth::discovery::{self, DiscoveryError};
use crate::oauth::flow::{self, FlowStartError};
use crate::oauth::{CallbackError, CallbackParams};
use crate::store::{ServerName, Stored};

/// Body of a successful `start`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct StartResponse {
    pub server: ServerName,
    /// The provider's page, with PKCE S256 and the single-use state.
    #[schema(format = "uri")]
    pub authorization_url: String,
    /// The state stops working at this instant (10 minutes).
    pub expires_at: DateTime<Utc>,
}

fn not_configured(server: &ServerName) -> ApiError {
    ApiError::not_found(
        "oauth_not_configured",
        format!("server `{server}` has no OAuth connect flow configured"),
    )
}

/// `POST /v1/oauth/{server}/start`.
#[utoipa::path(
    post, path = "/v1/oauth/{server}/start", operation_id = "oauth_start", tag = "oauth",
    security(("bearer" = [])),
    params(("server" = ServerName, Path, description = "A configured server")),
    responses(
        (status = 200, description = "The provider's consent page for the user's browser (PKCE S256, single-use state valid 10 minutes)", body = StartResponse),
        (status = 400, description = "`missing_user_id`, `invalid_user_id`, `duplicate_header` or `invalid_server_name`", body = ErrorBody),
        UserAuthErrors,
        (status = 404, description = "`unknown_server` or `oauth_not_configured`", body = ErrorBody),
        (status = 502, description = "`oauth_discovery_failed`: a remote server's authorization server could not be discovered or registered with", body = ErrorBody),
        (status = 503, description = "`too_many_connections`", body = ErrorBody, headers(("Retry-After" = u64))),
    )
)]
pub async fn start(
    State(state): State<HttpState>,
    AuthUser(user): AuthUser,
    ServerParam(server): ServerParam,
) -> Result<Json<StartResponse>, ApiError> {
    let provider = provider_of(&state, &server, true).await?;
    let started = flow::start(&state.store, &provider, &user)
        .await
        .map_err(|err| match err {
            FlowStartError::NotConfigured => not_configured(&server),
            FlowStartError::OAuth(err) => ApiError::internal(&err),
            FlowStartError::Store(err) => ApiError::internal(&err),
        })?;
    Ok(Json(StartResponse {
        server,
        authorization_url: started.authorization_url,
        expires_at: started.expires_at,
    }))
}

/// `GET /v1/oauth/{server}/callback`. Always a `303` once the server is known to have a
/// connect flow; the outcome is in the redirect's query.
#[utoipa::path(
    get, path = "/v1/oauth/{server}/callback", operation_id = "oauth_callback", tag = "oauth",
    security(()),
    params(
        ("server" = ServerName, Path, description = "A configured server"),
        ("code" = Option<String>, Query, description = "The authorization code"),
        ("state" = Option<String>, Query, description = "The single-use state of `start`"),
        ("error" = Option<String>, Query, description = "Set by the provider instead of `code`, e.g. `access_denied`"),
    ),
    responses(
        (status = 303, description = "To `success_redirect?connected={server}`, or to `error_redirect?error=<code>&server={server}` with code one of `invalid_state`, `state_expired`, `access_denied`, `provider_error`, `invalid_request`, `issuer_mismatch`, `token_exchange_failed`, `provider_unavailable`, `internal`", headers(("Location" = String))),
        (status = 400, description = "`invalid_server_name`", body = ErrorBody),
        (status = 404, description = "`unknown_server` or `oauth_not_configured`", body = ErrorBody),
        (status = 503, description = "`too_many_connections`", body = ErrorBody, headers(("Retry-After" = u64))),
    )
)]
pub async fn callback(
    State(state): State<HttpState>,
    ServerParam(server): ServerParam,
    query: Result<Query<CallbackParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Some(refresher) = state.pool.refresher() else {
        return Err(not_configured(&server));
    };
    // A callback never registers a client: it finishes a flow whose start found one.
    let provider = provider_of(&state, &server, false).await?;
    let params = query.map(|Query(params)| params).unwrap_or_default();
    let outcome = flow::complete(refresher, &state.credentials, &server, params).await;
    let target = match outcome {
        Ok(connected) => {
            tracing::Span::current().record("user_id", connected.user.as_str());
            state
                .pool
                .credentials_stored(
                    &connected.user,
                    &server,
                    connected.stored == Stored::Replaced,
                )
                .await;
            provider.success_url()
        }
        Err(err) => {
            match &err {
                CallbackError::Store(_) | CallbackError::Credentials(_) => {
                    tracing::error!(cause = %err, "OAuth callback failed")
                }
                _ => tracing::warn!(code = err.code(), cause = %err, "OAuth callback refused"),
            }
            state.metrics.error(err.code());
            provider.error_url(err.code())
        }
    };
    // Validation guarantees both redirects exist when the flow is enabled.
    let target = target.ok_or_else(|| not_configured(&server))?;
    Ok(Redirect::to(target.as_str()).into_response())
}

/// The connect flow's OAuth client of `server`: configured, or for a remote server configured
/// for discovery, discovered (and registered, when `register`) on first use.
async fn provider_of(
    state: &HttpState,
    server: &ServerName,
    register: bool,
) -> Result<std::sync::Arc<crate::oauth::Provider>, ApiError> {
    let refresher = state
        .pool
        .refresher()
        .ok_or_else(|| not_configured(server))?;
    if let Some(provider) = refresher.provider(server) {
        return if provider.connect_flow_enabled() {
            Ok(provider)
        } else {
            Err(not_configured(server))
        };
    }
    let Some(config) = state.config.server(server).filter(|c| c.uses_discovery()) else {
        return Err(not_configured(server));
    };
    let http = crate::oauth::provider::http_client().map_err(|err| ApiError::internal(&err))?;
    let found = if register {
        discovery::ensure_provider(refresher, &state.store, server, config, &http).await
    } else {
        discovery::load_provider(refresher, &state.store, server, config, &http)
            .await
            .and_then(|p| p.ok_or(DiscoveryError::NotConfigured))
    };
    found.map_err(|err| match err {
        DiscoveryError::NotConfigured => not_configured(server),
        DiscoveryError::Store(_) => ApiError::internal(&err),
        other => {
            tracing::warn!(cause = %other, "OAuth discovery failed");
            ApiError::new(
                axum::http::StatusCode::BAD_GATEWAY,
                "oauth_discovery_failed",
                format!("cannot discover the authorization server of `{server}`: {other}"),
            )
        }
    })
}
