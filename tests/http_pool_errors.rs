//! The pool's refusals as a client sees them over HTTP: status, error code, `Retry-After` and
//! `retry_safe`, each produced by the real pool with real processes (README, "Errors").

mod common;
#[path = "common/http.rs"]
mod http;

use common::{PATIENCE, wait_until};
use http::{Resp, TestServer};
use serde_json::json;

const BROKEN: &str = "[servers.broken]\ncommand = \"/bin/false\"\n\
     credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n";

/// `Retry-After` in whole seconds.
fn retry_after(resp: &Resp) -> u64 {
    resp.headers
        .get("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After: {}", resp.text()))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_answers_429_pool_full_with_retry_after() {
    let ts = TestServer::start("max_connections_per_user = 1", "", "", &[]).await;
    let hal = ts.user("hal");
    assert_eq!(hal.connect("demo").await.status, 201);
    assert_eq!(hal.connect("demo2").await.status, 201);
    // Hal's one session is busy, so it cannot be evicted to make room.
    let busy = {
        let hal = hal.clone();
        tokio::spawn(async move { hal.call("demo", "sleep", &json!({ "ms": 60_000 })).await })
    };
    let in_flight = wait_until(PATIENCE, || async {
        let stats = ts.state.pool.stats().await.unwrap();
        stats.connections.iter().any(|c| c.in_flight == 1)
    })
    .await;
    assert!(in_flight, "the first session is busy");
    let full = hal.call("demo2", "echo", &json!({ "message": "x" })).await;
    full.expect_error(429, "pool_full");
    assert!(retry_after(&full) >= 1);
    // Another user is not limited by Hal's quota.
    let ivy = ts.user("ivy");
    assert_eq!(ivy.connect("demo2").await.status, 201);
    assert_eq!(
        ivy.call("demo2", "echo", &json!({ "message": "y" }))
            .await
            .status,
        200
    );
    busy.abort();
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_starts_answer_502_then_503_circuit_open_with_retry_after() {
    let ts = TestServer::start(
        "max_restarts = 1\nfailed_cooldown = \"1h\"",
        BROKEN,
        "",
        &[],
    )
    .await;
    let jo = ts.user("jo");
    assert_eq!(jo.connect("broken").await.status, 201);
    // Nothing reached a server: safe to retry.
    for attempt in 1..=2 {
        let failed = jo.call("broken", "echo", &json!({})).await;
        failed.expect_error(502, "server_start_failed");
        assert_eq!(
            failed.json()["error"]["retry_safe"],
            true,
            "attempt {attempt}"
        );
    }
    // max_restarts = 1: the second failure tripped the circuit for the cool-down.
    let open = jo.call("broken", "echo", &json!({})).await;
    open.expect_error(503, "circuit_open");
    let secs = retry_after(&open);
    assert!((3000..=3600).contains(&secs), "Retry-After {secs}s");
    // Listing tools needs a session too, and is refused the same way.
    jo.get("/v1/connections/broken/tools")
        .await
        .expect_error(503, "circuit_open");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_over_the_call_timeout_answers_504_and_is_not_retry_safe() {
    let ts = TestServer::start("call_timeout = \"1s\"", "", "", &[]).await;
    let kim = ts.user("kim");
    assert_eq!(kim.connect("demo").await.status, 201);
    let slow = kim.call("demo", "sleep", &json!({ "ms": 120_000 })).await;
    slow.expect_error(504, "call_timeout");
    assert_eq!(slow.json()["error"]["retry_safe"], false);
    // The request was cancelled on the server (the server counts it once the cancellation
    // reached its sleep), and the session keeps serving.
    let cancelled = wait_until(PATIENCE, || async {
        let stats = kim.call("demo", "stats", &json!({})).await;
        assert_eq!(stats.status, 200, "{}", stats.text());
        let stats: serde_json::Value =
            serde_json::from_str(&http::content_text(&stats.json())).unwrap();
        stats["cancelled_sleeps"] == 1
    })
    .await;
    assert!(cancelled, "the timed-out call was cancelled on the server");
    ts.stop().await;
}
