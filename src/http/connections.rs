//! `/v1/connections`: the caller's credentials per server, with the live session state.
//! Responses never hold a token, a credentials path or another user's data.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};

use super::error::{ApiError, optional_json};
use super::openapi::{ErrorBody, UserAuthErrors};
use super::{AuthUser, HttpState, ServerParam};
use crate::actors::{SessionState, SessionStats, Warmed};
use crate::store::{CredentialInfo, CredentialWriter, Secret, ServerName, Stored, Tokens, UserId};

/// Longest accepted access or refresh token. Real ones are far shorter (Google's are under
/// 2 KiB; JWT access tokens a few KiB); anything longer is abuse, and it would be written to a
/// file and encrypted into a row.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Longest accepted `client_id` (Google's are about 75 characters).
pub const MAX_CLIENT_ID_BYTES: usize = 256;

/// Body of `PUT /v1/connections/{server}`: `access_token`, `refresh_token` or both.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutCredentials {
    /// Not blank; at most 16 KiB.
    #[schema(value_type = Option<String>, min_length = 1, max_length = 16384, pattern = "\\S")]
    pub access_token: Option<Secret>,
    /// Not blank; at most 16 KiB.
    #[schema(value_type = Option<String>, min_length = 1, max_length = 16384, pattern = "\\S")]
    pub refresh_token: Option<Secret>,
    /// RFC 3339.
    pub token_expiry: Option<DateTime<Utc>>,
    /// The OAuth client the tokens were issued to; must match the server's configured
    /// `oauth.client_id` when given (a refresh with another client's token would fail later).
    #[schema(min_length = 1, max_length = 256)]
    pub client_id: Option<String>,
}

/// The live state of a user's session as `/v1/connections` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ViewState {
    Starting,
    Ready,
    Restarting,
    Failed,
    /// No live session (never started, closed, or closing).
    Closed,
}

impl From<SessionState> for ViewState {
    fn from(state: SessionState) -> ViewState {
        match state {
            SessionState::Starting => ViewState::Starting,
            SessionState::Ready => ViewState::Ready,
            SessionState::Restarting => ViewState::Restarting,
            SessionState::Failed => ViewState::Failed,
            SessionState::Closing => ViewState::Closed,
        }
    }
}

/// One connection as the caller sees it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct CredentialView {
    pub server: ServerName,
    pub state: ViewState,
    pub tool_count: usize,
    pub last_used: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub restarts: u32,
    pub has_access_token: bool,
    pub has_refresh_token: bool,
    pub token_expiry: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl CredentialView {
    fn new(info: &CredentialInfo, live: Option<&SessionStats>) -> CredentialView {
        CredentialView {
            server: info.server_name.clone(),
            state: live.map_or(ViewState::Closed, |c| c.state.into()),
            tool_count: live.map_or(0, |c| c.tool_count),
            last_used: live.and_then(|c| c.last_used),
            started_at: live.and_then(|c| c.started_at),
            restarts: live.map_or(0, |c| c.restarts),
            has_access_token: info.has_access_token,
            has_refresh_token: info.has_refresh_token,
            token_expiry: info.token_expiry,
            created_at: info.created_at,
            updated_at: info.updated_at,
        }
    }
}

/// The caller's live sessions. A pool that does not answer only hides the live state.
async fn live_sessions(state: &HttpState, user: &UserId) -> Vec<SessionStats> {
    match state.pool.stats().await {
        Ok(stats) => stats
            .connections
            .into_iter()
            .filter(|c| &c.user_id == user)
            .collect(),
        Err(err) => {
            tracing::warn!(cause = %err, "pool stats unavailable; reporting sessions as closed");
            Vec::new()
        }
    }
}

fn view_all(infos: &[CredentialInfo], live: &[SessionStats]) -> Vec<CredentialView> {
    infos
        .iter()
        .map(|info| {
            let session = live.iter().find(|c| c.server == info.server_name);
            CredentialView::new(info, session)
        })
        .collect()
}

