//! The pool with real third-party MCP servers installed by the test command from npm and PyPI:
//! `@modelcontextprotocol/server-everything`, `mcp-server-time` and Google's `analytics-mcp`.

mod common;

use std::time::Duration;

use common::{required_env, test_config};
use mcp_pool::app::App;
use mcp_pool::store::CredentialWriter;
use mcp_pool::store::{Secret, ServerName, Tokens, UserId};
use rmcp::model::CallToolResult;
use serde_json::{Value, json};

fn third_party_servers() -> String {
    let everything = required_env("MCP_POOL_TEST_EVERYTHING");
    let time = required_env("MCP_POOL_TEST_TIME_BIN");
    let analytics = required_env("MCP_POOL_TEST_ANALYTICS_BIN");
    format!(
        "[servers.everything]\ncommand = \"node\"\nargs = [{everything:?}, \"stdio\"]\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n\
         [servers.time]\ncommand = {time:?}\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n\
         [servers.analytics]\ncommand = {analytics:?}\n\
         credentials_env = \"GOOGLE_APPLICATION_CREDENTIALS\"\n\
         credentials_format = \"google_authorized_user\"\n\
         [servers.analytics.oauth]\nclient_id = \"test-client.apps.googleusercontent.com\"\n"
    )
}

async fn app_with_credentials(dir: &std::path::Path, user: &str, servers: &[&str]) -> App {
    let app = App::build(test_config(dir, "", &third_party_servers()))
        .await
        .unwrap();
    for server in servers {
        app.storage
            .credentials
            .create(
                &UserId::parse(user).unwrap(),
                &ServerName::parse(server).unwrap(),
                Tokens {
                    access_token: Some(Secret::new("ya29.test-access")),
                    refresh_token: Some(Secret::new("1//test-refresh")),
                    token_expiry: None,
                },
            )
            .await
            .unwrap();
    }
    app
}

fn text(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|block| block.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("")
}

fn args(value: Value) -> Option<serde_json::Map<String, Value>> {
    value.as_object().cloned()
}

/// Every live session of `app` runs fully confined (enforce mode, no declared paths needed).
async fn assert_all_enforced(app: &App) {
    let stats = app.pool.stats().await.unwrap();
    assert!(!stats.connections.is_empty());
    for conn in &stats.connections {
        assert_eq!(conn.sandbox.as_deref(), Some("enforced"), "{}", conn.server);
    }
}

