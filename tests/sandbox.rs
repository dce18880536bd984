//! Confinement of MCP servers (README, "Security model"): a hostile server, run for one user
//! while another user's session is live, reaches nothing of that user or of the service, and
//! its resource use stays inside its limits. The hostile server is the demo server's
//! `--test-tools` probes (`read_file`, `write_file`, `signal`, `env`, `spawn_detached`,
//! `alloc`, `fork_many`, ...); every probe runs in a real confined process.

mod common;
#[path = "common/http.rs"]
mod http;

use std::path::{Path, PathBuf};

use common::{PATIENCE, alive, host_pid, pids_with_marker, wait_until};
use http::{Client, TestServer, content_text, denied};
use serde_json::{Value, json};

const EACCES: i64 = 13;

/// Runs a probe tool and returns its `{"ok", "value", "error", "errno"}` report.
async fn probe(client: &Client, tool: &str, args: Value) -> Value {
    http::probe_on(client, "demo", tool, args).await
}

async fn whoami(client: &Client, server: &str) -> Value {
    let resp = client.call(server, "whoami", &json!({})).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    serde_json::from_str(&content_text(&resp.json())).unwrap()
}

async fn leader_of(ts: &TestServer, user: &str, server: &str) -> u32 {
    let stats = ts.admin().get("/v1/stats").await.json();
    stats["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["user_id"] == user && c["server"] == server)
        .and_then(|c| c["pid"].as_u64())
        .expect("session in stats") as u32
}

fn path(dir: &Path, rel: &str) -> String {
    dir.join(rel).display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_server_reaches_nothing_of_other_users_or_the_service() {
    let ts = TestServer::api_key().await;
    let dir = ts.dir.path().to_owned();
    let alice = ts.user("alice");
    let mallory = ts.user("mallory");
    assert_eq!(alice.connect("demo").await.status, 201);
    assert_eq!(mallory.connect("demo").await.status, 201);
    // Alice's session is live while mallory probes.
    let alices = whoami(&alice, "demo").await;
    let alice_server = host_pid(
        leader_of(&ts, "alice", "demo").await,
        alices["pid"].as_u64().unwrap() as u32,
    )
    .unwrap();
    let mallorys = whoami(&mallory, "demo").await;
    let own_credentials = mallorys["credentials_file"]["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let alice_credentials = path(&dir, "creds/alice/demo/credentials.json");
    assert!(
        Path::new(&alice_credentials).is_file(),
        "alice's file exists"
    );
    let service = std::process::id();

    // Reading: other users' credentials, every key file, the database, the config, the
    // service's and the other server's environment.
    let config_file = std::env::current_dir().unwrap().join("config.toml");
    let mut reads = vec![
        alice_credentials.clone(),
        path(&dir, "data/key"),
        path(&dir, "data/api.key"),
        path(&dir, "data/admin.key"),
        path(&dir, "data/db.sqlite"),
        config_file.display().to_string(),
        format!("/proc/{service}/environ"),
        format!("/proc/{alice_server}/environ"),
        format!("/proc/{alice_server}/fd/0"),
        "/etc/shadow".to_owned(),
    ];
    reads.retain(|p| !p.starts_with("/proc") || Path::new(p).exists());
    for target in &reads {
        if !target.starts_with("/proc") {
            assert!(Path::new(target).exists(), "probe target {target} exists");
        }
        let report = probe(&mallory, "read_file", json!({ "path": target })).await;
        denied(&report, &format!("reading {target}"));
    }
    // Listing the data and credentials directories is refused too.
    for target in [path(&dir, "data"), path(&dir, "creds")] {
        let report = probe(&mallory, "list_dir", json!({ "path": target })).await;
        assert_eq!(denied(&report, &format!("listing {target}")), EACCES);
    }
    // Its /proc holds only its own namespace: no service, no other server.
    let procs = probe(&mallory, "list_dir", json!({ "path": "/proc" })).await;
    let pids: Vec<u64> = procs["value"]
        .as_array()
        .expect("own /proc is readable")
        .iter()
        .filter_map(|n| n.as_str()?.parse().ok())
        .collect();
    assert!(pids.contains(&1) && pids.contains(&2), "{pids:?}");
    assert!(
        !pids.contains(&u64::from(service)) || service <= 2,
        "the service is visible: {pids:?}"
    );

    // Writing into the data directory, the credentials directory, /tmp.
    for target in [
        path(&dir, "data/planted"),
        path(&dir, "creds/alice/demo/credentials.json"),
        "/tmp/mcp-pool-sandbox-probe".to_owned(),
    ] {
        let report = probe(
            &mallory,
            "write_file",
            json!({ "path": target, "content": "x" }),
        )
        .await;
        assert_eq!(denied(&report, &format!("writing {target}")), EACCES);
        assert!(!Path::new(&path(&dir, "data/planted")).exists());
    }

    // Signalling the service and the other server (signal 0 only probes; SIGTERM would be
    // fatal if it went through).
    for (pid, what) in [(service, "the service"), (alice_server, "alice's server")] {
        let report = probe(&mallory, "signal", json!({ "pid": pid, "signal": 15 })).await;
        denied(&report, &format!("signalling {what}"));
    }
    // Inside its namespace, its own init is visible, yet outside its Landlock domain: signal
    // scoping refuses even that (EPERM), where without it the init would pass SIGTERM on.
    let report = probe(&mallory, "signal", json!({ "pid": 1, "signal": 15 })).await;
    assert_eq!(
        denied(&report, "signalling the namespace's init"),
        1,
        "EPERM"
    );
    assert!(alive(alice_server), "alice's server survived");
    assert_eq!(whoami(&alice, "demo").await["instance"], alices["instance"]);

    // A symlink planted in its own state directory does not lead anywhere new.
    let state = dir.join("state/mallory/demo");
    let link = state.join("alice-creds");
    let planted = probe(
        &mallory,
        "symlink",
        json!({ "target": alice_credentials, "link": link.display().to_string() }),
    )
    .await;
    assert_eq!(
        planted["ok"], true,
        "its own directory is writable: {planted}"
    );
    let report = probe(
        &mallory,
        "read_file",
        json!({ "path": link.display().to_string() }),
    )
    .await;
    assert_eq!(denied(&report, "reading through a planted symlink"), EACCES);

    // What it may do: read its own credentials, use its state directory.
    let own = probe(&mallory, "read_file", json!({ "path": own_credentials })).await;
    assert_eq!(own["ok"], true, "{own}");
    assert!(own["value"].as_u64().unwrap() > 0);
    let scratch = state.join("scratch.txt").display().to_string();
    let wrote = probe(
        &mallory,
        "write_file",
        json!({ "path": scratch, "content": "mine" }),
    )
    .await;
    assert_eq!(wrote["ok"], true, "{wrote}");
    assert_eq!(std::fs::read_to_string(&scratch).unwrap(), "mine");

    // Its environment is the allowlist only.
    let env = probe(&mallory, "env", json!({})).await;
    let names: Vec<&str> = env["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    for name in &names {
        assert!(
            common::allowed_server_env(name, &[]),
            "unexpected variable {name} in {names:?}"
        );
    }
    for name in ["PATH", "HOME", "TMPDIR", "MCP_POOL_CREDENTIALS_FILE"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    assert!(
        std::env::var_os("MCP_POOL_TEST_EVERYTHING").is_some()
            && !names.contains(&"MCP_POOL_TEST_EVERYTHING"),
        "the service's own variables stay behind"
    );

    // No capabilities, no_new_privs set.
    let privileges = probe(&mallory, "privileges", json!({})).await;
    let privileges = &privileges["value"];
    for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        assert_eq!(privileges[set], "0000000000000000", "{set}: {privileges}");
    }
    assert_eq!(privileges["NoNewPrivs"], "1");
    assert_eq!(privileges["MaxOpenFiles"], "1024", "sandbox.nofile");

    // Stats and metrics say how each session is confined.
    let stats = ts.admin().get("/v1/stats").await.json();
    for c in stats["connections"].as_array().unwrap() {
        assert_eq!(c["sandbox"], "enforced", "{c}");
    }
    let metrics = ts.anonymous().get("/metrics").await.text();
    assert!(
        metrics.contains("mcp_pool_sessions_by_sandbox{sandbox=\"enforced\"} 2"),
        "{metrics}"
    );
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_grandchild_dies_with_its_session() {
    let ts = TestServer::api_key().await;
    let user = ts.user("dora");
    assert_eq!(user.connect("demo").await.status, 201);
    let marker = format!("mcp-pool-detached-{}", std::process::id());
    let spawned = probe(&user, "spawn_detached", json!({ "marker": marker })).await;
    assert_eq!(spawned["ok"], true, "{spawned}");
    assert!(
        wait_until(PATIENCE, || std::future::ready(
            !pids_with_marker(&marker).is_empty()
        ))
        .await,
        "the detached process runs"
    );
    let detached = pids_with_marker(&marker);
    // It really left the session's process group and session.
    let leader = leader_of(&ts, "dora", "demo").await;
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", detached[0])).unwrap();
    let pgrp: u32 = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(pgrp, leader, "setsid left the group");

    let closed = user.delete("/v1/connections/demo").await;
    assert_eq!(closed.status, 200, "{}", closed.text());
    assert!(
        wait_until(PATIENCE, || std::future::ready(
            detached.iter().all(|pid| !alive(*pid))
        ))
        .await,
        "the detached process outlived its session"
    );
    ts.stop().await;
}

/// A busy service holds thousands of descriptors, more than a server's `nofile` (1,024), and a
/// forked child holds all of them until exec. Confinement must not need a new descriptor after
/// lowering that limit: it once opened `/proc` for its Landlock rule afterwards, and every start
/// past about 250 live sessions failed with EMFILE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confined_server_starts_while_the_service_holds_more_descriptors_than_its_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    use std::os::fd::AsRawFd as _;
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let ts = TestServer::api_key().await;
    let ballast: Vec<std::fs::File> = (0..1200)
        .map(|_| std::fs::File::open("/dev/null").unwrap())
        .collect();
    assert!(
        ballast.last().unwrap().as_raw_fd() > 1024,
        "the test holds descriptors above 1024"
    );
    let user = ts.user("busy");
    assert_eq!(user.connect("demo").await.status, 201);
    let me = whoami(&user, "demo").await;
    assert!(me["pid"].as_u64().is_some(), "{me}");
    let stats = ts.admin().get("/v1/stats").await.json();
    let session = stats["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["user_id"] == "busy")
        .expect("session in stats")
        .clone();
    assert_eq!(session["sandbox"], "enforced", "{session}");
    // The limit still applies to the server itself.
    let privileges = probe(&user, "privileges", json!({})).await;
    assert_eq!(privileges["value"]["MaxOpenFiles"], "1024", "{privileges}");
    drop(ballast);
    ts.stop().await;
}

fn limited_server(name: &str, sandbox: &str) -> String {
    format!(
        "[servers.{name}]\ncommand = {bin:?}\nargs = [\"demo-server\", \"--test-tools\"]\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n\
         [servers.{name}.sandbox]\n{sandbox}\n",
        bin = common::BIN
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_past_the_limit_fails_the_call_clearly_and_the_server_restarts() {
    let ts = TestServer::start(
        "",
        &limited_server("small", "memory_max = \"64MiB\""),
        "",
        &[],
    )
    .await;
    let user = ts.user("erin");
    assert_eq!(user.connect("small").await.status, 201);
    let before = whoami(&user, "small").await;
    // Under the limit: fine.
    let ok = user.call("small", "alloc", &json!({ "mib": 8 })).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    // Past it: the kernel kills the server; the call says why.
    let over = user.call("small", "alloc", &json!({ "mib": 256 })).await;
    over.expect_error(502, "server_memory_limit");
    assert!(over.text().contains("64 MiB"), "{}", over.text());
    // The restart works.
    let after = std::sync::Mutex::new(None::<Value>);
    let came_back = wait_until(PATIENCE, || {
        let (user, after) = (&user, &after);
        async move {
            let resp = user.call("small", "whoami", &json!({})).await;
            if resp.status != 200 {
                return false;
            }
            let who = serde_json::from_str(&content_text(&resp.json())).unwrap();
            *after.lock().unwrap() = Some(who);
            true
        }
    })
    .await;
    assert!(came_back, "the server came back");
    let after = after.into_inner().unwrap().unwrap();
    assert_ne!(after["instance"], before["instance"], "a new process");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_stays_inside_its_pids_limit() {
    let ts = TestServer::start("", &limited_server("tiny", "pids_max = 16"), "", &[]).await;
    let bomber = ts.user("fred");
    let other = ts.user("gina");
    assert_eq!(bomber.connect("tiny").await.status, 201);
    assert_eq!(other.connect("demo").await.status, 201);
    whoami(&other, "demo").await;

    let (bomb_args, echo_args) = (json!({ "count": 200 }), json!({ "message": "still here" }));
    let (bomb, echo) = tokio::join!(
        bomber.call("tiny", "fork_many", &bomb_args),
        other.call("demo", "echo", &echo_args),
    );
    assert_eq!(bomb.status, 200, "{}", bomb.text());
    let report: Value = serde_json::from_str(&content_text(&bomb.json())).unwrap();
    let started = report["value"].as_u64().unwrap();
    assert!(
        started < 16,
        "started {started} processes past pids_max: {report}"
    );
    assert!(report["error"].is_string(), "the fork failed: {report}");
    assert_eq!(echo.status, 200, "{}", echo.text());
    assert_eq!(content_text(&echo.json()), "still here");
    // The bomber itself survives its failed forks.
    whoami(&bomber, "tiny").await;
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_enforce_refuses_best_effort_degrades_off_is_reported() {
    // A cgroup root without controllers stands for a host without cgroup limits.
    let nowhere = tempfile::tempdir().unwrap();
    let servers = [
        limited_server("strict", "mode = \"enforce\""),
        limited_server("lenient", "mode = \"best_effort\""),
        limited_server("trusted", "mode = \"off\""),
    ]
    .join("\n");
    let ts = TestServer::start(
        "",
        &format!(
            "{servers}\n[sandbox]\ncgroup_root = {root:?}\nstate_dir = {state:?}\n",
            root = nowhere.path().display().to_string(),
            state = PathBuf::from(nowhere.path())
                .join("state")
                .display()
                .to_string(),
        ),
        "",
        &[],
    )
    .await;
    let user = ts.user("hana");
    for server in ["strict", "lenient", "trusted"] {
        assert_eq!(user.connect(server).await.status, 201);
    }
    let refused = user.call("strict", "whoami", &json!({})).await;
    refused.expect_error(502, "sandbox_unavailable");
    assert!(refused.text().contains("cgroup"), "{}", refused.text());
    whoami(&user, "lenient").await;
    whoami(&user, "trusted").await;
    let stats = ts.admin().get("/v1/stats").await.json();
    let status = |server: &str| {
        stats["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["server"] == server)
            .map(|c| c["sandbox"].clone())
            .unwrap_or(Value::Null)
    };
    assert!(
        status("lenient").as_str().unwrap().starts_with("partial"),
        "{}",
        status("lenient")
    );
    assert_eq!(status("trusted"), "off");
    // best_effort still applies what the host has: Landlock keeps the data directory out.
    let dir = ts.dir.path().to_owned();
    let resp = user
        .call(
            "lenient",
            "read_file",
            &json!({ "path": path(&dir, "data/key") }),
        )
        .await;
    let report: Value = serde_json::from_str(&content_text(&resp.json())).unwrap();
    assert_eq!(denied(&report, "best_effort reading the key"), EACCES);
    ts.stop().await;
}

/// The pid `generations` parents above `pid`.
fn ancestor(pid: u32, generations: usize) -> Option<u32> {
    let mut current = pid;
    for _ in 0..generations {
        let stat = std::fs::read_to_string(format!("/proc/{current}/stat")).ok()?;
        current = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
    }
    Some(current)
}

/// The CPU weight of `pid`'s cgroup, as cgroup v1 `cpu.shares` (1024 = weight 100) or v2
/// `cpu.weight`.
fn cpu_weight_of(pid: u32) -> Option<u64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        if controllers.split(',').any(|c| c == "cpu") {
            let file = format!("/sys/fs/cgroup/cpu{path}/cpu.shares");
            return std::fs::read_to_string(file).ok()?.trim().parse().ok();
        }
        if controllers.is_empty() {
            let file = format!("/sys/fs/cgroup{path}/cpu.weight");
            if let Ok(text) = std::fs::read_to_string(file) {
                return text.trim().parse().ok();
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_a_crash_runs_at_the_backoff_cpu_weight_until_ready() {
    let server = format!(
        "[servers.slowcrash]\ncommand = {bin:?}\n\
         args = [\"demo-server\", \"--test-tools\", \"--slow-start\", \"2s\"]\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n",
        bin = common::BIN
    );
    let ts = TestServer::start("", &server, "", &[]).await;
    let user = ts.user("ivy");
    assert_eq!(user.connect("slowcrash").await.status, 201);
    let first = whoami(&user, "slowcrash").await;
    let leader = leader_of(&ts, "ivy", "slowcrash").await;
    let first_server = host_pid(leader, first["pid"].as_u64().unwrap() as u32).unwrap();
    let normal = cpu_weight_of(first_server).expect("the session has a cpu cgroup");
    assert_eq!(normal, 1024, "weight 100 as cpu.shares");

    user.call("slowcrash", "crash", &json!({}))
        .await
        .expect_error(502, "server_crashed");
    // The pool restarts it on its own; during its 2 s start it runs at the backoff weight.
    let mut restarting = None;
    assert!(
        wait_until(PATIENCE, || {
            // Other tests run slow servers too: only this service's sessions count (server,
            // its namespace's init, the shim, then this test process).
            restarting = pids_with_marker("--slow-start")
                .into_iter()
                .filter(|pid| ancestor(*pid, 3) == Some(std::process::id()))
                .find(|pid| *pid != first_server)
                .and_then(|pid| Some((pid, cpu_weight_of(pid)?)));
            std::future::ready(restarting.is_some())
        })
        .await,
        "the restart began"
    );
    let (new_server, weight) = restarting.unwrap();
    assert_eq!(weight, 102, "backoff weight 10 as cpu.shares");
    let second = whoami(&user, "slowcrash").await;
    assert_ne!(second["instance"], first["instance"]);
    assert_eq!(
        cpu_weight_of(new_server),
        Some(1024),
        "normal weight once ready"
    );
    ts.stop().await;
}
