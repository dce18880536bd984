//! A client of the OpenAI-compatible chat-completions API (`POST {base_url}/chat/completions`):
//! function tools, parallel tool calls, and streamed answers (server-sent events).
//!
//! It speaks only the part of the wire format that OpenAI, vLLM, llama.cpp and Ollama share.
//! The API key never leaves this module except in the `Authorization` header: errors carry the
//! provider's message with the key scrubbed out, and nothing here logs message contents.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::LlmConfig;
use crate::store::Secret;

/// Longest provider error message kept in an [`LlmError`].
const MAX_PROVIDER_MESSAGE: usize = 500;

/// Why a chat-completions request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    /// The API answered with a non-success status; `message` is the provider's own words.
    #[error("LLM API returned HTTP {status}: {message}")]
    Status { status: u16, message: String },
    /// The provider reported an error inside a 200 stream.
    #[error("LLM API reported an error: {message}")]
    Provider { message: String },
    #[error("LLM API did not answer within {0:?}")]
    Timeout(Duration),
    /// Connection refused, reset, TLS failure, ...
    #[error("cannot reach the LLM API: {0}")]
    Transport(String),
    #[error("malformed LLM API response: {0}")]
    Malformed(String),
    /// The HTTP client could not be built (TLS setup).
    #[error("cannot set up the LLM client: {0}")]
    Setup(String),
}

impl LlmError {
    /// A stable, machine-readable code for API responses and SSE error events.
    pub fn code(&self) -> &'static str {
        match self {
            LlmError::Status { status: 401, .. } | LlmError::Status { status: 403, .. } => {
                "llm_unauthorized"
            }
            LlmError::Status { status: 429, .. } => "llm_rate_limited",
            LlmError::Status { .. } | LlmError::Provider { .. } => "llm_error",
            LlmError::Timeout(_) => "llm_timeout",
            LlmError::Transport(_) => "llm_unreachable",
            LlmError::Malformed(_) => "llm_malformed_response",
            LlmError::Setup(_) => "llm_setup",
        }
    }
}

// === wire format ===

/// One chat message in OpenAI's format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Message {
    System {
        content: String,
    },
    User {
        content: String,
    },
    Assistant {
        /// Text; `null` when the message only carries tool calls.
        content: Option<String>,
        /// The tool calls the model asked for; omitted when there are none.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<ToolCall>,
    },
    Tool {
        /// The `id` of the [`ToolCall`] this answers.
        tool_call_id: String,
        content: String,
    },
}

/// A function call requested by the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Chosen by the provider; the `role: tool` answer must quote it.
    pub id: String,
    /// Always `"function"`.
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCall,
}

/// Name and arguments of a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// A JSON object as a string, exactly as the model produced it (possibly invalid JSON).
    #[serde(default)]
    pub arguments: String,
}

fn function_type() -> String {
    "function".to_owned()
}

/// A tool offered to the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolDefinition {
    /// Always `"function"`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDefinition,
}

/// The function part of a [`ToolDefinition`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDefinition {
    /// Matches `^[a-zA-Z0-9_-]{1,64}$`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema of `"type": "object"`.
    pub parameters: Value,
}

impl ToolDefinition {
    pub fn function(name: String, description: Option<String>, parameters: Value) -> Self {
        ToolDefinition {
            kind: function_type(),
            function: FunctionDefinition {
                name,
                description,
                parameters,
            },
        }
    }
}

/// What one model request sends; the model name comes from the config.
#[derive(Debug, Clone, Copy)]
pub struct CompletionRequest<'a> {
    pub messages: &'a [Message],
    /// Offered with `tool_choice: "auto"`; when empty, neither field is sent.
    pub tools: &'a [ToolDefinition],
}

/// Token counts, as far as the provider reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

impl Usage {
    pub fn add(&mut self, other: Usage) {
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.total_tokens += other.total_tokens;
    }
}

/// The model's answer to one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    /// Text, if any (it may come together with tool calls).
    pub content: Option<String>,
    /// Tool calls, in the model's order.
    pub tool_calls: Vec<ToolCall>,
    /// `stop`, `tool_calls`, `length`, ... when the provider says.
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: &'a [Message],
    #[serde(skip_serializing_if = "<[ToolDefinition]>::is_empty")]
    tools: &'a [ToolDefinition],
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'static str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    choices: Vec<WireChunkChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct WireChunkChoice {
    #[serde(default)]
    delta: WireDelta,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Default, Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCallDelta>>,
}

#[derive(Deserialize)]
struct WireToolCallDelta {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<WireFunctionDelta>,
}

#[derive(Deserialize)]
struct WireFunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

// === LlmClient ===

