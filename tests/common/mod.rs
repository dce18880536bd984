//! Shared helpers of the integration tests: a fresh store per test on a real SQLite file or in
//! a fresh schema of the real PostgreSQL server.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use mcp_pool::store::{BackendKind, Store, StoreOptions};

/// The PostgreSQL server the test command makes sure is running.
pub fn postgres_admin_url() -> String {
    std::env::var("MCP_POOL_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A database URL for `kind` that no other test uses. PostgreSQL gets a new schema; a missing
/// server fails the test rather than skipping it.
pub async fn fresh_database_url(kind: BackendKind, dir: &std::path::Path) -> String {
    match kind {
        BackendKind::Sqlite => format!("sqlite://{}", dir.join("db/mcp-pool.db").display()),
        BackendKind::Postgres => {
            use sqlx::Connection;
            let admin = postgres_admin_url();
            let mut conn = sqlx::PgConnection::connect(&admin)
                .await
                .unwrap_or_else(|err| {
                    panic!("PostgreSQL at {admin} is required (run scripts/test): {err}")
                });
            let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                .execute(&mut conn)
                .await
                .expect("create schema");
            let sep = if admin.contains('?') { '&' } else { '?' };
            format!("{admin}{sep}options=-c%20search_path%3D{schema}")
        }
    }
}

/// Store options for a test: its own database and key file under `dir`.
pub async fn store_options(kind: BackendKind, dir: &std::path::Path) -> StoreOptions {
    StoreOptions {
        url: fresh_database_url(kind, dir).await,
        max_connections: 5,
        busy_timeout: Duration::from_secs(5),
        key_file: dir.join("data/encryption.key"),
        env_keys: None,
    }
}

/// A migrated store of `kind` in a fresh database, with everything on disk under the tempdir.
/// Also returns the options, so a test can open a second, independent store on the same data.
pub async fn fresh_store(kind: BackendKind) -> (Store, tempfile::TempDir, StoreOptions) {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = store_options(kind, dir.path()).await;
    let store = Store::connect(&options).await.expect("connect");
    store.migrate().await.expect("migrate");
    (store, dir, options)
}

pub fn credentials_dir(dir: &std::path::Path) -> PathBuf {
    dir.join("mcp-credentials")
}

// === pool harness ===

/// The real mcp-pool binary (which also serves the bundled demo server).
pub const BIN: &str = env!("CARGO_BIN_EXE_mcp-pool");

/// Asserts that an analytics-mcp tool call failed past loading its credentials, inside
/// Google's client code: offline, the Admin API's host does not resolve; with a network, Google
/// refuses the test refresh token. (A missing file would say "default credentials were not
/// found".)
pub fn assert_reached_google(body: &str) {
    assert!(
        !body.contains("default credentials were not found"),
        "{body}"
    );
    assert!(
        body.contains("analyticsadmin.googleapis.com") || body.contains("invalid_grant"),
        "{body}"
    );
}

/// Whether `name` may be in a confined server's environment: the allowlist (README, "Security
/// model"), its HOME/TMPDIR, its credentials variable, and the names in `configured`.
pub fn allowed_server_env(name: &str, configured: &[&str]) -> bool {
    matches!(
        name,
        "PATH" | "LANG" | "LANGUAGE" | "TZ" | "HOME" | "TMPDIR" | "MCP_POOL_CREDENTIALS_FILE"
    ) || name.starts_with("LC_")
        || configured.contains(&name)
}

/// A path the test command exports; a missing one fails the test rather than skipping it.
pub fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the suite with scripts/test, which installs the servers")
    })
}

/// A config for tests: everything under `dir`, SQLite, short grace periods, and the demo
/// server under several names. `extra` is appended (more `[servers.x]` tables, pool tweaks).
pub fn test_config(dir: &std::path::Path, pool: &str, extra: &str) -> mcp_pool::config::Config {
    let demo = |name: &str, args: &str| {
        format!(
            "[servers.{name}]\ncommand = {BIN:?}\nargs = [\"demo-server\", \"--test-tools\"{args}]\n\
             credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n"
        )
    };
    let text = format!(
        "[service]\ndata_dir = {data:?}\nshutdown_grace = \"15s\"\n\
         [database]\nurl = \"sqlite://{data}/db.sqlite\"\n\
         [credentials]\ndir = {creds:?}\n\
         [encryption]\nkey_file = \"{data}/key\"\n\
         [pool]\nclose_grace = \"1s\"\nstartup_timeout = \"30s\"\n{pool}\n\
         {}{}{}{}{extra}",
        demo("demo", ""),
        demo("demo2", ""),
        demo("demo3", ""),
        demo("slow", ", \"--slow-start\", \"8s\""),
        data = dir.join("data").display(),
        creds = dir.join("creds").display(),
    );
    let mut config = mcp_pool::config::Config::parse(&text).expect("test config parses");
    if config.sandbox.state_dir == mcp_pool::config::SandboxConfig::default().state_dir {
        config.sandbox.state_dir = dir.join("state");
    }
    config.validate().expect("test config validates");
    config
}

/// Whether `pid` is a running process (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// Whether `pid` has no /proc entry at all (reaped).
pub fn gone(pid: u32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The host pid of the process that is `inner` inside the PID namespace of the session whose
/// leader is `leader`: servers run as pid 2 of a namespace of their own, and report that pid.
/// Without such a namespace `inner` is already the host pid.
pub fn host_pid(leader: u32, inner: u32) -> Option<u32> {
    let ns = std::fs::read_link(format!("/proc/{leader}/ns/pid_for_children")).ok()?;
    if std::fs::read_link("/proc/self/ns/pid").ok()? == ns {
        return Some(inner);
    }
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|link| link == ns)
                && std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|status| {
                        let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
                        line.split_whitespace().last()?.parse::<u32>().ok()
                    })
                    == Some(inner)
        })
}

/// Host pids of the running processes whose command line contains `marker`.
pub fn pids_with_marker(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains(marker))
                })
                .filter(|pid| alive(*pid))
                .collect()
        })
        .unwrap_or_default()
}

// === polling ===

/// How long a test waits for a state that should come "soon": long enough that only a real hang
/// exceeds it on a loaded two-core machine, never a bound that a slow run can trip.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Polls an async condition every 20 ms until it holds (`true`) or `limit` passes (`false`).
/// The one polling helper of the suite: tests wait on the state itself, never a fixed time.
pub async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
