//! mcp-pool keeps one persistent, supervised MCP client session per (user, server).
//!
//! # Layout
//! - [`app`]: wiring of store, actors and facade; `run_until_stopped`.
//! - [`config`]: `config.toml`, humantime durations, validated once at start-up.
//! - [`backoff`]: restart intensity windows and jittered backoff, shared by every retrier.
//! - [`ids`]: validated user ids and server names, and the (user, server) key; a leaf module.
//! - [`store`]: the `mcp_connections` repository (SQLite or PostgreSQL), token encryption,
//!   private credential files.
//! - [`actors`]: the ractor actor tree; each actor file holds its message enum and typed handle.
//! - [`mcp`]: rmcp client sessions over stdio, child-process hygiene, the bundled demo server,
//!   and the `{server}__{tool}` names under which a user's tools are offered.
//! - [`http`]: the axum facade: auth, one module per resource, `ApiError` → status + JSON, and
//!   `/mcp` (each user's servers as one Streamable HTTP MCP server, rmcp's server side).
//! - [`llm`]: the OpenAI-compatible chat-completions client and the tool-call loop of `/v1/chat`.
//! - [`oauth`]: the OAuth connect flow (PKCE, server-side state) and automatic token refresh.
//! - [`sse`]: the server-sent-events parser of the streams read (`llm`, `cluster`); a leaf.
//! - [`cluster`]: cluster mode: membership, session leases, placement and forwarding between
//!   nodes on one PostgreSQL (driven by the heartbeat actor, used through `PoolHandle`).
#![deny(unsafe_code)]

pub mod actors;
pub mod app;
pub mod backoff;
pub mod cluster;
pub mod config;
pub mod http;
pub mod ids;
pub mod llm;
pub mod mcp;
pub mod oauth;
pub mod sse;
pub mod store;
