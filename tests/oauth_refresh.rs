//! Automatic token refresh against a real OAuth 2 server (npm `oauth2-mock-server`, which here
//! also rotates refresh tokens and refuses rotated-away ones with `invalid_grant`).
//!
//! No test waits for a token to become due: tokens are issued with two hours left against a
//! `refresh_before` of one hour (not due, however slow the machine), and a test makes one due
//! by storing an expiry inside that hour (`TestServer::set_token_expiry`).

mod common;
#[path = "common/http.rs"]
mod http;
#[path = "common/oauth.rs"]
mod oauth;

use chrono::Duration as Span;
use common::{PATIENCE, wait_until};
use http::{TestServer, content_text};
use mcp_pool::actors::{RefreshArgs, TokenRefreshHandle};
use mcp_pool::oauth::Freshness;
use mcp_pool::store::{CredentialRecord, ServerName, UserId};
use oauth::{MockOAuth, oauth_server};
use serde_json::json;

/// Tokens issued with this many seconds left are not due (`refresh_before` is one hour).
const NOT_DUE: u64 = 7200;

/// `gdemo` and `grestart` (restarted after a refresh), both with `refresh_before = "1h"`, plus
/// `more` server tables.
async fn setup_with(more: impl FnOnce(&MockOAuth) -> String) -> (TestServer, MockOAuth) {
    let mock = MockOAuth::start().await;
    let extra = format!(
        "{}{}{}",
        oauth_server("gdemo", &mock, "1h", false),
        oauth_server("grestart", &mock, "1h", true),
        more(&mock)
    );
    // Fifty concurrent calls of one user are the point of one test: above the default
    // per-user in-flight limit.
    let ts = TestServer::start("max_in_flight_per_user = 64", &extra, "", &[]).await;
    (ts, mock)
}

async fn setup() -> (TestServer, MockOAuth) {
    setup_with(|_| String::new()).await
}

/// Due (inside the one-hour `refresh_before`) but not expired.
fn due() -> Span {
    Span::minutes(30)
}

fn ids(user: &str, server: &str) -> (UserId, ServerName) {
    (
        UserId::parse(user).unwrap(),
        ServerName::parse(server).unwrap(),
    )
}

/// The whole connect flow for `user`, with tokens that expire in `expires_in` seconds.
async fn connect(ts: &TestServer, mock: &MockOAuth, user: &str, server: &str, expires_in: u64) {
    mock.control(json!({ "expires_in": expires_in })).await;
    mock.connect(&ts.user(user), &ts.anonymous(), server).await;
}

async fn record(ts: &TestServer, user: &str, server: &str) -> Option<CredentialRecord> {
    let (user, server) = ids(user, server);
    ts.state.store.get(&user, &server).await.unwrap()
}

async fn whoami_pid(ts: &TestServer, user: &str, server: &str) -> u64 {
    let resp = ts.user(user).call(server, "whoami", &json!({})).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let who: serde_json::Value = serde_json::from_str(&content_text(&resp.json())).unwrap();
    who["instance"].as_u64().unwrap()
}

