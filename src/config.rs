//! `config.toml`: serde structs with humantime durations, loaded and validated once at start-up.
//!
//! Every error names the offending key, so an operator can fix the file without reading code.
//! Secrets never live in the file itself: the file names the environment variable that holds them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::ids::ServerName;
use crate::mcp::sandbox::{Limits, SandboxMode, ServerPolicy};

/// Environment variable that overrides `database.url`.
pub const DATABASE_URL_ENV: &str = "MCP_POOL_DATABASE_URL";
/// Overrides `log.format` (`text` or `json`).
pub const LOG_FORMAT_ENV: &str = "MCP_POOL_LOG_FORMAT";
/// Environment variable with encryption keys (`VERSION:BASE64KEY[,VERSION:BASE64KEY...]`);
/// when set, it replaces the key file.
pub const ENCRYPTION_KEYS_ENV: &str = "MCP_POOL_ENCRYPTION_KEYS";
/// Environment variable holding the service API key (`auth.mode = "api_key"`); when unset, the
/// key is read from (or created in) `auth.api_key_file`.
pub const API_KEY_ENV: &str = "MCP_POOL_API_KEY";
/// Environment variable holding the cluster secret; when unset, `cluster.secret_file` is used.
pub const CLUSTER_SECRET_ENV: &str = "MCP_POOL_CLUSTER_SECRET";
/// Environment variable holding the admin key; when unset, `auth.admin_key_file` is used.
pub const ADMIN_KEY_ENV: &str = "MCP_POOL_ADMIN_KEY";
/// Default of `llm.api_key_env`.
pub const LLM_API_KEY_ENV: &str = "MCP_POOL_LLM_API_KEY";
/// `command = "{self}"` runs the mcp-pool binary itself (the bundled demo server).
pub const SELF_COMMAND: &str = "{self}";
/// The shortest age after which inactive credentials may be deleted (config, CLI and admin
/// route alike): anything shorter is almost certainly a typo that would delete fresh rows.
pub const MIN_CLEANUP_AGE: Duration = Duration::from_secs(3600);

/// Why a configuration could not be used. Each variant names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config key `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listener and process-wide settings.
    #[serde(default)]
    pub service: ServiceConfig,
    /// Where `mcp_connections` lives.
    #[serde(default)]
    pub database: DatabaseConfig,
    /// Credential files and their retention.
    #[serde(default)]
    pub credentials: CredentialsConfig,
    /// Encryption of tokens at rest.
    #[serde(default)]
    pub encryption: EncryptionConfig,
    /// Connection pool sizing, timeouts and restart policy.
    #[serde(default)]
    pub pool: PoolConfig,
    /// How callers of the HTTP facade authenticate.
    #[serde(default)]
    pub auth: AuthConfig,
    /// HTTP facade limits.
    #[serde(default)]
    pub http: HttpConfig,
    /// The OpenAI-compatible chat-completions API behind `/v1/chat`.
    #[serde(default)]
    pub llm: LlmConfig,
    /// How MCP server processes are confined, and their default resource limits.
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// How the service logs.
    #[serde(default)]
    pub log: LogConfig,
    /// The `/mcp` endpoint: each user's servers served as one MCP server.
    #[serde(default)]
    pub mcp: McpConfig,
    /// Cluster mode: many instances on one PostgreSQL, one live session per key cluster-wide.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// One entry per MCP server users may connect, keyed by server name.
    #[serde(default)]
    pub servers: BTreeMap<String, ServerConfig>,
    /// The file this config was loaded from (never readable by a server).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[sandbox]`: confinement of every MCP server (README, "Security model"). Each server may
/// override the mode, add paths and change limits in `[servers.<name>.sandbox]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// `enforce` (default), `best_effort` or `off`.
    pub mode: SandboxMode,
    /// Root of the private state directories, `<state_dir>/<user>/<server>` (0700): each
    /// server's HOME, TMPDIR and working directory, kept across restarts.
    pub state_dir: PathBuf,
    /// Extra read-only paths for every server.
    pub read: Vec<PathBuf>,
    /// Where the cgroup hierarchies are mounted.
    pub cgroup_root: PathBuf,
    /// Memory per session (`"512MiB"`, `"1GiB"`); the kernel kills the server past it.
    pub memory_max: ByteSize,
    /// Processes and threads per session.
    pub pids_max: u64,
    /// Open files per server process (`RLIMIT_NOFILE`).
    pub nofile: u64,
    /// CPU weight of a session, 1..=10000 (100 is an ordinary share).
    pub cpu_weight: u32,
    /// CPU weight of a session started as a restart after a crash, until it is ready.
    pub backoff_cpu_weight: u32,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            mode: SandboxMode::Enforce,
            state_dir: PathBuf::from("./server-state"),
            read: Vec::new(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            memory_max: ByteSize(limits.memory_max.unwrap_or(1 << 30)),
            pids_max: limits.pids_max.unwrap_or(512),
            nofile: limits.nofile.unwrap_or(1024),
            cpu_weight: limits.cpu_weight,
            backoff_cpu_weight: limits.backoff_cpu_weight,
        }
    }
}

/// `[servers.<name>.sandbox]`: one server's overrides of `[sandbox]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSandboxConfig {
    /// `off` for a server the operator trusts; `best_effort`; `enforce`.
    pub mode: Option<SandboxMode>,
    /// Paths it may read and execute, beyond its program and the system locations.
    pub read: Vec<PathBuf>,
    /// Paths it may read and write, beyond its state directory.
    pub write: Vec<PathBuf>,
    pub memory_max: Option<ByteSize>,
    pub pids_max: Option<u64>,
    pub nofile: Option<u64>,
    pub cpu_weight: Option<u32>,
}

/// A size in bytes, written as an integer or with a unit: `"512MiB"`, `"1GiB"`, `"64M"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"512MiB"`, `"1G"`, `"1048576"`; K/M/G/T are binary multiples either way.
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("`{text}` is not a size like \"512MiB\""))?;
        let shift = match unit.trim().trim_end_matches('B').trim_end_matches('i') {
            "" => 0,
            "K" | "k" => 10,
            "M" => 20,
            "G" => 30,
            "T" => 40,
            _ => return Err(format!("`{text}`: unknown unit (use KiB, MiB, GiB or TiB)")),
        };
        number
            .checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("`{text}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Bytes(bytes) => Ok(ByteSize(bytes)),
            Raw::Text(text) => ByteSize::parse(&text).map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Address of the HTTP facade.
    pub listen: SocketAddr,
    /// Directory for the SQLite database, the key file and process records.
    pub data_dir: PathBuf,
    /// How long SIGTERM/SIGINT may take to close every connection before the process exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (embedded default) or `postgres://...`; `MCP_POOL_DATABASE_URL` overrides it.
    pub url: String,
    /// Upper bound of pooled database connections.
    pub max_connections: u32,
    /// How long a SQLite writer waits for the lock before giving up.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://./data/mcp-pool.db".into(),
            max_connections: 8,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CredentialsConfig {
    /// Root of the per-user credential files (mode 0700).
    pub dir: PathBuf,
    /// Inactive credentials older than this are deleted by the periodic cleanup.
    #[serde(with = "humantime_serde")]
    pub cleanup_inactive_after: Duration,
    /// How often the cleanup runs.
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
}

impl Default for CredentialsConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./mcp-credentials"),
            cleanup_inactive_after: Duration::from_secs(30 * 24 * 3600),
            cleanup_interval: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// Key file (`VERSION:BASE64KEY` per line), created with mode 0600 on first run when
    /// `MCP_POOL_ENCRYPTION_KEYS` is not set.
    pub key_file: PathBuf,
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        Self {
            key_file: PathBuf::from("./data/encryption.key"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// A connection unused for this long is closed by the reaper.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How often the reaper looks for idle connections.
    #[serde(with = "humantime_serde")]
    pub reap_interval: Duration,
    /// Upper bound of one tool call.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// Upper bound of spawn + initialize + tools/list, counted from the spawn (a start that
    /// waits for a `max_concurrent_starts` slot is not charged for the wait).
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Server processes starting at once, across all keys; further starts queue for a slot.
    /// Bounds the CPU and memory burst of many simultaneous first requests.
    pub max_concurrent_starts: usize,
    /// How often an idle ready session is pinged (MCP `ping`).
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// How long a ping may go unanswered before the session counts as hung and is restarted.
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// Grace between closing stdin and SIGTERM, and between SIGTERM and SIGKILL.
    #[serde(with = "humantime_serde")]
    pub close_grace: Duration,
    /// Live connections across all users.
    pub max_connections: usize,
    /// Live connections of one user.
    pub max_connections_per_user: usize,
    /// First restart delay; doubles per attempt, with full jitter.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_base: Duration,
    /// Largest restart delay.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_cap: Duration,
    /// Restarts allowed within `restart_window` before the key is marked failed.
    pub max_restarts: u32,
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
    /// How long a failed key refuses requests before one probe start is allowed.
    #[serde(with = "humantime_serde")]
    pub failed_cooldown: Duration,
    /// Tool calls one user may have in flight at once, across all servers; more are refused
    /// at once with `429 too_many_calls` (and `Retry-After`), so one user cannot crowd out others.
    pub max_in_flight_per_user: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60 * 60),
            reap_interval: Duration::from_secs(30 * 60),
            call_timeout: Duration::from_secs(60),
            startup_timeout: Duration::from_secs(30),
            max_concurrent_starts: 8,
            health_interval: Duration::from_secs(60),
            ping_timeout: Duration::from_secs(10),
            close_grace: Duration::from_secs(3),
            max_connections: 1000,
            max_connections_per_user: 10,
            restart_backoff_base: Duration::from_millis(200),
            restart_backoff_cap: Duration::from_secs(30),
            max_restarts: 5,
            restart_window: Duration::from_secs(60),
            failed_cooldown: Duration::from_secs(5 * 60),
            max_in_flight_per_user: 16,
        }
    }
}

