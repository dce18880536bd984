//! McpSession against the real bundled demo server (`mcp-pool demo-server --test-tools`).

mod common;

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{PATIENCE, wait_until};
use mcp_pool::mcp::{ExitReason, McpError, McpSession, ProcessRegistry, ServerLaunch};
use rmcp::model::CallToolResult;
use serde_json::{Value, json};

const STARTUP: Duration = Duration::from_secs(30);
const CALL: Duration = Duration::from_secs(60);
/// "Promptly": far below `CALL`, far above any honest scheduling delay.
const PROMPTLY: Duration = Duration::from_secs(5);

// === helpers ===

fn demo(extra_args: &[&str]) -> ServerLaunch {
    let mut args = vec!["demo-server".to_owned(), "--test-tools".to_owned()];
    args.extend(extra_args.iter().map(|arg| (*arg).to_owned()));
    ServerLaunch {
        command: env!("CARGO_BIN_EXE_mcp-pool").to_owned(),
        args,
        env: BTreeMap::new(),
        cwd: None,
    }
}

async fn connect() -> McpSession {
    McpSession::connect(&demo(&[]), None, STARTUP, None)
        .await
        .expect("demo server starts")
}

fn args(value: Value) -> Option<serde_json::Map<String, Value>> {
    match value {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

fn text(result: &CallToolResult) -> String {
    assert_ne!(result.is_error, Some(true), "tool failed: {result:?}");
    result
        .content
        .iter()
        .filter_map(|block| block.as_text().map(|t| t.text.clone()))
        .collect()
}

/// `/proc/<pid>/stat` state letter, or `None` when the pid does not exist (reaped).
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn running(pid: u32) -> bool {
    state(pid).is_some_and(|s| s != 'Z' && s != 'X')
}

/// Pids of processes whose environment holds `marker`.
fn pids_with_env(marker: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()))
        })
        .collect()
}

// === tests ===

