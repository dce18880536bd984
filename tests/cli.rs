//! The real `mcp-pool` binary: configuration errors, operator commands, clean shutdown.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mcp_pool::store::CredentialWriter;

use common::{BIN, PATIENCE};

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

/// Waits for `child` to exit, for at most `limit`; kills it and fails the test otherwise.
fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `Command::output`, bounded: a hung command fails the test instead of hanging it.
fn output_bounded(command: &mut Command) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drained in threads so a chatty child never blocks on a full pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status = wait_bounded(&mut child, PATIENCE, &format!("{command:?}"));
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn run(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = output_bounded(
        Command::new(BIN)
            .arg("--config")
            .arg(config)
            .args(args)
            .env_remove("MCP_POOL_DATABASE_URL"),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_config_checks_out() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = output_bounded(
        Command::new(BIN)
            .current_dir(root)
            .args(["check-config"])
            .env_remove("MCP_POOL_CONFIG"),
    );
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

/// Stores credentials for `(user, "demo")` through the library, as the service would; returns
/// the row's credentials file.
async fn store_credentials(config: &Path, users: &[&str]) -> Vec<std::path::PathBuf> {
    use mcp_pool::store::{Secret, ServerName, Tokens, UserId};
    let text = std::fs::read_to_string(config).unwrap();
    let config = mcp_pool::config::Config::parse(&text).unwrap();
    let storage = mcp_pool::app::Storage::open(&config, false).await.unwrap();
    let mut files = Vec::new();
    for user in users {
        let tokens = Tokens {
            access_token: Some(Secret::new(format!("access-of-{user}"))),
            refresh_token: Some(Secret::new(format!("refresh-of-{user}"))),
            token_expiry: None,
        };
        let user = UserId::parse(user).unwrap();
        let demo = ServerName::parse("demo").unwrap();
        let (info, _) = storage
            .credentials
            .create(&user, &demo, tokens)
            .await
            .unwrap();
        files.push(info.credentials_path);
    }
    storage.close().await;
    files
}

/// Reads `user`'s demo row back through the library: (key version, decrypted access token).
async fn stored_row(config: &Path, user: &str) -> Option<(u32, String)> {
    use mcp_pool::store::{ServerName, UserId};
    let text = std::fs::read_to_string(config).unwrap();
    let config = mcp_pool::config::Config::parse(&text).unwrap();
    let store = mcp_pool::store::Store::connect(&mcp_pool::app::store_options(&config))
        .await
        .unwrap();
    let user = UserId::parse(user).unwrap();
    let demo = ServerName::parse("demo").unwrap();
    let record = store.get(&user, &demo).await.unwrap();
    let version = store
        .list(Some(&user), true)
        .await
        .unwrap()
        .first()
        .map(|row| row.key_version);
    store.close().await;
    let record = record?;
    Some((
        version.expect("a listed row"),
        record.tokens.access_token.unwrap().expose().to_owned(),
    ))
}

#[test]
fn operator_commands_manage_credentials() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let (ok, _, stderr) = run(&config, &["migrate"]);
    assert!(ok, "{stderr}");
    let (ok, stdout, _) = run(&config, &["credentials", "list"]);
    assert!(ok && stdout.contains("0 rows"), "{stdout}");
    let files = runtime.block_on(store_credentials(&config, &["alice", "bob"]));

    // Real rows: listed without a token.
    let (ok, stdout, stderr) = run(&config, &["credentials", "list"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("2 rows"), "{stdout}");
    assert!(
        stdout.contains("alice") && stdout.contains("bob"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("access-of-") && !stdout.contains("refresh-of-"),
        "{stdout}"
    );

    // --no-new-key with every row on the newest key: nothing to do.
    let (ok, stdout, stderr) = run(&config, &["credentials", "rotate-key", "--no-new-key"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("key version 1 now encrypts; re-encrypted 0 rows"),
        "{stdout}"
    );
    // An operator adds key version 2 by hand: --no-new-key moves both rows onto it.
    let key_file = dir.path().join("data/key");
    let mut keys = std::fs::read_to_string(&key_file).unwrap();
    use base64::Engine as _;
    let new_key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    keys.push_str(&format!("2:{new_key}\n"));
    std::fs::write(&key_file, keys).unwrap();
    let (ok, stdout, stderr) = run(&config, &["credentials", "rotate-key", "--no-new-key"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("key version 2 now encrypts; re-encrypted 2 rows"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap().lines().count(),
        2
    );
    // Plain rotate-key adds version 3 and re-encrypts again.
    let (ok, stdout, stderr) = run(&config, &["credentials", "rotate-key"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("key version 3 now encrypts; re-encrypted 2 rows"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap().lines().count(),
        3
    );
    assert_eq!(
        runtime.block_on(stored_row(&config, "bob")),
        Some((3, "access-of-bob".to_owned())),
        "re-encrypted rows still decrypt"
    );

    // Deactivate a real row: inactive, its file gone, the other row untouched.
    assert!(files[0].exists() && files[1].exists());
    let (ok, stdout, stderr) = run(
        &config,
        &[
            "credentials",
            "deactivate",
            "--user",
            "alice",
            "--server",
            "demo",
        ],
    );
    assert!(
        ok && stdout.contains("deactivated alice/demo"),
        "{stdout}{stderr}"
    );
    assert!(!files[0].exists(), "alice's credentials file removed");
    assert!(files[1].exists());
    let (_, stdout, _) = run(&config, &["credentials", "list"]);
    assert!(
        stdout.contains("1 rows") && !stdout.contains("alice"),
        "{stdout}"
    );
    let (_, stdout, _) = run(&config, &["credentials", "list", "--all"]);
    assert!(stdout.contains("2 rows"), "{stdout}");
    // Cleanup keeps an inactive row younger than the threshold.
    let (ok, stdout, _) = run(
        &config,
        &["credentials", "cleanup", "--inactive-for", "30d"],
    );
    assert!(ok && stdout.contains("deleted 0"), "{stdout}");
    // Delete a real row.
    let (ok, stdout, stderr) = run(
        &config,
        &[
            "credentials",
            "delete",
            "--user",
            "alice",
            "--server",
            "demo",
        ],
    );
    assert!(
        ok && stdout.contains("deleted 1 rows for alice/demo"),
        "{stdout}{stderr}"
    );
    let (_, stdout, _) = run(&config, &["credentials", "list", "--all"]);
    assert!(
        stdout.contains("1 rows") && !stdout.contains("alice"),
        "{stdout}"
    );
    assert_eq!(runtime.block_on(stored_row(&config, "alice")), None);

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

/// Lines of a child's stderr, read in a thread, so a test waits for them with a bound.
fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits (bounded) for a line matching `wanted`; the lines seen, up to and including it.
fn wait_for_line(lines: &mpsc::Receiver<String>, wanted: &str) -> Vec<String> {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(wanted);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Err(_) => panic!(
                "no line with {wanted:?} within {PATIENCE:?}:\n{}",
                seen.join("\n")
            ),
        }
    }
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
        let lines = stderr_lines(&mut child);
        wait_for_line(&lines, "mcp-pool started");
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
        let rest = wait_for_line(&lines, "mcp-pool stopped");
        let status = wait_bounded(&mut child, PATIENCE, &format!("serve after {signal}"));
        assert!(
            status.success(),
            "{signal}: {status:?}\n{}",
            rest.join("\n")
        );
    }
}

/// One HTTP/1.1 request on a fresh connection; the response's status and body.
fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `log.format = "json"`: every line of the real binary's log is one JSON object, the spans'
/// `user_id` and `server` are in it, and no secret is: not a stored token, not the service key,
/// not a wrong key somebody tried. Debug level, so that as much as possible is logged.
#[test]
fn json_logs_are_one_object_per_line_with_span_fields_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[log]\nformat = \"json\"\n");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env_remove("MCP_POOL_DATABASE_URL")
        .env_remove("MCP_POOL_LOG_FORMAT")
        .env("RUST_LOG", "debug")
        .env("MCP_POOL_API_KEY", "service-key-SECRET-4711")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    let started = wait_for_line(&lines, "mcp-pool started");
    let start: serde_json::Value = serde_json::from_str(started.last().unwrap()).unwrap();
    let addr = start["listen"].as_str().expect("listen field").to_owned();

    let user = [
        ("Authorization", "Bearer service-key-SECRET-4711"),
        ("X-User-Id", "erin"),
        ("Content-Type", "application/json"),
    ];
    let (status, body) = http_request(
        &addr,
        "PUT",
        "/v1/connections/demo",
        &user,
        r#"{"access_token":"access-token-SECRET-0042","refresh_token":"refresh-SECRET-0043"}"#,
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = http_request(
        &addr,
        "POST",
        "/v1/connections/demo/tools/echo/call",
        &user,
        r#"{"message":"hello"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let wrong = [
        ("Authorization", "Bearer wrong-key-SECRET-0666"),
        ("X-User-Id", "erin"),
    ];
    let (status, _) = http_request(&addr, "GET", "/v1/connections", &wrong, "");
    assert_eq!(status, 401);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut seen = started;
    seen.extend(wait_for_line(&lines, "mcp-pool stopped"));
    assert!(wait_bounded(&mut child, PATIENCE, "serve").success());
    seen.extend(lines.try_iter());

    let mut with_user_span = 0;
    for line in &seen {
        assert!(!line.contains("SECRET"), "a secret in the log: {line}");
        let object: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("not one JSON object ({err}): {line}"));
        assert!(
            object["level"].is_string() && object["timestamp"].is_string(),
            "{line}"
        );
        let in_erins_span = object["spans"]
            .as_array()
            .is_some_and(|spans| spans.iter().any(|span| span["user_id"] == "erin"));
        if in_erins_span {
            with_user_span += 1;
        }
    }
    assert!(
        with_user_span > 0,
        "no line carries the user_id span field:\n{}",
        seen.join("\n")
    );
    assert!(
        seen.iter().any(|line| line.contains(r#""server":"demo""#)),
        "no line carries the server field"
    );
}
