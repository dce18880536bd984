//! MCP client sessions over stdio and Streamable HTTP, child-process hygiene, and the bundled demo server.
//!
//! # Layout
//! - [`process`]: spawning a server as the leader of its own process group from a long-lived
//!   spawner thread (so `PR_SET_PDEATHSIG` means "the service died"), terminating a whole group,
//!   and a directory-backed [`ProcessRegistry`] that reaps groups left behind by a crash.
//! - [`remote`]: the transport of a remote server (Streamable HTTP on our reqwest client),
//!   adding the user's credentials to each request and answering a 401 with one refresh and
//!   one retry.
//! - [`session`]: one rmcp client session ([`McpSession`]) on such a child, or on a remote
//!   server: start-up under a timeout, a cached tool list refreshed on `notifications/tools/list_changed`, tool calls
//!   with per-call timeouts, prompts and resources listed on demand (kept until the server
//!   says they changed), an "ended" signal, and an explicit [`McpSession::close`].
//! - [`sandbox`]: confinement of each server to its own user: Landlock, a PID namespace
//!   behind a minimal init, no capabilities, and a cgroup with memory, process and CPU limits.
//! - [`usage`]: resident memory and CPU time of a session's process group and of the service,
//!   read from `/proc`.
//! - [`prefork`]: pre-forked Python servers: a confined zygote per server imports it once and
//!   forks a session per user in milliseconds (`servers.<name>.prefork`).
//! - [`demo_server`]: the MCP server bundled in this binary (`mcp-pool demo-server`), used by
//!   the tests and as a smoke target.
//! - [`names`]: the `{server}__{tool}` names under which `/v1/chat` and `/mcp` offer a user's
//!   tools (valid, at most 64 characters, unique), the same for prompts, and the
//!   `mcp-pool://{server}/{uri}` form of resource URIs on `/mcp`.
//! - [`error`]: [`McpError`], the one error type of this module.
//!
//! Cleanup never relies on `Drop`: the owner of a session calls [`McpSession::close`], which
//! closes stdin, waits, then signals the whole process group, because grandchildren (npx, uv)
//! survive their leader's graceful exit.

pub mod demo_server;
pub mod error;
pub mod names;
pub mod prefork;
pub mod process;
pub mod remote;
pub mod sandbox;
pub mod session;
pub mod usage;

pub use demo_server::DemoServerOptions;
pub use error::McpError;
pub use process::{
    ProcessRegistry, ServerLaunch, base_environment, process_start_time, terminate_group,
};
pub use remote::{AuthScheme, CurrentSecret, RemoteCredentials, RemoteLaunch};
pub use sandbox::{Sandbox, SandboxMode, SandboxStatus};
pub use session::{ExitReason, McpClient, McpSession, Progress, ProgressSink, SessionLaunch};
