//! Admin routes (the admin key in either auth mode): pool stats, closing a user's sessions,
//! credential cleanup.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;

use super::error::ApiError;
use super::{AdminAuth, HttpState, path_param};
use crate::actors::PoolStats;
use crate::store::UserId;

/// `GET /v1/stats`: the pool stats, every user included.
pub async fn stats(
    State(state): State<HttpState>,
    _admin: AdminAuth,
) -> Result<Json<PoolStats>, ApiError> {
    Ok(Json(state.pool.stats().await?))
}

/// The `{user}` path parameter of admin routes.
#[derive(Debug, Clone)]
pub struct UserParam(pub UserId);

impl FromRequestParts<HttpState> for UserParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ApiError> {
        let raw = path_param(parts, state, "user").await?;
        let user = UserId::parse(&raw).map_err(ApiError::invalid_id)?;
        tracing::Span::current().record("user_id", user.as_str());
        Ok(UserParam(user))
    }
}

/// `DELETE /v1/admin/users/{user}/connections`: closes the user's live sessions (their
/// credentials stay).
pub async fn close_user(
    State(state): State<HttpState>,
    _admin: AdminAuth,
    UserParam(user): UserParam,
) -> Result<Json<serde_json::Value>, ApiError> {
    let closed = state.pool.close_user_connections(&user).await?;
    tracing::info!(closed, "Admin closed a user's sessions");
    Ok(Json(
        serde_json::json!({ "user_id": user, "closed": closed }),
    ))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanupRequest {
    /// Humantime, e.g. `30d`; defaults to `credentials.cleanup_inactive_after`.
    pub inactive_for: Option<String>,
}

/// `POST /v1/admin/credentials/cleanup`: hard-deletes credentials inactive for longer than
/// `inactive_for`.
pub async fn cleanup(
    State(state): State<HttpState>,
    _admin: AdminAuth,
    body: Result<Json<CleanupRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(body) = body?;
    let inactive_for = match &body.inactive_for {
        Some(text) => humantime::parse_duration(text).map_err(|err| {
            ApiError::bad_request(
                "invalid_duration",
                format!("`inactive_for`: {err} (examples: 30d, 12h)"),
            )
        })?,
        None => state.config.credentials.cleanup_inactive_after,
    };
    // Zero would delete every inactive row at once: almost certainly a mistake.
    if inactive_for.is_zero() {
        return Err(ApiError::bad_request(
            "invalid_duration",
            "`inactive_for` must be longer than zero",
        ));
    }
    let deleted = state.credentials.cleanup_inactive(inactive_for).await?;
    tracing::info!(deleted, ?inactive_for, "Admin ran the credential cleanup");
    Ok(Json(serde_json::json!({
        "deleted": deleted,
        "inactive_for": humantime::format_duration(inactive_for).to_string(),
    })))
}
