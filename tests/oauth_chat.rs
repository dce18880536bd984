//! `/v1/chat` gets fresh tokens before each of its tool calls (the pool checks them, not the
//! chat): a real OAuth server (npm `oauth2-mock-server`), the real pool and demo server, and a
//! scripted LLM.

mod common;
#[path = "common/fake_llm.rs"]
mod fake_llm;
#[path = "common/http.rs"]
mod http;
#[path = "common/oauth.rs"]
mod oauth;

use std::sync::Arc;

use fake_llm::{FakeLlm, Reply};
use http::TestServer;
use oauth::{MockOAuth, oauth_server};
use serde_json::json;
use tokio::sync::Semaphore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_refreshes_a_token_that_became_due_before_its_next_tool_call() {
    let mock = MockOAuth::start().await;
    // The model's second step waits at a gate, so the test can make the token due between the
    // chat's two tool calls.
    let gate = Arc::new(Semaphore::new(0));
    let llm = FakeLlm::start([
        Reply::calls(&[("call_1", "gdemo__echo", json!({ "message": "first" }))]),
        Reply::Gate(
            gate.clone(),
            Box::new(Reply::calls(&[(
                "call_2",
                "gdemo__echo",
                json!({ "message": "second" }),
            )])),
        ),
        Reply::text("done"),
    ])
    .await;
    let extra = format!(
        "{}[llm]\nbase_url = {:?}\nmodel = {:?}\n",
        oauth_server("gdemo", &mock, "1h", false),
        llm.base_url,
        fake_llm::MODEL
    );
    let ts = TestServer::start("", &extra, "", &[]).await;
    // Connect with a token that has two hours left: not due (refresh_before is one hour).
    mock.control(json!({ "expires_in": 7200 })).await;
    mock.connect(&ts.user("alice"), &ts.anonymous(), "gdemo")
        .await;
    mock.control(json!({ "expires_in": 7200, "reset_stats": true }))
        .await;

    let mut chat = ts
        .user("alice")
        .post_streaming(
            "/v1/chat",
            &json!({ "message": "hi", "servers": ["gdemo"], "stream": true }),
        )
        .await;
    assert_eq!(chat.status, 200);
    loop {
        let (name, event) = chat.next_event().await.expect("the first call finishes");
        if name == "tool_call_finished" {
            assert_eq!(event["is_error"], false, "{event}");
            break;
        }
    }
    assert_eq!(mock.refresh_requests().await, 0, "nothing was due yet");
    // The token becomes due while the model thinks; its next tool call refreshes it first.
    ts.set_token_expiry("alice", "gdemo", chrono::Duration::minutes(30))
        .await;
    gate.add_permits(1);
    let mut finished = Vec::new();
    let mut reply = None;
    while let Some((name, event)) = chat.next_event().await {
        match name.as_str() {
            "tool_call_finished" => finished.push(event),
            "done" => reply = Some(event["reply"].clone()),
            _ => {}
        }
    }
    assert_eq!(reply, Some(json!("done")));
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0]["is_error"], false, "{:?}", finished);
    assert_eq!(
        mock.refresh_requests().await,
        1,
        "the chat's second tool call refreshed the due token once"
    );
    ts.stop().await;
}
