//! One cgroup per session, for its resource limits: memory, process count and CPU weight.
//!
//! Both layouts are handled:
//! - **cgroup v1** (this machine): the `memory`, `pids` and `cpu` hierarchies, each mounted
//!   separately under the cgroup root; a session gets a directory in each.
//! - **cgroup v2** (most production hosts): one unified tree. The controllers must be enabled in
//!   the parent's `cgroup.subtree_control`, which the kernel refuses for a cgroup that has
//!   processes of its own (other than the root); so the service's own cgroup must be the root,
//!   or a delegated one (systemd `Delegate=yes`) from which the service first moves itself into
//!   a leaf `mcp-pool-service`.
//!
//! Every instance of the service keeps its sessions below its own parent,
//! `mcp-pool-<hash of its data directory>`, so that the sweep at start-up only ever touches
//! cgroups the same instance left behind.

use std::{
    fs,
    io::{self, Write as _},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{debug, warn};

use super::Limits;

/// Which cgroup layout the host has, with the directories this instance uses.
#[derive(Debug, Clone)]
enum Layout {
    V1 {
        /// `<root>/memory/<instance>`
        memory: PathBuf,
        /// `<root>/pids/<instance>`
        pids: PathBuf,
        /// `<root>/cpu/<instance>`, when the cpu controller is mounted.
        cpu: Option<PathBuf>,
    },
    V2 {
        /// `<root>/<service's cgroup>/<instance>`, with memory, pids (and cpu) enabled below.
        parent: PathBuf,
        /// Whether the cpu controller could be enabled.
        cpu: bool,
    },
}

/// The cgroups of one service instance.
#[derive(Debug)]
pub(crate) struct Cgroups {
    layout: Layout,
    /// Makes session names unique within the instance.
    next: AtomicU64,
}

impl Cgroups {
    /// Finds a usable layout under `root` and creates this instance's parent cgroup(s).
    /// The error says what is missing, in words an operator can act on.
    pub(crate) fn open(root: &Path, instance: &str) -> Result<Cgroups, String> {
        let layout = if root.join("cgroup.controllers").is_file() {
            open_v2(root, instance)?
        } else if root.join("memory/cgroup.procs").is_file()
            && root.join("pids/cgroup.procs").is_file()
        {
            let memory = root.join("memory").join(instance);
            let pids = root.join("pids").join(instance);
            let cpu_root = root.join("cpu");
            let cpu = cpu_root
                .join("cpu.shares")
                .is_file()
                .then(|| cpu_root.join(instance));
            for dir in [Some(&memory), Some(&pids), cpu.as_ref()]
                .into_iter()
                .flatten()
            {
                fs::create_dir_all(dir)
                    .map_err(|err| format!("cannot create cgroup {}: {err}", dir.display()))?;
            }
            Layout::V1 { memory, pids, cpu }
        } else {
            return Err(format!(
                "no cgroup memory and pids controllers under {} (neither cgroup v2 with \
                 cgroup.controllers nor v1 memory/ and pids/ hierarchies)",
                root.display()
            ));
        };
        Ok(Cgroups {
            layout,
            next: AtomicU64::new(0),
        })
    }

    /// Whether CPU weights can be set.
    pub(crate) fn has_cpu(&self) -> bool {
        match &self.layout {
            Layout::V1 { cpu, .. } => cpu.is_some(),
            Layout::V2 { cpu, .. } => *cpu,
        }
    }

    fn parents(&self) -> Vec<&Path> {
        match &self.layout {
            Layout::V1 { memory, pids, cpu } => [Some(memory), Some(pids), cpu.as_ref()]
                .into_iter()
                .flatten()
                .map(PathBuf::as_path)
                .collect(),
            Layout::V2 { parent, .. } => vec![parent.as_path()],
        }
    }

    /// Kills whatever still runs in session cgroups a previous run of this instance left
    /// behind, and removes them; returns how many there were.
    pub(crate) fn sweep_leftovers(&self) -> usize {
        let mut removed = 0;
        for parent in self.parents() {
            let Ok(entries) = fs::read_dir(parent) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    kill_all_in(&path);
                    if remove_dir_patiently(&path) {
                        removed += 1;
                    }
                }
            }
        }
        removed
    }

    /// Removes the instance's parent cgroups if no session is left in them (at shutdown).
    pub(crate) fn remove_parents(&self) {
        for parent in self.parents() {
            let _ = fs::remove_dir(parent);
        }
    }

    /// Creates the cgroup(s) of one session with `limits` applied.
    pub(crate) fn create(&self, limits: &Limits, cpu_weight: u32) -> io::Result<SessionCgroup> {
        let name = format!("s{}", self.next.fetch_add(1, Ordering::Relaxed));
        let mut dirs = Vec::new();
        let result = (|| {
            match &self.layout {
                Layout::V1 { memory, pids, cpu } => {
                    let memory = make_dir(&memory.join(&name), &mut dirs)?;
                    if let Some(max) = limits.memory_max {
                        write_value(&memory.join("memory.limit_in_bytes"), max)?;
                        // With swap accounting, cap memory+swap too: the limit must be real.
                        let memsw = memory.join("memory.memsw.limit_in_bytes");
                        if memsw.exists() {
                            write_value(&memsw, max)?;
                        }
                    }
                    let pids = make_dir(&pids.join(&name), &mut dirs)?;
                    if let Some(max) = limits.pids_max {
                        write_value(&pids.join("pids.max"), max)?;
                    }
                    let cpu = match cpu {
                        Some(cpu) => Some(make_dir(&cpu.join(&name), &mut dirs)?),
                        None => None,
                    };
                    let session = SessionCgroup {
                        dirs: dirs.clone(),
                        memory_events: memory.join("memory.oom_control"),
                        cpu,
                        v2: false,
                        memory_max: limits.memory_max,
                        oom_kills_at_removal: AtomicU64::new(0),
                    };
                    session.set_cpu_weight(cpu_weight);
                    Ok(session)
                }
                Layout::V2 { parent, cpu } => {
                    let dir = make_dir(&parent.join(&name), &mut dirs)?;
                    if let Some(max) = limits.memory_max {
                        write_value(&dir.join("memory.max"), max)?;
                        let swap = dir.join("memory.swap.max");
                        if swap.exists() {
                            write_value(&swap, 0)?;
                        }
                    }
                    if let Some(max) = limits.pids_max {
                        write_value(&dir.join("pids.max"), max)?;
                    }
                    let session = SessionCgroup {
                        dirs: dirs.clone(),
                        memory_events: dir.join("memory.events"),
                        cpu: cpu.then(|| dir.clone()),
                        v2: true,
                        memory_max: limits.memory_max,
                        oom_kills_at_removal: AtomicU64::new(0),
                    };
                    session.set_cpu_weight(cpu_weight);
                    Ok(session)
                }
            }
        })();
        if result.is_err() {
            for dir in dirs.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
        }
        result
    }
}