fn file_access_token(record: &CredentialRecord) -> Option<String> {
    let text = std::fs::read_to_string(&record.info.credentials_path).ok()?;
    let file: serde_json::Value = serde_json::from_str(&text).ok()?;
    file["access_token"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn tokens_are_refreshed_before_expiry_rotated_and_rewritten_to_the_file() {
    let (ts, mock) = setup().await;
    connect(&ts, &mock, "alice", "gdemo", NOT_DUE).await;
    let pid = whoami_pid(&ts, "alice", "gdemo").await;
    assert_eq!(mock.refresh_requests().await, 0, "not due yet");

    ts.set_token_expiry("alice", "gdemo", due()).await;
    let before = record(&ts, "alice", "gdemo").await.unwrap();
    assert_eq!(
        whoami_pid(&ts, "alice", "gdemo").await,
        pid,
        "no restart configured"
    );
    assert_eq!(mock.refresh_requests().await, 1);
    let after = record(&ts, "alice", "gdemo").await.unwrap();
    assert!(after.info.version > before.info.version);
    assert_ne!(after.tokens.access_token, before.tokens.access_token);
    // Rotated: the new refresh token replaced the old (which the server now refuses).
    assert_ne!(after.tokens.refresh_token, before.tokens.refresh_token);
    assert!(after.tokens.token_expiry.unwrap() > chrono::Utc::now() + chrono::Duration::hours(1));
    assert_eq!(
        file_access_token(&after).as_deref(),
        after.tokens.access_token.as_ref().map(|t| t.expose())
    );
    // Fresh now: later calls send nothing.
    whoami_pid(&ts, "alice", "gdemo").await;
    assert_eq!(mock.refresh_requests().await, 1);

    // A provider that does not rotate: the old refresh token is kept, and still works.
    connect(&ts, &mock, "bob", "gdemo", NOT_DUE).await;
    ts.set_token_expiry("bob", "gdemo", due()).await;
    let bob_before = record(&ts, "bob", "gdemo").await.unwrap();
    mock.control(json!({ "expires_in": NOT_DUE, "omit_refresh_token": true }))
        .await;
    whoami_pid(&ts, "bob", "gdemo").await;
    let bob_after = record(&ts, "bob", "gdemo").await.unwrap();
    assert_ne!(
        bob_after.tokens.access_token,
        bob_before.tokens.access_token
    );
    assert_eq!(
        bob_after.tokens.refresh_token,
        bob_before.tokens.refresh_token
    );
    assert_eq!(mock.refresh_requests().await, 2);
    ts.set_token_expiry("bob", "gdemo", due()).await;
    mock.control(json!({ "expires_in": NOT_DUE, "omit_refresh_token": false }))
        .await;
    whoami_pid(&ts, "bob", "gdemo").await;
    assert_eq!(mock.refresh_requests().await, 3);
    assert!(record(&ts, "bob", "gdemo").await.unwrap().info.is_active);
    ts.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_calls_at_expiry_cause_exactly_one_refresh_request() {
    let (ts, mock) = setup().await;
    connect(&ts, &mock, "alice", "gdemo", NOT_DUE).await;
    whoami_pid(&ts, "alice", "gdemo").await;
    ts.set_token_expiry("alice", "gdemo", due()).await;
    // A slow token endpoint, so every call arrives while the one refresh is in flight.
    mock.control(json!({ "expires_in": 7200, "delay_ms": 300, "reset_stats": true }))
        .await;
    let client = ts.user("alice");
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .call("gdemo", "echo", &json!({ "message": format!("m{i}") }))
                    .await
            })
        })
        .collect();
    for call in calls {
        let resp = call.await.unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let stats = mock.stats().await;
    assert_eq!(stats["token_requests"], 1, "{stats}");
    assert_eq!(stats["by_grant"]["refresh_token"], 1, "{stats}");
    ts.stop().await;
}

#[tokio::test]
async fn invalid_grant_deactivates_closes_the_session_and_asks_for_a_reconnect() {
    let (ts, mock) = setup().await;
    connect(&ts, &mock, "alice", "gdemo", NOT_DUE).await;
    whoami_pid(&ts, "alice", "gdemo").await;
    let path = record(&ts, "alice", "gdemo")
        .await
        .unwrap()
        .info
        .credentials_path;
    ts.set_token_expiry("alice", "gdemo", due()).await;
    mock.control(json!({ "revoke_all": true })).await;

    let resp = ts.user("alice").call("gdemo", "whoami", &json!({})).await;
    resp.expect_error(409, "reconnect_required");
    assert!(record(&ts, "alice", "gdemo").await.is_none(), "deactivated");
    assert!(!path.exists(), "credentials file removed");
    let (user, server) = ids("alice", "gdemo");
    let stats = ts.state.pool.stats().await.unwrap();
    assert!(
        !stats
            .connections
            .iter()
            .any(|c| c.user_id == user && c.server == server),
        "session closed"
    );
    // Still "reconnect required", not a generic "no credentials", until the user reconnects,
    // and after a restart too: it is stored with the row, not kept in memory.
    ts.user("alice")
        .call("gdemo", "whoami", &json!({}))
        .await
        .expect_error(409, "reconnect_required");
    let ts = ts.restart().await;
    ts.user("alice")
        .call("gdemo", "whoami", &json!({}))
        .await
        .expect_error(409, "reconnect_required");
    let listed = ts.user("alice").get("/v1/connections").await.json();
    assert_eq!(listed["reconnect_required"], json!(["gdemo"]), "{listed}");
    assert_eq!(listed["connections"], json!([]), "{listed}");
    // Bob's grant was never revoked: the flag is per (user, server).
    ts.user("bob")
        .call("gdemo", "whoami", &json!({}))
        .await
        .expect_error(404, "no_credentials");

    connect(&ts, &mock, "alice", "gdemo", 7200).await;
    whoami_pid(&ts, "alice", "gdemo").await;
    let listed = ts.user("alice").get("/v1/connections").await.json();
    assert_eq!(listed["reconnect_required"], json!([]), "{listed}");
    assert_eq!(listed["connections"][0]["server"], "gdemo", "{listed}");
    ts.stop().await;
}