/// The chat-completions client; cheap to clone (one connection pool).
#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    /// `{base_url}/chat/completions`.
    endpoint: String,
    model: String,
    api_key: Option<Secret>,
    timeout: Duration,
    max_steps: u32,
    max_parallel_tool_calls: usize,
}

impl std::fmt::Debug for LlmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmClient")
            .field("endpoint", &self.endpoint)
            .field("model", &self.model)
            .field("api_key", &self.api_key)
            .finish_non_exhaustive()
    }
}

impl LlmClient {
    /// A client with the API key read from the environment variable `config.api_key_env`
    /// (unset or empty: no `Authorization` header).
    pub fn from_config(config: &LlmConfig) -> Result<LlmClient, LlmError> {
        let api_key = std::env::var(&config.api_key_env)
            .ok()
            .filter(|key| !key.trim().is_empty())
            .map(Secret::new);
        LlmClient::new(config, api_key)
    }

    /// A client with an explicit key (tests, or a key from elsewhere).
    pub fn new(config: &LlmConfig, api_key: Option<Secret>) -> Result<LlmClient, LlmError> {
        // reqwest is built without a default rustls provider (it would pull aws-lc-rs); ring is
        // the process default unless something installed another one first, which is fine too.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .user_agent(concat!("mcp-pool/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| LlmError::Setup(err.without_url().to_string()))?;
        Ok(LlmClient {
            http,
            endpoint: format!("{}/chat/completions", config.base_url.trim_end_matches('/')),
            model: config.model.clone(),
            api_key,
            timeout: config.timeout,
            max_steps: config.max_steps,
            max_parallel_tool_calls: config.max_parallel_tool_calls,
        })
    }

    /// The `POST` target.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// Model requests per chat (`llm.max_steps`).
    pub fn max_steps(&self) -> u32 {
        self.max_steps
    }

    /// Concurrent tool calls per step (`llm.max_parallel_tool_calls`).
    pub fn max_parallel_tool_calls(&self) -> usize {
        self.max_parallel_tool_calls
    }

    /// One request, answered as a whole.
    pub async fn complete(&self, request: CompletionRequest<'_>) -> Result<Completion, LlmError> {
        let work = async {
            let response = self.send(request, false).await?;
            let body = response.bytes().await.map_err(|err| self.transport(err))?;
            parse_completion(&body)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| LlmError::Timeout(self.timeout))?
    }

    /// One request with `stream: true`. Read text with [`CompletionStream::next_text`], then
    /// take the assembled answer with [`CompletionStream::finish`].
    pub async fn complete_stream(
        &self,
        request: CompletionRequest<'_>,
    ) -> Result<CompletionStream, LlmError> {
        let response = tokio::time::timeout(self.timeout, self.send(request, true))
            .await
            .map_err(|_| LlmError::Timeout(self.timeout))??;
        Ok(CompletionStream {
            response,
            timeout: self.timeout,
            api_key: self.api_key.clone(),
            parser: crate::sse::SseParser::default(),
            assembler: Assembler::default(),
            pending: std::collections::VecDeque::new(),
            done: false,
        })
    }

    async fn send(
        &self,
        request: CompletionRequest<'_>,
        stream: bool,
    ) -> Result<reqwest::Response, LlmError> {
        let body = WireRequest {
            model: &self.model,
            messages: request.messages,
            tools: request.tools,
            tool_choice: (!request.tools.is_empty()).then_some("auto"),
            stream,
        };
        let mut builder = self.http.post(&self.endpoint).json(&body);
        if stream {
            builder = builder.header(reqwest::header::ACCEPT, "text/event-stream");
        }
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key.expose());
        }
        tracing::debug!(
            model = %self.model,
            messages = request.messages.len(),
            tools = request.tools.len(),
            stream,
            "chat-completions request"
        );
        let response = builder.send().await.map_err(|err| self.transport(err))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        // The error body is small; a slow one is cut off by the caller's timeout.
        let body = response.bytes().await.unwrap_or_default();
        Err(LlmError::Status {
            status: status.as_u16(),
            message: provider_message(&body, self.api_key.as_ref())
                .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned()),
        })
    }

    fn transport(&self, err: reqwest::Error) -> LlmError {
        transport_error(err, self.timeout)
    }
}

fn transport_error(err: reqwest::Error, timeout: Duration) -> LlmError {
    if err.is_timeout() {
        return LlmError::Timeout(timeout);
    }
    if err.is_decode() || err.is_body() {
        return LlmError::Malformed(error_chain(&err.without_url()));
    }
    LlmError::Transport(error_chain(&err.without_url()))
}