fn ids(user: &str, server: &str) -> (UserId, ServerName) {
    (
        UserId::parse(user).unwrap(),
        ServerName::parse(server).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_everything_through_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let app = app_with_credentials(dir.path(), "vera", &["everything"]).await;
    let (vera, everything) = ids("vera", "everything");
    let conn = app.pool.get_session(&vera, &everything).await.unwrap();
    assert_all_enforced(&app).await;
    let names: Vec<String> = conn.tools().iter().map(|t| t.name.to_string()).collect();
    for expected in ["echo", "get-sum", "get-env"] {
        assert!(names.contains(&expected.to_owned()), "{names:?}");
    }
    let echoed = app
        .pool
        .call_tool(&vera, &everything, "echo", args(json!({ "message": "hi" })))
        .await
        .unwrap();
    assert_eq!(text(&echoed), "Echo: hi");
    let sum = conn
        .call_tool("get-sum", args(json!({ "a": 2, "b": 40 })))
        .await
        .unwrap();
    assert!(text(&sum).contains("42"), "{}", text(&sum));

    // The server sees its credentials file, and none of the service's own MCP_POOL_* secrets.
    let env: Value = serde_json::from_str(&text(&conn.call_tool("get-env", None).await.unwrap()))
        .expect("get-env returns the environment as JSON");
    let env = env.as_object().expect("an object of variables");
    let file = env["MCP_POOL_CREDENTIALS_FILE"].as_str().unwrap();
    assert!(
        file.ends_with("/vera/everything/credentials.json"),
        "{file}"
    );
    let leaked: Vec<&String> = env
        .keys()
        .filter(|k| k.starts_with("MCP_POOL_") && *k != "MCP_POOL_CREDENTIALS_FILE")
        .collect();
    assert!(
        leaked.is_empty(),
        "service variables reached the server: {leaked:?}"
    );
    assert!(
        std::env::vars().any(|(k, _)| k == "MCP_POOL_TEST_EVERYTHING"),
        "the test itself runs with MCP_POOL_* variables set, so the check above means something"
    );

    let again = app.pool.get_session(&vera, &everything).await.unwrap();
    assert_eq!(again.pid(), conn.pid(), "the session is reused");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_server_time_through_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let app = app_with_credentials(dir.path(), "walt", &["time"]).await;
    let (walt, time) = ids("walt", "time");
    let tools = app.pool.list_tools(&walt, &time).await.unwrap();
    assert_all_enforced(&app).await;
    let names: Vec<String> = tools.iter().map(|t| t.name.to_string()).collect();
    assert!(names.contains(&"get_current_time".to_owned()), "{names:?}");
    assert!(names.contains(&"convert_time".to_owned()), "{names:?}");
    let now = app
        .pool
        .call_tool(
            &walt,
            &time,
            "get_current_time",
            args(json!({ "timezone": "UTC" })),
        )
        .await
        .unwrap();
    assert_ne!(now.is_error, Some(true));
    let reply: Value = serde_json::from_str(&text(&now)).unwrap();
    assert_eq!(reply["timezone"], "UTC");
    let bad = app
        .pool
        .call_tool(
            &walt,
            &time,
            "get_current_time",
            args(json!({ "timezone": "Mars/Olympus" })),
        )
        .await;
    // A tool failure is a result (is_error) or a JSON-RPC error, never a transport failure.
    match bad {
        Ok(result) => assert_eq!(result.is_error, Some(true)),
        Err(err) => assert!(
            matches!(err, mcp_pool::actors::PoolError::Mcp(_)),
            "{err:?}"
        ),
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_analytics_mcp_through_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let app = app_with_credentials(dir.path(), "xena", &["analytics"]).await;
    let (xena, analytics) = ids("xena", "analytics");
    let conn = app.pool.get_session(&xena, &analytics).await.unwrap();
    assert_all_enforced(&app).await;
    let names: Vec<String> = conn.tools().iter().map(|t| t.name.to_string()).collect();
    for expected in [
        "get_account_summaries",
        "get_property_details",
        "run_report",
        "run_realtime_report",
    ] {
        assert!(names.contains(&expected.to_owned()), "{names:?}");
    }
    // The credentials file is Google's authorized_user format with the user's refresh token.
    let file = dir.path().join("creds/xena/analytics/credentials.json");
    let json: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(json["type"], "authorized_user");
    assert_eq!(json["refresh_token"], "1//test-refresh");

    // Offline, Google's API is unreachable: the tool reports an error result, and it got past
    // loading credentials (so it found and parsed the file the pool handed it). The outer bound
    // is far above the call timeout; a timeout is a failure, not a pass.
    let call = tokio::time::timeout(
        Duration::from_secs(120),
        conn.call_tool("get_account_summaries", None),
    )
    .await
    .expect("the call ends within the call timeout");
    let result = call.expect("the tool answers (a timed-out call proves nothing)");
    let body = text(&result);
    assert_eq!(result.is_error, Some(true), "{body}");
    common::assert_reached_google(&body);
    app.stop().await;
}

/// A server started the way READMEs tell people to, through `npx`, still works confined: npm
/// runs from /usr, reads the declared prefix, and writes its cache under the session's HOME.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_through_npx_runs_confined() {
    let everything = required_env("MCP_POOL_TEST_EVERYTHING");
    // <prefix>/node_modules/@modelcontextprotocol/server-everything/dist/index.js
    let prefix = std::path::Path::new(&everything)
        .ancestors()
        .nth(5)
        .unwrap()
        .display()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let server = format!(
        "[servers.npx]\ncommand = \"npx\"\n\
         args = [\"--offline\", \"--prefix\", {prefix:?}, \"mcp-server-everything\", \"stdio\"]\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n\
         [servers.npx.sandbox]\nmode = \"enforce\"\nread = [{prefix:?}]\n"
    );
    let app = App::build(test_config(dir.path(), "", &server))
        .await
        .unwrap();
    let (wren, npx) = ids("wren", "npx");
    app.storage
        .credentials
        .create(
            &wren,
            &npx,
            Tokens {
                access_token: Some(Secret::new("t")),
                refresh_token: None,
                token_expiry: None,
            },
        )
        .await
        .unwrap();
    let echoed = app
        .pool
        .call_tool(&wren, &npx, "echo", args(json!({ "message": "via npx" })))
        .await
        .unwrap();
    assert_eq!(text(&echoed), "Echo: via npx");
    let stats = app.pool.stats().await.unwrap();
    assert_eq!(stats.connections[0].sandbox.as_deref(), Some("enforced"));
    // npm's cache went to the session's private HOME, not to the service's.
    assert!(dir.path().join("state/wren/npx/.npm").is_dir());
    app.stop().await;
}
