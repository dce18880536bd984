//! `/metrics`: Prometheus text (OpenMetrics encoding from `prometheus-client`).
//!
//! What the HTTP layer sees is counted as it happens (tool calls and their latency by server,
//! error responses by code, chat requests). Connection counts by state and the pool's event
//! counters (spawns, restarts, reaped, evicted) are read from `PoolStats` at scrape time, so the
//! pool needs no metrics dependency. No label ever holds a user id; `server` labels only take
//! configured server names, so label cardinality is bounded by the config.

use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::HttpState;
use super::error::ApiError;
use crate::actors::ConnState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabel {
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    server: String,
    /// `ok`, `tool_error` (the tool answered `is_error: true`) or the API error code.
    outcome: String,
}

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

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s: a warm echo is sub-millisecond, a call may take the whole call timeout.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The facade's metrics. Shared by every request.
pub struct Metrics {
    registry: Registry,
    tool_calls: Family<CallLabels, Counter>,
    tool_latency: Family<ServerLabel, Histogram, fn() -> Histogram>,
    errors: Family<CodeLabel, Counter>,
    chat_requests: Counter,
    connections: Family<StateLabel, Gauge>,
    sandboxes: Family<SandboxLabel, Gauge>,
    spawns: Gauge,
    restarts: Gauge,
    reaped: Gauge,
    evicted: Gauge,
    /// Scrapes run one at a time: gauges are set then encoded.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mcp_pool");
        let tool_calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "tool_calls",
            "Tool calls through the HTTP facade, by server and outcome",
            tool_calls.clone(),
        );
        let tool_latency: Family<ServerLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "tool_call_duration_seconds",
            "Latency of tool calls (including a session start when none was live), by server",
            tool_latency.clone(),
        );
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
        // The pool's own counters are read at scrape time; exported as gauges because they
        // restart from zero when the pool supervisor is replaced.
        let spawns = Gauge::default();
        registry.register(
            "pool_spawns",
            "MCP server processes spawned since the pool supervisor started",
            spawns.clone(),
        );
        let restarts = Gauge::default();
        registry.register(
            "pool_restarts",
            "Restarts after a crash or failed start since the pool supervisor started",
            restarts.clone(),
        );
        let reaped = Gauge::default();
        registry.register(
            "pool_reaped",
            "Idle sessions closed by the reaper since the pool supervisor started",
            reaped.clone(),
        );
        let evicted = Gauge::default();
        registry.register(
            "pool_evicted",
            "Sessions closed to make room since the pool supervisor started",
            evicted.clone(),
        );
        Metrics {
            registry,
            tool_calls,
            tool_latency,
            errors,
            chat_requests,
            connections,
            sandboxes,
            spawns,
            restarts,
            reaped,
            evicted,
            scrape: Mutex::new(()),
        }
    }

    /// Records one tool call. `server` must be a configured server name.
    pub fn tool_call(&self, server: &str, outcome: &str, elapsed: Duration) {
        self.tool_calls
            .get_or_create(&CallLabels {
                server: server.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.tool_latency
            .get_or_create(&ServerLabel {
                server: server.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
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
                ConnState::Starting,
                ConnState::Ready,
                ConnState::Restarting,
                ConnState::Failed,
                ConnState::Closing,
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
            let as_gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.spawns.set(as_gauge(stats.counters.spawns));
            self.restarts.set(as_gauge(stats.counters.restarts));
            self.reaped.set(as_gauge(stats.counters.reaped));
            self.evicted.set(as_gauge(stats.counters.evicted));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// The state names of the API (`closing` is reported as `closed`).
pub fn state_name(state: ConnState) -> &'static str {
    match state {
        ConnState::Starting => "starting",
        ConnState::Ready => "ready",
        ConnState::Restarting => "restarting",
        ConnState::Failed => "failed",
        ConnState::Closing => "closed",
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
