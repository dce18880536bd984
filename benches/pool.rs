//! Pool benchmarks: warm lookup, pool overhead on a warm call vs a direct rmcp client, and
//! cold vs warm per server. Prints a table; run with `cargo bench --bench pool`
//! (third-party servers: `source .test-servers/env.sh` first, or they are reported as skipped).
//!
//! Benchmarks check what they measure (echo replies are compared) but never fail on speed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mcp_pool::actors::PoolHandle;
use mcp_pool::app::App;
use mcp_pool::config::Config;
use mcp_pool::mcp::{McpSession, ServerLaunch};
use mcp_pool::store::{Secret, ServerName, Tokens, UserId};
use serde_json::{Value, json};

const WARM_CALLS: usize = 2000;
const ROUNDS: usize = 5;
const COLD_STARTS: usize = 5;

struct Server {
    name: &'static str,
    command: String,
    args: Vec<String>,
    echo: Option<(&'static str, &'static str)>,
    probe: (&'static str, Value),
}

fn servers() -> Vec<Server> {
    let bin = env!("CARGO_BIN_EXE_mcp-pool").to_owned();
    let mut servers = vec![Server {
        name: "demo",
        command: bin,
        args: vec!["demo-server".into()],
        echo: Some(("echo", "")),
        probe: ("echo", json!({ "message": "x" })),
    }];
    if let Ok(path) = std::env::var("MCP_POOL_TEST_EVERYTHING") {
        servers.push(Server {
            name: "everything",
            command: "node".into(),
            args: vec![path, "stdio".into()],
            echo: Some(("echo", "Echo: ")),
            probe: ("echo", json!({ "message": "x" })),
        });
    }
    if let Ok(path) = std::env::var("MCP_POOL_TEST_TIME_BIN") {
        servers.push(Server {
            name: "time",
            command: path,
            args: vec![],
            echo: None,
            probe: ("get_current_time", json!({ "timezone": "UTC" })),
        });
    }
    if let Ok(path) = std::env::var("MCP_POOL_TEST_ANALYTICS_BIN") {
        servers.push(Server {
            name: "analytics",
            command: path,
            args: vec![],
            echo: None,
            // Offline its tools fail fast; tools/list is the warm operation measured.
            probe: ("", json!({})),
        });
    }
    servers
}

fn config(dir: &std::path::Path, servers: &[Server]) -> Config {
    let mut text = format!(
        "[service]\ndata_dir = {data:?}\n[database]\nurl = \"sqlite://{data}/db.sqlite\"\n\
         [credentials]\ndir = {creds:?}\n[encryption]\nkey_file = \"{data}/key\"\n\
         [pool]\nclose_grace = \"1s\"\nmax_connections = 20000\nmax_connections_per_user = 50\n",
        data = dir.join("data").display(),
        creds = dir.join("creds").display(),
    );
    for server in servers {
        text.push_str(&format!(
            "[servers.{}]\ncommand = {:?}\nargs = {:?}\ncredentials_env = \"GOOGLE_APPLICATION_CREDENTIALS\"\ncredentials_format = \"token_json\"\n",
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

async fn store_credentials(app: &App, user: &UserId, server: &ServerName) {
    app.storage
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

async fn warm_lookup(pool: &PoolHandle, app: &App, server: &ServerName, live: usize) -> Summary {
    // Open `live` connections, then time get_connection for existing keys.
    let users: Vec<UserId> = (0..live)
        .map(|i| UserId::parse(&format!("lookup{i}")).unwrap())
        .collect();
    for user in &users {
        store_credentials(app, user, server).await;
    }
    let mut opening = tokio::task::JoinSet::new();
    for user in users.clone() {
        let (pool, server) = (pool.clone(), server.clone());
        opening.spawn(async move { pool.get_connection(&user, &server).await.map(|_| ()) });
    }
    while let Some(r) = opening.join_next().await {
        r.unwrap().expect("open");
    }
    let mut samples = Vec::with_capacity(WARM_CALLS * ROUNDS);
    for i in 0..WARM_CALLS * ROUNDS {
        let user = &users[i % users.len()];
        let start = Instant::now();
        pool.get_connection(user, server).await.expect("warm");
        samples.push(start.elapsed());
    }
    summarize(samples)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let servers = servers();
    let app = App::build(config(dir.path(), &servers)).await.expect("app");
    let pool = app.pool.clone();
    println!(
        "# mcp-pool benchmarks (release: {})",
        !cfg!(debug_assertions)
    );
    println!(
        "machine: {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    // 1. Warm lookup.
    let demo = ServerName::parse("demo").unwrap();
    println!("\n## Warm get_connection (in process)\n| live keys | median | p99 |\n|---|---|---|");
    let mut opened = 0;
    for live in [10usize, 100, 1000] {
        let summary = warm_lookup(&pool, &app, &demo, live).await;
        opened = live;
        println!("| {live} | {} | {} |", us(summary.median), us(summary.p99));
    }
    let closed = pool
        .close_user_connections(&UserId::parse("lookup0").unwrap())
        .await
        .ok();
    let _ = (opened, closed);
    for i in 0..1000 {
        let _ = pool
            .close_connection(&UserId::parse(&format!("lookup{i}")).unwrap(), &demo)
            .await;
    }

    // 2. Warm call: pool vs direct rmcp client, interleaved rounds.
    println!("\n## Warm echo: through the pool vs a direct rmcp client (same server kind)");
    println!(
        "| server | direct median | pool median | overhead | direct p99 | pool p99 |\n|---|---|---|---|---|---|"
    );
    let bench_user = UserId::parse("bench").unwrap();
    for server in servers.iter().filter(|s| s.echo.is_some()) {
        let (tool, prefix) = server.echo.unwrap_or_default();
        let name = ServerName::parse(server.name).unwrap();
        store_credentials(&app, &bench_user, &name).await;
        let launch = ServerLaunch {
            command: server.command.clone(),
            args: server.args.clone(),
            env: BTreeMap::new(),
            cwd: None,
        };
        let direct = McpSession::connect(&launch, Duration::from_secs(30), None)
            .await
            .expect("direct session");
        pool.get_connection(&bench_user, &name)
            .await
            .expect("pool session");
        let (mut d, mut p) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            for i in 0..WARM_CALLS {
                let message = format!("m{round}-{i}");
                let args = json!({ "message": message }).as_object().cloned();
                let start = Instant::now();
                let result = direct
                    .call_tool(tool, args.clone(), Duration::from_secs(10))
                    .await
                    .expect("direct echo");
                d.push(start.elapsed());
                assert_eq!(text_of(&result), format!("{prefix}{message}"));
                let start = Instant::now();
                let result = pool
                    .call_tool(&bench_user, &name, tool, args)
                    .await
                    .expect("pool echo");
                p.push(start.elapsed());
                assert_eq!(text_of(&result), format!("{prefix}{message}"));
            }
        }
        let (d, p) = (summarize(d), summarize(p));
        let overhead = p.median.as_secs_f64() / d.median.as_secs_f64() - 1.0;
        println!(
            "| {} | {} | {} | {:+.1}% ({:+.1} µs) | {} | {} |",
            server.name,
            us(d.median),
            us(p.median),
            overhead * 100.0,
            (p.median.as_secs_f64() - d.median.as_secs_f64()) * 1e6,
            us(d.p99),
            us(p.p99)
        );
        direct.close(Duration::from_secs(1)).await;
    }

    // 3. Cold vs warm per server.
    println!("\n## Cold first call (spawn + initialize + tools/list + call) vs warm call");
    println!("| server | cold median | cold max | warm median | ratio |\n|---|---|---|---|---|");
    for server in &servers {
        let name = ServerName::parse(server.name).unwrap();
        let (tool, args) = &server.probe;
        let mut cold = Vec::new();
        let mut warm = Vec::new();
        for attempt in 0..COLD_STARTS {
            let user = UserId::parse(&format!("cold-{}-{attempt}", server.name)).unwrap();
            store_credentials(&app, &user, &name).await;
            let start = Instant::now();
            let conn = pool.get_connection(&user, &name).await.expect("cold start");
            if !tool.is_empty() {
                conn.call_tool(tool, args.as_object().cloned())
                    .await
                    .expect("cold call");
            }
            cold.push(start.elapsed());
            for _ in 0..200 {
                let start = Instant::now();
                let conn = pool.get_connection(&user, &name).await.expect("warm");
                if tool.is_empty() {
                    std::hint::black_box(conn.tools());
                } else {
                    conn.call_tool(tool, args.as_object().cloned())
                        .await
                        .expect("warm call");
                }
                warm.push(start.elapsed());
            }
            pool.close_connection(&user, &name).await.ok();
        }
        let cold_max = *cold.iter().max().unwrap_or(&Duration::ZERO);
        let (cold, warm) = (summarize(cold), summarize(warm));
        println!(
            "| {} | {} | {} | {} | {:.0}x |",
            server.name,
            ms(cold.median),
            ms(cold_max),
            us(warm.median),
            cold.median.as_secs_f64() / warm.median.as_secs_f64()
        );
    }
    app.stop().await;
}
