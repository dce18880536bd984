//! A scripted OpenAI-compatible chat-completions server on a loopback port: the only fake of
//! the LLM tests. Include it with `#[path = "common/fake_llm.rs"] mod fake_llm;`.
//!
//! It speaks the real wire format of `POST /v1/chat/completions`:
//! - without `stream`: a `chat.completion` object, `choices[0].message` with `content` or
//!   `tool_calls` (`id`, `type: "function"`, `function.name`, `function.arguments` as a JSON
//!   string), `finish_reason` and `usage`;
//! - with `"stream": true`: `text/event-stream` of `chat.completion.chunk` objects: a role
//!   chunk, content split into several deltas, each tool call's arguments split into fragments
//!   interleaved by `index`, a `finish_reason` chunk, a usage chunk and `data: [DONE]`. The
//!   bytes go out in small frames cut at arbitrary points (inside lines and UTF-8 characters),
//!   with a pause between frames, so the client's parser meets what real networks deliver.
//!
//! Each request pops the next [`Reply`] of the script; an empty script answers 500. Every
//! request (body and `Authorization` header) is recorded for assertions.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// The API key the tests give the client; it must never appear in an error.
pub const TEST_API_KEY: &str = "sk-test-do-not-leak-4f2a9c";
/// The model name in the fake's config.
pub const MODEL: &str = "fake-model";

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A final text answer (`finish_reason: "stop"`).
    Text(String),
    /// Tool calls, optionally with text (`finish_reason: "tool_calls"`).
    ToolCalls {
        content: Option<String>,
        calls: Vec<FakeCall>,
    },
    /// An error status with an OpenAI-style body `{"error": {"message", "type"}}`.
    Error { status: u16, message: String },
    /// Any status and raw body (malformed answers).
    Raw {
        status: u16,
        content_type: &'static str,
        body: String,
    },
    /// Sleeps this long, then answers with the inner reply.
    Delay(Duration, Box<Reply>),
    /// Waits for a permit of the semaphore (the test adds one to let the answer go), then
    /// answers with the inner reply: the test decides when, not the clock.
    Gate(Arc<tokio::sync::Semaphore>, Box<Reply>),
}

/// A tool call the fake model makes.
#[derive(Debug, Clone)]
pub struct FakeCall {
    pub id: String,
    pub name: String,
    /// Sent verbatim as `function.arguments` (so it may be invalid JSON on purpose).
    pub arguments: String,
}

impl Reply {
    pub fn text(text: &str) -> Reply {
        Reply::Text(text.to_owned())
    }

    /// Tool calls from `(id, function name, arguments)`.
    pub fn calls(calls: &[(&str, &str, Value)]) -> Reply {
        Reply::ToolCalls {
            content: None,
            calls: calls
                .iter()
                .map(|(id, name, arguments)| FakeCall {
                    id: (*id).to_owned(),
                    name: (*name).to_owned(),
                    arguments: arguments.to_string(),
                })
                .collect(),
        }
    }

    pub fn error(status: u16, message: &str) -> Reply {
        Reply::Error {
            status,
            message: message.to_owned(),
        }
    }
}

/// What the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub body: Value,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct Script {
    replies: VecDeque<Reply>,
    received: Vec<Recorded>,
}

/// The running fake; stops when dropped.
pub struct FakeLlm {
    /// `http://127.0.0.1:PORT/v1`, the `llm.base_url` to use.
    pub base_url: String,
    script: Arc<Mutex<Script>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeLlm {
    /// Starts the fake with a script.
    pub async fn start(replies: impl IntoIterator<Item = Reply>) -> FakeLlm {
        let script = Arc::new(Mutex::new(Script {
            replies: replies.into_iter().collect(),
            received: Vec::new(),
        }));
        let app = Router::new()
            .route("/v1/chat/completions", post(completions))
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .expect("fake LLM serves");
        });
        FakeLlm {
            base_url: format!("http://{addr}/v1"),
            script,
            stop: Some(stop),
        }
    }

    /// Appends replies to the script.
    pub fn push(&self, reply: Reply) {
        self.script.lock().unwrap().replies.push_back(reply);
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.script.lock().unwrap().received.clone()
    }

    /// Replies not used yet.
    pub fn remaining(&self) -> usize {
        self.script.lock().unwrap().replies.len()
    }

    /// An `[llm]` config pointing at this fake.
    pub fn config(&self) -> mcp_pool::config::LlmConfig {
        mcp_pool::config::LlmConfig {
            base_url: self.base_url.clone(),
            model: MODEL.to_owned(),
            timeout: Duration::from_secs(20),
            ..Default::default()
        }
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn completions(
    State(script): State<Arc<Mutex<Script>>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let body: Value = match serde_json::from_str(&body) {
        Ok(body) => body,
        Err(err) => {
            return error_response(400, &format!("request body is not JSON: {err}"));
        }
    };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let reply = {
        let mut script = script.lock().unwrap();
        script.received.push(Recorded {
            body,
            authorization: headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        });
        script.replies.pop_front()
    };
    let Some(mut reply) = reply else {
        return error_response(500, "fake LLM: the script has no reply left");
    };
    loop {
        match reply {
            Reply::Delay(delay, inner) => {
                tokio::time::sleep(delay).await;
                reply = *inner;
            }
            Reply::Gate(gate, inner) => {
                // Never closed; a failed acquire would only open the gate.
                let _ = gate.acquire().await.map(|permit| permit.forget());
                reply = *inner;
            }
            _ => break,
        }
    }
    match reply {
        Reply::Error { status, message } => error_response(status, &message),
        Reply::Raw {
            status,
            content_type,
            body,
        } => (
            StatusCode::from_u16(status).unwrap(),
            [(header::CONTENT_TYPE, content_type)],
            body,
        )
            .into_response(),
        Reply::Text(_) | Reply::ToolCalls { .. } if stream => sse_response(&reply),
        Reply::Text(_) | Reply::ToolCalls { .. } => axum::Json(completion(&reply)).into_response(),
        Reply::Delay(..) | Reply::Gate(..) => unreachable!("unwrapped above"),
    }
}

fn error_response(status: u16, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        axum::Json(json!({
            "error": { "message": message, "type": "invalid_request_error", "code": null }
        })),
    )
        .into_response()
}

