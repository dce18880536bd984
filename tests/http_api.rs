//! The HTTP facade end to end: the real router on a real loopback port, over a real `App` with
//! the bundled demo server as the MCP server.

mod common;
#[path = "common/http.rs"]
mod http;

use common::{PATIENCE, wait_until};
use http::{TestServer, content_text};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_list_call_reuse_and_delete() {
    let server = TestServer::api_key().await;
    let alice = server.user("alice");

    let created = alice.connect("demo").await;
    assert_eq!(created.status, 201, "{}", created.text());
    let body = created.json();
    assert_eq!(body["server"], "demo");
    assert_eq!(body["state"], "closed");
    assert_eq!(body["has_access_token"], true);
    assert!(
        !created.text().contains("secret-access-token"),
        "{}",
        created.text()
    );
    assert!(
        !created.text().contains("creds"),
        "no credentials path: {}",
        created.text()
    );

    let tools = alice.get("/v1/connections/demo/tools").await;
    assert_eq!(tools.status, 200, "{}", tools.text());
    let tools_body = tools.json();
    let names: Vec<&str> = tools_body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for want in ["echo", "whoami", "crash"] {
        assert!(names.contains(&want), "{names:?}");
    }
    assert!(tools.json()["tools"][0]["input_schema"].is_object());

    let echo = alice
        .call("demo", "echo", &json!({ "message": "hello" }))
        .await;
    assert_eq!(echo.status, 200, "{}", echo.text());
    let echo = echo.json();
    assert_eq!(content_text(&echo), "hello");
    assert_eq!(echo["is_error"], false);
    assert!(echo["duration_ms"].is_u64());

    // Two whoami calls answer from the same process: the session is reused.
    let whoami =
        |resp: &http::Resp| -> Value { serde_json::from_str(&content_text(&resp.json())).unwrap() };
    let pid = |resp: &http::Resp| whoami(resp)["pid"].as_u64().unwrap() as u32;
    let instance = |resp: &http::Resp| whoami(resp)["instance"].as_u64().unwrap();
    let first = alice.call("demo", "whoami", &json!({})).await;
    let second = alice
        .request(
            "POST",
            "/v1/connections/demo/tools/whoami/call",
            None,
            vec![],
        )
        .await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(
        second.status,
        200,
        "empty body = no arguments: {}",
        second.text()
    );
    assert_eq!(instance(&first), instance(&second), "same session");
    assert!(!first.text().contains("secret-access-token"));

    // The connection shows its live state, never a token.
    let one = alice.get("/v1/connections/demo").await;
    assert_eq!(one.status, 200, "{}", one.text());
    let one = one.json();
    assert_eq!(one["state"], "ready");
    assert!(one["tool_count"].as_u64().unwrap() >= 3);
    assert!(one["last_used"].is_string());
    assert_eq!(one["restarts"], 0);
    let list = alice.get("/v1/connections").await.json();
    assert_eq!(list["connections"].as_array().unwrap().len(), 1);

    // Admin stats agree on the pid: the session's leader, whose namespace holds the server.
    let stats = server.admin().get("/v1/stats").await;
    assert_eq!(stats.status, 200, "{}", stats.text());
    let stats = stats.json();
    assert_eq!(stats["total_connections"], 1);
    let node = server.admin().get("/v1/stats?scope=node").await;
    assert_eq!(node.json()["total_connections"], 1, "{}", node.text());
    let cluster = server.admin().get("/v1/stats?scope=cluster").await;
    assert_eq!(cluster.status, 409, "{}", cluster.text());
    assert_eq!(cluster.json()["error"]["code"], "not_clustered");
    let bogus = server.admin().get("/v1/stats?scope=").await;
    assert_eq!(bogus.status, 400, "{}", bogus.text());
    assert_eq!(bogus.json()["error"]["code"], "invalid_scope");
    let leader = stats["connections"][0]["pid"].as_u64().unwrap() as u32;
    assert!(
        common::host_pid(leader, pid(&first)).is_some_and(common::alive),
        "the server that answered runs under the session's leader {leader}"
    );
    assert_eq!(stats["connections"][0]["sandbox"], "enforced");

    // Replacing the credentials closes the live session: the next call gets a new process.
    let replaced = alice.connect("demo").await;
    assert_eq!(replaced.status, 200, "{}", replaced.text());
    let third = alice.call("demo", "whoami", &json!({})).await;
    assert_eq!(third.status, 200, "{}", third.text());
    assert_ne!(
        instance(&third),
        instance(&first),
        "replacement restarted the session"
    );

    // Delete: deactivated and closed; afterwards the server has no credentials for alice.
    let deleted = alice.delete("/v1/connections/demo").await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    assert_eq!(deleted.json()["session_closed"], true);
    alice
        .get("/v1/connections/demo")
        .await
        .expect_error(404, "no_credentials");
    alice
        .call("demo", "echo", &json!({ "message": "x" }))
        .await
        .expect_error(404, "no_credentials");
    alice
        .delete("/v1/connections/demo")
        .await
        .expect_error(404, "no_credentials");

    // Purge deletes the (inactive) row too.
    assert_eq!(alice.connect("demo").await.status, 201);
    let purged = alice.delete("/v1/connections/demo?purge=true").await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert_eq!(purged.json()["purged"], true);
    let rows = server
        .state
        .store
        .list(
            Some(&mcp_pool::store::UserId::parse("alice").unwrap()),
            true,
        )
        .await
        .unwrap();
    assert!(rows.is_empty(), "purge removed every row: {rows:?}");
    alice
        .delete("/v1/connections/demo?purge=maybe")
        .await
        .expect_error(400, "invalid_query");

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_status_and_the_service_keeps_serving() {
    let server = TestServer::start("", "", "", &[]).await;
    let bob = server.user("bob");
    assert_eq!(bob.connect("demo").await.status, 201);

    // Malformed JSON, wrong types, unknown fields, nothing to store.
    bob.raw("PUT", "/v1/connections/demo", "{\"access_token\": ")
        .await
        .expect_error(400, "malformed_json");
    bob.put_json("/v1/connections/demo", &json!({ "access_token": 5 }))
        .await
        .expect_error(400, "invalid_body");
    bob.put_json(
        "/v1/connections/demo",
        &json!({ "access_token": "a", "user_id": "eve" }),
    )
    .await
    .expect_error(400, "invalid_body");
    bob.put_json("/v1/connections/demo", &json!({}))
        .await
        .expect_error(400, "invalid_body");
    bob.put_json(
        "/v1/connections/demo",
        &json!({ "access_token": "a", "token_expiry": "soon" }),
    )
    .await
    .expect_error(400, "invalid_body");
    bob.request("PUT", "/v1/connections/demo", None, b"{}".to_vec())
        .await
        .expect_error(415, "unsupported_media_type");
    bob.raw("POST", "/v1/connections/demo/tools/echo/call", "{nope")
        .await
        .expect_error(400, "malformed_json");
    bob.raw("POST", "/v1/connections/demo/tools/echo/call", "[1, 2]")
        .await
        .expect_error(400, "invalid_body");
    // The tool's own argument validation comes back as 400.
    bob.call("demo", "echo", &json!({ "message": 5 }))
        .await
        .expect_error(400, "invalid_arguments");

    // Bodies over the limit: 413 with the JSON error shape, for JSON and raw bodies alike.
    let huge = format!("{{\"access_token\": \"{}\"}}", "a".repeat(2 * 1024 * 1024));
    bob.raw("PUT", "/v1/connections/demo", &huge)
        .await
        .expect_error(413, "payload_too_large");
    let huge_args = format!("{{\"message\": \"{}\"}}", "a".repeat(2 * 1024 * 1024));
    bob.raw("POST", "/v1/connections/demo/tools/echo/call", &huge_args)
        .await
        .expect_error(413, "payload_too_large");

    // Traversal-looking and invalid names.
    for path in [
        "/v1/connections/..%2F..%2Fetc",
        "/v1/connections/..",
        "/v1/connections/Demo",
        "/v1/connections/%2e%2e",
        "/v1/connections/a%00b",
    ] {
        let resp = bob.get(path).await;
        resp.expect_error(400, "invalid_server_name");
    }
    bob.get("/v1/connections/a/b")
        .await
        .expect_error(404, "not_found");
    bob.get("/v1/connections/nope")
        .await
        .expect_error(404, "unknown_server");
    bob.call("nope", "echo", &json!({}))
        .await
        .expect_error(404, "unknown_server");
    bob.clone()
        .with_header("x-user-id", "../eve")
        .get("/v1/connections")
        .await
        .expect_error(400, "invalid_user_id");
    server
        .anonymous()
        .with_header("authorization", &format!("Bearer {}", server.service_key))
        .get("/v1/connections")
        .await
        .expect_error(400, "missing_user_id");

    // Unknown tool, unknown route, wrong method.
    bob.call("demo", "no_such_tool", &json!({}))
        .await
        .expect_error(404, "unknown_tool");
    bob.get("/v2/whatever").await.expect_error(404, "not_found");
    bob.request("PATCH", "/v1/connections/demo", None, vec![])
        .await
        .expect_error(405, "method_not_allowed");

    // A server that dies mid-call: 502, not safe to retry.
    let crash = bob.call("demo", "crash", &json!({})).await;
    crash.expect_error(502, "server_crashed");
    assert_eq!(crash.json()["error"]["retry_safe"], false);

    // The service keeps serving, and the session comes back.
    let came_back = wait_until(PATIENCE, || async {
        let echo = bob
            .call("demo", "echo", &json!({ "message": "again" }))
            .await;
        echo.status == 200 && content_text(&echo.json()) == "again"
    })
    .await;
    assert!(came_back, "the session restarts after a crash");
    assert_eq!(server.anonymous().get("/healthz").await.status, 200);
    let restarts = bob.get("/v1/connections/demo").await.json()["restarts"].as_u64();
    assert!(restarts >= Some(1), "{restarts:?}");

    server.stop().await;
}

/// Every route of issue 4, as (method, OpenAPI path).
const ROUTES: &[(&str, &str)] = &[
    ("put", "/v1/connections/{server}"),
    ("get", "/v1/connections"),
    ("post", "/v1/connections/warm"),
    ("get", "/v1/connections/{server}"),
    ("delete", "/v1/connections/{server}"),
    ("get", "/v1/connections/{server}/tools"),
    ("post", "/v1/connections/{server}/tools/{tool}/call"),
    ("post", "/v1/chat"),
    ("get", "/v1/stats"),
    ("delete", "/v1/admin/users/{user}/connections"),
    ("delete", "/v1/admin/users/{user}/connections/{server}"),
    ("get", "/v1/admin/events"),
    ("get", "/admin"),
    ("post", "/v1/admin/credentials/cleanup"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

/// `(name, labels, value)` of one sample line.
type Sample = (String, String, f64);

/// Prometheus naming conventions: a counter's samples are `<name>_total`, nothing else ends in
/// `_total`, and whatever measures time or size says its unit in its name.
fn assert_prometheus_conventions(types: &[(String, String)], samples: &[Sample]) {
    for (family, kind) in types {
        let of_family: Vec<&String> = samples
            .iter()
            .map(|(name, _, _)| name)
            .filter(|name| {
                name.strip_prefix(family.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('_'))
            })
            .collect();
        match kind.as_str() {
            "counter" => {
                for name in &of_family {
                    assert!(
                        name.ends_with("_total") || name.ends_with("_created"),
                        "counter sample {name} lacks _total"
                    );
                }
            }
            _ => assert!(
                !family.ends_with("_total"),
                "{kind} {family} ends in _total"
            ),
        }
        let measures = ["duration", "time", "memory", "cpu", "latency", "size"];
        if measures.iter().any(|m| family.contains(m)) {
            assert!(
                family.ends_with("_seconds") || family.ends_with("_bytes"),
                "{family} measures time or size but names no unit"
            );
        }
        assert!(
            !family.contains("carol"),
            "no user id in a metric name: {family}"
        );
    }
}

/// Parses Prometheus/OpenMetrics text: `# TYPE` per family, `name{labels} value` samples.
fn parse_metrics(text: &str) -> (Vec<(String, String)>, Vec<Sample>) {
    let mut types = Vec::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line has a kind");
            types.push((name.to_owned(), kind.to_owned()));
        } else if line.starts_with("# HELP ") || line == "# EOF" || line.starts_with("# UNIT ") {
        } else {
            assert!(!line.starts_with('#'), "unknown comment line {line:?}");
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => {
                    assert!(labels.ends_with('}'), "{line:?}");
                    (name.to_owned(), labels.trim_end_matches('}').to_owned())
                }
                None => (series.to_owned(), String::new()),
            };
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "metric name {name:?}"
            );
            samples.push((name, labels, value));
        }
    }
    (types, samples)
}