/// `PUT /v1/connections/{server}`: 201 when new, 200 when replaced (the live session is
/// closed so the next call starts with the new credentials).
#[utoipa::path(
    put, path = "/v1/connections/{server}", operation_id = "put_connection", tag = "connections",
    security(("bearer" = [])),
    params(("server" = ServerName, Path, description = "A configured server")),
    request_body = PutCredentials,
    responses(
        (status = 200, description = "Replaced (the live session was closed)", body = CredentialView),
        (status = 201, description = "Created", body = CredentialView),
        (status = 400, description = "Bad body (`malformed_json`, `invalid_body`, `field_too_long`, `client_mismatch`) or identity (`missing_user_id`, `invalid_user_id`, `duplicate_header`, `invalid_server_name`)", body = ErrorBody),
        UserAuthErrors,
        (status = 404, description = "`unknown_server`", body = ErrorBody),
        (status = 413, description = "Body larger than http.max_body_bytes", body = ErrorBody),
        (status = 415, description = "Not `Content-Type: application/json`", body = ErrorBody),
        (status = 503, description = "`credentials_unavailable` or `too_many_connections`", body = ErrorBody, headers(("Retry-After" = u64))),
    )
)]
pub async fn put(
    State(state): State<HttpState>,
    AuthUser(user): AuthUser,
    ServerParam(server): ServerParam,
    body: Result<Json<PutCredentials>, JsonRejection>,
) -> Result<(StatusCode, Json<CredentialView>), ApiError> {
    let Json(body) = body?;
    let non_empty = |field: &'static str, value: Option<Secret>| match value {
        Some(secret) if secret.expose().trim().is_empty() => Err(ApiError::bad_request(
            "invalid_body",
            format!("`{field}` must not be empty"),
        )),
        Some(secret) if secret.expose().len() > MAX_TOKEN_BYTES => Err(ApiError::bad_request(
            "field_too_long",
            format!("`{field}` is longer than {MAX_TOKEN_BYTES} bytes"),
        )),
        other => Ok(other),
    };
    if body
        .client_id
        .as_ref()
        .is_some_and(|id| id.is_empty() || id.len() > MAX_CLIENT_ID_BYTES)
    {
        return Err(ApiError::bad_request(
            "field_too_long",
            format!("`client_id` has 1 to {MAX_CLIENT_ID_BYTES} bytes"),
        ));
    }
    let tokens = Tokens {
        access_token: non_empty("access_token", body.access_token)?,
        refresh_token: non_empty("refresh_token", body.refresh_token)?,
        token_expiry: body.token_expiry,
    };
    if tokens.access_token.is_none() && tokens.refresh_token.is_none() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "give `access_token`, `refresh_token` or both",
        ));
    }
    if let Some(client_id) = &body.client_id {
        let configured = state
            .config
            .server(&server)
            .and_then(|s| s.oauth.as_ref())
            .map(|o| o.client_id.as_str());
        if configured.is_some_and(|c| c != client_id) {
            return Err(ApiError::bad_request(
                "client_mismatch",
                "`client_id` differs from the OAuth client configured for this server",
            ));
        }
    }
    let (info, stored) = state.credentials.create(&user, &server, tokens).await?;
    state
        .pool
        .credentials_stored(&user, &server, stored == Stored::Replaced)
        .await;
    let status = match stored {
        Stored::Created => StatusCode::CREATED,
        Stored::Replaced => StatusCode::OK,
    };
    Ok((status, Json(CredentialView::new(&info, None))))
}

/// Body of `GET /v1/connections`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct CredentialList {
    pub connections: Vec<CredentialView>,
    /// Servers whose authorization the provider revoked (a refresh got `invalid_grant`): their
    /// credentials were deactivated, and the user must connect them again.
    pub reconnect_required: Vec<ServerName>,
}