/// How callers authenticate (`[auth]`). Admin routes always need the admin key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `api_key` (service key + `X-User-Id`) or `jwt` (the user's own access token).
    pub mode: AuthMode,
    /// Service key file, created with mode 0600 on first run unless `MCP_POOL_API_KEY` is set.
    pub api_key_file: PathBuf,
    /// Admin key file, created with mode 0600 on first run unless `MCP_POOL_ADMIN_KEY` is set.
    pub admin_key_file: PathBuf,
    /// Token verification; required when `mode = "jwt"`.
    pub jwt: Option<JwtConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::ApiKey,
            api_key_file: PathBuf::from("./data/api.key"),
            admin_key_file: PathBuf::from("./data/admin.key"),
            jwt: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Service to service: `Authorization: Bearer <service key>` and `X-User-Id: <user>`.
    ApiKey,
    /// `Authorization: Bearer <JWT>`; the user is the token's `sub`.
    Jwt,
}

/// Signature algorithms accepted for user tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    /// Shared secret (as Supabase issues them); the secret comes from `secret_env`.
    HS256,
    /// RSA public keys from `jwks_file`.
    RS256,
    /// P-256 public keys from `jwks_file`.
    ES256,
}

/// `[auth.jwt]`: how user tokens are verified. `exp` and `nbf` are always checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub algorithm: JwtAlgorithm,
    /// Environment variable holding the HS256 secret (never the secret itself).
    #[serde(default)]
    pub secret_env: Option<String>,
    /// JWKS document (`{"keys": [...]}`) with the RS256/ES256 public keys.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, if set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud`, if set (Supabase: `authenticated`).
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`/`nbf`.
    #[serde(default = "default_jwt_leeway", with = "humantime_serde")]
    pub leeway: Duration,
}

fn default_jwt_leeway() -> Duration {
    Duration::from_secs(30)
}

/// `[log]`: the log's format (the level comes from `RUST_LOG`, default `info`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// `text` (for a terminal, the default) or `json` (one object per line, span fields included,
/// for a log pipeline).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    /// `MCP_POOL_LOG_FORMAT`, if set to a known format.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Option<LogFormat> {
        match env(LOG_FORMAT_ENV)?.trim() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }

    /// What the process should log with before (or without) a full config load: the
    /// environment's choice, else the config file's `[log]`, else text. A file that cannot be
    /// read or parsed gives text here; loading it properly reports why.
    pub fn for_process(config_path: &Path, env: impl Fn(&str) -> Option<String>) -> LogFormat {
        #[derive(Deserialize)]
        struct OnlyLog {
            #[serde(default)]
            log: LogConfig,
        }
        LogFormat::from_env(env).unwrap_or_else(|| {
            std::fs::read_to_string(config_path)
                .ok()
                .and_then(|text| toml::from_str::<OnlyLog>(&text).ok())
                .map(|only| only.log.format)
                .unwrap_or_default()
        })
    }
}

/// `[http]`: limits of the HTTP facade.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Upper bound of one request (until the response head). Longer than
    /// `pool.startup_timeout + pool.call_timeout`, so a slow first call still gets the pool's
    /// own, more precise error.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest accepted request body, in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// On shutdown, how long `/readyz` answers 503 while requests are still accepted, so a
    /// load balancer stops routing here before the listener closes. Zero in the embedded default.
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
    /// A connection must deliver a request's whole header within this, counted from when the
    /// server starts waiting for it (a fresh connection, or a kept-alive one after its last
    /// response); otherwise it is closed. Bounds slow-header clients and idle keep-alives.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Open client connections at most. Past it, a new connection gets an immediate
    /// `503 too_many_connections` (with `Retry-After`) and is closed: refused, never queued.
    pub max_open_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(120),
            max_body_bytes: 1024 * 1024,
            shutdown_delay: Duration::ZERO,
            header_read_timeout: Duration::from_secs(10),
            max_open_connections: 1024,
        }
    }
}

/// `[cluster]`: several instances behind a load balancer, coordinated through PostgreSQL
/// (membership rows and per-key session leases; see actors.md, "Cluster mode").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Off by default: a single instance needs no coordination.
    pub enabled: bool,
    /// The URL other nodes reach this one at (scheme, host, port), e.g. `http://10.0.0.5:8080`.
    /// Forwarded requests go to `<node_url>/internal/v1/...`.
    pub node_url: Option<String>,
    /// The cluster secret every node shares (read, or created 0600 on first start like the
    /// other key files; `MCP_POOL_CLUSTER_SECRET` replaces it). Copy it to every node.
    pub secret_file: PathBuf,
    /// How often a node writes its heartbeat and renews its leases.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A node whose heartbeat is older than this is dead, and a lease not renewed within it
    /// expires. Longer than two heartbeats, so one lost beat does not kill a node.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Where a key with no live lease starts: `rendezvous` (default) hashes the user over the
    /// live nodes, whichever node the request reached (right for a round-robin front);
    /// `receiver` starts it on the node the request reached, for a front that already hashes
    /// users (`deploy/`), so requests are forwarded only while sessions move.
    pub placement: Placement,
}

/// `cluster.placement`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    #[default]
    Rendezvous,
    Receiver,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            node_url: None,
            secret_file: PathBuf::from("./data/cluster.key"),
            heartbeat_interval: Duration::from_secs(2),
            ttl: Duration::from_secs(10),
            placement: Placement::Rendezvous,
        }
    }
}

/// `[mcp]`: the Streamable HTTP MCP endpoint `/mcp`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {
    /// The service's address as MCP clients reach it (scheme, host, optional port and path
    /// prefix), for the OAuth protected-resource metadata of `jwt` mode. Unset: `http://` and
    /// `service.listen`, right only when clients connect directly.
    pub public_url: Option<String>,
    /// Open `/mcp` sessions one user may hold; at the cap the user's least recently
    /// initialized session is closed to admit the new one.
    pub max_sessions_per_user: usize,
    /// A `/mcp` session with no request and no open stream for this long is closed.
    #[serde(with = "humantime_serde")]
    pub session_idle_timeout: Duration,
    /// Servers whose tools a `tools/list` starts at the same time when their sessions are
    /// not live (each start also takes one of `pool.max_concurrent_starts`).
    pub max_parallel_starts: usize,
}

impl Default for McpConfig {
    fn default() -> Self {
        Self {
            public_url: None,
            max_sessions_per_user: 16,
            session_idle_timeout: Duration::from_secs(300),
            max_parallel_starts: 4,
        }
    }
}

impl McpConfig {
    /// `public_url` without a trailing `/`, or the listener's address over plain HTTP.
    pub fn base_url(&self, listen: SocketAddr) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{listen}"),
        }
    }
}

/// `[servers.<name>.tools]`: which of a server's tools callers see and may call. Applied by
/// the pool, so REST, `/v1/chat` and `/mcp` all obey it. Patterns are exact tool names or
/// contain `*` (any run of characters).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ToolFilter {
    /// When not empty, only tools matching one of these are offered.
    pub allow: Vec<String>,
    /// Tools matching one of these are never offered (wins over `allow`).
    pub deny: Vec<String>,
}

impl ToolFilter {
    /// Whether tool `name` may be listed and called.
    pub fn permits(&self, name: &str) -> bool {
        (self.allow.is_empty() || self.allow.iter().any(|p| glob_match(p, name)))
            && !self.deny.iter().any(|p| glob_match(p, name))
    }

    /// Whether every tool passes (the common case: no copying of tool lists).
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

/// `*` matches any run of characters (also none); everything else matches itself.
fn glob_match(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*`: an exact match
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The OpenAI-compatible chat-completions API (OpenAI, vLLM, llama.cpp, Ollama, ...).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// API root; requests go to `{base_url}/chat/completions`. Ollama: `http://127.0.0.1:11434/v1`.
    pub base_url: String,
    /// Model name sent with every request.
    pub model: String,
    /// Environment variable holding the bearer API key (never the key itself). Unset or empty
    /// means no `Authorization` header, as local servers want.
    pub api_key_env: String,
    /// Upper bound of one chat-completions request; for a streamed answer, of the wait for
    /// the response headers and then for each next chunk.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Model requests per chat, tool rounds included; a model still asking for tools on the
    /// last one makes the chat fail with `max_steps_exceeded`.
    pub max_steps: u32,
    /// Tool calls of one model step that run at the same time.
    pub max_parallel_tool_calls: usize,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com/v1".into(),
            model: "gpt-4o-mini".into(),
            api_key_env: LLM_API_KEY_ENV.into(),
            timeout: Duration::from_secs(120),
            max_steps: 8,
            max_parallel_tool_calls: 4,
        }
    }
}

/// How the per-user credentials file is laid out for a server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialsFormat {
    /// Google's `authorized_user` JSON: `type`, `client_id`, `client_secret`, `refresh_token`.
    GoogleAuthorizedUser,
    /// `access_token`, `refresh_token`, `token_expiry` (RFC 3339) as JSON.
    #[default]
    TokenJson,
}

