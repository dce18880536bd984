//! The error type of the `mcp` module.

use std::{path::PathBuf, time::Duration};

/// Everything that can go wrong while running or talking to an MCP server.
///
/// Variants that wrap large rmcp errors box them so that `Result<_, McpError>` stays small.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// The server process could not be started (missing binary, bad cwd, no runtime, ...).
    #[error("failed to spawn MCP server `{command}`: {source}")]
    Spawn {
        /// The program that was to be run; never its arguments or environment.
        command: String,
        /// Why the spawn failed.
        #[source]
        source: std::io::Error,
    },
    /// `initialize` plus the first `tools/list` did not complete within the start-up timeout.
    #[error("MCP server did not start within {0:?}")]
    StartupTimeout(Duration),
    /// The `initialize` handshake failed (the server exited, or answered nonsense).
    #[error("MCP initialize handshake failed: {0}")]
    Handshake(#[source] Box<rmcp::service::ClientInitializeError>),
    /// A request got no answer within its timeout; `notifications/cancelled` was sent.
    #[error("MCP request timed out after {0:?}")]
    Timeout(Duration),
    /// The transport to the server closed while a request was out: it exited, crashed, or the
    /// session was closed. The server may have acted on the request.
    #[error("MCP transport closed")]
    Closed,
    /// The transport was closed before the request was written: the server never saw it, so
    /// it is safe to send it again on another session.
    #[error("MCP transport closed before the request was sent")]
    NotSent,
    /// The server answered with a JSON-RPC error (unknown tool, invalid params, ...).
    #[error("MCP server returned an error: {0}")]
    Server(Box<rmcp::ErrorData>),
    /// Any other rmcp service failure (unexpected response type, ...).
    #[error("MCP protocol error: {0}")]
    Protocol(#[source] Box<rmcp::ServiceError>),
    /// The process registry directory could not be read or written.
    #[error("process registry at {path}: {source}")]
    Registry {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The session's confinement could not be prepared or is unavailable.
    #[error(transparent)]
    Sandbox(#[from] super::sandbox::SandboxError),
    /// A remote server answered 401 (or 403) and the user's credentials could not be made to
    /// satisfy it; the cause, when known, says why (`ReconnectRequired` for a revoked grant or
    /// a rejected API key, `NotFound` for none stored).
    #[error("the remote MCP server refused the user's credentials")]
    Unauthorized(Option<std::sync::Arc<crate::store::CredentialError>>),
    /// A remote server answered a request with HTTP 429 or 5xx (it may or may not have acted on
    /// it); the session stays up.
    #[error("the remote MCP server answered HTTP {status}")]
    HttpStatus { status: u16 },
    /// The demo server failed to start or stopped abnormally.
    #[error("demo server: {0}")]
    DemoServer(String),
}

impl From<rmcp::ServiceError> for McpError {
    fn from(err: rmcp::ServiceError) -> Self {
        match err {
            rmcp::ServiceError::Timeout { timeout } => McpError::Timeout(timeout),
            // A failed send means the writer half is gone, which callers treat like a close.
            rmcp::ServiceError::TransportClosed | rmcp::ServiceError::TransportSend(_) => {
                McpError::Closed
            }
            rmcp::ServiceError::McpError(data) => McpError::Server(Box::new(data)),
            other => McpError::Protocol(Box::new(other)),
        }
    }
}
