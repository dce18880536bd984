//! `/v1/connections`: the caller's credentials per server, with the live session state.
//! Responses never hold a token, a credentials path or another user's data.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};

use super::error::ApiError;
use super::metrics::state_name;
use super::{AuthUser, HttpState, ServerParam};
use crate::actors::{ConnectionStats, Warmed};
use crate::store::{ConnectionInfo, Secret, ServerName, Stored, Tokens, UserId};

/// Body of `PUT /v1/connections/{server}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutConnection {
    pub access_token: Option<Secret>,
    pub refresh_token: Option<Secret>,
    /// RFC 3339.
    pub token_expiry: Option<DateTime<Utc>>,
    /// The OAuth client the tokens were issued to; must match the server's configured
    /// `oauth.client_id` when given (a refresh with another client's token would fail later).
    pub client_id: Option<String>,
}

/// One connection as the caller sees it.
#[derive(Debug, serde::Serialize)]
pub struct ConnectionView {
    pub server: ServerName,
    /// `starting`, `ready`, `restarting`, `failed` or `closed` (no live session).
    pub state: &'static str,
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

impl ConnectionView {
    fn new(info: &ConnectionInfo, live: Option<&ConnectionStats>) -> ConnectionView {
        ConnectionView {
            server: info.server_name.clone(),
            state: live.map_or("closed", |c| state_name(c.state)),
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
async fn live_sessions(state: &HttpState, user: &UserId) -> Vec<ConnectionStats> {
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

fn view_all(infos: &[ConnectionInfo], live: &[ConnectionStats]) -> Vec<ConnectionView> {
    infos
        .iter()
        .map(|info| {
            let session = live.iter().find(|c| c.server == info.server_name);
            ConnectionView::new(info, session)
        })
        .collect()
}

/// `PUT /v1/connections/{server}`: 201 when new, 200 when replaced (the live session is
/// closed so the next call starts with the new credentials).
pub async fn put(
    State(state): State<HttpState>,
    AuthUser(user): AuthUser,
    ServerParam(server): ServerParam,
    body: Result<Json<PutConnection>, JsonRejection>,
) -> Result<(StatusCode, Json<ConnectionView>), ApiError> {
    let Json(body) = body?;
    let non_empty = |field: &'static str, value: Option<Secret>| match value {
        Some(secret) if secret.expose().trim().is_empty() => Err(ApiError::bad_request(
            "invalid_body",
            format!("`{field}` must not be empty"),
        )),
        other => Ok(other),
    };
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
    if stored == Stored::Replaced {
        // The running server read the old credentials at start: restart it lazily.
        if let Err(err) = state.pool.close_connection(&user, &server).await {
            tracing::warn!(cause = %err, "could not close the session after a replacement");
        }
    }
    let status = match stored {
        Stored::Created => StatusCode::CREATED,
        Stored::Replaced => StatusCode::OK,
    };
    Ok((status, Json(ConnectionView::new(&info, None))))
}

/// `GET /v1/connections`.
pub async fn list(
    State(state): State<HttpState>,
    AuthUser(user): AuthUser,
) -> Result<Json<serde_json::Value>, ApiError> {
    let infos = state.store.list(Some(&user), false).await?;
    let live = live_sessions(&state, &user).await;
    Ok(Json(
        serde_json::json!({ "connections": view_all(&infos, &live) }),
    ))
}

/// `GET /v1/connections/{server}`.
pub async fn get(
    State(state): State<HttpState>,
    AuthUser(user): AuthUser,
    ServerParam(server): ServerParam,
) -> Result<Json<ConnectionView>, ApiError> {
    let infos = state.store.list(Some(&user), false).await?;
    let info = infos
        .iter()
        .find(|i| i.server_name == server)
        .ok_or_else(|| no_credentials(&server))?;
    let live = live_sessions(&state, &user).await;
    let session = live.iter().find(|c| c.server == server);
    Ok(Json(ConnectionView::new(info, session)))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Delete the row and the file instead of deactivating.
    #[serde(default)]
    pub purge: bool,
}

/// `DELETE /v1/connections/{server}[?purge=true]`: deactivate (or delete) and close.
pub async fn delete(
    State(state): State<HttpState>,
    AuthUser(user): AuthUser,
    ServerParam(server): ServerParam,
    query: Result<Query<DeleteQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query?;
    // Credentials first, so a concurrent request cannot start a fresh session with them.
    let found = if query.purge {
        state.credentials.delete(&user, &server).await? > 0
    } else {
        state.credentials.deactivate(&user, &server).await?
    };
    let closed = state
        .pool
        .close_connection(&user, &server)
        .await
        .unwrap_or_else(|err| {
            tracing::warn!(cause = %err, "could not close the session");
            false
        });
    if !found {
        return Err(no_credentials(&server));
    }
    Ok(Json(serde_json::json!({
        "server": server,
        "deactivated": !query.purge,
        "purged": query.purge,
        "session_closed": closed,
    })))
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
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmRequest {
    /// The servers to warm; each must be one the caller has active credentials for.
    pub servers: Vec<String>,
}

/// One server that warm-up started or found live.
#[derive(Debug, serde::Serialize)]
pub struct WarmedView {
    pub server: ServerName,
    /// `ready` (already live), `starting` (a start was under way) or `started` (begun now).
    pub state: Warmed,
}

/// One server that warm-up did not start, and why (the error code of a tool call).
#[derive(Debug, serde::Serialize)]
pub struct SkippedView {
    pub server: String,
    pub code: &'static str,
    pub message: String,
}

/// `POST /v1/connections/warm`: starts the caller's sessions in the background (a chat
/// backend calls it when the user opens the chat, so the first message finds them warm) and
/// answers 202 at once; nobody waits for a start.
pub async fn warm(
    State(state): State<HttpState>,
    AuthUser(user): AuthUser,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            super::error::payload_too_large()
        } else {
            ApiError::bad_request("invalid_body", rejection.body_text())
        }
    })?;
    let named = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let request: WarmRequest = serde_json::from_slice(&body)
            .map_err(|err| ApiError::bad_request("invalid_body", err.to_string()))?;
        Some(request.servers)
    };
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
        Json(serde_json::json!({ "warming": warming, "skipped": skipped })),
    ))
}