/// How a remote server (`url`) is given the user's credentials.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteAuth {
    /// The user's OAuth access token as `Authorization: Bearer`, refreshed when it is due or
    /// when the server answers 401 (`[servers.<name>.oauth]`).
    #[default]
    Oauth,
    /// A static per-user secret (stored as the credentials' `access_token`, encrypted like a
    /// token): `Authorization: Bearer <key>`, or `<api_key_header>: <key>` when that is set.
    ApiKey,
    /// No credentials: the server is open (sessions are still one per user).
    None,
}

/// One MCP server users may connect.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Program to run; `{self}` is the mcp-pool binary. Exactly one of `command` and `url`.
    #[serde(default)]
    pub command: String,
    /// A remote MCP server's Streamable HTTP endpoint (`https://…/mcp`) instead of a program.
    #[serde(default)]
    pub url: Option<String>,
    /// Allows `http://` for a `url` on a loopback address (tests, a local sidecar); anything
    /// else must be `https://`.
    #[serde(default)]
    pub allow_insecure_loopback: bool,
    /// How a remote server receives the user's credentials.
    #[serde(default)]
    pub auth: RemoteAuth,
    /// With `auth = "api_key"`: the header carrying the key (e.g. `X-Api-Key`); unset means
    /// `Authorization: Bearer`.
    #[serde(default)]
    pub api_key_header: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment for the child. Values are not secret: use `oauth.client_secret_env`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Environment variable through which the child learns its credentials file path
    /// (required for a `command`; a remote server gets its credentials over HTTP instead).
    #[serde(default)]
    pub credentials_env: String,
    #[serde(default)]
    pub credentials_format: CredentialsFormat,
    /// OAuth client the user's tokens were issued to.
    #[serde(default)]
    pub oauth: Option<OAuthClientConfig>,
    /// The server reads its token only at start-up: after a token refresh its session is
    /// restarted between calls (never during one) so it picks up the new token.
    #[serde(default)]
    pub restart_on_token_refresh: bool,
    /// Variables of the service's environment this server also gets (beyond PATH, locale
    /// and TZ); `MCP_POOL_*` never passes.
    #[serde(default)]
    pub env_passthrough: Vec<String>,
    /// This server's confinement, over `[sandbox]`.
    #[serde(default)]
    pub sandbox: ServerSandboxConfig,
    /// Start sessions of this Python server by forking a zygote that imported it once
    /// (`prefork = true`, or a `[servers.<name>.prefork]` table).
    #[serde(default)]
    pub prefork: PreforkSetting,
    /// Which of its tools are offered (`allow`, `deny`).
    #[serde(default)]
    pub tools: ToolFilter,
}

/// `servers.<name>.prefork`: `true`/`false`, or a table naming the entry point.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PreforkSetting {
    /// `prefork = true`: entry point and interpreter from the console script.
    Enabled(bool),
    /// `[servers.<name>.prefork]` with overrides.
    Table(PreforkConfig),
}

impl Default for PreforkSetting {
    fn default() -> Self {
        PreforkSetting::Enabled(false)
    }
}

/// `[servers.<name>.prefork]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PreforkConfig {
    /// Module to import in the zygote (`from MODULE import FUNCTION` of the console script
    /// when absent).
    #[serde(default)]
    pub module: Option<String>,
    /// Function each forked child calls, as the console script would.
    #[serde(default)]
    pub function: Option<String>,
    /// Python interpreter of the zygote; the console script's `#!` line when absent.
    #[serde(default)]
    pub python: Option<PathBuf>,
}

impl PreforkSetting {
    /// The prefork settings, when prefork is on.
    pub fn enabled(&self) -> Option<PreforkConfig> {
        match self {
            PreforkSetting::Enabled(true) => Some(PreforkConfig::default()),
            PreforkSetting::Enabled(false) => None,
            PreforkSetting::Table(table) => Some(table.clone()),
        }
    }
}

/// `[servers.<name>.oauth]`: the OAuth client of a server, its provider's endpoints, and the
/// connect flow (`POST /v1/oauth/{server}/start`, `GET /v1/oauth/{server}/callback`).
///
/// `client_id` alone only describes whose tokens these are (for the credentials file).
/// `token_url` enables automatic refresh; `authorization_url` (with `token_url`,
/// `redirect_uri`, `success_redirect` and `error_redirect`) enables the connect flow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthClientConfig {
    /// Required, except for a remote server using discovery, where none means dynamic client
    /// registration (RFC 7591).
    #[serde(default)]
    pub client_id: String,
    /// Environment variable holding the client secret (never the secret itself).
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// The provider's authorization endpoint (the page the user is sent to).
    #[serde(default)]
    pub authorization_url: Option<String>,
    /// The provider's token endpoint (code exchange and refresh).
    #[serde(default)]
    pub token_url: Option<String>,
    /// Scopes requested in the authorization URL (space-joined).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// This service's callback as registered with the provider:
    /// `https://<host>/v1/oauth/<server>/callback`.
    #[serde(default)]
    pub redirect_uri: Option<String>,
    /// Provider-specific authorization parameters, e.g. Google's `access_type = "offline"`
    /// and `prompt = "consent"` (needed to get a refresh token).
    #[serde(default)]
    pub extra_auth_params: BTreeMap<String, String>,
    /// Where the browser goes after a successful connect (`?connected=<server>` is added).
    #[serde(default)]
    pub success_redirect: Option<String>,
    /// Where the browser goes after a failed connect (`?error=<code>&server=<server>`).
    #[serde(default)]
    pub error_redirect: Option<String>,
    /// Access tokens expiring within this are refreshed before use.
    #[serde(default = "default_refresh_before", with = "humantime_serde")]
    pub refresh_before: Duration,
    /// How the client authenticates at the token endpoint.
    #[serde(default)]
    pub token_auth_method: TokenAuthMethod,
    /// Upper bound of one token-endpoint request.
    #[serde(default = "default_token_timeout", with = "humantime_serde")]
    pub token_timeout: Duration,
    /// After a refresh failed transiently (5xx, timeout, network), the key waits this long
    /// before it is tried again, doubling with each further failure (up to 60 times this).
    #[serde(default = "default_refresh_cooldown", with = "humantime_serde")]
    pub refresh_cooldown: Duration,
}

/// Client authentication at the token endpoint (RFC 6749 section 2.3.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenAuthMethod {
    /// `client_id` and `client_secret` in the form body (Google's documented way).
    #[default]
    ClientSecretPost,
    /// HTTP Basic with the URL-encoded id and secret.
    ClientSecretBasic,
}

fn default_refresh_before() -> Duration {
    Duration::from_secs(5 * 60)
}

fn default_token_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_refresh_cooldown() -> Duration {
    Duration::from_secs(1)
}

/// Authorization parameters mcp-pool sets itself; `extra_auth_params` may not override them.
const RESERVED_AUTH_PARAMS: &[&str] = &[
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
];

impl OAuthClientConfig {
    /// Whether the connect flow is configured (validation guarantees the rest is then set).
    pub fn connect_flow_enabled(&self) -> bool {
        self.authorization_url.is_some()
    }
}

fn is_http_url(value: &str) -> bool {
    reqwest::Url::parse(value)
        .is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
}

/// Why a server's program cannot be run. Names the program as configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("program `{program}` {problem}")]
pub struct ProgramNotFound {
    /// `command` as configured (`{self}`, a bare name, or a path).
    pub program: String,
    /// What is wrong with it, e.g. "was not found in PATH".
    pub problem: String,
}

impl ServerConfig {
    /// Whether this is a remote server (`url`) rather than a program.
    pub fn is_remote(&self) -> bool {
        self.url.is_some()
    }

    /// A remote OAuth server whose `[oauth]` names no endpoints: they are discovered the MCP
    /// way (`oauth::discovery`), and the client registered when no `client_id` is configured.
    pub fn uses_discovery(&self) -> bool {
        self.is_remote()
            && self.auth == RemoteAuth::Oauth
            && self
                .oauth
                .as_ref()
                .is_some_and(|o| o.authorization_url.is_none() && o.token_url.is_none())
    }

    /// This server's confinement: its overrides over the `[sandbox]` defaults.
    pub fn sandbox_policy(&self, defaults: &SandboxConfig) -> ServerPolicy {
        let own = &self.sandbox;
        ServerPolicy {
            mode: own.mode.unwrap_or(defaults.mode),
            read: own.read.clone(),
            write: own.write.clone(),
            limits: Limits {
                memory_max: Some(own.memory_max.unwrap_or(defaults.memory_max).0),
                pids_max: Some(own.pids_max.unwrap_or(defaults.pids_max)),
                nofile: Some(own.nofile.unwrap_or(defaults.nofile)),
                cpu_weight: own.cpu_weight.unwrap_or(defaults.cpu_weight),
                backoff_cpu_weight: defaults.backoff_cpu_weight,
            },
        }
    }

    /// The program to run, as an absolute or relative path that exists and is executable:
    /// `{self}` is the running mcp-pool binary, a name without `/` is looked up in `PATH` (as a
    /// shell would), and a path is checked as given.
    pub fn resolve_program(&self) -> Result<PathBuf, ProgramNotFound> {
        self.resolve_program_in(std::env::var_os("PATH").as_deref())
    }

