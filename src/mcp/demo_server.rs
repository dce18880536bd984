//! The MCP server bundled in this binary: `mcp-pool demo-server [--test-tools] [--slow-start 5s]`.
//!
//! It serves over stdio and needs no network or credentials, so it doubles as a smoke target
//! for deployments and as the real child process of the integration tests. `--test-tools` adds
//! tools that misbehave on purpose (crash, leave processes behind, change the tool list).
//!
//! The handler is written by hand rather than with `#[tool_router]` because the tool list
//! changes at run time (`add_tool`), which a static router does not model.

use std::{
    borrow::Cow,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rmcp::{
    ErrorData, RoleServer, ServerHandler, ServiceExt as _,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
        JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig,
        Tool,
    },
    service::RequestContext,
};
use serde_json::{Value, json};

use super::{
    McpError, ServerLaunch,
    process::{SpawnedServer, spawn_server},
};

/// Env var naming the credentials file the pool hands to a server.
pub const CREDENTIALS_FILE_ENV: &str = "MCP_POOL_CREDENTIALS_FILE";
/// Env var some Google servers read instead.
pub const GOOGLE_CREDENTIALS_ENV: &str = "GOOGLE_APPLICATION_CREDENTIALS";
/// Env var carrying a hint of which user the server runs for.
pub const USER_ID_ENV: &str = "MCP_POOL_USER_ID";

/// Exit code of the `crash` test tool.
pub const CRASH_EXIT_CODE: i32 = 101;

/// Options of `mcp-pool demo-server`.
#[derive(Debug, Clone, Default)]
pub struct DemoServerOptions {
    /// Also offer the tools that misbehave on purpose.
    pub test_tools: bool,
    /// Sleep this long before answering anything, like a slow `npx` start.
    pub slow_start: Option<Duration>,
}

/// Serves the demo server on stdin/stdout until stdin closes.
pub async fn run(opts: DemoServerOptions) -> Result<(), McpError> {
    if let Some(delay) = opts.slow_start {
        tokio::time::sleep(delay).await;
    }
    let service = DemoServer::new(opts.test_tools)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|err| McpError::DemoServer(err.to_string()))?;
    service
        .waiting()
        .await
        .map(drop)
        .map_err(|err| McpError::DemoServer(err.to_string()))
}

// === DemoServer ===

struct DemoServer {
    /// Whether the misbehaving tools are offered.
    test_tools: bool,
    /// Names of the tools added at run time; each behaves like `echo`.
    extra_tools: Mutex<Vec<String>>,
    /// `spawn_grandchild` processes, kept so that they are not reaped behind the test's back.
    grandchildren: Mutex<Vec<std::process::Child>>,
    /// `spawn_watched_child` processes; dropping one would kill it.
    watched: tokio::sync::Mutex<Vec<SpawnedServer>>,
    /// `sleep` calls that ended because the client sent `notifications/cancelled`.
    cancelled_sleeps: AtomicU64,
    /// Sleeps running right now, and the most ever running at once: proof that calls on one
    /// session are served concurrently rather than queued.
    running_sleeps: AtomicU64,
    peak_sleeps: AtomicU64,
}

impl DemoServer {
    fn new(test_tools: bool) -> Self {
        Self {
            test_tools,
            extra_tools: Mutex::new(Vec::new()),
            grandchildren: Mutex::new(Vec::new()),
            watched: tokio::sync::Mutex::new(Vec::new()),
            cancelled_sleeps: AtomicU64::new(0),
            running_sleeps: AtomicU64::new(0),
            peak_sleeps: AtomicU64::new(0),
        }
    }

