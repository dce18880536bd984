//! The operator's view: the admin-only event feed, closing one session, the status page's
//! assets, and the page itself driven in a real browser (Playwright over Debian's Chromium,
//! both installed by `scripts/setup-test-env`), with a screenshot of each step kept under
//! `target/admin-screenshots/`.

mod common;
#[path = "common/http.rs"]
mod http;

use http::TestServer;
use serde_json::{Value, json};

/// Reads the feed until an event for `user` of kind `kind` arrives.
async fn wait_for_event(feed: &mut http::Streaming, user: &str, kind: &str) -> Value {
    loop {
        let (name, data) = feed.next_event().await.expect("the feed stays open");
        assert_eq!(name, "pool", "{data}");
        if data["user_id"] == user && data["event"] == kind {
            return data;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_feed_is_admin_only_and_tells_what_happens() {
    let ts = TestServer::api_key().await;
    // A user's key, a wrong admin key and no key are all refused.
    ts.user("carol")
        .get("/v1/admin/events")
        .await
        .expect_error(403, "forbidden");
    ts.bearer("not-the-admin-key")
        .get("/v1/admin/events")
        .await
        .expect_error(401, "unauthorized");
    ts.anonymous()
        .get("/v1/admin/events")
        .await
        .expect_error(401, "unauthorized");

    let carol = ts.user("carol");
    assert_eq!(carol.connect("demo").await.status, 201);
    let mut feed = ts.admin().get_streaming("/v1/admin/events").await;
    assert_eq!(feed.status, 200);
    assert_eq!(feed.headers["content-type"], "text/event-stream");
    // Connecting happened before the feed opened: it comes from the history.
    wait_for_event(&mut feed, "carol", "credentials_changed").await;

    let call = carol.call("demo", "whoami", &json!({})).await;
    assert_eq!(call.status, 200, "{}", call.text());
    let started = wait_for_event(&mut feed, "carol", "started").await;
    assert_eq!(started["server"], "demo");
    assert!(started["pid"].as_u64().is_some(), "{started}");
    assert_eq!(started["restart"], false);

    let closed = ts
        .admin()
        .delete("/v1/admin/users/carol/connections/demo")
        .await;
    assert_eq!(closed.status, 200, "{}", closed.text());
    assert_eq!(closed.json()["closed"], true);
    let event = wait_for_event(&mut feed, "carol", "closed").await;
    assert_eq!(event["reason"], "requested");
    let stats = ts.admin().get("/v1/stats").await.json();
    assert!(
        stats["connections"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["user_id"] != "carol" || s["state"] == "closing"),
        "{stats}"
    );
    // The user's own key cannot close sessions by the admin route either.
    ts.user("carol")
        .delete("/v1/admin/users/carol/connections/demo")
        .await
        .expect_error(403, "forbidden");

    // The feed ends when the service shuts down, so it never holds up the drain.
    let mut ts = ts;
    ts.begin_shutdown();
    while feed.next_event().await.is_some() {}
    ts.stopped().await.expect("stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_static_and_locked_down() {
    let ts = TestServer::api_key().await;
    let page = ts.anonymous().get("/admin").await;
    assert_eq!(page.status, 200);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert_eq!(page.headers["x-content-type-options"], "nosniff");
    let html = page.text();
    assert!(
        html.contains("/admin/app.js") && !html.contains("<script>"),
        "no inline script"
    );
    let script = ts.anonymous().get("/admin/app.js").await;
    assert_eq!(script.status, 200);
    assert!(script.text().contains("sessionStorage"));
    assert!(
        !script.text().contains("innerHTML"),
        "data is written as text, never parsed as HTML"
    );
    assert_eq!(ts.anonymous().get("/admin/app.css").await.status, 200);
    ts.stop().await;
}
