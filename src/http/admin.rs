//! Admin routes (the admin key in either auth mode): pool stats, closing a user's sessions,
//! credential cleanup.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;

use super::error::ApiError;
use super::openapi::{AdminAuthErrors, ErrorBody};
use super::{AdminAuth, HttpState, path_param};
use crate::actors::PoolStats;
use crate::config::MIN_CLEANUP_AGE;
use crate::store::UserId;

/// `GET /v1/stats`: the pool stats, every user included.
#[utoipa::path(
    get, path = "/v1/stats", operation_id = "pool_stats", tag = "admin",
    security(("admin" = [])),
    responses(
        (status = 200, description = "Pool statistics", body = PoolStats),
        AdminAuthErrors,
        (status = 503, description = "`pool_unavailable` or `too_many_connections`", body = ErrorBody, headers(("Retry-After" = u64))),
    )
)]
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

/// Body of `DELETE /v1/admin/users/{user}/connections`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct UserClosed {
    pub user_id: UserId,
    /// Live sessions closed.
    pub closed: usize,
}

/// `DELETE /v1/admin/users/{user}/connections`: closes the user's live sessions (their
/// credentials stay).
#[utoipa::path(
    delete, path = "/v1/admin/users/{user}/connections", operation_id = "close_user_sessions", tag = "admin",
    security(("admin" = [])),
    params(("user" = UserId, Path, description = "The user whose sessions to close")),
    responses(
        (status = 200, description = "Closed", body = UserClosed),
        (status = 400, description = "`invalid_user_id`", body = ErrorBody),
        AdminAuthErrors,
        (status = 503, description = "`pool_unavailable` or `too_many_connections`", body = ErrorBody, headers(("Retry-After" = u64))),
    )
)]
pub async fn close_user(
    State(state): State<HttpState>,
    _admin: AdminAuth,
    UserParam(user): UserParam,
) -> Result<Json<UserClosed>, ApiError> {
    let closed = state.pool.close_user_sessions(&user).await?;
    tracing::info!(closed, "Admin closed a user's sessions");
    Ok(Json(UserClosed {
        user_id: user,
        closed,
    }))
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CleanupRequest {
    /// Humantime of at least 1h, e.g. `30d`; defaults to `credentials.cleanup_inactive_after`.
    #[schema(examples("30d", "12h"))]
    pub inactive_for: Option<String>,
}

/// Body of a successful cleanup.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct CleanupDone {
    /// Rows deleted.
    pub deleted: usize,
    /// The threshold used, as humantime.
    pub inactive_for: String,
}

/// `POST /v1/admin/credentials/cleanup`: hard-deletes credentials inactive for longer than
/// `inactive_for`.
#[utoipa::path(
    post, path = "/v1/admin/credentials/cleanup", operation_id = "cleanup_credentials", tag = "admin",
    security(("admin" = [])),
    request_body = CleanupRequest,
    responses(
        (status = 200, description = "Deleted", body = CleanupDone),
        (status = 400, description = "`malformed_json`, `invalid_body` or `invalid_duration` (not humantime, or under 1h)", body = ErrorBody),
        AdminAuthErrors,
        (status = 413, description = "Body larger than http.max_body_bytes", body = ErrorBody),
        (status = 415, description = "Not `Content-Type: application/json`", body = ErrorBody),
        (status = 503, description = "`credentials_unavailable` or `too_many_connections`", body = ErrorBody, headers(("Retry-After" = u64))),
    )
)]
pub async fn cleanup(
    State(state): State<HttpState>,
    _admin: AdminAuth,
    body: Result<Json<CleanupRequest>, JsonRejection>,
) -> Result<Json<CleanupDone>, ApiError> {
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
    // Shorter would delete credentials deactivated moments ago: almost certainly a mistake.
    if inactive_for < MIN_CLEANUP_AGE {
        return Err(ApiError::bad_request(
            "invalid_duration",
            "`inactive_for` must be at least 1h",
        ));
    }
    let deleted = state.credentials.cleanup_inactive(inactive_for).await?;
    tracing::info!(deleted, ?inactive_for, "Admin ran the credential cleanup");
    Ok(Json(CleanupDone {
        deleted,
        inactive_for: humantime::format_duration(inactive_for).to_string(),
    }))
}
