//! In-process benchmarks of the pool. Prints markdown tables; `scripts/bench` runs it (after the
//! HTTP measurements) and `docs/benchmarks.md` quotes it.
//!
//! 1. warm lookup (`get_session` of a live key) at 10, 100 and 1,000 live keys;
//! 2. pool overhead on a warm echo vs a direct rmcp client on the same kind of server;
//! 3. cold first call vs warm call per server;
//! 4. 64 concurrent calls on one connection vs the same calls one after another;
//! 5. scale: 1,000 live connections (open time, mcp-pool memory per connection, warm latency,
//!    reaping them all);
//! 6. isolation: other users' warm-call p99 while one user crash-loops and another's server
//!    takes 5 s to start;
//! 7. sandbox: the cost of preparing a session's confinement, and a demo server's cold start
//!    confined vs unconfined.
//! 8. remote: warm echo on server-everything over Streamable HTTP (loopback) through the pool,
//!    beside a direct rmcp client (rmcp's own reqwest transport) and our remote transport
//!    without the pool.
//!
//! 9. prefork: analytics-mcp preforked from a zygote beside spawned, in one run: cold start,
//!    PSS per session at 1, 20 and 100 live sessions, the machine's used memory.
//!
//! `cargo bench --bench pool -- sandbox` runs section 7 alone, `-- remote` section 8,
//! `-- prefork` section 9.
//!
//! Third-party servers come from `.test-servers/env.sh` (missing ones are reported as skipped).
//! Benchmarks check what they measure (echo replies are compared) but never fail on speed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mcp_pool::actors::PoolHandle;
use mcp_pool::app::App;
use mcp_pool::config::Config;
use mcp_pool::mcp::{McpSession, ServerLaunch};
use mcp_pool::store::CredentialWriter;
use mcp_pool::store::{Secret, ServerName, Tokens, UserId};
use serde_json::{Value, json};

const WARM_CALLS: usize = 2000;
const ROUNDS: usize = 3;
const COLD_STARTS: usize = 5;
const SCALE: usize = 1000;

