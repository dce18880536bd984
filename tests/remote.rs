//! Remote MCP servers over Streamable HTTP, one session per (user, server) in the same pool as
//! stdio servers, all on loopback with real parts from the registries:
//! - npm `@modelcontextprotocol/server-everything` in `streamableHttp` mode (no auth);
//! - a token-checking server built on the TypeScript SDK's bearer middleware
//!   (`tests/fixtures/remote/bearer-server.mjs`), whose tokens come from npm
//!   `oauth2-mock-server` (configured endpoints) or npm `oidc-provider` (discovered endpoints,
//!   dynamic registration, a login and consent played by an HTTP client with a cookie jar)
//!   through our own connect flow.

mod common;
#[path = "common/http.rs"]
mod http;
#[path = "common/oauth.rs"]
mod oauth;

use std::process::Stdio;

use common::{PATIENCE, required_env, wait_until};
use http::{TestServer, content_text};
use oauth::{FAILURE, MockOAuth, SUCCESS, path_and_query, query_param, send, send_with};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

// === fixtures ===

/// A free loopback port (bound and released: the fixture binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// server-everything in `streamableHttp` mode on `port`; killed on drop.
struct Everything {
    child: tokio::process::Child,
    port: u16,
}

impl Everything {
    async fn start(port: u16) -> Everything {
        let entry = required_env("MCP_POOL_TEST_EVERYTHING");
        let child = tokio::process::Command::new("node")
            .arg(entry)
            .arg("streamableHttp")
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs server-everything");
        let up = wait_until(PATIENCE, || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        assert!(up, "server-everything listens on {port}");
        Everything { child, port }
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }
}

/// Runs a node fixture that prints one JSON line `{"url": ...}` on stdout; killed on drop.
async fn spawn_fixture(script: &str, args: &[String]) -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new("node")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs the fixture");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the fixture starts")
        .expect("read")
        .expect("it prints its URL");
    let url = serde_json::from_str::<Value>(&line).expect("JSON")["url"]
        .as_str()
        .expect("url")
        .to_owned();
    (child, url)
}

/// The token-checking server (`bearer-server.mjs`) with `options`; killed on drop.
struct BearerServer {
    url: String,
    child: tokio::process::Child,
}

impl BearerServer {
    async fn start(options: Value) -> BearerServer {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/remote/bearer-server.mjs"
        );
        let args = [
            required_env("MCP_POOL_TEST_NODE_MODULES"),
            options.to_string(),
        ];
        let (child, url) = spawn_fixture(script, &args).await;
        BearerServer { url, child }
    }

    fn base(&self) -> String {
        self.url.trim_end_matches("/mcp").to_owned()
    }

    /// Every MCP request the server received, as it saw it.
    async fn seen(&self) -> Vec<Value> {
        let (status, _, body) = send("GET", &format!("{}/__seen", self.base()), None).await;
        assert_eq!(status, 200);
        serde_json::from_str::<Value>(&body)
            .expect("JSON")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    async fn control(&self, body: Value) {
        let (status, _, text) = send(
            "POST",
            &format!("{}/__control", self.base()),
            Some(("application/json", body.to_string())),
        )
        .await;
        assert_eq!(status, 200, "{text}");
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
    }
}

/// `[servers.<name>]` for a remote URL on loopback.
fn remote_server(name: &str, url: &str, extra: &str) -> String {
    format!("[servers.{name}]\nurl = {url:?}\nallow_insecure_loopback = true\n{extra}\n")
}

/// `[servers.<name>]` for the bearer server, with its OAuth client at the mock.
fn oauth_remote(name: &str, url: &str, mock: &MockOAuth) -> String {
    format!(
        "{}[servers.{name}.oauth]\nclient_id = \"mcp-pool-test\"\n\
         authorization_url = \"{m}/authorize\"\ntoken_url = \"{m}/token\"\n\
         redirect_uri = \"http://127.0.0.1:9/v1/oauth/{name}/callback\"\n\
         success_redirect = \"{SUCCESS}\"\nerror_redirect = \"{FAILURE}\"\n\
         refresh_before = \"1m\"\ntoken_timeout = \"3s\"\n",
        remote_server(name, url, ""),
        m = mock.url
    )
}

