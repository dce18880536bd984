//! The real `mcp-pool` binary: configuration errors, operator commands, clean shutdown.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::BIN;

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let data = dir.join("data");
    let text = format!(
        "[service]\nlisten = \"127.0.0.1:0\"\ndata_dir = {data:?}\nshutdown_grace = \"10s\"\n\
         [database]\nurl = \"sqlite://{}/db.sqlite\"\n[credentials]\ndir = {:?}\n\
         [encryption]\nkey_file = \"{}/key\"\n\
         [servers.demo]\ncommand = \"{{self}}\"\nargs = [\"demo-server\"]\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n{extra}",
        data.display(),
        dir.join("creds"),
        data.display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn run(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("MCP_POOL_DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_config_checks_out() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(BIN)
        .current_dir(root)
        .args(["check-config"])
        .env_remove("MCP_POOL_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("demo") && stdout.contains("google-analytics"),
        "{stdout}"
    );
}

#[test]
fn invalid_configs_exit_non_zero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[pool]\nidle_timeout = \"sixty\"\n", "idle_timeout"),
        ("[pool]\nmax_connections = 0\n", "pool.max_connections"),
        ("[pool]\nreap_interval = \"0s\"\n", "pool.reap_interval"),
        ("[database]\nurl = \"mysql://x\"\n", "database.url"),
        (
            "[servers.Bad]\ncommand = \"x\"\ncredentials_env = \"X\"\ncredentials_format = \"token_json\"\n",
            "servers.Bad",
        ),
        ("[pool]\nunknown_key = 1\n", "unknown_key"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let (ok, _, stderr) = run(&path, &["check-config"]);
        assert!(!ok, "{text} was accepted");
        assert!(stderr.contains(key), "{key} not named in: {stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
            "{stderr}"
        );
    }
    let (ok, _, stderr) = run(&dir.path().join("missing.toml"), &["check-config"]);
    assert!(!ok && stderr.contains("missing.toml"), "{stderr}");
}

#[test]
fn operator_commands_manage_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let (ok, _, stderr) = run(&config, &["migrate"]);
    assert!(ok, "{stderr}");
    let (ok, stdout, _) = run(&config, &["credentials", "list"]);
    assert!(ok && stdout.contains("0 rows"), "{stdout}");
    // Bad identifiers are refused with a clear message.
    let (ok, _, stderr) = run(
        &config,
        &[
            "credentials",
            "delete",
            "--user",
            "../x",
            "--server",
            "demo",
        ],
    );
    assert!(!ok && stderr.contains("user id"), "{stderr}");
    let (ok, _, stderr) = run(
        &config,
        &[
            "credentials",
            "deactivate",
            "--user",
            "nobody",
            "--server",
            "demo",
        ],
    );
    assert!(!ok && stderr.contains("no active credentials"), "{stderr}");
    let (ok, stdout, _) = run(
        &config,
        &["credentials", "cleanup", "--inactive-for", "30d"],
    );
    assert!(ok && stdout.contains("deleted 0"), "{stdout}");
    let (ok, stdout, stderr) = run(&config, &["credentials", "rotate-key"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("key version 2"), "{stdout}");
    let key = std::fs::read_to_string(dir.path().join("data/key")).unwrap();
    assert_eq!(key.lines().count(), 2, "a second key version was added");
    let (ok, _, stderr) = run(
        &config,
        &["credentials", "cleanup", "--inactive-for", "soon"],
    );
    assert!(!ok && stderr.contains("inactive-for"), "{stderr}");
    // Under the 1 h minimum: refused, naming the flag and the bound.
    let (ok, _, stderr) = run(
        &config,
        &["credentials", "cleanup", "--inactive-for", "1ns"],
    );
    assert!(
        !ok && stderr.contains("--inactive-for") && stderr.contains("1h"),
        "{stderr}"
    );
}

/// `check-config` names each server whose program is missing (and the program), but the file
/// itself is valid, so it still exits 0; a bare name found in PATH and `{self}` pass silently.
#[test]
fn check_config_names_servers_whose_program_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[servers.ghost]\ncommand = \"mcp-pool-no-such-program\"\n\
         credentials_env = \"X_CREDENTIALS\"\ncredentials_format = \"token_json\"\n\
         [servers.shell]\ncommand = \"sh\"\n\
         credentials_env = \"X_CREDENTIALS\"\ncredentials_format = \"token_json\"\n\
         [servers.relative]\ncommand = \"./not/here\"\n\
         credentials_env = \"X_CREDENTIALS\"\ncredentials_format = \"token_json\"\n",
    );
    let (ok, stdout, stderr) = run(&config, &["check-config"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
    assert!(
        stderr.contains("server `ghost`") && stderr.contains("`mcp-pool-no-such-program`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("server `relative`") && stderr.contains("`./not/here`"),
        "{stderr}"
    );
    assert!(!stderr.contains("server `shell`"), "{stderr}");
    assert!(!stderr.contains("server `demo`"), "{stderr}");
}

#[test]
fn serve_shuts_down_cleanly_on_sigterm_and_sigint() {
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), "");
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env_remove("MCP_POOL_DATABASE_URL")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let started = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|line| line.contains("mcp-pool started"));
        assert!(started, "serve did not start");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("data"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o700,
            "the data directory holds keys: private"
        );
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not exit after {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "{signal}: {status:?}\n{}",
            rest.join("\n")
        );
        assert!(
            rest.iter().any(|l| l.contains("mcp-pool stopped")),
            "{}",
            rest.join("\n")
        );
    }
}
