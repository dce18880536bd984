//! `POST /v1/connections/warm`: sessions start in the background and the answer comes at once;
//! they become ready without any tool call.

mod common;
#[path = "common/http.rs"]
mod http;

use common::{PATIENCE, wait_until};
use http::{Client, TestServer};
use serde_json::{Value, json};

/// The caller's session state per server, as `GET /v1/connections` reports it.
async fn state_of(client: &Client, server: &str) -> String {
    let list = client.get("/v1/connections").await;
    assert_eq!(list.status, 200, "{}", list.text());
    list.json()["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["server"] == server)
        .map(|c| c["state"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn states(body: &Value) -> Vec<(String, String)> {
    let mut states: Vec<(String, String)> = body["warming"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["server"].as_str().unwrap().to_owned(),
                w["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    states.sort();
    states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_everything_answers_at_once_and_the_sessions_become_ready_without_a_call() {
    let server = TestServer::api_key().await;
    let alice = server.user("alice");
    for name in ["demo", "demo2", "slow"] {
        assert_eq!(alice.connect(name).await.status, 201);
    }
    // Another user's credentials are never warmed on alice's behalf.
    assert_eq!(server.user("bob").connect("demo3").await.status, 201);

    let warmed = alice.raw("POST", "/v1/connections/warm", "").await;
    assert_eq!(warmed.status, 202, "{}", warmed.text());
    assert_eq!(
        states(&warmed.json()),
        vec![
            ("demo".to_owned(), "started".to_owned()),
            ("demo2".to_owned(), "started".to_owned()),
            ("slow".to_owned(), "started".to_owned()),
        ]
    );
    assert_eq!(warmed.json()["skipped"], json!([]));
    // The answer did not wait for the slow server's 8 s start.
    assert_eq!(state_of(&alice, "slow").await, "starting");

    for name in ["demo", "demo2", "slow"] {
        assert!(
            wait_until(PATIENCE, || async {
                state_of(&alice, name).await == "ready"
            })
            .await,
            "{name} became ready without a tool call"
        );
    }
    let stats = server.admin().get("/v1/stats").await.json();
    assert_eq!(stats["user_breakdown"], json!({ "alice": 3 }), "{stats}");
    assert_eq!(stats["counters"]["spawns"], 3, "one start per server");

    // Warming again starts nothing new.
    let again = alice.raw("POST", "/v1/connections/warm", "").await;
    assert_eq!(again.status, 202, "{}", again.text());
    assert!(states(&again.json()).iter().all(|(_, s)| s == "ready"));
    let stats = server.admin().get("/v1/stats").await.json();
    assert_eq!(stats["counters"]["spawns"], 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_named_servers_starts_only_those_and_reports_the_rest() {
    let server = TestServer::api_key().await;
    let carol = server.user("carol");
    for name in ["demo", "demo2"] {
        assert_eq!(carol.connect(name).await.status, 201);
    }
    let warmed = carol
        .post_json(
            "/v1/connections/warm",
            &json!({ "servers": ["demo2", "demo3", "demo2"] }),
        )
        .await;
    assert_eq!(warmed.status, 202, "{}", warmed.text());
    let body = warmed.json();
    assert_eq!(
        states(&body),
        vec![("demo2".to_owned(), "started".to_owned())]
    );
    assert_eq!(body["skipped"][0]["server"], "demo3");
    assert_eq!(body["skipped"][0]["code"], "no_credentials");
    assert_eq!(body["skipped"].as_array().unwrap().len(), 1);

    assert!(
        wait_until(PATIENCE, || async {
            state_of(&carol, "demo2").await == "ready"
        })
        .await,
        "demo2 became ready"
    );
    assert_eq!(
        state_of(&carol, "demo").await,
        "closed",
        "not named, not started"
    );

    let bad = carol
        .post_json(
            "/v1/connections/warm",
            &json!({ "servers": ["Not A Name"] }),
        )
        .await;
    bad.expect_error(400, "invalid_body");
    let unknown_field = carol
        .post_json("/v1/connections/warm", &json!({ "server": ["demo"] }))
        .await;
    unknown_field.expect_error(400, "invalid_body");
    server.stop().await;
}
