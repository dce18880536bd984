//! `/internal/v1/...`: the routes other nodes of the cluster forward requests to.
//!
//! Authenticated by the cluster secret alone ([`INTERNAL_SECRET_HEADER`], compared in constant
//! time): no user's key or token opens them, and the public routes never accept the secret.
//! The user is the one the forwarding node already verified, carried in the body. Every
//! request is served on this node ([`PoolHandle::serving_forwarded`]), never forwarded again.
//! Without cluster mode they answer 404 like any unknown route. Not in `/openapi.json`: they
//! are no API of the service, and a load balancer in front should not expose them (see
//! `deploy/`).
//!
//! [`PoolHandle::serving_forwarded`]: crate::actors::PoolHandle::serving_forwarded

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::StreamExt as _;

use super::HttpState;
use super::error::ApiError;
use crate::actors::{PoolError, PoolHandle};
use crate::cluster::INTERNAL_SECRET_HEADER;
use crate::ids::{ServerName, UserId};

/// The internal routes, behind [`PeerGate`].
pub fn routes(state: &HttpState) -> Router<HttpState> {
    use crate::actors::pool::internal_paths as paths;
    Router::new()
        .route(paths::LIST_TOOLS, post(list_tools))
        .route(paths::CALL_TOOL, post(call_tool))
        .route(paths::LIST_PROMPTS, post(list_prompts))
        .route(paths::GET_PROMPT, post(get_prompt))
        .route(paths::LIST_RESOURCES, post(list_resources))
        .route(
            paths::LIST_RESOURCE_TEMPLATES,
            post(list_resource_templates),
        )
        .route(paths::READ_RESOURCE, post(read_resource))
        .route(paths::CLOSE_SESSION, post(close_session))
        .route(paths::CLOSE_USER, post(close_user))
        .route(paths::STATS, get(stats))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), gate))
}

/// Other nodes' requests in progress here, and whether new ones are still taken. Closed when
/// the listener closes: from then on a peer's request is refused before any work
/// (`503 shutting_down`, which the sending node retries elsewhere), and the drain waits for
/// those in progress, so none runs on a session the pool is closing.
pub struct PeerGate {
    closed: AtomicBool,
    in_flight: Arc<Semaphore>,
}

/// More than the requests one node can have in progress.
const PEER_REQUESTS: u32 = 1 << 20;

impl Default for PeerGate {
    fn default() -> PeerGate {
        PeerGate {
            closed: AtomicBool::new(false),
            in_flight: Arc::new(Semaphore::new(PEER_REQUESTS as usize)),
        }
    }
}

impl PeerGate {
    fn enter(&self) -> Option<OwnedSemaphorePermit> {
        if self.closed.load(Ordering::SeqCst) {
            return None;
        }
        self.in_flight.clone().try_acquire_owned().ok()
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Once every request that entered before [`PeerGate::close`] has ended.
    pub async fn drained(&self) {
        let _all = self.in_flight.acquire_many(PEER_REQUESTS).await;
    }
}

async fn gate(State(state): State<HttpState>, request: Request, next: Next) -> Response {
    let Some(permit) = state.peer_gate.enter() else {
        return ApiError::from(PoolError::ShuttingDown).into_response();
    };
    let response = next.run(request).await;
    // Held until the body ends: a streamed call runs for as long as its events.
    response.map(|body| {
        Body::from_stream(body.into_data_stream().map(move |chunk| {
            let _in_flight = &permit;
            chunk
        }))
    })
}

/// A request from another node of the cluster; holds the pool handle that serves it here.
pub struct FromPeer(pub PoolHandle);

impl FromRequestParts<HttpState> for FromPeer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ApiError> {
        let Some(cluster) = state.pool.cluster() else {
            return Err(ApiError::not_found("not_found", "no such route"));
        };
        let mut presented = parts.headers.get_all(INTERNAL_SECRET_HEADER).iter();
        let secret = match (presented.next(), presented.next()) {
            (Some(value), None) => value.to_str().unwrap_or_default(),
            _ => "",
        };
        if secret.is_empty() || !cluster.secret_matches(secret) {
            return Err(ApiError::unauthorized(
                "internal routes take the cluster secret",
            ));
        }
        if let Some(connection) = parts.extensions.get::<super::ConnectionRole>() {
            connection.mark_peer();
        }
        Ok(FromPeer(state.pool.serving_forwarded()))
    }
}

#[derive(serde::Deserialize)]
pub struct KeyBody {
    user_id: String,
    server: String,
}

#[derive(serde::Deserialize)]
pub struct CallBody {
    user_id: String,
    server: String,
    tool: String,
    arguments: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(serde::Deserialize)]
pub struct PromptBody {
    user_id: String,
    server: String,
    name: String,
    arguments: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(serde::Deserialize)]
pub struct ReadBody {
    user_id: String,
    server: String,
    uri: String,
}

#[derive(serde::Deserialize)]
pub struct UserBody {
    user_id: String,
}

fn key_of(user: &str, server: &str) -> Result<(UserId, ServerName), ApiError> {
    let user = UserId::parse(user).map_err(ApiError::invalid_id)?;
    let server = ServerName::parse(server).map_err(ApiError::invalid_id)?;
    let span = tracing::Span::current();
    span.record("user_id", user.as_str());
    span.record("server", server.as_str());
    Ok((user, server))
}

