//! What runs in the forked child between `fork` and `exec`: joining the session's cgroups,
//! entering a fresh PID and mount namespace behind a minimal init, dropping capabilities and
//! restricting itself with the session's Landlock ruleset.
//!
//! Everything here runs after `fork` in a copy of a multi-threaded process, so it may only make
//! async-signal-safe calls: raw system calls and a few libc wrappers around them, no allocation,
//! no locks. All inputs are prepared by the parent in a [`ChildPlan`] before the fork.
//!
//! With namespaces the process tree of one session is:
//! ```text
//! service ── shim (the spawned child, leader of the session's process group; host PID ns)
//!              └── init (PID 1 of the session's PID namespace; mounts its own /proc)
//!                    └── server (PID 2: the MCP server, confined, then exec'd)
//! ```
//! The shim and the init forward SIGTERM/SIGINT/SIGHUP/SIGQUIT downwards, reap, and exit with
//! the server's status; the init dying makes the kernel kill everything else in the namespace,
//! however it detached. Each level has `PR_SET_PDEATHSIG(SIGKILL)` on its parent, so SIGKILL of
//! the service takes down the shim, the init, and with it the whole namespace.

#![allow(unsafe_code)]

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
};

use nix::libc;

/// Everything the child needs, prepared before the fork (the child must not allocate).
pub(crate) struct ChildPlan {
    /// `cgroup.procs` of each of the session's cgroups, open for writing.
    pub(crate) cgroup_procs: Vec<OwnedFd>,
    /// Enter a new PID and mount namespace behind an init.
    pub(crate) namespaces: bool,
    /// `RLIMIT_NOFILE` for the server.
    pub(crate) nofile: Option<u64>,
    /// Empty the capability bounding set and lock out root's implicit capabilities at exec.
    pub(crate) drop_capabilities: bool,
    /// The Landlock ruleset to restrict the server with.
    pub(crate) landlock: Option<OwnedFd>,
    /// Grant read access to the namespace's own `/proc`, which exists only after the init
    /// mounted it, so only the child can add its rule.
    pub(crate) proc_rule: bool,
}

// `linux/landlock.h`
const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1 << 0;
const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;
const LANDLOCK_ACCESS_FS_EXECUTE: u64 = 1 << 0;
const LANDLOCK_ACCESS_FS_READ_FILE: u64 = 1 << 2;
const LANDLOCK_ACCESS_FS_READ_DIR: u64 = 1 << 3;

/// `struct landlock_path_beneath_attr` (packed in the kernel's ABI).
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The Landlock ABI version the kernel offers; 0 when Landlock is unavailable.
pub(crate) fn landlock_abi() -> i32 {
    // SAFETY: the documented version query: null attributes, size 0.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    i32::try_from(abi).unwrap_or(0).max(0)
}

/// Whether this process may create PID and mount namespaces: forks a child into new ones,
/// which exits at once.
pub(crate) fn probe_namespaces() -> io::Result<()> {
    // SAFETY: the child only calls `_exit`; the parent waits for exactly that child.
    unsafe {
        let pid = check(libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        ))?;
        if pid == 0 {
            libc::_exit(0);
        }
        let mut status = 0;
        libc::waitpid(pid as libc::pid_t, &mut status, 0);
    }
    Ok(())
}

/// Signals the shim and the init pass on to the process below them.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

// `linux/securebits.h`: exec as uid 0 grants no capabilities, and that cannot be undone.
const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
/// Highest capability number the loop below tries to drop; unknown ones fail with EINVAL.
const CAP_LAST_POSSIBLE: libc::c_ulong = 63;

fn check(result: libc::c_long) -> io::Result<libc::c_long> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Runs in the forked child; returns only in the process that goes on to exec the server.
///
/// An error returned here (from the shim, the init or the server process) travels through
/// std's exec-error pipe to the spawning thread, so the spawn fails with that cause.
///
/// # Safety
/// Must only be called between `fork` and `exec` (from `Command::pre_exec`).
pub(crate) unsafe fn confine_child(plan: &ChildPlan) -> io::Result<()> {
    for fd in &plan.cgroup_procs {
        // "0" moves the writing process; every process forked from here on stays inside.
        // SAFETY: writes two bytes from a static buffer to an fd the plan owns.
        check(unsafe { libc::write(fd.as_raw_fd(), c"0".as_ptr().cast(), 1) } as libc::c_long)?;
    }
    if plan.namespaces {
        // SAFETY: plain system calls on values owned by this function.
        unsafe { enter_namespaces()? };
    }
    if plan.drop_capabilities {
        // SAFETY: prctl with integer arguments only.
        unsafe { drop_capabilities()? };
    }
    if let Some(ruleset) = &plan.landlock {
        if plan.proc_rule {
            // SAFETY: opens a static path; passes a pointer to a local struct.
            unsafe { allow_proc(ruleset.as_raw_fd())? };
        }
        // SAFETY: prctl and the landlock syscall with integer arguments only.
        unsafe {
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into())?;
            check(libc::syscall(
                libc::SYS_landlock_restrict_self,
                ruleset.as_raw_fd(),
                0,
            ))?;
        }
    }
    // Last: until exec the child still holds every descriptor of the service (close-on-exec
    // ones close only at exec), so with more than `nofile` of them open, any descriptor opened
    // after the limit (the `/proc` rule above) would fail with EMFILE. Lowering a limit below
    // the descriptors already open is allowed; the server starts with only 0, 1 and 2.
    if let Some(nofile) = plan.nofile {
        let limit = libc::rlimit {
            rlim_cur: nofile,
            rlim_max: nofile,
        };
        // SAFETY: `limit` lives on this stack frame.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }.into())?;
    }
    Ok(())
}