#[tokio::test]
async fn a_failing_token_endpoint_keeps_the_credentials_and_backs_off() {
    // `gcool` cools down for ten minutes after a failed refresh: only a hang that long could
    // let a retry through the window this test looks at.
    let (ts, mock) = setup_with(|mock| {
        format!(
            "{}refresh_cooldown = \"10m\"\n",
            oauth_server("gcool", mock, "1h", false)
        )
    })
    .await;
    connect(&ts, &mock, "alice", "gcool", NOT_DUE).await;
    whoami_pid(&ts, "alice", "gcool").await;
    ts.set_token_expiry("alice", "gcool", due()).await;
    let before = record(&ts, "alice", "gcool").await.unwrap();
    mock.control(json!({ "token_status": 500, "reset_stats": true }))
        .await;

    // Due but not expired: the call goes ahead on the current token.
    whoami_pid(&ts, "alice", "gcool").await;
    let tries = mock.token_requests().await;
    assert_eq!(tries, 3, "retried with backoff within the request");
    let kept = record(&ts, "alice", "gcool").await.unwrap();
    assert_eq!(kept.tokens, before.tokens);
    assert_eq!(
        file_access_token(&kept).as_deref(),
        before.tokens.access_token.as_ref().map(|t| t.expose())
    );
    // Cooling down: the next calls send nothing.
    whoami_pid(&ts, "alice", "gcool").await;
    whoami_pid(&ts, "alice", "gcool").await;
    assert_eq!(mock.token_requests().await, tries);

    // Expired and the provider still down: 503, credentials kept (`gdemo` cools down for 1 s).
    mock.control(json!({ "token_status": null })).await;
    connect(&ts, &mock, "bob", "gdemo", NOT_DUE).await;
    ts.set_token_expiry("bob", "gdemo", Span::minutes(-1)).await;
    let bob_before = record(&ts, "bob", "gdemo").await.unwrap();
    mock.control(json!({ "token_status": 503 })).await;
    let resp = ts.user("bob").call("gdemo", "whoami", &json!({})).await;
    resp.expect_error(503, "token_refresh_unavailable");
    assert!(resp.headers.contains_key("retry-after"));
    let bob_kept = record(&ts, "bob", "gdemo").await.unwrap();
    assert_eq!(bob_kept.tokens, bob_before.tokens);
    assert!(bob_kept.info.credentials_path.exists());

    // The provider is back: once the cool-down is over a call refreshes (calls during it are
    // refused without a token request and do not extend it).
    mock.control(json!({ "token_status": null, "expires_in": NOT_DUE }))
        .await;
    let refreshed = wait_until(PATIENCE, || async {
        ts.user("bob")
            .call("gdemo", "whoami", &json!({}))
            .await
            .status
            == 200
    })
    .await;
    assert!(refreshed, "a call after the cool-down refreshed");
    let bob_after = record(&ts, "bob", "gdemo").await.unwrap();
    assert_ne!(
        bob_after.tokens.access_token,
        bob_before.tokens.access_token
    );
    ts.stop().await;
}