/// The error and its sources: reqwest's top-level message alone ("error sending request")
/// hides the useful part ("connection refused").
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn parse_completion(body: &[u8]) -> Result<Completion, LlmError> {
    let wire: WireResponse = serde_json::from_slice(body)
        .map_err(|err| LlmError::Malformed(format!("not a chat completion: {err}")))?;
    let choice = wire
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| LlmError::Malformed("no choices".into()))?;
    Ok(Completion {
        content: choice.message.content,
        tool_calls: choice.message.tool_calls.unwrap_or_default(),
        finish_reason: choice.finish_reason,
        usage: wire.usage,
    })
}

/// The provider's error message from an error body: `{"error": {"message": ..}}` (OpenAI,
/// vLLM), `{"error": ".."}` (Ollama) or plain text; cut short, with the API key scrubbed out
/// in case the provider echoes it.
fn provider_message(body: &[u8], api_key: Option<&Secret>) -> Option<String> {
    let text = match serde_json::from_slice::<Value>(body) {
        Ok(value) => message_of(&value)?,
        Err(_) => String::from_utf8_lossy(body).trim().to_owned(),
    };
    if text.is_empty() {
        return None;
    }
    Some(scrub(&text, api_key))
}

fn message_of(value: &Value) -> Option<String> {
    let error = value.get("error").unwrap_or(value);
    match error {
        Value::String(text) => Some(text.clone()),
        Value::Object(map) => map
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| Some(error.to_string())),
        other => Some(other.to_string()),
    }
}

fn scrub(text: &str, api_key: Option<&Secret>) -> String {
    let mut text = match api_key {
        Some(key) if !key.expose().is_empty() => text.replace(key.expose(), "[REDACTED]"),
        _ => text.to_owned(),
    };
    if text.chars().count() > MAX_PROVIDER_MESSAGE {
        text = text.chars().take(MAX_PROVIDER_MESSAGE).collect::<String>() + "…";
    }
    text
}

// === streaming ===

/// A streamed answer in progress.
pub struct CompletionStream {
    response: reqwest::Response,
    timeout: Duration,
    api_key: Option<Secret>,
    parser: crate::sse::SseParser,
    assembler: Assembler,
    /// Text deltas parsed but not yet handed out.
    pending: std::collections::VecDeque<String>,
    /// `[DONE]` seen or the body ended.
    done: bool,
}

impl CompletionStream {
    /// The next text fragment, or `None` once the stream is over. Tool-call fragments are
    /// assembled silently.
    pub async fn next_text(&mut self) -> Result<Option<String>, LlmError> {
        loop {
            if let Some(text) = self.pending.pop_front() {
                return Ok(Some(text));
            }
            if self.done {
                return Ok(None);
            }
            let chunk = tokio::time::timeout(self.timeout, self.response.chunk())
                .await
                .map_err(|_| LlmError::Timeout(self.timeout))?
                .map_err(|err| transport_error(err, self.timeout))?;
            let Some(chunk) = chunk else {
                self.done = true;
                for event in self.parser.finish() {
                    self.on_data(&event.data)?;
                }
                if !self.assembler.saw_done && self.assembler.finish_reason.is_none() {
                    return Err(LlmError::Malformed(
                        "the stream ended before `data: [DONE]`".into(),
                    ));
                }
                continue;
            };
            for event in self.parser.push(&chunk) {
                self.on_data(&event.data)?;
                if self.assembler.saw_done {
                    self.done = true;
                    break;
                }
            }
        }
    }

    fn on_data(&mut self, data: &str) -> Result<(), LlmError> {
        if self.assembler.saw_done {
            return Ok(());
        }
        if data.trim() == "[DONE]" {
            self.assembler.saw_done = true;
            return Ok(());
        }
        let chunk: WireChunk = serde_json::from_str(data)
            .map_err(|err| LlmError::Malformed(format!("bad stream chunk: {err}")))?;
        if let Some(error) = &chunk.error {
            let message = message_of(error).unwrap_or_else(|| "unknown error".into());
            return Err(LlmError::Provider {
                message: scrub(&message, self.api_key.as_ref()),
            });
        }
        if let Some(text) = self.assembler.apply(chunk)?
            && !text.is_empty()
        {
            self.pending.push_back(text);
        }
        Ok(())
    }

    /// Reads what is left and returns the whole answer.
    pub async fn finish(mut self) -> Result<Completion, LlmError> {
        while self.next_text().await?.is_some() {}
        self.assembler.into_completion()
    }
}

/// Builds a [`Completion`] from `chat.completion.chunk` deltas: content appended, tool calls
/// assembled by `index` (id and name usually in the first fragment, arguments spread over many).
#[derive(Default)]
struct Assembler {
    content: Option<String>,
    tool_calls: BTreeMap<usize, PartialCall>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    saw_done: bool,
}

#[derive(Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