#[tokio::test]
async fn connect_lists_tools_and_echoes() {
    let session = connect().await;
    let names: Vec<String> = session
        .tools()
        .iter()
        .map(|tool| tool.name.to_string())
        .collect();
    for expected in [
        "echo",
        "add",
        "sleep",
        "whoami",
        "crash",
        "spawn_grandchild",
        "add_tool",
        "trigger_list_changed",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    let echoed = session
        .call_tool("echo", args(json!({ "message": "hello pool" })), CALL)
        .await
        .expect("echo");
    assert_eq!(text(&echoed), "hello pool");
    let sum = session
        .call_tool("add", args(json!({ "a": 2, "b": 3.5 })), CALL)
        .await
        .expect("add");
    assert_eq!(text(&sum), "5.5");
    let unknown = session.call_tool("no_such_tool", None, CALL).await;
    assert!(matches!(unknown, Err(McpError::Server(_))), "{unknown:?}");

    let pid = session.pid();
    session.close(Duration::from_secs(5)).await;
    assert_eq!(state(pid), None, "leader must be exited and reaped");
}

#[tokio::test]
async fn whoami_sees_the_credentials_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = dir.path().join("creds.json");
    std::fs::write(
        &creds,
        r#"{"type":"service_account","private_key":"TOP-SECRET-VALUE","client_email":"x@y"}"#,
    )
    .expect("write creds");
    let mut launch = demo(&[]);
    let path = creds.display().to_string();
    launch
        .env
        .insert("MCP_POOL_CREDENTIALS_FILE".into(), path.clone());
    launch
        .env
        .insert("GOOGLE_APPLICATION_CREDENTIALS".into(), path.clone());
    launch
        .env
        .insert("MCP_POOL_USER_ID".into(), "user-42".into());
    assert!(
        !format!("{launch:?}").contains(&path),
        "Debug must not print env values"
    );

    let session = McpSession::connect(&launch, None, STARTUP, None)
        .await
        .expect("connect");
    let result = session
        .call_tool("whoami", None, CALL)
        .await
        .expect("whoami");
    let raw = text(&result);
    assert!(
        !raw.contains("TOP-SECRET-VALUE"),
        "whoami leaked a value: {raw}"
    );
    let report: Value = serde_json::from_str(&raw).expect("whoami returns JSON");
    assert_eq!(report["pid"], json!(session.pid()));
    assert_eq!(report["user"], json!("user-42"));
    for field in ["credentials_file", "google_application_credentials"] {
        let file = &report[field];
        assert_eq!(file["path"], json!(path), "{field}");
        assert_eq!(file["exists"], json!(true), "{field}");
        assert_eq!(file["valid_json"], json!(true), "{field}");
        let keys = file["keys"].as_array().expect("keys");
        assert!(keys.contains(&json!("private_key")), "{field}: {keys:?}");
        assert!(keys.contains(&json!("client_email")), "{field}: {keys:?}");
    }
    session.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn sixty_four_concurrent_calls_share_one_session() {
    let session = Arc::new(connect().await);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..64 {
        let session = session.clone();
        calls.spawn(async move {
            let message = format!("call-{i}");
            let result = session
                .call_tool("echo", args(json!({ "message": message })), CALL)
                .await;
            (message, result)
        });
    }
    let mut ok = 0;
    while let Some(joined) = calls.join_next().await {
        let (message, result) = joined.expect("task");
        assert_eq!(text(&result.expect("echo")), message);
        ok += 1;
    }
    assert_eq!(ok, 64);
    let session = Arc::try_unwrap(session).expect("all clones dropped");
    session.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_timed_out_call_is_cancelled_and_the_session_lives_on() {
    let session = connect().await;
    let started = Instant::now();
    let slow = session
        .call_tool(
            "sleep",
            args(json!({ "ms": 60_000 })),
            Duration::from_millis(300),
        )
        .await;
    assert!(matches!(slow, Err(McpError::Timeout(_))), "{slow:?}");
    assert!(started.elapsed() < Duration::from_secs(30));

    let echoed = session
        .call_tool("echo", args(json!({ "message": "still here" })), CALL)
        .await
        .expect("echo after timeout");
    assert_eq!(text(&echoed), "still here");

    // The server saw `notifications/cancelled` and stopped sleeping.
    let cancelled = wait_until(PATIENCE, || async {
        let stats = session.call_tool("stats", None, CALL).await.expect("stats");
        let stats: Value = serde_json::from_str(&text(&stats)).expect("json");
        stats["cancelled_sleeps"] == 1
    })
    .await;
    assert!(cancelled, "the server counted one cancelled sleep");
    session.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_crash_fails_in_flight_calls_promptly_and_signals_the_end() {
    let session = Arc::new(connect().await);
    let pid = session.pid();
    let mut ended = session.ended();
    let mut sleeps = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let session = session.clone();
        sleeps.spawn(async move {
            session
                .call_tool("sleep", args(json!({ "ms": 55_000 })), CALL)
                .await
        });
    }
    // Calls sent after the crash fail too, so this is not a race the test can lose.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let crash = session.call_tool("crash", None, CALL).await;
    assert!(matches!(crash, Err(McpError::Closed)), "{crash:?}");
    while let Some(joined) = sleeps.join_next().await {
        let result = joined.expect("task");
        assert!(matches!(result, Err(McpError::Closed)), "{result:?}");
    }
    assert!(started.elapsed() < PROMPTLY, "took {:?}", started.elapsed());

    let reason = tokio::time::timeout(PROMPTLY, ended.wait_for(Option::is_some))
        .await
        .expect("ended fires promptly")
        .map(|r| *r)
        .expect("sender alive");
    assert_eq!(reason, Some(ExitReason::TransportClosed));
    assert_eq!(session.closed().await, ExitReason::TransportClosed);
    assert!(
        wait_until(PATIENCE, || std::future::ready(state(pid).is_none())).await,
        "crashed leader not reaped"
    );
    let later = session
        .call_tool("echo", args(json!({ "message": "x" })), CALL)
        .await;
    // After the end nothing is written: the caller learns it may send the call elsewhere.
    assert!(matches!(later, Err(McpError::NotSent)), "{later:?}");

    let session = Arc::try_unwrap(session).expect("all clones dropped");
    session.close(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn tools_list_changed_refreshes_the_cache() {
    let session = connect().await;
    let mut changes = session.tools_changed();
    let before = *changes.borrow_and_update();
    let added = session
        .call_tool("trigger_list_changed", None, CALL)
        .await
        .expect("trigger");
    let name = text(&added);
    assert_eq!(name, "extra_1");

    let has_new_tool = |s: &McpSession| s.tools().iter().any(|t| t.name == name);
    tokio::time::timeout(Duration::from_secs(10), changes.wait_for(|n| *n > before))
        .await
        .expect("refresh within 10 s")
        .expect("cache alive");
    assert!(has_new_tool(&session), "{:?}", session.tools());

    let echoed = session
        .call_tool(&name, args(json!({ "message": "new tool" })), CALL)
        .await
        .expect("call the new tool");
    assert_eq!(text(&echoed), "new tool");
    session.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn close_kills_grandchildren_and_reaps_the_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = ProcessRegistry::open(dir.path().join("pgids")).expect("registry");
    let session = McpSession::connect(&demo(&[]), None, STARTUP, Some(&registry))
        .await
        .expect("connect");
    let pid = session.pid();
    assert!(
        registry.dir().join(pid.to_string()).exists(),
        "group recorded"
    );
    let spawned = session
        .call_tool("spawn_grandchild", None, CALL)
        .await
        .expect("spawn_grandchild");
    let grandchild: u32 = text(&spawned).parse().expect("pid");
    assert!(running(grandchild));

    session.close(Duration::from_secs(2)).await;
    assert_eq!(state(pid), None, "leader must be reaped, not a zombie");
    // The grandchild is an orphan by now: init reaps it, so it may still be a zombie briefly.
    assert!(
        !running(grandchild),
        "grandchild survived close: {:?}",
        state(grandchild)
    );
    assert!(
        !registry.dir().join(pid.to_string()).exists(),
        "record removed on close"
    );
}

#[tokio::test]
async fn kill_now_ends_the_session() {
    let session = connect().await;
    let pid = session.pid();
    session.kill_now();
    let reason = tokio::time::timeout(PROMPTLY, session.closed())
        .await
        .expect("ended promptly");
    assert_eq!(reason, ExitReason::TransportClosed);
    assert!(wait_until(PATIENCE, || std::future::ready(state(pid).is_none())).await);
    session.close(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn slow_start_times_out_and_leaves_no_process() {
    let marker = format!("MCP_POOL_TEST_MARKER={}", uuid::Uuid::new_v4());
    let mut launch = demo(&["--slow-start", "60s"]);
    let (key, value) = marker.split_once('=').expect("marker");
    launch.env.insert(key.to_owned(), value.to_owned());

    // A zombie has an empty environ, so note the server's pid while it is alive.
    let watcher = {
        let marker = marker.clone();
        tokio::spawn(async move {
            loop {
                let seen = pids_with_env(&marker);
                if !seen.is_empty() {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let started = Instant::now();
    let result = McpSession::connect(&launch, None, Duration::from_secs(1), None).await;
    assert!(
        matches!(result, Err(McpError::StartupTimeout(_))),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let seen = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("the server was seen while it ran")
        .expect("watcher");
    for pid in seen {
        assert_eq!(state(pid), None, "server {pid} left behind (not reaped)");
    }
}

#[tokio::test]
async fn a_missing_binary_is_a_spawn_error() {
    let launch = ServerLaunch {
        command: "/nonexistent/mcp-server".to_owned(),
        ..ServerLaunch::default()
    };
    let result = McpSession::connect(&launch, None, STARTUP, None).await;
    assert!(matches!(result, Err(McpError::Spawn { .. })), "{result:?}");
}
