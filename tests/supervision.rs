//! Supervision that cannot fail silently: the PoolGuardian restarts the pool supervisor a
//! bounded number of times, then gives up; the service then reports itself unready, closes
//! what it can and `App::serve` returns an error (so `mcp-pool serve` exits non-zero).

mod common;
#[path = "common/http.rs"]
mod http;

use common::{PATIENCE, alive, wait_until};
use http::{TestServer, content_text};
use mcp_pool::actors::PoolHandle;
use mcp_pool::app::AppError;
use serde_json::json;

/// The guardian tolerates this many supervisor failures within its window (actors.md).
const GUARDIAN_MAX_RESTARTS: usize = 5;

/// Kills the current supervisor outright and waits until the guardian has put a running
/// replacement into the handle's slot.
async fn kill_supervisor_and_await_replacement(pool: &PoolHandle) {
    let old = pool.supervisor_cell().get_id();
    pool.supervisor_cell().kill();
    let replaced = wait_until(PATIENCE, || async {
        pool.supervisor_cell().get_id() != old && pool.is_available()
    })
    .await;
    assert!(replaced, "the guardian replaced the killed supervisor");
}

/// Starts a demo session for `user` and returns its server's pid.
async fn live_session(ts: &TestServer, user: &str) -> u32 {
    let client = ts.user(user);
    assert!(client.connect("demo").await.status < 300);
    let echoed = client
        .call("demo", "echo", &json!({ "message": "hi" }))
        .await;
    assert_eq!(echoed.status, 200, "{}", echoed.text());
    assert_eq!(content_text(&echoed.json()), "hi");
    let stats = ts.admin().get("/v1/stats").await.json();
    stats["connections"][0]["pid"]
        .as_u64()
        .expect("a live session has a pid") as u32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guardian_restarts_within_its_limit_then_gives_up_and_the_service_stops_with_an_error()
{
    let mut ts = TestServer::api_key().await;
    let pool = ts.state.pool.clone();

    // Within the limit every failure is repaired, and the service stays ready and serving.
    for _ in 0..GUARDIAN_MAX_RESTARTS {
        kill_supervisor_and_await_replacement(&pool).await;
        let ready = ts.anonymous().get("/readyz").await;
        assert_eq!(ready.status, 200, "{}", ready.text());
    }
    let pid = live_session(&ts, "ann").await;
    assert!(alive(pid));

    // One failure more within the window: the guardian gives up, and `serve` ends by itself.
    pool.supervisor_cell().kill();
    let outcome = tokio::time::timeout(PATIENCE, ts.stopped())
        .await
        .expect("the service stops by itself once the pool is given up");
    assert!(
        matches!(outcome, Err(AppError::PoolFailed)),
        "serve reports the failure (mcp-pool exits non-zero): {outcome:?}"
    );
    assert!(!pool.is_available());
    // What could be closed was: the session's server does not outlive the pool.
    assert!(
        wait_until(PATIENCE, || std::future::ready(!alive(pid))).await,
        "server {pid} survived the pool"
    );
    // The listener is closed: nothing keeps answering 503 forever.
    assert!(
        tokio::net::TcpStream::connect(ts.addr).await.is_err(),
        "the listener still accepts connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_a_given_up_pool_as_not_ready() {
    // A long shutdown delay keeps the listener open after the pool is given up, so the probe
    // can be watched saying why it is unready.
    let ts = TestServer::start("", "[http]\nshutdown_delay = \"10m\"", "", &[]).await;
    let ready = ts.anonymous().get("/readyz").await;
    assert_eq!(
        (ready.status, ready.json()["status"].clone()),
        (200, json!("ready"))
    );

    let pool = ts.state.pool.clone();
    for _ in 0..GUARDIAN_MAX_RESTARTS {
        kill_supervisor_and_await_replacement(&pool).await;
    }
    pool.supervisor_cell().kill();
    let unready = wait_until(PATIENCE, || async {
        let probe = ts.anonymous().get("/readyz").await;
        probe.status == 503 && probe.json()["status"] == "pool_unavailable"
    })
    .await;
    assert!(
        unready,
        "/readyz says pool_unavailable once the guardian gave up"
    );
    // Requests that need the pool are refused with a retryable 503, not hung.
    let client = ts.user("bob");
    assert!(client.connect("demo").await.status < 300);
    client
        .call("demo", "echo", &json!({ "message": "x" }))
        .await
        .expect_error(503, "pool_unavailable");
    ts.abandon();
}
