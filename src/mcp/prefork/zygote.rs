//! One zygote: a Python process that imported its server once and forks a confined child per
//! session on request.
//!
//! The pool talks to it over a `SOCK_SEQPACKET` socket pair (the zygote's stdin): one JSON
//! header with the session's descriptors per message, one JSON answer per message. Each child
//! reports once more, on a socket of its own request, after it confined itself: the kernel
//! attaches its pid, translated into the service's PID namespace, to that message
//! (`SO_PASSCRED`), which is how the pool learns the host pid of a process it did not fork.
//!
//! Not an actor: a fork request is a few milliseconds of socket I/O made by the session's
//! own start task, and start-ups already run outside the actors' mailboxes. The zygote's
//! supervision is the watcher task below (its end marks it down) plus the restart policy
//! applied lazily, at the next fork request, with the pool's numbers for sessions.

use std::{
    collections::{BTreeMap, VecDeque},
    io::{IoSlice, IoSliceMut, Write as _},
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{Arc, Mutex as SyncMutex},
    time::{Duration, Instant},
};

use nix::{
    fcntl::{FcntlArg, OFlag, SealFlag, fcntl},
    sys::{
        memfd::{MFdFlags, memfd_create},
        socket::{
            AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
            recvmsg, sendmsg, setsockopt, socketpair, sockopt,
        },
    },
    unistd::pipe2,
};
use serde::Serialize;
use tokio::{io::Interest, net::UnixStream, sync::watch};
use tracing::{debug, info, warn};

use super::ZygoteLaunch;
use crate::mcp::{
    ProcessRegistry, Sandbox,
    process::{as_pgid, kill_group_now, process_start_time, spawn_helper, terminate_group},
    sandbox::{Confinement, SandboxError, ServerPolicy, SessionCgroup},
};

/// Largest answer the zygote or a child sends.
const MAX_MESSAGE: usize = 64 * 1024;

/// Why a session could not be forked; the caller then spawns it the plain way.
#[derive(Debug, thiserror::Error)]
pub enum PreforkError {
    /// The zygote is not there to fork: disabled, down, backing off or cooling down.
    #[error("zygote unavailable: {0}")]
    Unavailable(String),
    /// Starting the zygote failed.
    #[error("zygote start failed: {0}")]
    Start(String),
    /// The fork request failed (the zygote is restarted at the next one).
    #[error("fork failed: {0}")]
    Fork(String),
    /// The session's confinement could not be prepared.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// What one session start asks of the zygote.
pub struct ForkRequest<'a> {
    /// The session's environment, without its credentials variable.
    pub env: &'a BTreeMap<String, String>,
    /// Its private state directory, which becomes its working directory.
    pub cwd: &'a std::path::Path,
    /// The variable naming its credentials file, and the file's contents, which the child
    /// gets as a sealed memfd (the zygote never reads it).
    pub credentials: Option<(&'a str, Vec<u8>)>,
    /// Its confinement, from [`Sandbox::prepare_forked`]; the plan's cgroup files and ruleset
    /// travel with the request.
    pub confinement: &'a Confinement,
}

/// A forked child, as the pool sees it.
pub(crate) struct ForkedServer {
    /// Its pid in the service's namespace; it leads its own process group and session.
    pub(crate) pid: u32,
    pub(crate) start_time: Option<u64>,
    /// Write end of its stdin.
    pub(crate) stdin: OwnedFd,
    /// Read end of its stdout.
    pub(crate) stdout: OwnedFd,
    /// Read end of its stderr.
    pub(crate) stderr: OwnedFd,
}

/// A zygote's state, as shown in stats.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ZygoteStats {
    pub server: String,
    /// `starting`, `ready`, `down`, `cooling_down` or `disabled`.
    pub state: &'static str,
    /// The zygote's pid (the Python process), while it runs.
    pub pid: Option<u32>,
    /// Sessions started by fork.
    pub forks: u64,
    /// Session starts that fell back to a plain spawn.
    pub fallbacks: u64,
    /// Why the last fallback happened.
    pub last_fallback: Option<String>,
    /// Zygote starts after the first.
    pub restarts: u64,
    /// Why the zygote is down or disabled.
    pub reason: Option<String>,
    /// Modules the running zygote imported after its rehearsal (what the server imports only
    /// once running, which its sessions would otherwise import after each fork).
    pub preloaded: u64,
}

