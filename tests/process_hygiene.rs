//! The real `mcp-pool serve` binary and its children: SIGTERM closes every MCP server (and what
//! they spawned); after a SIGKILL the servers die with it (PR_SET_PDEATHSIG on the session's
//! leader and init, whose PID namespace takes every other process with it, detached or not).

mod common;
#[path = "common/http.rs"]
mod http;
#[path = "common/service.rs"]
mod service;

use std::path::Path;

use common::{alive, host_pid, pids_with_marker, wait_until};
use serde_json::{Value, json};
use service::{LONG, Service, write_config};

/// Opens a session for `user` and has its server spawn a grandchild in its process group and
/// one that detaches (`setsid`); returns the host pids of (leader, server, grandchild,
/// detached).
async fn session_with_grandchild(
    service: &Service,
    user: &str,
    data: &Path,
) -> (u32, u32, u32, u32) {
    let client = service.client(user);
    let stored = client
        .put_json("/v1/connections/demo", &json!({ "access_token": "t" }))
        .await;
    assert_eq!(stored.status, 201, "{}", stored.text());
    let call_with = |tool: &'static str, args: Value| {
        let client = client.clone();
        async move {
            let response = client
                .post_json(&format!("/v1/connections/demo/tools/{tool}/call"), &args)
                .await;
            assert_eq!(response.status, 200, "{}", response.text());
            let body: Value = response.json();
            body["content"][0]["text"].as_str().unwrap().to_owned()
        }
    };
    let call = |tool: &'static str| call_with(tool, json!({}));
    let whoami: Value = serde_json::from_str(&call("whoami").await).unwrap();
    let leader = service.leader_of(user, data).await;
    let server = host_pid(leader, whoami["pid"].as_u64().unwrap() as u32).expect("server pid");
    let inner: u32 = call("spawn_grandchild").await.parse().unwrap();
    let grandchild = host_pid(leader, inner).expect("grandchild pid");
    let marker = format!("detached-{user}-{}", std::process::id());
    let detached: Value =
        serde_json::from_str(&call_with("spawn_detached", json!({ "marker": marker })).await)
            .unwrap();
    assert_eq!(detached["ok"], true, "{detached}");
    assert!(
        wait_until(LONG, || std::future::ready(
            pids_with_marker(&marker).len() == 1
        ))
        .await
    );
    let detached = pids_with_marker(&marker)[0];
    assert!(alive(leader) && alive(server) && alive(grandchild) && alive(detached));
    (leader, server, grandchild, detached)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_server_and_grandchild() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::start(&write_config(dir.path(), ""));
    let mut pids = Vec::new();
    for user in ["ann", "ben"] {
        let (leader, server, grandchild, detached) =
            session_with_grandchild(&service, user, &dir.path().join("data")).await;
        pids.extend([leader, server, grandchild, detached]);
    }
    service.signal(nix::sys::signal::Signal::SIGTERM);
    let status = service.wait();
    assert!(status.success(), "{status:?}");
    assert!(
        service.logged("Closed 2 MCP connections"),
        "{:?}",
        service.log.lock().unwrap()
    );
    for pid in pids {
        assert!(
            wait_until(LONG, || std::future::ready(!alive(pid))).await,
            "pid {pid} outlived the service"
        );
    }
    assert_eq!(
        std::fs::read_dir(dir.path().join("data/pgids"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_servers_and_what_they_started_die_with_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let mut service = Service::start(&config);
    let (leader, server, grandchild, detached) =
        session_with_grandchild(&service, "cid", &dir.path().join("data")).await;

    service.signal(nix::sys::signal::Signal::SIGKILL);
    service.wait();
    // The leader dies with the service (PR_SET_PDEATHSIG), the namespace's init with it, and
    // the kernel then kills everything in the namespace: no next start is needed.
    for (pid, what) in [
        (leader, "leader"),
        (server, "server"),
        (grandchild, "grandchild"),
        (detached, "setsid grandchild"),
    ] {
        assert!(
            wait_until(LONG, || std::future::ready(!alive(pid))).await,
            "the {what} outlived a SIGKILLed service"
        );
    }
    // The record of the group is still there; the next start clears it.
    assert_eq!(
        std::fs::read_dir(dir.path().join("data/pgids"))
            .unwrap()
            .count(),
        1
    );
    let mut next = Service::start(&config);
    assert_eq!(
        std::fs::read_dir(dir.path().join("data/pgids"))
            .unwrap()
            .count(),
        0
    );
    next.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(next.wait().success());
}
