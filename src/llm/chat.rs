//! The tool-call loop behind `/v1/chat`.
//!
//! 1. The tools of every server asked for are listed through the pool, concurrently. A server
//!    that cannot provide them (no credentials, fails to start, circuit open, ...) is **skipped**
//!    and reported in [`ChatOutcome::skipped_servers`] (and a [`ChatEvent::ServerSkipped`]): the
//!    chat goes on with the other servers, as a person would rather get an answer that says what
//!    was unavailable than none. Only a pool that is shutting down or gone fails the chat.
//! 2. The model gets the history, the message and the tools (`tool_choice: "auto"`).
//! 3. Each tool call it asks for runs through the pool, concurrently up to
//!    `llm.max_parallel_tool_calls`. The assistant message with its `tool_calls` and one
//!    `role: tool` message per call (in the model's order) are appended. A failed call, an
//!    `is_error` result, invalid argument JSON or an unknown function is fed back to the model
//!    as a JSON error description, never fatal.
//! 4. Repeat until the model answers with text. `llm.max_steps` bounds the number of model
//!    requests: if the answer to the last one still asks for tools, those calls are not run and
//!    the chat fails with [`ChatError::MaxStepsExceeded`], which carries the trace so far. A
//!    partial answer would read as if the question had been answered; the error says it was not.
//!
//! With an event channel the model's answers are streamed and the loop reports as it goes:
//! see [`ChatEvent`] for the order.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use super::client::{Completion, CompletionRequest, LlmClient, LlmError, Message, ToolCall, Usage};
use super::tools::ToolSet;
use crate::actors::{PoolError, PoolHandle};
use crate::store::{ServerName, UserId};

/// Longest tool result handed to the model, in characters; the rest is cut with a note.
pub const MAX_TOOL_RESULT_CHARS: usize = 100_000;
/// Longest error text kept in a trace entry.
const MAX_TRACE_ERROR_CHARS: usize = 2_000;

/// The body of `POST /v1/chat`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// The user's new message (not blank).
    #[schema(pattern = "\\S")]
    pub message: String,
    /// Earlier turns, oldest first.
    #[serde(default)]
    pub history: Vec<HistoryMessage>,
    /// Servers whose tools to offer; `None`: every server the user has connected (the caller
    /// resolves that list and passes it to [`run_chat`]).
    #[serde(default, deserialize_with = "server_names")]
    #[schema(value_type = Option<Vec<ServerName>>)]
    pub servers: Option<Vec<ServerName>>,
    /// Whether the caller wants server-sent events.
    #[serde(default)]
    pub stream: bool,
}

/// One earlier turn of the conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HistoryMessage {
    pub role: HistoryRole,
    pub content: String,
}

/// Who spoke an earlier turn. Tool messages are not part of the history a client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HistoryRole {
    User,
    Assistant,
}

fn server_names<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<ServerName>>, D::Error> {
    let names: Option<Vec<String>> = Option::deserialize(deserializer)?;
    names
        .map(|names| {
            names
                .iter()
                .map(|name| {
                    ServerName::parse(name)
                        .map_err(|err| serde::de::Error::custom(format!("servers: {err}")))
                })
                .collect()
        })
        .transpose()
}

/// One tool call of the loop, as the caller sees it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ToolCallTrace {
    /// The model's tool call id.
    pub id: String,
    /// The model request (1-based) that asked for it.
    pub step: u32,
    /// The function name the model used.
    pub function: String,
    /// `None` when the model named a function that was not offered.
    pub server: Option<ServerName>,
    /// The MCP tool name (for an unknown function: the function name).
    pub tool: String,
    /// The arguments as parsed; the raw string when the model sent invalid JSON.
    #[schema(value_type = Value)]
    pub arguments: Value,
    /// The call failed or the tool reported an error.
    pub is_error: bool,
    pub duration_ms: u64,
    /// Why, when `is_error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<String>,
}

/// A server whose tools were not offered.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SkippedServer {
    pub server: ServerName,
    /// Machine-readable reason, e.g. `no_credentials`, `start_failed`.
    pub code: String,
    pub message: String,
}

/// The result of a chat.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ChatOutcome {
    /// The model's final text.
    pub reply: String,
    /// Every tool call, by step and then in the model's order.
    pub trace: Vec<ToolCallTrace>,
    pub skipped_servers: Vec<SkippedServer>,
    /// Model requests made.
    pub steps: u32,
    /// Token counts summed over the steps, as far as the provider reported them.
    pub usage: Usage,
}