/// A running zygote process.
struct Running {
    /// The pool's end of the control socket.
    control: UnixStream,
    /// The shim leading the zygote's process group (host pid).
    leader: u32,
    /// The Python process (host pid).
    pid: u32,
    /// Modules imported after the rehearsal.
    preloaded: u64,
    /// Becomes `true` when the zygote's process tree is gone.
    exited: watch::Receiver<bool>,
}

enum Phase {
    /// Not running; may start (subject to the restart policy).
    Down,
    Running(Running),
    /// Will never fork: no entry point, or threads at import. Sessions spawn.
    Disabled,
}

struct Counters {
    forks: u64,
    fallbacks: u64,
    last_fallback: Option<String>,
    restarts: u64,
    reason: Option<String>,
    pid: Option<u32>,
    state: &'static str,
    preloaded: u64,
}

/// What a zygote is started and supervised with, besides its server's name and launch.
pub(crate) struct ZygoteSettings {
    /// The server's confinement (the zygote's cgroup limits, its extra paths).
    pub(crate) policy: ServerPolicy,
    pub(crate) sandbox: Arc<Sandbox>,
    pub(crate) registry: Option<ProcessRegistry>,
    pub(crate) restart: super::RestartPolicy,
    /// How long its import may take (`pool.startup_timeout`).
    pub(crate) startup_timeout: Duration,
}

/// See the module docs.
pub struct Zygote {
    server: String,
    launch: ZygoteLaunch,
    settings: ZygoteSettings,
    /// Serializes starts and fork requests: the control socket carries one at a time.
    phase: tokio::sync::Mutex<Phase>,
    /// Crashes (and failed starts) in the restart window.
    failures: SyncMutex<VecDeque<Instant>>,
    /// Whether it ever started (later starts are restarts).
    started_once: std::sync::atomic::AtomicBool,
    /// Set by [`Zygote::stop`]: no more starts.
    stopped: std::sync::atomic::AtomicBool,
    counters: SyncMutex<Counters>,
}

impl Zygote {
    pub(crate) fn new(server: String, launch: ZygoteLaunch, settings: ZygoteSettings) -> Zygote {
        let disabled = launch.entry.as_ref().err().cloned();
        if let Some(why) = &disabled {
            warn!(server = %server, cause = %why, "Prefork disabled; sessions are spawned");
        }
        Zygote {
            server,
            phase: tokio::sync::Mutex::new(if disabled.is_some() {
                Phase::Disabled
            } else {
                Phase::Down
            }),
            launch,
            settings,
            failures: SyncMutex::new(VecDeque::new()),
            started_once: std::sync::atomic::AtomicBool::new(false),
            stopped: std::sync::atomic::AtomicBool::new(false),
            counters: SyncMutex::new(Counters {
                forks: 0,
                fallbacks: 0,
                last_fallback: None,
                restarts: 0,
                state: if disabled.is_some() {
                    "disabled"
                } else {
                    "down"
                },
                reason: disabled,
                pid: None,
                preloaded: 0,
            }),
        }
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn stats(&self) -> ZygoteStats {
        let counters = self.counters();
        ZygoteStats {
            server: self.server.clone(),
            state: counters.state,
            pid: counters.pid,
            forks: counters.forks,
            fallbacks: counters.fallbacks,
            last_fallback: counters.last_fallback.clone(),
            restarts: counters.restarts,
            reason: counters.reason.clone(),
            preloaded: counters.preloaded,
        }
    }

    /// The Python process's pid while the zygote runs.
    pub fn pid(&self) -> Option<u32> {
        self.counters().pid
    }

    /// Counts a session start that spawned instead, with the reason (logged by the caller).
    pub fn count_fallback(&self, why: &PreforkError) {
        let mut counters = self.counters();
        counters.fallbacks += 1;
        counters.last_fallback = Some(why.to_string());
    }

    /// The zygote's supervisor, for the service's lifetime: starts it, waits for its end,
    /// and starts it again when the restart policy allows, so that sessions restarted after a
    /// zygote crash (which spawn while it is down) find it back soon. Start failures are only
    /// logged: sessions fall back meanwhile.
    pub(crate) async fn supervise(self: Arc<Self>) {
        use std::sync::atomic::Ordering;
        loop {
            let exited = {
                let mut phase = self.phase.lock().await;
                if self.stopped.load(Ordering::SeqCst) || matches!(*phase, Phase::Disabled) {
                    return;
                }
                if let Err(err) = self.ensure_running(&mut phase).await {
                    debug!(server = %self.server, cause = %err, "Zygote not started");
                }
                match &*phase {
                    Phase::Running(running) => Some(running.exited.clone()),
                    Phase::Disabled => return,
                    Phase::Down => None,
                }
            };
            match exited {
                Some(mut exited) => {
                    let _ = exited.wait_for(|gone| *gone).await;
                }
                // Backing off or cooling down: look again shortly.
                None => {
                    tokio::time::sleep(
                        self.settings
                            .restart
                            .backoff_base
                            .max(Duration::from_millis(100)),
                    )
                    .await
                }
            }
        }
    }

    /// Stops the zygote: closes its control socket (it exits on EOF), then signals its group.
    pub async fn stop(&self, grace: Duration) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut phase = self.phase.lock().await;
        if let Phase::Running(running) = std::mem::replace(&mut *phase, Phase::Down) {
            let leader = running.leader;
            let mut exited = running.exited.clone();
            drop(running);
            if tokio::time::timeout(grace, exited.wait_for(|gone| *gone))
                .await
                .is_err()
            {
                terminate_group(as_pgid(leader), grace).await;
            }
        }
        let mut counters = self.counters();
        counters.state = "down";
        counters.pid = None;
    }

