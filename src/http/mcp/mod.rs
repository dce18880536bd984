//! `/mcp`: each user's servers as one Streamable HTTP MCP server, for any MCP client.
//!
//! rmcp's server-side transport ([`StreamableHttpService`]) runs behind [`gate`], an axum
//! middleware that verifies the caller exactly as the REST routes do before rmcp sees a byte,
//! and puts the verified [`McpCaller`] into the request's extensions (rmcp hands the request's
//! `Parts` to the handler, [`facade::Facade`]). Protocol versions 2025-06-18 and 2025-11-25
//! run in sessions (`Mcp-Session-Id`); 2026-07-28 has none and every request stands alone.
//! Tools, prompts and resources pass through (see [`facade`] for the names and URIs).
//!
//! A session belongs to the user who initialized it ([`SessionOwners`]): a request naming a
//! session that another user opened, or one this gate never saw, is answered 404 like an
//! unknown session, so nobody can probe for other users' sessions. A user holds at most
//! `mcp.max_sessions_per_user` sessions; the oldest is closed to admit a new one.
//!
//! In `jwt` mode a 401 carries `WWW-Authenticate: Bearer resource_metadata="…"` pointing at
//! the OAuth protected-resource metadata (RFC 9728), served at
//! `/.well-known/oauth-protected-resource[/mcp]`, which names `auth.jwt.issuer` as the
//! authorization server, so spec-following clients can find where their users log in.

mod facade;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::session::SessionId;
use rmcp::transport::streamable_http_server::session::SessionManager as _;
use rmcp::transport::streamable_http_server::session::local::{LocalSessionManager, SessionConfig};
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;

use super::HttpState;
use super::error::ApiError;
use super::openapi::ErrorBody;
use crate::config::{AuthMode, Config};
use crate::store::UserId;

pub use facade::Facade;

/// The route of the endpoint.
pub const PATH: &str = "/mcp";
/// RFC 9728 metadata of the protected resource `{base}/mcp` (path-inserted form, which
/// spec-following clients ask for first) and at the root.
pub const RESOURCE_METADATA_PATH: &str = "/.well-known/oauth-protected-resource/mcp";
pub const ROOT_RESOURCE_METADATA_PATH: &str = "/.well-known/oauth-protected-resource";
const SESSION_HEADER: &str = "mcp-session-id";

/// The verified user of a `/mcp` request, put into its extensions by [`gate`].
#[derive(Debug, Clone)]
pub struct McpCaller(pub UserId);

/// The endpoint's state shared by every request: rmcp's sessions, their owners, and the
/// token that ends them all on shutdown.
pub struct McpEndpoint {
    sessions: Arc<LocalSessionManager>,
    owners: Mutex<SessionOwners>,
    max_per_user: usize,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for McpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpEndpoint").finish_non_exhaustive()
    }
}

impl McpEndpoint {
    pub fn new(config: &Config) -> McpEndpoint {
        let mut session_config = SessionConfig::default();
        session_config.keep_alive = Some(config.mcp.session_idle_timeout);
        let mut sessions = LocalSessionManager::default();
        sessions.session_config = session_config;
        McpEndpoint {
            sessions: Arc::new(sessions),
            owners: Mutex::new(SessionOwners::default()),
            max_per_user: config.mcp.max_sessions_per_user,
            shutdown: CancellationToken::new(),
        }
    }

    /// Ends every session and open stream (the listener is closing): an open SSE stream would
    /// otherwise hold the drain for the whole shutdown grace.
    pub fn shut_down(&self) {
        self.shutdown.cancel();
    }

