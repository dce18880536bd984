//! `ApiError`: every failure of the facade as a status code plus `{ "error": { "code",
//! "message" } }`. Each `PoolError` and `CredentialError` variant is mapped explicitly, so a new
//! variant fails to compile here instead of leaking as a 500.
//!
//! Internal errors are logged (inside the request span, which carries `user_id` and `server`)
//! and answered with a generic message: no cause chain, path or token ever reaches a client.

use std::time::Duration;

use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::actors::{CredentialError, PoolError};
use crate::mcp::McpError;
use crate::store::{IdError, StoreError};

/// The machine-readable error code of a response, left in its extensions for the metrics layer.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

/// An error answer of the facade. Build it with the constructors or `From` conversions.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Sent as `Retry-After` (whole seconds, at least 1).
    retry_after: Option<Duration>,
    /// For 502/504: whether repeating the request cannot run the tool twice.
    retry_safe: Option<bool>,
}

/// JSON body of an error response.
#[derive(serde::Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(serde::Serialize)]
struct Detail<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_safe: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_secs: Option<u64>,
}

/// Messages quoted from parsers are cut here: enough to find the mistake, never a whole body.
const MAX_MESSAGE: usize = 300;

fn truncate(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: truncate(message.into()),
            retry_after: None,
            retry_safe: None,
        }
    }

    pub fn with_retry_after(mut self, after: Duration) -> ApiError {
        self.retry_after = Some(after);
        self
    }

    pub fn with_retry_safe(mut self, safe: bool) -> ApiError {
        self.retry_safe = Some(safe);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn unavailable(
        code: &'static str,
        message: impl Into<String>,
        after: Duration,
    ) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message).with_retry_after(after)
    }

    /// The error body plus the status it would have had, for an error that comes after a
    /// streamed response began (its status line already said 200):
    /// `{"status": 502, "error": {"code": ..., "message": ..., ...}}`.
    pub fn stream_event(&self) -> serde_json::Value {
        let body = Body {
            error: Detail {
                code: self.code,
                message: &self.message,
                retry_safe: self.retry_safe,
                retry_after_secs: self.retry_after.map(secs),
            },
        };
        let mut value = serde_json::to_value(body).unwrap_or_default();
        value["status"] = self.status.as_u16().into();
        value
    }

    /// Logs `cause` and answers with a generic 500: the cause may hold paths or SQL.
    pub fn internal(cause: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(cause = %cause, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; it has been logged",
        )
    }

    pub fn invalid_id(err: IdError) -> ApiError {
        let code = if err.to_string().starts_with("user id") {
            "invalid_user_id"
        } else {
            "invalid_server_name"
        };
        ApiError::bad_request(code, err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Detail {
                code: self.code,
                message: &self.message,
                retry_safe: self.retry_safe,
                retry_after_secs: self.retry_after.map(secs),
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(after) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs(after)));
        }
        response.extensions_mut().insert(ErrorCode(self.code));
        response
    }
}

fn secs(after: Duration) -> u64 {
    // Round up: "retry in 0 s" would invite a retry storm.
    after.as_secs() + u64::from(after.subsec_nanos() > 0).max(u64::from(after.is_zero()))
}

// === from pool and credential errors ===

