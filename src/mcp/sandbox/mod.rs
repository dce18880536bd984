//! Confinement of MCP server processes: each session's server reaches nothing of other users or
//! of the service (README, "Security model").
//!
//! # Layout
//! - this file: the policy types, the one-time probe of what the kernel offers
//!   ([`Sandbox::new`]), and [`Sandbox::prepare`], which turns a server's policy into the
//!   [`Confinement`] of one session (state directory, cgroup, Landlock ruleset).
//! - [`landlock`](self::landlock): which paths a server may read, execute and write.
//! - [`cgroup`]: one cgroup per session for memory, process and CPU limits (v1 and v2).
//! - [`child`]: the async-signal-safe code between fork and exec: cgroup join, PID and mount
//!   namespace behind a minimal init, capability drop, `no_new_privs`, Landlock.

mod cgroup;
mod child;
mod landlock;

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;
use tracing::{info, warn};

pub(crate) use child::{ChildPlan, confine_child};

use self::{
    cgroup::Cgroups,
    landlock::{Grants, SystemRules},
};
pub(crate) use cgroup::SessionCgroup;

/// How strictly a server is confined (`sandbox.mode`, per server `servers.<name>.sandbox.mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxMode {
    /// Everything, or the server does not start (the error names what the kernel lacks).
    #[default]
    Enforce,
    /// Whatever the kernel offers; a warning at each start names what is missing.
    BestEffort,
    /// No confinement (the clean environment and private state directory remain). For
    /// servers the operator trusts; logged at start-up.
    Off,
}

/// Resource limits of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Memory (bytes) before the kernel OOM-kills the server.
    pub memory_max: Option<u64>,
    /// Processes and threads.
    pub pids_max: Option<u64>,
    /// Open files (`RLIMIT_NOFILE`).
    pub nofile: Option<u64>,
    /// CPU weight, 1..=10000 (100 is an ordinary share).
    pub cpu_weight: u32,
    /// CPU weight of a session started as a restart after a crash, until it is ready.
    pub backoff_cpu_weight: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_max: Some(1024 * 1024 * 1024),
            pids_max: Some(512),
            nofile: Some(1024),
            cpu_weight: 100,
            backoff_cpu_weight: 10,
        }
    }
}

/// The service-wide facts a sandbox needs, from config.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    /// Root of the private state directories, `<state_dir>/<user>/<server>`.
    pub state_dir: PathBuf,
    /// Where the cgroup hierarchies are mounted, normally `/sys/fs/cgroup`.
    pub cgroup_root: PathBuf,
    /// Extra read-only paths for every server.
    pub read: Vec<PathBuf>,
    /// Paths no server may reach whatever else is allowed: the data directory (database,
    /// keys, process records), the credentials directory, the config file, the service's
    /// working directory, the state root. Paths inside an allowed directory are cut out of it.
    pub protected: Vec<PathBuf>,
    /// Names this instance's cgroups (`mcp-pool-<hash>`), so instances on one host never
    /// sweep each other's.
    pub instance: String,
}

/// One server's confinement, from `[sandbox]` and `[servers.<name>.sandbox]`.
#[derive(Debug, Clone, Default)]
pub struct ServerPolicy {
    pub mode: SandboxMode,
    /// Extra paths it may read and execute.
    pub read: Vec<PathBuf>,
    /// Extra paths it may read and write.
    pub write: Vec<PathBuf>,
    pub limits: Limits,
}

/// Why a session could not be confined.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// `enforce` mode and the kernel (or the service's privileges) lack something.
    #[error("sandbox unavailable: {0}")]
    Unavailable(String),
    /// Preparing the session's state directory, cgroup or ruleset failed.
    #[error("sandbox set-up failed: {0}")]
    Setup(String),
}

/// How confined a session is, as shown in stats and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxStatus {
    /// Landlock, scoping, namespaces and limits all in force.
    Enforced,
    /// `best_effort` with something missing (named).
    Partial(String),
    /// `mode = "off"`.
    Off,
    /// A remote server (Streamable HTTP): no process of ours to confine.
    Remote,
}