/// What a streaming chat reports, in this order: `server_skipped` (if any), then per step the
/// step's `text_delta`s, then for each tool call `tool_call_started` before its
/// `tool_call_finished` (calls of one step interleave), and last exactly one `done` or `error`.
/// The `text_delta`s of the last step concatenate to `done.reply`; earlier steps' deltas are
/// text the model said alongside its tool calls.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChatEvent {
    ServerSkipped {
        server: ServerName,
        code: String,
        message: String,
    },
    ToolCallStarted {
        id: String,
        server: Option<ServerName>,
        tool: String,
        arguments: Value,
    },
    ToolCallFinished {
        id: String,
        is_error: bool,
        duration_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    TextDelta {
        text: String,
        step: u32,
    },
    Done(ChatOutcome),
    Error {
        code: String,
        message: String,
    },
}

/// Why a chat failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChatError {
    #[error("invalid chat request: {0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Llm(#[from] LlmError),
    #[error("the model was still calling tools after {max_steps} steps; no final answer")]
    MaxStepsExceeded {
        max_steps: u32,
        /// The calls made until then.
        trace: Vec<ToolCallTrace>,
    },
    /// The pool cannot serve anything (shutting down, or not running).
    #[error(transparent)]
    Pool(PoolError),
    /// The event receiver was dropped: the client went away.
    #[error("the chat was abandoned by its client")]
    Cancelled,
}

impl ChatError {
    /// A stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ChatError::InvalidRequest(_) => "invalid_request",
            ChatError::Llm(err) => err.code(),
            ChatError::MaxStepsExceeded { .. } => "max_steps_exceeded",
            ChatError::Pool(err) => err.code(),
            ChatError::Cancelled => "cancelled",
        }
    }
}

/// Errors after which nothing the pool does can succeed.
fn is_fatal(err: &PoolError) -> bool {
    matches!(err, PoolError::ShuttingDown | PoolError::Unavailable)
}

// === run_chat ===

/// Runs one chat for `user` with the tools of `servers` (see the module docs). With `events`,
/// the model's answers are streamed and progress is reported on the channel, ending with
/// `done` or `error`; a dropped receiver ends the chat with [`ChatError::Cancelled`].
#[tracing::instrument(skip_all, fields(user_id = %user))]
pub async fn run_chat(
    llm: &LlmClient,
    pool: &PoolHandle,
    user: &UserId,
    servers: Vec<ServerName>,
    req: ChatRequest,
    events: Option<mpsc::Sender<ChatEvent>>,
) -> Result<ChatOutcome, ChatError> {
    let started = Instant::now();
    let result = chat_loop(llm, pool, user, servers, req, events.as_ref()).await;
    match &result {
        Ok(outcome) => {
            tracing::info!(
                steps = outcome.steps,
                tool_calls = outcome.trace.len(),
                tool_errors = outcome.trace.iter().filter(|t| t.is_error).count(),
                skipped_servers = outcome.skipped_servers.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "chat finished"
            );
            emit(events.as_ref(), ChatEvent::Done(outcome.clone())).await;
        }
        Err(err) => {
            tracing::warn!(code = err.code(), cause = %err, elapsed_ms = started.elapsed().as_millis() as u64, "chat failed");
            emit(
                events.as_ref(),
                ChatEvent::Error {
                    code: err.code().to_owned(),
                    message: err.to_string(),
                },
            )
            .await;
        }
    }
    result
}