fn sample(samples: &[Sample], name: &str, labels: &str) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| n == name && l == labels)
        .map(|(_, _, v)| *v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_openapi_admin_and_readiness() {
    // The shutdown delay only has to outlast the assertions made during it: long enough that
    // only a hang runs it out. The test abandons the service afterwards instead of waiting.
    let mut server = TestServer::start("", "", "[http]\nshutdown_delay = \"10m\"\n", &[]).await;
    // `[http]` above went into the auth section's text; make sure it was taken.
    assert_eq!(
        server.state.config.http.shutdown_delay,
        std::time::Duration::from_secs(600)
    );
    let carol = server.user("carol");
    assert_eq!(carol.connect("demo").await.status, 201);
    for _ in 0..3 {
        assert_eq!(
            carol
                .call("demo", "echo", &json!({ "message": "m" }))
                .await
                .status,
            200
        );
    }
    carol
        .call("demo", "nope", &json!({}))
        .await
        .expect_error(404, "unknown_tool");

    let metrics = server.anonymous().get("/metrics").await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    assert!(!text.contains("carol"), "no user ids in metrics:\n{text}");
    let (types, samples) = parse_metrics(&text);
    for (family, kind) in [
        ("mcp_pool_tool_calls", "counter"),
        ("mcp_pool_tool_call_duration_seconds", "histogram"),
        ("mcp_pool_http_errors", "counter"),
        ("mcp_pool_chat_requests", "counter"),
        ("mcp_pool_sessions", "gauge"),
        ("mcp_pool_server_memory_bytes", "gauge"),
        ("mcp_pool_server_cpu_seconds", "gauge"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
        ("process_cpu_seconds", "counter"),
        ("mcp_pool_session_spawns", "counter"),
        ("mcp_pool_session_cold_start_seconds", "histogram"),
    ] {
        assert!(
            types.iter().any(|(n, k)| n == family && k == kind),
            "# TYPE {family} {kind} missing:\n{text}"
        );
    }
    assert_eq!(
        sample(
            &samples,
            "mcp_pool_tool_calls_total",
            "server=\"demo\",outcome=\"ok\""
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &samples,
            "mcp_pool_tool_calls_total",
            "server=\"demo\",outcome=\"unknown_tool\""
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &samples,
            "mcp_pool_tool_call_duration_seconds_count",
            "server=\"demo\",outcome=\"ok\""
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &samples,
            "mcp_pool_http_errors_total",
            "code=\"unknown_tool\""
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &samples,
            "mcp_pool_sessions",
            "server=\"demo\",state=\"ready\""
        ),
        Some(1.0),
        "{text}"
    );
    let memory = sample(&samples, "mcp_pool_server_memory_bytes", "server=\"demo\"");
    assert!(
        memory.is_some_and(|bytes| bytes > 1024.0 * 1024.0),
        "the demo session's processes use more than 1 MiB: {memory:?}"
    );
    let open_fds = sample(&samples, "process_open_fds", "").unwrap();
    let max_fds = sample(&samples, "process_max_fds", "").unwrap();
    assert!(
        open_fds >= 3.0 && max_fds >= open_fds,
        "{open_fds} / {max_fds}"
    );
    assert!(sample(&samples, "process_cpu_seconds_total", "").unwrap() > 0.0);
    assert_prometheus_conventions(&types, &samples);
    assert_eq!(
        sample(&samples, "mcp_pool_session_spawns_total", "server=\"demo\""),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &samples,
            "mcp_pool_session_cold_start_seconds_count",
            "server=\"demo\""
        ),
        Some(1.0),
        "{text}"
    );

    // OpenAPI: valid JSON, every route listed with its method.
    let doc = server.anonymous().get("/openapi.json").await;
    assert_eq!(doc.status, 200);
    let doc = doc.json();
    assert_eq!(doc["openapi"], "3.1.0");
    for (method, path) in ROUTES {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing from /openapi.json"
        );
    }
    let chat =
        &doc["paths"]["/v1/chat"]["post"]["requestBody"]["content"]["application/json"]["schema"];
    assert_eq!(chat["$ref"], "#/components/schemas/ChatRequest");
    let chat_props = &doc["components"]["schemas"]["ChatRequest"]["properties"];
    for field in ["message", "history", "servers", "stream"] {
        assert!(chat_props[field].is_object(), "ChatRequest.{field}");
    }

    // Admin routes: user key 403, no key 401, admin key works.
    for (method, path, body) in [
        ("GET", "/v1/stats", ""),
        ("DELETE", "/v1/admin/users/carol/connections", ""),
        (
            "POST",
            "/v1/admin/credentials/cleanup",
            "{\"inactive_for\": \"30d\"}",
        ),
    ] {
        carol
            .raw(method, path, body)
            .await
            .expect_error(403, "forbidden");
        server
            .anonymous()
            .raw(method, path, body)
            .await
            .expect_error(401, "unauthorized");
        server
            .bearer("not-the-admin-key")
            .raw(method, path, body)
            .await
            .expect_error(401, "unauthorized");
    }
    let admin = server.admin();
    // The admin key cannot act as a user.
    admin
        .clone()
        .with_header("x-user-id", "carol")
        .get("/v1/connections")
        .await
        .expect_error(403, "forbidden");
    admin
        .post_json(
            "/v1/admin/credentials/cleanup",
            &json!({ "inactive_for": "soon" }),
        )
        .await
        .expect_error(400, "invalid_duration");
    let cleanup = admin
        .post_json(
            "/v1/admin/credentials/cleanup",
            &json!({ "inactive_for": "30d" }),
        )
        .await;
    assert_eq!(cleanup.status, 200, "{}", cleanup.text());
    assert_eq!(cleanup.json()["deleted"], 0);
    admin
        .delete("/v1/admin/users/..%2Fx/connections")
        .await
        .expect_error(400, "invalid_user_id");
    let closed = admin.delete("/v1/admin/users/carol/connections").await;
    assert_eq!(closed.status, 200, "{}", closed.text());
    assert_eq!(closed.json()["closed"], 1);
    // Credentials stay: the next call starts a fresh session.
    assert_eq!(
        carol
            .call("demo", "echo", &json!({ "message": "m" }))
            .await
            .status,
        200
    );

    // Readiness: ready, then 503 once shutdown begins, while health and the API still answer.
    let ready = server.anonymous().get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    server.begin_shutdown();
    let unready = wait_until(PATIENCE, || async {
        let resp = server.anonymous().get("/readyz").await;
        resp.status == 503 && resp.json()["status"] == "shutting_down"
    })
    .await;
    assert!(unready, "readyz turns 503 shutting_down during shutdown");
    assert_eq!(server.anonymous().get("/healthz").await.status, 200);
    assert_eq!(
        carol
            .call("demo", "echo", &json!({ "message": "m" }))
            .await
            .status,
        200
    );
    server.abandon();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_an_in_flight_call() {
    let mut server = TestServer::api_key().await;
    let dave = server.user("dave");
    assert_eq!(dave.connect("demo").await.status, 201);
    assert_eq!(
        dave.call("demo", "echo", &json!({ "message": "warm" }))
            .await
            .status,
        200
    );
    // Long enough that only a hang lets it end before the shutdown below begins.
    let slow = {
        let dave = dave.clone();
        tokio::spawn(async move { dave.call("demo", "sleep", &json!({ "ms": 5000 })).await })
    };
    let in_flight = wait_until(PATIENCE, || async {
        server.state.pool.stats().await.unwrap().connections[0].in_flight == 1
    })
    .await;
    assert!(in_flight, "the call is in flight");
    server.begin_shutdown();
    let resp = slow.await.unwrap();
    assert_eq!(resp.status, 200, "in-flight call finished: {}", resp.text());
    assert_eq!(content_text(&resp.json()), "slept 5000 ms");
    server.stop().await;
}
