//! The OAuth connect flow against a real OAuth 2 server (npm `oauth2-mock-server` on
//! loopback): its authorize endpoint redirects to our callback, its token endpoint exchanges
//! the code and checks the PKCE verifier.

mod common;
#[path = "common/http.rs"]
mod http;
#[path = "common/oauth.rs"]
mod oauth;

use std::os::unix::fs::PermissionsExt;

use http::{TestServer, content_text};
use mcp_pool::oauth::{OAuthError, Provider, pkce};
use mcp_pool::store::{ServerName, UserId};
use oauth::{FAILURE, MockOAuth, SUCCESS, oauth_server, path_and_query, query_param, with_param};
use serde_json::json;

async fn setup() -> (TestServer, MockOAuth) {
    let mock = MockOAuth::start().await;
    let extra = format!(
        "{}{}",
        oauth_server("gdemo", &mock, "5m", false),
        oauth_server("gdemo2", &mock, "5m", false)
    );
    let ts = TestServer::start("", &extra, "", &[]).await;
    (ts, mock)
}

/// `POST /start` as `user`; returns the authorization URL.
async fn start(ts: &TestServer, user: &str, server: &str) -> String {
    let resp = ts
        .user(user)
        .post_json(&format!("/v1/oauth/{server}/start"), &json!({}))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()["authorization_url"]
        .as_str()
        .expect("authorization_url")
        .to_owned()
}

/// The browser arriving at our callback; returns where we redirect it.
async fn callback(ts: &TestServer, redirect: &str) -> String {
    let resp = ts.anonymous().get(&path_and_query(redirect)).await;
    assert_eq!(resp.status, 303, "{}", resp.text());
    resp.headers
        .get("location")
        .expect("Location")
        .to_str()
        .expect("ascii")
        .to_owned()
}

fn ids(user: &str, server: &str) -> (UserId, ServerName) {
    (
        UserId::parse(user).unwrap(),
        ServerName::parse(server).unwrap(),
    )
}