fn body<T>(body: Result<Json<T>, axum::extract::rejection::JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(body)| body)
        .map_err(|rejection| ApiError::bad_request("invalid_body", rejection.body_text()))
}

/// `POST /internal/v1/tools/list`: `{"tools": [...]}` as rmcp serializes them.
pub async fn list_tools(
    FromPeer(pool): FromPeer,
    request: Result<Json<KeyBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request = body(request)?;
    let (user, server) = key_of(&request.user_id, &request.server)?;
    let tools = pool.list_tools(&user, &server).await?;
    Ok(Json(serde_json::json!({ "tools": &*tools })))
}

/// `POST /internal/v1/tools/call`: the `CallToolResult` as rmcp serializes it. With
/// `Accept: text/event-stream` (the forwarding node has a caller that wants progress), events
/// as REST streams them: `progress`, then `result` (that `CallToolResult`) or `error`.
pub async fn call_tool(
    State(state): State<HttpState>,
    FromPeer(pool): FromPeer,
    headers: axum::http::HeaderMap,
    request: Result<Json<CallBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let request = body(request)?;
    let (user, server) = key_of(&request.user_id, &request.server)?;
    if super::tools::wants_event_stream(&headers) {
        return Ok(super::tools::progress_events(
            state,
            move |options| async move {
                let result = pool
                    .call_tool_with(&user, &server, &request.tool, request.arguments, options)
                    .await?;
                serde_json::to_value(result).map_err(|err| ApiError::internal(&err))
            },
        ));
    }
    let result = pool
        .call_tool(&user, &server, &request.tool, request.arguments)
        .await?;
    Ok(Json(result).into_response())
}

/// `POST /internal/v1/prompts/list`: `{"prompts": [...]}`.
pub async fn list_prompts(
    FromPeer(pool): FromPeer,
    request: Result<Json<KeyBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request = body(request)?;
    let (user, server) = key_of(&request.user_id, &request.server)?;
    let prompts = pool.list_prompts(&user, &server).await?;
    Ok(Json(serde_json::json!({ "prompts": &*prompts })))
}

/// `POST /internal/v1/prompts/get`: the `GetPromptResult` as rmcp serializes it.
pub async fn get_prompt(
    FromPeer(pool): FromPeer,
    request: Result<Json<PromptBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<rmcp::model::GetPromptResult>, ApiError> {
    let request = body(request)?;
    let (user, server) = key_of(&request.user_id, &request.server)?;
    let result = pool
        .get_prompt(&user, &server, &request.name, request.arguments)
        .await?;
    Ok(Json(result))
}

/// `POST /internal/v1/resources/list`: `{"resources": [...]}`.
pub async fn list_resources(
    FromPeer(pool): FromPeer,
    request: Result<Json<KeyBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request = body(request)?;
    let (user, server) = key_of(&request.user_id, &request.server)?;
    let resources = pool.list_resources(&user, &server).await?;
    Ok(Json(serde_json::json!({ "resources": &*resources })))
}

/// `POST /internal/v1/resources/templates/list`: `{"resource_templates": [...]}`.
pub async fn list_resource_templates(
    FromPeer(pool): FromPeer,
    request: Result<Json<KeyBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request = body(request)?;
    let (user, server) = key_of(&request.user_id, &request.server)?;
    let templates = pool.list_resource_templates(&user, &server).await?;
    Ok(Json(
        serde_json::json!({ "resource_templates": &*templates }),
    ))
}

/// `POST /internal/v1/resources/read`: the `ReadResourceResult` as rmcp serializes it.
pub async fn read_resource(
    FromPeer(pool): FromPeer,
    request: Result<Json<ReadBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<rmcp::model::ReadResourceResult>, ApiError> {
    let request = body(request)?;
    let (user, server) = key_of(&request.user_id, &request.server)?;
    let result = pool.read_resource(&user, &server, &request.uri).await?;
    Ok(Json(result))
}

/// `POST /internal/v1/sessions/close`: `{"closed": bool}`.
pub async fn close_session(
    FromPeer(pool): FromPeer,
    request: Result<Json<KeyBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request = body(request)?;
    let (user, server) = key_of(&request.user_id, &request.server)?;
    let closed = pool.close_session(&user, &server).await?;
    Ok(Json(serde_json::json!({ "closed": closed })))
}

/// `POST /internal/v1/users/close`: `{"closed": n}`.
pub async fn close_user(
    FromPeer(pool): FromPeer,
    request: Result<Json<UserBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request = body(request)?;
    let user = UserId::parse(&request.user_id).map_err(ApiError::invalid_id)?;
    let closed = pool.close_user_sessions(&user).await?;
    Ok(Json(serde_json::json!({ "closed": closed })))
}

/// `GET /internal/v1/stats`: this node's stats, for `/v1/stats?scope=cluster` on any node.
pub async fn stats(FromPeer(pool): FromPeer) -> Result<Json<serde_json::Value>, ApiError> {
    let stats = pool.stats_with_usage().await?;
    let mut value = serde_json::to_value(&stats).map_err(|err| ApiError::internal(&err))?;
    if let (Some(cluster), Some(object)) = (pool.cluster(), value.as_object_mut()) {
        let (forwarded_out, served_for_peers) = cluster.forwarding_counts();
        object.insert(
            "cluster".into(),
            serde_json::json!({ "forwarded_out": forwarded_out, "served_for_peers": served_for_peers }),
        );
    }
    Ok(Json(value))
}
