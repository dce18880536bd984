//! `POST /v1/chat` over real HTTP: the real router, pool and demo server; the only fake is the
//! LLM, a scripted OpenAI-compatible server on a loopback port.

mod common;
#[path = "common/fake_llm.rs"]
mod fake_llm;
#[path = "common/http.rs"]
mod http;

use std::sync::Arc;

use common::{PATIENCE, wait_until};
use fake_llm::{FakeLlm, Reply};
use http::TestServer;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

fn llm_section(fake: &FakeLlm) -> String {
    format!(
        "[llm]\nbase_url = {:?}\nmodel = {:?}\ntimeout = \"20s\"\n",
        fake.base_url,
        fake_llm::MODEL
    )
}

async fn server_with(fake: &FakeLlm) -> TestServer {
    TestServer::start("", &llm_section(fake), "", &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_runs_the_tool_loop_with_the_callers_tools() {
    let fake = FakeLlm::start([
        Reply::calls(&[
            (
                "call_1",
                "demo__echo",
                json!({ "message": "from the model" }),
            ),
            ("call_2", "demo__add", json!({ "a": 1, "b": "two" })),
        ]),
        Reply::text("All done."),
    ])
    .await;
    let server = server_with(&fake).await;
    let alice = server.user("alice");
    let stored = alice
        .put_json("/v1/connections/demo", &json!({ "access_token": "a" }))
        .await;
    assert_eq!(stored.status, 201, "{}", stored.text());
    // Bob has demo2 only; none of it may reach Alice's chat.
    let stored = server
        .user("bob")
        .put_json("/v1/connections/demo2", &json!({ "access_token": "b" }))
        .await;
    assert_eq!(stored.status, 201, "{}", stored.text());

    let response = alice
        .post_json("/v1/chat", &json!({ "message": "echo something" }))
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    assert_eq!(body["reply"], "All done.");
    let trace = body["trace"].as_array().unwrap();
    assert_eq!(trace.len(), 2);
    assert_eq!(
        (trace[0]["server"].as_str(), trace[0]["tool"].as_str()),
        (Some("demo"), Some("echo"))
    );
    assert_eq!(trace[0]["is_error"], false);
    assert_eq!(trace[1]["tool"], "add");
    assert_eq!(
        trace[1]["is_error"], true,
        "a tool error is reported, not fatal"
    );

    let sent = fake.requests();
    assert_eq!(sent.len(), 2);
    let offered: Vec<&str> = sent[0].body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert!(offered.contains(&"demo__echo"), "{offered:?}");
    assert!(
        offered.iter().all(|name| name.starts_with("demo__")),
        "Bob's demo2 leaked: {offered:?}"
    );
    let messages = sent[1].body["messages"].as_array().unwrap();
    let tool_results: Vec<&Value> = messages.iter().filter(|m| m["role"] == "tool").collect();
    assert_eq!(tool_results[0]["tool_call_id"], "call_1");
    assert_eq!(tool_results[0]["content"], "from the model");

    // The metrics count the chat.
    let metrics = server.anonymous().get("/metrics").await.text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mcp_pool_chat_requests") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // The chat's tool calls are counted by the pool, as REST calls are.
    for line in [
        "mcp_pool_tool_calls_total{server=\"demo\",outcome=\"ok\"} 1",
        "mcp_pool_tool_calls_total{server=\"demo\",outcome=\"invalid_arguments\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_events_in_order() {
    // The model's final answer waits at a gate the test opens: events that arrive before the
    // test opens it were streamed, not buffered until the end.
    let gate = Arc::new(Semaphore::new(0));
    let fake = FakeLlm::start([
        Reply::calls(&[("call_1", "demo__echo", json!({ "message": "streamed" }))]),
        Reply::Gate(
            gate.clone(),
            Box::new(Reply::text("Here is the streamed answer.")),
        ),
    ])
    .await;
    let server = server_with(&fake).await;
    let carol = server.user("carol");
    let stored = carol
        .put_json("/v1/connections/demo", &json!({ "access_token": "c" }))
        .await;
    assert_eq!(stored.status, 201, "{}", stored.text());
    let mut stream = carol
        .post_streaming("/v1/chat", &json!({ "message": "go", "stream": true }))
        .await;
    assert_eq!(stream.status, 200);
    let content_type = stream.headers["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );

    let mut events: Vec<(String, Value)> = Vec::new();
    while !events.iter().any(|(name, _)| name == "tool_call_finished") {
        let event = stream.next_event().await.expect("the tool events arrive");
        events.push(event);
    }
    assert!(
        !events
            .iter()
            .any(|(name, _)| name == "text_delta" || name == "done"),
        "nothing of the gated answer yet: {events:?}"
    );
    gate.add_permits(1);
    while let Some(event) = stream.next_event().await {
        events.push(event);
    }

    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let started = names
        .iter()
        .position(|n| *n == "tool_call_started")
        .expect("started");
    let finished = names
        .iter()
        .position(|n| *n == "tool_call_finished")
        .expect("finished");
    let first_text = names.iter().position(|n| *n == "text_delta").expect("text");
    assert!(started < finished && finished < first_text, "{names:?}");
    assert_eq!(events[finished].1["is_error"], false, "{events:?}");
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    let streamed: String = events
        .iter()
        .filter(|(n, _)| n == "text_delta")
        .map(|(_, e)| e["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(streamed, "Here is the streamed answer.");
    assert_eq!(
        events.last().unwrap().1["reply"],
        "Here is the streamed answer."
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_chat_is_cancelled_when_the_client_disconnects() {
    // A tool call far longer than the test: only a cancellation ends it in time.
    let fake = FakeLlm::start([
        Reply::calls(&[("call_1", "demo__sleep", json!({ "ms": 600_000 }))]),
        Reply::text("nobody is listening"),
    ])
    .await;
    let server = TestServer::start("call_timeout = \"1h\"", &llm_section(&fake), "", &[]).await;
    let dan = server.user("dan");
    let stored = dan
        .put_json("/v1/connections/demo", &json!({ "access_token": "d" }))
        .await;
    assert_eq!(stored.status, 201, "{}", stored.text());
    let mut stream = dan
        .post_streaming("/v1/chat", &json!({ "message": "sleep", "stream": true }))
        .await;
    assert_eq!(stream.status, 200);
    loop {
        let (name, _) = stream.next_event().await.expect("the call starts");
        if name == "tool_call_started" {
            break;
        }
    }
    let pool = &server.state.pool;
    let in_flight = || async {
        let stats = pool.stats().await.unwrap();
        stats.connections.iter().map(|c| c.in_flight).sum::<usize>()
    };
    assert!(wait_until(PATIENCE, || async { in_flight().await == 1 }).await);

    drop(stream);
    // The chat's running tool call is cancelled on the server, and the model is not asked
    // again for the answer nobody would read.
    let cancelled = wait_until(PATIENCE, || async {
        let stats = dan.call("demo", "stats", &json!({})).await;
        assert_eq!(stats.status, 200, "{}", stats.text());
        let stats: Value = serde_json::from_str(&http::content_text(&stats.json())).unwrap();
        stats["cancelled_sleeps"] == 1
    })
    .await;
    assert!(
        cancelled,
        "the tool call was cancelled when the client left"
    );
    assert!(wait_until(PATIENCE, || async { in_flight().await == 0 }).await);
    assert_eq!(fake.requests().len(), 1, "the model was not asked again");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_rejects_bad_input_with_json_errors() {
    let fake = FakeLlm::start([Reply::error(401, "bad key")]).await;
    let server = server_with(&fake).await;
    let dave = server.user("dave");
    dave.post_json("/v1/chat", &json!({ "message": "x", "servers": ["nope"] }))
        .await
        .expect_error(404, "unknown_server");
    dave.post_json("/v1/chat", &json!({ "message": 5 }))
        .await
        .expect_error(400, "invalid_body");
    dave.post_json("/v1/chat", &json!({ "message": "" }))
        .await
        .expect_error(400, "invalid_request");
    // The provider refuses our key: a gateway error that names no key.
    let refused = dave
        .post_json("/v1/chat", &json!({ "message": "hello" }))
        .await;
    refused.expect_error(502, "llm_unauthorized");
    assert!(!refused.text().contains(fake_llm::TEST_API_KEY));
    server
        .anonymous()
        .post_json("/v1/chat", &json!({ "message": "x" }))
        .await
        .expect_error(401, "unauthorized");
    server.stop().await;
}