fn open_v2(root: &Path, instance: &str) -> Result<Layout, String> {
    let controllers = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let available: Vec<&str> = controllers.split_whitespace().collect();
    for needed in ["memory", "pids"] {
        if !available.contains(&needed) {
            return Err(format!(
                "cgroup v2 at {} lacks the {needed} controller (cgroup.controllers: {:?})",
                root.display(),
                controllers.trim()
            ));
        }
    }
    let own = fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("0::").map(str::to_owned))
        })
        .unwrap_or_else(|| "/".to_owned());
    let own_dir = root.join(own.trim().trim_start_matches('/'));
    if own.trim() != "/" {
        // A cgroup with processes cannot hand controllers to children: move the service
        // into a leaf of its own first (the systemd delegation pattern).
        let leaf = own_dir.join("mcp-pool-service");
        fs::create_dir_all(&leaf)
            .and_then(|()| fs::write(leaf.join("cgroup.procs"), "0"))
            .map_err(|err| {
                format!(
                    "cannot move the service into {} (is its cgroup delegated?): {err}",
                    leaf.display()
                )
            })?;
    }
    let enable = |dir: &Path| -> Result<bool, String> {
        let control = dir.join("cgroup.subtree_control");
        fs::write(&control, "+memory +pids").map_err(|err| {
            format!(
                "cannot enable memory and pids in {}: {err}",
                control.display()
            )
        })?;
        Ok(available.contains(&"cpu") && fs::write(&control, "+cpu").is_ok())
    };
    enable(&own_dir)?;
    let parent = own_dir.join(instance);
    fs::create_dir_all(&parent)
        .map_err(|err| format!("cannot create cgroup {}: {err}", parent.display()))?;
    let cpu = enable(&parent)?;
    Ok(Layout::V2 { parent, cpu })
}