impl Assembler {
    /// Applies one chunk; returns its text delta.
    fn apply(&mut self, chunk: WireChunk) -> Result<Option<String>, LlmError> {
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage);
        }
        // A usage-only chunk (stream_options.include_usage) has no choices.
        let Some(choice) = chunk.choices.into_iter().next() else {
            return Ok(None);
        };
        if let Some(reason) = choice.finish_reason {
            self.finish_reason = Some(reason);
        }
        for (position, delta) in choice.delta.tool_calls.into_iter().flatten().enumerate() {
            // Some servers omit `index` when they send each call whole.
            let index = delta.index.unwrap_or(position);
            let call = self.tool_calls.entry(index).or_default();
            if let Some(id) = delta.id.filter(|id| !id.is_empty()) {
                call.id = id;
            }
            if let Some(function) = delta.function {
                if let Some(name) = function.name {
                    call.name.push_str(&name);
                }
                if let Some(arguments) = function.arguments {
                    call.arguments.push_str(&arguments);
                }
            }
        }
        let text = choice.delta.content;
        if let Some(text) = &text {
            self.content.get_or_insert_with(String::new).push_str(text);
        }
        Ok(text)
    }

    fn into_completion(self) -> Result<Completion, LlmError> {
        let mut tool_calls = Vec::with_capacity(self.tool_calls.len());
        for (index, call) in self.tool_calls {
            if call.name.is_empty() {
                return Err(LlmError::Malformed(format!(
                    "streamed tool call {index} has no function name"
                )));
            }
            tool_calls.push(ToolCall {
                // A missing id would break the tool-message pairing: make one up.
                id: if call.id.is_empty() {
                    format!("call_{index}")
                } else {
                    call.id
                },
                kind: function_type(),
                function: FunctionCall {
                    name: call.name,
                    arguments: call.arguments,
                },
            });
        }
        Ok(Completion {
            content: self.content,
            tool_calls,
            finish_reason: self.finish_reason,
            usage: self.usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_calls_are_assembled_by_index() {
        let mut assembler = Assembler::default();
        let chunks = [
            r#"{"choices":[{"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"demo__echo","arguments":""}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"id":"call_b","type":"function","function":{"name":"demo2__add","arguments":"{\"a\":"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"message\":"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"arguments":"1,\"b\":2}"}},{"index":0,"function":{"arguments":"\"hi\"}"}}]}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
        ];
        for chunk in chunks {
            assembler
                .apply(serde_json::from_str(chunk).unwrap())
                .unwrap();
        }
        let completion = assembler.into_completion().unwrap();
        assert_eq!(completion.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(completion.content, None);
        let calls: Vec<_> = completion
            .tool_calls
            .iter()
            .map(|c| {
                (
                    c.id.as_str(),
                    c.function.name.as_str(),
                    c.function.arguments.as_str(),
                )
            })
            .collect();
        assert_eq!(
            calls,
            [
                ("call_a", "demo__echo", r#"{"message":"hi"}"#),
                ("call_b", "demo2__add", r#"{"a":1,"b":2}"#)
            ]
        );
    }

    #[test]
    fn provider_messages_are_extracted_and_scrubbed() {
        let key = Secret::new("sk-live-123");
        let openai = br#"{"error":{"message":"Incorrect API key provided: sk-live-123","type":"invalid_request_error"}}"#;
        assert_eq!(
            provider_message(openai, Some(&key)).unwrap(),
            "Incorrect API key provided: [REDACTED]"
        );
        assert_eq!(
            provider_message(br#"{"error":"model not found"}"#, None).unwrap(),
            "model not found"
        );
        assert_eq!(
            provider_message(b"Bad Gateway\n", None).unwrap(),
            "Bad Gateway"
        );
        assert_eq!(provider_message(b"", None), None);
        let long = "x".repeat(2000);
        assert!(
            provider_message(long.as_bytes(), None)
                .unwrap()
                .chars()
                .count()
                <= 501
        );
    }

    #[test]
    fn requests_carry_tools_only_when_there_are_some() {
        let messages = [Message::User {
            content: "hi".into(),
        }];
        let bare = WireRequest {
            model: "m",
            messages: &messages,
            tools: &[],
            tool_choice: None,
            stream: false,
        };
        assert_eq!(
            serde_json::to_value(&bare).unwrap(),
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        );
        let assistant = Message::Assistant {
            content: None,
            tool_calls: vec![ToolCall {
                id: "c1".into(),
                kind: function_type(),
                function: FunctionCall {
                    name: "f".into(),
                    arguments: "{}".into(),
                },
            }],
        };
        assert_eq!(
            serde_json::to_value(&assistant).unwrap(),
            serde_json::json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ]})
        );
    }
}
