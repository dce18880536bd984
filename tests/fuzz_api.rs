//! Fuzzing stays in the suite (issue 11, item 9): schemathesis (PyPI, installed by
//! `scripts/setup-test-env`) runs against a live instance — the real router, pool, demo server
//! and store on a loopback port, with the scripted LLM behind `/v1/chat` — reading the
//! instance's own `/openapi.json`, with `--checks all`: no 5xx, every response matches its
//! documented status, headers and schema, schema-valid requests are accepted and invalid ones
//! refused.
//!
//! Bounded by example count, not wall time, and seeded, so a slow machine runs the same cases
//! (only slower) and a failure reproduces.

mod common;
#[path = "common/fake_llm.rs"]
mod fake_llm;
#[path = "common/http.rs"]
mod http;

use std::process::Stdio;
use std::time::{Duration, Instant};

use fake_llm::{FakeLlm, Reply};
use http::TestServer;

/// Test cases per operation and phase.
const MAX_EXAMPLES: u32 = 50;
/// Fixed, so every run generates the same cases.
const SEED: u64 = 20_261_202;
/// A hang, not slowness: the run takes well under a minute here.
const HANG: Duration = Duration::from_secs(600);

/// A tool call's body is the tool's own arguments, which each tool validates against the
/// `input_schema` that `GET .../tools` publishes: the static document can only say "an object",
/// so an object the tool refuses is a documented 400 `invalid_arguments`, not a schema breach.
/// `/mcp` speaks JSON-RPC (its own errors, its own media types) and is tested with real MCP
/// clients in `tests/mcp_endpoint.rs`: the document describes it, the fuzzer leaves it out.
const TOOL_ARGUMENTS: &str = "\
[[operations]]
include-path = \"/v1/connections/{server}/tools/{tool}/call\"
include-method = \"POST\"
[operations.checks.positive_data_acceptance]
expected-statuses = [\"2xx\", \"400\", \"401\", \"403\", \"404\", \"409\", \"429\"]
[[operations]]
include-path = \"/mcp\"
enabled = false
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_schema_mismatch() {
    let st = common::required_env("MCP_POOL_TEST_SCHEMATHESIS");
    // Every chat gets a final answer at once; the loop itself is tested elsewhere.
    let fake = FakeLlm::start((0..20_000).map(|_| Reply::text("done"))).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let text = format!(
        "[service]\ndata_dir = \"{d}/data\"\nshutdown_grace = \"15s\"\n\
         [database]\nurl = \"sqlite://{d}/data/db.sqlite\"\n\
         [credentials]\ndir = \"{d}/creds\"\n[encryption]\nkey_file = \"{d}/data/key\"\n\
         [pool]\nclose_grace = \"1s\"\nmax_connections = 40\nmax_connections_per_user = 2\n\
         [http]\nrequest_timeout = \"60s\"\n\
         [auth]\napi_key_file = \"{d}/data/api.key\"\nadmin_key_file = \"{d}/data/admin.key\"\n\
         [llm]\nbase_url = {base:?}\nmodel = {model:?}\ntimeout = \"20s\"\n\
         [servers.demo]\ncommand = {bin:?}\nargs = [\"demo-server\"]\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n",
        base = fake.base_url,
        model = fake_llm::MODEL,
        bin = common::BIN,
    );
    let config = mcp_pool::config::Config::parse(&text).expect("parses");
    config.validate().expect("validates");
    let server = TestServer::start_with(dir, config, &[]).await;

    let work = tempfile::tempdir().unwrap();
    let settings = work.path().join("schemathesis.toml");
    std::fs::write(
        &settings,
        format!(
            "[auth.openapi.bearer]\nbearer = {:?}\n[auth.openapi.admin]\nbearer = {:?}\n{TOOL_ARGUMENTS}",
            server.service_key, server.admin_key
        ),
    )
    .unwrap();
    let started = Instant::now();
    let child = tokio::process::Command::new(&st)
        .current_dir(work.path())
        .arg("--config-file")
        .arg(&settings)
        .args(["run", &format!("http://{}/openapi.json", server.addr)])
        .args(["--checks", "all"])
        .args(["--max-examples", &MAX_EXAMPLES.to_string()])
        .args(["--seed", &SEED.to_string()])
        .args(["--generation-database", "none"])
        // One worker: the same cases in the same order every run (and no two requests racing
        // on one user's session, which legitimately answers 503 `reconnect`).
        .args(["--workers", "1"])
        .args(["--request-timeout", "90"])
        // An endless event stream (with the admin key it never ends): tested by
        // tests/admin_page.rs, not fuzzable by a client that waits for whole responses.
        .args(["--exclude-path", "/v1/admin/events"])
        .args(["--no-color"])
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("schemathesis runs");
    let output = tokio::time::timeout(HANG, child.wait_with_output())
        .await
        .expect("schemathesis finished")
        .expect("schemathesis output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("schemathesis took {:?}:\n{stdout}", started.elapsed());
    assert!(
        output.status.success(),
        "schemathesis failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // It really tested the operations (a run that tested nothing would also exit 0).
    let generated: u64 = stdout
        .lines()
        .find_map(|line| line.trim().split_once(" generated,"))
        .and_then(|(count, _)| count.trim().parse().ok())
        .unwrap_or_else(|| panic!("no test-case count in:\n{stdout}"));
    assert!(generated >= 500, "only {generated} cases:\n{stdout}");
    // Every documented operation but `/mcp` and the event feed.
    assert!(stdout.contains("Tested: 21"), "{stdout}");
    server.stop().await;
}
