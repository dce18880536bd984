//! The chat-completions client against the scripted OpenAI-compatible server on a real
//! loopback socket: the JSON and the streamed wire formats, and every kind of failure.

#[path = "common/fake_llm.rs"]
mod fake_llm;

use std::time::Duration;

use fake_llm::{FakeLlm, MODEL, Reply, TEST_API_KEY};
use mcp_pool::llm::client::{CompletionRequest, ToolDefinition};
use mcp_pool::llm::{LlmClient, LlmError, Message};
use mcp_pool::store::Secret;
use serde_json::json;

fn client(fake: &FakeLlm) -> LlmClient {
    LlmClient::new(&fake.config(), Some(Secret::new(TEST_API_KEY))).unwrap()
}

fn user(text: &str) -> Vec<Message> {
    vec![Message::User {
        content: text.to_owned(),
    }]
}

fn echo_tool() -> Vec<ToolDefinition> {
    vec![ToolDefinition::function(
        "demo__echo".into(),
        Some("Returns `message`.".into()),
        json!({"type": "object", "properties": {"message": {"type": "string"}}}),
    )]
}

#[tokio::test]
async fn a_plain_answer_and_what_was_sent() {
    let fake = FakeLlm::start([Reply::text("Hello there.")]).await;
    let messages = user("hi");
    let completion = client(&fake)
        .complete(CompletionRequest {
            messages: &messages,
            tools: &[],
        })
        .await
        .unwrap();
    assert_eq!(completion.content.as_deref(), Some("Hello there."));
    assert!(completion.tool_calls.is_empty());
    assert_eq!(completion.finish_reason.as_deref(), Some("stop"));
    assert_eq!(completion.usage.unwrap().total_tokens, 18);

    let sent = &fake.requests()[0];
    assert_eq!(
        sent.authorization.as_deref(),
        Some(format!("Bearer {TEST_API_KEY}").as_str())
    );
    assert_eq!(
        sent.body,
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        "no tools, no tool_choice, no stream flag when not asked for"
    );
}

#[tokio::test]
async fn without_an_api_key_no_authorization_header_is_sent() {
    let fake = FakeLlm::start([Reply::text("ok")]).await;
    let llm = LlmClient::new(&fake.config(), None).unwrap();
    let messages = user("hi");
    llm.complete(CompletionRequest {
        messages: &messages,
        tools: &[],
    })
    .await
    .unwrap();
    assert_eq!(fake.requests()[0].authorization, None);
}

#[tokio::test]
async fn parallel_tool_calls_come_back_in_order_with_tools_offered_as_auto() {
    let fake = FakeLlm::start([Reply::calls(&[
        ("call_1", "demo__echo", json!({"message": "a"})),
        ("call_2", "demo__echo", json!({"message": "b"})),
    ])])
    .await;
    let (messages, tools) = (user("twice"), echo_tool());
    let completion = client(&fake)
        .complete(CompletionRequest {
            messages: &messages,
            tools: &tools,
        })
        .await
        .unwrap();
    let calls: Vec<_> = completion
        .tool_calls
        .iter()
        .map(|c| (c.id.as_str(), c.kind.as_str(), c.function.name.as_str()))
        .collect();
    assert_eq!(
        calls,
        [
            ("call_1", "function", "demo__echo"),
            ("call_2", "function", "demo__echo")
        ]
    );
    assert_eq!(
        completion.tool_calls[1].function.arguments,
        r#"{"message":"b"}"#
    );
    let body = &fake.requests()[0].body;
    assert_eq!(body["tool_choice"], "auto");
    assert_eq!(body["tools"][0]["type"], "function");
    assert_eq!(body["tools"][0]["function"]["name"], "demo__echo");
    assert_eq!(
        body["tools"][0]["function"]["parameters"]["properties"]["message"]["type"],
        "string"
    );
}

#[tokio::test]
async fn a_streamed_answer_arrives_in_several_deltas() {
    let text = "Grüße: the answer is 42, and ✓ done.";
    let fake = FakeLlm::start([Reply::text(text)]).await;
    let messages = user("hi");
    let mut stream = client(&fake)
        .complete_stream(CompletionRequest {
            messages: &messages,
            tools: &[],
        })
        .await
        .unwrap();
    let mut deltas = Vec::new();
    while let Some(delta) = stream.next_text().await.unwrap() {
        deltas.push(delta);
    }
    let completion = stream.finish().await.unwrap();
    assert!(deltas.len() >= 3, "{deltas:?}");
    assert_eq!(deltas.concat(), text);
    assert_eq!(completion.content.as_deref(), Some(text));
    assert_eq!(completion.finish_reason.as_deref(), Some("stop"));
    assert_eq!(completion.usage.unwrap().total_tokens, 18);
    assert_eq!(fake.requests()[0].body["stream"], true);
}

