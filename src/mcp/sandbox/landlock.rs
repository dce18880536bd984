//! Which paths a confined server may touch, as a Landlock ruleset.
//!
//! Allowed, and nothing else:
//! - read and execute: the system locations ([`SYSTEM_READ`]), `sandbox.read`, the server's own
//!   program with its interpreter and its venv or `node_modules`, and the server's
//!   `sandbox.read`;
//! - read: the directory holding only this session's credentials file;
//! - read and write: the session's private state directory, the server's `sandbox.write`, and
//!   a few devices (`/dev/null`, `/dev/zero`, `/dev/full`; `/dev/random` and `/dev/urandom`
//!   read-only).
//!
//! Protected paths are cut out of every allowed directory that contains them: the rule goes on
//! each sibling instead, recursively, so `/etc` is readable but `/etc/shadow` is not.
//! Landlock attaches rules to inodes, so the credentials file is granted through its own
//! directory: a refreshed file (written to a new inode and renamed) stays readable.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, Scope,
};

use super::{SandboxSettings, ServerPolicy, SessionPaths, absolute};

/// Read-only system locations every server gets: the runtime's libraries and configuration.
const SYSTEM_READ: &[&str] = &[
    "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc",
];

/// Host secrets inside the system locations that no server reads.
const SYSTEM_PROTECTED: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/ssh",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssl/private",
];

/// Devices every server may read and write.
const DEVICES_RW: &[&str] = &["/dev/null", "/dev/zero", "/dev/full"];
/// Devices every server may read.
const DEVICES_READ: &[&str] = &["/dev/random", "/dev/urandom"];

/// The ABI whose access rights the rulesets handle (signal and abstract-socket scoping).
const RULES_ABI: ABI = ABI::V6;

/// What a ruleset grants beyond the program, the system and the state directory.
#[derive(Debug, Clone, Copy)]
pub(super) struct Grants {
    /// The host's `/proc`: for a session without a PID namespace of its own. With one, the
    /// child adds its own `/proc` (see `ChildPlan::proc_rule`); a forked child gets none.
    pub(super) host_proc: bool,
    /// The directory holding the session's credentials file (not for a forked child, which
    /// gets them as a memfd, nor for a zygote).
    pub(super) credentials: bool,
}

/// One allowed path, opened once.
struct Rule {
    fd: PathFd,
    access: BitFlags<AccessFs>,
}

/// The rules every server shares, opened once at start-up: `/etc` alone expands to a hundred
/// or so, which would otherwise be opened again for every spawn.
pub(super) struct SystemRules {
    rules: Vec<Rule>,
}

impl SystemRules {
    pub(super) fn new(settings: &SandboxSettings) -> SystemRules {
        let protected = protected_paths(settings);
        let mut rules = Vec::new();
        let read = AccessFs::from_read(RULES_ABI);
        for path in SYSTEM_READ {
            add_beneath(&mut rules, Path::new(path), read, &protected);
        }
        // /etc/resolv.conf is often a symlink into /run; its target is needed for DNS.
        if let Ok(target) = Path::new("/etc/resolv.conf").canonicalize() {
            add_beneath(&mut rules, &target, read, &protected);
        }
        for path in &settings.read {
            add_beneath(&mut rules, &absolute(path), read, &protected);
        }
        let file_rw = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
        for path in DEVICES_RW {
            add_beneath(&mut rules, Path::new(path), file_rw, &[]);
        }
        for path in DEVICES_READ {
            add_beneath(&mut rules, Path::new(path), AccessFs::ReadFile.into(), &[]);
        }
        SystemRules { rules }
    }

    /// Builds the ruleset of one session and returns its file descriptor.
    pub(super) fn ruleset(
        &self,
        settings: &SandboxSettings,
        policy: &ServerPolicy,
        session: &SessionPaths<'_>,
        state_dir: &Path,
        kernel_abi: i32,
        grants: Grants,
    ) -> Result<std::os::fd::OwnedFd, String> {
        let protected = protected_paths(settings);
        let read = AccessFs::from_read(RULES_ABI);
        let all = AccessFs::from_all(RULES_ABI);
        let mut rules = Vec::new();
        for path in program_paths(session.program, session.args) {
            add_beneath(&mut rules, &path, read, &protected);
        }
        for path in &policy.read {
            add_beneath(&mut rules, &absolute(path), read, &protected);
        }
        for path in &policy.write {
            add_beneath(&mut rules, &absolute(path), all, &protected);
        }
        if grants.host_proc {
            add_beneath(&mut rules, Path::new("/proc"), read, &[]);
        }
        // Granted directly: both sit inside protected roots on purpose.
        if grants.credentials {
            add_beneath(
                &mut rules,
                session.credentials_dir,
                AccessFs::ReadFile | AccessFs::ReadDir,
                &[],
            );
        }
        add_beneath(&mut rules, state_dir, all, &[]);

        let level = if kernel_abi >= super::REQUIRED_LANDLOCK_ABI {
            CompatLevel::HardRequirement
        } else {
            CompatLevel::BestEffort
        };
        let failed = |err: landlock::RulesetError| format!("Landlock ruleset: {err}");
        let mut ruleset = Ruleset::default()
            .set_compatibility(level)
            .handle_access(all)
            .map_err(failed)?
            .scope(Scope::Signal | Scope::AbstractUnixSocket)
            .map_err(failed)?
            .create()
            .map_err(failed)?;
        for rule in self.rules.iter().chain(&rules) {
            ruleset = ruleset
                .add_rule(PathBeneath::new(&rule.fd, rule.access))
                .map_err(failed)?;
        }
        let fd: Option<std::os::fd::OwnedFd> = ruleset.into();
        fd.ok_or_else(|| "Landlock is not supported by this kernel".to_owned())
    }
}