async fn raw_tokens(ts: &TestServer, user: &str) -> Vec<(String, Option<String>, bool)> {
    use sqlx::Connection;
    let url = format!(
        "sqlite://{}",
        ts.dir.path().join("data/db.sqlite").display()
    );
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query_as(
        "SELECT server_name, access_token, is_active FROM mcp_connections WHERE user_id = $1",
    )
    .bind(user)
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

#[tokio::test]
async fn connect_flow_stores_an_encrypted_row_and_a_private_file_that_the_server_sees() {
    let (ts, mock) = setup().await;
    let url = start(&ts, "alice", "gdemo").await;
    assert!(
        url.starts_with(&format!("{}/authorize?", mock.url)),
        "{url}"
    );
    assert_eq!(
        query_param(&url, "code_challenge_method").as_deref(),
        Some("S256")
    );
    assert_eq!(query_param(&url, "response_type").as_deref(), Some("code"));
    assert_eq!(query_param(&url, "access_type").as_deref(), Some("offline"));
    assert_eq!(query_param(&url, "prompt").as_deref(), Some("consent"));
    assert_eq!(
        query_param(&url, "scope").as_deref(),
        Some("openid analytics.readonly")
    );
    let state = query_param(&url, "state").unwrap();
    assert!(state.len() >= 43);

    let redirect = mock.authorize(&url).await;
    let location = callback(&ts, &redirect).await;
    assert_eq!(location, format!("{SUCCESS}?connected=gdemo"));
    assert_eq!(mock.stats().await["by_grant"]["authorization_code"], 1);

    // The row: active, tokens encrypted at rest, an expiry from expires_in.
    let (user, server) = ids("alice", "gdemo");
    let record = ts
        .state
        .store
        .get(&user, &server)
        .await
        .unwrap()
        .expect("row");
    let access = record.tokens.access_token.clone().expect("access token");
    assert!(record.tokens.refresh_token.is_some());
    let expiry = record.tokens.token_expiry.expect("expiry");
    assert!(expiry > chrono::Utc::now() + chrono::Duration::minutes(55));
    let raw = raw_tokens(&ts, "alice").await;
    assert_eq!(raw.len(), 1);
    let ciphertext = raw[0].1.clone().expect("ciphertext");
    assert!(!ciphertext.contains(access.expose()));
    assert!(!ciphertext.contains(&access.expose()[..20]));

    // The file: 0600, with the same tokens.
    let path = &record.info.credentials_path;
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(file["access_token"].as_str(), Some(access.expose()));

    // A tool call: the server was given that file.
    let resp = ts.user("alice").call("gdemo", "whoami", &json!({})).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let who: serde_json::Value = serde_json::from_str(&content_text(&resp.json())).unwrap();
    assert_eq!(who["credentials_file"]["path"], path.display().to_string());
    assert_eq!(who["credentials_file"]["exists"], true);
    assert_eq!(
        who["credentials_file"]["keys"],
        json!(["access_token", "refresh_token", "token_expiry"])
    );

    // Nothing secret in the answers.
    let listed = ts.user("alice").get("/v1/connections/gdemo").await;
    assert!(!listed.text().contains(access.expose()));
    ts.stop().await;
}

#[tokio::test]
async fn a_state_works_once_and_replay_tampering_and_expiry_are_refused() {
    let (ts, mock) = setup().await;
    let (user, server) = ids("alice", "gdemo");

    // Tampered: one character changed. Refused, and the real state still works afterwards.
    let url = start(&ts, "alice", "gdemo").await;
    let redirect = mock.authorize(&url).await;
    let state = query_param(&redirect, "state").unwrap();
    let mut tampered = state.clone().into_bytes();
    tampered[5] = if tampered[5] == b'A' { b'B' } else { b'A' };
    let bad = with_param(&redirect, "state", &String::from_utf8(tampered).unwrap());
    let location = callback(&ts, &bad).await;
    assert_eq!(
        location,
        format!("{FAILURE}?error=invalid_state&server=gdemo")
    );
    assert!(ts.state.store.get(&user, &server).await.unwrap().is_none());
    let no_state = with_param(&redirect, "state", "");
    assert!(
        callback(&ts, &no_state)
            .await
            .contains("error=invalid_state")
    );

    assert_eq!(
        callback(&ts, &redirect).await,
        format!("{SUCCESS}?connected=gdemo")
    );
    let version = ts
        .state
        .store
        .get(&user, &server)
        .await
        .unwrap()
        .unwrap()
        .info
        .version;

    // Replay of the used state (even with a fresh code from the provider): refused, nothing
    // written.
    let replay = mock.authorize(&url).await;
    assert!(callback(&ts, &replay).await.contains("error=invalid_state"));
    let after = ts.state.store.get(&user, &server).await.unwrap().unwrap();
    assert_eq!(after.info.version, version);

    // Expired: a state older than 10 minutes (aged in the database).
    let url = start(&ts, "bob", "gdemo").await;
    let redirect = mock.authorize(&url).await;
    {
        use sqlx::Connection;
        let db = format!(
            "sqlite://{}",
            ts.dir.path().join("data/db.sqlite").display()
        );
        let mut conn = sqlx::SqliteConnection::connect(&db).await.unwrap();
        let past = chrono::Utc::now() - chrono::Duration::seconds(1);
        let aged = sqlx::query("UPDATE oauth_states SET expires_at = $1 WHERE user_id = 'bob'")
            .bind(past)
            .execute(&mut conn)
            .await
            .unwrap();
        assert_eq!(aged.rows_affected(), 1);
    }
    assert_eq!(
        callback(&ts, &redirect).await,
        format!("{FAILURE}?error=state_expired&server=gdemo")
    );
    let (bob, _) = ids("bob", "gdemo");
    assert!(ts.state.store.get(&bob, &server).await.unwrap().is_none());
    // ... and it was consumed.
    assert!(
        callback(&ts, &redirect)
            .await
            .contains("error=invalid_state")
    );
    ts.stop().await;
}

#[tokio::test]
async fn cross_user_and_cross_server_use_is_refused_and_the_pkce_verifier_is_checked_by_the_server()
{
    let (ts, mock) = setup().await;
    let alice_url = start(&ts, "alice", "gdemo").await;
    let bob_url = start(&ts, "bob", "gdemo").await;
    let bob_redirect = mock.authorize(&bob_url).await;
    let alice_redirect = mock.authorize(&alice_url).await;

    // Bob's code with Alice's state: we send Alice's verifier for a code bound to Bob's
    // challenge, and the provider refuses it.
    let mixed = with_param(
        &alice_redirect,
        "code",
        &query_param(&bob_redirect, "code").unwrap(),
    );
    assert_eq!(
        callback(&ts, &mixed).await,
        format!("{FAILURE}?error=token_exchange_failed&server=gdemo")
    );
    let stats = mock.stats().await;
    assert_eq!(stats["token_requests"], 1, "{stats}");
    assert!(stats["by_grant"]["authorization_code"].is_null(), "{stats}");
    for user in ["alice", "bob"] {
        let (user, server) = ids(user, "gdemo");
        assert!(ts.state.store.get(&user, &server).await.unwrap().is_none());
    }

    // A state issued for gdemo2 presented at gdemo's callback: refused.
    let other_url = start(&ts, "bob", "gdemo2").await;
    let other_redirect = mock.authorize(&other_url).await;
    let cross = path_and_query(&other_redirect).replace("/gdemo2/", "/gdemo/");
    let resp = ts.anonymous().get(&cross).await;
    assert_eq!(resp.status, 303);
    assert!(
        resp.headers["location"]
            .to_str()
            .unwrap()
            .contains("error=invalid_state")
    );

    // Bob's own flow, with a fresh code for his challenge, connects Bob only.
    let bob_again = mock.authorize(&bob_url).await;
    assert_eq!(
        callback(&ts, &bob_again).await,
        format!("{SUCCESS}?connected=gdemo")
    );
    let (bob, server) = ids("bob", "gdemo");
    let (alice, _) = ids("alice", "gdemo");
    assert!(ts.state.store.get(&bob, &server).await.unwrap().is_some());
    assert!(ts.state.store.get(&alice, &server).await.unwrap().is_none());
    ts.stop().await;
}

#[tokio::test]
async fn access_denied_and_token_endpoint_failures_store_nothing_and_keep_old_credentials() {
    let (ts, mock) = setup().await;
    let (user, server) = ids("alice", "gdemo");

    // The user declines on the provider's page.
    let url = start(&ts, "alice", "gdemo").await;
    let redirect = mock.authorize(&url).await;
    let denied = with_param(&redirect, "error", "access_denied");
    let denied = reqwest::Url::parse(&denied)
        .unwrap()
        .query_pairs()
        .filter(|(k, _)| k != "code")
        .fold(
            reqwest::Url::parse("http://127.0.0.1:9/v1/oauth/gdemo/callback").unwrap(),
            |mut u, (k, v)| {
                u.query_pairs_mut().append_pair(&k, &v);
                u
            },
        );
    assert_eq!(
        callback(&ts, denied.as_str()).await,
        format!("{FAILURE}?error=access_denied&server=gdemo")
    );
    assert!(ts.state.store.get(&user, &server).await.unwrap().is_none());

    // Connected once; then a reconnect meets a failing token endpoint: the stored credentials
    // stay exactly as they were.
    let url = start(&ts, "alice", "gdemo").await;
    callback(&ts, &mock.authorize(&url).await).await;
    let before = ts.state.store.get(&user, &server).await.unwrap().unwrap();

    mock.control(json!({ "token_status": 500 })).await;
    let url = start(&ts, "alice", "gdemo").await;
    assert_eq!(
        callback(&ts, &mock.authorize(&url).await).await,
        format!("{FAILURE}?error=provider_unavailable&server=gdemo")
    );
    mock.control(json!({ "token_status": null, "token_error": "invalid_grant" }))
        .await;
    let url = start(&ts, "alice", "gdemo").await;
    assert_eq!(
        callback(&ts, &mock.authorize(&url).await).await,
        format!("{FAILURE}?error=token_exchange_failed&server=gdemo")
    );
    let after = ts.state.store.get(&user, &server).await.unwrap().unwrap();
    assert_eq!(after.info.version, before.info.version);
    assert_eq!(after.tokens, before.tokens);
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&after.info.credentials_path).unwrap())
            .unwrap();
    assert_eq!(
        file["access_token"].as_str(),
        before.tokens.access_token.as_ref().map(|t| t.expose())
    );
    ts.stop().await;
}