impl SandboxStatus {
    /// `enforced`, `partial`, `off` or `remote`: the label in stats and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SandboxStatus::Enforced => "enforced",
            SandboxStatus::Partial(_) => "partial",
            SandboxStatus::Off => "off",
            SandboxStatus::Remote => "remote",
        }
    }
}

impl fmt::Display for SandboxStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SandboxStatus::Partial(missing) => write!(f, "partial (missing: {missing})"),
            other => f.write_str(other.label()),
        }
    }
}

/// The Landlock ABI needed for everything `enforce` promises: filesystem rules with
/// truncate/ioctl rights, and signal plus abstract-unix-socket scoping (ABI 6).
pub const REQUIRED_LANDLOCK_ABI: i32 = 6;

/// What this kernel and these privileges offer, probed once.
struct Support {
    /// 0 when Landlock is unavailable.
    landlock_abi: i32,
    /// Why PID and mount namespaces cannot be used, if they cannot.
    namespaces: Option<String>,
    /// The cgroups, or why there are none.
    cgroups: Result<Cgroups, String>,
}

impl Support {
    fn probe(settings: &SandboxSettings) -> Support {
        // SAFETY-free wrappers: both probes live in `child`, next to the code they predict.
        Support {
            landlock_abi: child::landlock_abi(),
            namespaces: child::probe_namespaces()
                .err()
                .map(|err| format!("PID and mount namespaces ({err}; needs CAP_SYS_ADMIN)")),
            cgroups: Cgroups::open(&settings.cgroup_root, &settings.instance),
        }
    }

    /// What is missing for full confinement, in words; empty when nothing is.
    fn missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        if self.landlock_abi < REQUIRED_LANDLOCK_ABI {
            missing.push(if self.landlock_abi == 0 {
                "Landlock (kernel without CONFIG_SECURITY_LANDLOCK, or not in lsm=)".to_owned()
            } else {
                format!(
                    "Landlock ABI {REQUIRED_LANDLOCK_ABI} for signal and abstract-socket scoping \
                     (kernel has ABI {})",
                    self.landlock_abi
                )
            });
        }
        if let Some(why) = &self.namespaces {
            missing.push(why.clone());
        }
        if let Err(why) = &self.cgroups {
            missing.push(format!("resource limits: {why}"));
        }
        missing
    }
}

/// The sandbox of one service instance: probed support, cgroups, and the cached system rules.
pub struct Sandbox {
    settings: SandboxSettings,
    support: Support,
    system: SystemRules,
}

impl fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sandbox")
            .field("state_dir", &self.settings.state_dir)
            .field("landlock_abi", &self.support.landlock_abi)
            .field("missing", &self.support.missing())
            .finish()
    }
}

impl Sandbox {
    /// Probes the kernel, sets up this instance's cgroups, kills and removes session cgroups a
    /// previous run left behind, and logs what is unavailable.
    pub fn new(mut settings: SandboxSettings) -> Arc<Sandbox> {
        settings.state_dir = absolute(&settings.state_dir);
        settings.protected = settings
            .protected
            .iter()
            .chain([&settings.state_dir])
            .map(|path| absolute(path))
            .collect();
        let support = Support::probe(&settings);
        if let Ok(cgroups) = &support.cgroups {
            let swept = cgroups.sweep_leftovers();
            if swept > 0 {
                warn!(
                    count = swept,
                    "Removed session cgroups left by a previous run"
                );
            }
        }
        let missing = support.missing();
        if missing.is_empty() {
            info!(
                landlock_abi = support.landlock_abi,
                "Sandbox: Landlock, PID namespaces and cgroup limits available"
            );
        } else {
            warn!(
                missing = %missing.join("; "),
                "Sandbox: not everything is available; servers in enforce mode will refuse to start"
            );
        }
        if let Ok(cgroups) = &support.cgroups
            && !cgroups.has_cpu()
        {
            warn!("Sandbox: no cgroup cpu controller; sessions run without CPU weights");
        }
        let system = SystemRules::new(&settings);
        Arc::new(Sandbox {
            settings,
            support,
            system,
        })
    }

