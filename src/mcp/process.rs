//! Child-process hygiene for MCP servers.
//!
//! Every server runs as the leader of its own process group, so that the wrappers people
//! configure (`npx`, `uvx`, `pipx run`) can be stopped together with whatever they start.
//! Three layers make sure nothing outlives the service:
//! 1. [`terminate_group`] on every normal close (SIGTERM the group, wait, SIGKILL);
//! 2. `PR_SET_PDEATHSIG(SIGKILL)` on the leader, for when the service itself is killed;
//! 3. [`ProcessRegistry`], a record on disk of live groups, reaped at the next start
//!    ([`ProcessRegistry::reap_leftovers`]) for the grandchildren that PDEATHSIG does not reach.

use std::{
    collections::BTreeMap,
    fmt, fs,
    io::{self, Write as _},
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Mutex, mpsc},
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};
use process_wrap::tokio::{CommandWrap, ProcessGroup};
use rmcp::transport::TokioChildProcess;
use tokio::{process::ChildStderr, sync::oneshot};
use tracing::{debug, warn};

use super::McpError;
use super::sandbox::{ChildPlan, confine_child};

/// How often [`terminate_group`] looks whether the group is gone.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Variables with this prefix belong to the service and never reach an MCP server, unless a
/// launch sets one explicitly.
pub const SERVICE_ENV_PREFIX: &str = "MCP_POOL_";

/// What a server inherits of the service's environment: where programs are, and the locale and
/// time zone, plus the variables its config names in `env_passthrough` (never `MCP_POOL_*`).
pub fn base_environment(passthrough: &[String]) -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(name, _)| {
            matches!(name.as_str(), "PATH" | "LANG" | "LANGUAGE" | "TZ")
                || name.starts_with("LC_")
                || passthrough.iter().any(|wanted| wanted == name)
        })
        .filter(|(name, _)| !name.starts_with(SERVICE_ENV_PREFIX))
        .collect()
}

// === ServerLaunch ===

/// How to start one MCP server over stdio.
///
/// The child starts from an empty environment: `env` is all it gets (see [`base_environment`]
/// for what a server normally inherits).
#[derive(Clone, Default)]
pub struct ServerLaunch {
    /// The program to run, looked up in `PATH` when it has no slash.
    pub command: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// The whole environment; values may be tokens, so `Debug` prints only the keys.
    pub env: BTreeMap<String, String>,
    /// Working directory; the service's own when `None`.
    pub cwd: Option<PathBuf>,
}

impl fmt::Debug for ServerLaunch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerLaunch")
            .field("command", &self.command)
            .field("args", &self.args)
            .field("env_keys", &self.env.keys().collect::<Vec<_>>())
            .field("cwd", &self.cwd)
            .finish()
    }
}

/// A freshly spawned server: the rmcp transport that owns the child, and its stderr.
pub(crate) struct SpawnedServer {
    /// Owns the child; rmcp reaps it when the transport is closed.
    pub(crate) transport: TokioChildProcess,
    /// The child's stderr pipe, to be forwarded to tracing.
    pub(crate) stderr: Option<ChildStderr>,
    /// The leader's pid, which is also the process group id.
    pub(crate) pgid: u32,
    /// The leader's start time, to tell it from a later process that reuses its pid.
    pub(crate) start_time: Option<u64>,
}

// === the spawner thread ===
//
// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process.
// tokio's blocking-pool threads exit after 10 s idle and a runtime's workers end with the
// runtime, so forking from either would kill healthy servers at random. All forks therefore
// happen on one dedicated thread that is never asked to stop: its request channel's sender lives
// in a static, so the thread ends only with the process, which is exactly when the children
// should die. The thread does nothing but fork, so a slow spawn never blocks an executor.

/// One job for the spawner thread: it gets the service's pid, to check after each fork.
type SpawnJob = Box<dyn FnOnce(Pid) + Send>;

static SPAWNER: Mutex<Option<mpsc::Sender<SpawnJob>>> = Mutex::new(None);