impl From<PoolError> for ApiError {
    fn from(err: PoolError) -> ApiError {
        let code = err.code();
        let err_text = err.to_string();
        match err {
            PoolError::UnknownServer(server) => {
                ApiError::not_found(code, format!("unknown server `{server}`"))
            }
            PoolError::NoCredentials(server) => {
                ApiError::not_found(code, format!("no credentials stored for server `{server}`"))
            }
            PoolError::Credentials(inner) => credential_error(&inner),
            PoolError::PoolFull { retry_after } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                code,
                "too many open MCP sessions; retry later",
            )
            .with_retry_after(retry_after),
            PoolError::CircuitOpen { retry_after } => ApiError::unavailable(
                code,
                "this MCP server keeps crashing; new sessions are refused for a while",
                retry_after,
            ),
            // Nothing was sent to the server: repeating the request cannot run a tool twice.
            PoolError::StartFailed(cause) => {
                tracing::warn!(cause = %cause, "MCP server failed to start");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    code,
                    "the MCP server failed to start",
                )
                .with_retry_safe(true)
            }
            // A configuration problem of this host, not of the caller: the message names the
            // server and the program so the chat app can tell its user what is missing.
            PoolError::ServerProgramNotFound { server, problem } => ApiError::new(
                StatusCode::BAD_GATEWAY,
                code,
                format!(
                    "the MCP server `{server}` cannot start: its {problem} on the mcp-pool host; an operator must install it"
                ),
            )
            .with_retry_safe(true),
            PoolError::TooManyCalls { retry_after } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                code,
                "too many tool calls in flight for this user; retry later",
            )
            .with_retry_after(retry_after),
            PoolError::ArgumentsTooDeep { max } => ApiError::bad_request(
                code,
                format!("the tool arguments nest deeper than {max} levels"),
            ),
            PoolError::ServerCrashed => ApiError::new(
                StatusCode::BAD_GATEWAY,
                code,
                "the MCP server exited during the call; the tool may or may not have run",
            )
            .with_retry_safe(false),
            PoolError::MemoryLimit(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, code, err_text).with_retry_safe(false)
            }
            // The message names what the host lacks: the operator's to fix, no secret in it.
            PoolError::SandboxUnavailable(_) => {
                tracing::error!(cause = %err_text, "MCP server refused to start unconfined");
                ApiError::new(StatusCode::BAD_GATEWAY, code, err_text).with_retry_safe(true)
            }
            PoolError::CallTimeout(after) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                code,
                format!(
                    "the tool call timed out after {}s and was cancelled; it may have run",
                    after.as_secs()
                ),
            )
            .with_retry_safe(false),
            PoolError::UnknownTool(tool) => {
                ApiError::not_found(code, format!("unknown tool `{tool}`"))
            }
            PoolError::Mcp(inner) => mcp_error(&inner),
            // The pool already retried once; the caller may simply try again.
            PoolError::Reconnect => ApiError::unavailable(
                code,
                "the session was closed while the request was made; retry",
                Duration::from_secs(1),
            ),
            PoolError::ShuttingDown => {
                ApiError::unavailable(code, "the service is shutting down", Duration::from_secs(5))
            }
            PoolError::Cluster(cause) => cluster_error(&cause),
            PoolError::Forwarded(remote) => {
                let status =
                    StatusCode::from_u16(remote.status).unwrap_or(StatusCode::BAD_GATEWAY);
                let mut answer = ApiError::new(status, remote.code, remote.message.clone());
                answer.retry_after = remote.retry_after;
                answer.retry_safe = remote.retry_safe;
                answer
            }
            PoolError::Unavailable => {
                tracing::error!("the pool actor is not running");
                ApiError::unavailable(
                    code,
                    "the connection pool is restarting",
                    Duration::from_secs(2),
                )
            }
        }
    }
}

/// Cluster coordination failures: the database or the owning node; all but one are worth a
/// retry, since a failover or a reconnect fixes them.
fn cluster_error(err: &crate::cluster::ClusterError) -> ApiError {
    use crate::cluster::ClusterError;
    let code = err.code();
    match err {
        ClusterError::OwnerLost => {
            ApiError::new(StatusCode::BAD_GATEWAY, code, err.to_string()).with_retry_safe(false)
        }
        ClusterError::Database(cause) => {
            // The cause may hold SQL or a host name: logged, not answered.
            tracing::warn!(cause = %cause, "cluster coordination failed");
            ApiError::unavailable(
                code,
                "cluster coordination is unavailable; retry",
                Duration::from_secs(1),
            )
        }
        ClusterError::BadAnswer(cause) => {
            tracing::warn!(cause = %cause, "another node answered outside the protocol");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                code,
                "another node of the cluster answered unexpectedly",
            )
        }
        ClusterError::Timeout(_)
        | ClusterError::LeasedElsewhere(_)
        | ClusterError::OwnerUnreachable
        | ClusterError::Moving
        | ClusterError::Leaving => {
            ApiError::unavailable(code, err.to_string(), Duration::from_secs(1))
        }
    }
}