    /// [`Self::resolve_program`] with an explicit `PATH` value.
    pub fn resolve_program_in(
        &self,
        path_var: Option<&std::ffi::OsStr>,
    ) -> Result<PathBuf, ProgramNotFound> {
        let not_found = |problem: String| ProgramNotFound {
            program: self.command.clone(),
            problem,
        };
        if self.command == SELF_COMMAND {
            return std::env::current_exe().map_err(|err| {
                not_found(format!("(the mcp-pool binary) cannot be located: {err}"))
            });
        }
        if self.command.contains('/') {
            let path = PathBuf::from(&self.command);
            return match executable(&path) {
                Ok(()) => Ok(path),
                Err(problem) => Err(not_found(problem.into())),
            };
        }
        let dirs = path_var.map(std::env::split_paths).into_iter().flatten();
        for dir in dirs {
            // An empty PATH entry means the current directory, as in a shell.
            let dir = if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            };
            let candidate = dir.join(&self.command);
            if executable(&candidate).is_ok() {
                return Ok(candidate);
            }
        }
        Err(not_found("was not found in PATH".into()))
    }
}

/// `Ok` if `path` is a regular file with an execute bit (following symlinks).
fn executable(path: &Path) -> Result<(), &'static str> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => Err("is not a regular file"),
        Ok(meta) if meta.permissions().mode() & 0o111 == 0 => Err("is not executable"),
        Ok(_) => Ok(()),
        Err(_) => Err("does not exist"),
    }
}

/// File descriptors reserved per MCP session: the child's stdin, stdout and stderr pipes plus
/// the pidfd/registry file handling around it (about 4, as measured).
pub const FDS_PER_SESSION: u64 = 4;
/// File descriptors reserved for everything else: the runtime, the listener, log output,
/// credential and key files being written, the LLM and OAuth HTTP clients.
pub const FDS_HEADROOM: u64 = 64;

impl Config {
    /// Reads, parses, applies environment overrides and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_owned(),
            cause,
        })?;
        let mut config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        config.apply_env_overrides(|name| std::env::var(name).ok());
        config.validate()?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Everything of the service a server must never reach: the data directory (database,
    /// keys, process records), the credentials directory, the key and config files, the
    /// SQLite file wherever it is, and the service's working directory.
    pub fn protected_paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![
            self.service.data_dir.clone(),
            self.credentials.dir.clone(),
            self.encryption.key_file.clone(),
            self.auth.api_key_file.clone(),
            self.auth.admin_key_file.clone(),
            self.cluster.secret_file.clone(),
        ];
        paths.extend(self.source.clone());
        if let Some(file) = self.database.url.strip_prefix("sqlite://") {
            let file = file.split('?').next().unwrap_or(file);
            paths.push(PathBuf::from(file));
        }
        if let Ok(cwd) = std::env::current_dir() {
            paths.push(cwd);
        }
        paths
    }

    /// Parses TOML text; the error message carries toml's key path and line.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|err| err.to_string().trim_end().to_owned())
    }

    /// File descriptors the configured capacity needs at once:
    /// `FDS_PER_SESSION × pool.max_connections + http.max_open_connections +
    /// database.max_connections + FDS_HEADROOM`.
    pub fn required_open_files(&self) -> u64 {
        let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        FDS_PER_SESSION
            .saturating_mul(as_u64(self.pool.max_connections))
            .saturating_add(as_u64(self.http.max_open_connections))
            .saturating_add(u64::from(self.database.max_connections))
            .saturating_add(FDS_HEADROOM)
    }

    /// Environment variables win over the file for deployment-specific values.
    pub fn apply_env_overrides(&mut self, env: impl Fn(&str) -> Option<String>) {
        if let Some(url) = env(DATABASE_URL_ENV).filter(|url| !url.is_empty()) {
            self.database.url = url;
        }
        if let Some(format) = LogFormat::from_env(&env) {
            self.log.format = format;
        }
    }

    /// Semantic checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = &self.database.url;
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database.url",
                "must start with sqlite:, postgres:// or postgresql://",
            ));
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        let non_zero = [
            ("service.shutdown_grace", self.service.shutdown_grace),
            (
                "credentials.cleanup_inactive_after",
                self.credentials.cleanup_inactive_after,
            ),
            (
                "credentials.cleanup_interval",
                self.credentials.cleanup_interval,
            ),
            ("pool.idle_timeout", self.pool.idle_timeout),
            ("pool.reap_interval", self.pool.reap_interval),
            ("pool.call_timeout", self.pool.call_timeout),
            ("pool.startup_timeout", self.pool.startup_timeout),
            ("pool.health_interval", self.pool.health_interval),
            ("pool.ping_timeout", self.pool.ping_timeout),
            ("pool.restart_backoff_base", self.pool.restart_backoff_base),
            ("pool.restart_window", self.pool.restart_window),
        ];
        for (key, value) in non_zero {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than zero"));
            }
        }
        let pool = &self.pool;
        if pool.restart_backoff_cap < pool.restart_backoff_base {
            return Err(invalid(
                "pool.restart_backoff_cap",
                "must not be shorter than pool.restart_backoff_base",
            ));
        }
        if pool.max_connections == 0 {
            return Err(invalid("pool.max_connections", "must be at least 1"));
        }
        if pool.max_connections_per_user == 0
            || pool.max_connections_per_user > pool.max_connections
        {
            return Err(invalid(
                "pool.max_connections_per_user",
                "must be between 1 and pool.max_connections",
            ));
        }
        if pool.max_restarts == 0 {
            return Err(invalid("pool.max_restarts", "must be at least 1"));
        }
        if pool.max_in_flight_per_user == 0 {
            return Err(invalid("pool.max_in_flight_per_user", "must be at least 1"));
        }
        if self.credentials.cleanup_inactive_after < MIN_CLEANUP_AGE {
            return Err(invalid(
                "credentials.cleanup_inactive_after",
                "must be at least 1h (younger inactive credentials are kept)",
            ));
        }
        if pool.max_concurrent_starts == 0 {
            return Err(invalid("pool.max_concurrent_starts", "must be at least 1"));
        }
        // One ping at a time per session: a check must be over before the next is due.
        if pool.ping_timeout >= pool.health_interval {
            return Err(invalid(
                "pool.ping_timeout",
                "must be shorter than pool.health_interval",
            ));
        }
        self.validate_http()?;
        self.validate_cluster()?;
        self.validate_auth()?;
        self.validate_llm()?;
        self.validate_mcp()?;
        validate_limits(
            "sandbox",
            Some(self.sandbox.memory_max),
            Some(self.sandbox.pids_max),
            Some(self.sandbox.nofile),
            Some(self.sandbox.cpu_weight),
        )?;
        if !(1..=10_000).contains(&self.sandbox.backoff_cpu_weight) {
            return Err(invalid(
                "sandbox.backoff_cpu_weight",
                "must be between 1 and 10000",
            ));
        }
        if self.sandbox.state_dir.as_os_str().is_empty() {
            return Err(invalid("sandbox.state_dir", "must not be empty"));
        }
        for (name, server) in &self.servers {
            let key = |field: &str| format!("servers.{name}.{field}");
            ServerName::parse(name)
                .map_err(|err| invalid(format!("servers.{name}"), err.to_string()))?;
            // `/v1/connections/warm` is a route of its own: a server of that name would be
            // unreachable under `/v1/connections/{server}`.
            if name == "warm" {
                return Err(invalid(
                    format!("servers.{name}"),
                    "`warm` is reserved (POST /v1/connections/warm)",
                ));
            }
            if let Some(url) = &server.url {
                validate_remote(server, url, &key)?;
                continue;
            }
            if server.command.trim().is_empty() {
                return Err(invalid(
                    key("command"),
                    "must not be empty (or set `url` for a remote server)",
                ));
            }
            if server.auth != RemoteAuth::Oauth || server.api_key_header.is_some() {
                return Err(invalid(
                    key("auth"),
                    "`auth` and `api_key_header` apply to remote servers (`url`) only",
                ));
            }
            if server.allow_insecure_loopback {
                return Err(invalid(
                    key("allow_insecure_loopback"),
                    "applies to remote servers (`url`) only",
                ));
            }
            if let Some(prefork) = server.prefork.enabled() {
                for (field, value) in [("module", &prefork.module), ("function", &prefork.function)]
                {
                    if let Some(value) = value
                        && !is_python_name(value, field == "module")
                    {
                        return Err(invalid(
                            key(&format!("prefork.{field}")),
                            "must be a Python name (dotted for a module)",
                        ));
                    }
                }
            }
            if !is_env_name(&server.credentials_env) {
                return Err(invalid(
                    key("credentials_env"),
                    "must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
                ));
            }
            for env_key in server.env.keys() {
                if !is_env_name(env_key) {
                    return Err(invalid(
                        key(&format!("env.{env_key}")),
                        "is not a valid environment variable name",
                    ));
                }
            }
            for name in &server.env_passthrough {
                if !is_env_name(name) || name.starts_with("MCP_POOL_") {
                    return Err(invalid(
                        key("env_passthrough"),
                        format!(
                            "`{name}` must be an environment variable name, and never MCP_POOL_* \
                             (the service's own secrets)"
                        ),
                    ));
                }
            }
            for (field, patterns) in [("allow", &server.tools.allow), ("deny", &server.tools.deny)]
            {
                if patterns
                    .iter()
                    .any(|p| p.is_empty() || p.chars().any(char::is_control))
                {
                    return Err(invalid(
                        key(&format!("tools.{field}")),
                        "patterns must be non-empty tool names, `*` matching any characters",
                    ));
                }
            }
            let own = &server.sandbox;
            validate_limits(
                &key("sandbox"),
                own.memory_max,
                own.pids_max,
                own.nofile,
                own.cpu_weight,
            )?;
            if let Some(oauth) = &server.oauth {
                if let Some(secret_env) = &oauth.client_secret_env
                    && !(is_env_name(secret_env) && secret_env.starts_with("MCP_POOL_"))
                {
                    return Err(invalid(
                        key("oauth.client_secret_env"),
                        "must be an environment variable name starting with MCP_POOL_ \
                         (those are withheld from MCP server processes)",
                    ));
                }
                validate_oauth(oauth, &key)?;
            } else if server.credentials_format == CredentialsFormat::GoogleAuthorizedUser {
                return Err(invalid(
                    key("oauth"),
                    "is required for credentials_format = \"google_authorized_user\" (client_id)",
                ));
            }
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let cluster = &self.cluster;
        if !cluster.enabled {
            return Ok(());
        }
        // Leases and membership live in PostgreSQL; a SQLite file is one machine's.
        if self.database.url.starts_with("sqlite:") {
            return Err(invalid(
                "cluster.enabled",
                "cluster mode needs PostgreSQL (database.url = \"postgres://...\"): the nodes \
                 coordinate through shared tables, and SQLite is a file on one machine",
            ));
        }
        match &cluster.node_url {
            None => {
                return Err(invalid(
                    "cluster.node_url",
                    "is required in cluster mode: the URL other nodes reach this one at",
                ));
            }
            Some(url)
                if !(url.starts_with("http://") || url.starts_with("https://"))
                    || reqwest::Url::parse(url).is_err() =>
            {
                return Err(invalid(
                    "cluster.node_url",
                    "must be an http:// or https:// URL, e.g. http://10.0.0.5:8080",
                ));
            }
            Some(_) => {}
        }
        if cluster.secret_file.as_os_str().is_empty() {
            return Err(invalid("cluster.secret_file", "must not be empty"));
        }
        if cluster.heartbeat_interval < Duration::from_millis(100) {
            return Err(invalid(
                "cluster.heartbeat_interval",
                "must be at least 100ms",
            ));
        }
        if cluster.ttl <= cluster.heartbeat_interval * 2 {
            return Err(invalid(
                "cluster.ttl",
                "must be longer than twice cluster.heartbeat_interval (one lost heartbeat must \
                 not expire a live node's leases)",
            ));
        }
        Ok(())
    }

    fn validate_http(&self) -> Result<(), ConfigError> {
        if self.http.request_timeout.is_zero() {
            return Err(invalid("http.request_timeout", "must be longer than zero"));
        }
        // Below 1 KiB not even a credentials PUT fits; above 64 MiB a JSON body is a mistake.
        if !(1024..=64 * 1024 * 1024).contains(&self.http.max_body_bytes) {
            return Err(invalid(
                "http.max_body_bytes",
                "must be between 1024 and 67108864 (64 MiB)",
            ));
        }
        if self.http.header_read_timeout.is_zero() {
            return Err(invalid(
                "http.header_read_timeout",
                "must be longer than zero",
            ));
        }
        if self.http.max_open_connections == 0 {
            return Err(invalid("http.max_open_connections", "must be at least 1"));
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let auth = &self.auth;
        if auth.api_key_file.as_os_str().is_empty() {
            return Err(invalid("auth.api_key_file", "must not be empty"));
        }
        if auth.admin_key_file.as_os_str().is_empty() {
            return Err(invalid("auth.admin_key_file", "must not be empty"));
        }
        if auth.api_key_file == auth.admin_key_file {
            return Err(invalid(
                "auth.admin_key_file",
                "must differ from auth.api_key_file (the admin key must be a separate secret)",
            ));
        }
        let Some(jwt) = &auth.jwt else {
            if auth.mode == AuthMode::Jwt {
                return Err(invalid("auth.jwt", "is required when auth.mode = \"jwt\""));
            }
            return Ok(());
        };
        match jwt.algorithm {
            JwtAlgorithm::HS256 => {
                match &jwt.secret_env {
                    Some(name) if is_env_name(name) => {}
                    Some(_) => {
                        return Err(invalid(
                            "auth.jwt.secret_env",
                            "must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
                        ));
                    }
                    None => {
                        return Err(invalid(
                            "auth.jwt.secret_env",
                            "is required for algorithm = \"HS256\"",
                        ));
                    }
                }
                if jwt.jwks_file.is_some() {
                    return Err(invalid(
                        "auth.jwt.jwks_file",
                        "is only used with RS256/ES256; HS256 takes secret_env",
                    ));
                }
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                if jwt
                    .jwks_file
                    .as_ref()
                    .is_none_or(|f| f.as_os_str().is_empty())
                {
                    return Err(invalid(
                        "auth.jwt.jwks_file",
                        "is required for algorithm = \"RS256\" or \"ES256\"",
                    ));
                }
                if jwt.secret_env.is_some() {
                    return Err(invalid(
                        "auth.jwt.secret_env",
                        "is only used with HS256; RS256/ES256 take jwks_file",
                    ));
                }
            }
        }
        for (key, value) in [
            ("auth.jwt.issuer", &jwt.issuer),
            ("auth.jwt.audience", &jwt.audience),
        ] {
            if value.as_ref().is_some_and(|v| v.trim().is_empty()) {
                return Err(invalid(key, "must not be empty when set"));
            }
        }
        Ok(())
    }

    fn validate_mcp(&self) -> Result<(), ConfigError> {
        let mcp = &self.mcp;
        if let Some(url) = &mcp.public_url {
            let rest = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"));
            if rest.is_none_or(|host| host.is_empty() || host.contains(['?', '#', ' ', '"'])) {
                return Err(invalid(
                    "mcp.public_url",
                    "must be an http:// or https:// URL with no query, e.g. https://mcp-pool.example.com",
                ));
            }
        }
        if mcp.max_sessions_per_user == 0 {
            return Err(invalid("mcp.max_sessions_per_user", "must be at least 1"));
        }
        if mcp.session_idle_timeout.is_zero() {
            return Err(invalid(
                "mcp.session_idle_timeout",
                "must be longer than zero",
            ));
        }
        if mcp.max_parallel_starts == 0 {
            return Err(invalid("mcp.max_parallel_starts", "must be at least 1"));
        }
        Ok(())
    }

    fn validate_llm(&self) -> Result<(), ConfigError> {
        let llm = &self.llm;
        let url = llm.base_url.trim();
        if !(url.starts_with("http://") || url.starts_with("https://"))
            || url.len() <= "https://".len()
        {
            return Err(invalid(
                "llm.base_url",
                "must be an http:// or https:// URL, e.g. https://api.openai.com/v1",
            ));
        }
        if llm.model.trim().is_empty() {
            return Err(invalid("llm.model", "must not be empty"));
        }
        if !is_env_name(&llm.api_key_env) {
            return Err(invalid(
                "llm.api_key_env",
                "must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
            ));
        }
        if llm.timeout.is_zero() {
            return Err(invalid("llm.timeout", "must be longer than zero"));
        }
        if llm.max_steps == 0 {
            return Err(invalid("llm.max_steps", "must be at least 1"));
        }
        if llm.max_parallel_tool_calls == 0 {
            return Err(invalid("llm.max_parallel_tool_calls", "must be at least 1"));
        }
        Ok(())
    }

    /// The configured server, if `name` is one.
    pub fn server(&self, name: &ServerName) -> Option<&ServerConfig> {
        self.servers.get(name.as_str())
    }
}