fn spawner() -> io::Result<mpsc::Sender<SpawnJob>> {
    // A poisoned lock only means another thread panicked while holding a `Sender`, which is
    // still valid, so recover it instead of failing every later spawn.
    let mut slot = SPAWNER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(sender) = slot.as_ref() {
        return Ok(sender.clone());
    }
    let (sender, receiver) = mpsc::channel::<SpawnJob>();
    std::thread::Builder::new()
        .name("mcp-spawner".to_owned())
        .spawn(move || {
            let parent = nix::unistd::getpid();
            for job in receiver {
                job(parent);
            }
        })?;
    *slot = Some(sender.clone());
    Ok(sender)
}

/// Runs `fork` on the spawner thread, inside the caller's runtime (tokio registers a child's
/// pipes and SIGCHLD handling with the runtime current during the spawn).
async fn on_spawner_thread<T: Send + 'static>(
    fork: impl FnOnce(Pid) -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
    let (reply, result) = oneshot::channel();
    let job: SpawnJob = Box::new(move |parent| {
        let _runtime = runtime.enter();
        // A panic here would end the thread and, through the death signal, every server it
        // ever started; process-wrap has `expect`s on its spawn path.
        let spawned = std::panic::catch_unwind(AssertUnwindSafe(|| fork(parent)))
            .unwrap_or_else(|_| Err(io::Error::other("panic while spawning")));
        // The caller may have given up (its future was dropped); dropping the result then
        // drops the child's handle, whose cleanup kills it.
        let _ = reply.send(spawned);
    });
    spawner()?
        .send(job)
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    result
        .await
        .map_err(|_| io::Error::other("the spawner thread dropped the request"))?
}

/// Spawns `launch` as the leader of a new process group, from the spawner thread, confined by
/// `plan` when there is one.
pub(crate) async fn spawn_server(
    launch: &ServerLaunch,
    plan: Option<ChildPlan>,
) -> Result<SpawnedServer, McpError> {
    let owned = launch.clone();
    on_spawner_thread(move |parent| spawn_here(&owned, plan, parent))
        .await
        .map_err(|source| McpError::Spawn {
            command: launch.command.clone(),
            source,
        })
}

/// Spawns a helper process that talks over `stdin` (a socket) rather than MCP: a prefork
/// zygote. Like a server it leads its own process group, dies with the service, and is
/// confined by `plan`; its stdout goes to /dev/null and its stderr is piped.
pub(crate) async fn spawn_helper(
    launch: &ServerLaunch,
    stdin: std::os::fd::OwnedFd,
    plan: Option<ChildPlan>,
) -> io::Result<tokio::process::Child> {
    let launch = launch.clone();
    on_spawner_thread(move |parent| {
        let mut command = tokio::process::Command::new(&launch.command);
        command
            .env_clear()
            .args(&launch.args)
            .envs(&launch.env)
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(cwd) = &launch.cwd {
            command.current_dir(cwd);
        }
        prepare_child(&mut command, parent, plan);
        command.spawn()
    })
    .await
}

/// Runs on the spawner thread: builds the command and forks.
fn spawn_here(
    launch: &ServerLaunch,
    plan: Option<ChildPlan>,
    parent: Pid,
) -> io::Result<SpawnedServer> {
    let mut command = tokio::process::Command::new(&launch.command);
    command.env_clear().args(&launch.args).envs(&launch.env);
    if let Some(cwd) = &launch.cwd {
        command.current_dir(cwd);
    }
    prepare_child(&mut command, parent, plan);
    let mut wrap = CommandWrap::from(command);
    wrap.wrap(ProcessGroup::leader());
    let (transport, stderr) = TokioChildProcess::builder(wrap)
        .stderr(Stdio::piped())
        .spawn()?;
    let pgid = transport
        .id()
        .ok_or_else(|| io::Error::other("the child was reaped before its pid was read"))?;
    Ok(SpawnedServer {
        transport,
        stderr,
        pgid,
        start_time: process_start_time(pgid),
    })
}

/// Makes the child get SIGKILL when the spawner thread (that is, the service) dies, then
/// confines it with `plan` (see `sandbox::child`).
///
/// `pre_exec` is unsafe because the closure runs in the forked child, where only
/// async-signal-safe calls are allowed: `prctl`, `getppid` and `_exit` are, the confinement is
/// written for it, and the closure neither allocates nor takes locks (turning an `Errno` into
/// an `io::Error` stores the raw code only).
#[allow(unsafe_code)]
fn prepare_child(command: &mut tokio::process::Command, parent: Pid, plan: Option<ChildPlan>) {
    // SAFETY: see above; `parent` is a plain integer and `plan` was built before the fork.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // If the service died between fork and prctl, the death signal was never armed
            // and the child was re-parented: leave now instead of running unsupervised.
            if nix::unistd::getppid() != parent {
                nix::libc::_exit(1);
            }
            match &plan {
                // Between fork and exec, as `confine_child` requires.
                Some(plan) => confine_child(plan),
                None => Ok(()),
            }
        });
    }
}

