//! [`PoolError`]: why the pool could not serve a request, and its one stable code.

use std::sync::Arc;
use std::time::Duration;

use crate::actors::credential::CredentialError;
use crate::cluster::{ClusterError, RemoteError};
use crate::ids::ServerName;
use crate::mcp::McpError;

/// Why the pool could not serve a request. Cheap to clone: one failed start answers every
/// request that waited for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    #[error("unknown server `{0}`")]
    UnknownServer(ServerName),
    #[error("no credentials stored for server `{0}`")]
    NoCredentials(ServerName),
    #[error("credentials unavailable: {0}")]
    Credentials(Arc<CredentialError>),
    #[error("connection pool is full; retry in {}s", retry_after.as_secs().max(1))]
    PoolFull { retry_after: Duration },
    #[error("server keeps crashing; new sessions refused for {}s", retry_after.as_secs().max(1))]
    CircuitOpen { retry_after: Duration },
    #[error("MCP server failed to start: {0}")]
    StartFailed(Arc<McpError>),
    /// The server's configured program is not installed (or not executable) on this host.
    #[error("MCP server `{server}` cannot start: {problem}")]
    ServerProgramNotFound {
        server: ServerName,
        /// What is wrong, naming the program (e.g. "program `pipx` was not found in PATH").
        problem: String,
    },
    /// The user already has `pool.max_in_flight_per_user` calls in flight.
    #[error("too many tool calls in flight for this user; retry in {}s", retry_after.as_secs().max(1))]
    TooManyCalls { retry_after: Duration },
    /// The arguments nest deeper than [`crate::actors::fairness::MAX_ARGUMENT_DEPTH`]; nothing was sent.
    #[error("tool arguments nest deeper than {max} levels")]
    ArgumentsTooDeep { max: usize },
    #[error("MCP server exited during the call; it may or may not have run, and is not retried")]
    ServerCrashed,
    /// The kernel killed the server at its memory limit (`sandbox.memory_max`) during the call.
    #[error(
        "MCP server was killed for exceeding its memory limit of {} MiB during the call; it restarts on the next request",
        .0 / (1024 * 1024)
    )]
    MemoryLimit(u64),
    /// The server must run confined (`sandbox.mode = "enforce"`) and this host cannot.
    #[error("MCP server refused to start: {0}")]
    SandboxUnavailable(String),
    #[error("tool call timed out after {0:?}; the request was cancelled")]
    CallTimeout(Duration),
    #[error("unknown tool `{0}`")]
    UnknownTool(String),
    #[error("MCP error: {0}")]
    Mcp(Arc<McpError>),
    /// The session was closed before the call reached the server (it started closing, or
    /// its transport was already gone); `PoolHandle::call_tool` retries it once.
    #[error("connection was closed before the call; fetch a fresh one")]
    Reconnect,
    #[error("the pool is shutting down")]
    ShuttingDown,
    #[error("the pool is not running")]
    Unavailable,
    /// Cluster coordination failed (the database, or the node that owns the key).
    #[error("{0}")]
    Cluster(Arc<ClusterError>),
    /// The node the request was forwarded to answered with this error.
    #[error("{0}")]
    Forwarded(Arc<RemoteError>),
}

impl PoolError {
    pub(crate) fn cluster(err: ClusterError) -> PoolError {
        PoolError::Cluster(Arc::new(err))
    }

    /// A credential problem as the pool reports it: no stored credentials are their own case.
    pub(crate) fn from_credentials(err: CredentialError) -> PoolError {
        match err {
            CredentialError::NotFound(server) => PoolError::NoCredentials(server),
            other => PoolError::Credentials(Arc::new(other)),
        }
    }

    /// The stable, machine-readable code of this error, the one mapping shared by the HTTP
    /// error body and the chat trace (`tests/error_codes.rs` holds HTTP to it), so a revoked
    /// grant is `reconnect_required` for every caller.
    pub fn code(&self) -> &'static str {
        match self {
            PoolError::UnknownServer(_) => "unknown_server",
            PoolError::NoCredentials(_) => "no_credentials",
            PoolError::Credentials(cause) => cause.code(),
            PoolError::PoolFull { .. } => "pool_full",
            PoolError::CircuitOpen { .. } => "circuit_open",
            PoolError::StartFailed(_) => "server_start_failed",
            PoolError::ServerProgramNotFound { .. } => "server_program_not_found",
            PoolError::TooManyCalls { .. } => "too_many_calls",
            PoolError::ArgumentsTooDeep { .. } => "arguments_too_deep",
            PoolError::ServerCrashed => "server_crashed",
            PoolError::MemoryLimit(_) => "server_memory_limit",
            PoolError::SandboxUnavailable(_) => "sandbox_unavailable",
            PoolError::CallTimeout(_) => "call_timeout",
            PoolError::UnknownTool(_) => "unknown_tool",
            PoolError::Mcp(cause) => mcp_code(cause),
            PoolError::Reconnect => "reconnect",
            PoolError::ShuttingDown => "shutting_down",
            PoolError::Unavailable => "pool_unavailable",
            PoolError::Cluster(cause) => cause.code(),
            PoolError::Forwarded(remote) => remote.code,
        }
    }
}

/// The code of an MCP error met during a call, by its cause.
fn mcp_code(err: &McpError) -> &'static str {
    match err {
        McpError::Server(data) if data.code == rmcp::model::ErrorCode::INVALID_PARAMS => {
            "invalid_arguments"
        }
        McpError::Server(data) if data.code == rmcp::model::ErrorCode::METHOD_NOT_FOUND => {
            "unknown_tool"
        }
        McpError::Server(_) => "server_error",
        McpError::Timeout(_) => "call_timeout",
        McpError::Closed => "server_crashed",
        McpError::NotSent => "reconnect",
        McpError::Spawn { .. }
        | McpError::StartupTimeout(_)
        | McpError::Handshake(_)
        | McpError::Registry { .. }
        | McpError::Sandbox(_)
        | McpError::DemoServer(_) => "server_start_failed",
        McpError::Protocol(_) => "server_protocol_error",
        McpError::Unauthorized(Some(cause)) => cause.code(),
        McpError::Unauthorized(None) => "reconnect_required",
        McpError::HttpStatus { .. } => "server_error",
    }
}