/// Connects `user` to `server` through our connect flow, the mock issuing tokens for `user`.
async fn connect(ts: &TestServer, mock: &MockOAuth, user: &str, server: &str) {
    mock.control(json!({ "sub": user })).await;
    let resp = ts
        .user(user)
        .post_json(&format!("/v1/oauth/{server}/start"), &json!({}))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let url = resp.json()["authorization_url"]
        .as_str()
        .unwrap()
        .to_owned();
    let redirect = mock.authorize(&url).await;
    let back = ts.anonymous().get(&path_and_query(&redirect)).await;
    assert_eq!(back.status, 303, "{}", back.text());
    let location = back.headers["location"].to_str().unwrap().to_owned();
    assert!(location.contains("connected="), "{location}");
}

async fn stats_of(ts: &TestServer, user: &str, server: &str) -> Value {
    let stats = ts.admin().get("/v1/stats").await.json();
    stats["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["user_id"] == user && c["server"] == server)
        .cloned()
        .unwrap_or(Value::Null)
}

// === server-everything, no auth ===

#[tokio::test]
async fn everything_over_streamable_http_lists_calls_and_survives_a_server_restart() {
    if std::env::var("REMOTE_DEBUG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "mcp_pool=debug,rmcp=debug",
            ))
            .try_init();
    }
    let server = Everything::start(free_port()).await;
    let url = server.url();
    let ts = TestServer::start(
        "",
        &remote_server("everything", &url, "auth = \"none\""),
        "",
        &[],
    )
    .await;
    let alice = ts.user("alice");

    let tools = alice.get("/v1/connections/everything/tools").await;
    assert_eq!(tools.status, 200, "{}", tools.text());
    let names: Vec<String> = tools.json()["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(names.iter().any(|n| n == "echo"), "{names:?}");

    let echo = alice
        .call("everything", "echo", &json!({"message": "hi"}))
        .await;
    assert_eq!(echo.status, 200, "{}", echo.text());
    assert!(content_text(&echo.json()).contains("hi"));
    // A tool that reports progress while it runs.
    let long = alice
        .call(
            "everything",
            "trigger-long-running-operation",
            &json!({"duration": 1, "steps": 3}),
        )
        .await;
    assert_eq!(long.status, 200, "{}", long.text());
    assert_eq!(long.json()["is_error"], false, "{}", long.text());

    let stats = stats_of(&ts, "alice", "everything").await;
    assert_eq!(stats["state"], "ready");
    assert_eq!(stats["sandbox"], "remote");
    assert!(
        stats["pid"].is_null(),
        "a remote session has no pid: {stats}"
    );
    let started_at = stats["started_at"].clone();

    // Another user gets a session of their own.
    let bob = ts.user("bob");
    assert_eq!(
        bob.call("everything", "echo", &json!({"message": "b"}))
            .await
            .status,
        200
    );

    // The server restarts: every session it knew is gone (404 for the old Mcp-Session-Id).
    let port = server.port;
    server.stop().await;
    let server = Everything::start(port).await;
    let again = alice
        .call("everything", "echo", &json!({"message": "again"}))
        .await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert!(content_text(&again.json()).contains("again"));
    let after = stats_of(&ts, "alice", "everything").await;
    assert_eq!(after["state"], "ready");
    // rmcp re-initialized inside the same pool session: no restart, same start time.
    assert_eq!(after["restarts"], 0, "{after}");
    assert_eq!(after["started_at"], started_at, "{after}");
    ts.stop().await;
    server.stop().await;
}