async fn chat_loop(
    llm: &LlmClient,
    pool: &PoolHandle,
    user: &UserId,
    servers: Vec<ServerName>,
    req: ChatRequest,
    events: Option<&mpsc::Sender<ChatEvent>>,
) -> Result<ChatOutcome, ChatError> {
    if req.message.trim().is_empty() {
        return Err(ChatError::InvalidRequest(
            "`message` must not be empty".into(),
        ));
    }
    let (tools, skipped_servers) = gather_tools(pool, user, servers, events).await?;
    let mut messages: Vec<Message> = req
        .history
        .into_iter()
        .map(|turn| match turn.role {
            HistoryRole::User => Message::User {
                content: turn.content,
            },
            HistoryRole::Assistant => Message::Assistant {
                content: Some(turn.content),
                tool_calls: Vec::new(),
            },
        })
        .collect();
    messages.push(Message::User {
        content: req.message,
    });
    let mut trace = Vec::new();
    let mut usage = Usage::default();
    let max_steps = llm.max_steps();
    for step in 1..=max_steps {
        let request = CompletionRequest {
            messages: &messages,
            tools: tools.definitions(),
        };
        let completion = match events {
            Some(events) => streamed_completion(llm, request, step, events).await?,
            None => llm.complete(request).await?,
        };
        if let Some(step_usage) = completion.usage {
            usage.add(step_usage);
        }
        tracing::debug!(
            step,
            tool_calls = completion.tool_calls.len(),
            finish_reason = completion.finish_reason.as_deref().unwrap_or(""),
            "model answered"
        );
        if completion.tool_calls.is_empty() {
            let reply = completion.content.unwrap_or_default();
            if reply.is_empty() {
                return Err(LlmError::Malformed(format!(
                    "the model returned neither text nor tool calls (finish_reason {})",
                    completion.finish_reason.as_deref().unwrap_or("missing")
                ))
                .into());
            }
            return Ok(ChatOutcome {
                reply,
                trace,
                skipped_servers,
                steps: step,
                usage,
            });
        }
        if step == max_steps {
            return Err(ChatError::MaxStepsExceeded { max_steps, trace });
        }
        let calls = completion.tool_calls.clone();
        messages.push(Message::Assistant {
            content: completion.content.filter(|text| !text.is_empty()),
            tool_calls: completion.tool_calls,
        });
        let Some(results) = run_tool_calls(
            pool,
            user,
            &tools,
            calls,
            step,
            llm.max_parallel_tool_calls(),
            events,
        )
        .await
        else {
            return Err(ChatError::Cancelled);
        };
        let mut fatal = None;
        for result in results {
            messages.push(Message::Tool {
                tool_call_id: result.trace.id.clone(),
                content: result.content,
            });
            trace.push(result.trace);
            fatal = fatal.or(result.fatal);
        }
        if let Some(err) = fatal {
            return Err(ChatError::Pool(err));
        }
        if events.is_some_and(|events| events.is_closed()) {
            return Err(ChatError::Cancelled);
        }
    }
    // max_steps >= 1 (validated), so the loop returned; this is for a zero from elsewhere.
    Err(ChatError::MaxStepsExceeded { max_steps, trace })
}

/// Sends an event; false when the receiver is gone.
async fn emit(events: Option<&mpsc::Sender<ChatEvent>>, event: ChatEvent) -> bool {
    match events {
        Some(events) => events.send(event).await.is_ok(),
        None => true,
    }
}

async fn streamed_completion(
    llm: &LlmClient,
    request: CompletionRequest<'_>,
    step: u32,
    events: &mpsc::Sender<ChatEvent>,
) -> Result<Completion, ChatError> {
    let mut stream = llm.complete_stream(request).await?;
    while let Some(text) = stream.next_text().await? {
        if !emit(Some(events), ChatEvent::TextDelta { text, step }).await {
            return Err(ChatError::Cancelled);
        }
    }
    Ok(stream.finish().await?)
}

/// Lists the tools of each server concurrently; servers that fail are skipped.
async fn gather_tools(
    pool: &PoolHandle,
    user: &UserId,
    servers: Vec<ServerName>,
    events: Option<&mpsc::Sender<ChatEvent>>,
) -> Result<(ToolSet, Vec<SkippedServer>), ChatError> {
    let mut unique = Vec::with_capacity(servers.len());
    for server in servers {
        if !unique.contains(&server) {
            unique.push(server);
        }
    }
    // No bound of its own: cold starts already queue for `pool.max_concurrent_starts`.
    let listed = pool.list_tools_of(user, &unique, unique.len()).await;
    let mut available = Vec::new();
    let mut skipped = Vec::new();
    for (server, result) in unique.into_iter().zip(listed) {
        match result {
            Ok(tools) => available.push((server, tools)),
            Err(err) if is_fatal(&err) => return Err(ChatError::Pool(err)),
            Err(err) => {
                tracing::warn!(server = %server, code = err.code(), cause = %err, "skipping a server in chat: no tools");
                skipped.push(SkippedServer {
                    server,
                    code: err.code().to_owned(),
                    message: err.to_string(),
                });
            }
        }
    }
    for skip in &skipped {
        let event = ChatEvent::ServerSkipped {
            server: skip.server.clone(),
            code: skip.code.clone(),
            message: skip.message.clone(),
        };
        if !emit(events, event).await {
            return Err(ChatError::Cancelled);
        }
    }
    let tools = ToolSet::build(
        available
            .iter()
            .map(|(server, tools)| (server, tools.as_slice())),
    );
    Ok((tools, skipped))
}

/// The outcome of one tool call: its trace, the `role: tool` content, and a pool error after
/// which the chat cannot go on.
struct CallResult {
    trace: ToolCallTrace,
    content: String,
    fatal: Option<PoolError>,
}

