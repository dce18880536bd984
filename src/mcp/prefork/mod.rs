//! Pre-forked Python servers: a zygote per server imports the server's module once, and each
//! session starts as a confined fork of it, in milliseconds, sharing the imported pages.
//!
//! # Layout
//! - this file: the entry point of a server (from its console script or config), the
//!   [`Prefork`] registry of one [`Zygote`] per `prefork` server, and their stats.
//! - [`zygote`]: one zygote process: its start under its own confinement, its restart
//!   policy, and the fork request that turns into a [`ForkedServer`].
//! - `launcher.py`: the Python side, shipped inside the binary and passed with `-c`.
//!
//! # Confinement of a forked session
//! The zygote runs like a spawned server (own cgroup, PID and mount namespace behind the
//! minimal init, no capabilities, `no_new_privs`), with a Landlock domain that covers what any
//! child may need: the program, the system, the state root. Nothing of the data or
//! credentials directories, no user secret in its environment. Each child then, before any
//! server code runs, joins its own session cgroup, takes its own stdio, environment and
//! working directory, and adds its session's ruleset (built here) as a second Landlock layer:
//! its own state directory, and **no `/proc`** at all. A forked child never execs, so no
//! runtime start-up needs `/proc`; and all of one server's children share the zygote's PID
//! namespace, where `/proc/<sibling>/environ` would otherwise show another user's environment.
//! Signal and abstract-socket scoping of each child's own domain keeps siblings and the zygote
//! out of reach. Its credentials come as a sealed memfd, which the child reopens through
//! `/proc/self/fd/N`: the memfd lives on a kernel-internal mount Landlock does not govern.
//!
//! # Life cycle
//! A forked child dies with its zygote (`PR_SET_PDEATHSIG`, and the zygote's PID namespace
//! ends with it), and so with the service. Sessions of a zygote that crashed are therefore
//! restarted by their own restart policy, through the new zygote (or a plain spawn while it
//! is down): they hold no state a restart would lose that a spawned server's crash would not.

mod zygote;

use std::{
    collections::BTreeMap,
    io::Read as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

pub use zygote::{ForkRequest, PreforkError, Zygote, ZygoteStats};
pub(crate) use zygote::{ForkedServer, ZygoteSettings};

use tracing::debug;

use super::{
    McpSession, ProcessRegistry, Sandbox, ServerLaunch, base_environment,
    sandbox::{ServerPolicy, SessionPaths},
};
use crate::config::{Config, PreforkConfig, ServerConfig, is_python_name};

/// The launcher run by every zygote (`python -c`).
pub(crate) const LAUNCHER: &str = include_str!("launcher.py");

/// What a zygote imports and what each child calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryPoint {
    /// The interpreter (the console script's `#!` line, or `prefork.python`).
    pub python: PathBuf,
    /// `from MODULE import FUNCTION` of the console script, or `prefork.module`.
    pub module: String,
    /// Called as the console script would: `sys.exit(FUNCTION())`.
    pub function: String,
}

/// Reads the entry point of a pip-generated console script at `program`, with `config`'s
/// overrides taking precedence; the error says what is missing.
pub fn entry_point(program: &Path, config: &PreforkConfig) -> Result<EntryPoint, String> {
    let script = read_head(program);
    let from_script = script.as_deref().and_then(console_script_entry);
    let python = match &config.python {
        Some(python) => Some(python.clone()),
        None => script.as_deref().and_then(shebang_python),
    };
    let module = config
        .module
        .clone()
        .or_else(|| from_script.as_ref().map(|(module, _)| module.clone()));
    let function = config
        .function
        .clone()
        .or_else(|| from_script.map(|(_, function)| function));
    match (python, module, function) {
        (Some(python), Some(module), Some(function)) => Ok(EntryPoint {
            python,
            module,
            function,
        }),
        (None, ..) => Err(format!(
            "{} has no `#!` interpreter line; set prefork.python",
            program.display()
        )),
        _ => Err(format!(
            "{} is not a console script of the form `from MODULE import FUNCTION; \
             sys.exit(FUNCTION())`; set prefork.module and prefork.function",
            program.display()
        )),
    }
}

