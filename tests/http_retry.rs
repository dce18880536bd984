//! A call whose session died before the request was written is retried on a fresh session:
//! over HTTP the caller gets 200, never a 502 `server_crashed`, when the server was dead
//! before the call.
//!
//! "Dead" means the killed group has exited. A call racing the kill itself (its request
//! written while the process was still exiting) cannot be told from a crash during the call
//! and stays a 502: the tool may have run.

mod common;
#[path = "common/http.rs"]
mod http;

use common::{PATIENCE, wait_until};
use http::{TestServer, content_text};
use serde_json::json;

/// Whether any process of group `pgid` is still running (not a zombie): the group's processes
/// hold the server's stdin, so once none runs, no request can reach it.
fn group_running(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|stat| {
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // After the command: state, ppid, pgrp.
            fields.len() > 2
                && fields[0] != "Z"
                && fields[0] != "X"
                && fields[2] == pgid.to_string()
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_right_after_kill_9_succeeds_on_a_new_session() {
    let server = TestServer::start(
        "restart_backoff_base = \"10ms\"\nrestart_backoff_cap = \"100ms\"",
        "",
        "",
        &[],
    )
    .await;
    let alice = server.user("alice");
    assert_eq!(alice.connect("demo").await.status, 201);
    let session_pid = || async {
        let stats = server.admin().get("/v1/stats").await.json();
        stats["connections"][0]["pid"]
            .as_u64()
            .expect("a live session") as i32
    };
    let first = alice.call("demo", "echo", &json!({ "message": "0" })).await;
    assert_eq!(first.status, 200, "{}", first.text());

    // Several rounds, so the call lands at different points of the pool noticing the crash.
    for round in 1..=3 {
        let old = session_pid().await;
        nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(old),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        assert!(
            wait_until(PATIENCE, || async { !group_running(old) }).await,
            "round {round}: the killed group exited"
        );
        // At once: the pool may or may not have seen the crash yet.
        let message = format!("{round}");
        let call = alice
            .call("demo", "echo", &json!({ "message": message }))
            .await;
        assert_eq!(call.status, 200, "round {round}: {}", call.text());
        assert_eq!(content_text(&call.json()), message);
        assert_ne!(
            session_pid().await,
            old,
            "round {round}: a new session answered"
        );
    }
    server.stop().await;
}

/// The stale-session path itself: the server died, but its session still looks ready to the
/// pool, because a grandchild holds its stdout open (no end of output) while nothing holds its
/// stdin. The call's write fails (EPIPE) before anything reaches a server: it must be retried
/// on a fresh session, and the pool must not hand the dead session out again. Without the
/// retry this call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_a_dead_session_that_still_looks_ready_is_retried_on_a_new_one() {
    // Unconfined: in a sandbox the namespace's init would take the grandchild down with the
    // server, and the pool would see the end at once.
    let server = TestServer::start(
        "restart_backoff_base = \"10ms\"\nrestart_backoff_cap = \"100ms\"",
        "[sandbox]\nmode = \"off\"\n",
        "",
        &[],
    )
    .await;
    let alice = server.user("alice");
    assert_eq!(alice.connect("demo").await.status, 201);
    let stats = || async { server.admin().get("/v1/stats").await.json() };
    let first = alice.call("demo", "whoami", &json!({})).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let leader = stats().await["connections"][0]["pid"].as_u64().unwrap() as i32;

    let held = alice.call("demo", "hold_stdout", &json!({})).await;
    assert_eq!(held.status, 200, "{}", held.text());
    let holder: i32 = content_text(&held.json()).parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(leader),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        wait_until(PATIENCE, || async { !process_running(leader) }).await,
        "the server exited"
    );
    assert!(process_running(holder), "its grandchild holds stdout open");
    let before = stats().await;
    assert_eq!(before["connections"][0]["state"], "ready", "{before}");
    assert_eq!(before["connections"][0]["pid"], leader, "{before}");

    let call = alice
        .call("demo", "echo", &json!({ "message": "after" }))
        .await;
    assert_eq!(call.status, 200, "{}", call.text());
    assert_eq!(content_text(&call.json()), "after");
    let after = stats().await;
    let pid = after["connections"][0]["pid"].as_u64().unwrap() as i32;
    assert_ne!(pid, leader, "a new session answered: {after}");
    assert_eq!(after["connections"][0]["restarts"], 1, "{after}");
    assert!(
        wait_until(PATIENCE, || async { !process_running(holder) }).await,
        "the dead session's group was killed, grandchild and all"
    );
    server.stop().await;
}

/// Whether `pid` runs (exists and is not a zombie).
fn process_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}