/// Bounds that keep a server startable and the host safe.
/// A Python identifier, or a dotted path of them when `dotted`: what a console script may
/// name as its entry point (the zygote passes it to `importlib`, never to a shell).
pub fn is_python_name(value: &str, dotted: bool) -> bool {
    let identifier = |part: &str| {
        let mut chars = part.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if dotted {
        value.split('.').all(identifier)
    } else {
        identifier(value)
    }
}

fn validate_limits(
    prefix: &str,
    memory_max: Option<ByteSize>,
    pids_max: Option<u64>,
    nofile: Option<u64>,
    cpu_weight: Option<u32>,
) -> Result<(), ConfigError> {
    if let Some(ByteSize(bytes)) = memory_max
        && bytes < 16 * 1024 * 1024
    {
        return Err(invalid(
            format!("{prefix}.memory_max"),
            "must be at least 16MiB",
        ));
    }
    if let Some(pids) = pids_max
        && !(8..=1_000_000).contains(&pids)
    {
        return Err(invalid(
            format!("{prefix}.pids_max"),
            "must be between 8 and 1000000",
        ));
    }
    if let Some(files) = nofile
        && !(64..=1_048_576).contains(&files)
    {
        return Err(invalid(
            format!("{prefix}.nofile"),
            "must be between 64 and 1048576",
        ));
    }
    if let Some(weight) = cpu_weight
        && !(1..=10_000).contains(&weight)
    {
        return Err(invalid(
            format!("{prefix}.cpu_weight"),
            "must be between 1 and 10000",
        ));
    }
    Ok(())
}

/// A remote server: `url` instead of `command`, https unless on loopback with the switch, and
/// none of the keys that only mean something for a process.
fn validate_remote(
    server: &ServerConfig,
    url: &str,
    key: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    if !server.command.is_empty() {
        return Err(invalid(
            key("url"),
            "set either `command` (a program) or `url` (a remote server), not both",
        ));
    }
    let parsed = reqwest::Url::parse(url)
        .map_err(|_| invalid(key("url"), "must be an absolute https:// URL"))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid(
            key("url"),
            "must not carry credentials (use `auth`)",
        ));
    }
    match parsed.scheme() {
        "https" if parsed.host().is_some() => {}
        "http" if is_loopback(&parsed) => {
            if !server.allow_insecure_loopback {
                return Err(invalid(
                    key("url"),
                    "must be https:// (http:// on a loopback address needs                      allow_insecure_loopback = true)",
                ));
            }
        }
        _ => {
            return Err(invalid(
                key("url"),
                "must be an absolute https:// URL (http:// only on loopback)",
            ));
        }
    }
    let process_only = [
        ("args", !server.args.is_empty()),
        ("env", !server.env.is_empty()),
        ("credentials_env", !server.credentials_env.is_empty()),
        ("env_passthrough", !server.env_passthrough.is_empty()),
        ("restart_on_token_refresh", server.restart_on_token_refresh),
    ];
    for (field, set) in process_only {
        if set {
            return Err(invalid(
                key(field),
                "applies to servers run as a program (`command`), not to a remote `url`",
            ));
        }
    }
    if let Some(header) = &server.api_key_header {
        if server.auth != RemoteAuth::ApiKey {
            return Err(invalid(
                key("api_key_header"),
                "is only used with auth = \"api_key\"",
            ));
        }
        let reserved = [
            "host",
            "content-type",
            "content-length",
            "accept",
            "mcp-session-id",
        ];
        if reqwest::header::HeaderName::from_bytes(header.as_bytes()).is_err()
            || reserved.contains(&header.to_ascii_lowercase().as_str())
        {
            return Err(invalid(
                key("api_key_header"),
                "must be an HTTP header name (not one the transport sets itself)",
            ));
        }
    }
    if let Some(oauth) = &server.oauth {
        if server.auth != RemoteAuth::Oauth {
            return Err(invalid(key("oauth"), "is only used with auth = \"oauth\""));
        }
        if let Some(secret_env) = &oauth.client_secret_env
            && !(is_env_name(secret_env) && secret_env.starts_with("MCP_POOL_"))
        {
            return Err(invalid(
                key("oauth.client_secret_env"),
                "must be an environment variable name starting with MCP_POOL_",
            ));
        }
        if server.uses_discovery() {
            // Endpoints (and, without a client_id, the client) come from discovery; where the
            // browser goes is still ours to say.
            for (field, value) in [
                ("redirect_uri", &oauth.redirect_uri),
                ("success_redirect", &oauth.success_redirect),
                ("error_redirect", &oauth.error_redirect),
            ] {
                match value {
                    Some(value) if is_http_url(value) => {}
                    Some(_) => {
                        return Err(invalid(
                            key(&format!("oauth.{field}")),
                            "must be an absolute http:// or https:// URL",
                        ));
                    }
                    None => {
                        return Err(invalid(
                            key(&format!("oauth.{field}")),
                            "is required (the connect flow of a server whose endpoints are \
                             discovered)",
                        ));
                    }
                }
            }
        } else {
            validate_oauth(oauth, key)?;
        }
    }
    Ok(())
}

