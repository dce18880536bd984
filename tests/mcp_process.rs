//! Process-group hygiene: terminate_group, the ProcessRegistry backstop, PR_SET_PDEATHSIG.

mod common;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{PATIENCE, wait_until};
use mcp_pool::mcp::{
    McpSession, ProcessRegistry, ServerLaunch, process_start_time, terminate_group,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

// === helpers ===

fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Alive and not a zombie.
fn running(pid: u32) -> bool {
    state(pid).is_some_and(|s| s != 'Z' && s != 'X')
}

/// `sleep 3600` as the leader of a new process group.
fn sleeper() -> std::process::Child {
    Command::new("sleep")
        .arg("3600")
        .process_group(0)
        .spawn()
        .expect("spawn sleep")
}

/// Our session id, as the registry records it (field 6 of /proc/self/stat).
fn own_session() -> i32 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("stat");
    let rest = stat.rsplit_once(')').expect("comm").1;
    rest.split_whitespace()
        .nth(3)
        .expect("session")
        .parse()
        .expect("int")
}

// === terminate_group ===

#[tokio::test]
async fn terminate_group_escalates_to_sigkill_and_tolerates_a_dead_group() {
    // The shell and its background child both ignore SIGTERM (SIG_IGN survives exec).
    let mut shell = Command::new("sh")
        .args(["-c", "trap '' TERM; sleep 3600 & echo $!; wait"])
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("spawn sh");
    let mut line = String::new();
    BufReader::new(shell.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read pid");
    let member: u32 = line.trim().parse().expect("pid");
    let pgid = i32::try_from(shell.id()).expect("pid fits");
    assert!(running(member));

    let started = Instant::now();
    terminate_group(pgid, Duration::from_millis(300)).await;
    assert!(started.elapsed() < Duration::from_secs(30));
    let status = shell.wait().expect("wait");
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32), "{status:?}");
    assert!(
        wait_until(PATIENCE, || std::future::ready(!running(member))).await,
        "member survived"
    );

    // Already gone: returns at once, signals nothing.
    let started = Instant::now();
    terminate_group(pgid, Duration::from_secs(30)).await;
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn terminate_group_returns_early_when_sigterm_suffices() {
    let mut child = sleeper();
    let pgid = i32::try_from(child.id()).expect("pid fits");
    // Reap concurrently, as rmcp does for its own children, so the leader does not linger
    // as a zombie that still counts as a group member for kill(2).
    let waiter = std::thread::spawn(move || child.wait());
    let started = Instant::now();
    terminate_group(pgid, Duration::from_secs(60)).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let status = waiter.join().expect("thread").expect("wait");
    assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));
}

// === ProcessRegistry ===

#[test]
fn registry_kills_a_recorded_live_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = ProcessRegistry::open(dir.path().join("pgids")).expect("open");
    let mut child = sleeper();
    registry.register(child.id()).expect("register");
    assert!(registry.dir().join(child.id().to_string()).exists());

    // A fresh registry on the same directory, as after a restart.
    let restarted = ProcessRegistry::open(dir.path().join("pgids")).expect("reopen");
    assert_eq!(restarted.reap_leftovers(), 1);
    let status = child.wait().expect("wait");
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    assert_eq!(
        std::fs::read_dir(restarted.dir()).expect("dir").count(),
        0,
        "records cleared"
    );
}

#[test]
fn registry_skips_a_record_whose_start_time_does_not_match() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = ProcessRegistry::open(dir.path()).expect("open");
    let mut child = sleeper();
    let pid = child.id();
    let real_start = process_start_time(pid).expect("start time");
    // As if `pid` had been recycled: the record names an older process with the same pid.
    std::fs::write(
        dir.path().join(pid.to_string()),
        format!(
            "{pid} {} {}\n",
            real_start.saturating_sub(1000),
            own_session()
        ),
    )
    .expect("write record");

    assert_eq!(registry.reap_leftovers(), 0);
    assert!(running(pid), "an unrelated process was killed");
    assert!(
        !dir.path().join(pid.to_string()).exists(),
        "stale record cleared"
    );
    child.kill().expect("kill");
    child.wait().expect("wait");
}