    fn extra_tools(&self) -> Vec<String> {
        self.extra_tools
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn tools(&self) -> Vec<Tool> {
        let mut tools = vec![
            tool("echo", "Returns `message`.", message_schema()),
            tool(
                "add",
                "Returns a + b.",
                json!({
                    "type": "object",
                    "properties": { "a": { "type": "number" }, "b": { "type": "number" } },
                    "required": ["a", "b"],
                }),
            ),
            tool(
                "sleep",
                "Sleeps `ms` milliseconds, then returns.",
                json!({
                    "type": "object",
                    "properties": { "ms": { "type": "integer", "minimum": 0 } },
                    "required": ["ms"],
                }),
            ),
            tool(
                "whoami",
                "Describes the credentials file this server was given (key names only) and its pid.",
                empty_schema(),
            ),
        ];
        if self.test_tools {
            tools.extend([
                tool(
                    "crash",
                    "Exits at once with code 101, without answering.",
                    empty_schema(),
                ),
                tool(
                    "spawn_grandchild",
                    "Starts `sleep 3600` in this server's process group; returns its pid.",
                    empty_schema(),
                ),
                tool(
                    "hold_stdout",
                    "Starts `sleep 3600` in this server's process group that keeps this server's \
                     stdout open but not its stdin; returns its pid. Once the server dies, the \
                     client sees no end of its output, yet nothing reads what it writes.",
                    empty_schema(),
                ),
                tool(
                    "spawn_watched_child",
                    "Starts `sleep 3600` through mcp-pool's own spawner (its own group, death \
                     signal armed); returns its pid.",
                    empty_schema(),
                ),
                tool(
                    "add_tool",
                    "Adds an echo-like tool (`name`, or `extra_<n>`) and sends tools/list_changed.",
                    json!({
                        "type": "object",
                        "properties": { "name": { "type": "string" } },
                    }),
                ),
                tool(
                    "trigger_list_changed",
                    "Adds a tool `extra_<n>` and sends tools/list_changed.",
                    empty_schema(),
                ),
                tool(
                    "stats",
                    "Counters: how many sleep calls were cancelled by the client.",
                    empty_schema(),
                ),
            ]);
            tools.extend(probe_tools());
        }
        tools.extend(self.extra_tools().into_iter().map(|name| {
            tool(
                name,
                "Added at run time; returns `message`.",
                message_schema(),
            )
        }));
        tools
    }

    async fn add_tool(
        &self,
        name: Option<String>,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let name = {
            let mut extra = self
                .extra_tools
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let name = name.unwrap_or_else(|| format!("extra_{}", extra.len() + 1));
            extra.push(name.clone());
            name
        };
        context
            .peer
            .notify_tool_list_changed()
            .await
            .map_err(|err| ErrorData::internal_error(err.to_string(), None))?;
        Ok(text(name))
    }

    async fn sleep(
        &self,
        ms: u64,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let running = self.running_sleeps.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_sleeps.fetch_max(running, Ordering::SeqCst);
        let outcome = tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(ms)) => Ok(text(format!("slept {ms} ms"))),
            () = context.ct.cancelled() => {
                self.cancelled_sleeps.fetch_add(1, Ordering::Relaxed);
                Err(ErrorData::internal_error("cancelled by the client", None))
            }
        };
        self.running_sleeps.fetch_sub(1, Ordering::SeqCst);
        outcome
    }

    fn spawn_grandchild(&self) -> Result<CallToolResult, ErrorData> {
        // No stdio: a grandchild holding our stdout would keep the client's pipe open after
        // this server dies, hiding the crash from it.
        self.spawn_sleep(std::process::Stdio::null())
    }

    fn hold_stdout(&self) -> Result<CallToolResult, ErrorData> {
        self.spawn_sleep(std::process::Stdio::inherit())
    }

    /// `sleep 3600` in this server's process group, with `stdout`, and no stdin or stderr.
    fn spawn_sleep(&self, stdout: std::process::Stdio) -> Result<CallToolResult, ErrorData> {
        let child = std::process::Command::new("sleep")
            .arg("3600")
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|err| ErrorData::internal_error(err.to_string(), None))?;
        let pid = child.id();
        self.grandchildren
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(child);
        Ok(text(pid.to_string()))
    }

    async fn spawn_watched_child(&self) -> Result<CallToolResult, ErrorData> {
        let launch = ServerLaunch {
            command: "sleep".to_owned(),
            args: vec!["3600".to_owned()],
            ..ServerLaunch::default()
        };
        let spawned = spawn_server(&launch, None)
            .await
            .map_err(|err| ErrorData::internal_error(err.to_string(), None))?;
        let pid = spawned.pgid;
        self.watched.lock().await.push(spawned);
        Ok(text(pid.to_string()))
    }
}

