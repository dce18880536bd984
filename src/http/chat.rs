//! `POST /v1/chat`: the caller's message, their tools, an OpenAI-compatible model and its
//! tool-call loop (see [`crate::llm::chat`]). JSON by default; server-sent events with
//! `"stream": true`.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

use super::error::ApiError;
use super::openapi::{ErrorBody, UserAuthErrors};
use super::{AuthUser, HttpState};
use crate::llm::ChatOutcome;
use crate::llm::{ChatError, ChatEvent, ChatRequest, run_chat};
use crate::store::ServerName;

/// Events buffered between the loop and a slow SSE reader before the loop waits.
const EVENT_BUFFER: usize = 64;

impl From<ChatError> for ApiError {
    fn from(err: ChatError) -> ApiError {
        match err {
            ChatError::InvalidRequest(message) => ApiError::bad_request("invalid_request", message),
            ChatError::Llm(err) => {
                let status = if err.code() == "llm_timeout" {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::BAD_GATEWAY
                };
                ApiError::new(status, err.code(), err.to_string())
            }
            ChatError::MaxStepsExceeded { .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "max_steps_exceeded",
                err.to_string(),
            ),
            ChatError::Pool(err) => err.into(),
            ChatError::Cancelled => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "cancelled",
                "the chat was cancelled",
            ),
        }
    }
}

/// The servers a chat may use: the ones asked for (each must be configured), or every server
/// the caller has active credentials for.
async fn chat_servers(
    state: &HttpState,
    user: &crate::store::UserId,
    asked: Option<&[ServerName]>,
) -> Result<Vec<ServerName>, ApiError> {
    match asked {
        Some(servers) => {
            for server in servers {
                if state.config.server(server).is_none() {
                    return Err(ApiError::not_found(
                        "unknown_server",
                        format!("unknown server `{server}`"),
                    ));
                }
            }
            let mut servers = servers.to_vec();
            servers.dedup();
            Ok(servers)
        }
        None => Ok(state
            .store
            .list(Some(user), false)
            .await?
            .into_iter()
            .map(|info| info.server_name)
            .filter(|server| state.config.server(server).is_some())
            .collect()),
    }
}

/// `POST /v1/chat`.
#[utoipa::path(
    post, path = "/v1/chat", operation_id = "chat", tag = "chat",
    security(("bearer" = [])),
    request_body = ChatRequest,
    responses(
        (status = 200, description = "The final reply with a trace of tool calls; with `stream: true`, server-sent events instead (`server_skipped`, `text_delta`, `tool_call_started`, `tool_call_finished`, then `done` or `error`)",
            content(
                (ChatOutcome = "application/json"),
                (super::openapi::ChatStreamEvent = "text/event-stream"),
            )),
        (status = 400, description = "`malformed_json`, `invalid_body`, `invalid_request`, `missing_user_id`, `invalid_user_id` or `duplicate_header`", body = ErrorBody),
        UserAuthErrors,
        (status = 404, description = "`unknown_server` in `servers`", body = ErrorBody),
        (status = 413, description = "Body larger than http.max_body_bytes", body = ErrorBody),
        (status = 415, description = "Not `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "`max_steps_exceeded`: the model was still calling tools after llm.max_steps", body = ErrorBody),
        (status = 502, description = "The LLM endpoint failed", body = ErrorBody),
        (status = 503, description = "`llm_unavailable`, `cancelled`, `shutting_down`, `pool_unavailable` or `too_many_connections`", body = ErrorBody, headers(("Retry-After" = u64))),
        (status = 504, description = "`llm_timeout` or `request_timeout`", body = ErrorBody),
    )
)]
pub async fn chat(
    State(state): State<HttpState>,
    AuthUser(user): AuthUser,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body?;
    state.metrics.chat_request();
    let Some(llm) = state.llm.clone() else {
        return Err(ApiError::unavailable(
            "llm_unavailable",
            "no language model is configured",
            Duration::from_secs(60),
        ));
    };
    let servers = chat_servers(&state, &user, request.servers.as_deref()).await?;
    if !request.stream {
        let outcome = run_chat(&llm, &state.pool, &user, servers, request, None).await?;
        return Ok(Json(outcome).into_response());
    }
    let (events, receiver) = tokio::sync::mpsc::channel::<ChatEvent>(EVENT_BUFFER);
    let pool = state.pool.clone();
    // The loop ends on its own: with Done or Error, or with Cancelled once the client goes
    // away and the receiver is dropped.
    tokio::spawn(async move {
        let _ = run_chat(&llm, &pool, &user, servers, request, Some(events)).await;
    });
    let stream = ReceiverStream::new(receiver).map(|event| {
        let data = serde_json::to_value(&event).unwrap_or_default();
        let name = data["type"].as_str().unwrap_or("message").to_owned();
        Ok::<Event, Infallible>(Event::default().event(name).data(data.to_string()))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