struct Server {
    name: &'static str,
    command: String,
    args: Vec<String>,
    /// (tool, reply prefix) of an echo tool, if the server has one.
    echo: Option<(&'static str, &'static str)>,
    /// The warm operation of the cold/warm comparison: a tool call, or `""` for tools/list.
    probe: (&'static str, Value),
}

fn servers() -> (Vec<Server>, Vec<&'static str>) {
    let bin = env!("CARGO_BIN_EXE_mcp-pool").to_owned();
    let mut skipped = Vec::new();
    let mut servers = vec![Server {
        name: "demo",
        command: bin,
        args: vec!["demo-server".into(), "--test-tools".into()],
        echo: Some(("echo", "")),
        probe: ("echo", json!({ "message": "x" })),
    }];
    match std::env::var("MCP_POOL_TEST_EVERYTHING") {
        Ok(path) => servers.push(Server {
            name: "everything",
            command: "node".into(),
            args: vec![path, "stdio".into()],
            echo: Some(("echo", "Echo: ")),
            probe: ("echo", json!({ "message": "x" })),
        }),
        Err(_) => skipped.push("everything"),
    }
    match std::env::var("MCP_POOL_TEST_TIME_BIN") {
        Ok(path) => servers.push(Server {
            name: "time",
            command: path,
            args: vec![],
            echo: None,
            probe: ("get_current_time", json!({ "timezone": "UTC" })),
        }),
        Err(_) => skipped.push("time"),
    }
    match std::env::var("MCP_POOL_TEST_ANALYTICS_BIN") {
        // Offline its tools can only fail; tools/list is the warm operation measured.
        Ok(path) => servers.push(Server {
            name: "analytics",
            command: path,
            args: vec![],
            echo: None,
            probe: ("", json!({})),
        }),
        Err(_) => skipped.push("analytics"),
    }
    (servers, skipped)
}

fn config(dir: &std::path::Path, servers: &[Server]) -> Config {
    let bin = env!("CARGO_BIN_EXE_mcp-pool");
    let mut text = format!(
        "[service]\ndata_dir = {data:?}\nshutdown_grace = \"60s\"\n\
         [database]\nurl = \"sqlite://{data}/db.sqlite\"\n\
         [credentials]\ndir = {creds:?}\n[encryption]\nkey_file = \"{data}/key\"\n\
         [pool]\nclose_grace = \"1s\"\nmax_connections = 2000\nmax_connections_per_user = 50\n\
         idle_timeout = \"3s\"\nreap_interval = \"24h\"\nmax_restarts = 100000\n\
         restart_backoff_base = \"10ms\"\nrestart_backoff_cap = \"50ms\"\n\
         [servers.slow]\ncommand = {bin:?}\nargs = [\"demo-server\", \"--slow-start\", \"5s\"]\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n",
        data = dir.join("data").display(),
        creds = dir.join("creds").display(),
    );
    for server in servers {
        text.push_str(&format!(
            "[servers.{}]\ncommand = {:?}\nargs = {:?}\n\
             credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n",
            server.name, server.command, server.args
        ));
    }
    Config::parse(&text).expect("bench config")
}

struct Summary {
    median: Duration,
    p99: Duration,
}

fn summarize(mut samples: Vec<Duration>) -> Summary {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Summary {
        median: at(0.5),
        p99: at(0.99),
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn text_of(result: &rmcp::model::CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|b| b.as_text().map(|t| t.text.clone()))
        .collect()
}

/// Resident memory of this process (the pool; its children are separate processes).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

fn args(value: Value) -> Option<serde_json::Map<String, Value>> {
    value.as_object().cloned()
}

struct Bench {
    app: App,
    pool: PoolHandle,
}

impl Bench {
    async fn credentials(&self, user: &UserId, server: &ServerName) {
        self.app
            .storage
            .credentials
            .create(
                user,
                server,
                Tokens {
                    access_token: Some(Secret::new("bench")),
                    ..Tokens::default()
                },
            )
            .await
            .expect("credentials");
    }

    async fn echo(&self, user: &UserId, server: &ServerName, message: &str) -> Duration {
        let start = Instant::now();
        let result = self
            .pool
            .call_tool(user, server, "echo", args(json!({ "message": message })))
            .await
            .expect("echo");
        let elapsed = start.elapsed();
        assert_eq!(text_of(&result), message, "the echo really came back");
        elapsed
    }

    /// Opens `users` connections to `server` from concurrent first requests.
    async fn open_all(&self, users: &[UserId], server: &ServerName) -> Duration {
        for user in users {
            self.credentials(user, server).await;
        }
        let start = Instant::now();
        let mut opening = tokio::task::JoinSet::new();
        for user in users {
            let (pool, server, user) = (self.pool.clone(), server.clone(), user.clone());
            opening.spawn(async move { pool.get_session(&user, &server).await.map(|_| ()) });
        }
        while let Some(result) = opening.join_next().await {
            result.expect("task").expect("open");
        }
        start.elapsed()
    }
}

fn users(prefix: &str, count: usize) -> Vec<UserId> {
    (0..count)
        .map(|i| UserId::parse(&format!("{prefix}{i}")).unwrap())
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    // `cargo bench --bench pool -- sandbox`: section 7 alone.
    if std::env::args().any(|arg| arg == "sandbox") {
        sandbox_cost(dir.path()).await;
        return;
    }
    if std::env::args().any(|arg| arg == "remote") {
        remote_echo(dir.path()).await;
        return;
    }
    if std::env::args().any(|arg| arg == "prefork") {
        prefork(dir.path()).await;
        return;
    }
    let (servers, skipped) = servers();
    let app = App::build(config(dir.path(), &servers)).await.expect("app");
    let bench = Bench {
        pool: app.pool.clone(),
        app,
    };
    let demo = ServerName::parse("demo").unwrap();
    println!(
        "# mcp-pool in-process benchmarks ({} build, {} cores)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    if !skipped.is_empty() {
        println!("skipped (not installed; run scripts/setup-test-env): {skipped:?}");
    }

    // 1 + 5. Warm lookup at growing scale; the last step is the 1,000-connection scale test.
    println!("\n## 1. Warm get_session (in process)\n");
    println!("| live keys | median | p99 |\n|---|---|---|");
    let rss_before = rss_kib();
    let all = users("u", SCALE);
    let mut open_time = Duration::ZERO;
    let mut opened = 0;
    let mut warm_by_scale = Vec::new();
    for live in [10usize, 100, SCALE] {
        open_time += bench.open_all(&all[opened..live], &demo).await;
        opened = live;
        let mut samples = Vec::with_capacity(WARM_CALLS * ROUNDS);
        for i in 0..WARM_CALLS * ROUNDS {
            let user = &all[(i * 7919) % live];
            let start = Instant::now();
            bench.pool.get_session(user, &demo).await.expect("warm");
            samples.push(start.elapsed());
        }
        let summary = summarize(samples);
        println!("| {live} | {} | {} |", us(summary.median), us(summary.p99));
        let mut calls = Vec::new();
        for i in 0..WARM_CALLS {
            calls.push(
                bench
                    .echo(&all[(i * 7919) % live], &demo, &format!("s{i}"))
                    .await,
            );
        }
        warm_by_scale.push((live, summarize(calls)));
    }
    let rss_live = rss_kib();

    // 2. Pool overhead vs a direct rmcp client.
    println!("\n## 2. Warm echo: through the pool vs a direct rmcp client\n");
    println!(
        "| server | direct median | pool median | overhead | direct p99 | pool p99 |\n|---|---|---|---|---|---|"
    );
    let bench_user = UserId::parse("bench").unwrap();
    for server in servers.iter().filter(|s| s.echo.is_some()) {
        let (tool, prefix) = server.echo.unwrap_or_default();
        let name = ServerName::parse(server.name).unwrap();
        bench.credentials(&bench_user, &name).await;
        let launch = ServerLaunch {
            command: server.command.clone(),
            args: server.args.clone(),
            env: BTreeMap::new(),
            cwd: None,
        };
        let direct = McpSession::connect(&launch, None, Duration::from_secs(30), None)
            .await
            .expect("direct session");
        bench
            .pool
            .get_session(&bench_user, &name)
            .await
            .expect("pool session");
        let (mut d, mut p) = (Vec::new(), Vec::new());
        // Interleaved, so both see the same machine state.
        for i in 0..WARM_CALLS * ROUNDS {
            let message = format!("m{i}");
            let call_args = args(json!({ "message": message }));
            let start = Instant::now();
            let result = direct
                .call_tool(tool, call_args.clone(), Duration::from_secs(10))
                .await
                .expect("direct echo");
            d.push(start.elapsed());
            assert_eq!(text_of(&result), format!("{prefix}{message}"));
            let start = Instant::now();
            let result = bench
                .pool
                .call_tool(&bench_user, &name, tool, call_args)
                .await
                .expect("pool echo");
            p.push(start.elapsed());
            assert_eq!(text_of(&result), format!("{prefix}{message}"));
        }
        let (d, p) = (summarize(d), summarize(p));
        println!(
            "| {} | {} | {} | {:+.1}% ({:+.1} µs) | {} | {} |",
            server.name,
            us(d.median),
            us(p.median),
            (p.median.as_secs_f64() / d.median.as_secs_f64() - 1.0) * 100.0,
            (p.median.as_secs_f64() - d.median.as_secs_f64()) * 1e6,
            us(d.p99),
            us(p.p99)
        );
        direct.close(Duration::from_secs(1)).await;
    }

    // 3. Cold vs warm.
    println!("\n## 3. Cold first call (spawn + initialize + tools/list + call) vs warm call\n");
    println!("| server | cold median | cold max | warm median | ratio |\n|---|---|---|---|---|");
    for server in &servers {
        let name = ServerName::parse(server.name).unwrap();
        let (tool, probe_args) = &server.probe;
        let (mut cold, mut warm) = (Vec::new(), Vec::new());
        for attempt in 0..COLD_STARTS {
            let user = UserId::parse(&format!("cold-{}-{attempt}", server.name)).unwrap();
            bench.credentials(&user, &name).await;
            let start = Instant::now();
            let conn = bench
                .pool
                .get_session(&user, &name)
                .await
                .expect("cold start");
            if !tool.is_empty() {
                conn.call_tool(tool, args(probe_args.clone()))
                    .await
                    .expect("cold call");
            }
            cold.push(start.elapsed());
            for _ in 0..200 {
                let start = Instant::now();
                let conn = bench.pool.get_session(&user, &name).await.expect("warm");
                if tool.is_empty() {
                    std::hint::black_box(conn.tools());
                } else {
                    conn.call_tool(tool, args(probe_args.clone()))
                        .await
                        .expect("warm call");
                }
                warm.push(start.elapsed());
            }
            bench.pool.close_session(&user, &name).await.ok();
        }
        let cold_max = cold.iter().max().copied().unwrap_or_default();
        let (cold, warm) = (summarize(cold), summarize(warm));
        println!(
            "| {}{} | {} | {} | {} | {:.0}x |",
            server.name,
            if tool.is_empty() {
                " (warm = cached tools/list)"
            } else {
                ""
            },
            ms(cold.median),
            ms(cold_max),
            us(warm.median),
            cold.median.as_secs_f64() / warm.median.as_secs_f64()
        );
    }

    // 4. 64 concurrent calls on one connection vs sequential.
    println!("\n## 4. 64 calls of `sleep 50ms` on one connection\n");
    let conn = bench
        .pool
        .get_session(&bench_user, &demo)
        .await
        .expect("conn");
    let start = Instant::now();
    for _ in 0..64 {
        conn.call_tool("sleep", args(json!({ "ms": 50 })))
            .await
            .expect("sleep");
    }
    let sequential = start.elapsed();
    let start = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let conn = conn.clone();
        calls.spawn(async move { conn.call_tool("sleep", args(json!({ "ms": 50 }))).await });
    }
    while let Some(result) = calls.join_next().await {
        assert_eq!(
            text_of(&result.expect("task").expect("sleep")),
            "slept 50 ms"
        );
    }
    let concurrent = start.elapsed();
    println!("| sequential | concurrent | speed-up |\n|---|---|---|");
    println!(
        "| {} | {} | {:.1}x |",
        ms(sequential),
        ms(concurrent),
        sequential.as_secs_f64() / concurrent.as_secs_f64()
    );

    // 5. Scale.
    println!("\n## 5. Scale: {SCALE} live demo connections\n");
    let per_conn = (rss_live.saturating_sub(rss_before)) as f64 / SCALE as f64;
    println!("| measure | value |\n|---|---|");
    println!(
        "| time to open {SCALE} (concurrent first requests, in steps of 10/90/900) | {} |",
        ms(open_time)
    );
    println!(
        "| mcp-pool RSS before / with {SCALE} live | {:.1} MiB / {:.1} MiB |",
        rss_before as f64 / 1024.0,
        rss_live as f64 / 1024.0
    );
    println!("| mcp-pool memory per connection (children excluded) | {per_conn:.1} KiB |");
    for (live, summary) in &warm_by_scale {
        println!(
            "| warm echo with {live} live: median / p99 | {} / {} |",
            us(summary.median),
            us(summary.p99)
        );
    }
    tokio::time::sleep(Duration::from_secs(4)).await; // everything is now idle (idle_timeout 3s)
    let start = Instant::now();
    let reaped = bench.pool.reap_idle().await.expect("reap");
    let registry = dir.path().join("data/pgids");
    while std::fs::read_dir(&registry).map(|d| d.count()).unwrap_or(0) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reap_time = start.elapsed();
    println!(
        "| reaper: connections closed / time until every process was gone | {reaped} / {} |",
        ms(reap_time)
    );
    println!(
        "| mcp-pool RSS after reaping | {:.1} MiB |",
        rss_kib() as f64 / 1024.0
    );

    // 6. Isolation.
    println!(
        "\n## 6. Isolation: other users' warm echo while one user crash-loops and another's server starts for 5 s\n"
    );
    let calm = users("calm", 8);
    bench.open_all(&calm, &demo).await;
    let measure = |label: &'static str| {
        let (bench, calm, demo) = (&bench, &calm, &demo);
        async move {
            let mut samples = Vec::new();
            for i in 0..WARM_CALLS * ROUNDS {
                samples.push(
                    bench
                        .echo(&calm[i % calm.len()], demo, &format!("c{i}"))
                        .await,
                );
            }
            (label, summarize(samples))
        }
    };
    let quiet = measure("quiet").await;
    let crashy = UserId::parse("crashy").unwrap();
    bench.credentials(&crashy, &demo).await;
    let slow = ServerName::parse("slow").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut disturbers = tokio::task::JoinSet::new();
    {
        let (pool, stop, server) = (bench.pool.clone(), stop.clone(), demo.clone());
        disturbers.spawn(async move {
            let mut crashes = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(conn) = pool.get_session(&crashy, &server).await else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                let pid = conn.pid();
                let _ = conn.call_tool("crash", None).await;
                crashes += 1;
                // Crash the next incarnation, not the corpse: wait for the restart.
                while pool
                    .get_session(&crashy, &server)
                    .await
                    .is_ok_and(|c| c.pid() == pid)
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            crashes
        });
    }
    for i in 0..4 {
        let user = UserId::parse(&format!("slowstart{i}")).unwrap();
        bench.credentials(&user, &slow).await;
        let (pool, slow) = (bench.pool.clone(), slow.clone());
        disturbers.spawn(async move {
            let _ = pool.get_session(&user, &slow).await;
            0
        });
    }
    let loaded = measure("crash loop + 4 slow starts").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut crashes = 0;
    while let Some(result) = disturbers.join_next().await {
        crashes += result.unwrap_or(0);
    }
    println!("| condition | median | p99 |\n|---|---|---|");
    for (label, summary) in [quiet, loaded] {
        println!("| {label} | {} | {} |", us(summary.median), us(summary.p99));
    }
    println!("\n(crash-and-restart cycles during the loaded run: {crashes})");
    bench.app.stop().await;
    sandbox_cost(dir.path()).await;
    remote_echo(dir.path()).await;
}