    /// Forks a session: starts (or restarts) the zygote when the restart policy allows, sends
    /// the request and waits for the child's report, all before `deadline`.
    pub(crate) async fn fork(
        &self,
        request: ForkRequest<'_>,
        deadline: tokio::time::Instant,
    ) -> Result<ForkedServer, PreforkError> {
        // Waiting for the zygote (one request at a time, or its import under way) counts
        // against the session's start-up time; past it the session spawns instead.
        let mut phase = tokio::time::timeout_at(deadline, self.phase.lock())
            .await
            .map_err(|_| PreforkError::Unavailable("busy until the start-up deadline".into()))?;
        self.ensure_running(&mut phase).await?;
        let Phase::Running(running) = &*phase else {
            return Err(PreforkError::Unavailable("not running".into()));
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(PreforkError::Unavailable(
                "ready only after the start-up deadline".into(),
            ));
        }
        match tokio::time::timeout_at(deadline, fork_in(running, request)).await {
            Ok(Ok(forked)) => {
                self.counters().forks += 1;
                Ok(forked)
            }
            outcome => {
                let err = match outcome {
                    Ok(Err(err)) => err,
                    _ => PreforkError::Fork("no answer from the zygote in time".into()),
                };
                // A request half-done leaves the socket out of step: start afresh.
                warn!(server = %self.server, cause = %err, "Fork failed; restarting the zygote");
                kill_group_now(as_pgid(running.leader));
                *phase = Phase::Down;
                self.record_failure(&err.to_string());
                Err(err)
            }
        }
    }

    fn record_failure(&self, why: &str) {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        failures.push_back(Instant::now());
        let mut counters = self.counters();
        counters.state = "down";
        counters.pid = None;
        counters.reason = Some(why.to_owned());
    }