impl ServerHandler for DemoServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
        .with_server_info(Implementation::new(
            "mcp-pool-demo",
            env!("CARGO_PKG_VERSION"),
        ))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.tools()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.tools().into_iter().find(|tool| tool.name == name)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let args = request.arguments.unwrap_or_default();
        let name = request.name.as_ref();
        let is_test_tool = !matches!(name, "echo" | "add" | "sleep" | "whoami");
        if is_test_tool && !self.test_tools && !self.extra_tools().iter().any(|n| n == name) {
            return Err(unknown_tool(name));
        }
        let result = match name {
            "echo" => text(string_arg(&args, "message")?),
            "add" => {
                let sum = number_arg(&args, "a")? + number_arg(&args, "b")?;
                text(sum.to_string())
            }
            "sleep" => {
                let ms = args
                    .get("ms")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| invalid("`ms` must be a non-negative integer"))?;
                self.sleep(ms, &context).await?
            }
            "whoami" => text(whoami().to_string()),
            "crash" => std::process::exit(CRASH_EXIT_CODE),
            "spawn_grandchild" => self.spawn_grandchild()?,
            "hold_stdout" => self.hold_stdout()?,
            "spawn_watched_child" => self.spawn_watched_child().await?,
            "add_tool" => {
                let name = args.get("name").and_then(Value::as_str).map(str::to_owned);
                self.add_tool(name, &context).await?
            }
            "trigger_list_changed" => self.add_tool(None, &context).await?,
            "stats" => text(
                json!({
                    "cancelled_sleeps": self.cancelled_sleeps.load(Ordering::Relaxed),
                    "peak_concurrent_sleeps": self.peak_sleeps.load(Ordering::SeqCst),
                })
                .to_string(),
            ),
            probe if PROBE_TOOLS.contains(&probe) => probe_result(run_probe(probe, &args)),
            other if self.extra_tools().iter().any(|n| n == other) => {
                text(string_arg(&args, "message")?)
            }
            other => return Err(unknown_tool(other)),
        };
        Ok(result.into())
    }
}

// === hostile probes ===
//
// What a malicious or prompt-injected server would try, so the tests can show that the sandbox
// denies it. Each answers `{"ok": true, ...}` or `{"ok": false, "error": ..., "errno": ...}`.

const PROBE_TOOLS: &[&str] = &[
    "read_file",
    "write_file",
    "list_dir",
    "symlink",
    "signal",
    "env",
    "spawn_detached",
    "alloc",
    "fork_many",
    "privileges",
];