/// Runs a step's tool calls concurrently (at most `parallel` at once); results come back in
/// the model's order. `None` when the streaming client went away meanwhile (the calls still
/// running were cancelled).
async fn run_tool_calls(
    pool: &PoolHandle,
    user: &UserId,
    tools: &ToolSet,
    calls: Vec<ToolCall>,
    step: u32,
    parallel: usize,
    events: Option<&mpsc::Sender<ChatEvent>>,
) -> Option<Vec<CallResult>> {
    let permits = Arc::new(Semaphore::new(parallel.max(1)));
    let mut tasks = JoinSet::new();
    let count = calls.len();
    for (index, call) in calls.into_iter().enumerate() {
        let route = tools.route(&call.function.name).cloned();
        let (pool, user, permits) = (pool.clone(), user.clone(), permits.clone());
        let events = events.cloned();
        tasks.spawn(async move {
            // The semaphore is never closed; a failed acquire would only mean no bound.
            let _permit = permits.acquire_owned().await.ok();
            let result = run_one(&pool, &user, route, call, step, events.as_ref()).await;
            (index, result)
        });
    }
    let mut results: Vec<Option<CallResult>> = (0..count).map(|_| None).collect();
    loop {
        let joined = match events {
            // A streaming client that went away cancels the calls still running: dropping
            // them sends `notifications/cancelled` to their servers, instead of letting a
            // long tool run on for nobody.
            Some(events) => tokio::select! {
                joined = tasks.join_next() => joined,
                () = events.closed() => {
                    tasks.abort_all();
                    return None;
                }
            },
            None => tasks.join_next().await,
        };
        let Some(joined) = joined else { break };
        match joined {
            Ok((index, result)) => results[index] = Some(result),
            Err(err) => tracing::error!(cause = %err, "a tool call task panicked"),
        }
    }
    Some(results.into_iter().flatten().collect())
}

async fn run_one(
    pool: &PoolHandle,
    user: &UserId,
    route: Option<super::tools::ToolRoute>,
    call: ToolCall,
    step: u32,
    events: Option<&mpsc::Sender<ChatEvent>>,
) -> CallResult {
    let parsed = parse_arguments(&call.function.arguments);
    let arguments = match &parsed {
        Ok(Some(map)) => Value::Object(map.clone()),
        Ok(None) => json!({}),
        Err(_) => Value::String(call.function.arguments.clone()),
    };
    let (server, tool) = match &route {
        Some(route) => (Some(route.server.clone()), route.tool.clone()),
        None => (None, call.function.name.clone()),
    };
    emit(
        events,
        ChatEvent::ToolCallStarted {
            id: call.id.clone(),
            server: server.clone(),
            tool: tool.clone(),
            arguments: arguments.clone(),
        },
    )
    .await;
    let started = Instant::now();
    let mut fatal = None;
    let (content, error) = match (&route, parsed) {
        (None, _) => failure(
            "unknown_function",
            &format!("no function named `{}` was offered", call.function.name),
        ),
        (Some(_), Err(problem)) => failure("invalid_arguments", &problem),
        (Some(route), Ok(arguments)) => {
            tracing::debug!(server = %route.server, tool = %route.tool, "chat tool call");
            match pool
                .call_tool(user, &route.server, &route.tool, arguments)
                .await
            {
                Ok(result) if result.is_error == Some(true) => {
                    let text = result_text(&result);
                    let content = json!({ "is_error": true, "error": text }).to_string();
                    (truncate(content, MAX_TOOL_RESULT_CHARS), Some(text))
                }
                Ok(result) => (truncate(result_text(&result), MAX_TOOL_RESULT_CHARS), None),
                Err(err) => {
                    let outcome = failure(err.code(), &err.to_string());
                    if is_fatal(&err) {
                        fatal = Some(err);
                    }
                    outcome
                }
            }
        }
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    let error = error.map(|text| truncate(text, MAX_TRACE_ERROR_CHARS));
    let is_error = error.is_some();
    emit(
        events,
        ChatEvent::ToolCallFinished {
            id: call.id.clone(),
            is_error,
            duration_ms,
            error: error.clone(),
        },
    )
    .await;
    CallResult {
        trace: ToolCallTrace {
            id: call.id,
            step,
            function: call.function.name,
            server,
            tool,
            arguments,
            is_error,
            duration_ms,
            error,
        },
        content,
        fatal,
    }
}

/// The `role: tool` content and trace error of a call that did not reach the tool or failed.
fn failure(code: &str, message: &str) -> (String, Option<String>) {
    let content = json!({ "is_error": true, "code": code, "error": message }).to_string();
    (content, Some(message.to_owned()))
}

/// The model's argument string as a JSON object. Empty means no arguments (some models send
/// `""` for tools without parameters).
fn parse_arguments(raw: &str) -> Result<Option<serde_json::Map<String, Value>>, String> {
    if raw.trim().is_empty() {
        return Ok(None);
    }
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(Value::Null) => Ok(None),
        Ok(other) => Err(format!(
            "arguments must be a JSON object, got {}",
            match other {
                Value::Array(_) => "an array",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                _ => "a boolean",
            }
        )),
        Err(err) => Err(format!("arguments are not valid JSON: {err}")),
    }
}