    /// Makes sure the zygote runs, starting it when the restart policy allows.
    async fn ensure_running(&self, phase: &mut Phase) -> Result<(), PreforkError> {
        if let Phase::Running(running) = phase {
            if !*running.exited.borrow() {
                return Ok(());
            }
            warn!(server = %self.server, pid = running.pid, "Zygote exited");
            *phase = Phase::Down;
            self.record_failure("the zygote exited");
        }
        if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(PreforkError::Unavailable("the service is stopping".into()));
        }
        if matches!(phase, Phase::Disabled) {
            return Err(PreforkError::Unavailable(
                self.counters()
                    .reason
                    .clone()
                    .unwrap_or_else(|| "disabled".into()),
            ));
        }
        self.may_start()?;
        self.counters().state = "starting";
        match self.start().await {
            Ok(running) => {
                if self
                    .started_once
                    .swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    self.counters().restarts += 1;
                }
                let mut counters = self.counters();
                counters.state = "ready";
                counters.pid = Some(running.pid);
                counters.preloaded = running.preloaded;
                counters.reason = None;
                drop(counters);
                *phase = Phase::Running(running);
                Ok(())
            }
            Err(StartError::Permanent(why)) => {
                warn!(server = %self.server, cause = %why, "Prefork disabled; sessions are spawned");
                let mut counters = self.counters();
                counters.state = "disabled";
                counters.reason = Some(why.clone());
                *phase = Phase::Disabled;
                Err(PreforkError::Unavailable(why))
            }
            Err(StartError::Failed(why)) => {
                self.record_failure(&why);
                Err(PreforkError::Start(why))
            }
        }
    }

    /// Applies the restart policy: at most `max_restarts` crashes per window (then down for
    /// the cool-down), and an exponential delay after each crash.
    fn may_start(&self) -> Result<(), PreforkError> {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        while failures.front().is_some_and(|at| {
            now.duration_since(*at)
                > self
                    .settings
                    .restart
                    .window
                    .max(self.settings.restart.cooldown)
        }) {
            failures.pop_front();
        }
        let in_window = failures
            .iter()
            .filter(|at| now.duration_since(**at) <= self.settings.restart.window)
            .count();
        let Some(last) = failures.back() else {
            return Ok(());
        };
        if in_window > self.settings.restart.max_restarts as usize
            && now.duration_since(*last) < self.settings.restart.cooldown
        {
            self.counters().state = "cooling_down";
            return Err(PreforkError::Unavailable(format!(
                "crashed {in_window} times within {:?}; cooling down",
                self.settings.restart.window
            )));
        }
        let exponent = u32::try_from(in_window.saturating_sub(1))
            .unwrap_or(u32::MAX)
            .min(16);
        let backoff = self
            .settings
            .restart
            .backoff_base
            .saturating_mul(1 << exponent)
            .min(self.settings.restart.backoff_cap);
        if now.duration_since(*last) < backoff {
            return Err(PreforkError::Unavailable(format!(
                "restarting after a crash, in {:?}",
                backoff - now.duration_since(*last)
            )));
        }
        Ok(())
    }

    /// Starts the zygote confined, and waits for it to report its import done.
    async fn start(&self) -> Result<Running, StartError> {
        let failed =
            |what: &str, err: &dyn std::fmt::Display| StartError::Failed(format!("{what}: {err}"));
        let program = self.launch.program.clone().map_err(StartError::Failed)?;
        let entry = self.launch.entry.clone().map_err(StartError::Failed)?;
        let home = self.settings.sandbox.state_dir(".prefork", &self.server);
        let launch = self
            .launch
            .server_launch(&home)
            .map_err(StartError::Failed)?;
        let confinement = self
            .settings
            .sandbox
            .prepare_zygote(
                &self.settings.policy,
                &self.server,
                &entry.python,
                &[program.to_string_lossy().into_owned()],
            )
            .map_err(|err| failed("confinement", &err))?;
        let mut launch = launch;
        launch.cwd = Some(confinement.state_dir.clone());
        let (control, theirs) = passcred_pair().map_err(|err| failed("control socket", &err))?;
        let Confinement { plan, cgroup, .. } = confinement;
        let mut child = spawn_helper(&launch, theirs, plan)
            .await
            .map_err(|err| failed("spawn", &err))?;
        let leader = child
            .id()
            .ok_or_else(|| StartError::Failed("the zygote exited at once".into()))?;
        if let Some(registry) = &self.settings.registry
            && let Err(err) = registry.register(leader)
        {
            warn!(pgid = leader, cause = %err, "cannot record the zygote's process group");
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(forward_log(stderr, self.server.clone()));
        }
        let (exited_tx, exited) = watch::channel(false);
        tokio::spawn(watch_exit(
            child,
            leader,
            cgroup,
            self.settings.registry.clone(),
            exited_tx,
            self.server.clone(),
        ));
        let deadline = tokio::time::Instant::now() + self.settings.startup_timeout;
        let ready = tokio::time::timeout_at(deadline, receive(&control)).await;
        let fail = |why: String| {
            kill_group_now(as_pgid(leader));
            StartError::Failed(why)
        };
        let (message, pid) = match ready {
            Ok(Ok(Some(answer))) => answer,
            Ok(Ok(None)) => {
                return Err(fail("the zygote exited during import (see its log)".into()));
            }
            Ok(Err(err)) => return Err(fail(format!("control socket: {err}"))),
            Err(_) => {
                return Err(fail(format!(
                    "import not done within {:?}",
                    self.settings.startup_timeout
                )));
            }
        };
        let answer: serde_json::Value = serde_json::from_slice(&message).unwrap_or_default();
        if let Some(threads) = answer.get("threads") {
            kill_group_now(as_pgid(leader));
            return Err(StartError::Permanent(format!(
                "{} threads run after the {} of {} ({}): forking would lose them",
                threads,
                answer["after"].as_str().unwrap_or("import"),
                entry.module,
                answer["names"]
            )));
        }
        if let Some(error) = answer.get("error").and_then(|e| e.as_str()) {
            // The import itself failed: the same code fails the same way next time.
            kill_group_now(as_pgid(leader));
            return Err(StartError::Permanent(error.to_owned()));
        }
        if answer.get("ready") != Some(&serde_json::Value::Bool(true)) {
            return Err(fail("unexpected answer from the zygote".to_owned()));
        }
        let pid = pid.ok_or_else(|| fail("the zygote's pid was not passed".into()))?;
        let preloaded = answer["preloaded"].as_u64().unwrap_or(0);
        info!(
            server = %self.server, pid, module = %entry.module, preloaded,
            "Zygote ready: {} imported once, sessions start by fork", entry.module
        );
        Ok(Running {
            control,
            leader,
            pid,
            preloaded,
            exited,
        })
    }
}