fn make_dir(dir: &Path, created: &mut Vec<PathBuf>) -> io::Result<PathBuf> {
    fs::create_dir(dir)?;
    created.push(dir.to_owned());
    Ok(dir.to_owned())
}

fn write_value(path: &Path, value: u64) -> io::Result<()> {
    let mut file = fs::OpenOptions::new().write(true).open(path)?;
    file.write_all(value.to_string().as_bytes())
        .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", path.display())))
}

/// SIGKILLs every process listed in `dir`'s `cgroup.procs`.
fn kill_all_in(dir: &Path) {
    let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in procs
        .lines()
        .filter_map(|line| line.trim().parse::<i32>().ok())
    {
        if pid > 1 {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// `rmdir` fails while a killed process is still exiting; give it a moment.
fn remove_dir_patiently(dir: &Path) -> bool {
    for _ in 0..50 {
        match fs::remove_dir(dir) {
            Ok(()) => return true,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return true,
            Err(_) => {
                kill_all_in(dir);
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
    warn!(cgroup = %dir.display(), "cannot remove a session cgroup");
    false
}

/// The cgroup(s) of one session.
#[derive(Debug)]
pub(crate) struct SessionCgroup {
    /// Every directory of the session, one per v1 hierarchy or the one v2 directory.
    dirs: Vec<PathBuf>,
    /// Where the OOM-kill counter is read (`memory.oom_control` or `memory.events`).
    memory_events: PathBuf,
    /// The directory whose CPU weight can be set.
    cpu: Option<PathBuf>,
    v2: bool,
    /// The memory limit, for error messages.
    pub(crate) memory_max: Option<u64>,
    /// The OOM-kill count read just before the directories went: a failed call may ask after
    /// the session's end already removed them.
    oom_kills_at_removal: AtomicU64,
}

impl SessionCgroup {
    /// `cgroup.procs` of each directory, open for the child to write itself into.
    pub(crate) fn procs_files(&self) -> io::Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|dir| {
                fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
                    .map(OwnedFd::from)
            })
            .collect()
    }

    /// Sets the CPU weight (1..=10000, 100 is the default share); ignored without a cpu
    /// controller.
    pub(crate) fn set_cpu_weight(&self, weight: u32) {
        let Some(dir) = &self.cpu else {
            return;
        };
        let result = if self.v2 {
            write_value(&dir.join("cpu.weight"), u64::from(weight.clamp(1, 10_000)))
        } else {
            // v1 shares: 1024 is the default, as weight 100 is in v2.
            let shares = (u64::from(weight) * 1024 / 100).max(2);
            write_value(&dir.join("cpu.shares"), shares)
        };
        if let Err(err) = result {
            debug!(cause = %err, "cannot set the session's cpu weight");
        }
    }

    /// How many processes of the session the kernel OOM-killed at the memory limit.
    pub(crate) fn oom_kills(&self) -> u64 {
        self.read_oom_kills()
            .unwrap_or(0)
            .max(self.oom_kills_at_removal.load(Ordering::SeqCst))
    }

    fn read_oom_kills(&self) -> Option<u64> {
        fs::read_to_string(&self.memory_events)
            .ok()
            .and_then(|text| {
                text.lines().find_map(|line| {
                    line.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse().ok())
                })
            })
    }

    /// Kills anything left inside and removes the directories; idempotent.
    pub(crate) fn remove(&self) {
        if let Some(kills) = self.read_oom_kills() {
            self.oom_kills_at_removal.fetch_max(kills, Ordering::SeqCst);
        }
        for dir in &self.dirs {
            if dir.exists() {
                kill_all_in(dir);
                remove_dir_patiently(dir);
            }
        }
    }
}

impl Drop for SessionCgroup {
    /// A backstop for a confinement prepared but never used (the spawn failed or the caller
    /// gave up): sessions remove their cgroup explicitly, off the async threads, when they end.
    fn drop(&mut self) {
        self.remove();
    }
}
