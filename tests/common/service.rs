//! A real `mcp-pool serve` process for tests that signal the service itself.
//! Include with `mod common; #[path = "common/http.rs"] mod http;
//! #[path = "common/service.rs"] mod service;`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::common::BIN;
use super::http;

pub const LONG: Duration = Duration::from_secs(30);
pub const API_KEY: &str = "test-service-key-0123456789";

/// Writes a `config.toml` under `dir` with the demo server (probes on) and `servers`
/// appended, and returns its path.
pub fn write_config(dir: &Path, servers: &str) -> std::path::PathBuf {
    let data = dir.join("data");
    let text = format!(
        "[service]\nlisten = \"127.0.0.1:0\"\ndata_dir = {data:?}\nshutdown_grace = \"20s\"\n\
         [database]\nurl = \"sqlite://{d}/db.sqlite\"\n[credentials]\ndir = {creds:?}\n\
         [encryption]\nkey_file = \"{d}/key\"\n\
         [auth]\napi_key_file = \"{d}/api.key\"\nadmin_key_file = \"{d}/admin.key\"\n\
         [pool]\nclose_grace = \"1s\"\n[sandbox]\nstate_dir = \"{d}/state\"\n\
         [servers.demo]\ncommand = \"{{self}}\"\nargs = [\"demo-server\", \"--test-tools\"]\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n\
         {servers}",
        d = data.display(),
        creds = dir.join("creds"),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A running `mcp-pool serve` whose log lines are collected as they come.
pub struct Service {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Service {
    pub fn start(config: &Path) -> Service {
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

    /// `GET /v1/stats` with the admin key from `data`.
    pub async fn stats(&self, data: &Path) -> serde_json::Value {
        let admin_key = std::fs::read_to_string(data.join("admin.key")).unwrap();
        let admin = http::Client {
            addr: self.addr,
            headers: vec![(
                "authorization".into(),
                format!("Bearer {}", admin_key.trim()),
            )],
        };
        admin.get("/v1/stats").await.json()
    }

    /// The session leader's pid of `user`'s session, from the admin stats.
    pub async fn leader_of(&self, user: &str, data: &Path) -> u32 {
        self.stats(data).await["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["user_id"] == user)
            .and_then(|c| c["pid"].as_u64())
            .expect("the user's session is in the stats") as u32
    }

    pub fn client(&self, user: &str) -> http::Client {
        http::Client {
            addr: self.addr,
            headers: vec![
                ("authorization".into(), format!("Bearer {API_KEY}")),
                ("x-user-id".into(), user.into()),
            ],
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    pub fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the service did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logged(&self, needle: &str) -> bool {
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