#[tokio::test]
async fn restart_on_token_refresh_restarts_between_calls_never_during_one() {
    let (ts, mock) = setup().await;
    connect(&ts, &mock, "alice", "grestart", NOT_DUE).await;
    let pid = whoami_pid(&ts, "alice", "grestart").await;
    let (user, server) = ids("alice", "grestart");
    let in_flight = || async {
        let stats = ts.state.pool.stats().await.unwrap();
        stats
            .connections
            .iter()
            .find(|c| c.user_id == user && c.server == server)
            .map(|c| c.in_flight)
    };

    // A long call, in flight when the refresh happens.
    let client = ts.user("alice");
    let long = tokio::spawn(async move {
        client
            .call("grestart", "sleep", &json!({ "ms": 5000 }))
            .await
    });
    assert!(wait_until(PATIENCE, || async { in_flight().await == Some(1) }).await);
    ts.set_token_expiry("alice", "grestart", due()).await;
    mock.control(json!({ "expires_in": NOT_DUE })).await;
    // This call refreshes; the session is busy, so it is not restarted under the long call.
    assert_eq!(whoami_pid(&ts, "alice", "grestart").await, pid);
    assert_eq!(mock.refresh_requests().await, 1);
    let resp = long.await.unwrap();
    assert_eq!(
        resp.status,
        200,
        "the call in flight completed: {}",
        resp.text()
    );
    assert_eq!(content_text(&resp.json()), "slept 5000 ms");

    // When that last call ended, the session was closed; the next call starts a new process,
    // which reads the new token.
    let closed = wait_until(PATIENCE, || async { in_flight().await.is_none() }).await;
    assert!(closed, "the session restarts once no call is in flight");
    let new_pid = whoami_pid(&ts, "alice", "grestart").await;
    assert_ne!(new_pid, pid, "restarted after the refresh");
    assert_eq!(mock.refresh_requests().await, 1, "no second refresh");
    ts.stop().await;
}

#[tokio::test]
async fn session_start_and_the_periodic_sweep_refresh_too() {
    // `gsweep`'s short `refresh_before` makes the service's own sweep tick every second.
    let (ts, mock) = setup_with(|mock| oauth_server("gsweep", mock, "5s", false)).await;

    // No live session: the pool's start refreshes before spawning the server.
    connect(&ts, &mock, "alice", "gdemo", NOT_DUE).await;
    ts.set_token_expiry("alice", "gdemo", due()).await;
    mock.control(json!({ "expires_in": NOT_DUE })).await;
    let (alice, server) = ids("alice", "gdemo");
    ts.state
        .pool
        .call_tool(&alice, &server, "whoami", None)
        .await
        .unwrap();
    assert_eq!(mock.refresh_requests().await, 1);

    // A live session, no calls: a sweep on request finds nothing due...
    connect(&ts, &mock, "bob", "gsweep", NOT_DUE).await;
    whoami_pid(&ts, "bob", "gsweep").await;
    let sweeper = TokenRefreshHandle::spawn(RefreshArgs {
        pool: ts.state.pool.clone(),
        interval: None,
    })
    .await
    .unwrap();
    assert_eq!(sweeper.sweep_now().await.unwrap(), 0, "not due yet");
    sweeper.stop().await;
    assert_eq!(
        sweeper.sweep_now().await.unwrap_err().to_string(),
        "the token refresh actor is not running",
        "a stopped sweeper says so instead of answering 0"
    );
    // ...and once the token is due, the service's periodic sweep refreshes it with nobody
    // calling anything.
    ts.set_token_expiry("bob", "gsweep", Span::seconds(3)).await;
    let swept = wait_until(PATIENCE, || async { mock.refresh_requests().await == 2 }).await;
    assert!(swept, "the periodic sweep refreshed Bob's live session");
    let (bob, gsweep) = ids("bob", "gsweep");
    let refresher = ts.state.pool.refresher().unwrap();
    assert_eq!(
        refresher.check_now(&bob, &gsweep).await.unwrap(),
        Freshness::Fresh
    );
    ts.stop().await;
}
