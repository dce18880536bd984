//! `/v1/connections/{server}/tools`: the cached tool list and tool calls on the caller's session.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::HeaderMap;
use axum::http::header::ACCEPT;
use axum::http::request::Parts;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

use super::error::{ApiError, optional_json};
use super::openapi::{ErrorBody, SessionErrors, UserAuthErrors};
use super::{AuthUser, HttpState, ServerParam, path_param};
use crate::actors::fairness::{MAX_ARGUMENT_DEPTH, arguments_depth};
use crate::actors::{CallOptions, PoolError};
use crate::mcp::Progress;
use crate::store::ServerName;

/// Progress notifications held for a slow streaming client before newer ones are dropped (the
/// session never waits for a caller's sink).
const PROGRESS_BUFFER: usize = 64;

/// Longest accepted tool name (MCP sets none; this only bounds what we log and look up).
const MAX_TOOL_NAME: usize = 256;

/// The `{tool}` path parameter.
#[derive(Debug, Clone)]
pub struct ToolParam(pub String);

impl FromRequestParts<HttpState> for ToolParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ApiError> {
        let tool = path_param(parts, state, "tool").await?;
        // Characters, not bytes: the same count as the documented `maxLength`.
        if tool.is_empty()
            || tool.chars().count() > MAX_TOOL_NAME
            || tool.chars().any(char::is_control)
        {
            return Err(ApiError::bad_request(
                "invalid_tool_name",
                format!("a tool name has 1 to {MAX_TOOL_NAME} printable characters"),
            ));
        }
        Ok(ToolParam(tool))
    }
}

/// A tool as listed to callers (snake_case; schemas as the server sent them).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ToolView {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub description: Option<String>,
    /// The tool's JSON Schema for its arguments.
    #[schema(value_type = Object)]
    pub input_schema: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>, nullable = false)]
    pub output_schema: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>, nullable = false)]
    pub annotations: Option<serde_json::Value>,
}

impl From<&rmcp::model::Tool> for ToolView {
    fn from(tool: &rmcp::model::Tool) -> ToolView {
        ToolView {
            name: tool.name.to_string(),
            title: tool.title.clone(),
            description: tool.description.as_ref().map(|d| d.to_string()),
            input_schema: serde_json::Value::Object((*tool.input_schema).clone()),
            output_schema: tool
                .output_schema
                .as_ref()
                .map(|s| serde_json::Value::Object((**s).clone())),
            annotations: tool
                .annotations
                .as_ref()
                .and_then(|a| serde_json::to_value(a).ok()),
        }
    }
}

/// Body of `GET /v1/connections/{server}/tools`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ToolList {
    pub server: ServerName,
    pub tools: Vec<ToolView>,
}

/// `GET /v1/connections/{server}/tools`: starts the session if none is live.
#[utoipa::path(
    get, path = "/v1/connections/{server}/tools", operation_id = "list_tools", tag = "tools",
    security(("bearer" = [])),
    params(("server" = ServerName, Path, description = "A configured server")),
    responses(
        (status = 200, description = "The server's tools (from the session's cache)", body = ToolList),
        (status = 400, description = "`missing_user_id`, `invalid_user_id`, `duplicate_header` or `invalid_server_name`", body = ErrorBody),
        UserAuthErrors,
        (status = 404, description = "`unknown_server` or `no_credentials`", body = ErrorBody),
        SessionErrors,
    )
)]
pub async fn list(
    State(state): State<HttpState>,
    AuthUser(user): AuthUser,
    ServerParam(server): ServerParam,
) -> Result<Json<ToolList>, ApiError> {
    let tools = state.pool.list_tools(&user, &server).await?;
    Ok(Json(ToolList {
        server,
        tools: tools.iter().map(ToolView::from).collect(),
    }))
}

/// Result of a tool call.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct CallResponse {
    /// MCP content blocks, as the server sent them (`{"type": "text", "text": ...}`, ...).
    #[schema(value_type = Vec<Object>)]
    pub content: serde_json::Value,
    /// The tool itself reported a failure (the call reached it and returned).
    pub is_error: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>, nullable = false)]
    pub structured_content: Option<serde_json::Value>,
    /// Time spent in the pool, including a session start when none was live.
    pub duration_ms: u64,
}

/// `POST /v1/connections/{server}/tools/{tool}/call`: the body is the arguments object (an
/// empty body means no arguments). With `Accept: text/event-stream` the answer is a stream of
/// server-sent events: the server's `progress` notifications as they come, then one `result`
/// (or `error`).
#[utoipa::path(
    post, path = "/v1/connections/{server}/tools/{tool}/call", operation_id = "call_tool", tag = "tools",
    security(("bearer" = [])),
    params(
        ("server" = ServerName, Path, description = "A configured server"),
        ("tool" = String, Path, description = "The tool's name: 1 to 256 characters, no control characters", min_length = 1, max_length = 256, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$"),
    ),
    request_body(content = Object, description = "The tool's arguments (nested at most 64 levels); an empty body means none", content_type = "application/json"),
    responses(
        (status = 200, description = "The MCP result (`is_error` when the tool itself failed); with `Accept: text/event-stream`, server-sent events instead: `progress` as the server reports it, then `result` or `error` (whose data carries the status the call would have had)",
            content(
                (CallResponse = "application/json"),
                (super::openapi::ToolCallStreamEvent = "text/event-stream"),
            )),
        (status = 400, description = "`malformed_json`, `invalid_body`, `arguments_too_deep`, `invalid_tool_name`, `invalid_arguments` (the server refused them), `missing_user_id`, `invalid_user_id`, `duplicate_header` or `invalid_server_name`", body = ErrorBody),
        UserAuthErrors,
        (status = 404, description = "`unknown_server`, `no_credentials` or `unknown_tool`", body = ErrorBody),
        (status = 413, description = "Body larger than http.max_body_bytes", body = ErrorBody),
        SessionErrors,
    )
)]
pub async fn call(
    State(state): State<HttpState>,
    AuthUser(user): AuthUser,
    ServerParam(server): ServerParam,
    ToolParam(tool): ToolParam,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arguments = parse_arguments(&body?)?;
    if wants_event_stream(&headers) {
        return Ok(stream_call(state, user, server, tool, arguments));
    }
    let started = Instant::now();
    let result = state.pool.call_tool(&user, &server, &tool, arguments).await;
    Ok(Json(call_response(result?, started.elapsed())?).into_response())
}

