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

/// The page in Chromium, step by step (see `tests/browser/admin.mjs`); the screenshots stay in
/// `target/admin-screenshots/` for a person to look at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_a_real_browser() {
    let playwright = std::env::var("MCP_POOL_TEST_PLAYWRIGHT").expect(
        "MCP_POOL_TEST_PLAYWRIGHT: run scripts/setup-test-env and source .test-servers/env.sh",
    );
    let chromium = std::env::var("MCP_POOL_TEST_CHROMIUM").expect("MCP_POOL_TEST_CHROMIUM");
    // Short backoff: the restart after the crash should not wait for the default.
    let ts = TestServer::start(
        "restart_backoff_base = \"50ms\"\nrestart_backoff_cap = \"200ms\"",
        "",
        "",
        &[],
    )
    .await;
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("admin-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/admin.mjs");
    let run = tokio::process::Command::new("node")
        .arg(script)
        .env("BASE_URL", format!("http://{}", ts.addr))
        .env("ADMIN_KEY", &ts.admin_key)
        .env("SERVICE_KEY", &ts.service_key)
        .env("SHOTS_DIR", &shots)
        .env("MCP_POOL_TEST_PLAYWRIGHT", playwright)
        .env("MCP_POOL_TEST_CHROMIUM", chromium)
        .env("PATIENCE_MS", common::PATIENCE.as_millis().to_string())
        .kill_on_drop(true)
        .output();
    // Each step waits at most PATIENCE; the whole run is bounded by the steps.
    let output = tokio::time::timeout(common::PATIENCE * 8, run)
        .await
        .expect("the browser run ends")
        .expect("node runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success(),
        "browser run failed ({}):\n{stdout}\n{stderr}\nscreenshots in {}",
        output.status,
        shots.display()
    );
    assert!(stdout.contains("ok: 6 steps"), "{stdout}");
    let mut taken: Vec<String> = std::fs::read_dir(&shots)
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    taken.sort();
    assert_eq!(
        taken,
        [
            "01-login.png",
            "02-wrong-key-refused.png",
            "03-signed-in.png",
            "04-session-after-rest-call.png",
            "05-crash-and-restart.png",
            "06-closed-from-the-page.png",
        ]
    );
    for name in &taken {
        let png = std::fs::read(shots.join(name)).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 4096,
            "{name} is a real screenshot"
        );
    }
    ts.stop().await;
}