    /// Open sessions (for tests and stats).
    pub fn session_count(&self) -> usize {
        self.owners().by_id.len()
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, SessionOwners> {
        // The map is consistent after every statement; a panic elsewhere cannot break it.
        self.owners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records `id` as `user`'s; closes the user's oldest sessions past the cap and forgets
    /// sessions rmcp has already dropped (idle timeout).
    async fn bind(&self, id: String, user: UserId) {
        let mine = {
            let mut owners = self.owners();
            owners.by_id.insert(
                id.clone(),
                Owner {
                    user: user.clone(),
                    since: Instant::now(),
                },
            );
            owners.of(&user)
        };
        let mut live = Vec::with_capacity(mine.len());
        for (session, since) in mine {
            if self
                .sessions
                .has_session(&SessionId::from(session.as_str()))
                .await
                .unwrap_or(false)
            {
                live.push((session, since));
            } else {
                self.owners().by_id.remove(&session);
            }
        }
        if live.len() > self.max_per_user {
            live.sort_by_key(|(_, since)| *since);
            let excess = live.len() - self.max_per_user;
            for (session, _) in live.into_iter().take(excess) {
                tracing::info!(user_id = %user, "closing the user's oldest /mcp session (mcp.max_sessions_per_user)");
                self.owners().by_id.remove(&session);
                let _ = self
                    .sessions
                    .close_session(&SessionId::from(session.as_str()))
                    .await;
            }
        }
        self.prune_if_large().await;
    }

    /// Forgets sessions rmcp no longer has, when the map has doubled since the last pass, so
    /// users who never come back do not leave their entries behind for ever.
    async fn prune_if_large(&self) {
        let ids: Vec<String> = {
            let owners = self.owners();
            if owners.by_id.len() < owners.prune_at {
                return;
            }
            owners.by_id.keys().cloned().collect()
        };
        let mut gone = Vec::new();
        for id in ids {
            if !self
                .sessions
                .has_session(&SessionId::from(id.as_str()))
                .await
                .unwrap_or(false)
            {
                gone.push(id);
            }
        }
        let mut owners = self.owners();
        for id in gone {
            owners.by_id.remove(&id);
        }
        owners.prune_at = (owners.by_id.len() * 2).max(PRUNE_FLOOR);
    }
}

/// Sessions tracked before the first pruning pass.
const PRUNE_FLOOR: usize = 256;

/// Which user opened which session.
struct SessionOwners {
    by_id: HashMap<String, Owner>,
    /// Size at which [`McpEndpoint::prune_if_large`] next looks for dropped sessions.
    prune_at: usize,
}

impl Default for SessionOwners {
    fn default() -> Self {
        SessionOwners {
            by_id: HashMap::new(),
            prune_at: PRUNE_FLOOR,
        }
    }
}

impl SessionOwners {
    fn of(&self, user: &UserId) -> Vec<(String, Instant)> {
        self.by_id
            .iter()
            .filter(|(_, owner)| &owner.user == user)
            .map(|(id, owner)| (id.clone(), owner.since))
            .collect()
    }
}

struct Owner {
    user: UserId,
    since: Instant,
}

/// The rmcp service of `/mcp`, wrapped in [`gate`].
pub fn service(state: &HttpState) -> axum::Router<HttpState> {
    let endpoint = state.mcp.clone();
    let mut config = StreamableHttpServerConfig::default()
        .with_cancellation_token(endpoint.shutdown.child_token())
        .with_max_request_body_bytes(state.config.http.max_body_bytes)
        // rmcp's default accepts only loopback `Host`s, against DNS rebinding of unauthenticated
        // local servers; every request here is authenticated first (a rebinding page has no
        // key or token), and the service runs behind any host name its operator gives it.
        .disable_allowed_hosts();
    // 2025-06-18 / 2025-11-25 in sessions; 2026-07-28 is served statelessly regardless.
    config.legacy_session_mode = true;
    let facade_state = state.clone();
    let rmcp = StreamableHttpService::new(
        move || Ok(Facade::new(facade_state.clone())),
        endpoint.sessions.clone(),
        config,
    );
    axum::Router::new()
        .route_service(PATH, rmcp)
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
}

/// Verifies the caller, binds sessions to users, and refuses another user's session.
async fn gate(State(state): State<HttpState>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    let user = match state.auth.user_of(&parts) {
        Ok(user) => user,
        Err(err) => return challenge(&state, err),
    };
    tracing::Span::current().record("user_id", user.as_str());
    let session = match parts
        .headers
        .get_all(SESSION_HEADER)
        .iter()
        .collect::<Vec<_>>()[..]
    {
        [] => None,
        [value] => match value.to_str() {
            Ok(id) => Some(id.to_owned()),
            Err(_) => return unknown_session(),
        },
        _ => {
            return ApiError::bad_request(
                "duplicate_header",
                "the Mcp-Session-Id header must appear at most once",
            )
            .into_response();
        }
    };
    if let Some(id) = &session {
        let owned = state
            .mcp
            .owners()
            .by_id
            .get(id)
            .is_some_and(|owner| owner.user == user);
        if !owned {
            // Another user's session, or one this service never opened (or has forgotten):
            // the same answer, so a session id's existence leaks to nobody.
            return unknown_session();
        }
    }
    parts.extensions.insert(McpCaller(user.clone()));
    let method = parts.method.clone();
    let mut response = next.run(Request::from_parts(parts, body)).await;
    match session {
        None => {
            if let Some(id) = response
                .headers()
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                state.mcp.bind(id.to_owned(), user).await;
            }
        }
        Some(id) if method == Method::DELETE && response.status().is_success() => {
            state.mcp.owners().by_id.remove(&id);
            // rmcp answers 202; clients expect 200 or 204 for a terminated session (the
            // Python SDK logs a warning otherwise), and nothing is pending.
            if response.status() == axum::http::StatusCode::ACCEPTED {
                *response.status_mut() = axum::http::StatusCode::NO_CONTENT;
            }
        }
        Some(_) => {}
    }
    response
}

fn unknown_session() -> Response {
    ApiError::not_found(
        "unknown_session",
        "no such MCP session; initialize a new one",
    )
    .into_response()
}

/// The auth error, with the `WWW-Authenticate` challenge a 401 must carry (RFC 6750); in
/// `jwt` mode it points at the protected-resource metadata (RFC 9728).
fn challenge(state: &HttpState, err: ApiError) -> Response {
    let unauthorized = err.status() == axum::http::StatusCode::UNAUTHORIZED;
    let mut response = err.into_response();
    if unauthorized {
        let value = match state.config.auth.mode {
            AuthMode::Jwt => format!(
                "Bearer resource_metadata=\"{}{RESOURCE_METADATA_PATH}\"",
                base_url(&state.config)
            ),
            AuthMode::ApiKey => "Bearer".to_owned(),
        };
        if let Ok(value) = HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
    }
    response
}

fn base_url(config: &Config) -> String {
    config.mcp.base_url(config.service.listen)
}

/// RFC 9728 metadata of the `/mcp` resource.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ProtectedResource {
    /// `{mcp.public_url}/mcp`.
    pub resource: String,
    /// The issuer of the users' tokens (`auth.jwt.issuer`); empty when none is configured.
    pub authorization_servers: Vec<String>,
    /// Always `["header"]`.
    pub bearer_methods_supported: Vec<&'static str>,
    pub resource_name: &'static str,
}

