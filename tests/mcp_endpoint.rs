//! `/mcp` with real MCP clients installed by `scripts/setup-test-env`: the official TypeScript
//! SDK (the design's `listTools` / `callTool` code over `StreamableHTTPClientTransport`), the
//! official Python SDK's streamable HTTP client, and the MCP Inspector CLI; behind them the
//! bundled demo server and npm's server-everything, through the real pool.
//!
//! What cannot be said with a client library (another user's session id, the 401 challenge,
//! the stateless 2026-07-28 revision) is sent as raw HTTP.

mod common;
#[path = "common/http.rs"]
mod http;

use std::process::Stdio;

use common::{PATIENCE, required_env, wait_until};
use http::{Client, Resp, TestServer};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// server-everything next to the demo servers of `test_config`.
fn everything() -> String {
    let js = required_env("MCP_POOL_TEST_EVERYTHING");
    format!(
        "[servers.everything]\ncommand = \"node\"\nargs = [{js:?}, \"stdio\"]\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n"
    )
}

fn headers(client: &Client) -> String {
    let map: serde_json::Map<String, Value> = client
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), Value::String(value.clone())))
        .collect();
    Value::Object(map).to_string()
}

fn url(server: &TestServer) -> String {
    format!("http://{}/mcp", server.addr)
}

// === real clients as child processes ===

/// A client process that prints one JSON object per line.
struct ClientProcess {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    stdin: Option<tokio::process::ChildStdin>,
    /// Keeps the TypeScript client's directory alive.
    _dir: Option<tempfile::TempDir>,
}

impl ClientProcess {
    fn spawn(
        mut command: tokio::process::Command,
        client: &Client,
        dir: Option<tempfile::TempDir>,
    ) -> ClientProcess {
        let mut child = command
            .env("MCP_HEADERS", headers(client))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("the client starts");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let stdin = child.stdin.take();
        ClientProcess {
            child,
            lines,
            stdin,
            _dir: dir,
        }
    }

    /// The TypeScript SDK client (`tests/fixtures/mcp/client.mjs`) in `mode`.
    fn typescript(
        server: &TestServer,
        client: &Client,
        mode: &str,
        tool: &str,
        args: &Value,
    ) -> Self {
        // ESM resolves packages from the script's own directory upwards: the script runs from
        // a directory whose `node_modules` is the one setup-test-env installed.
        let dir = tempfile::tempdir().unwrap();
        let modules = required_env("MCP_POOL_TEST_NODE_CLIENTS");
        std::os::unix::fs::symlink(&modules, dir.path().join("node_modules")).unwrap();
        let script = dir.path().join("client.mjs");
        std::fs::copy(fixture("client.mjs"), &script).unwrap();
        let mut command = tokio::process::Command::new("node");
        command
            .arg(&script)
            .args([&url(server), mode, tool, &args.to_string()]);
        ClientProcess::spawn(command, client, Some(dir))
    }

    /// The next line as JSON.
    async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(PATIENCE, self.lines.next_line())
            .await
            .expect("the client answers within patience")
            .expect("read the client's output")
            .expect("the client printed a line before exiting");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"))
    }

    async fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }

    /// Closes stdin and waits for a successful exit.
    async fn finish(mut self) {
        drop(self.stdin.take());
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("the client exits within patience")
            .unwrap();
        assert!(status.success(), "client exited with {status}");
    }
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/mcp/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|name| name.as_str().unwrap().to_owned())
        .collect()
}

/// Alice with the demo server and server-everything connected.
async fn alice_with_two_servers() -> (TestServer, Client) {
    let server = TestServer::start("", &everything(), "", &[]).await;
    let alice = server.user("alice");
    for name in ["demo", "everything"] {
        assert_eq!(alice.connect(name).await.status, 201);
    }
    (server, alice)
}

