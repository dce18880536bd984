//! `/v1/chat` refreshes tokens that are due before its tool loop runs: a real OAuth server
//! (npm `oauth2-mock-server`), the real pool and demo server, and a scripted LLM.

mod common;
#[path = "common/fake_llm.rs"]
mod fake_llm;
#[path = "common/http.rs"]
mod http;
#[path = "common/oauth.rs"]
mod oauth;

use std::time::Duration;

use fake_llm::{FakeLlm, Reply};
use http::TestServer;
use oauth::{MockOAuth, SUCCESS, oauth_server, path_and_query};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_refreshes_a_due_token_before_calling_tools() {
    let mock = MockOAuth::start().await;
    let llm = FakeLlm::start([
        Reply::calls(&[("call_1", "gdemo__echo", json!({ "message": "fresh" }))]),
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
    // Connect with a token that is due for refresh two seconds from now.
    mock.control(json!({ "expires_in": 3602 })).await;
    let start = ts
        .user("alice")
        .post_json("/v1/oauth/gdemo/start", &json!({}))
        .await;
    assert_eq!(start.status, 200, "{}", start.text());
    let url = start.json()["authorization_url"]
        .as_str()
        .unwrap()
        .to_owned();
    let redirect = mock.authorize(&url).await;
    let back = ts.anonymous().get(&path_and_query(&redirect)).await;
    assert_eq!(
        back.headers["location"].to_str().unwrap(),
        format!("{SUCCESS}?connected=gdemo")
    );
    // A live session first, so only the chat's own check can trigger the refresh.
    let warm = ts
        .user("alice")
        .call("gdemo", "echo", &json!({ "message": "x" }))
        .await;
    assert_eq!(warm.status, 200, "{}", warm.text());
    tokio::time::sleep(Duration::from_millis(2300)).await;
    mock.control(json!({ "expires_in": 7200, "reset_stats": true }))
        .await;

    let chat = ts
        .user("alice")
        .post_json(
            "/v1/chat",
            &json!({ "message": "hi", "servers": ["gdemo"] }),
        )
        .await;
    assert_eq!(chat.status, 200, "{}", chat.text());
    assert_eq!(chat.json()["reply"], "done");
    assert_eq!(
        mock.refresh_requests().await,
        1,
        "the chat refreshed the due token once"
    );
    ts.stop().await;
}