// === /proc ===

/// The fields of `/proc/<pid>/stat` this module needs.
#[derive(Debug, Clone, Copy)]
struct ProcStat {
    /// One-letter state; `Z` is a zombie, `X` dead.
    state: char,
    /// Process group id.
    pgrp: i32,
    /// Session id.
    session: i32,
    /// Start time in clock ticks after boot (field 22): with the pid, it names a process
    /// uniquely, since pids are recycled but start times are not repeated for the same pid.
    start_time: u64,
}

impl ProcStat {
    fn is_live(&self) -> bool {
        !matches!(self.state, 'Z' | 'X')
    }
}

fn read_stat(pid: i32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may itself hold spaces or `)`.
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 of the man page.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// The start time of `pid` (field 22 of `/proc/<pid>/stat`), or `None` when it does not exist.
pub fn process_start_time(pid: u32) -> Option<u64> {
    read_stat(i32::try_from(pid).ok()?).map(|stat| stat.start_time)
}

/// Every process currently in group `pgid`, zombies included.
fn group_members(pgid: i32) -> Vec<(i32, ProcStat)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, read_stat(pid)?)))
        .filter(|(_, stat)| stat.pgrp == pgid)
        .collect()
}

/// Whether any process of the group is still running. Zombies do not count: they are dead,
/// and waiting for their parent (rmcp for the leader, init for orphans) to reap them.
fn group_is_running(pgid: i32) -> bool {
    match kill(Pid::from_raw(-pgid), None) {
        Err(Errno::ESRCH) => false,
        _ => group_members(pgid).iter().any(|(_, stat)| stat.is_live()),
    }
}

// === terminate_group ===

/// Refuses the pgids whose signalling would hit the service itself or everything.
fn signallable(pgid: i32) -> bool {
    pgid > 1 && Pid::from_raw(pgid) != nix::unistd::getpgrp()
}