fn assert_namespaced(tools: &[String]) {
    for expected in [
        "demo__echo",
        "demo__add",
        "everything__echo",
        "everything__get-sum",
    ] {
        assert!(
            tools.iter().any(|t| t == expected),
            "{expected} missing: {tools:?}"
        );
    }
    assert!(tools.iter().all(|t| t.len() <= 64), "{tools:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_sdk_lists_namespaced_tools_and_calls_one() {
    let (server, alice) = alice_with_two_servers().await;
    let args = json!({ "message": "hello from TypeScript" });
    let mut client =
        ClientProcess::typescript(&server, &alice, "list-call", "everything__echo", &args);
    let connected = client.next().await;
    assert_eq!(connected["protocol"], "2025-11-25", "{connected}");
    assert!(connected["session"].is_string(), "a session: {connected}");
    assert_namespaced(&names(&client.next().await["tools"]));
    let result = client.next().await["result"].clone();
    assert_eq!(
        result["content"][0]["text"], "Echo: hello from TypeScript",
        "{result}"
    );
    client.finish().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_lists_namespaced_tools_and_calls_one() {
    let (server, alice) = alice_with_two_servers().await;
    let mut command = tokio::process::Command::new(required_env("MCP_POOL_TEST_PY_MCP"));
    command.arg(fixture("client.py")).args([
        &url(&server),
        "demo__add",
        &json!({ "a": 2, "b": 40 }).to_string(),
    ]);
    let mut client = ClientProcess::spawn(command, &alice, None);
    assert_eq!(client.next().await["connected"], true);
    assert_namespaced(&names(&client.next().await["tools"]));
    let result = client.next().await["result"].clone();
    assert_eq!(result["content"][0]["text"], "42", "{result}");
    assert_eq!(result["isError"], false, "{result}");
    client.finish().await;
    server.stop().await;
}

/// The Inspector's CLI: one process per method, printing the result as JSON.
async fn inspector(server: &TestServer, client: &Client, args: &[&str]) -> Value {
    let mut command = tokio::process::Command::new("node");
    command.arg(required_env("MCP_POOL_TEST_INSPECTOR")).args([
        "--cli",
        &url(server),
        "--transport",
        "http",
    ]);
    for (name, value) in &client.headers {
        command.args(["--header", &format!("{name}: {value}")]);
    }
    let output = tokio::time::timeout(
        PATIENCE,
        command
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the inspector finishes within patience")
    .expect("the inspector runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "inspector failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The JSON document is the output from its first `{` on.
    let start = stdout
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in: {stdout}"));
    serde_json::from_str(&stdout[start..]).unwrap_or_else(|_| panic!("not JSON: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspector_cli_lists_namespaced_tools_and_calls_one() {
    let (server, alice) = alice_with_two_servers().await;
    let listed = inspector(&server, &alice, &["--method", "tools/list"]).await;
    let tools: Vec<String> = listed["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    assert_namespaced(&tools);
    let called = inspector(
        &server,
        &alice,
        &[
            "--method",
            "tools/call",
            "--tool-name",
            "everything__get-sum",
            "--tool-arg",
            "a=19",
            "b=23",
        ],
    )
    .await;
    let text = called["content"][0]["text"].as_str().unwrap_or_default();
    assert!(text.contains("42"), "{called}");
    server.stop().await;
}

// === raw JSON-RPC over HTTP ===

fn mcp(client: &Client) -> Client {
    client
        .clone()
        .with_header("accept", "application/json, text/event-stream")
}

async fn post(client: &Client, session: Option<&str>, body: &Value) -> Resp {
    let mut client = mcp(client);
    if let Some(id) = session {
        client = client.with_header("mcp-session-id", id);
    }
    client
        .request(
            "POST",
            "/mcp",
            Some("application/json"),
            body.to_string().into_bytes(),
        )
        .await
}

/// The JSON-RPC answer in a response (server-sent events or JSON).
fn answer(resp: &Resp) -> Value {
    let text = resp.text();
    text.lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .chain(std::iter::once(text.as_str()))
        .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
        .find(|message| message.get("id").is_some())
        .unwrap_or_else(|| panic!("no JSON-RPC answer in {} {text}", resp.status))
}

/// Initializes a 2025-06-18 session; returns its id.
async fn initialize(client: &Client) -> String {
    let resp = post(
        client,
        None,
        &json!({ "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": { "name": "raw", "version": "1" } } }),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(answer(&resp)["result"]["protocolVersion"], "2025-06-18");
    let id = resp.headers["mcp-session-id"].to_str().unwrap().to_owned();
    let done = post(
        client,
        Some(&id),
        &json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }),
    )
    .await;
    assert_eq!(done.status, 202, "{}", done.text());
    id
}

async fn list_tools(client: &Client, session: &str) -> Vec<String> {
    let resp = post(
        client,
        Some(session),
        &json!({ "jsonrpc": "2.0", "id": 2, "method": "tools/list" }),
    )
    .await;
    let answer = answer(&resp);
    answer["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

async fn call(client: &Client, session: &str, name: &str, args: Value) -> Value {
    let resp = post(
        client,
        Some(session),
        &json!({ "jsonrpc": "2.0", "id": 3, "method": "tools/call",
                 "params": { "name": name, "arguments": args } }),
    )
    .await;
    answer(&resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_never_see_each_others_tools_nor_use_each_others_sessions() {
    let server = TestServer::api_key().await;
    let (alice, bob) = (server.user("alice"), server.user("bob"));
    assert_eq!(alice.connect("demo").await.status, 201);
    assert_eq!(bob.connect("demo2").await.status, 201);

    let alice_session = initialize(&alice).await;
    let bob_session = initialize(&bob).await;
    let alice_tools = list_tools(&alice, &alice_session).await;
    let bob_tools = list_tools(&bob, &bob_session).await;
    assert!(
        alice_tools.iter().all(|t| t.starts_with("demo__")),
        "{alice_tools:?}"
    );
    assert!(
        bob_tools.iter().all(|t| t.starts_with("demo2__")),
        "{bob_tools:?}"
    );
    assert!(
        bob_tools.contains(&"demo2__whoami".to_owned()),
        "{bob_tools:?}"
    );

    // Bob cannot call Alice's server by its name.
    let refused = call(&bob, &bob_session, "demo__echo", json!({ "message": "x" })).await;
    assert_eq!(refused["error"]["code"], -32602, "{refused}");
    // Nor use her session: answered like an unknown session, before anything runs.
    let stolen = post(
        &bob,
        Some(&alice_session),
        &json!({ "jsonrpc": "2.0", "id": 9, "method": "tools/list" }),
    )
    .await;
    stolen.expect_error(404, "unknown_session");
    let stream = mcp(&bob)
        .with_header("mcp-session-id", &alice_session)
        .get("/mcp")
        .await;
    stream.expect_error(404, "unknown_session");
    let closed = mcp(&bob)
        .with_header("mcp-session-id", &alice_session)
        .delete("/mcp")
        .await;
    closed.expect_error(404, "unknown_session");
    // A made-up session id is refused the same way.
    post(
        &alice,
        Some("not-a-session"),
        &json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/list" }),
    )
    .await
    .expect_error(404, "unknown_session");

    // Alice's session still works, and her call ran as her (the demo's credentials file).
    let echoed = call(
        &alice,
        &alice_session,
        "demo__echo",
        json!({ "message": "mine" }),
    )
    .await;
    assert_eq!(echoed["result"]["content"][0]["text"], "mine", "{echoed}");
    // Never a request without a verified user.
    let anonymous = mcp(&server.anonymous())
        .request(
            "POST",
            "/mcp",
            Some("application/json"),
            json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/list" })
                .to_string()
                .into_bytes(),
        )
        .await;
    anonymous.expect_error(401, "unauthorized");
    assert_eq!(anonymous.headers["www-authenticate"], "Bearer");
    let no_user = mcp(&server.bearer(&server.service_key))
        .request("POST", "/mcp", Some("application/json"), b"{}".to_vec())
        .await;
    no_user.expect_error(400, "missing_user_id");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_2026_07_28_requests_need_no_session() {
    let server = TestServer::api_key().await;
    let alice = server.user("alice");
    assert_eq!(alice.connect("demo").await.status, 201);
    let meta = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": { "name": "raw", "version": "1" },
    });
    let client = mcp(&alice)
        .with_header("mcp-protocol-version", "2026-07-28")
        .with_header("mcp-method", "tools/call")
        .with_header("mcp-name", "demo__echo");
    let resp = client
        .request(
            "POST",
            "/mcp",
            Some("application/json"),
            json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
                "name": "demo__echo", "arguments": { "message": "no session" }, "_meta": meta } })
            .to_string()
            .into_bytes(),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(resp.headers.get("mcp-session-id").is_none());
    assert_eq!(answer(&resp)["result"]["content"][0]["text"], "no session");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_fails_to_start_leaves_the_rest_of_the_list() {
    let broken = "[servers.broken]\ncommand = \"/bin/false\"\n\
                  credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n\
                  [servers.broken.sandbox]\nmode = \"off\"\n";
    let server = TestServer::start("", broken, "", &[]).await;
    let alice = server.user("alice");
    for name in ["demo", "broken"] {
        assert_eq!(alice.connect(name).await.status, 201);
    }
    let session = initialize(&alice).await;
    let tools = list_tools(&alice, &session).await;
    assert!(tools.contains(&"demo__echo".to_owned()), "{tools:?}");
    assert!(
        !tools.iter().any(|t| t.starts_with("broken__")),
        "{tools:?}"
    );
    let echoed = call(
        &alice,
        &session,
        "demo__echo",
        json!({ "message": "still here" }),
    )
    .await;
    assert_eq!(echoed["result"]["content"][0]["text"], "still here");
    // The operator sees why: the pool's events name the failed start and its code.
    let failed = server.state.pool.recent_events().into_iter().any(|event| {
        event.user_id.as_str() == "alice"
            && event.server.as_str() == "broken"
            && matches!(event.kind, mcp_pool::actors::EventKind::StartFailed { .. })
    });
    assert!(failed, "{:?}", server.state.pool.recent_events());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cancellation_stops_the_upstream_call() {
    let (server, alice) = alice_with_two_servers().await;
    let mut client = ClientProcess::typescript(
        &server,
        &alice,
        "cancel",
        "demo__sleep",
        &json!({ "ms": 600_000 }),
    );
    assert!(client.next().await["connected"].as_bool().unwrap());
    assert_eq!(client.next().await["started"], true);
    // Once the call is running upstream, the client aborts it.
    let pool = server.state.pool.clone();
    let running = wait_until(PATIENCE, || async {
        pool.stats().await.is_ok_and(|stats| {
            stats.connections.iter().any(|c| {
                c.user_id.as_str() == "alice" && c.server.as_str() == "demo" && c.in_flight > 0
            })
        })
    })
    .await;
    assert!(running, "the sleep never reached the demo server");
    client.say("abort").await;
    let aborted = client.next().await;
    assert!(
        aborted["error"]
            .as_str()
            .unwrap_or_default()
            .contains("stopped it"),
        "{aborted}"
    );
    // The demo server saw `notifications/cancelled` and ended its sleep.
    let cancelled = wait_until(PATIENCE, || async {
        let stats = alice.call("demo", "stats", &json!({})).await;
        let text = http::content_text(&stats.json());
        serde_json::from_str::<Value>(&text).is_ok_and(|s| s["cancelled_sleeps"] == 1)
    })
    .await;
    assert!(cancelled, "the upstream sleep was not cancelled");
    client.finish().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_from_server_everything_reaches_the_client() {
    let (server, alice) = alice_with_two_servers().await;
    let mut client = ClientProcess::typescript(
        &server,
        &alice,
        "progress",
        "everything__trigger-long-running-operation",
        &json!({ "duration": 1, "steps": 4 }),
    );
    assert!(client.next().await["connected"].as_bool().unwrap());
    let done = client.next().await;
    let progress = done["progress"]
        .as_array()
        .unwrap_or_else(|| panic!("{done}"));
    assert_eq!(progress.len(), 4, "one notification per step: {done}");
    for (step, update) in progress.iter().enumerate() {
        assert_eq!(update["progress"], step as u64 + 1, "{done}");
        assert_eq!(update["total"], 4, "{done}");
    }
    assert!(
        done["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("completed"),
        "{done}"
    );
    client.finish().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_changed_reaches_the_client_when_the_user_connects_a_server() {
    let server = TestServer::api_key().await;
    let alice = server.user("alice");
    assert_eq!(alice.connect("demo").await.status, 201);
    let mut client = ClientProcess::typescript(&server, &alice, "list-changed", "", &json!({}));
    assert!(client.next().await["connected"].as_bool().unwrap());
    let listed = names(&client.next().await["listed"]);
    assert!(
        !listed.iter().any(|t| t.starts_with("demo2__")),
        "{listed:?}"
    );

    assert_eq!(alice.connect("demo2").await.status, 201);
    let changed = names(&client.next().await["list_changed"]);
    assert!(changed.contains(&"demo2__echo".to_owned()), "{changed:?}");
    // Another user's change is not Alice's business.
    assert_eq!(server.user("bob").connect("demo3").await.status, 201);
    // And a disconnect is announced too.
    assert_eq!(alice.delete("/v1/connections/demo2").await.status, 200);
    let changed = names(&client.next().await["list_changed"]);
    assert!(
        !changed.iter().any(|t| t.starts_with("demo2__")),
        "{changed:?}"
    );
    assert!(
        !changed.iter().any(|t| t.starts_with("demo3__")),
        "{changed:?}"
    );
    client.finish().await;
    server.stop().await;
}

// === jwt mode ===

const JWT_SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters";
const ISSUER: &str = "https://example.supabase.co/auth/v1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mode_challenges_with_protected_resource_metadata() {
    let server = TestServer::start(
        "",
        "[mcp]\npublic_url = \"https://pool.example.com\"\n",
        &format!(
            "mode = \"jwt\"\n[auth.jwt]\nalgorithm = \"HS256\"\nsecret_env = \"TEST_JWT_SECRET\"\n\
             issuer = {ISSUER:?}\n"
        ),
        &[("TEST_JWT_SECRET", JWT_SECRET)],
    )
    .await;
    let expected = "Bearer resource_metadata=\"https://pool.example.com/.well-known/oauth-protected-resource/mcp\"";
    for client in [server.anonymous(), server.bearer("not.a.jwt")] {
        let resp = mcp(&client)
            .request("POST", "/mcp", Some("application/json"), b"{}".to_vec())
            .await;
        resp.expect_error(401, "unauthorized");
        assert_eq!(resp.headers["www-authenticate"], expected);
    }
    for path in [
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/oauth-protected-resource",
    ] {
        let metadata = server.anonymous().get(path).await;
        assert_eq!(metadata.status, 200, "{}", metadata.text());
        assert_eq!(
            metadata.json(),
            json!({
                "resource": "https://pool.example.com/mcp",
                "authorization_servers": [ISSUER],
                "bearer_methods_supported": ["header"],
                "resource_name": "mcp-pool",
            })
        );
    }
    // A valid token is served.
    let exp = chrono::Utc::now().timestamp() + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({ "sub": "alice", "exp": exp, "iss": ISSUER }),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();
    let alice = server.bearer(&token);
    assert_eq!(alice.connect("demo").await.status, 201);
    let session = initialize(&alice).await;
    assert!(
        list_tools(&alice, &session)
            .await
            .contains(&"demo__echo".to_owned())
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_mode_serves_no_resource_metadata() {
    let server = TestServer::api_key().await;
    server
        .anonymous()
        .get("/.well-known/oauth-protected-resource/mcp")
        .await
        .expect_error(404, "not_found");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_sessions_are_capped_oldest_first() {
    let server = TestServer::start("", "[mcp]\nmax_sessions_per_user = 2\n", "", &[]).await;
    let alice = server.user("alice");
    assert_eq!(alice.connect("demo").await.status, 201);
    let first = initialize(&alice).await;
    let second = initialize(&alice).await;
    let third = initialize(&alice).await;
    post(
        &alice,
        Some(&first),
        &json!({ "jsonrpc": "2.0", "id": 2, "method": "tools/list" }),
    )
    .await
    .expect_error(404, "unknown_session");
    for session in [&second, &third] {
        assert!(!list_tools(&alice, session).await.is_empty());
    }
    // Another user's sessions do not count against Alice's.
    let bob = server.user("bob");
    initialize(&bob).await;
    assert!(!list_tools(&alice, &second).await.is_empty());
    // A terminated session is gone.
    let closed = mcp(&alice)
        .with_header("mcp-session-id", &third)
        .delete("/mcp")
        .await;
    assert_eq!(closed.status, 204, "{}", closed.text());
    post(
        &alice,
        Some(&third),
        &json!({ "jsonrpc": "2.0", "id": 2, "method": "tools/list" }),
    )
    .await
    .expect_error(404, "unknown_session");
    assert_eq!(
        server.state.mcp.session_count(),
        2,
        "alice's second and bob's"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_filters_apply_to_rest_and_mcp_alike() {
    let filters = "[servers.demo2.tools]\ndeny = [\"add\", \"spawn_*\"]\n\
                   [servers.demo3.tools]\nallow = [\"echo\", \"who*\"]\n";
    let server = TestServer::start("", filters, "", &[]).await;
    let alice = server.user("alice");
    for name in ["demo2", "demo3"] {
        assert_eq!(alice.connect(name).await.status, 201);
    }
    let rest_names = |body: Value| -> Vec<String> {
        body["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let demo2 = rest_names(alice.get("/v1/connections/demo2/tools").await.json());
    assert!(demo2.contains(&"echo".to_owned()), "{demo2:?}");
    assert!(
        !demo2.iter().any(|t| t == "add" || t.starts_with("spawn_")),
        "{demo2:?}"
    );
    let demo3 = rest_names(alice.get("/v1/connections/demo3/tools").await.json());
    assert_eq!(demo3, ["echo", "whoami"]);
    alice
        .call("demo2", "add", &json!({ "a": 1, "b": 2 }))
        .await
        .expect_error(404, "unknown_tool");
    alice
        .call("demo3", "add", &json!({ "a": 1, "b": 2 }))
        .await
        .expect_error(404, "unknown_tool");

    let session = initialize(&alice).await;
    let tools = list_tools(&alice, &session).await;
    assert!(tools.contains(&"demo2__echo".to_owned()), "{tools:?}");
    assert!(
        !tools.iter().any(|t| t == "demo2__add" || t == "demo3__add"),
        "{tools:?}"
    );
    let refused = call(&alice, &session, "demo2__add", json!({ "a": 1, "b": 2 })).await;
    assert_eq!(refused["error"]["code"], -32602, "{refused}");
    let echoed = call(
        &alice,
        &session,
        "demo3__echo",
        json!({ "message": "allowed" }),
    )
    .await;
    assert_eq!(echoed["result"]["content"][0]["text"], "allowed");
    server.stop().await;
}

// === prompts and resources ===

/// Where server-everything's static documents are stored (it serves them as they are).
fn everything_doc(name: &str) -> String {
    let js = std::path::PathBuf::from(required_env("MCP_POOL_TEST_EVERYTHING"));
    let path = js.parent().unwrap().join("docs").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

const ARCHITECTURE: &str = "mcp-pool://everything/demo://resource/static/document/architecture.md";
const TEXT_TEMPLATE: &str = "mcp-pool://everything/demo://resource/dynamic/text/{resourceId}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_sdk_gets_prompts_and_reads_resources_and_templates() {
    let (server, alice) = alice_with_two_servers().await;
    let mut client = ClientProcess::typescript(
        &server,
        &alice,
        "catalog",
        "everything__args-prompt",
        &json!({ "city": "Paris" }),
    );
    assert!(client.next().await["connected"].as_bool().unwrap());
    let prompts = names(&client.next().await["prompts"]);
    for expected in [
        "everything__simple-prompt",
        "everything__args-prompt",
        "everything__resource-prompt",
    ] {
        assert!(prompts.contains(&expected.to_owned()), "{prompts:?}");
    }
    // The demo server offers no prompts (and is not asked for any).
    assert!(
        prompts.iter().all(|p| p.starts_with("everything__")),
        "{prompts:?}"
    );
    assert!(prompts.iter().all(|p| p.len() <= 64), "{prompts:?}");
    let prompt = client.next().await["prompt"].clone();
    assert_eq!(
        prompt["messages"][0]["content"]["text"], "What's weather in Paris?",
        "{prompt}"
    );

    let catalog = client.next().await;
    let resources = catalog["resources"].as_array().unwrap();
    assert!(!resources.is_empty(), "{catalog}");
    for resource in resources {
        let uri = resource["uri"].as_str().unwrap();
        assert!(uri.starts_with("mcp-pool://everything/demo://"), "{uri}");
        assert!(
            resource["name"]
                .as_str()
                .unwrap()
                .starts_with("everything__"),
            "{resource}"
        );
    }
    assert!(
        resources.iter().any(|r| r["uri"] == ARCHITECTURE),
        "{catalog}"
    );
    let templates = catalog["templates"].as_array().unwrap();
    assert!(
        templates.iter().any(|t| t["uriTemplate"] == TEXT_TEMPLATE),
        "{catalog}"
    );

    // Through mcp-pool, the same document as server-everything gives directly.
    let reads = client.next().await;
    assert_eq!(
        reads["original"], "demo://resource/static/document/architecture.md",
        "{reads}"
    );
    let (pooled, direct) = (
        &reads["read"]["contents"][0],
        &reads["directly"]["contents"][0],
    );
    assert_eq!(pooled["uri"], ARCHITECTURE, "{reads}");
    assert_eq!(direct["uri"], reads["original"], "{reads}");
    assert_eq!(pooled["text"], direct["text"], "{reads}");
    assert_eq!(pooled["mimeType"], direct["mimeType"], "{reads}");
    assert_eq!(pooled["text"], everything_doc("architecture.md"));

    // The SDK's RFC 6570 expansion of the mapped template reads the server's resource 7.
    let filled = client.next().await;
    assert_eq!(
        filled["filled"], "mcp-pool://everything/demo://resource/dynamic/text/7",
        "{filled}"
    );
    let contents = &filled["template_read"]["contents"][0];
    assert_eq!(contents["uri"], filled["filled"], "{filled}");
    assert!(
        contents["text"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Resource 7: This is a plaintext resource"),
        "{filled}"
    );
    client.finish().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_gets_a_prompt_and_reads_resources() {
    let (server, alice) = alice_with_two_servers().await;
    let mut command = tokio::process::Command::new(required_env("MCP_POOL_TEST_PY_MCP"));
    command.arg(fixture("client.py")).args([
        &url(&server),
        "demo__echo",
        &json!({ "message": "x" }).to_string(),
        "everything__simple-prompt",
        "{}",
    ]);
    let mut client = ClientProcess::spawn(command, &alice, None);
    assert_eq!(client.next().await["connected"], true);
    client.next().await; // tools
    client.next().await; // the call
    let prompts = names(&client.next().await["prompts"]);
    assert!(
        prompts.contains(&"everything__simple-prompt".to_owned()),
        "{prompts:?}"
    );
    let prompt = client.next().await["prompt"].clone();
    assert_eq!(
        prompt["messages"][0]["content"]["text"], "This is a simple prompt without arguments.",
        "{prompt}"
    );
    let catalog = client.next().await;
    let first = catalog["resources"][0].as_str().unwrap().to_owned();
    assert!(first.starts_with("mcp-pool://everything/"), "{catalog}");
    let read = client.next().await["read"].clone();
    assert_eq!(read["contents"][0]["uri"], first.as_str(), "{read}");
    let name = first.rsplit('/').next().unwrap();
    assert_eq!(read["contents"][0]["text"], everything_doc(name), "{read}");
    let filled = client.next().await;
    assert_eq!(
        filled["template_read"]["contents"][0]["uri"], filled["filled"],
        "{filled}"
    );
    assert!(
        filled["template_read"]["contents"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Resource 3:"),
        "{filled}"
    );
    client.finish().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspector_cli_gets_a_prompt_and_reads_a_resource() {
    let (server, alice) = alice_with_two_servers().await;
    let listed = inspector(&server, &alice, &["--method", "prompts/list"]).await;
    let prompts: Vec<&str> = listed["prompts"]
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"))
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(prompts.contains(&"everything__args-prompt"), "{listed}");
    let got = inspector(
        &server,
        &alice,
        &[
            "--method",
            "prompts/get",
            "--prompt-name",
            "everything__args-prompt",
            "--prompt-args",
            "city=Lyon",
            "state=Rhône",
        ],
    )
    .await;
    assert_eq!(
        got["messages"][0]["content"]["text"], "What's weather in Lyon, Rhône?",
        "{got}"
    );
    let read = inspector(
        &server,
        &alice,
        &["--method", "resources/read", "--uri", ARCHITECTURE],
    )
    .await;
    assert_eq!(read["contents"][0]["uri"], ARCHITECTURE, "{read}");
    assert_eq!(
        read["contents"][0]["text"],
        everything_doc("architecture.md")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_list_changed_reaches_the_client_and_links_are_readable() {
    let (server, alice) = alice_with_two_servers().await;
    // "hello from mcp-pool", compressed by server-everything into a resource of the session.
    let args = json!({
        "name": "hello.txt.gz",
        "data": "data:text/plain;base64,aGVsbG8gZnJvbSBtY3AtcG9vbA==",
        "outputType": "resourceLink",
    });
    let mut client = ClientProcess::typescript(
        &server,
        &alice,
        "resource-changed",
        "everything__gzip-file-as-resource",
        &args,
    );
    assert!(client.next().await["connected"].as_bool().unwrap());
    let before = client.next().await;
    let link = "mcp-pool://everything/demo://resource/session/hello.txt.gz";
    assert!(
        !before["before"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u == link),
        "{before}"
    );
    let done = client.next().await;
    // The tool result links to the resource under the URI /mcp hands out...
    let links: Vec<&Value> = done["result"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("{done}"))
        .iter()
        .filter(|c| c["type"] == "resource_link")
        .collect();
    assert_eq!(links.len(), 1, "{done}");
    assert_eq!(links[0]["uri"], link, "{done}");
    // ...the list the client fetched on `resources/list_changed` has it (the session's kept
    // list was dropped when the server announced the change)...
    assert!(
        done["listed"].as_array().unwrap().iter().any(|u| u == link),
        "{done}"
    );
    // ...and the link reads: a gzip stream, in base64.
    let contents = &done["read"]["contents"][0];
    assert_eq!(contents["uri"], link, "{done}");
    assert_eq!(contents["mimeType"], "application/gzip", "{done}");
    assert!(
        contents["blob"]
            .as_str()
            .unwrap_or_default()
            .starts_with("H4sI"),
        "{done}"
    );
    client.finish().await;
    server.stop().await;
}

async fn request(client: &Client, session: &str, id: u64, method: &str, params: Value) -> Value {
    let resp = post(
        client,
        Some(session),
        &json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }),
    )
    .await;
    answer(&resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_never_read_each_others_resources() {
    let server = TestServer::start("", &everything(), "", &[]).await;
    let (alice, bob) = (server.user("alice"), server.user("bob"));
    assert_eq!(alice.connect("everything").await.status, 201);
    assert_eq!(bob.connect("demo").await.status, 201);
    let alice_session = initialize(&alice).await;
    let listed = request(&alice, &alice_session, 2, "resources/list", json!({})).await;
    assert!(
        listed["result"]["resources"]
            .as_array()
            .unwrap_or_else(|| panic!("{listed}"))
            .iter()
            .any(|r| r["uri"] == ARCHITECTURE),
        "{listed}"
    );
    let read = request(
        &alice,
        &alice_session,
        3,
        "resources/read",
        json!({ "uri": ARCHITECTURE }),
    )
    .await;
    assert_eq!(
        read["result"]["contents"][0]["text"],
        everything_doc("architecture.md")
    );

    // Bob holds Alice's URI but has no server-everything: not found, and nothing started.
    let bob_session = initialize(&bob).await;
    let refused = request(
        &bob,
        &bob_session,
        2,
        "resources/read",
        json!({ "uri": ARCHITECTURE }),
    )
    .await;
    assert_eq!(refused["error"]["code"], -32002, "{refused}");
    assert!(refused.get("result").is_none(), "{refused}");
    // Nor does he see her resources, or her servers' prompts.
    let his = request(&bob, &bob_session, 3, "resources/list", json!({})).await;
    assert_eq!(his["result"]["resources"], json!([]), "{his}");
    let prompts = request(&bob, &bob_session, 4, "prompts/list", json!({})).await;
    assert_eq!(prompts["result"]["prompts"], json!([]), "{prompts}");
    let got = request(
        &bob,
        &bob_session,
        5,
        "prompts/get",
        json!({ "name": "everything__simple-prompt" }),
    )
    .await;
    assert_eq!(got["error"]["code"], -32602, "{got}");
    // A URI of no server at all is refused the same way.
    let foreign = request(
        &bob,
        &bob_session,
        6,
        "resources/read",
        json!({ "uri": "demo://resource/static/document/architecture.md" }),
    )
    .await;
    assert_eq!(foreign["error"]["code"], -32002, "{foreign}");
    let stats = server.state.pool.stats().await.unwrap();
    assert!(
        !stats
            .connections
            .iter()
            .any(|c| c.user_id.as_str() == "bob" && c.server.as_str() == "everything"),
        "{:?}",
        stats.connections
    );

    // Once Bob connects server-everything himself, the same URI reads from his own session:
    // the URI names a server, never a user.
    assert_eq!(bob.connect("everything").await.status, 201);
    let own = request(
        &bob,
        &bob_session,
        7,
        "resources/read",
        json!({ "uri": ARCHITECTURE }),
    )
    .await;
    assert_eq!(
        own["result"]["contents"][0]["text"],
        everything_doc("architecture.md"),
        "{own}"
    );
    let stats = server.state.pool.stats().await.unwrap();
    let everything_sessions: Vec<&str> = stats
        .connections
        .iter()
        .filter(|c| c.server.as_str() == "everything")
        .map(|c| c.user_id.as_str())
        .collect();
    assert_eq!(everything_sessions.len(), 2, "{everything_sessions:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_subscriptions_listen_streams_list_changes() {
    let server = TestServer::api_key().await;
    let alice = server.user("alice");
    assert_eq!(alice.connect("demo").await.status, 201);
    let meta = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": { "name": "raw", "version": "1" },
    });
    let mut stream = mcp(&alice)
        .with_header("mcp-protocol-version", "2026-07-28")
        .with_header("mcp-method", "subscriptions/listen")
        .post_streaming(
            "/mcp",
            &json!({ "jsonrpc": "2.0", "id": "listen-1", "method": "subscriptions/listen",
                "params": { "_meta": meta, "notifications": {
                    "toolsListChanged": true, "promptsListChanged": true,
                    "resourcesListChanged": true,
                    "resourceSubscriptions": ["mcp-pool://demo/x"] } } }),
        )
        .await;
    assert_eq!(stream.status, 200);
    assert!(stream.headers.get("mcp-session-id").is_none());
    let ack = stream.next_data().await.expect("an acknowledgment");
    assert_eq!(
        ack["method"], "notifications/subscriptions/acknowledged",
        "{ack}"
    );
    // List changes are accepted; resource updates are not offered.
    assert_eq!(
        ack["params"]["notifications"],
        json!({ "toolsListChanged": true, "promptsListChanged": true,
                "resourcesListChanged": true }),
        "{ack}"
    );

    // Alice connects another server: every list of hers changed.
    assert_eq!(alice.connect("demo2").await.status, 201);
    let mut methods = Vec::new();
    for _ in 0..3 {
        let note = stream.next_data().await.expect("a notification");
        assert_eq!(
            note["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "listen-1",
            "{note}"
        );
        methods.push(note["method"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        methods,
        [
            "notifications/tools/list_changed",
            "notifications/prompts/list_changed",
            "notifications/resources/list_changed",
        ]
    );
    // A stateless listing sees the new server at once.
    let listed = mcp(&alice)
        .with_header("mcp-protocol-version", "2026-07-28")
        .with_header("mcp-method", "tools/list")
        .request(
            "POST",
            "/mcp",
            Some("application/json"),
            json!({ "jsonrpc": "2.0", "id": 2, "method": "tools/list",
                    "params": { "_meta": meta } })
            .to_string()
            .into_bytes(),
        )
        .await;
    let tools = answer(&listed);
    assert!(
        tools["result"]["tools"]
            .as_array()
            .unwrap_or_else(|| panic!("{tools}"))
            .iter()
            .any(|t| t["name"] == "demo2__echo"),
        "{tools}"
    );
    drop(stream);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_prompts_count_against_the_users_calls_in_flight() {
    let server = TestServer::start("max_in_flight_per_user = 1", &everything(), "", &[]).await;
    let alice = server.user("alice");
    for name in ["demo", "everything"] {
        assert_eq!(alice.connect(name).await.status, 201);
    }
    let session = initialize(&alice).await;
    // Listed (and the server started) while nothing else is in flight.
    let prompts = request(&alice, &session, 2, "prompts/list", json!({})).await;
    assert!(
        prompts["result"]["prompts"]
            .as_array()
            .is_some_and(|p| !p.is_empty()),
        "{prompts}"
    );
    // Alice's one call slot is taken by a long sleep.
    let sleeper = {
        let alice = alice.clone();
        tokio::spawn(async move { alice.call("demo", "sleep", &json!({ "ms": 600_000 })).await })
    };
    let pool = server.state.pool.clone();
    let busy = wait_until(PATIENCE, || async {
        pool.stats().await.is_ok_and(|stats| {
            stats
                .connections
                .iter()
                .any(|c| c.server.as_str() == "demo" && c.in_flight > 0)
        })
    })
    .await;
    assert!(busy, "the sleep never started");
    let read = request(
        &alice,
        &session,
        3,
        "resources/read",
        json!({ "uri": ARCHITECTURE }),
    )
    .await;
    assert_eq!(read["error"]["data"]["code"], "too_many_calls", "{read}");
    let got = request(
        &alice,
        &session,
        4,
        "prompts/get",
        json!({ "name": "everything__simple-prompt" }),
    )
    .await;
    assert_eq!(got["error"]["data"]["code"], "too_many_calls", "{got}");
    // Listings are bounded per listing instead, and still answer.
    let listed = request(&alice, &session, 5, "resources/list", json!({})).await;
    assert!(listed["result"]["resources"].is_array(), "{listed}");
    sleeper.abort();
    server.stop().await;
}
