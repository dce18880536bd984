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
use prometheus_client::registry::{Registry, Unit};

use super::HttpState;
use super::error::ApiError;
use crate::actors::{PoolMetrics, SessionState};
use crate::cluster::Cluster;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    server: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabel {
    server: String,
}

/// The standard `process_*` metrics of the service itself (as Prometheus client libraries
/// export them), read from `/proc/self` at scrape time.
struct ProcessMetrics {
    resident_memory: Gauge,
    virtual_memory: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    threads: Gauge,
    start_time: Gauge<f64, std::sync::atomic::AtomicU64>,
    cpu: Counter<f64, std::sync::atomic::AtomicU64>,
    /// CPU seconds already counted, so the counter grows by what `/proc` adds.
    cpu_seen: Mutex<f64>,
}

impl ProcessMetrics {
    fn register(registry: &mut Registry) -> ProcessMetrics {
        let metrics = ProcessMetrics {
            resident_memory: Gauge::default(),
            virtual_memory: Gauge::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            threads: Gauge::default(),
            start_time: Gauge::default(),
            cpu: Counter::default(),
            cpu_seen: Mutex::new(0.0),
        };
        registry.register_with_unit(
            "process_resident_memory",
            "Resident memory size",
            Unit::Bytes,
            metrics.resident_memory.clone(),
        );
        registry.register_with_unit(
            "process_virtual_memory",
            "Virtual memory size",
            Unit::Bytes,
            metrics.virtual_memory.clone(),
        );
        registry.register(
            "process_open_fds",
            "Open file descriptors",
            metrics.open_fds.clone(),
        );
        registry.register(
            "process_max_fds",
            "Limit of open file descriptors (soft RLIMIT_NOFILE)",
            metrics.max_fds.clone(),
        );
        registry.register("process_threads", "OS threads", metrics.threads.clone());
        registry.register_with_unit(
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Unit::Seconds,
            metrics.start_time.clone(),
        );
        registry.register_with_unit(
            "process_cpu",
            "User and system CPU time spent",
            Unit::Seconds,
            metrics.cpu.clone(),
        );
        metrics
    }

    fn update(&self) {
        let me = crate::mcp::usage::of_self();
        let as_gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.resident_memory.set(as_gauge(me.rss_bytes));
        self.virtual_memory.set(as_gauge(me.virtual_bytes));
        self.open_fds.set(as_gauge(me.open_fds));
        self.threads.set(as_gauge(me.threads));
        self.start_time.set(me.start_time);
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            self.max_fds.set(as_gauge(soft));
        }
        let mut seen = self.cpu_seen.lock().unwrap_or_else(|p| p.into_inner());
        if me.cpu_seconds > *seen {
            self.cpu.inc_by(me.cpu_seconds - *seen);
            *seen = me.cpu_seconds;
        }
    }
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
    sessions: Family<SessionLabels, Gauge>,
    sandboxes: Family<SandboxLabel, Gauge>,
    server_memory: Family<ServerLabel, Gauge>,
    server_cpu: Family<ServerLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    process: ProcessMetrics,
    /// Sessions started by fork, and starts that fell back to a spawn, per preforked server
    /// (totals since the service started, read from `PoolStats::prefork` at scrape time).
    prefork_forks: Family<ServerLabel, Gauge>,
    prefork_fallbacks: Family<ServerLabel, Gauge>,
    /// Scrapes run one at a time: gauges are set then encoded.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The facade's families beside the pool's own (`pool`) and, in cluster mode, the
    /// forwarding counts of `cluster`.
    pub fn new(pool: &PoolMetrics, cluster: Option<&Cluster>) -> Metrics {
        let mut root = Registry::default();
        let process = ProcessMetrics::register(&mut root);
        let registry = root.sub_registry_with_prefix("mcp_pool");
        pool.register(registry);
        if let Some(cluster) = cluster {
            cluster.register_metrics(registry);
        }
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
        let sessions = Family::<SessionLabels, Gauge>::default();
        registry.register(
            "sessions",
            "MCP sessions by server and state (starting, ready, restarting, failed, closed)",
            sessions.clone(),
        );
        let server_memory = Family::<ServerLabel, Gauge>::default();
        registry.register_with_unit(
            "server_memory",
            "Memory of each server's live sessions (proportional set size of their process \
             groups), summed",
            Unit::Bytes,
            server_memory.clone(),
        );
        let server_cpu = Family::<ServerLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register_with_unit(
            "server_cpu",
            "CPU time used by each server's live sessions, summed (a gauge: it drops when a \
             session ends)",
            Unit::Seconds,
            server_cpu.clone(),
        );
        let sandboxes = Family::<SandboxLabel, Gauge>::default();
        registry.register(
            "sessions_by_sandbox",
            "Live MCP sessions by confinement: enforced, partial (best_effort on a host that \
             lacks something) or off",
            sandboxes.clone(),
        );
        let prefork_forks = Family::<ServerLabel, Gauge>::default();
        registry.register(
            "prefork_forks",
            "Sessions of a preforked server started by fork from its zygote, since start-up",
            prefork_forks.clone(),
        );
        let prefork_fallbacks = Family::<ServerLabel, Gauge>::default();
        registry.register(
            "prefork_fallbacks",
            "Session starts of a preforked server that fell back to a plain spawn, since start-up",
            prefork_fallbacks.clone(),
        );
        Metrics {
            registry: root,
            errors,
            chat_requests,
            sessions,
            sandboxes,
            server_memory,
            server_cpu,
            process,
            prefork_forks,
            prefork_fallbacks,
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
        self.process.update();
        if let Some(stats) = stats {
            // Cleared first: a server with no session left must not keep its last value.
            self.sessions.clear();
            for session in &stats.connections {
                self.sessions
                    .get_or_create(&SessionLabels {
                        server: session.server.to_string(),
                        state: state_name(session.state).to_owned(),
                    })
                    .inc();
            }
            self.server_memory.clear();
            self.server_cpu.clear();
            for (server, summary) in &stats.servers {
                let label = ServerLabel {
                    server: server.clone(),
                };
                self.server_memory
                    .get_or_create(&label)
                    .set(i64::try_from(summary.memory_bytes).unwrap_or(i64::MAX));
                self.server_cpu
                    .get_or_create(&label)
                    .set(summary.cpu_seconds);
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
            for zygote in &stats.prefork {
                let label = ServerLabel {
                    server: zygote.server.clone(),
                };
                let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
                self.prefork_forks
                    .get_or_create(&label)
                    .set(count(zygote.forks));
                self.prefork_fallbacks
                    .get_or_create(&label)
                    .set(count(zygote.fallbacks));
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
    let stats = state.pool.stats_with_usage().await.ok();
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