/// `GET /v1/connections`.
#[utoipa::path(
    get, path = "/v1/connections", operation_id = "list_connections", tag = "connections",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's active credentials with live session state", body = CredentialList),
        (status = 400, description = "`missing_user_id`, `invalid_user_id` or `duplicate_header`", body = ErrorBody),
        UserAuthErrors,
        (status = 503, description = "`too_many_connections`", body = ErrorBody, headers(("Retry-After" = u64))),
    )
)]
pub async fn list(
    State(state): State<HttpState>,
    AuthUser(user): AuthUser,
) -> Result<Json<CredentialList>, ApiError> {
    let rows = state.store.list(Some(&user), true).await?;
    let (active, inactive): (Vec<CredentialInfo>, Vec<CredentialInfo>) =
        rows.into_iter().partition(|info| info.is_active);
    // Rows come newest first per server: the first inactive row of a server without an
    // active one says whether it was revoked.
    let mut reconnect_required: Vec<ServerName> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for info in &inactive {
        let server = &info.server_name;
        if active.iter().all(|a| &a.server_name != server)
            && seen.insert(server.clone())
            && info.reconnect_required
        {
            reconnect_required.push(server.clone());
        }
    }
    let live = live_sessions(&state, &user).await;
    Ok(Json(CredentialList {
        connections: view_all(&active, &live),
        reconnect_required,
    }))
}

/// `GET /v1/connections/{server}`.
#[utoipa::path(
    get, path = "/v1/connections/{server}", operation_id = "get_connection", tag = "connections",
    security(("bearer" = [])),
    params(("server" = ServerName, Path, description = "A configured server")),
    responses(
        (status = 200, description = "The connection with live session state", body = CredentialView),
        (status = 400, description = "`missing_user_id`, `invalid_user_id`, `duplicate_header` or `invalid_server_name`", body = ErrorBody),
        UserAuthErrors,
        (status = 404, description = "`unknown_server` or `no_credentials`", body = ErrorBody),
        (status = 503, description = "`too_many_connections`", body = ErrorBody, headers(("Retry-After" = u64))),
    )
)]
pub async fn get(
    State(state): State<HttpState>,
    AuthUser(user): AuthUser,
    ServerParam(server): ServerParam,
) -> Result<Json<CredentialView>, ApiError> {
    let infos = state.store.list(Some(&user), false).await?;
    let info = infos
        .iter()
        .find(|i| i.server_name == server)
        .ok_or_else(|| no_credentials(&server))?;
    let live = live_sessions(&state, &user).await;
    let session = live.iter().find(|c| c.server == server);
    Ok(Json(CredentialView::new(info, session)))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Delete the row and the file instead of deactivating.
    #[serde(default)]
    #[param(required = false)]
    pub purge: bool,
}

/// Body of `DELETE /v1/connections/{server}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Removed {
    pub server: ServerName,
    pub deactivated: bool,
    pub purged: bool,
    /// Whether a live session was closed.
    pub session_closed: bool,
}

/// `DELETE /v1/connections/{server}[?purge=true]`: deactivate (or delete) and close.
#[utoipa::path(
    delete, path = "/v1/connections/{server}", operation_id = "delete_connection", tag = "connections",
    security(("bearer" = [])),
    params(("server" = ServerName, Path, description = "A configured server"), DeleteQuery),
    responses(
        (status = 200, description = "Deactivated (or purged) and the session closed", body = Removed),
        (status = 400, description = "`invalid_query`, `missing_user_id`, `invalid_user_id`, `duplicate_header` or `invalid_server_name`", body = ErrorBody),
        UserAuthErrors,
        (status = 404, description = "`unknown_server` or `no_credentials`", body = ErrorBody),
        (status = 503, description = "`credentials_unavailable` or `too_many_connections`", body = ErrorBody, headers(("Retry-After" = u64))),
    )
)]
pub async fn delete(
    State(state): State<HttpState>,
    AuthUser(user): AuthUser,
    ServerParam(server): ServerParam,
    query: Result<Query<DeleteQuery>, QueryRejection>,
) -> Result<Json<Removed>, ApiError> {
    let Query(query) = query?;
    // Credentials first, so a concurrent request cannot start a fresh session with them.
    let found = if query.purge {
        state.credentials.delete(&user, &server).await? > 0
    } else {
        state.credentials.deactivate(&user, &server).await?
    };
    let closed = state.pool.credentials_removed(&user, &server).await;
    if !found {
        return Err(no_credentials(&server));
    }
    Ok(Json(Removed {
        server,
        deactivated: !query.purge,
        purged: query.purge,
        session_closed: closed,
    }))
}