/// The first 64 KiB of `program` as text, if it is text.
fn read_head(program: &Path) -> Option<String> {
    let mut head = Vec::new();
    std::fs::File::open(program)
        .ok()?
        .take(64 * 1024)
        .read_to_end(&mut head)
        .ok()?;
    String::from_utf8(head).ok()
}

/// The interpreter of a `#!` line naming Python, with `/usr/bin/env NAME` resolved in the
/// service's `PATH`.
fn shebang_python(script: &str) -> Option<PathBuf> {
    let line = script.lines().next()?.strip_prefix("#!")?;
    let mut words = line.split_whitespace();
    let mut interpreter = PathBuf::from(words.next()?);
    if interpreter.file_name().is_some_and(|name| name == "env") {
        let name = words.find(|word| !word.starts_with('-'))?;
        interpreter = super::sandbox::resolve_program(name, std::env::var("PATH").ok().as_deref())?;
    }
    interpreter
        .file_name()?
        .to_str()?
        .starts_with("python")
        .then_some(interpreter)
}

/// `(MODULE, FUNCTION)` of a script holding `from MODULE import FUNCTION` and a call
/// `sys.exit(FUNCTION())`, which is what pip and uv write for `[project.scripts]`.
fn console_script_entry(script: &str) -> Option<(String, String)> {
    script.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("from ")?;
        let (module, function) = rest.split_once(" import ")?;
        let (module, function) = (module.trim(), function.trim());
        let called = format!("sys.exit({function}())");
        (is_python_name(module, true)
            && is_python_name(function, false)
            && script.lines().any(|l| l.trim() == called))
        .then(|| (module.to_owned(), function.to_owned()))
    })
}

/// One session to start by fork: what [`connect_forked`] needs besides the zygote.
pub struct ForkedStart<'a> {
    pub sandbox: &'a Sandbox,
    pub policy: &'a ServerPolicy,
    pub session: SessionPaths<'a>,
    /// Started as a restart after a crash (the backoff CPU weight until ready).
    pub restarting: bool,
    /// The session's environment as a spawn would get it, without HOME, TMPDIR and the
    /// credentials variable (set here).
    pub env: &'a BTreeMap<String, String>,
    /// The variable naming the credentials file, and the file the pool wrote.
    pub credentials: Option<(&'a str, &'a Path)>,
    pub startup_timeout: Duration,
    pub registry: Option<&'a ProcessRegistry>,
}

/// Starts a session as a fork of `zygote`: prepares its confinement, hands the child its
/// credentials as a sealed memfd, and runs the MCP handshake over its pipes, all within
/// `startup_timeout`. Any error means "spawn it instead"; the caller logs and counts it.
pub async fn connect_forked(
    zygote: &Zygote,
    start: ForkedStart<'_>,
) -> Result<McpSession, PreforkError> {
    let began = tokio::time::Instant::now();
    let deadline = began + start.startup_timeout;
    let mut confinement =
        start
            .sandbox
            .prepare_forked(start.policy, start.session, start.restarting)?;
    let credentials = match start.credentials {
        Some((name, path)) => Some((
            name,
            tokio::fs::read(path).await.map_err(|err| {
                PreforkError::Fork(format!("cannot read the credentials file: {err}"))
            })?,
        )),
        None => None,
    };
    let mut env = start.env.clone();
    let state_dir = confinement.state_dir.to_string_lossy().into_owned();
    env.insert("HOME".to_owned(), state_dir.clone());
    env.insert("TMPDIR".to_owned(), state_dir);
    let cwd = confinement.state_dir.clone();
    let prepared = began.elapsed();
    let forked = zygote
        .fork(
            ForkRequest {
                env: &env,
                cwd: &cwd,
                credentials,
                confinement: &confinement,
            },
            deadline,
        )
        .await?;
    // The plan's descriptors went to the child; the pool keeps the cgroup, for limits,
    // OOM reports and removal.
    confinement.plan = None;
    let reported = began.elapsed();
    let session = McpSession::connect_forked(
        forked,
        confinement,
        start.startup_timeout,
        deadline,
        start.registry,
    )
    .await
    .map_err(|err| PreforkError::Fork(format!("the forked server did not start: {err}")))?;
    // Where a forked start spends its time, for `RUST_LOG=mcp_pool::mcp::prefork=debug`.
    debug!(
        pid = session.pid(),
        prepare_ms = prepared.as_secs_f64() * 1e3,
        fork_ms = (reported - prepared).as_secs_f64() * 1e3,
        handshake_ms = (began.elapsed() - reported).as_secs_f64() * 1e3,
        "forked session ready"
    );
    Ok(session)
}