/// Adds a read-only rule for `/proc` as mounted now (the namespace's own) to `ruleset`.
unsafe fn allow_proc(ruleset: libc::c_int) -> io::Result<()> {
    // SAFETY: plain system calls; `attr` lives on this stack frame.
    unsafe {
        let proc = check(
            libc::open(
                c"/proc".as_ptr(),
                libc::O_PATH | libc::O_CLOEXEC | libc::O_DIRECTORY,
            )
            .into(),
        )? as libc::c_int;
        let attr = PathBeneathAttr {
            allowed_access: LANDLOCK_ACCESS_FS_EXECUTE
                | LANDLOCK_ACCESS_FS_READ_FILE
                | LANDLOCK_ACCESS_FS_READ_DIR,
            parent_fd: proc,
        };
        let added = check(libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset,
            LANDLOCK_RULE_PATH_BENEATH,
            &attr as *const PathBeneathAttr,
            0u32,
        ));
        libc::close(proc);
        added?;
    }
    Ok(())
}

/// Unshares PID and mount namespaces and forks twice: the caller becomes the shim, its child
/// the namespace's init, and only the grandchild returns (to become the server).
unsafe fn enter_namespaces() -> io::Result<()> {
    // SAFETY: every call below takes integers or pointers to locals/static strings.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWNS).into())?;
        // Keep the /proc mount below from propagating back to the host's mount namespace.
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
            .into(),
        )?;
        let mut forwarded: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut forwarded);
        libc::sigaddset(&mut forwarded, libc::SIGCHLD);
        for signal in FORWARDED {
            libc::sigaddset(&mut forwarded, signal);
        }
        // Blocked before each fork, so a signal that arrives before `supervise` waits for it is
        // queued rather than lost (and PID 1 gets signals it has no handler for at all).
        let mut previous: libc::sigset_t = std::mem::zeroed();
        check(libc::sigprocmask(libc::SIG_BLOCK, &forwarded, &mut previous).into())?;

        let init = raw_fork()?;
        if init > 0 {
            supervise(init, &forwarded);
        }
        // The init: PID 1 of the new namespace.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0).into())?;
        check(
            libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            )
            .into(),
        )?;
        let server = raw_fork()?;
        if server > 0 {
            supervise(server, &forwarded);
        }
        // The server: its parent is the init, inside the namespace.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0).into())?;
        check(libc::sigprocmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()).into())?;
    }
    Ok(())
}

/// `fork` as a raw system call: glibc's wrapper runs `pthread_atfork` handlers, which are not
/// safe in a child of a multi-threaded process.
unsafe fn raw_fork() -> io::Result<libc::pid_t> {
    // SAFETY: clone without CLONE_VM and with a null stack behaves like fork.
    let pid = check(unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    })?;
    Ok(pid as libc::pid_t)
}

/// The shim's and the init's whole life: hold nothing open, pass signals on, reap every child,
/// and exit with `child`'s status once it is gone.
fn supervise(child: libc::pid_t, signals: &libc::sigset_t) -> ! {
    // SAFETY: only system calls on integers and local buffers; never returns.
    unsafe {
        // Drop every inherited descriptor: the exec-error pipe (so the spawner sees the
        // server's exec, not our lifetime), the ruleset, and the session's stdio (so the
        // client sees EOF when the server dies, not when we do).
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
        loop {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let signal = libc::sigwaitinfo(signals, &mut info);
            if signal == libc::SIGCHLD {
                loop {
                    let mut status = 0;
                    let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
                    if pid == child {
                        libc::_exit(exit_code(status));
                    }
                    if pid <= 0 {
                        break;
                    }
                }
            } else if signal > 0 {
                libc::kill(child, signal);
            }
        }
    }
}

/// The exit code a shell would report for `status`.
fn exit_code(status: libc::c_int) -> libc::c_int {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// Empties the bounding set and the ambient set and locks root out of implicit capabilities,
/// so that after exec the server (even as uid 0) holds none: no mount, no module loading, no
/// reboot, no DAC override, no ptrace of anything.
unsafe fn drop_capabilities() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        // PR_SET_SECUREBITS needs CAP_SETPCAP, so it goes first; without it (an unprivileged
        // service) there is nothing to drop in the first place.
        let bits = SECBIT_NOROOT
            | SECBIT_NOROOT_LOCKED
            | SECBIT_NO_SETUID_FIXUP
            | SECBIT_NO_SETUID_FIXUP_LOCKED;
        if libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0) != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EPERM) {
                return Err(err);
            }
        }
        for cap in 0..=CAP_LAST_POSSIBLE {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                match io::Error::last_os_error().raw_os_error() {
                    // Past the kernel's last capability.
                    Some(libc::EINVAL) => break,
                    // Not privileged: the bounding set cannot matter.
                    Some(libc::EPERM) => break,
                    _ => return Err(io::Error::last_os_error()),
                }
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    Ok(())
}