    /// What full confinement lacks on this host; empty when nothing.
    pub fn missing(&self) -> Vec<String> {
        self.support.missing()
    }

    /// Removes this instance's (empty) parent cgroups; at shutdown.
    pub fn shutdown(&self) {
        if let Ok(cgroups) = &self.support.cgroups {
            cgroups.remove_parents();
        }
    }

    /// The private state directory of (user, server): its HOME and TMPDIR.
    pub fn state_dir(&self, user: &str, server: &str) -> PathBuf {
        self.settings.state_dir.join(user).join(server)
    }

    /// Prepares one session: creates its state directory (0700), its cgroup and its Landlock
    /// ruleset. `program` is the resolved command; `credentials_dir` the directory holding
    /// only this session's credentials file; `restarting` starts it at the backoff CPU weight.
    pub fn prepare(
        &self,
        policy: &ServerPolicy,
        session: SessionPaths<'_>,
        restarting: bool,
    ) -> Result<Confinement, SandboxError> {
        self.prepare_as(policy, session, restarting, Start::Spawn)
    }

    /// Prepares one session forked from its server's zygote (see [`crate::mcp::prefork`]).
    /// The child joins the cgroup and restricts itself with the ruleset itself; the ruleset
    /// grants no `/proc` at all (a forked child never execs, so no runtime start needs it, and
    /// the zygote's namespace holds the other users' sessions) and not the credentials
    /// directory (the credentials arrive as a sealed memfd).
    pub fn prepare_forked(
        &self,
        policy: &ServerPolicy,
        session: SessionPaths<'_>,
        restarting: bool,
    ) -> Result<Confinement, SandboxError> {
        self.prepare_as(policy, session, restarting, Start::Fork)
    }

    /// Prepares the zygote of `server`: its own cgroup, PID and mount namespace, and a ruleset
    /// that covers what any of its children may need (Landlock domains only narrow across a
    /// fork): the program, the system, and the state root read-write, since sessions' state
    /// directories are created after the zygote starts. Nothing of the data or credentials
    /// directories. Its HOME is `<state_dir>/.prefork/<server>` (no user id starts with a dot).
    pub fn prepare_zygote(
        &self,
        policy: &ServerPolicy,
        server: &str,
        program: &Path,
        args: &[String],
    ) -> Result<Confinement, SandboxError> {
        let session = SessionPaths {
            user: ".prefork",
            server,
            program,
            args,
            credentials_dir: Path::new(""),
        };
        self.prepare_as(policy, session, false, Start::Zygote)
    }

    fn prepare_as(
        &self,
        policy: &ServerPolicy,
        session: SessionPaths<'_>,
        restarting: bool,
        start: Start,
    ) -> Result<Confinement, SandboxError> {
        let state_dir = self.state_dir(session.user, session.server);
        create_state_dir(&state_dir).map_err(|err| {
            SandboxError::Setup(format!(
                "cannot create state directory {}: {err}",
                state_dir.display()
            ))
        })?;
        if policy.mode == SandboxMode::Off {
            return Ok(Confinement {
                plan: None,
                cgroup: None,
                status: SandboxStatus::Off,
                state_dir,
                ready_cpu_weight: None,
            });
        }
        let missing = self.support.missing();
        if policy.mode == SandboxMode::Enforce && !missing.is_empty() {
            return Err(SandboxError::Unavailable(missing.join("; ")));
        }
        if !missing.is_empty() {
            warn!(
                missing = %missing.join("; "),
                "Starting an MCP server with partial confinement (sandbox.mode = best_effort)"
            );
        }
        // A forked child lives in its zygote's namespace; it cannot make one of its own.
        let namespaces = self.support.namespaces.is_none() && start != Start::Fork;
        let cgroup = match &self.support.cgroups {
            Ok(cgroups) => {
                let weight = if restarting {
                    policy.limits.backoff_cpu_weight
                } else {
                    policy.limits.cpu_weight
                };
                Some(Arc::new(cgroups.create(&policy.limits, weight).map_err(
                    |err| SandboxError::Setup(format!("cannot create the session cgroup: {err}")),
                )?))
            }
            Err(_) => None,
        };
        let landlock = if self.support.landlock_abi > 0 {
            Some(
                self.system
                    .ruleset(
                        &self.settings,
                        policy,
                        &session,
                        match start {
                            Start::Zygote => &self.settings.state_dir,
                            Start::Spawn | Start::Fork => &state_dir,
                        },
                        self.support.landlock_abi,
                        Grants {
                            host_proc: match start {
                                Start::Spawn | Start::Zygote => !namespaces,
                                Start::Fork => false,
                            },
                            credentials: start == Start::Spawn,
                        },
                    )
                    .map_err(SandboxError::Setup)?,
            )
        } else {
            None
        };
        let cgroup_procs = match &cgroup {
            Some(cgroup) => cgroup.procs_files().map_err(|err| {
                SandboxError::Setup(format!("cannot open the session cgroup: {err}"))
            })?,
            None => Vec::new(),
        };
        let plan = ChildPlan {
            cgroup_procs,
            namespaces,
            nofile: policy.limits.nofile,
            drop_capabilities: true,
            proc_rule: namespaces && landlock.is_some(),
            landlock,
        };
        Ok(Confinement {
            plan: Some(plan),
            cgroup,
            status: if missing.is_empty() {
                SandboxStatus::Enforced
            } else {
                SandboxStatus::Partial(missing.join("; "))
            },
            state_dir,
            ready_cpu_weight: restarting.then_some(policy.limits.cpu_weight),
        })
    }
}

