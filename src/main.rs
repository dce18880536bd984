//! The `mcp-pool` command line: parse, load config, init tracing, dispatch.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mcp_pool::app::{self, App, Storage};
use mcp_pool::config::{Config, LogFormat};
use mcp_pool::store::{CredentialWriter, ServerName, UserId};

/// Persistent, supervised MCP client connections per (user, server) for chat backends.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        env = "MCP_POOL_CONFIG",
        default_value = "config.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service until SIGINT or SIGTERM (applies pending migrations first).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Validate the configuration file and exit non-zero with the offending key if it is invalid.
    CheckConfig,
    /// Run the bundled demo MCP server on stdio (the `demo` entry of config.toml).
    DemoServer {
        /// Also offer the misbehaving tools the tests use (crash, spawn_grandchild, ...).
        #[arg(long)]
        test_tools: bool,
        /// Wait this long before answering anything, like a slow `npx` start (e.g. 5s).
        #[arg(long, value_parser = humantime::parse_duration)]
        slow_start: Option<Duration>,
    },
    /// Operator commands on stored credentials.
    #[command(subcommand)]
    Credentials(CredentialsCommand),
}

#[derive(Subcommand)]
enum CredentialsCommand {
    /// List stored credentials (never tokens).
    List {
        /// Only this user's credentials.
        #[arg(long)]
        user: Option<String>,
        /// Include deactivated rows.
        #[arg(long)]
        all: bool,
    },
    /// Deactivate a user's credentials for a server (row kept inactive, file removed).
    Deactivate {
        #[arg(long)]
        user: String,
        #[arg(long)]
        server: String,
    },
    /// Delete a user's credentials for a server (rows and file).
    Delete {
        #[arg(long)]
        user: String,
        #[arg(long)]
        server: String,
    },
    /// Delete inactive credentials not touched for a while.
    Cleanup {
        /// Age threshold, e.g. 30d, 12h.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30d")]
        inactive_for: Duration,
    },
    /// Re-encrypt every row (credentials, registered OAuth clients, pending connect flows) with
    /// the newest key; with a key file, first add a new key version.
    RotateKey {
        /// Do not add a key version; only re-encrypt rows on older versions.
        #[arg(long)]
        no_new_key: bool,
    },
}

fn init_tracing(format: LogFormat) {
    // stderr: stdout belongs to the MCP protocol when running as a stdio server.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // One object per line: the event's fields at the top level, and the spans it is in
        // with their fields (`user_id`, `server`, `route`...) under `spans`.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(match cli.command {
        // A child of the service: its stderr is the service's log, in text.
        Command::DemoServer { .. } => LogFormat::Text,
        _ => LogFormat::for_process(&cli.config, |name| std::env::var(name).ok()),
    });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn ids(user: &str, server: &str) -> anyhow::Result<(UserId, ServerName)> {
    Ok((
        UserId::parse(user).with_context(|| format!("--user {user:?}"))?,
        ServerName::parse(server).with_context(|| format!("--server {server:?}"))?,
    ))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Loaded per command: the demo server runs as a child of the service and needs none.
    let load_config = || Config::load(&cli.config);
    match cli.command {
        Command::DemoServer {
            test_tools,
            slow_start,
        } => {
            let options = mcp_pool::mcp::DemoServerOptions {
                test_tools,
                slow_start,
            };
            mcp_pool::mcp::demo_server::run(options).await?;
        }
        Command::CheckConfig => {
            let config = load_config()?;
            // A missing program does not make the file invalid (other servers may work), but
            // the operator must hear about it now rather than from a failed session later.
            for (name, server) in config.servers.iter().filter(|(_, s)| !s.is_remote()) {
                if let Err(err) = server.resolve_program() {
                    eprintln!(
                        "warning: server `{name}`: {err}; its sessions will fail with \
                         `server_program_not_found` until it is installed"
                    );
                }
            }
            println!(
                "{}: ok ({} servers: {})",
                cli.config.display(),
                config.servers.len(),
                config
                    .servers
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Command::Migrate => {
            let config = load_config()?;
            let store = mcp_pool::store::Store::connect(&app::store_options(&config)).await?;
            store.migrate().await?;
            store.close().await;
            println!("migrations applied");
        }
        Command::Serve => {
            // Handlers first: a SIGTERM during start-up then stops the service cleanly.
            let shutdown = app::shutdown_signal();
            let app = App::build(load_config()?).await?;
            app.run_until_stopped(shutdown).await?;
        }
        Command::Credentials(command) => {
            let storage = Storage::open(&load_config()?, false).await?;
            let result = credentials(&storage, command).await;
            storage.close().await;
            result?;
        }
    }
    Ok(())
}

async fn credentials(app: &Storage, command: CredentialsCommand) -> anyhow::Result<()> {
    match command {
        CredentialsCommand::List { user, all } => {
            let user = user
                .map(|u| UserId::parse(&u).with_context(|| format!("--user {u:?}")))
                .transpose()?;
            let rows = app.store.list(user.as_ref(), all).await?;
            println!(
                "{:<36}  {:<24}  {:<20}  {:<6}  {:<25}  updated",
                "id", "user", "server", "active", "token expiry"
            );
            for row in &rows {
                println!(
                    "{:<36}  {:<24}  {:<20}  {:<6}  {:<25}  {}",
                    row.id,
                    row.user_id,
                    row.server_name,
                    row.is_active,
                    row.token_expiry
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_else(|| "-".into()),
                    row.updated_at.to_rfc3339(),
                );
            }
            println!("{} rows", rows.len());
        }
        CredentialsCommand::Deactivate { user, server } => {
            let (user, server) = ids(&user, &server)?;
            let found = app.credentials.deactivate(&user, &server).await?;
            anyhow::ensure!(found, "no active credentials for {user}/{server}");
            println!("deactivated {user}/{server}");
        }
        CredentialsCommand::Delete { user, server } => {
            let (user, server) = ids(&user, &server)?;
            let rows = app.credentials.delete(&user, &server).await?;
            anyhow::ensure!(rows > 0, "no credentials for {user}/{server}");
            println!("deleted {rows} rows for {user}/{server}");
        }
        CredentialsCommand::Cleanup { inactive_for } => {
            anyhow::ensure!(
                inactive_for >= mcp_pool::config::MIN_CLEANUP_AGE,
                "--inactive-for must be at least 1h (younger inactive credentials are kept)"
            );
            let count = app.credentials.cleanup_inactive(inactive_for).await?;
            println!(
                "deleted {count} inactive credentials older than {}",
                humantime::format_duration(inactive_for)
            );
        }
        CredentialsCommand::RotateKey { no_new_key } => {
            let done = app.credentials.rotate_key(!no_new_key).await?;
            println!(
                "key version {} now encrypts; re-encrypted {} rows, {} registered OAuth clients \
                 and {} pending connect flows",
                done.version, done.credentials, done.clients, done.states
            );
        }
    }
    Ok(())
}