/// Section 8: warm echo to server-everything in `streamableHttp` mode on loopback.
async fn remote_echo(dir: &std::path::Path) {
    use rmcp::ServiceExt as _;
    use rmcp::model::{CallToolRequestParams, ClientRequest, ServerResult};

    println!("\n## 8. Remote server (Streamable HTTP, loopback): warm echo\n");
    let Ok(entry) = std::env::var("MCP_POOL_TEST_EVERYTHING") else {
        println!("skipped: server-everything is not installed (scripts/setup-test-env)");
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new("node")
        .arg(&entry)
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs server-everything");
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "server-everything listens"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("http://127.0.0.1:{port}/mcp");
    let text = format!(
        "[service]\ndata_dir = {data:?}\n[database]\nurl = \"sqlite://{data}/remote.sqlite\"\n\
         [credentials]\ndir = {creds:?}\n[encryption]\nkey_file = \"{data}/key\"\n\
         [servers.remote]\nurl = {url:?}\nallow_insecure_loopback = true\nauth = \"none\"\n",
        data = dir.join("remote-data").display(),
        creds = dir.join("remote-creds").display(),
    );
    let config = Config::parse(&text).expect("remote bench config");
    config.validate().expect("remote bench config validates");
    let app = App::build(config).await.expect("app");
    let user = UserId::parse("bench").unwrap();
    let server = ServerName::parse("remote").unwrap();
    app.pool
        .get_session(&user, &server)
        .await
        .expect("pool session");

    // rmcp's own client on its default reqwest transport.
    let rmcp_direct = ()
        .serve(rmcp::transport::StreamableHttpClientTransport::from_uri(
            url.as_str(),
        ))
        .await
        .expect("direct rmcp client");
    // Our transport (the session the pool wraps), without the pool.
    let ours = McpSession::connect_remote(
        &mcp_pool::mcp::RemoteLaunch {
            url: url.clone(),
            auth: None,
            http: mcp_pool::mcp::remote::http_client().expect("http client"),
        },
        Duration::from_secs(30),
    )
    .await
    .expect("direct remote session");

    let calls = WARM_CALLS / 2;
    let (mut r, mut o, mut p) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..calls * ROUNDS {
        let message = format!("m{i}");
        let call_args = args(json!({ "message": message }));
        let expected = format!("Echo: {message}");
        let start = Instant::now();
        let answer = rmcp_direct
            .send_request(ClientRequest::CallToolRequest(
                rmcp::model::CallToolRequest::new(
                    CallToolRequestParams::new("echo").with_arguments(call_args.clone().unwrap()),
                ),
            ))
            .await
            .expect("rmcp echo");
        r.push(start.elapsed());
        let ServerResult::CallToolResult(result) = answer else {
            panic!("unexpected answer");
        };
        assert_eq!(text_of(&result), expected);
        let start = Instant::now();
        let result = ours
            .call_tool("echo", call_args.clone(), Duration::from_secs(10))
            .await
            .expect("our echo");
        o.push(start.elapsed());
        assert_eq!(text_of(&result), expected);
        let start = Instant::now();
        let result = app
            .pool
            .call_tool(&user, &server, "echo", call_args)
            .await
            .expect("pool echo");
        p.push(start.elapsed());
        assert_eq!(text_of(&result), expected);
    }
    println!("| client | median | p99 |\n|---|---|---|");
    for (label, samples) in [
        ("direct rmcp client (rmcp's default reqwest transport)", r),
        ("our remote transport, no pool", o),
        ("through the pool (`PoolHandle::call_tool`)", p),
    ] {
        let summary = summarize(samples);
        println!("| {label} | {} | {} |", us(summary.median), us(summary.p99));
    }
    println!("\n({} interleaved calls each)", calls * ROUNDS);
    let _ = rmcp_direct.cancel().await;
    ours.close(Duration::from_secs(1)).await;
    app.stop().await;
    let _ = child.kill().await;
}

/// Section 7, what confinement adds to a start: `Sandbox::prepare` (state directory, cgroup,
/// Landlock ruleset) alone, and spawn + initialize + tools/list of the demo server with and
/// without it.
async fn sandbox_cost(dir: &std::path::Path) {
    use mcp_pool::mcp::sandbox::{Sandbox, SandboxSettings, ServerPolicy, SessionPaths};
    println!("\n## 7. Sandbox set-up per session start\n");
    let sandbox = Sandbox::new(SandboxSettings {
        state_dir: dir.join("bench-state"),
        cgroup_root: "/sys/fs/cgroup".into(),
        read: Vec::new(),
        protected: vec![dir.join("data"), std::env::current_dir().unwrap()],
        instance: "mcp-pool-bench".into(),
    });
    if !sandbox.missing().is_empty() {
        println!("unavailable on this host: {:?}", sandbox.missing());
    }
    let program = std::path::PathBuf::from(env!("CARGO_BIN_EXE_mcp-pool"));
    let demo_args = vec!["demo-server".to_owned()];
    let creds = dir.join("bench-creds");
    std::fs::create_dir_all(&creds).unwrap();
    let policy = ServerPolicy::default();
    let paths = SessionPaths {
        user: "bench",
        server: "demo",
        program: &program,
        args: &demo_args,
        credentials_dir: &creds,
    };
    let mut prepare = Vec::new();
    for _ in 0..200 {
        let start = Instant::now();
        let confinement = sandbox.prepare(&policy, paths, false).expect("prepare");
        prepare.push(start.elapsed());
        // Dropping an unused confinement removes its cgroup.
        drop(confinement);
    }
    let launch = ServerLaunch {
        command: program.display().to_string(),
        args: demo_args.clone(),
        env: mcp_pool::mcp::base_environment(&[]),
        cwd: Some(dir.to_owned()),
    };
    let (mut confined, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        let confinement = sandbox.prepare(&policy, paths, false).expect("prepare");
        let start = Instant::now();
        let session =
            McpSession::connect(&launch, Some(confinement), Duration::from_secs(30), None)
                .await
                .expect("confined start");
        confined.push(start.elapsed());
        session.close(Duration::from_secs(1)).await;
        let start = Instant::now();
        let session = McpSession::connect(&launch, None, Duration::from_secs(30), None)
            .await
            .expect("plain start");
        plain.push(start.elapsed());
        session.close(Duration::from_secs(1)).await;
    }
    // Warm echo on one confined and one unconfined session, interleaved.
    let confinement = sandbox.prepare(&policy, paths, false).expect("prepare");
    let boxed = McpSession::connect(&launch, Some(confinement), Duration::from_secs(30), None)
        .await
        .expect("confined start");
    let open = McpSession::connect(&launch, None, Duration::from_secs(30), None)
        .await
        .expect("plain start");
    let (mut warm_boxed, mut warm_open) = (Vec::new(), Vec::new());
    for i in 0..WARM_CALLS * ROUNDS {
        let message = format!("w{i}");
        for (session, samples) in [(&boxed, &mut warm_boxed), (&open, &mut warm_open)] {
            let start = Instant::now();
            let result = session
                .call_tool(
                    "echo",
                    args(json!({ "message": message })),
                    Duration::from_secs(10),
                )
                .await
                .expect("echo");
            samples.push(start.elapsed());
            assert_eq!(text_of(&result), message);
        }
    }
    boxed.close(Duration::from_secs(1)).await;
    open.close(Duration::from_secs(1)).await;
    let (warm_boxed, warm_open) = (summarize(warm_boxed), summarize(warm_open));
    let (prepare, confined, plain) = (summarize(prepare), summarize(confined), summarize(plain));
    println!("| step | median | p99 |\n|---|---|---|");
    println!(
        "| `Sandbox::prepare` (state dir, cgroup, ruleset) | {} | {} |",
        us(prepare.median),
        us(prepare.p99)
    );
    println!(
        "| demo cold start, unconfined | {} | {} |",
        us(plain.median),
        us(plain.p99)
    );
    println!(
        "| demo cold start, confined (prepare excluded) | {} | {} |",
        us(confined.median),
        us(confined.p99)
    );
    println!(
        "| demo warm echo, unconfined | {} | {} |",
        us(warm_open.median),
        us(warm_open.p99)
    );
    println!(
        "| demo warm echo, confined | {} | {} |",
        us(warm_boxed.median),
        us(warm_boxed.p99)
    );
    println!(
        "\nconfinement adds {:+.0} µs to the median cold start, plus `prepare`",
        (confined.median.as_secs_f64() - plain.median.as_secs_f64()) * 1e6
    );
    sandbox.shutdown();
}

/// Sessions forked, and spawned, in section 9. Spawned analytics-mcp sessions cost about
/// 140 MiB each: 100 of them would take 14 GiB of a machine shared with others, so the spawned
/// side stops at 20 and the table extrapolates from there (and says so).
const PREFORK_LIVE: [usize; 3] = [1, COLD_FORKS, 100];
const SPAWN_LIVE: [usize; 2] = [1, 20];
const COLD_FORKS: usize = 20;

/// Proportional set size of every live process in group `pgid`, in KiB (`smaps_rollup`).
fn group_pss_kib(pgid: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let fields: Vec<String> = stat
                        .rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect();
                    Some(fields.get(2)?.parse::<u32>().ok()? == pgid)
                })
                .unwrap_or(false)
        })
        .map(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
                .ok()
                .and_then(|text| {
                    let line = text.lines().find(|l| l.starts_with("Pss:"))?;
                    line.split_whitespace().nth(1)?.parse::<u64>().ok()
                })
                .unwrap_or(0)
        })
        .sum()
}

