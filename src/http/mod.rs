//! The HTTP facade: an axum router a chat backend calls. The acting user always comes from
//! authentication ([`auth`]), never from a body, and a user reaches only their own connections.
//!
//! - [`connections`]: store, list, inspect and remove the caller's credentials per server.
//! - [`tools`]: list a server's tools and call one.
//! - [`oauth`]: the OAuth connect flow (`start`, and the unauthenticated `callback`).
//! - [`admin`]: pool stats, closing a user's sessions, credential cleanup (admin key).
//! - [`health`], [`metrics`], [`openapi`]: probes, Prometheus text, the API description.
//! - [`auth`]: API-key and JWT authentication, the [`AuthUser`] and [`AdminAuth`] extractors.
//! - [`error`]: [`ApiError`], every failure as a status plus `{ "error": { "code", "message" } }`.
//!
//! Layers, outermost first: a tracing span per request (`method`, `route`, and `user_id`/`server`
//! once known), error counting, panic catching (a panic becomes a generic 500), the request
//! timeout, and the body-size limit.

pub mod admin;
pub mod auth;
pub mod chat;
pub mod connections;
pub mod error;
pub mod health;
pub mod metrics;
pub mod oauth;
pub mod openapi;
pub mod tools;

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};

pub use auth::{AdminAuth, Auth, AuthSetupError, AuthUser};
pub use error::ApiError;
pub use metrics::Metrics;

use crate::actors::{CredentialHandle, PoolHandle};
use crate::config::Config;
use crate::llm::LlmClient;
use crate::store::{ServerName, Store};

/// Everything a request handler needs. Cheap to clone (handles and `Arc`s).
#[derive(Clone)]
pub struct HttpState {
    /// The connection pool.
    pub pool: PoolHandle,
    /// The single writer of credentials.
    pub credentials: CredentialHandle,
    /// Read access to `mcp_connections`.
    pub store: Store,
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Caller verification.
    pub auth: Arc<Auth>,
    /// Counters and histograms behind `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The model behind `/v1/chat`; `None` if its client could not be built.
    pub llm: Option<Arc<LlmClient>>,
    /// Set when shutdown begins: `/readyz` answers 503 from then on.
    shutting_down: Arc<AtomicBool>,
}

impl HttpState {
    pub fn new(
        pool: PoolHandle,
        credentials: CredentialHandle,
        store: Store,
        config: Arc<Config>,
        auth: Auth,
    ) -> HttpState {
        let llm = match LlmClient::from_config(&config.llm) {
            Ok(client) => Some(Arc::new(client)),
            Err(err) => {
                tracing::warn!(cause = %err, "/v1/chat is disabled: no LLM client");
                None
            }
        };
        HttpState {
            pool,
            credentials,
            store,
            config,
            llm,
            auth: Arc::new(auth),
            metrics: Arc::new(Metrics::new()),
            shutting_down: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Marks the service as shutting down (readiness fails from now on).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// The whole API. Tests drive it on a real port; `serve` runs it.
pub fn router(state: HttpState) -> Router {
    let http = &state.config.http;
    let (timeout, body_limit) = (http.request_timeout, http.max_body_bytes);
    let api = Router::new()
        .route("/v1/connections", get(connections::list))
        // Static segments win over `{server}`: config validation reserves the server name `warm`.
        .route("/v1/connections/warm", post(connections::warm))
        .route(
            "/v1/connections/{server}",
            put(connections::put)
                .get(connections::get)
                .delete(connections::delete),
        )
        .route("/v1/connections/{server}/tools", get(tools::list))
        .route(
            "/v1/connections/{server}/tools/{tool}/call",
            post(tools::call),
        )
        .route("/v1/oauth/{server}/start", post(oauth::start))
        .route("/v1/oauth/{server}/callback", get(oauth::callback))
        .route("/v1/chat", post(chat::chat))
        .route("/v1/stats", get(admin::stats))
        .route(
            "/v1/admin/users/{user}/connections",
            delete(admin::close_user),
        )
        .route("/v1/admin/credentials/cleanup", post(admin::cleanup))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::scrape))
        .route("/openapi.json", get(openapi::document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    api.layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            timeout,
            request_timeout,
        ))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_errors,
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    let route = request
                        .extensions()
                        .get::<MatchedPath>()
                        .map_or("unmatched", MatchedPath::as_str);
                    tracing::info_span!(
                        "http",
                        method = %request.method(),
                        route,
                        user_id = tracing::field::Empty,
                        server = tracing::field::Empty,
                    )
                })
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` resolves, then: `/readyz` turns 503,
/// requests are still accepted for `http.shutdown_delay` (so a load balancer can notice), the
/// listener closes, and in-flight requests drain for up to `service.shutdown_grace`; whatever
/// is still running after that is dropped with a warning. The caller closes the pool afterwards.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = state.config.service.shutdown_grace;
    let delay = state.config.http.shutdown_delay;
    let draining = CancellationToken::new();
    let signal = {
        let (state, draining) = (state.clone(), draining.clone());
        async move {
            shutdown.await;
            state.begin_shutdown();
            if !delay.is_zero() {
                tracing::info!(?delay, "Shutting down: readiness off, still serving");
                tokio::time::sleep(delay).await;
            }
            tracing::info!("HTTP listener closed; draining in-flight requests");
            draining.cancel();
        }
    };
    let server = axum::serve(listener, router(state))
        .with_graceful_shutdown(signal)
        .into_future();
    let mut server = std::pin::pin!(server);
    tokio::select! {
        result = &mut server => result,
        () = async { draining.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "In-flight requests did not finish within the shutdown grace; dropping them");
            Ok(())
        }
    }
}

// === shared extractors ===

/// The `{server}` path parameter: a valid name of a configured server. Records `server` on the
/// request span. Put it after [`AuthUser`] so an unauthenticated caller learns nothing.
#[derive(Debug, Clone)]
pub struct ServerParam(pub ServerName);

impl FromRequestParts<HttpState> for ServerParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ApiError> {
        let raw = path_param(parts, state, "server").await?;
        let server = ServerName::parse(&raw).map_err(ApiError::invalid_id)?;
        if state.config.server(&server).is_none() {
            return Err(ApiError::not_found(
                "unknown_server",
                format!("unknown server `{server}`"),
            ));
        }
        tracing::Span::current().record("server", server.as_str());
        Ok(ServerParam(server))
    }
}

/// One named path parameter, percent-decoded by axum.
async fn path_param(parts: &mut Parts, state: &HttpState, name: &str) -> Result<String, ApiError> {
    let Path(mut params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
        .await
        .map_err(ApiError::from)?;
    params
        .remove(name)
        .ok_or_else(|| ApiError::internal(&format!("route has no `{name}` parameter")))
}

// === middleware ===

async fn request_timeout(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        // Dropping the handler cancels its tool call (rmcp sends notifications/cancelled).
        Err(_) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "request_timeout",
            format!("the request took longer than {}s", limit.as_secs()),
        )
        .with_retry_safe(false)
        .into_response(),
    }
}

async fn count_errors(State(state): State<HttpState>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if let Some(error::ErrorCode(code)) = response.extensions().get::<error::ErrorCode>() {
        state.metrics.error(code);
    }
    response
}

fn panic_response(_payload: Box<dyn std::any::Any + Send + 'static>) -> Response {
    // The payload may quote request data; it is not logged verbatim, only noted.
    tracing::error!("a request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; it has been logged",
    )
    .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}