fn protected_paths(settings: &SandboxSettings) -> Vec<PathBuf> {
    settings
        .protected
        .iter()
        .cloned()
        .chain(SYSTEM_PROTECTED.iter().map(PathBuf::from))
        .collect()
}

/// Adds a rule for `path` unless it is protected; a directory that contains a protected path
/// is replaced by rules for its entries, recursively, so the protected path stays out.
fn add_beneath(
    rules: &mut Vec<Rule>,
    path: &Path,
    access: BitFlags<AccessFs>,
    protected: &[PathBuf],
) {
    let Ok(path) = path.canonicalize() else {
        return;
    };
    if protected.contains(&path) {
        return;
    }
    if protected.iter().any(|p| p.starts_with(&path)) {
        if let Ok(entries) = std::fs::read_dir(&path) {
            for entry in entries.flatten() {
                add_beneath(rules, &entry.path(), access, protected);
            }
        }
        return;
    }
    let is_dir = path.is_dir();
    // Directory-only rights on a file make the kernel refuse the rule.
    let access = if is_dir {
        access
    } else {
        access & AccessFs::from_file(RULES_ABI)
    };
    if let Ok(fd) = PathFd::new(&path) {
        rules.push(Rule { fd, access });
    }
}

/// The server's own program: the resolved command, its interpreter (shebang), and for the
/// command and every path among its arguments, the venv or `node_modules` tree it lives in
/// (or else the path itself).
pub(super) fn program_paths(program: &Path, args: &[String]) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let mut consider = |path: &Path| {
        for candidate in [path.to_owned(), absolute(path)] {
            if let Some(prefix) = install_prefix(&candidate) {
                paths.push(prefix);
            }
            match package_root(&candidate) {
                Some(root) => {
                    paths.extend(venv_base_prefix(&root));
                    paths.push(root);
                }
                None => paths.push(candidate),
            }
        }
    };
    consider(program);
    if let Some(interpreter) = shebang_interpreter(program) {
        consider(&interpreter);
    }
    for arg in args {
        let path = Path::new(arg);
        if path.is_absolute() && path.exists() {
            consider(path);
        }
    }
    paths.sort();
    paths.dedup();
    paths
}

/// The installation prefix of a program in `<prefix>/bin/` next to `<prefix>/lib/` (a Python
/// or Node built into `/opt/...` or `~/.pyenv/versions/...`), whose libraries it loads.
fn install_prefix(program: &Path) -> Option<PathBuf> {
    let bin = program.parent()?;
    let prefix = bin.parent()?;
    (bin.file_name()? == "bin" && prefix.join("lib").is_dir() && prefix.parent().is_some())
        .then(|| prefix.to_owned())
}

/// The installation a venv was made from (`home = <prefix>/bin` in `pyvenv.cfg`): its standard
/// library.
fn venv_base_prefix(venv: &Path) -> Option<PathBuf> {
    let config = std::fs::read_to_string(venv.join("pyvenv.cfg")).ok()?;
    let home = config.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "home").then(|| PathBuf::from(value.trim()))
    })?;
    install_prefix(&home.join("python"))
}

/// The venv (a directory with `pyvenv.cfg`) or the outermost `node_modules` holding `path`.
fn package_root(path: &Path) -> Option<PathBuf> {
    let venv = path
        .ancestors()
        .skip(1)
        .find(|dir| dir.join("pyvenv.cfg").is_file());
    let node_modules = path
        .ancestors()
        .filter(|dir| dir.file_name().is_some_and(|name| name == "node_modules"))
        .last();
    venv.or(node_modules).map(Path::to_owned)
}

/// The interpreter named by a `#!` line, with `/usr/bin/env NAME` resolved through `PATH`.
fn shebang_interpreter(program: &Path) -> Option<PathBuf> {
    use std::io::Read as _;
    let mut head = [0u8; 256];
    let read = std::fs::File::open(program).ok()?.read(&mut head).ok()?;
    let line = head[..read].strip_prefix(b"#!")?;
    let line = std::str::from_utf8(line.split(|b| *b == b'\n').next()?).ok()?;
    let mut words = line.split_whitespace();
    let interpreter = PathBuf::from(words.next()?);
    if interpreter.file_name().is_some_and(|name| name == "env") {
        let name = words.find(|word| !word.starts_with('-'))?;
        return super::resolve_program(name, std::env::var("PATH").ok().as_deref());
    }
    Some(interpreter)
}