fn probe_tools() -> Vec<Tool> {
    let object = |properties: Value, required: &[&str]| json!({ "type": "object", "properties": properties, "required": required });
    let path = json!({ "path": { "type": "string" } });
    vec![
        tool(
            "read_file",
            "Reads `path`; returns its size.",
            object(path.clone(), &["path"]),
        ),
        tool(
            "write_file",
            "Writes `content` to `path`.",
            object(
                json!({ "path": { "type": "string" }, "content": { "type": "string" } }),
                &["path", "content"],
            ),
        ),
        tool(
            "list_dir",
            "Lists the names in `path`.",
            object(path, &["path"]),
        ),
        tool(
            "symlink",
            "Creates a symlink `link` pointing at `target`.",
            object(
                json!({ "target": { "type": "string" }, "link": { "type": "string" } }),
                &["target", "link"],
            ),
        ),
        tool(
            "signal",
            "Sends `signal` (a number; 0 probes) to `pid`.",
            object(
                json!({ "pid": { "type": "integer" }, "signal": { "type": "integer" } }),
                &["pid", "signal"],
            ),
        ),
        tool(
            "env",
            "Names of this server's environment variables.",
            empty_schema(),
        ),
        tool(
            "privileges",
            "This process's capability sets, no_new_privs flag and open-files limit.",
            empty_schema(),
        ),
        tool(
            "spawn_detached",
            "Starts a process in a new session (setsid) that sleeps an hour, with `marker` as \
             its argv[0].",
            object(json!({ "marker": { "type": "string" } }), &["marker"]),
        ),
        tool(
            "alloc",
            "Allocates and touches `mib` MiB, and keeps it.",
            object(
                json!({ "mib": { "type": "integer", "minimum": 1 } }),
                &["mib"],
            ),
        ),
        tool(
            "fork_many",
            "Starts up to `count` sleeping processes; returns how many started, then ends them.",
            object(
                json!({ "count": { "type": "integer", "minimum": 1 } }),
                &["count"],
            ),
        ),
    ]
}

/// Memory `alloc` keeps, so that it counts against the session until the server dies.
static HELD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn run_probe(name: &str, args: &JsonObject) -> Result<Value, ErrorData> {
    let str_arg = |key: &str| string_arg(args, key);
    let int_arg = |key: &str| {
        args.get(key)
            .and_then(Value::as_i64)
            .ok_or_else(|| invalid(&format!("`{key}` must be an integer")))
    };
    let outcome = |result: std::io::Result<Value>| match result {
        Ok(value) => json!({ "ok": true, "value": value }),
        Err(err) => json!({ "ok": false, "error": err.to_string(), "errno": err.raw_os_error() }),
    };
    Ok(match name {
        "read_file" => outcome(std::fs::read(str_arg("path")?).map(|bytes| json!(bytes.len()))),
        "write_file" => {
            outcome(std::fs::write(str_arg("path")?, str_arg("content")?).map(|()| Value::Null))
        }
        "list_dir" => outcome(std::fs::read_dir(str_arg("path")?).map(|entries| {
            let names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            json!(names)
        })),
        "symlink" => outcome(
            std::os::unix::fs::symlink(str_arg("target")?, str_arg("link")?).map(|()| Value::Null),
        ),
        "signal" => {
            let pid = i32::try_from(int_arg("pid")?).map_err(|_| invalid("bad pid"))?;
            let signal = int_arg("signal")?;
            let signal = match signal {
                0 => None,
                n => Some(
                    nix::sys::signal::Signal::try_from(n as i32)
                        .map_err(|_| invalid("unknown signal"))?,
                ),
            };
            outcome(
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
                    .map(|()| Value::Null)
                    .map_err(std::io::Error::from),
            )
        }
        "env" => {
            let mut names: Vec<String> = std::env::vars_os()
                .map(|(name, _)| name.to_string_lossy().into_owned())
                .collect();
            names.sort();
            json!({ "ok": true, "value": names })
        }
        "privileges" => outcome(
            std::fs::read_to_string("/proc/self/status").and_then(|status| {
                let mut fields: serde_json::Map<String, Value> = status
                    .lines()
                    .filter(|line| line.starts_with("Cap") || line.starts_with("NoNewPrivs"))
                    .filter_map(|line| line.split_once(':'))
                    .map(|(key, value)| (key.to_owned(), json!(value.trim())))
                    .collect();
                let limits = std::fs::read_to_string("/proc/self/limits")?;
                if let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) {
                    let soft = line.split_whitespace().nth(3).unwrap_or_default();
                    fields.insert("MaxOpenFiles".to_owned(), json!(soft));
                }
                Ok(Value::Object(fields))
            }),
        ),
        "spawn_detached" => outcome(
            std::process::Command::new("setsid")
                .args(["-f", "sh", "-c", "sleep 3600", &str_arg("marker")?])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .and_then(|status| {
                    status
                        .success()
                        .then_some(Value::Null)
                        .ok_or_else(|| std::io::Error::other(format!("setsid: {status}")))
                }),
        ),
        "alloc" => {
            let mib = usize::try_from(int_arg("mib")?).map_err(|_| invalid("bad size"))?;
            // Touch every page, or the kernel never charges it to the cgroup.
            let block = vec![1u8; mib * 1024 * 1024];
            HELD.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(block);
            json!({ "ok": true, "value": mib })
        }
        "fork_many" => {
            let count = usize::try_from(int_arg("count")?).map_err(|_| invalid("bad count"))?;
            let mut children = Vec::new();
            let mut error = None;
            for _ in 0..count {
                match std::process::Command::new("sleep")
                    .arg("60")
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                {
                    Ok(child) => children.push(child),
                    Err(err) => {
                        error = Some(err.to_string());
                        break;
                    }
                }
            }
            let started = children.len();
            for mut child in children {
                let _ = child.kill();
                let _ = child.wait();
            }
            json!({ "ok": error.is_none(), "value": started, "error": error })
        }
        other => return Err(unknown_tool(other)),
    })
}