fn usage() -> Value {
    json!({"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18})
}

fn completion(reply: &Reply) -> Value {
    let (message, finish_reason) = match reply {
        Reply::Text(text) => (json!({"role": "assistant", "content": text}), "stop"),
        Reply::ToolCalls { content, calls } => (
            json!({
                "role": "assistant",
                "content": content,
                "tool_calls": calls.iter().map(|call| json!({
                    "id": call.id,
                    "type": "function",
                    "function": { "name": call.name, "arguments": call.arguments },
                })).collect::<Vec<_>>(),
            }),
            "tool_calls",
        ),
        _ => unreachable!(),
    };
    json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{ "index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason }],
        "usage": usage(),
    })
}

fn chunk(delta: Value, finish_reason: Option<&str>) -> Value {
    json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason }],
    })
}

/// Splits `text` into `parts` pieces on character boundaries (some may be empty).
fn split(text: &str, parts: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(parts).max(1);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

fn sse_response(reply: &Reply) -> Response {
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    let finish = match reply {
        Reply::Text(text) => {
            for piece in split(text, 4) {
                events.push(chunk(json!({ "content": piece }), None));
            }
            "stop"
        }
        Reply::ToolCalls { content, calls } => {
            if let Some(content) = content {
                for piece in split(content, 2) {
                    events.push(chunk(json!({ "content": piece }), None));
                }
            }
            // First fragment of each call: id, type, name, empty arguments.
            for (index, call) in calls.iter().enumerate() {
                events.push(chunk(
                    json!({"tool_calls": [{
                        "index": index, "id": call.id, "type": "function",
                        "function": { "name": call.name, "arguments": "" },
                    }]}),
                    None,
                ));
            }
            // Then the arguments in three fragments, the calls interleaved.
            let fragments: Vec<Vec<String>> =
                calls.iter().map(|call| split(&call.arguments, 3)).collect();
            for round in 0..3 {
                for (index, pieces) in fragments.iter().enumerate() {
                    if let Some(piece) = pieces.get(round) {
                        events.push(chunk(
                            json!({"tool_calls": [{ "index": index, "function": { "arguments": piece } }]}),
                            None,
                        ));
                    }
                }
            }
            "tool_calls"
        }
        _ => unreachable!(),
    };
    events.push(chunk(json!({}), Some(finish)));
    events.push(json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": MODEL, "choices": [], "usage": usage(),
    }));
    let mut text = String::new();
    for event in events {
        text.push_str(&format!("data: {event}\n\n"));
    }
    text.push_str(": the end\n\ndata: [DONE]\n\n");
    // Frames of irregular sizes, cut anywhere (even inside a UTF-8 character).
    let bytes = text.into_bytes();
    let mut frames = Vec::new();
    let mut at = 0;
    let sizes = [7usize, 61, 13, 128, 3, 97];
    let mut i = 0;
    while at < bytes.len() {
        let end = (at + sizes[i % sizes.len()]).min(bytes.len());
        frames.push(bytes[at..end].to_vec());
        at = end;
        i += 1;
    }
    let stream = futures_util::stream::unfold(frames.into_iter(), |mut frames| async move {
        let frame = frames.next()?;
        tokio::time::sleep(Duration::from_millis(1)).await;
        Some((Ok::<_, Infallible>(frame), frames))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}