/// Stops every process of group `pgid`: SIGTERM, up to `grace` for them to exit, then SIGKILL.
///
/// Safe on a group that is already gone. A pgid cannot be handed to a new group while any
/// member of the old one lives, so signalling a group we started is safe until it is empty.
pub async fn terminate_group(pgid: i32, grace: Duration) {
    if !signallable(pgid) {
        warn!(pgid, "refusing to signal this process group");
        return;
    }
    let group = Pid::from_raw(pgid);
    match killpg(group, Signal::SIGTERM) {
        Err(Errno::ESRCH) => return,
        Err(err) => warn!(pgid, cause = %err, "SIGTERM to process group failed"),
        Ok(()) => {}
    }
    let deadline = tokio::time::Instant::now() + grace;
    while group_is_running(pgid) {
        if tokio::time::Instant::now() >= deadline {
            debug!(
                pgid,
                ?grace,
                "process group outlived SIGTERM, sending SIGKILL"
            );
            kill_group_now(pgid);
            return;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A pid as a process group id; pids never exceed `pid_max` (at most 2^22), so this is exact.
pub(crate) fn as_pgid(pid: u32) -> i32 {
    i32::try_from(pid).unwrap_or(i32::MAX)
}

/// Sends SIGKILL to group `pgid` without waiting; a gone group is not an error.
pub(crate) fn kill_group_now(pgid: i32) {
    if !signallable(pgid) {
        warn!(pgid, "refusing to signal this process group");
        return;
    }
    match killpg(Pid::from_raw(pgid), Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(err) => warn!(pgid, cause = %err, "SIGKILL to process group failed"),
    }
}

/// Waits, up to `limit`, until no process of group `pgid` is running.
pub(crate) async fn wait_group_gone(pgid: i32, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while group_is_running(pgid) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    true
}

/// Waits, up to `limit`, until the process `pid` that started at `start_time` has been reaped
/// (its `/proc` entry is gone, or the pid now names another process).
pub(crate) async fn wait_reaped(pid: u32, start_time: Option<u64>, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while start_time.is_some() && process_start_time(pid) == start_time {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    true
}

// === ProcessRegistry ===

/// A directory with one file per live process group, so that a restarted service can kill
/// the groups its previous incarnation left behind.
///
/// Each file is named after the pgid and holds one line, `<pid> <start_time> <session>`: the
/// leader's pid (= pgid), its start time (field 22 of `/proc/<pid>/stat`) and the session it
/// was started in. Files are written to a temporary name and renamed, so a crash never leaves
/// a half-written record.
#[derive(Debug, Clone)]
pub struct ProcessRegistry {
    /// Where the records live, e.g. `<data_dir>/pgids`.
    dir: PathBuf,
}

/// One parsed record.
#[derive(Debug, Clone, Copy)]
struct Record {
    pid: i32,
    start_time: u64,
    session: i32,
}

impl ProcessRegistry {
    /// Opens (creating it if needed) the registry directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, McpError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| McpError::Registry {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    /// The directory holding the records.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn record_path(&self, pid: u32) -> PathBuf {
        self.dir.join(pid.to_string())
    }

    /// Records the live group led by `pid`.
    pub fn register(&self, pid: u32) -> Result<(), McpError> {
        let path = self.record_path(pid);
        let io_error = |source| McpError::Registry {
            path: path.clone(),
            source,
        };
        let raw = i32::try_from(pid).map_err(|_| io_error(io::Error::other("pid out of range")))?;
        let stat = read_stat(raw)
            .ok_or_else(|| io_error(io::Error::other("the process is already gone")))?;
        let tmp = self.dir.join(format!(".{pid}.tmp"));
        let write = || -> io::Result<()> {
            let mut file = fs::File::create(&tmp)?;
            writeln!(file, "{pid} {} {}", stat.start_time, stat.session)?;
            fs::rename(&tmp, &path)
        };
        write().map_err(io_error)
    }

    /// Forgets the group led by `pid`; forgetting an unknown group is not an error.
    pub fn unregister(&self, pid: u32) -> Result<(), McpError> {
        let path = self.record_path(pid);
        match fs::remove_file(&path) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                Err(McpError::Registry { path, source: err })
            }
            _ => Ok(()),
        }
    }

    /// Kills the groups recorded by a previous run that are provably ours, clears every
    /// record, and returns how many groups were signalled.
    ///
    /// A group is killed when its leader still runs with the recorded start time, or, when the
    /// leader is gone (PDEATHSIG killed it, its children live on), when every remaining member
    /// is in the recorded session and started after the leader: a recycled pid that now leads
    /// an unrelated group fails one of those tests.
    pub fn reap_leftovers(&self) -> usize {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            warn!(dir = %self.dir.display(), "cannot read the process registry");
            return 0;
        };
        let mut killed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let record = fs::read_to_string(&path)
                .ok()
                .and_then(|text| parse_record(&text));
            if let Some(record) = record
                && is_ours(record)
            {
                kill_group_now(record.pid);
                killed += 1;
                debug!(
                    pgid = record.pid,
                    "killed a process group left by a previous run"
                );
            }
            if let Err(err) = fs::remove_file(&path) {
                warn!(path = %path.display(), cause = %err, "cannot remove a registry record");
            }
        }
        killed
    }
}

fn parse_record(text: &str) -> Option<Record> {
    let mut fields = text.split_whitespace();
    Some(Record {
        pid: fields.next()?.parse().ok()?,
        start_time: fields.next()?.parse().ok()?,
        session: fields.next()?.parse().ok()?,
    })
}

fn is_ours(record: Record) -> bool {
    if !signallable(record.pid) {
        return false;
    }
    match read_stat(record.pid) {
        Some(leader) => leader.start_time == record.start_time && leader.pgrp == record.pid,
        None => {
            let members: Vec<ProcStat> = group_members(record.pid)
                .into_iter()
                .map(|(_, stat)| stat)
                .filter(ProcStat::is_live)
                .collect();
            !members.is_empty()
                && members.iter().all(|member| {
                    member.session == record.session && member.start_time >= record.start_time
                })
        }
    }
}