/// When a crashed zygote may start again, with the pool's numbers for sessions.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// First delay after a crash; doubled per crash in the window.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Crashes allowed within `window` before the zygote cools down.
    pub max_restarts: u32,
    pub window: Duration,
    /// How long a zygote that crashed too often stays down (sessions spawn meanwhile).
    pub cooldown: Duration,
}

/// The zygotes of one service, one per server with `prefork` on.
pub struct Prefork {
    zygotes: BTreeMap<String, Arc<Zygote>>,
}

impl std::fmt::Debug for Prefork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefork")
            .field("servers", &self.zygotes.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Prefork {
    /// One zygote (not yet started) per server with `prefork` on. A server whose entry point
    /// cannot be read gets a zygote that stays disabled, so its sessions spawn and stats say
    /// why.
    pub fn from_config(
        config: &Config,
        sandbox: Arc<Sandbox>,
        registry: Option<ProcessRegistry>,
    ) -> Arc<Prefork> {
        let restart = RestartPolicy {
            backoff_base: config.pool.restart_backoff_base,
            backoff_cap: config.pool.restart_backoff_cap,
            max_restarts: config.pool.max_restarts,
            window: config.pool.restart_window,
            cooldown: config.pool.failed_cooldown,
        };
        let zygotes = config
            .servers
            .iter()
            .filter_map(|(name, server)| {
                let prefork = server.prefork.enabled()?;
                let launch = zygote_launch(name, server, &prefork);
                let zygote = Zygote::new(
                    name.clone(),
                    launch,
                    ZygoteSettings {
                        policy: server.sandbox_policy(&config.sandbox),
                        sandbox: sandbox.clone(),
                        registry: registry.clone(),
                        restart,
                        startup_timeout: config.pool.startup_timeout,
                    },
                );
                Some((name.clone(), Arc::new(zygote)))
            })
            .collect();
        Arc::new(Prefork { zygotes })
    }

    /// A registry without zygotes (tests, benchmarks of the spawn path).
    pub fn none() -> Arc<Prefork> {
        Arc::new(Prefork {
            zygotes: BTreeMap::new(),
        })
    }

    /// The zygote of `server`, when it is preforked.
    pub fn zygote(&self, server: &str) -> Option<Arc<Zygote>> {
        self.zygotes.get(server).cloned()
    }

    /// Starts every zygote and its supervisor in the background, so the first session finds
    /// it ready and a crashed one comes back under the restart policy.
    pub fn start_all(&self) {
        for zygote in self.zygotes.values() {
            tokio::spawn(zygote.clone().supervise());
        }
    }

    /// Stops every zygote (and with it any session it forked that is still running).
    pub async fn shutdown(&self, grace: Duration) {
        for zygote in self.zygotes.values() {
            zygote.stop(grace).await;
        }
    }

    /// One line per zygote, by server.
    pub fn stats(&self) -> Vec<ZygoteStats> {
        self.zygotes.values().map(|zygote| zygote.stats()).collect()
    }
}

/// How a zygote is started: the entry point (or why there is none), and its environment.
#[derive(Debug, Clone)]
pub(crate) struct ZygoteLaunch {
    /// The console script (argv[0] of each child, and a path the ruleset grants).
    pub(crate) program: Result<PathBuf, String>,
    pub(crate) entry: Result<EntryPoint, String>,
    /// The allowlist only: `PATH`, locale, time zone, `env_passthrough`, the server's `env`.
    pub(crate) env: BTreeMap<String, String>,
}

impl ZygoteLaunch {
    /// The command line of the zygote: `PYTHON -c LAUNCHER MODULE FUNCTION SCRIPT`.
    pub(crate) fn server_launch(&self, home: &Path) -> Result<ServerLaunch, String> {
        let entry = self.entry.as_ref().map_err(Clone::clone)?;
        let program = self.program.as_ref().map_err(Clone::clone)?;
        let mut env = self.env.clone();
        let home = home.to_string_lossy().into_owned();
        env.insert("HOME".to_owned(), home.clone());
        env.insert("TMPDIR".to_owned(), home);
        Ok(ServerLaunch {
            command: entry.python.to_string_lossy().into_owned(),
            args: vec![
                "-c".to_owned(),
                LAUNCHER.to_owned(),
                entry.module.clone(),
                entry.function.clone(),
                program.to_string_lossy().into_owned(),
            ],
            env,
            cwd: None,
        })
    }
}

fn zygote_launch(name: &str, server: &ServerConfig, prefork: &PreforkConfig) -> ZygoteLaunch {
    let mut env = base_environment(&server.env_passthrough);
    env.extend(server.env.clone());
    let program = server
        .resolve_program_in(env.get("PATH").map(std::ffi::OsStr::new))
        .map_err(|err| format!("server {name}: {err}"));
    let entry = program
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|program| entry_point(program, prefork));
    ZygoteLaunch {
        program,
        entry,
        env,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIP_SCRIPT: &str = "#!/srv/venv/bin/python\n# -*- coding: utf-8 -*-\nimport re\n\
        import sys\nfrom analytics_mcp.server import run_server\nif __name__ == '__main__':\n    \
        sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n    \
        sys.exit(run_server())\n";

    #[test]
    fn a_pip_console_script_names_module_function_and_interpreter() {
        assert_eq!(
            console_script_entry(PIP_SCRIPT),
            Some(("analytics_mcp.server".into(), "run_server".into()))
        );
        assert_eq!(
            shebang_python(PIP_SCRIPT),
            Some(PathBuf::from("/srv/venv/bin/python"))
        );
    }

    #[test]
    fn scripts_of_another_shape_name_nothing() {
        // Imported but never the exit call: a wrapper doing more than the entry point.
        assert_eq!(
            console_script_entry("from a import main\nmain(extra=True)\n"),
            None
        );
        // Not a Python name: never handed to importlib.
        assert_eq!(
            console_script_entry("from os; import system\nsys.exit(system())\n"),
            None
        );
        assert_eq!(shebang_python("#!/usr/bin/node\n"), None);
        assert_eq!(shebang_python("no shebang\n"), None);
    }

    #[test]
    fn config_overrides_the_script() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("srv");
        std::fs::write(&script, PIP_SCRIPT).unwrap();
        let entry = entry_point(
            &script,
            &PreforkConfig {
                module: Some("other.mod".into()),
                function: None,
                python: Some("/opt/python3".into()),
            },
        )
        .unwrap();
        assert_eq!(entry.module, "other.mod");
        assert_eq!(entry.function, "run_server");
        assert_eq!(entry.python, PathBuf::from("/opt/python3"));
        std::fs::write(&script, "#!/bin/sh\nexec foo\n").unwrap();
        let err = entry_point(&script, &PreforkConfig::default()).unwrap_err();
        assert!(err.contains("prefork.python"), "{err}");
    }
}
