//! Admin routes (the admin key in either auth mode): pool stats, the live event feed, closing
//! sessions, credential cleanup; and the status page that uses them.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use tokio_stream::StreamExt as _;

use super::error::ApiError;
use super::openapi::{AdminAuthErrors, ErrorBody};
use super::{AdminAuth, HttpState, ServerParam, path_param};
use crate::actors::PoolStats;
use crate::config::MIN_CLEANUP_AGE;
use crate::store::UserId;

/// Query of `GET /v1/stats`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatsQuery {
    /// `node` (default): this node's pool. `cluster` (cluster mode only): every live node's
    /// stats under `nodes`, and their sums.
    pub scope: Option<StatsScope>,
}

/// What `GET /v1/stats` covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StatsScope {
    Node,
    Cluster,
}

/// `GET /v1/stats`: the pool stats, every user included; `?scope=cluster` adds up every live
/// node of the cluster.
#[utoipa::path(
    get, path = "/v1/stats", operation_id = "pool_stats", tag = "admin",
    security(("admin" = [])),
    params(StatsQuery),
    responses(
        (status = 200, description = "Pool statistics (with `scope=cluster`: `scope`, `nodes`, and the sums of `total_connections`, `active_connections` and `user_breakdown`)", body = PoolStats),
        (status = 400, description = "`invalid_scope` (not `node` or `cluster`)", body = ErrorBody),
        (status = 409, description = "`not_clustered`: `scope=cluster` on a node without cluster mode", body = ErrorBody),
        AdminAuthErrors,
        (status = 503, description = "`pool_unavailable` or `too_many_connections`", body = ErrorBody, headers(("Retry-After" = u64))),
    )
)]
pub async fn stats(
    State(state): State<HttpState>,
    _admin: AdminAuth,
    query: Result<axum::extract::Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let scope = query
        .map_err(|rejection| ApiError::bad_request("invalid_scope", rejection.body_text()))?
        .0
        .scope;
    let stats = state.pool.stats_with_usage().await?;
    match (scope, state.pool.cluster()) {
        (None | Some(StatsScope::Node), _) => serde_json::to_value(&stats)
            .map(Json)
            .map_err(|e| ApiError::internal(&e)),
        (Some(StatsScope::Cluster), Some(cluster)) => Ok(Json(cluster_stats(cluster, stats).await)),
        (Some(StatsScope::Cluster), None) => Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "not_clustered",
            "scope=cluster needs cluster mode ([cluster] enabled = true)",
        )),
    }
}

/// Every live node's stats (this one's directly, the others' over the internal route) and
/// their sums. A node that does not answer is listed with its error, and counts nothing.
async fn cluster_stats(
    cluster: &std::sync::Arc<crate::cluster::Cluster>,
    own: PoolStats,
) -> serde_json::Value {
    use serde_json::{Value, json};
    let (forwarded_out, served_for_peers) = cluster.forwarding_counts();
    let mut nodes = vec![
        json!({ "node_id": cluster.node().id, "url": cluster.node().url,
        "forwarded_out": forwarded_out, "served_for_peers": served_for_peers, "stats": own }),
    ];
    for node in cluster.live_nodes() {
        if node.id == cluster.node().id {
            continue;
        }
        let fetched = cluster
            .fetch(&node, crate::actors::pool::internal_paths::STATS)
            .await;
        nodes.push(match fetched {
            Ok(stats) => json!({ "node_id": node.id, "url": node.url,
                "forwarded_out": stats["cluster"]["forwarded_out"],
                "served_for_peers": stats["cluster"]["served_for_peers"], "stats": stats }),
            Err(err) => json!({ "node_id": node.id, "url": node.url,
                "error": format!("{err:?}") }),
        });
    }
    let (mut total, mut active) = (0u64, 0u64);
    let mut users: std::collections::BTreeMap<String, u64> = Default::default();
    for node in &nodes {
        let stats = &node["stats"];
        total += stats["total_connections"].as_u64().unwrap_or(0);
        active += stats["active_connections"].as_u64().unwrap_or(0);
        if let Some(Value::Object(breakdown)) = stats.get("user_breakdown") {
            for (user, count) in breakdown {
                *users.entry(user.clone()).or_default() += count.as_u64().unwrap_or(0);
            }
        }
    }
    let sum = |field: &str| nodes.iter().filter_map(|n| n[field].as_u64()).sum::<u64>();
    let (forwarded_out, served_for_peers) = (sum("forwarded_out"), sum("served_for_peers"));
    json!({
        "scope": "cluster",
        "forwarded_out": forwarded_out,
        "served_for_peers": served_for_peers,
        "node_count": nodes.len(),
        "total_connections": total,
        "active_connections": active,
        "user_breakdown": users,
        "nodes": nodes,
    })
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

/// Body of `DELETE /v1/admin/users/{user}/connections/{server}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct SessionClosed {
    pub user_id: UserId,
    pub server: crate::store::ServerName,
    /// Whether a live session was closed.
    pub closed: bool,
}