/// The text of an MCP result: text blocks and text resources joined by newlines, other blocks
/// described; the structured content when there is no text at all.
pub fn result_text(result: &rmcp::model::CallToolResult) -> String {
    use rmcp::model::{ContentBlock, ResourceContents};
    let parts: Vec<String> = result
        .content
        .iter()
        .map(|block| match block {
            ContentBlock::Text(text) => text.text.clone(),
            ContentBlock::Image(image) => format!("[image: {}]", image.mime_type),
            ContentBlock::Audio(audio) => format!("[audio: {}]", audio.mime_type),
            ContentBlock::Resource(resource) => match &resource.resource {
                ResourceContents::TextResourceContents { text, .. } => text.clone(),
                ResourceContents::BlobResourceContents { uri, .. } => {
                    format!("[binary resource: {uri}]")
                }
                _ => "[resource]".to_owned(),
            },
            ContentBlock::ResourceLink(link) => format!("[resource link: {}]", link.uri),
            _ => "[unsupported content]".to_owned(),
        })
        .collect();
    let text = parts.join("\n");
    match &result.structured_content {
        Some(structured) if text.is_empty() => structured.to_string(),
        _ => text,
    }
}

fn truncate(text: String, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => {
            let dropped = text[cut..].chars().count();
            format!("{}… [truncated {dropped} characters]", &text[..cut])
        }
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::{CallToolResult, ContentBlock};

    #[test]
    fn arguments_parse_leniently_but_never_guess() {
        assert_eq!(parse_arguments(""), Ok(None));
        assert_eq!(parse_arguments("null"), Ok(None));
        let map = parse_arguments(r#"{"a": 1}"#).unwrap().unwrap();
        assert_eq!(map["a"], 1);
        assert!(parse_arguments("[1]").unwrap_err().contains("an array"));
        assert!(
            parse_arguments("{\"a\":")
                .unwrap_err()
                .contains("not valid JSON")
        );
    }

    #[test]
    fn result_text_joins_blocks_and_falls_back_to_structured_content() {
        let result = CallToolResult::success(vec![
            ContentBlock::text("one"),
            ContentBlock::image("AAAA", "image/png"),
            ContentBlock::text("two"),
        ]);
        assert_eq!(result_text(&result), "one\n[image: image/png]\ntwo");
        let structured = CallToolResult::structured(json!({"n": 3}));
        assert!(result_text(&structured).contains("\"n\":3"));
    }

    #[test]
    fn long_text_is_truncated_on_a_character_boundary() {
        assert_eq!(truncate("héllo".into(), 10), "héllo");
        assert_eq!(truncate("héllo".into(), 2), "hé… [truncated 3 characters]");
    }

    #[test]
    fn chat_requests_deserialize_strictly() {
        let req: ChatRequest = serde_json::from_value(json!({
            "message": "hi",
            "history": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "servers": ["demo", "demo2"],
            "stream": true,
        }))
        .unwrap();
        assert_eq!(req.servers.unwrap().len(), 2);
        assert_eq!(req.history[1].role, HistoryRole::Assistant);
        assert!(req.stream);
        for bad in [
            json!({"message": "hi", "servers": ["../x"]}),
            json!({"message": "hi", "history": [{"role": "tool", "content": "x"}]}),
            json!({"message": "hi", "user_id": "bob"}),
        ] {
            assert!(
                serde_json::from_value::<ChatRequest>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn events_are_tagged_by_type() {
        let event = ChatEvent::TextDelta {
            text: "hi".into(),
            step: 1,
        };
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            json!({"type": "text_delta", "text": "hi", "step": 1})
        );
        let done = ChatEvent::Done(ChatOutcome {
            reply: "r".into(),
            trace: vec![],
            skipped_servers: vec![],
            steps: 1,
            usage: Usage::default(),
        });
        let value = serde_json::to_value(&done).unwrap();
        assert_eq!(value["type"], "done");
        assert_eq!(value["reply"], "r");
    }
}