/// `MemTotal - MemAvailable` of the machine, in KiB.
fn machine_used_kib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field("MemTotal:").saturating_sub(field("MemAvailable:"))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Section 8: analytics-mcp preforked vs spawned, through the pool.
async fn prefork(dir: &std::path::Path) {
    println!("\n## 9. Pre-forked analytics-mcp vs spawned (through the pool)\n");
    let Ok(analytics) = std::env::var("MCP_POOL_TEST_ANALYTICS_BIN") else {
        println!("skipped: analytics-mcp not installed (scripts/setup-test-env)");
        return;
    };
    let server = |name: &str, prefork: bool| {
        format!(
            "[servers.{name}]\ncommand = {analytics:?}\nprefork = {prefork}\n\
             credentials_env = \"GOOGLE_APPLICATION_CREDENTIALS\"\n\
             credentials_format = \"google_authorized_user\"\n\
             [servers.{name}.oauth]\nclient_id = \"bench.apps.googleusercontent.com\"\n"
        )
    };
    let text = format!(
        "[service]\ndata_dir = {data:?}\nshutdown_grace = \"60s\"\n\
         [database]\nurl = \"sqlite://{data}/db.sqlite\"\n\
         [credentials]\ndir = {creds:?}\n[encryption]\nkey_file = \"{data}/key\"\n\
         [pool]\nclose_grace = \"1s\"\nmax_connections = 1000\nidle_timeout = \"1h\"\n\
         startup_timeout = \"120s\"\nmax_concurrent_starts = 4\n\
         [sandbox]\nstate_dir = \"{data}/state\"\n{}{}",
        server("gafork", true),
        server("gaspawn", false),
        data = dir.join("data").display(),
        creds = dir.join("creds").display(),
    );
    let app = App::build(Config::parse(&text).expect("prefork bench config"))
        .await
        .expect("app");
    let bench = Bench {
        pool: app.pool.clone(),
        app,
    };
    let (fork, spawn) = (
        ServerName::parse("gafork").unwrap(),
        ServerName::parse("gaspawn").unwrap(),
    );
    // The zygote imports analytics-mcp once, in the background from the start.
    let zygote_ready = Instant::now();
    let zygote = loop {
        let stats = bench.pool.stats().await.expect("stats");
        let zygote = stats.prefork.into_iter().next().expect("one zygote");
        if zygote.state == "ready" {
            break zygote;
        }
        assert!(
            zygote_ready.elapsed() < Duration::from_secs(120),
            "zygote not ready: {zygote:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let zygote_start = zygote_ready.elapsed();
    let zygote_pid = zygote.pid.expect("zygote pid");
    let zygote_group = std::fs::read_to_string(format!("/proc/{zygote_pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(2)?
                .parse::<u32>()
                .ok()
        })
        .unwrap_or(zygote_pid);
    let used_before = machine_used_kib();

    // Cold start: first `get_session` of a user with nothing running, one at a time; PSS is
    // read whenever the number of live sessions reaches a row of the table.
    let pss = |server: ServerName| {
        let bench = &bench;
        async move {
            let stats = bench.pool.stats().await.expect("stats");
            stats
                .connections
                .iter()
                .filter(|c| c.server == server)
                .filter_map(|c| c.pid)
                .map(group_pss_kib)
                .sum::<u64>()
        }
    };
    let mut rows = Vec::new();
    let cold_start = |server: ServerName, users: Vec<UserId>, rows_at: &'static [usize]| {
        let bench = &bench;
        let pss = &pss;
        async move {
            let mut samples = Vec::new();
            let mut rows = Vec::new();
            for (i, user) in users.iter().enumerate() {
                bench.credentials(user, &server).await;
                let start = Instant::now();
                bench
                    .pool
                    .get_session(user, &server)
                    .await
                    .expect("cold start");
                samples.push(start.elapsed());
                if rows_at.contains(&(i + 1)) {
                    rows.push((i + 1, pss(server.clone()).await));
                }
            }
            (samples, rows)
        }
    };
    let (forked_cold, forked_rows) =
        cold_start(fork.clone(), users("f", COLD_FORKS), &[1, 20]).await;
    let forked_cold = summarize(forked_cold);
    for (live, total) in forked_rows {
        rows.push(("preforked", live, total, group_pss_kib(zygote_group)));
    }
    let all_forked = users("f", *PREFORK_LIVE.last().unwrap());
    bench.open_all(&all_forked[COLD_FORKS..], &fork).await;
    let live = all_forked.len();
    rows.push((
        "preforked",
        live,
        pss(fork.clone()).await,
        group_pss_kib(zygote_group),
    ));
    let used_forked_100 = machine_used_kib().saturating_sub(used_before);
    let forked_live = live;
    // Spawned: close the preforked sessions first so both sides see the same machine.
    for user in &all_forked {
        let _ = bench.pool.close_session(user, &fork).await;
    }
    let used_between = machine_used_kib();
    let (spawned_cold, spawned_rows) =
        cold_start(spawn.clone(), users("s", COLD_STARTS), &[1]).await;
    let spawned_cold = summarize(spawned_cold);
    for (live, total) in spawned_rows {
        rows.push(("spawned", live, total, 0));
    }
    let spawned_live = *SPAWN_LIVE.last().unwrap();
    let all_spawned = users("s", spawned_live);
    bench.open_all(&all_spawned[COLD_STARTS..], &spawn).await;
    rows.push(("spawned", spawned_live, pss(spawn.clone()).await, 0));
    let used_spawned = machine_used_kib().saturating_sub(used_between);
    let rows: Vec<(&str, usize, u64, u64)> = rows
        .into_iter()
        .map(|(kind, live, total, zygote)| {
            let n = live as u64;
            (kind, live, total / n, (total + zygote) / n)
        })
        .collect();

    println!(
        "zygote: ready {:.1} s after the service started (import once), PSS {}\n",
        zygote_start.as_secs_f64(),
        mib(group_pss_kib(zygote_group))
    );
    println!("| cold start (`get_session`, nothing running) | samples | median | p99 |");
    println!("|---|---|---|---|");
    println!(
        "| preforked | {COLD_FORKS} | {} | {} |",
        ms(forked_cold.median),
        ms(forked_cold.p99)
    );
    println!(
        "| spawned | {COLD_STARTS} | {} | {} |",
        ms(spawned_cold.median),
        ms(spawned_cold.p99)
    );
    println!("\n| start | live sessions | PSS per session | PSS per session incl. zygote |");
    println!("|---|---|---|---|");
    for (kind, live, per, with_zygote) in &rows {
        println!(
            "| {kind} | {live} | {} | {} |",
            mib(*per),
            mib(*with_zygote)
        );
    }
    let spawned_per = rows
        .iter()
        .rev()
        .find(|row| row.0 == "spawned")
        .map(|row| row.2)
        .unwrap_or(0);
    println!(
        "| spawned | 100 (extrapolated from {spawned_live}) | {} | — |",
        mib(spawned_per)
    );
    println!("\n| machine used memory (MemTotal − MemAvailable, delta) | measured |");
    println!("|---|---|");
    println!(
        "| {forked_live} preforked sessions (incl. zygote) | {} |",
        mib(used_forked_100)
    );
    println!(
        "| {spawned_live} spawned sessions | {} |",
        mib(used_spawned)
    );
    println!(
        "| 100 spawned sessions, extrapolated ×{} | {} |",
        100 / spawned_live,
        mib(used_spawned * (100 / spawned_live) as u64)
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\n(machine shared with other workloads, load average {}: used-memory deltas are \
         approximate, PSS is per process)",
        load.split_whitespace().next().unwrap_or("?")
    );
    for user in &all_spawned {
        let _ = bench.pool.close_session(user, &spawn).await;
    }
    bench.app.stop().await;
}
