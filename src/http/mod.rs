//! The HTTP facade: an axum router a chat backend calls. The acting user always comes from
//! authentication ([`auth`]), never from a body, and a user reaches only their own connections.
//!
//! - [`connections`]: store, list, inspect and remove the caller's credentials per server.
//! - [`tools`]: list a server's tools and call one.
//! - [`mcp`]: `/mcp`, the caller's servers as one Streamable HTTP MCP server, and the OAuth
//!   protected-resource metadata of `jwt` mode.
//! - [`oauth`]: the OAuth connect flow (`start`, and the unauthenticated `callback`).
//! - [`admin`]: pool stats, closing a user's sessions, credential cleanup (admin key).
//! - [`health`], [`metrics`], [`openapi`]: probes, Prometheus text, the API description.
//! - [`internal`]: `/internal/v1/...`, what other nodes of a cluster forward to (cluster
//!   secret only).
//! - [`auth`]: API-key and JWT authentication, the [`AuthUser`] and [`AdminAuth`] extractors.
//! - [`error`]: [`ApiError`], every failure as a status plus `{ "error": { "code", "message" } }`.
//! - [`logging`]: refused requests logged at DEBUG, summarised at WARN once per code and window.
//!
//! [`serve`] runs the router on hyper's HTTP/1.1 connections with a header-read timeout and a
//! cap on open connections (excess ones get an immediate 503).
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
pub mod internal;
pub mod logging;
pub mod mcp;
pub mod metrics;
pub mod oauth;
pub mod openapi;
pub mod tools;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

pub use auth::{AdminAuth, Auth, AuthSetupError, AuthUser};
pub use error::ApiError;
pub use metrics::Metrics;

use crate::actors::{CredentialHandle, PoolHandle};
use crate::config::Config;
use crate::llm::LlmClient;
use crate::store::{ServerName, Store};

/// Everything a request handler needs, behind one `Arc`: axum clones the state for every
/// extractor and middleware of every request, and a field-by-field clone of the handles was
/// a few dozen atomic increments (and as many decrements) per request.
#[derive(Clone)]
pub struct HttpState(Arc<HttpStateInner>);

impl std::ops::Deref for HttpState {
    type Target = HttpStateInner;

    fn deref(&self) -> &HttpStateInner {
        &self.0
    }
}