/// `DELETE /v1/admin/users/{user}/connections/{server}`: closes one session (the credentials
/// stay; the next use starts a new one).
#[utoipa::path(
    delete, path = "/v1/admin/users/{user}/connections/{server}", operation_id = "close_session", tag = "admin",
    security(("admin" = [])),
    params(
        ("user" = UserId, Path, description = "The session's user"),
        ("server" = crate::store::ServerName, Path, description = "A configured server"),
    ),
    responses(
        (status = 200, description = "Closed (or there was no live session)", body = SessionClosed),
        (status = 400, description = "`invalid_user_id` or `invalid_server_name`", body = ErrorBody),
        AdminAuthErrors,
        (status = 404, description = "`unknown_server`", body = ErrorBody),
        (status = 503, description = "`pool_unavailable` or `too_many_connections`", body = ErrorBody, headers(("Retry-After" = u64))),
    )
)]
pub async fn close_session(
    State(state): State<HttpState>,
    _admin: AdminAuth,
    UserParam(user): UserParam,
    ServerParam(server): ServerParam,
) -> Result<Json<SessionClosed>, ApiError> {
    let closed = state.pool.close_session(&user, &server).await?;
    tracing::info!(closed, "Admin closed a session");
    Ok(Json(SessionClosed {
        user_id: user,
        server,
        closed,
    }))
}

/// `GET /v1/admin/events`: the pool's events as Server-Sent Events (`event: pool`, the event as
/// JSON): first the recent ones, then each as it happens. A listener that falls too far behind
/// gets `event: lagged` with how many it missed. Ends when the service shuts down.
#[utoipa::path(
    get, path = "/v1/admin/events", operation_id = "pool_events", tag = "admin",
    security(("admin" = [])),
    responses(
        (status = 200, description = "An endless text/event-stream of `pool` events (each a PoolEvent)", content_type = "text/event-stream", body = String),
        AdminAuthErrors,
        (status = 503, description = "`too_many_connections`", body = ErrorBody, headers(("Retry-After" = u64))),
    )
)]
pub async fn events(State(state): State<HttpState>, _admin: AdminAuth) -> axum::response::Response {
    use axum::response::IntoResponse;
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;

    // Subscribed before the history is read, so nothing falls between the two.
    let mut live = state.pool.subscribe_events();
    let recent = state.pool.recent_events();
    let shutdown = state.shutdown_token();
    let (sender, receiver) = tokio::sync::mpsc::channel::<Event>(64);
    let pool_event = |event: &crate::actors::PoolEvent| {
        Event::default()
            .event("pool")
            .data(serde_json::to_string(event).unwrap_or_default())
    };
    tokio::spawn(async move {
        for event in &recent {
            if sender.send(pool_event(event)).await.is_err() {
                return;
            }
        }
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                () = sender.closed() => return,
                next = live.recv() => next,
            };
            let event = match next {
                Ok(event) => pool_event(&event),
                Err(RecvError::Lagged(missed)) => {
                    Event::default().event("lagged").data(missed.to_string())
                }
                Err(RecvError::Closed) => return,
            };
            if sender.send(event).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(receiver)
        .map(Ok::<Event, std::convert::Infallible>);
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

// === the status page ===

const PAGE_HTML: &str = include_str!("admin_page/index.html");
const PAGE_JS: &str = include_str!("admin_page/app.js");
const PAGE_CSS: &str = include_str!("admin_page/app.css");

/// The page, its script and its style: static, embedded in the binary, no data in them (the
/// script fetches everything with the admin key the operator types in). Strict CSP: nothing
/// but this origin's own script and style, no inline code.
fn static_asset(content_type: &'static str, body: &'static str) -> axum::response::Response {
    use axum::http::header;
    use axum::response::IntoResponse;
    (
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                 img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /admin`: the status page.
#[utoipa::path(
    get, path = "/admin", operation_id = "status_page", tag = "admin", security(()),
    responses((status = 200, description = "The operator's status page (HTML; asks for the admin key)", content_type = "text/html", body = String)),
)]
pub async fn page() -> axum::response::Response {
    static_asset("text/html; charset=utf-8", PAGE_HTML)
}

/// `GET /admin/app.js`.
#[utoipa::path(
    get, path = "/admin/app.js", operation_id = "status_page_script", tag = "admin", security(()),
    responses((status = 200, description = "The status page's script", content_type = "text/javascript", body = String)),
)]
pub async fn page_script() -> axum::response::Response {
    static_asset("text/javascript; charset=utf-8", PAGE_JS)
}

/// `GET /admin/app.css`.
#[utoipa::path(
    get, path = "/admin/app.css", operation_id = "status_page_style", tag = "admin", security(()),
    responses((status = 200, description = "The status page's style", content_type = "text/css", body = String)),
)]
pub async fn page_style() -> axum::response::Response {
    static_asset("text/css; charset=utf-8", PAGE_CSS)
}