/// How a process is started, which decides what its confinement holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// A session spawned as its own program.
    Spawn,
    /// A session forked from its server's zygote.
    Fork,
    /// A server's zygote.
    Zygote,
}

/// The paths of one session that its ruleset is built from.
#[derive(Debug, Clone, Copy)]
pub struct SessionPaths<'a> {
    pub user: &'a str,
    pub server: &'a str,
    /// The resolved program.
    pub program: &'a Path,
    /// Its arguments (paths among them are granted read access, with their venv or
    /// node_modules).
    pub args: &'a [String],
    /// The directory holding only this session's credentials file.
    pub credentials_dir: &'a Path,
}

/// One session's confinement, prepared before the spawn.
pub struct Confinement {
    /// What the child does before exec; `None` when the mode is `off`.
    pub(crate) plan: Option<ChildPlan>,
    /// The session's cgroup, for OOM reports, CPU weight and removal.
    pub(crate) cgroup: Option<Arc<SessionCgroup>>,
    /// How confined the session is.
    pub status: SandboxStatus,
    /// Its private state directory (HOME, TMPDIR, working directory).
    pub state_dir: PathBuf,
    /// The CPU weight to restore once the session is ready, when it started as a restart at
    /// the backoff weight.
    pub(crate) ready_cpu_weight: Option<u32>,
}

impl fmt::Debug for Confinement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Confinement")
            .field("status", &self.status)
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

/// Creates a state directory and its missing parents with mode 0700 (exactly: not filtered
/// by the umask).
fn create_state_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// `path` made absolute against the working directory (and canonical when it exists), so that
/// prefix comparisons between protected and allowed paths mean what they say.
fn absolute(path: &Path) -> PathBuf {
    if let Ok(canonical) = path.canonicalize() {
        return canonical;
    }
    if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()
            .map(|cwd| cwd.join(path))
            .unwrap_or_else(|_| path.to_owned())
    }
}

/// Looks `command` up the way `execvp` would with `path_var`; a command with a slash is taken
/// as it is. (Server commands are resolved with their config, `ServerConfig::resolve_program`;
/// this one serves `#!/usr/bin/env NAME` lines, below the config layer.)
pub(crate) fn resolve_program(command: &str, path_var: Option<&str>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let is_executable = |path: &Path| {
        path.metadata()
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    };
    if command.contains('/') {
        let path = PathBuf::from(command);
        return is_executable(&path).then_some(path);
    }
    path_var
        .unwrap_or("/usr/local/bin:/usr/bin:/bin")
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(command))
        .find(|candidate| is_executable(candidate))
}