/// The fields of [`HttpState`].
pub struct HttpStateInner {
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
    /// Cancelled when shutdown begins: endless streams (the admin event feed) end with it, so
    /// they never hold up the drain.
    shutdown: tokio_util::sync::CancellationToken,
    /// Rate-limited logging of error responses.
    pub refusals: Arc<logging::RefusalLog>,
    /// `/mcp`: its sessions and their owners.
    pub mcp: Arc<mcp::McpEndpoint>,
    /// Requests of other nodes in progress; closed when the listener closes.
    pub peer_gate: internal::PeerGate,
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
        let metrics = Arc::new(Metrics::new(pool.metrics(), pool.cluster().map(|c| &**c)));
        HttpState(Arc::new(HttpStateInner {
            pool,
            credentials,
            store,
            mcp: Arc::new(mcp::McpEndpoint::new(&config)),
            config,
            llm,
            auth: Arc::new(auth),
            metrics,
            shutting_down: Arc::new(AtomicBool::new(false)),
            shutdown: tokio_util::sync::CancellationToken::new(),
            refusals: Arc::new(logging::RefusalLog::new(logging::SUMMARY_WINDOW)),
            peer_gate: internal::PeerGate::default(),
        }))
    }

    /// Marks the service as shutting down (readiness fails from now on).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.shutdown.cancel();
    }

    /// Cancelled when shutdown begins.
    pub fn shutdown_token(&self) -> tokio_util::sync::CancellationToken {
        self.shutdown.clone()
    }

    /// Counts an error answer in `/metrics` and the refusal log: every error response (see
    /// `count_errors`), and the `error` event that ends a stream (whose status line said 200).
    pub fn count_error(&self, code: &'static str, status: StatusCode) {
        self.metrics.error(code);
        self.refusals.note(code, status);
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
        .route(
            "/v1/admin/users/{user}/connections/{server}",
            delete(admin::close_session),
        )
        .route("/v1/admin/events", get(admin::events))
        .route("/admin", get(admin::page))
        .route("/admin/app.js", get(admin::page_script))
        .route("/admin/app.css", get(admin::page_style))
        .route("/v1/admin/credentials/cleanup", post(admin::cleanup))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::scrape))
        .route("/openapi.json", get(openapi::document))
        .route(mcp::RESOURCE_METADATA_PATH, get(mcp::protected_resource))
        .route(
            mcp::ROOT_RESOURCE_METADATA_PATH,
            get(mcp::protected_resource),
        )
        .merge(mcp::service(&state))
        .merge(internal::routes(&state))
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
                // Successes at INFO; error responses at DEBUG here, summarised by `count_errors`.
                // No `on_failure`: its ERROR per 5xx response flooded the log while a circuit
                // was open (every refused request is a 503).
                .on_response(
                    |response: &Response, latency: Duration, _span: &tracing::Span| {
                        let status = response.status().as_u16();
                        let latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
                        if status < 400 {
                            tracing::info!(status, latency_ms, "finished processing request");
                        } else {
                            tracing::debug!(status, latency_ms, "finished processing request");
                        }
                    },
                )
                .on_failure(()),
        )
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` resolves, then: `/readyz` turns 503,
/// requests are still accepted for `http.shutdown_delay` (so a load balancer can notice), the
/// listener closes, and in-flight requests drain for up to `service.shutdown_grace`; whatever
/// is still running after that is dropped with a warning. The caller closes the pool afterwards.
///
/// Connections are HTTP/1.1, served by hyper directly (not `axum::serve`) for two limits a
/// hostile client would otherwise exhaust:
/// - `http.header_read_timeout`: a connection that has not sent a request's whole header within
///   it (a new one, or a kept-alive one after its last response) is closed, however slowly it
///   trickles bytes;
/// - `http.max_open_connections`: past it a new connection is answered at once with
///   `503 too_many_connections` (`Retry-After: 1`) and closed: refused, not queued, so a client
///   learns at once and nothing waits invisibly in the accept backlog.
///
/// A connection that carried a request of another node of the cluster (authenticated by the
/// cluster secret) is not closed with the others: it is returned in [`PeerConnections`], and
/// the caller closes it once this node has released its leases. Closing it earlier races with
/// a forwarded request written on it at that moment, which then fails although it never ran.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<PeerConnections> {
    let grace = state.config.service.shutdown_grace;
    let delay = state.config.http.shutdown_delay;
    let limits = ConnectionLimits {
        header_read_timeout: state.config.http.header_read_timeout,
        open: Arc::new(Semaphore::new(state.config.http.max_open_connections)),
        refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
    };
    let draining = CancellationToken::new();
    tokio::spawn({
        let (state, draining) = (state.clone(), draining.clone());
        async move {
            tokio::select! {
                () = shutdown => {}
                // serve() returned early (its future was dropped): nothing left to announce.
                () = draining.cancelled() => return,
            }
            state.begin_shutdown();
            if !delay.is_zero() {
                tracing::info!(?delay, "Shutting down: readiness off, still serving");
                tokio::time::sleep(delay).await;
            }
            tracing::info!("HTTP listener closed; draining in-flight requests");
            draining.cancel();
            state.mcp.shut_down();
        }
    });
    let _stop_announcer = draining.clone().drop_guard();
    let app = router(state.clone());
    let mut connections = tokio::task::JoinSet::new();
    let release_peers = CancellationToken::new();
    // Every connection task holds a clone until it ends or, as a peer connection, outlives the
    // drain: the drain is over when the last clone is dropped.
    let (serving_clients, mut clients_done) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let accepted = tokio::select! {
            () = draining.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        // Finished connection tasks are collected as we go, so the set stays small.
        while connections.try_join_next().is_some() {}
        let (stream, _peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE/ENFILE and aborted handshakes: back off briefly instead of spinning.
                tracing::warn!(cause = %err, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Streamed answers (`/mcp`'s server-sent events, chat streams) are several small writes:
        // with Nagle's algorithm each waited for the client's delayed ACK (~40 ms per answer).
        let _ = stream.set_nodelay(true);
        let Ok(permit) = limits.open.clone().try_acquire_owned() else {
            refuse_connection(stream, &limits, &state);
            continue;
        };
        let role = ConnectionRole::default();
        let service = {
            let (app, role) = (
                hyper_util::service::TowerToHyperService::new(app.clone()),
                role.clone(),
            );
            hyper::service::service_fn(move |mut request: hyper::Request<_>| {
                role.saw_request();
                request.extensions_mut().insert(role.clone());
                hyper::service::Service::call(&app, request)
            })
        };
        let (draining, header_read_timeout) = (draining.clone(), limits.header_read_timeout);
        let (release_peers, serving_client) = (release_peers.clone(), serving_clients.clone());
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let connection =
                builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                // The connection first: request bytes already here are read before a drain
                // that starts at the same moment finds the connection idle and closes it.
                biased;
                result = connection.as_mut() => log_connection_end(result),
                () = draining.cancelled() => {
                    if !role.has_seen_request() {
                        // Just accepted: its first request may be on its way (another node
                        // writes a forwarded call right after connecting). Closing now would
                        // lose it; once it arrives, an internal one is refused cleanly.
                        tokio::select! {
                            result = connection.as_mut() => {
                                log_connection_end(result);
                                return;
                            }
                            () = tokio::time::sleep(FIRST_REQUEST_WAIT) => {}
                        }
                    }
                    if role.is_peer() {
                        drop(serving_client);
                        tokio::select! {
                            result = connection.as_mut() => {
                                log_connection_end(result);
                                return;
                            }
                            () = release_peers.cancelled() => {}
                        }
                    }
                    // Finish the request in progress (if any), then close.
                    connection.as_mut().graceful_shutdown();
                    log_connection_end(connection.await);
                }
            }
        });
    }
    drop(listener);
    drop(serving_clients);
    // From now on other nodes' requests are refused before any work (they retry elsewhere);
    // those in progress finish before the pool closes the sessions they run on.
    state.peer_gate.close();
    let drained = tokio::time::timeout(grace, async {
        clients_done.recv().await;
        state.peer_gate.drained().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            ?grace,
            still_open = connections.len(),
            "In-flight requests did not finish within the shutdown grace; dropping them"
        );
        connections.abort_all();
    }
    Ok(PeerConnections {
        connections,
        release: release_peers,
        grace,
    })
}

/// How long a connection that has not sent a request yet is kept once the drain starts.
const FIRST_REQUEST_WAIT: Duration = Duration::from_millis(500);

/// What a connection has carried: nothing yet, some request, or a request of another node
/// (set by the internal routes once the cluster secret checked out, so no client can hold a
/// connection open past the drain).
#[derive(Clone, Default)]
pub struct ConnectionRole(Arc<AtomicU8>);

const ROLE_NEW: u8 = 0;
const ROLE_SERVED: u8 = 1;
const ROLE_PEER: u8 = 2;

impl ConnectionRole {
    fn saw_request(&self) {
        let _ =
            self.0
                .compare_exchange(ROLE_NEW, ROLE_SERVED, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub fn mark_peer(&self) {
        self.0.store(ROLE_PEER, Ordering::Relaxed);
    }

    fn has_seen_request(&self) -> bool {
        self.0.load(Ordering::Relaxed) != ROLE_NEW
    }

    fn is_peer(&self) -> bool {
        self.0.load(Ordering::Relaxed) == ROLE_PEER
    }
}

/// Other nodes' connections, still open after [`serve`] returned: the internal routes answer
/// `503 shutting_down` on them (a refusal the sending node retries elsewhere), until this node
/// has released its leases and closes them.
pub struct PeerConnections {
    connections: tokio::task::JoinSet<()>,
    release: CancellationToken,
    grace: Duration,
}

impl PeerConnections {
    /// How many are still open.
    pub fn open(&mut self) -> usize {
        while self.connections.try_join_next().is_some() {}
        self.connections.len()
    }

    /// Closes them (each finishes its request in progress), within `service.shutdown_grace`.
    pub async fn close(mut self) {
        self.release.cancel();
        let connections = &mut self.connections;
        let closed = tokio::time::timeout(self.grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if closed.is_err() {
            self.connections.abort_all();
        }
    }
}

/// Refused connections answered at the same time at most; past this they are closed unanswered
/// (each answer holds a file descriptor for up to twice [`REFUSAL_LINGER`]).
const MAX_REFUSING: usize = 64;
/// How long a refused connection waits for the request head before the 503, and then for the
/// client to close, so that closing it does not reset the connection before the client read
/// the 503.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

struct ConnectionLimits {
    header_read_timeout: Duration,
    /// One permit per open connection (`http.max_open_connections`).
    open: Arc<Semaphore>,
    /// Refusals being answered (see [`MAX_REFUSING`]).
    refusing: Arc<Semaphore>,
}

/// Answers a connection over `http.max_open_connections` with a 503 and closes it.
fn refuse_connection(stream: tokio::net::TcpStream, limits: &ConnectionLimits, state: &HttpState) {
    state.metrics.error(TOO_MANY_CONNECTIONS);
    state
        .refusals
        .note(TOO_MANY_CONNECTIONS, StatusCode::SERVICE_UNAVAILABLE);
    let Ok(permit) = limits.refusing.clone().try_acquire_owned() else {
        return; // dropped: closed unanswered
    };
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _permit = permit;
        let mut stream = stream;
        let body = format!(
            "{{\"error\":{{\"code\":\"{TOO_MANY_CONNECTIONS}\",\"message\":\"too many open connections; retry later\",\"retry_after_secs\":1}}}}"
        );
        let response = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        // Answer after the request head (or after the linger, for a client that sends none), so
        // an HTTP client sees a response to its request rather than an unsolicited one; then
        // read what else it sends until it closes, so closing does not reset the connection.
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            stream.write_all(response.as_bytes()).await?;
            stream.shutdown().await?;
            while stream.read(&mut buf).await? > 0 {}
            Ok::<(), std::io::Error>(())
        })
        .await;
    });
}

const TOO_MANY_CONNECTIONS: &str = "too_many_connections";

fn log_connection_end(result: Result<(), hyper::Error>) {
    match result {
        Ok(()) => {}
        // A slow or idle client that did not send its header in time: expected, not a fault.
        Err(err) if err.is_timeout() => {
            tracing::debug!("closed a connection that did not send a request header in time")
        }
        Err(err) => tracing::debug!(cause = %err, "connection ended with an error"),
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
        state.count_error(code, response.status());
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
