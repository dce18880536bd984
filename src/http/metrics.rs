//! `/metrics`: Prometheus text (OpenMetrics encoding from `prometheus-client`).
//!
//! Two sources: the pool records its own families as things happen (tool calls by server and
//! outcome, spawns, restarts, crashes, reaps, evictions, refreshes, cold starts; see
//! `actors::pool::metrics`), so every caller is counted alike; this layer adds what only HTTP
//! sees (error responses by code, chat requests) and gauges read from `PoolStats` at scrape
//! time (sessions by state and by confinement). No label ever holds a user id; `server` labels
//! only take configured server names, so label cardinality is bounded by the config.

use std::sync::Mutex;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::HttpState;
use super::error::ApiError;
use crate::actors::{PoolMetrics, SessionState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxLabel {
    /// `enforced`, `partial` or `off`.
    sandbox: String,
}

/// The facade's metrics. Shared by every request.
pub struct Metrics {
    registry: Registry,
    errors: Family<CodeLabel, Counter>,
    chat_requests: Counter,
    connections: Family<StateLabel, Gauge>,
    sandboxes: Family<SandboxLabel, Gauge>,
    /// Scrapes run one at a time: gauges are set then encoded.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The facade's families beside the pool's own (`pool`).
    pub fn new(pool: &PoolMetrics) -> Metrics {
        let mut registry = Registry::with_prefix("mcp_pool");
        pool.register(&mut registry);
        let errors = Family::<CodeLabel, Counter>::default();
        registry.register(
            "http_errors",
            "Error responses by error code",
            errors.clone(),
        );
        let chat_requests = Counter::default();
        registry.register(
            "chat_requests",
            "Requests to /v1/chat",
            chat_requests.clone(),
        );
        let connections = Family::<StateLabel, Gauge>::default();
        registry.register("connections", "MCP sessions by state", connections.clone());
        let sandboxes = Family::<SandboxLabel, Gauge>::default();
        registry.register(
            "sessions_by_sandbox",
            "Live MCP sessions by confinement: enforced, partial (best_effort on a host that \
             lacks something) or off",
            sandboxes.clone(),
        );
        Metrics {
            registry,
            errors,
            chat_requests,
            connections,
            sandboxes,
            scrape: Mutex::new(()),
        }
    }

    /// Records an error response by its (static, bounded) code.
    pub fn error(&self, code: &'static str) {
        self.errors
            .get_or_create(&CodeLabel {
                code: code.to_owned(),
            })
            .inc();
    }

    /// Counts a chat request (called by the `/v1/chat` handler).
    pub fn chat_request(&self) {
        self.chat_requests.inc();
    }

    /// Renders the registry after setting the scrape-time gauges from `stats`.
    pub fn render(
        &self,
        stats: Option<&crate::actors::PoolStats>,
    ) -> Result<String, std::fmt::Error> {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(stats) = stats {
            for state in [
                SessionState::Starting,
                SessionState::Ready,
                SessionState::Restarting,
                SessionState::Failed,
                SessionState::Closing,
            ] {
                let count = stats
                    .connections
                    .iter()
                    .filter(|c| c.state == state)
                    .count();
                self.connections
                    .get_or_create(&StateLabel {
                        state: state_name(state).to_owned(),
                    })
                    .set(count as i64);
            }
            for label in ["enforced", "partial", "off"] {
                let count = stats
                    .connections
                    .iter()
                    .filter(|c| c.pid.is_some())
                    .filter(|c| {
                        c.sandbox
                            .as_deref()
                            .and_then(|s| s.split_whitespace().next())
                            == Some(label)
                    })
                    .count();
                self.sandboxes
                    .get_or_create(&SandboxLabel {
                        sandbox: label.to_owned(),
                    })
                    .set(count as i64);
            }
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// The state names of the API (`closing` is reported as `closed`).
pub fn state_name(state: SessionState) -> &'static str {
    match state {
        SessionState::Starting => "starting",
        SessionState::Ready => "ready",
        SessionState::Restarting => "restarting",
        SessionState::Failed => "failed",
        SessionState::Closing => "closed",
    }
}

/// `GET /metrics`.
#[utoipa::path(
    get, path = "/metrics", operation_id = "metrics", tag = "meta", security(()),
    responses(
        (status = 200, description = "Prometheus metrics in OpenMetrics text; no user ids", content_type = "application/openmetrics-text", body = String),
        (status = 503, description = "`too_many_connections`", body = super::openapi::ErrorBody, headers(("Retry-After" = u64))),
    )
)]
pub async fn scrape(State(state): State<HttpState>) -> Result<Response, ApiError> {
    // A pool that does not answer must not make the whole scrape fail: the HTTP counters
    // are still worth having.
    let stats = state.pool.stats().await.ok();
    let text = state
        .metrics
        .render(stats.as_ref())
        .map_err(|err| ApiError::internal(&err))?;
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(response)
}
