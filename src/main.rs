//! Temporary entry point: only `mcp-pool demo-server [--test-tools] [--slow-start 5s]`, until
//! the real clap CLI takes this over.

use std::process::ExitCode;

use mcp_pool::mcp::{DemoServerOptions, demo_server};

const USAGE: &str = "usage: mcp-pool demo-server [--test-tools] [--slow-start <duration>]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(("demo-server", rest)) = args.split_first().map(|(cmd, rest)| (cmd.as_str(), rest))
    else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let mut opts = DemoServerOptions::default();
    let mut rest = rest.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--test-tools" => opts.test_tools = true,
            "--slow-start" => match rest.next().map(|value| humantime::parse_duration(value)) {
                Some(Ok(delay)) => opts.slow_start = Some(delay),
                _ => {
                    eprintln!("--slow-start needs a duration such as 5s\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!("unknown argument {other}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    // stdout carries the MCP protocol: logs must go to stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo_server::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("demo server failed: {err}");
            ExitCode::FAILURE
        }
    }
}