enum StartError {
    /// The import failed, or threads ran after it: never retried (until the service restarts).
    Permanent(String),
    /// Anything else (a crash, a timeout): retried under the restart policy.
    Failed(String),
}

/// Waits for the zygote's process (the shim) to end, then makes sure nothing of it is left.
async fn watch_exit(
    mut child: tokio::process::Child,
    leader: u32,
    cgroup: Option<Arc<SessionCgroup>>,
    registry: Option<ProcessRegistry>,
    exited: watch::Sender<bool>,
    server: String,
) {
    let status = child.wait().await;
    debug!(server = %server, ?status, "zygote process ended");
    kill_group_now(as_pgid(leader));
    if let Some(cgroup) = cgroup {
        let _ = tokio::task::spawn_blocking(move || cgroup.remove()).await;
    }
    if let Some(registry) = registry
        && let Err(err) = registry.unregister(leader)
    {
        warn!(pgid = leader, cause = %err, "cannot remove the zygote's process record");
    }
    let _ = exited.send(true);
}

async fn forward_log(stderr: tokio::process::ChildStderr, server: String) {
    use tokio::io::AsyncBufReadExt as _;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        debug!(target: "mcp_pool::mcp::server_stderr", server = %server, "zygote: {line}");
    }
}

/// One fork request on a running zygote.
async fn fork_in(
    running: &Running,
    request: ForkRequest<'_>,
) -> Result<ForkedServer, PreforkError> {
    let io = |what: &str, err: &dyn std::fmt::Display| PreforkError::Fork(format!("{what}: {err}"));
    let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(|err| io("pipe", &err));
    let (stdin_child, stdin) = pipe()?;
    let (stdout, stdout_child) = pipe()?;
    let (stderr, stderr_child) = pipe()?;
    let (report, report_child) = passcred_pair().map_err(|err| io("report socket", &err))?;

    let mut labels = vec!["stdin", "stdout", "stderr", "report"];
    let mut fds: Vec<RawFd> = vec![
        stdin_child.as_raw_fd(),
        stdout_child.as_raw_fd(),
        stderr_child.as_raw_fd(),
        report_child.as_raw_fd(),
    ];
    let memfd = match &request.credentials {
        Some((_, contents)) => Some(sealed_memfd(contents).map_err(|err| io("memfd", &err))?),
        None => None,
    };
    if let Some(memfd) = &memfd {
        labels.push("credentials");
        fds.push(memfd.as_raw_fd());
    }
    let plan = request.confinement.plan.as_ref();
    if let Some(ruleset) = plan.and_then(|plan| plan.landlock.as_ref()) {
        labels.push("landlock");
        fds.push(ruleset.as_raw_fd());
    }
    for procs in plan.map(|plan| plan.cgroup_procs.as_slice()).unwrap_or(&[]) {
        labels.push("cgroup");
        fds.push(procs.as_raw_fd());
    }
    let header = serde_json::json!({
        "fds": labels,
        "env": request.env,
        "cwd": request.cwd,
        "credentials_env": request.credentials.as_ref().map(|(name, _)| *name),
        "nofile": plan.and_then(|plan| plan.nofile),
    });
    let header = serde_json::to_vec(&header).map_err(|err| io("header", &err))?;
    send(&running.control, &header, &fds)
        .await
        .map_err(|err| io("send", &err))?;
    // The zygote and the child hold their copies now; ours must go, or the pool would never
    // see the child's stdout close.
    drop((stdin_child, stdout_child, stderr_child, report_child, memfd));

    let answer = match receive(&running.control).await {
        Ok(Some((answer, _))) => answer,
        Ok(None) => return Err(PreforkError::Fork("the zygote exited".into())),
        Err(err) => return Err(io("receive", &err)),
    };
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
    if answer.get("forked").is_none() {
        return Err(PreforkError::Fork(
            answer
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("unexpected answer from the zygote")
                .to_owned(),
        ));
    }
    let (message, pid) = match receive(&report).await {
        Ok(Some(report)) => report,
        Ok(None) => {
            return Err(PreforkError::Fork(
                "the child exited before reporting".into(),
            ));
        }
        Err(err) => return Err(io("report", &err)),
    };
    let pid = pid.ok_or_else(|| PreforkError::Fork("the child's pid was not passed".into()))?;
    if message != b"ok" {
        return Err(PreforkError::Fork(format!(
            "the child could not set itself up: {}",
            String::from_utf8_lossy(&message)
        )));
    }
    Ok(ForkedServer {
        pid,
        start_time: process_start_time(pid),
        stdin,
        stdout,
        stderr,
    })
}