/// A REST caller that accepts server-sent events gets the server's progress notifications as
/// they come, then the result; an error after the stream began is an `error` event carrying
/// the status the JSON answer would have had.
#[tokio::test]
async fn a_rest_tool_call_streams_progress_then_the_result_to_an_event_stream_client() {
    let server = Everything::start(free_port()).await;
    let ts = TestServer::start(
        "",
        &remote_server("everything", &server.url(), "auth = \"none\""),
        "",
        &[],
    )
    .await;
    let alice = ts.user("alice").with_header("accept", "text/event-stream");
    let mut stream = alice
        .post_streaming(
            "/v1/connections/everything/tools/trigger-long-running-operation/call",
            &json!({"duration": 1, "steps": 3}),
        )
        .await;
    assert_eq!(stream.status, 200);
    let content_type = stream.headers["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let mut events = Vec::new();
    while let Some(event) = stream.next_event().await {
        events.push(event);
    }
    let (last, steps) = events.split_last().expect("events");
    assert_eq!(last.0, "result", "{events:?}");
    assert_eq!(last.1["is_error"], false, "{events:?}");
    assert!(content_text(&last.1).contains("completed"), "{events:?}");
    let progress: Vec<(f64, f64)> = steps
        .iter()
        .map(|(name, data)| {
            assert_eq!(name, "progress", "{events:?}");
            (
                data["progress"].as_f64().unwrap(),
                data["total"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(progress, [(1.0, 3.0), (2.0, 3.0), (3.0, 3.0)], "{events:?}");

    // The same request without the header is answered in JSON, as before.
    let plain = ts
        .user("alice")
        .call("everything", "echo", &json!({"message": "plain"}))
        .await;
    assert_eq!(plain.status, 200, "{}", plain.text());
    assert!(content_text(&plain.json()).contains("plain"));

    let mut failed = alice
        .post_streaming(
            "/v1/connections/everything/tools/no-such-tool/call",
            &json!({}),
        )
        .await;
    let (name, data) = failed.next_event().await.expect("an event");
    assert_eq!(name, "error", "{data}");
    assert_eq!(data["status"], 404, "{data}");
    assert_eq!(data["error"]["code"], "unknown_tool", "{data}");
    assert!(
        failed.next_event().await.is_none(),
        "the stream ends after the error"
    );
    // Counted like the same error answered in JSON.
    let metrics = ts.anonymous().get("/metrics").await.text();
    assert!(
        metrics
            .lines()
            .any(|l| l == "mcp_pool_http_errors_total{code=\"unknown_tool\"} 1"),
        "{metrics}"
    );
    ts.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_remote_server_that_is_down_goes_through_the_restart_policy_and_the_circuit() {
    let server = Everything::start(free_port()).await;
    let url = server.url();
    let ts = TestServer::start(
        "max_restarts = 2\nrestart_window = \"60s\"\nfailed_cooldown = \"10m\"\n\
         restart_backoff_base = \"10ms\"\nrestart_backoff_cap = \"50ms\"\n",
        &remote_server("everything", &url, "auth = \"none\""),
        "",
        &[],
    )
    .await;
    let alice = ts.user("alice");
    assert_eq!(
        alice
            .call("everything", "echo", &json!({"message": "up"}))
            .await
            .status,
        200
    );
    server.stop().await;
    // Every call now fails (the session ends and is reconnected under the policy) until the
    // key has failed more than `max_restarts` times; then the circuit answers at once.
    let codes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let open = wait_until(PATIENCE, || {
        let alice = alice.clone();
        let codes = codes.clone();
        async move {
            let resp = alice
                .call("everything", "echo", &json!({"message": "down"}))
                .await;
            assert_ne!(resp.status, 200, "the server is down: {}", resp.text());
            codes.lock().unwrap().push(resp.code());
            resp.code() == "circuit_open"
        }
    })
    .await;
    assert!(open, "the circuit opens; codes seen: {codes:?}");
    eprintln!("codes seen: {:?}", codes.lock().unwrap());
    let stats = stats_of(&ts, "alice", "everything").await;
    assert_eq!(stats["state"], "failed", "{stats}");
    ts.stop().await;
}

// === token-checking server, per-user OAuth ===

#[tokio::test]
async fn per_user_bearer_tokens_refresh_after_a_401_and_never_cross_users() {
    let mock = MockOAuth::start().await;
    let bearer = BearerServer::start(json!({ "issuer": mock.url })).await;
    let ts = TestServer::start("", &oauth_remote("linear", &bearer.url, &mock), "", &[]).await;
    connect(&ts, &mock, "alice", "linear").await;
    connect(&ts, &mock, "bob", "linear").await;
    let (alice, bob) = (ts.user("alice"), ts.user("bob"));

    let tools = alice.get("/v1/connections/linear/tools").await;
    assert_eq!(tools.status, 200, "{}", tools.text());
    let whoami = |client: http::Client| async move {
        let resp = client.call("linear", "whoami", &json!({})).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        content_text(&resp.json())
    };
    assert_eq!(whoami(alice.clone()).await, "alice");
    assert_eq!(whoami(bob.clone()).await, "bob");

    // The server stops accepting every token it has seen (as after a key rotation or a
    // revocation on its side): the next call gets a 401, refreshes once, retries, succeeds.
    let refreshes = mock.refresh_requests().await;
    bearer.control(json!({ "revoke_seen": true })).await;
    assert_eq!(whoami(alice.clone()).await, "alice");
    assert_eq!(mock.refresh_requests().await, refreshes + 1);
    let seen = bearer.seen().await;
    let statuses: Vec<u64> = seen
        .iter()
        .rev()
        .take(2)
        .map(|s| s["status"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(statuses, [200, 401], "the retry follows the 401: {seen:?}");
    // Bob's session is untouched until he calls; then the same happens for him.
    assert_eq!(whoami(bob.clone()).await, "bob");
    assert_eq!(mock.refresh_requests().await, refreshes + 2);

    // What the server saw: on each MCP session only one user's tokens, and never the chat
    // app's own credentials.
    let seen = bearer.seen().await;
    let mut sub_of_token = std::collections::HashMap::new();
    for entry in &seen {
        if let (Some(token), Some(sub)) = (entry["token"].as_str(), entry["sub"].as_str()) {
            sub_of_token.insert(token.to_owned(), sub.to_owned());
        }
    }
    let mut sub_of_session: std::collections::HashMap<String, String> = Default::default();
    for entry in &seen {
        let auth = entry["authorization"].as_str().unwrap_or_default();
        assert!(
            !auth.contains(&ts.service_key) && !auth.contains(&ts.admin_key),
            "the service key never reaches an MCP server"
        );
        let (Some(session), Some(token)) = (entry["session"].as_str(), entry["token"].as_str())
        else {
            continue;
        };
        let Some(sub) = sub_of_token.get(token) else {
            continue;
        };
        let first = sub_of_session
            .entry(session.to_owned())
            .or_insert_with(|| sub.clone());
        assert_eq!(first, sub, "session {session} carried two users' tokens");
    }
    assert!(
        sub_of_session.values().any(|s| s == "alice")
            && sub_of_session.values().any(|s| s == "bob"),
        "{sub_of_session:?}"
    );
    ts.stop().await;
    bearer.stop().await;
}

#[tokio::test]
async fn a_revoked_grant_gives_reconnect_required() {
    let mock = MockOAuth::start().await;
    let bearer = BearerServer::start(json!({ "issuer": mock.url })).await;
    let ts = TestServer::start("", &oauth_remote("linear", &bearer.url, &mock), "", &[]).await;
    connect(&ts, &mock, "alice", "linear").await;
    let alice = ts.user("alice");
    assert_eq!(alice.call("linear", "whoami", &json!({})).await.status, 200);
    // The grant is revoked at the authorization server and the token at the server.
    mock.control(json!({ "revoke_all": true })).await;
    bearer.control(json!({ "revoke_seen": true })).await;
    let resp = alice.call("linear", "whoami", &json!({})).await;
    resp.expect_error(409, "reconnect_required");
    // The session was closed and the credentials deactivated (the answer stays "reconnect
    // required" until the user connects again, which then works).
    alice
        .get("/v1/connections/linear/tools")
        .await
        .expect_error(409, "reconnect_required");
    connect(&ts, &mock, "alice", "linear").await;
    let resp = alice.call("linear", "whoami", &json!({})).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(content_text(&resp.json()), "alice");
    ts.stop().await;
    bearer.stop().await;
}

#[tokio::test]
async fn static_api_keys_go_in_the_named_header_of_their_own_user() {
    let bearer = BearerServer::start(json!({
        "api_keys": {"key-of-alice": "alice", "key-of-bob": "bob"},
        "api_key_header": "X-Api-Key",
    }))
    .await;
    let ts = TestServer::start(
        "",
        &remote_server(
            "keyed",
            &bearer.url,
            "auth = \"api_key\"\napi_key_header = \"X-Api-Key\"",
        ),
        "",
        &[],
    )
    .await;
    let (alice, bob, carol) = (ts.user("alice"), ts.user("bob"), ts.user("carol"));
    for (client, key) in [
        (&alice, "key-of-alice"),
        (&bob, "key-of-bob"),
        (&carol, "wrong"),
    ] {
        let put = client
            .put_json("/v1/connections/keyed", &json!({ "access_token": key }))
            .await;
        assert_eq!(put.status, 201, "{}", put.text());
    }
    let resp = alice.call("keyed", "whoami", &json!({})).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(content_text(&resp.json()), "alice");
    // The key lives in the encrypted row only: no plaintext credentials file for a remote server.
    let file = ts.dir.path().join("creds/alice/keyed/credentials.json");
    assert!(!file.exists(), "{}", file.display());
    let resp = bob.call("keyed", "whoami", &json!({})).await;
    assert_eq!(content_text(&resp.json()), "bob");
    // A key the server refuses is the user's to replace.
    carol
        .call("keyed", "whoami", &json!({}))
        .await
        .expect_error(409, "reconnect_required");
    for entry in bearer.seen().await {
        assert!(
            entry["authorization"].is_null(),
            "the key travels only in its header: {entry}"
        );
    }
    ts.stop().await;
    bearer.stop().await;
}

#[tokio::test]
async fn missing_credentials_are_reported_not_sent() {
    let bearer = BearerServer::start(json!({ "api_keys": {"k": "alice"} })).await;
    let ts = TestServer::start(
        "",
        &remote_server("keyed", &bearer.url, "auth = \"api_key\""),
        "",
        &[],
    )
    .await;
    ts.user("dave")
        .call("keyed", "whoami", &json!({}))
        .await
        .expect_error(404, "no_credentials");
    assert!(bearer.seen().await.is_empty(), "nothing was sent");
    ts.stop().await;
    bearer.stop().await;
}

// === discovery, registration, PKCE and resource indicators (oidc-provider) ===

/// npm `oidc-provider` (`tests/fixtures/remote/oidc-server.mjs`); killed on drop.
struct Oidc {
    url: String,
    _child: tokio::process::Child,
}

impl Oidc {
    async fn start() -> Oidc {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/remote/oidc-server.mjs"
        );
        let args = [required_env("MCP_POOL_TEST_NODE_MODULES")];
        let (child, url) = spawn_fixture(script, &args).await;
        Oidc { url, _child: child }
    }

    async fn control(&self, body: Value) -> Value {
        let (status, _, text) = send(
            "POST",
            &format!("{}/__control", self.url),
            Some(("application/json", body.to_string())),
        )
        .await;
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).expect("JSON")
    }

    async fn stats(&self) -> Value {
        self.control(json!({})).await
    }
}

/// Discovery (RFC 9728 from the 401's `resource_metadata`, then OIDC discovery), dynamic
/// registration (RFC 7591, once per server) and the authorization URL (the registered client,
/// PKCE S256, the RFC 8707 resource). The browser's part, and what follows it, is the next test.
#[tokio::test]
async fn discovery_registers_one_client_and_authorizes_with_pkce_and_the_resource() {
    let oidc = Oidc::start().await;
    let bearer = BearerServer::start(json!({ "issuer": oidc.url, "resource": "self" })).await;
    let callback = "http://127.0.0.1:9/v1/oauth/notion/callback";
    let config = format!(
        "{}[servers.notion.oauth]\nredirect_uri = \"{callback}\"\n\
         success_redirect = \"{SUCCESS}\"\nerror_redirect = \"{FAILURE}\"\n",
        remote_server("notion", &bearer.url, "")
    );
    let ts = TestServer::start("", &config, "", &[]).await;
    let mut client_ids = Vec::new();
    for user in ["alice", "bob"] {
        let resp = ts
            .user(user)
            .post_json("/v1/oauth/notion/start", &json!({}))
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let url = resp.json()["authorization_url"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(url.starts_with(&format!("{}/auth?", oidc.url)), "{url}");
        assert_eq!(
            query_param(&url, "resource").as_deref(),
            Some(bearer.url.as_str())
        );
        assert_eq!(
            query_param(&url, "code_challenge_method").as_deref(),
            Some("S256")
        );
        assert_eq!(query_param(&url, "redirect_uri").as_deref(), Some(callback));
        client_ids.push(query_param(&url, "client_id").expect("client_id"));
    }
    assert!(!client_ids[0].is_empty());
    assert_eq!(client_ids[0], client_ids[1], "one client for the server");
    let stats = oidc.stats().await;
    assert_eq!(stats["registrations"], 1, "registered once: {stats}");
    // The authorization server knows the client: its authorize endpoint takes the URL (and
    // sends the browser on to its login interaction).
    let url = ts
        .user("carol")
        .post_json("/v1/oauth/notion/start", &json!({}))
        .await
        .json()["authorization_url"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, headers, body) = send("GET", &url, None).await;
    assert_eq!(status, 303, "{body}");
    let location = headers["location"].to_str().unwrap();
    assert!(location.starts_with("/interaction/"), "{location}");
    ts.stop().await;
    bearer.stop().await;
}

/// A user's browser, as far as an authorization server sees it: it follows redirects and keeps
/// cookies (name, path, value; expired ones dropped), which is all oidc-provider's interaction
/// cookies need. Loopback only, so the domain is not tracked.
#[derive(Default)]
struct Browser {
    cookies: Vec<(String, String, String)>,
}

impl Browser {
    /// Opens `url` and follows redirects until one leads to `callback` (our redirect URI, which
    /// the test then delivers to the service itself): returns that URL with its query. Fails,
    /// listing the hops, on anything but a redirect or after 10 hops (a login that loops).
    async fn authorize(&mut self, url: &str, callback: &str) -> String {
        let mut current = reqwest::Url::parse(url).expect("URL");
        let mut hops = Vec::new();
        for _ in 0..10 {
            let cookie = self.cookie_header(current.path());
            let headers: Vec<(&str, &str)> = if cookie.is_empty() {
                vec![]
            } else {
                vec![("cookie", cookie.as_str())]
            };
            let (status, response, body) = send_with("GET", current.as_str(), None, &headers).await;
            for value in response.get_all("set-cookie") {
                self.store(value.to_str().expect("ascii cookie"), current.path());
            }
            let location = response
                .get("location")
                .map(|l| l.to_str().unwrap().to_owned());
            hops.push(format!("{status} {} -> {location:?}", current.path()));
            let Some(location) = location.filter(|_| (300..400).contains(&status)) else {
                panic!("the authorization server stopped at {status}: {body}\nhops: {hops:#?}");
            };
            let next = current.join(&location).expect("a redirect URL");
            if next.as_str().starts_with(callback) {
                return next.into();
            }
            current = next;
        }
        panic!("no redirect to the callback after 10 hops (a loop?): {hops:#?}");
    }

    fn cookie_header(&self, path: &str) -> String {
        self.cookies
            .iter()
            .filter(|(_, scope, _)| path.starts_with(scope.as_str()))
            .map(|(name, _, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// RFC 6265 in the small: `name=value`, `path` (default: the request path's directory),
    /// and deletion by `expires` in the past or `max-age=0`.
    fn store(&mut self, header: &str, request_path: &str) {
        let mut parts = header.split(';').map(str::trim);
        let Some((name, value)) = parts.next().and_then(|p| p.split_once('=')) else {
            return;
        };
        let mut path = request_path[..request_path.rfind('/').unwrap_or(0).max(1)].to_owned();
        let mut expired = false;
        for attribute in parts {
            let (key, val) = attribute.split_once('=').unwrap_or((attribute, ""));
            match key.to_ascii_lowercase().as_str() {
                "path" => path = val.to_owned(),
                "max-age" => expired |= val.trim().parse::<i64>().is_ok_and(|age| age <= 0),
                "expires" => {
                    expired |= chrono::DateTime::parse_from_rfc2822(val)
                        .is_ok_and(|at| at < chrono::Utc::now())
                }
                _ => {}
            }
        }
        self.cookies.retain(|(n, p, _)| !(n == name && *p == path));
        if !expired {
            self.cookies.push((name.to_owned(), path, value.to_owned()));
        }
    }
}

/// Token requests oidc-provider answered (or refused) for `grant_type`, with their `resource`.
fn token_requests(stats: &Value, grant_type: &str) -> Vec<Value> {
    stats["token_requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["grant_type"] == grant_type)
        .cloned()
        .collect()
}

/// Our redirect URI of `notion` (the browser stops there; the test delivers the callback).
const NOTION_CALLBACK: &str = "http://127.0.0.1:9/v1/oauth/notion/callback";

/// oidc-provider, the bearer-checking MCP server behind it, and mcp-pool with that server as
/// `notion`, configured for discovery and the connect flow.
async fn notion_at_oidc() -> (Oidc, BearerServer, TestServer) {
    let oidc = Oidc::start().await;
    let bearer = BearerServer::start(json!({ "issuer": oidc.url, "resource": "self" })).await;
    let config = format!(
        "{}[servers.notion.oauth]\nredirect_uri = \"{NOTION_CALLBACK}\"\n\
         success_redirect = \"{SUCCESS}\"\nerror_redirect = \"{FAILURE}\"\n\
         refresh_before = \"1m\"\ntoken_timeout = \"5s\"\n",
        remote_server("notion", &bearer.url, "")
    );
    let ts = TestServer::start("", &config, "", &[]).await;
    (oidc, bearer, ts)
}

/// Starts `user`'s connect flow of `notion` and plays their browser up to our callback.
async fn start_and_authorize(user: &http::Client, browser: &mut Browser) -> String {
    let started = user.post_json("/v1/oauth/notion/start", &json!({})).await;
    assert_eq!(started.status, 200, "{}", started.text());
    let url = started.json()["authorization_url"]
        .as_str()
        .unwrap()
        .to_owned();
    browser.authorize(&url, NOTION_CALLBACK).await
}

/// RFC 9207 at oidc-provider (which announces `authorization_response_iss_parameter_supported`):
/// an authorization response whose `iss` names another server, or that lacks it, is refused
/// before its code is exchanged, and stores nothing; the untouched response connects.
#[tokio::test]
async fn an_authorization_response_from_another_issuer_is_refused() {
    let (oidc, _bearer, ts) = notion_at_oidc().await;
    oidc.control(json!({ "login": "carol" })).await;
    let carol = ts.user("carol");
    let mut browser = Browser::default();
    let location = |resp: &http::Resp| resp.headers["location"].to_str().unwrap().to_owned();

    // A response naming another authorization server (a mix-up attack replays one).
    let redirect = start_and_authorize(&carol, &mut browser).await;
    let issuer = query_param(&redirect, "iss").expect("oidc-provider sends iss");
    assert_eq!(issuer.trim_end_matches('/'), oidc.url.trim_end_matches('/'));
    let forged = oauth::with_param(&redirect, "iss", "https://attacker.example");
    let back = ts.anonymous().get(&path_and_query(&forged)).await;
    assert_eq!(
        location(&back),
        format!("{FAILURE}?error=issuer_mismatch&server=notion")
    );
    // One without `iss`, from a server that promised it.
    let redirect = start_and_authorize(&carol, &mut browser).await;
    let mut stripped = reqwest::Url::parse(&redirect).unwrap();
    let kept: Vec<(String, String)> = stripped
        .query_pairs()
        .filter(|(k, _)| k != "iss")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    stripped.query_pairs_mut().clear().extend_pairs(kept);
    let back = ts.anonymous().get(&path_and_query(stripped.as_str())).await;
    assert_eq!(
        location(&back),
        format!("{FAILURE}?error=issuer_mismatch&server=notion")
    );
    // Neither code reached the token endpoint, and nothing was stored.
    let stats = oidc.stats().await;
    assert!(
        token_requests(&stats, "authorization_code").is_empty(),
        "{stats}"
    );
    let stored = ts
        .state
        .store
        .get(
            &mcp_pool::store::UserId::parse("carol").unwrap(),
            &mcp_pool::store::ServerName::parse("notion").unwrap(),
        )
        .await
        .unwrap();
    assert!(stored.is_none(), "a refused response stores nothing");

    // The untouched response connects.
    let redirect = start_and_authorize(&carol, &mut browser).await;
    let back = ts.anonymous().get(&path_and_query(&redirect)).await;
    assert_eq!(location(&back), format!("{SUCCESS}?connected=notion"));
}

/// The whole MCP authorization flow against real parts only: discovery (RFC 9728 → OIDC) and
/// dynamic registration at npm `oidc-provider`, the authorization request with PKCE S256 and
/// the RFC 8707 resource, its login and consent interactions (followed with a cookie jar), our
/// callback, the code exchange (with the resource), and tool calls that the TypeScript SDK's
/// bearer middleware accepts only after verifying oidc-provider's JWT (signature from its JWKS,
/// `aud` = the MCP server, `exp`). Then the token expires at the server: 401, one refresh with
/// the resource, and the retry succeeds with the new token.
#[tokio::test]
async fn the_full_oauth_flow_at_oidc_provider_ends_in_verified_tool_calls_and_refreshes() {
    let (oidc, bearer, ts) = notion_at_oidc().await;
    for user in ["alice", "bob"] {
        oidc.control(json!({ "login": user })).await;
        // Each user has a browser (and a session at the authorization server) of their own.
        let redirect = start_and_authorize(&ts.user(user), &mut Browser::default()).await;
        assert!(query_param(&redirect, "code").is_some(), "{redirect}");
        let back = ts.anonymous().get(&path_and_query(&redirect)).await;
        assert_eq!(back.status, 303, "{}", back.text());
        let location = back.headers["location"].to_str().unwrap();
        assert!(location.contains("connected=notion"), "{location}");
    }
    let stats = oidc.stats().await;
    assert_eq!(stats["registrations"], 1, "{stats}");
    assert_eq!(stats["consents"], 2, "one consent per user: {stats}");
    let exchanges = token_requests(&stats, "authorization_code");
    assert_eq!(exchanges.len(), 2, "{stats}");
    for exchange in &exchanges {
        assert_eq!(exchange["error"], Value::Null, "{stats}");
        assert_eq!(
            exchange["resource"],
            bearer.url.as_str(),
            "RFC 8707 on the exchange"
        );
    }

    let (alice, bob) = (ts.user("alice"), ts.user("bob"));
    let tools = alice.get("/v1/connections/notion/tools").await;
    assert_eq!(tools.status, 200, "{}", tools.text());
    let listed = tools.json();
    let names: Vec<&str> = listed["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"whoami") && names.contains(&"echo"),
        "{names:?}"
    );
    let whoami = |client: http::Client| async move {
        let resp = client.call("notion", "whoami", &json!({})).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        content_text(&resp.json())
    };
    // The server's answer is the `sub` of the JWT it verified: oidc-provider's login of each.
    assert_eq!(whoami(alice.clone()).await, "alice");
    assert_eq!(whoami(bob.clone()).await, "bob");

    // Expiry at the server: it now judges `exp` an hour and a bit ahead, so the tokens issued
    // so far (valid for an hour) are expired there while the pool still holds them as fresh.
    // Tokens issued from now on live two hours.
    oidc.control(json!({ "access_token_ttl": 7200 })).await;
    bearer.control(json!({ "clock_ahead": 3700 })).await;
    assert_eq!(whoami(alice.clone()).await, "alice");
    let seen = bearer.seen().await;
    let last: Vec<(u64, Value)> = seen
        .iter()
        .rev()
        .take(2)
        .map(|s| (s["status"].as_u64().unwrap_or(0), s["rejected"].clone()))
        .collect();
    assert_eq!(
        last,
        [(200, Value::Null), (401, json!("ERR_JWT_EXPIRED"))],
        "the retry follows the expired token's 401: {seen:#?}"
    );
    let refreshes = token_requests(&oidc.stats().await, "refresh_token");
    assert_eq!(refreshes.len(), 1, "{refreshes:?}");
    assert_eq!(refreshes[0]["error"], Value::Null, "{refreshes:?}");
    assert_eq!(
        refreshes[0]["resource"],
        bearer.url.as_str(),
        "RFC 8707 on the refresh"
    );
    // The refreshed token is the one now in use: the next call needs no refresh.
    assert_eq!(whoami(alice.clone()).await, "alice");
    assert_eq!(
        token_requests(&oidc.stats().await, "refresh_token").len(),
        1
    );

    ts.stop().await;
    bearer.stop().await;
}