/// `GET /.well-known/oauth-protected-resource[/mcp]`: `jwt` mode only.
#[utoipa::path(
    get, path = "/.well-known/oauth-protected-resource/mcp", operation_id = "mcp_protected_resource", tag = "mcp",
    responses(
        (status = 200, description = "OAuth 2.0 protected-resource metadata of `/mcp` (RFC 9728); also served at `/.well-known/oauth-protected-resource`", body = ProtectedResource),
        (status = 404, description = "`not_found`: `auth.mode` is not `jwt`", body = ErrorBody),
    )
)]
pub async fn protected_resource(
    State(state): State<HttpState>,
) -> Result<Json<ProtectedResource>, ApiError> {
    let config = &state.config;
    if config.auth.mode != AuthMode::Jwt {
        return Err(ApiError::not_found("not_found", "no such route"));
    }
    let issuer = config.auth.jwt.as_ref().and_then(|jwt| jwt.issuer.clone());
    Ok(Json(ProtectedResource {
        resource: format!("{}{PATH}", base_url(config)),
        authorization_servers: issuer.into_iter().collect(),
        bearer_methods_supported: vec!["header"],
        resource_name: "mcp-pool",
    }))
}

/// Documents `/mcp` in the OpenAPI description (rmcp serves it; this is never routed).
#[utoipa::path(
    post, path = "/mcp", operation_id = "mcp", tag = "mcp",
    security(("bearer" = [])),
    params(
        ("Mcp-Session-Id" = Option<String>, Header, description = "The session (2025-06-18 and 2025-11-25), from the `initialize` answer"),
        ("MCP-Protocol-Version" = Option<String>, Header, description = "2025-06-18, 2025-11-25 or 2026-07-28"),
    ),
    request_body(content = Object, description = "One JSON-RPC message of the Model Context Protocol (Streamable HTTP transport); `Accept` must list `application/json` and `text/event-stream`", content_type = "application/json"),
    responses(
        (status = 200, description = "The answer as server-sent events (progress notifications first, then the result)", content_type = "text/event-stream"),
        (status = 202, description = "A notification or response was accepted"),
        (status = 400, description = "Not a JSON-RPC message, a missing session id, `missing_user_id`, `invalid_user_id` or `duplicate_header`"),
        (status = 401, description = "`unauthorized`, with `WWW-Authenticate: Bearer` (in `jwt` mode with `resource_metadata`)", body = ErrorBody),
        (status = 403, description = "`forbidden`: the admin key cannot act as a user", body = ErrorBody),
        (status = 404, description = "`unknown_session`: no such session for this user", body = ErrorBody),
        (status = 406, description = "`Accept` lacks `application/json` or `text/event-stream`"),
        (status = 413, description = "Body larger than http.max_body_bytes"),
        (status = 415, description = "Not `application/json`"),
    )
)]
pub fn mcp_route_doc() {}