/// A sealed memfd holding `contents`: readable through `/proc/self/fd/N`, never writable.
fn sealed_memfd(contents: &[u8]) -> std::io::Result<OwnedFd> {
    let fd = memfd_create(
        "credentials",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(contents)?;
    let fd = OwnedFd::from(file);
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SEAL
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_WRITE,
        ),
    )?;
    Ok(fd)
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// A `SOCK_SEQPACKET` pair: the pool's end non-blocking, registered with the runtime and told
/// each sender's pid (`SO_PASSCRED`); the other end blocking, for the zygote or a child. tokio
/// has no type for a seqpacket socket; a `UnixStream` serves for its readiness, and only
/// `sendmsg`/`recvmsg` touch it.
fn passcred_pair() -> std::io::Result<(UnixStream, OwnedFd)> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    setsockopt(&ours, sockopt::PassCred, &true)?;
    set_nonblocking(&ours)?;
    let ours = UnixStream::from_std(std::os::unix::net::UnixStream::from(ours))?;
    Ok((ours, theirs))
}

/// Sends one message with `fds` attached.
async fn send(socket: &UnixStream, message: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    loop {
        socket.writable().await?;
        let sent = socket.try_io(Interest::WRITABLE, || {
            sendmsg::<()>(
                socket.as_raw_fd(),
                &[IoSlice::new(message)],
                &[ControlMessage::ScmRights(fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match sent {
            Ok(_) => return Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err),
        }
    }
}

/// Receives one message and the sender's pid (`SO_PASSCRED`); `None` at end of stream.
/// Descriptors sent along are closed: neither the zygote nor a child has any to give.
async fn receive(socket: &UnixStream) -> std::io::Result<Option<(Vec<u8>, Option<u32>)>> {
    loop {
        socket.readable().await?;
        let received = socket.try_io(Interest::READABLE, || {
            let mut buffer = vec![0u8; MAX_MESSAGE];
            let mut space = nix::cmsg_space!(nix::sys::socket::UnixCredentials, [RawFd; 4]);
            let (bytes, pid) = {
                let mut iov = [IoSliceMut::new(&mut buffer)];
                let message = recvmsg::<()>(
                    socket.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)?;
                let mut pid = None;
                for cmsg in message.cmsgs().map_err(std::io::Error::from)? {
                    match cmsg {
                        ControlMessageOwned::ScmCredentials(creds) => {
                            pid = u32::try_from(creds.pid()).ok().filter(|pid| *pid > 0);
                        }
                        ControlMessageOwned::ScmRights(fds) => {
                            for fd in fds {
                                let _ = nix::unistd::close(fd);
                            }
                        }
                        _ => {}
                    }
                }
                (message.bytes, pid)
            };
            buffer.truncate(bytes);
            Ok((buffer, pid))
        });
        match received {
            Ok((message, _)) if message.is_empty() => return Ok(None),
            Ok((message, pid)) => return Ok(Some((message, pid))),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err),
        }
    }
}