/// `localhost`, `127.0.0.0/8` or `::1`.
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn validate_oauth(
    oauth: &OAuthClientConfig,
    key: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    if oauth.client_id.trim().is_empty() {
        return Err(invalid(key("oauth.client_id"), "must not be empty"));
    }
    for (field, value) in [
        ("authorization_url", &oauth.authorization_url),
        ("token_url", &oauth.token_url),
        ("redirect_uri", &oauth.redirect_uri),
        ("success_redirect", &oauth.success_redirect),
        ("error_redirect", &oauth.error_redirect),
    ] {
        if let Some(value) = value
            && !is_http_url(value)
        {
            return Err(invalid(
                key(&format!("oauth.{field}")),
                "must be an absolute http:// or https:// URL",
            ));
        }
    }
    if oauth.connect_flow_enabled() {
        for (field, value) in [
            ("token_url", &oauth.token_url),
            ("redirect_uri", &oauth.redirect_uri),
            ("success_redirect", &oauth.success_redirect),
            ("error_redirect", &oauth.error_redirect),
        ] {
            if value.is_none() {
                return Err(invalid(
                    key(&format!("oauth.{field}")),
                    "is required when oauth.authorization_url is set (the connect flow)",
                ));
            }
        }
    }
    for name in oauth.extra_auth_params.keys() {
        if RESERVED_AUTH_PARAMS.contains(&name.as_str()) {
            return Err(invalid(
                key(&format!("oauth.extra_auth_params.{name}")),
                "is set by mcp-pool itself and cannot be overridden",
            ));
        }
    }
    if oauth.scopes.iter().any(|s| s.is_empty() || s.contains(' ')) {
        return Err(invalid(
            key("oauth.scopes"),
            "each scope must be non-empty and contain no space",
        ));
    }
    if oauth.token_timeout.is_zero() {
        return Err(invalid(
            key("oauth.token_timeout"),
            "must be longer than zero",
        ));
    }
    if oauth.refresh_cooldown.is_zero() {
        return Err(invalid(
            key("oauth.refresh_cooldown"),
            "must be longer than zero",
        ));
    }
    Ok(())
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../config.toml");

    #[test]
    fn shipped_config_is_valid_and_uses_the_design_durations() {
        let config = Config::parse(SHIPPED).expect("shipped config parses");
        config.validate().expect("shipped config validates");
        assert_eq!(config.pool.idle_timeout, Duration::from_secs(3600));
        assert_eq!(config.pool.reap_interval, Duration::from_secs(1800));
        assert_eq!(
            config.credentials.cleanup_inactive_after,
            Duration::from_secs(30 * 86400)
        );
        assert_eq!(
            config.credentials.cleanup_interval,
            Duration::from_secs(86400)
        );
        assert!(config.database.url.starts_with("sqlite:"));
        assert!(config.servers.contains_key("google-analytics"));
        assert!(config.servers.contains_key("demo"));
    }

    #[test]
    fn cluster_mode_is_validated_and_refused_on_sqlite() {
        let parse = |text: &str| Config::parse(text).expect("parses").validate();
        let key_of = |err: ConfigError| match err {
            ConfigError::Invalid { key, problem } => (key, problem),
            other => panic!("unexpected {other}"),
        };
        // Absent: single node, nothing checked.
        parse("").expect("no [cluster] is fine");
        let (key, problem) =
            key_of(parse("[cluster]\nenabled = true\nnode_url = \"http://a:1\"\n").unwrap_err());
        assert_eq!(key, "cluster.enabled");
        assert!(
            problem.contains("PostgreSQL") && problem.contains("SQLite"),
            "{problem}"
        );
        let pg = "[database]\nurl = \"postgres://db/x\"\n[cluster]\nenabled = true\n";
        assert_eq!(key_of(parse(pg).unwrap_err()).0, "cluster.node_url");
        let with_url = format!("{pg}node_url = \"http://10.0.0.5:8080\"\n");
        let config = Config::parse(&with_url).unwrap();
        config
            .validate()
            .expect("a complete cluster section validates");
        assert_eq!(config.cluster.ttl, Duration::from_secs(10));
        let (key, _) = key_of(
            parse(&format!(
                "{with_url}heartbeat_interval = \"5s\"\nttl = \"10s\"\n"
            ))
            .unwrap_err(),
        );
        assert_eq!(key, "cluster.ttl");
        assert_eq!(
            key_of(parse(&format!("{pg}node_url = \"10.0.0.5:8080\"\n")).unwrap_err()).0,
            "cluster.node_url"
        );
    }

    #[test]
    fn tool_filters_match_names_and_globs() {
        assert!(glob_match("echo", "echo"));
        assert!(!glob_match("echo", "echo2"));
        assert!(glob_match("get_*", "get_report"));
        assert!(glob_match("*_report", "run_report"));
        assert!(glob_match("run_*_report", "run_funnel_report"));
        assert!(!glob_match("run_*_report", "run_report_x"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*a", "a"));
        let filter = ToolFilter {
            allow: vec!["run_*".into(), "echo".into()],
            deny: vec!["run_realtime_*".into()],
        };
        assert!(filter.permits("echo") && filter.permits("run_report"));
        assert!(!filter.permits("run_realtime_report") && !filter.permits("add"));
        assert!(ToolFilter::default().permits("anything") && ToolFilter::default().is_open());
        let text = "[servers.x]\ncommand = \"x\"\ncredentials_env = \"X\"\n\
                    credentials_format = \"token_json\"\n[servers.x.tools]\ndeny = [\"\"]\n";
        let err = Config::parse(text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("servers.x.tools.deny"), "{err}");
    }

    #[test]
    fn mcp_keys_are_checked() {
        for (text, key) in [
            ("[mcp]\npublic_url = \"ftp://x\"\n", "mcp.public_url"),
            ("[mcp]\npublic_url = \"https://\"\n", "mcp.public_url"),
            (
                "[mcp]\nmax_sessions_per_user = 0\n",
                "mcp.max_sessions_per_user",
            ),
            (
                "[mcp]\nsession_idle_timeout = \"0s\"\n",
                "mcp.session_idle_timeout",
            ),
            (
                "[mcp]\nmax_parallel_starts = 0\n",
                "mcp.max_parallel_starts",
            ),
        ] {
            let err = Config::parse(text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        let config = Config::parse("[mcp]\npublic_url = \"https://pool.example.com/\"\n").unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.mcp.base_url(config.service.listen),
            "https://pool.example.com"
        );
    }

    #[test]
    fn bad_duration_names_the_key() {
        let err = Config::parse("[pool]\nidle_timeout = \"sixty minutes\"\n").unwrap_err();
        assert!(err.contains("idle_timeout"), "{err}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let err = Config::parse("[pool]\nidle_timout = \"60m\"\n").unwrap_err();
        assert!(err.contains("idle_timout"), "{err}");
    }

    #[test]
    fn zero_duration_names_the_key() {
        let config = Config::parse("[pool]\nreap_interval = \"0s\"\n").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("pool.reap_interval"), "{err}");
    }

    #[test]
    fn health_and_start_limits_name_their_keys() {
        for (text, key) in [
            (
                "[pool]\nmax_concurrent_starts = 0\n",
                "pool.max_concurrent_starts",
            ),
            ("[pool]\nhealth_interval = \"0s\"\n", "pool.health_interval"),
            ("[pool]\nping_timeout = \"0s\"\n", "pool.ping_timeout"),
            (
                "[pool]\nhealth_interval = \"5s\"\nping_timeout = \"5s\"\n",
                "pool.ping_timeout",
            ),
        ] {
            let config = Config::parse(text).unwrap();
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        let warm = "[servers.warm]\ncommand = \"x\"\ncredentials_env = \"X\"\ncredentials_format = \"token_json\"\n";
        let err = Config::parse(warm)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("servers.warm"), "{err}");
        let fine = Config::parse(
            "[pool]\nmax_concurrent_starts = 2\nhealth_interval = \"2s\"\nping_timeout = \"500ms\"\n",
        )
        .unwrap();
        fine.validate().unwrap();
        assert_eq!(fine.pool.ping_timeout, Duration::from_millis(500));
    }

    #[test]
    fn bad_server_name_names_the_key() {
        let text = "[servers.\"../x\"]\ncommand = \"x\"\ncredentials_env = \"X\"\ncredentials_format = \"token_json\"\n";
        let config = Config::parse(text).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("servers.../x"), "{err}");
    }

    /// The defaults compiled into the code (an empty file), key by key as README's
    /// configuration table documents them: a changed default changes this test.
    #[test]
    fn code_defaults_are_the_documented_ones() {
        let config = Config::parse("").expect("an empty config parses");
        config.validate().expect("the code defaults validate");
        let secs = Duration::from_secs;
        let s = &config.service;
        assert_eq!(s.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(s.data_dir, PathBuf::from("./data"));
        assert_eq!(s.shutdown_grace, secs(10));
        let d = &config.database;
        assert_eq!(d.url, "sqlite://./data/mcp-pool.db");
        assert_eq!((d.max_connections, d.busy_timeout), (8, secs(5)));
        let c = &config.credentials;
        assert_eq!(c.dir, PathBuf::from("./mcp-credentials"));
        assert_eq!(c.cleanup_inactive_after, secs(30 * 86400));
        assert_eq!(c.cleanup_interval, secs(86400));
        assert_eq!(
            config.encryption.key_file,
            PathBuf::from("./data/encryption.key")
        );
        let p = &config.pool;
        assert_eq!(
            (p.idle_timeout, p.reap_interval, p.call_timeout),
            (secs(3600), secs(1800), secs(60))
        );
        assert_eq!((p.startup_timeout, p.close_grace), (secs(30), secs(3)));
        assert_eq!(p.max_concurrent_starts, 8);
        assert_eq!((p.health_interval, p.ping_timeout), (secs(60), secs(10)));
        assert_eq!((p.max_connections, p.max_connections_per_user), (1000, 10));
        assert_eq!(
            (p.restart_backoff_base, p.restart_backoff_cap),
            (Duration::from_millis(200), secs(30))
        );
        assert_eq!(
            (p.max_restarts, p.restart_window, p.failed_cooldown),
            (5, secs(60), secs(300))
        );
        let a = &config.auth;
        assert_eq!(a.mode, AuthMode::ApiKey);
        assert_eq!(a.api_key_file, PathBuf::from("./data/api.key"));
        assert_eq!(a.admin_key_file, PathBuf::from("./data/admin.key"));
        assert!(a.jwt.is_none());
        let h = &config.http;
        assert_eq!(
            (h.request_timeout, h.max_body_bytes, h.shutdown_delay),
            (secs(120), 1024 * 1024, Duration::ZERO)
        );
        let l = &config.llm;
        assert_eq!(
            (l.base_url.as_str(), l.model.as_str()),
            ("https://api.openai.com/v1", "gpt-4o-mini")
        );
        assert_eq!(l.api_key_env, "MCP_POOL_LLM_API_KEY");
        assert_eq!(
            (l.timeout, l.max_steps, l.max_parallel_tool_calls),
            (secs(120), 8, 4)
        );
        assert!(config.servers.is_empty());
    }

    #[test]
    fn remote_servers_need_https_except_on_loopback_with_the_switch() {
        let check = |body: &str| {
            Config::parse(&format!("[servers.r]\n{body}"))
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map_err(|e| e.to_string()))
        };
        check("url = \"https://mcp.example.com/mcp\"").unwrap();
        check("url = \"http://127.0.0.1:9/mcp\"\nallow_insecure_loopback = true").unwrap();
        check("url = \"http://[::1]:9/mcp\"\nallow_insecure_loopback = true").unwrap();
        check("url = \"http://localhost:9/mcp\"\nallow_insecure_loopback = true").unwrap();
        for (body, names) in [
            ("url = \"http://127.0.0.1:9/mcp\"", "servers.r.url"),
            (
                "url = \"http://example.com/mcp\"\nallow_insecure_loopback = true",
                "servers.r.url",
            ),
            (
                "url = \"http://127.0.0.2.example.com/mcp\"\nallow_insecure_loopback = true",
                "servers.r.url",
            ),
            ("url = \"ftp://example.com/mcp\"", "servers.r.url"),
            ("url = \"https://u:p@example.com/mcp\"", "servers.r.url"),
            (
                "url = \"https://example.com/mcp\"\ncommand = \"x\"",
                "servers.r.url",
            ),
            (
                "url = \"https://example.com/mcp\"\ncredentials_env = \"X\"",
                "servers.r.credentials_env",
            ),
            (
                "url = \"https://example.com/mcp\"\napi_key_header = \"X-Key\"",
                "servers.r.api_key_header",
            ),
            (
                "url = \"https://example.com/mcp\"\nauth = \"api_key\"\napi_key_header = \"Mcp-Session-Id\"",
                "servers.r.api_key_header",
            ),
            (
                "command = \"x\"\ncredentials_env = \"X\"\nauth = \"none\"",
                "servers.r.auth",
            ),
            ("credentials_env = \"X\"", "servers.r.command"),
        ] {
            let err = check(body).unwrap_err();
            assert!(err.contains(names), "{body}: {err}");
        }
        check(
            "url = \"https://example.com/mcp\"\nauth = \"api_key\"\napi_key_header = \"X-Api-Key\"",
        )
        .unwrap();
    }

    /// The shipped file states the same values as the code (it is a working default, not a
    /// second set of defaults).
    #[test]
    fn the_shipped_file_agrees_with_the_code_defaults() {
        let shipped = Config::parse(SHIPPED).unwrap();
        let code = Config::parse("").unwrap();
        assert_eq!(
            format!("{:?}", shipped.service),
            format!("{:?}", code.service)
        );
        assert_eq!(format!("{:?}", shipped.pool), format!("{:?}", code.pool));
        assert_eq!(format!("{:?}", shipped.auth), format!("{:?}", code.auth));
        assert_eq!(format!("{:?}", shipped.http), format!("{:?}", code.http));
        assert_eq!(
            format!("{:?}", shipped.credentials),
            format!("{:?}", code.credentials)
        );
    }

    fn validation_error(text: &str) -> String {
        Config::parse(text)
            .expect("parses")
            .validate()
            .expect_err("invalid")
            .to_string()
    }

    #[test]
    fn auth_validation_names_the_key() {
        let cases = [
            ("[auth]\nmode = \"jwt\"\n", "auth.jwt"),
            (
                "[auth]\nmode = \"jwt\"\n[auth.jwt]\nalgorithm = \"HS256\"\n",
                "auth.jwt.secret_env",
            ),
            (
                "[auth.jwt]\nalgorithm = \"HS256\"\nsecret_env = \"not a name\"\n",
                "auth.jwt.secret_env",
            ),
            ("[auth.jwt]\nalgorithm = \"RS256\"\n", "auth.jwt.jwks_file"),
            (
                "[auth.jwt]\nalgorithm = \"ES256\"\njwks_file = \"k.json\"\nsecret_env = \"S\"\n",
                "auth.jwt.secret_env",
            ),
            (
                "[auth.jwt]\nalgorithm = \"HS256\"\nsecret_env = \"S\"\njwks_file = \"k.json\"\n",
                "auth.jwt.jwks_file",
            ),
            (
                "[auth.jwt]\nalgorithm = \"HS256\"\nsecret_env = \"S\"\naudience = \" \"\n",
                "auth.jwt.audience",
            ),
            (
                "[auth]\napi_key_file = \"k\"\nadmin_key_file = \"k\"\n",
                "auth.admin_key_file",
            ),
            ("[http]\nrequest_timeout = \"0s\"\n", "http.request_timeout"),
            ("[http]\nmax_body_bytes = 10\n", "http.max_body_bytes"),
        ];
        for (text, key) in cases {
            let err = validation_error(text);
            assert!(err.contains(&format!("`{key}`")), "{text:?}: {err}");
        }
        let err = Config::parse("[auth]\nmode = \"oauth\"\n").unwrap_err();
        assert!(err.contains("mode"), "{err}");
        let err = Config::parse("[auth.jwt]\nalgorithm = \"none\"\n").unwrap_err();
        assert!(err.contains("algorithm"), "{err}");
        let err = Config::parse("[http]\nbody_limit = 5\n").unwrap_err();
        assert!(err.contains("body_limit"), "{err}");
    }

    #[test]
    fn valid_jwt_configs_pass() {
        for text in [
            "[auth]\nmode = \"jwt\"\n[auth.jwt]\nalgorithm = \"HS256\"\nsecret_env = \"SUPABASE_JWT_SECRET\"\naudience = \"authenticated\"\n",
            "[auth]\nmode = \"jwt\"\n[auth.jwt]\nalgorithm = \"RS256\"\njwks_file = \"jwks.json\"\nissuer = \"https://issuer\"\nleeway = \"5s\"\n",
            "[auth]\nmode = \"jwt\"\n[auth.jwt]\nalgorithm = \"ES256\"\njwks_file = \"jwks.json\"\n",
            "[http]\nrequest_timeout = \"5m\"\nmax_body_bytes = 4096\nshutdown_delay = \"5s\"\n",
        ] {
            let config = Config::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            config.validate().unwrap_or_else(|e| panic!("{text}: {e}"));
        }
    }

    #[test]
    fn llm_section_has_defaults_and_names_bad_keys() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.llm.base_url, "https://api.openai.com/v1");
        assert_eq!(config.llm.api_key_env, LLM_API_KEY_ENV);
        assert_eq!(config.llm.max_steps, 8);
        assert!(config.llm.max_parallel_tool_calls >= 1);

        let config = Config::parse(
            "[llm]\nbase_url = \"http://127.0.0.1:11434/v1\"\nmodel = \"llama3.2\"\ntimeout = \"90s\"\n",
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.llm.timeout, Duration::from_secs(90));
        assert_eq!(config.llm.model, "llama3.2");

        for (text, key) in [
            ("[llm]\nbase_url = \"api.openai.com\"\n", "llm.base_url"),
            ("[llm]\nmodel = \" \"\n", "llm.model"),
            ("[llm]\napi_key_env = \"sk-123 456\"\n", "llm.api_key_env"),
            ("[llm]\ntimeout = \"0s\"\n", "llm.timeout"),
            ("[llm]\nmax_steps = 0\n", "llm.max_steps"),
            (
                "[llm]\nmax_parallel_tool_calls = 0\n",
                "llm.max_parallel_tool_calls",
            ),
        ] {
            let err = Config::parse(text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        let err = Config::parse("[llm]\ntimeout = \"soon\"\n").unwrap_err();
        assert!(err.contains("timeout"), "{err}");
        let err = Config::parse("[llm]\napi_key = \"sk-x\"\n").unwrap_err();
        assert!(err.contains("api_key"), "{err}");
    }

    #[test]
    fn shipped_google_oauth_has_the_real_endpoints() {
        let config = Config::parse(SHIPPED).unwrap();
        let oauth = config.servers["google-analytics"].oauth.clone().unwrap();
        assert_eq!(
            oauth.authorization_url.as_deref(),
            Some("https://accounts.google.com/o/oauth2/v2/auth")
        );
        assert_eq!(
            oauth.token_url.as_deref(),
            Some("https://oauth2.googleapis.com/token")
        );
        assert_eq!(
            oauth.scopes,
            ["https://www.googleapis.com/auth/analytics.readonly"]
        );
        assert_eq!(oauth.extra_auth_params["access_type"], "offline");
        assert_eq!(oauth.extra_auth_params["prompt"], "consent");
        assert_eq!(oauth.refresh_before, Duration::from_secs(300));
        assert_eq!(oauth.token_auth_method, TokenAuthMethod::ClientSecretPost);
        assert!(oauth.connect_flow_enabled());
        assert!(!config.servers["google-analytics"].restart_on_token_refresh);
    }

    #[test]
    fn oauth_validation_names_the_key() {
        let server = "[servers.x]\ncommand = \"x\"\ncredentials_env = \"X\"\ncredentials_format = \"token_json\"\n[servers.x.oauth]\nclient_id = \"c\"\n";
        for (extra, key) in [
            ("token_url = \"ftp://x\"\n", "servers.x.oauth.token_url"),
            (
                "authorization_url = \"https://a/auth\"\n",
                "servers.x.oauth.token_url",
            ),
            (
                "authorization_url = \"https://a/auth\"\ntoken_url = \"https://a/t\"\nredirect_uri = \"https://me/cb\"\nsuccess_redirect = \"https://app/ok\"\n",
                "servers.x.oauth.error_redirect",
            ),
            (
                "extra_auth_params = { state = \"x\" }\n",
                "servers.x.oauth.extra_auth_params.state",
            ),
            ("scopes = [\"a b\"]\n", "servers.x.oauth.scopes"),
            ("token_timeout = \"0s\"\n", "servers.x.oauth.token_timeout"),
        ] {
            let err = validation_error(&format!("{server}{extra}"));
            assert!(err.contains(&format!("`{key}`")), "{extra}: {err}");
        }
        let err = Config::parse(&format!("{server}token_auth_method = \"jwt\"\n")).unwrap_err();
        assert!(err.contains("token_auth_method"), "{err}");
    }

    #[test]
    fn hardening_keys_have_defaults_and_name_bad_values() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.http.header_read_timeout, Duration::from_secs(10));
        assert_eq!(config.http.max_open_connections, 1024);
        assert_eq!(config.pool.max_in_flight_per_user, 16);
        let shipped = Config::parse(SHIPPED).unwrap();
        assert_eq!(
            shipped.http.header_read_timeout,
            config.http.header_read_timeout
        );
        assert_eq!(
            shipped.http.max_open_connections,
            config.http.max_open_connections
        );
        assert_eq!(
            shipped.pool.max_in_flight_per_user,
            config.pool.max_in_flight_per_user
        );
        for (text, key) in [
            (
                "[http]\nheader_read_timeout = \"0s\"\n",
                "http.header_read_timeout",
            ),
            (
                "[http]\nmax_open_connections = 0\n",
                "http.max_open_connections",
            ),
            (
                "[pool]\nmax_in_flight_per_user = 0\n",
                "pool.max_in_flight_per_user",
            ),
            (
                "[credentials]\ncleanup_inactive_after = \"59m\"\n",
                "credentials.cleanup_inactive_after",
            ),
        ] {
            let err = validation_error(text);
            assert!(err.contains(&format!("`{key}`")), "{text}: {err}");
        }
        let err = Config::parse("[http]\nheader_read_timeout = \"soon\"\n").unwrap_err();
        assert!(err.contains("header_read_timeout"), "{err}");
    }

    #[test]
    fn open_files_needed_follow_the_capacity() {
        let config = Config::parse(
            "[pool]\nmax_connections = 1000\n[http]\nmax_open_connections = 500\n[database]\nmax_connections = 8\n",
        )
        .unwrap();
        assert_eq!(config.required_open_files(), 4 * 1000 + 500 + 8 + 64);
    }

    #[test]
    fn programs_resolve_through_path_or_are_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let runnable = dir.path().join("runnable");
        std::fs::write(&runnable, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&runnable, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let server = |command: &str| ServerConfig {
            command: command.into(),
            url: None,
            allow_insecure_loopback: false,
            auth: RemoteAuth::Oauth,
            api_key_header: None,
            args: Vec::new(),
            env: BTreeMap::new(),
            credentials_env: "X".into(),
            credentials_format: CredentialsFormat::TokenJson,
            oauth: None,
            restart_on_token_refresh: false,
            env_passthrough: Vec::new(),
            sandbox: ServerSandboxConfig::default(),
            prefork: PreforkSetting::default(),
            tools: ToolFilter::default(),
        };
        let path = std::env::join_paths(["/nonexistent-dir".as_ref(), dir.path()]).unwrap();
        let path = Some(path.as_os_str());
        assert_eq!(
            server("runnable").resolve_program_in(path).unwrap(),
            runnable
        );
        let err = server("plain").resolve_program_in(path).unwrap_err();
        assert_eq!(err.to_string(), "program `plain` was not found in PATH");
        let err = server("pipx").resolve_program_in(None).unwrap_err();
        assert!(err.to_string().contains("`pipx`"), "{err}");
        let absolute = plain.to_string_lossy().into_owned();
        let err = server(&absolute).resolve_program_in(path).unwrap_err();
        assert_eq!(err.problem, "is not executable");
        let err = server("/no/such/file")
            .resolve_program_in(path)
            .unwrap_err();
        assert_eq!(err.problem, "does not exist");
        let err = server(&dir.path().to_string_lossy())
            .resolve_program_in(path)
            .unwrap_err();
        assert_eq!(err.problem, "is not a regular file");
        let me = server(SELF_COMMAND).resolve_program_in(None).unwrap();
        assert_eq!(me, std::env::current_exe().unwrap());
    }

    #[test]
    fn database_url_env_overrides_the_file() {
        let mut config = Config::parse("").unwrap();
        config.apply_env_overrides(|name| {
            (name == DATABASE_URL_ENV).then(|| "postgres://db/x".to_owned())
        });
        assert_eq!(config.database.url, "postgres://db/x");
        config.validate().unwrap();
    }
}