/// A JSON-RPC error from the server, or a transport problem during a call.
fn mcp_error(err: &McpError) -> ApiError {
    match err {
        McpError::Server(data) => {
            // The server's message is about the caller's own arguments on the caller's own
            // session: useful, and nobody else's data.
            let message = format!("the MCP server rejected the call: {}", data.message);
            if data.code == rmcp::model::ErrorCode::INVALID_PARAMS {
                ApiError::bad_request("invalid_arguments", message)
            } else if data.code == rmcp::model::ErrorCode::METHOD_NOT_FOUND {
                ApiError::not_found("unknown_tool", message)
            } else {
                ApiError::new(StatusCode::BAD_GATEWAY, "server_error", message)
                    .with_retry_safe(false)
            }
        }
        McpError::Timeout(after) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "call_timeout",
            format!("the MCP server did not answer within {}s", after.as_secs()),
        )
        .with_retry_safe(false),
        McpError::Closed => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_crashed",
            "the MCP server exited during the call; the tool may or may not have run",
        )
        .with_retry_safe(false),
        // The pool retries these itself; one that still gets here never reached the server.
        McpError::NotSent => ApiError::unavailable(
            "reconnect",
            "the session was closed before the request was sent; retry",
            Duration::from_secs(1),
        ),
        McpError::Spawn { .. }
        | McpError::StartupTimeout(_)
        | McpError::Handshake(_)
        | McpError::Registry { .. }
        | McpError::Sandbox(_)
        | McpError::DemoServer(_) => {
            tracing::warn!(cause = %err, "MCP server failed to start");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "server_start_failed",
                "the MCP server failed to start",
            )
            .with_retry_safe(true)
        }
        // The pool maps these to their credential error; one without a cause is a server that
        // still refuses after the one retry the credentials allowed.
        McpError::Unauthorized(Some(cause)) => credential_error(cause),
        McpError::Unauthorized(None) => ApiError::new(
            StatusCode::CONFLICT,
            "reconnect_required",
            "the remote MCP server refused the stored credentials; connect it again",
        ),
        McpError::HttpStatus { status } => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            format!("the remote MCP server answered HTTP {status}"),
        )
        .with_retry_safe(false),
        McpError::Protocol(_) => {
            tracing::warn!(cause = %err, "MCP protocol error");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "server_protocol_error",
                "the MCP server answered with something unexpected",
            )
            .with_retry_safe(false)
        }
    }
}

fn credential_error(err: &CredentialError) -> ApiError {
    match err {
        CredentialError::UnknownServer(server) => {
            ApiError::not_found("unknown_server", format!("unknown server `{server}`"))
        }
        CredentialError::NotFound(server) => ApiError::not_found(
            "no_credentials",
            format!("no credentials stored for server `{server}`"),
        ),
        CredentialError::Store(StoreError::NotFound) => {
            ApiError::not_found("no_credentials", "no credentials stored for this server")
        }
        CredentialError::Store(StoreError::Conflict { .. }) => ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "the credentials were changed concurrently; retry",
        ),
        CredentialError::Store(_) | CredentialError::File { .. } => ApiError::internal(err),
        CredentialError::ReconnectRequired(server) => ApiError::new(
            StatusCode::CONFLICT,
            "reconnect_required",
            format!(
                "the authorization for server `{server}` was revoked or expired; connect it again (POST /v1/oauth/{server}/start)"
            ),
        ),
        CredentialError::RefreshUnavailable(server) => ApiError::unavailable(
            "token_refresh_unavailable",
            format!(
                "the access token for server `{server}` expired and the provider is not answering; retry later"
            ),
            Duration::from_secs(5),
        ),
        CredentialError::RefreshRejected(server) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "token_refresh_failed",
            format!("the provider refused to refresh the access token for server `{server}`"),
        ),
        CredentialError::Unavailable => {
            tracing::error!("the credential actor is not running");
            ApiError::unavailable(
                "credentials_unavailable",
                "the credential store is unavailable",
                Duration::from_secs(5),
            )
        }
    }
}

impl From<CredentialError> for ApiError {
    fn from(err: CredentialError) -> ApiError {
        credential_error(&err)
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> ApiError {
        ApiError::internal(&err)
    }
}

// === from axum's rejections ===

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => payload_too_large(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected `Content-Type: application/json`",
            ),
            _ => match rejection {
                JsonRejection::JsonSyntaxError(_) => {
                    ApiError::bad_request("malformed_json", rejection.body_text())
                }
                _ => ApiError::bad_request("invalid_body", rejection.body_text()),
            },
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> ApiError {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            payload_too_large()
        } else {
            ApiError::bad_request("invalid_body", rejection.body_text())
        }
    }
}

/// A body that may be left empty: `None` for no body (or only whitespace), else JSON of type
/// `T`. Not JSON at all is `malformed_json`; JSON of the wrong shape is `invalid_body`.
pub fn optional_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<Option<T>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body).map(Some).map_err(|err| {
        if err.is_syntax() || err.is_eof() {
            ApiError::bad_request(
                "malformed_json",
                format!("the body is not valid JSON: {err}"),
            )
        } else {
            ApiError::bad_request("invalid_body", err.to_string())
        }
    })
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> ApiError {
        ApiError::bad_request("invalid_path", rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::bad_request("invalid_query", rejection.body_text())
    }
}

pub fn payload_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "the request body is larger than the configured limit",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(secs(Duration::from_millis(1)), 1);
        assert_eq!(secs(Duration::ZERO), 1);
        assert_eq!(secs(Duration::from_secs(5)), 5);
        assert_eq!(secs(Duration::from_millis(5100)), 6);
    }

    #[test]
    fn long_messages_are_cut() {
        let err = ApiError::bad_request("x", "é".repeat(400));
        assert!(err.message().len() <= MAX_MESSAGE + '…'.len_utf8());
    }
}