#[tokio::test]
async fn registry_kills_the_orphans_of_a_dead_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = ProcessRegistry::open(dir.path()).expect("open");
    let mut shell = Command::new("sh")
        .args(["-c", "sleep 3600 & echo $!"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn sh");
    // Registering works while the shell is alive or a zombie; it is not reaped yet.
    registry.register(shell.id()).expect("register");
    let mut line = String::new();
    BufReader::new(shell.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read pid");
    let orphan: u32 = line.trim().parse().expect("pid");
    shell.wait().expect("wait sh");
    assert!(running(orphan));

    assert_eq!(registry.reap_leftovers(), 1);
    assert!(
        wait_until(PATIENCE, || std::future::ready(!running(orphan))).await,
        "orphan survived"
    );
}

#[test]
fn unregister_forgets_and_tolerates_unknown_groups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = ProcessRegistry::open(dir.path()).expect("open");
    let mut child = sleeper();
    registry.register(child.id()).expect("register");
    registry.unregister(child.id()).expect("unregister");
    registry.unregister(child.id()).expect("unregister twice");
    assert_eq!(registry.reap_leftovers(), 0);
    assert!(running(child.id()));
    child.kill().expect("kill");
    child.wait().expect("wait");
}

#[test]
fn start_time_of_missing_process_is_none() {
    assert!(process_start_time(std::process::id()).is_some());
    assert_eq!(process_start_time(u32::MAX), None);
}

#[test]
fn server_launch_debug_hides_env_values() {
    let mut env = BTreeMap::new();
    env.insert("API_TOKEN".to_owned(), "s3cr3t-value".to_owned());
    let launch = ServerLaunch {
        command: "server".to_owned(),
        args: vec!["--stdio".to_owned()],
        env,
        cwd: None,
    };
    let printed = format!("{launch:?}");
    assert!(printed.contains("API_TOKEN"), "{printed}");
    assert!(!printed.contains("s3cr3t-value"), "{printed}");
}

// === PR_SET_PDEATHSIG ===

/// The demo server spawns `sleep 3600` through mcp-pool's own spawner (its own process group,
/// so killing the server's group does not reach it). SIGKILL of the server alone must then
/// take the child down through the parent-death signal: without it the child would be
/// re-parented and sleep on.
#[tokio::test]
async fn children_die_with_the_process_that_spawned_them() {
    let launch = ServerLaunch {
        command: env!("CARGO_BIN_EXE_mcp-pool").to_owned(),
        args: vec!["demo-server".to_owned(), "--test-tools".to_owned()],
        env: BTreeMap::new(),
        cwd: None,
    };
    let session = McpSession::connect(&launch, None, Duration::from_secs(30), None)
        .await
        .expect("connect");
    let spawned = session
        .call_tool("spawn_watched_child", None, Duration::from_secs(60))
        .await
        .expect("spawn_watched_child");
    let child: u32 = spawned
        .content
        .iter()
        .find_map(|block| block.as_text()?.text.parse().ok())
        .expect("pid");
    assert!(running(child));
    let server = i32::try_from(session.pid()).expect("pid fits");
    let child_pgid = std::fs::read_to_string(format!("/proc/{child}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(2)?
                .parse::<i32>()
                .ok()
        });
    assert_eq!(
        child_pgid,
        i32::try_from(child).ok(),
        "child leads its own group"
    );

    kill(Pid::from_raw(server), Signal::SIGKILL).expect("kill the server");
    assert!(
        wait_until(PATIENCE, || std::future::ready(!running(child))).await,
        "child outlived its parent: {:?}",
        state(child)
    );
    session.close(Duration::from_secs(1)).await;
}
