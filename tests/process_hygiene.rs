//! The real `mcp-pool serve` binary and its children: SIGTERM closes every MCP server (and what
//! they spawned); after a SIGKILL the servers die with it (PR_SET_PDEATHSIG on the session's
//! leader and init, whose PID namespace takes every other process with it, detached or not).

mod common;
#[path = "common/http.rs"]
mod http;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{BIN, alive, host_pid, pids_with_marker, wait_until};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(30);
const API_KEY: &str = "test-service-key-0123456789";

fn write_config(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data");
    let text = format!(
        "[service]\nlisten = \"127.0.0.1:0\"\ndata_dir = {data:?}\nshutdown_grace = \"20s\"\n\
         [database]\nurl = \"sqlite://{d}/db.sqlite\"\n[credentials]\ndir = {creds:?}\n\
         [encryption]\nkey_file = \"{d}/key\"\n\
         [auth]\napi_key_file = \"{d}/api.key\"\nadmin_key_file = \"{d}/admin.key\"\n\
         [pool]\nclose_grace = \"1s\"\n[sandbox]\nstate_dir = \"{d}/state\"\n\
         [servers.demo]\ncommand = \"{{self}}\"\nargs = [\"demo-server\", \"--test-tools\"]\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n",
        d = data.display(),
        creds = dir.join("creds"),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A running `mcp-pool serve` whose log lines are collected as they come.
struct Service {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Service {
    fn start(config: &Path) -> Service {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .arg("serve")
            .env("MCP_POOL_API_KEY", API_KEY)
            .env_remove("MCP_POOL_DATABASE_URL")
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if line.contains("mcp-pool started")
                    && let Some(addr) = line
                        .split_whitespace()
                        .find_map(|word| word.strip_prefix("listen="))
                {
                    let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(LONG)
            .expect("the service starts and logs its address");
        Service { child, addr, log }
    }

    /// The session leader's pid of `user`'s session, from the admin stats.
    async fn leader_of(&self, user: &str, data: &Path) -> u32 {
        let admin_key = std::fs::read_to_string(data.join("admin.key")).unwrap();
        let admin = http::Client {
            addr: self.addr,
            headers: vec![(
                "authorization".into(),
                format!("Bearer {}", admin_key.trim()),
            )],
        };
        let stats = admin.get("/v1/stats").await.json();
        stats["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["user_id"] == user)
            .and_then(|c| c["pid"].as_u64())
            .expect("the user's session is in the stats") as u32
    }

    fn client(&self, user: &str) -> http::Client {
        http::Client {
            addr: self.addr,
            headers: vec![
                ("authorization".into(), format!("Bearer {API_KEY}")),
                ("x-user-id".into(), user.into()),
            ],
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the service did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn logged(&self, needle: &str) -> bool {
        self.log
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains(needle))
    }
}

impl Drop for Service {
    /// A failing test must not leak a running `serve` (and its servers): stop it the graceful
    /// way first, so it closes its children, and SIGKILL it only if that does not end it.
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + LONG;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    let mut service = Service::start(&write_config(dir.path()));
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
    let config = write_config(dir.path());
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