fn probe_result(value: Result<Value, ErrorData>) -> CallToolResult {
    match value {
        Ok(value) => text(value.to_string()),
        Err(err) => CallToolResult::error(vec![ContentBlock::text(err.message.to_string())]),
    }
}

// === helpers ===

fn tool(name: impl Into<Cow<'static, str>>, description: &'static str, schema: Value) -> Tool {
    let schema: JsonObject = match schema {
        Value::Object(map) => map,
        _ => JsonObject::new(),
    };
    Tool::new(name, description, Arc::new(schema))
}

fn empty_schema() -> Value {
    json!({ "type": "object", "properties": {} })
}

fn message_schema() -> Value {
    json!({
        "type": "object",
        "properties": { "message": { "type": "string" } },
        "required": ["message"],
    })
}

fn text(text: impl Into<String>) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(text)])
}

fn invalid(message: &str) -> ErrorData {
    ErrorData::invalid_params(message.to_owned(), None)
}

fn unknown_tool(name: &str) -> ErrorData {
    ErrorData::invalid_params(format!("unknown tool `{name}`"), None)
}

fn string_arg(args: &JsonObject, key: &str) -> Result<String, ErrorData> {
    args.get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| invalid(&format!("`{key}` must be a string")))
}

fn number_arg(args: &JsonObject, key: &str) -> Result<f64, ErrorData> {
    args.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| invalid(&format!("`{key}` must be a number")))
}

/// What `whoami` reports: never a value from the environment or the credentials file other
/// than paths and key names.
/// Names this server process uniquely: inside a PID namespace every server is pid 2, so the
/// pid alone cannot tell a restarted server from the old one.
fn instance_id() -> u64 {
    static ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let mut bytes = [0u8; 8];
        let _ = getrandom::fill(&mut bytes);
        u64::from_ne_bytes(bytes) >> 12
    })
}

fn whoami() -> Value {
    json!({
        "pid": std::process::id(),
        "instance": instance_id(),
        "user": std::env::var(USER_ID_ENV).ok(),
        "credentials_file": describe_credentials(CREDENTIALS_FILE_ENV),
        "google_application_credentials": describe_credentials(GOOGLE_CREDENTIALS_ENV),
    })
}

fn describe_credentials(var: &str) -> Value {
    let Some(path) = std::env::var_os(var) else {
        return Value::Null;
    };
    let path = Path::new(&path);
    let parsed = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok());
    let keys: Option<Vec<String>> = match &parsed {
        Some(Value::Object(map)) => Some(map.keys().cloned().collect()),
        _ => None,
    };
    json!({
        "path": path.display().to_string(),
        "exists": path.exists(),
        "valid_json": parsed.is_some(),
        "keys": keys,
    })
}