#[tokio::test]
async fn start_needs_a_user_and_a_configured_flow() {
    let (ts, _mock) = setup().await;
    let resp = ts
        .anonymous()
        .post_json("/v1/oauth/gdemo/start", &json!({}))
        .await;
    assert_eq!(resp.status, 401, "{}", resp.text());
    // The bundled demo server has no OAuth client.
    let resp = ts
        .user("alice")
        .post_json("/v1/oauth/demo/start", &json!({}))
        .await;
    resp.expect_error(404, "oauth_not_configured");
    let resp = ts
        .anonymous()
        .get("/v1/oauth/demo/callback?state=x&code=y")
        .await;
    resp.expect_error(404, "oauth_not_configured");
    let resp = ts.anonymous().get("/v1/oauth/nope/callback?state=x").await;
    resp.expect_error(404, "unknown_server");
    // The API description lists both routes.
    let doc = ts.anonymous().get("/openapi.json").await.json();
    assert!(doc["paths"]["/v1/oauth/{server}/start"]["post"].is_object());
    assert!(doc["paths"]["/v1/oauth/{server}/callback"]["get"].is_object());
    ts.stop().await;
}

/// The provider client on its own: client authentication as configured, and a wrong PKCE
/// verifier refused by the real server.
#[tokio::test]
async fn client_authentication_and_pkce_at_the_token_endpoint() {
    let mock = MockOAuth::start().await;
    for (method, expected) in [
        ("client_secret_post", "post"),
        ("client_secret_basic", "basic"),
    ] {
        let text = format!(
            "{}token_auth_method = \"{method}\"\nclient_secret_env = \"MCP_POOL_TEST_SECRET\"\n",
            oauth_server("gdemo", &mock, "5m", false)
        );
        let config = mcp_pool::config::Config::parse(&text).unwrap();
        config.validate().unwrap();
        let oauth_config = config.servers["gdemo"].oauth.clone().unwrap();
        let env = |name: &str| (name == "MCP_POOL_TEST_SECRET").then(|| "s3cret:/+".to_owned());
        let http = mcp_pool::oauth::provider::http_client().unwrap();
        let provider = Provider::from_config(
            ServerName::parse("gdemo").unwrap(),
            &oauth_config,
            &env,
            http,
        )
        .unwrap();
        assert!(!format!("{provider:?}").contains("s3cret"));

        let verifier = pkce::random_token().unwrap();
        let state = pkce::random_token().unwrap();
        let url = provider
            .authorization_url(&state, &pkce::s256_challenge(&verifier))
            .unwrap();
        // A wrong verifier: the server refuses the code.
        let code = query_param(&mock.authorize(url.as_str()).await, "code").unwrap();
        let wrong = pkce::random_token().unwrap();
        let err = provider
            .exchange_code(&mcp_pool::store::Secret::new(code), &wrong)
            .await
            .unwrap_err();
        assert!(
            matches!(err, OAuthError::Rejected { status: 400, .. }),
            "{err:?}"
        );
        // The right one: tokens.
        let code = query_param(&mock.authorize(url.as_str()).await, "code").unwrap();
        let tokens = provider
            .exchange_code(&mcp_pool::store::Secret::new(code), &verifier)
            .await
            .unwrap();
        assert!(tokens.refresh_token.is_some());
        let stats = mock.stats().await;
        let last = stats["client_auth"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone();
        assert_eq!(last["method"], expected, "{stats}");
        match expected {
            "post" => {
                assert_eq!(last["client_secret"], "s3cret:/+");
                assert_eq!(last["client_id"], "mcp-pool-test");
            }
            _ => assert_eq!(last["basic"], "mcp-pool-test:s3cret%3A%2F%2B"),
        }
        let refreshed = provider
            .refresh(tokens.refresh_token.as_ref().unwrap())
            .await
            .unwrap();
        // Access tokens are JWTs signed within the same second: compare the rotated refresh token.
        assert_ne!(refreshed.refresh_token, tokens.refresh_token);
        // The rotated-away token is refused: invalid_grant.
        let err = provider
            .refresh(tokens.refresh_token.as_ref().unwrap())
            .await
            .unwrap_err();
        assert!(matches!(err, OAuthError::InvalidGrant), "{err:?}");
    }
}