fn no_credentials(server: &ServerName) -> ApiError {
    ApiError::not_found(
        "no_credentials",
        format!("no credentials stored for server `{server}`"),
    )
}

// === warm-up ===

/// Body of `POST /v1/connections/warm`; an empty body warms every server the caller has
/// active credentials for.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmRequest {
    /// The servers to warm; each must be one the caller has active credentials for.
    #[schema(value_type = Vec<ServerName>)]
    pub servers: Vec<String>,
}

/// What warm-up started, and what it could not.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct WarmResponse {
    pub warming: Vec<WarmedView>,
    pub skipped: Vec<SkippedView>,
}

/// One server that warm-up started or found live.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct WarmedView {
    pub server: ServerName,
    /// `ready` (already live), `starting` (a start was under way) or `started` (begun now).
    pub state: Warmed,
}

/// One server that warm-up did not start, and why (the error code of a tool call).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct SkippedView {
    pub server: String,
    pub code: &'static str,
    pub message: String,
}

/// `POST /v1/connections/warm`: starts the caller's sessions in the background (a chat
/// backend calls it when the user opens the chat, so the first message finds them warm) and
/// answers 202 at once; nobody waits for a start.
#[utoipa::path(
    post, path = "/v1/connections/warm", operation_id = "warm_connections", tag = "connections",
    security(("bearer" = [])),
    request_body(content = Option<WarmRequest>, description = "Empty: every server with active credentials"),
    responses(
        (status = 202, description = "Starts begun in the background", body = WarmResponse),
        (status = 400, description = "`invalid_body`, `missing_user_id`, `invalid_user_id` or `duplicate_header`", body = ErrorBody),
        UserAuthErrors,
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 503, description = "`shutting_down`, `pool_unavailable`, `credentials_unavailable` or `too_many_connections`", body = ErrorBody, headers(("Retry-After" = u64))),
    )
)]
pub async fn warm(
    State(state): State<HttpState>,
    AuthUser(user): AuthUser,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<WarmResponse>), ApiError> {
    let named = optional_json::<WarmRequest>(&body?)?.map(|request| request.servers);
    let active: Vec<ServerName> = state
        .store
        .list(Some(&user), false)
        .await?
        .into_iter()
        .map(|info| info.server_name)
        .collect();
    let mut wanted = Vec::new();
    let mut skipped = Vec::new();
    match named {
        None => wanted = active,
        Some(names) => {
            for name in names {
                match ServerName::parse(&name) {
                    Ok(server) if wanted.contains(&server) => {}
                    Ok(server) if active.contains(&server) => wanted.push(server),
                    Ok(server) => {
                        let err = no_credentials(&server);
                        skipped.push(SkippedView {
                            server: name,
                            code: err.code(),
                            message: format!("no credentials stored for server `{server}`"),
                        });
                    }
                    Err(err) => {
                        return Err(ApiError::bad_request("invalid_body", err.to_string()));
                    }
                }
            }
        }
    }
    let outcomes = state.pool.warm(&user, &wanted).await?;
    let mut warming = Vec::new();
    for (server, outcome) in wanted.into_iter().zip(outcomes) {
        match outcome {
            Ok(warmed) => warming.push(WarmedView {
                server,
                state: warmed,
            }),
            Err(err) => skipped.push(SkippedView {
                server: server.to_string(),
                code: err.code(),
                message: err.to_string(),
            }),
        }
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(WarmResponse { warming, skipped }),
    ))
}