#[tokio::test]
async fn streamed_tool_call_fragments_are_assembled() {
    let fake = FakeLlm::start([Reply::ToolCalls {
        content: Some("Let me check.".into()),
        calls: vec![
            fake_llm::FakeCall {
                id: "call_a".into(),
                name: "demo__echo".into(),
                arguments: json!({"message": "ünïcode and \"quotes\""}).to_string(),
            },
            fake_llm::FakeCall {
                id: "call_b".into(),
                name: "demo2__add".into(),
                arguments: json!({"a": 1.5, "b": 2}).to_string(),
            },
        ],
    }])
    .await;
    let (messages, tools) = (user("go"), echo_tool());
    let completion = client(&fake)
        .complete_stream(CompletionRequest {
            messages: &messages,
            tools: &tools,
        })
        .await
        .unwrap()
        .finish()
        .await
        .unwrap();
    assert_eq!(completion.content.as_deref(), Some("Let me check."));
    assert_eq!(completion.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!(completion.tool_calls.len(), 2);
    assert_eq!(completion.tool_calls[0].id, "call_a");
    let args: serde_json::Value =
        serde_json::from_str(&completion.tool_calls[0].function.arguments).unwrap();
    assert_eq!(args, json!({"message": "ünïcode and \"quotes\""}));
    assert_eq!(completion.tool_calls[1].function.name, "demo2__add");
    assert_eq!(
        completion.tool_calls[1].function.arguments,
        r#"{"a":1.5,"b":2}"#
    );
}

#[tokio::test]
async fn http_errors_carry_status_and_provider_message_but_never_the_key() {
    let fake = FakeLlm::start([
        Reply::error(401, &format!("Incorrect API key provided: {TEST_API_KEY}")),
        Reply::error(429, "Rate limit reached"),
        Reply::Raw {
            status: 502,
            content_type: "text/html",
            body: "<html>Bad Gateway</html>".into(),
        },
    ])
    .await;
    let llm = client(&fake);
    let messages = user("hi");
    let request = CompletionRequest {
        messages: &messages,
        tools: &[],
    };
    let err = llm.complete(request).await.unwrap_err();
    let LlmError::Status { status, message } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*status, 401);
    assert_eq!(message, "Incorrect API key provided: [REDACTED]");
    assert_eq!(err.code(), "llm_unauthorized");
    for text in [err.to_string(), format!("{err:?}"), format!("{llm:?}")] {
        assert!(!text.contains(TEST_API_KEY), "{text}");
    }
    let err = llm.complete(request).await.unwrap_err();
    assert!(
        matches!(err, LlmError::Status { status: 429, .. }),
        "{err:?}"
    );
    assert_eq!(err.code(), "llm_rate_limited");
    // Streaming requests report the status the same way.
    let err = llm.complete_stream(request).await.err().unwrap();
    assert!(
        matches!(&err, LlmError::Status { status: 502, message } if message.contains("Bad Gateway")),
        "{err:?}"
    );
}

#[tokio::test]
async fn malformed_answers_are_typed_errors() {
    let fake = FakeLlm::start([
        Reply::Raw {
            status: 200,
            content_type: "application/json",
            body: "{\"choices\": \"nope\"".into(),
        },
        Reply::Raw {
            status: 200,
            content_type: "application/json",
            body: "{\"choices\": []}".into(),
        },
        Reply::Raw {
            status: 200,
            content_type: "text/event-stream",
            body: "data: {\"choices\":[{\"delta\":{\"content\":\"cut\"}}]}\n\n".into(),
        },
        Reply::Raw {
            status: 200,
            content_type: "text/event-stream",
            body: "data: {\"error\":{\"message\":\"overloaded\"}}\n\n".into(),
        },
    ])
    .await;
    let llm = client(&fake);
    let messages = user("hi");
    let request = CompletionRequest {
        messages: &messages,
        tools: &[],
    };
    for _ in 0..2 {
        let err = llm.complete(request).await.unwrap_err();
        assert!(matches!(err, LlmError::Malformed(_)), "{err:?}");
        assert_eq!(err.code(), "llm_malformed_response");
    }
    let stream = llm.complete_stream(request).await.unwrap();
    let err = stream.finish().await.unwrap_err();
    assert!(
        matches!(&err, LlmError::Malformed(m) if m.contains("[DONE]")),
        "{err:?}"
    );
    let stream = llm.complete_stream(request).await.unwrap();
    let err = stream.finish().await.unwrap_err();
    assert!(
        matches!(&err, LlmError::Provider { message } if message == "overloaded"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_slow_provider_times_out_and_an_absent_one_is_unreachable() {
    // The reply would come long after any bound below: only the client's timeout ends it.
    let fake = FakeLlm::start([Reply::Delay(
        Duration::from_secs(300),
        Box::new(Reply::text("too late")),
    )])
    .await;
    let mut config = fake.config();
    config.timeout = Duration::from_millis(300);
    let llm = LlmClient::new(&config, None).unwrap();
    let messages = user("hi");
    let request = CompletionRequest {
        messages: &messages,
        tools: &[],
    };
    let started = std::time::Instant::now();
    let err = llm.complete(request).await.unwrap_err();
    assert!(matches!(err, LlmError::Timeout(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(err.code(), "llm_timeout");

    // A port nobody listens on: bound (so no other process can take it meanwhile) but never
    // listening, so a connection is refused.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    config.base_url = format!("http://127.0.0.1:{port}/v1");
    let llm = LlmClient::new(&config, Some(Secret::new(TEST_API_KEY))).unwrap();
    let err = llm.complete(request).await.unwrap_err();
    assert!(matches!(err, LlmError::Transport(_)), "{err:?}");
    assert!(!err.to_string().contains(TEST_API_KEY));
    assert_eq!(err.code(), "llm_unreachable");
    drop(socket);
}