/// Whether the caller asked for server-sent events (a plain `*/*` or JSON client did not).
pub(super) fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|media| {
            media
                .split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}

fn call_response(
    result: rmcp::model::CallToolResult,
    elapsed: Duration,
) -> Result<CallResponse, ApiError> {
    let content = serde_json::to_value(&result.content).map_err(|e| ApiError::internal(&e))?;
    Ok(CallResponse {
        content,
        is_error: result.is_error.unwrap_or(false),
        structured_content: result.structured_content,
        duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
    })
}

/// The call on the same path as the JSON answer (`PoolHandle::call_tool_with`, as `/mcp`), its
/// progress sent on as events.
fn stream_call(
    state: HttpState,
    user: crate::store::UserId,
    server: ServerName,
    tool: String,
    arguments: Option<serde_json::Map<String, serde_json::Value>>,
) -> Response {
    let pool = state.pool.clone();
    progress_events(state, move |options| async move {
        let started = Instant::now();
        let result = pool
            .call_tool_with(&user, &server, &tool, arguments, options)
            .await?;
        let response = call_response(result, started.elapsed())?;
        serde_json::to_value(response).map_err(|err| ApiError::internal(&err))
    })
}

/// Server-sent events of a call: `progress` as the server reports it, then `result` (what
/// `call` answered) or `error` (counted like the same error answered in JSON). A client that
/// goes away cancels the call: the task notices the closed stream and drops the call, which
/// sends the server `notifications/cancelled`. Also the answer of a call forwarded from
/// another node (`/internal/v1/tools/call`).
pub(super) fn progress_events<F, Fut>(state: HttpState, call: F) -> Response
where
    F: FnOnce(CallOptions) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<serde_json::Value, ApiError>> + Send,
{
    let (events, receiver) = tokio::sync::mpsc::channel::<(&'static str, serde_json::Value)>(8);
    tokio::spawn(async move {
        let (sink, mut progress) = tokio::sync::mpsc::channel::<Progress>(PROGRESS_BUFFER);
        let call = call(CallOptions {
            progress: Some(sink),
        });
        tokio::pin!(call);
        let step_event =
            |step: Progress| ("progress", serde_json::to_value(step).unwrap_or_default());
        let answer = loop {
            tokio::select! {
                // Progress first: a notification that came before the answer is sent before it.
                biased;
                Some(step) = progress.recv() => {
                    if events.send(step_event(step)).await.is_err() {
                        return;
                    }
                }
                answer = &mut call => break answer,
                () = events.closed() => return,
            }
        };
        while let Ok(step) = progress.try_recv() {
            let _ = events.send(step_event(step)).await;
        }
        let last = match answer {
            Ok(result) => ("result", result),
            Err(err) => {
                state.count_error(err.code(), err.status());
                ("error", err.stream_event())
            }
        };
        let _ = events.send(last).await;
    });
    let stream = ReceiverStream::new(receiver).map(|(name, data)| {
        Ok::<Event, Infallible>(Event::default().event(name).data(data.to_string()))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn parse_arguments(
    body: &[u8],
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, ApiError> {
    match optional_json::<serde_json::Value>(body)? {
        None => Ok(None),
        Some(serde_json::Value::Object(map)) => {
            // Checked here too (the pool checks every caller) so the refusal comes before any
            // token refresh or session start.
            if arguments_depth(Some(&map)) > MAX_ARGUMENT_DEPTH {
                return Err(PoolError::ArgumentsTooDeep {
                    max: MAX_ARGUMENT_DEPTH,
                }
                .into());
            }
            Ok(Some(map))
        }
        Some(_) => Err(ApiError::bad_request(
            "invalid_body",
            "the body must be a JSON object of tool arguments",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_arguments;

    #[test]
    fn arguments_must_be_an_object() {
        assert!(parse_arguments(b"").unwrap().is_none());
        assert!(parse_arguments(b" \n").unwrap().is_none());
        assert_eq!(parse_arguments(br#"{"a":1}"#).unwrap().unwrap().len(), 1);
        assert_eq!(parse_arguments(b"[1]").unwrap_err().code(), "invalid_body");
        assert_eq!(parse_arguments(b"{").unwrap_err().code(), "malformed_json");
        let nest = |levels: usize| {
            format!(
                "{{\"a\":{}1{}}}",
                "[".repeat(levels - 1),
                "]".repeat(levels - 1)
            )
        };
        assert!(parse_arguments(nest(64).as_bytes()).is_ok());
        let err = parse_arguments(nest(65).as_bytes()).unwrap_err();
        assert_eq!(
            (err.status().as_u16(), err.code()),
            (400, "arguments_too_deep")
        );
    }
}
