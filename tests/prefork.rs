//! Pre-forked Python servers (README, "Pre-forked Python servers"): mcp-server-time, Google's
//! analytics-mcp and a hostile probe server, each started once as a zygote and forked per
//! session through the pool. The forked children must be confined like spawned ones, see only
//! their own credentials, and come back after kill -9 of themselves or of their zygote.

mod common;
#[path = "common/http.rs"]
mod http;
#[path = "common/service.rs"]
mod service;

use std::path::{Path, PathBuf};

use common::{PATIENCE, alive, required_env, wait_until};
use http::{Client, TestServer, content_text, denied};
use mcp_pool::actors::EventKind;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const EACCES: i64 = 13;

/// Where the probe server's module lives (importable through `PYTHONPATH`).
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/prefork")
}

/// A pip-style console script for the probe module, run by mcp-server-time's venv Python.
fn probe_script(dir: &Path, module: &str) -> PathBuf {
    let time = required_env("MCP_POOL_TEST_TIME_BIN");
    let python = Path::new(&time).with_file_name("python");
    let script = dir.join(format!("{module}-script"));
    std::fs::write(
        &script,
        format!(
            "#!{}\n# -*- coding: utf-8 -*-\nimport re\nimport sys\nfrom {module} import main\n\
             if __name__ == '__main__':\n    sys.exit(main())\n",
            python.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// `[servers.NAME]` for a probe module, preforked.
fn probe_server(name: &str, script: &Path, prefork: &str) -> String {
    let fixtures = fixtures();
    format!(
        "[servers.{name}]\ncommand = {script:?}\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n\
         {prefork}\n\
         [servers.{name}.env]\nPYTHONPATH = {fixtures:?}\n\
         [servers.{name}.sandbox]\nread = [{fixtures:?}]\n"
    )
}

fn third_party_preforked() -> String {
    let time = required_env("MCP_POOL_TEST_TIME_BIN");
    let analytics = required_env("MCP_POOL_TEST_ANALYTICS_BIN");
    format!(
        "[servers.time]\ncommand = {time:?}\nprefork = true\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n\
         [servers.analytics]\ncommand = {analytics:?}\nprefork = true\n\
         credentials_env = \"GOOGLE_APPLICATION_CREDENTIALS\"\n\
         credentials_format = \"google_authorized_user\"\n\
         [servers.analytics.oauth]\nclient_id = \"test-client.apps.googleusercontent.com\"\n"
    )
}

/// Stores credentials with a token unique to `user`.
async fn connect_with(client: &Client, server: &str, token: &str) {
    let resp = client
        .put_json(
            &format!("/v1/connections/{server}"),
            &json!({ "access_token": token, "refresh_token": format!("{token}-refresh") }),
        )
        .await;
    assert_eq!(resp.status, 201, "{}", resp.text());
}

/// Runs a probe tool of `server` (tests/fixtures/prefork/mcp_pool_probe.py).
async fn probe(client: &Client, server: &str, tool: &str, args: Value) -> Value {
    http::probe_on(client, server, tool, args).await
}

async fn stats(ts: &TestServer) -> Value {
    ts.admin().get("/v1/stats").await.json()
}

/// The session of (user, server) in the stats.
async fn session(ts: &TestServer, user: &str, server: &str) -> Value {
    stats(ts).await["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["user_id"] == user && c["server"] == server)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits until (user, server) is ready again on a process other than `old`.
async fn restarted(ts: &TestServer, user: &str, server: &str, old: u32) -> bool {
    wait_until(PATIENCE, || async {
        let s = session(ts, user, server).await;
        s["state"] == "ready" && s["pid"].as_u64().is_some_and(|p| p as u32 != old)
    })
    .await
}

async fn zygote(ts: &TestServer, server: &str) -> Value {
    stats(ts).await["prefork"]
        .as_array()
        .unwrap()
        .iter()
        .find(|z| z["server"] == server)
        .cloned()
        .expect("the zygote is in the stats")
}

async fn ready_zygote_pid(ts: &TestServer, server: &str) -> u32 {
    let ready = || async {
        let z = zygote(ts, server).await;
        z["pid"].as_u64().filter(|_| z["state"] == "ready")
    };
    assert!(
        wait_until(PATIENCE, || async { ready().await.is_some() }).await,
        "the {server} zygote gets ready: {}",
        zygote(ts, server).await
    );
    ready().await.unwrap() as u32
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Whether `needle` occurs anywhere in the readable memory of `pid`.
fn memory_contains(pid: u32, needle: &[u8]) -> bool {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.contains("[vsyscall]") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut buf = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        if buf.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preforked_third_party_servers_list_tools_and_reach_their_own_code() {
    let ts = TestServer::start("", &third_party_preforked(), "", &[]).await;
    let ada = ts.user("ada");
    connect_with(&ada, "time", "ada-time-token").await;
    connect_with(&ada, "analytics", "ada-analytics-token").await;
    let time_zygote = ready_zygote_pid(&ts, "time").await;
    let analytics_zygote = ready_zygote_pid(&ts, "analytics").await;

    // mcp-server-time: its tools, and a real answer from its own code.
    let tools = ada.get("/v1/connections/time/tools").await;
    assert_eq!(tools.status, 200, "{}", tools.text());
    let names = tools.text();
    assert!(
        names.contains("get_current_time") && names.contains("convert_time"),
        "{names}"
    );
    let now = ada
        .call(
            "time",
            "get_current_time",
            &json!({ "timezone": "Europe/Paris" }),
        )
        .await;
    assert_eq!(now.status, 200, "{}", now.text());
    assert!(
        content_text(&now.json()).contains("Europe/Paris"),
        "{}",
        now.text()
    );

    // analytics-mcp: nine tools; a call gets past loading the credentials (from the memfd)
    // into Google's client code, which fails offline as it does when spawned.
    let tools = ada.get("/v1/connections/analytics/tools").await;
    assert_eq!(tools.status, 200, "{}", tools.text());
    for expected in ["get_account_summaries", "run_report", "run_realtime_report"] {
        assert!(tools.text().contains(expected), "{}", tools.text());
    }
    let call = ada
        .call("analytics", "get_account_summaries", &json!({}))
        .await;
    let body = call.text();
    assert_eq!(call.status, 200, "{body}");
    assert_eq!(call.json()["is_error"], true, "{body}");
    common::assert_reached_google(&body);

    // Both sessions are children of their zygotes, confined, and counted as forks.
    for (server, zygote_pid) in [("time", time_zygote), ("analytics", analytics_zygote)] {
        let s = session(&ts, "ada", server).await;
        assert_eq!(s["started"], "forked", "{s}");
        assert_eq!(s["sandbox"], "enforced", "{s}");
        let pid = s["pid"].as_u64().unwrap() as u32;
        assert_eq!(
            parent_of(pid),
            Some(zygote_pid),
            "{server} forked from its zygote"
        );
        let z = zygote(&ts, server).await;
        assert!(z["forks"].as_u64().unwrap() >= 1, "{z}");
        assert_eq!(z["fallbacks"], 0, "{z}");
        // Both run on anyio, whose event-loop backend is imported only once a server runs:
        // the rehearsal brought it into the zygote.
        assert!(z["preloaded"].as_u64().unwrap() >= 1, "{z}");
    }
    let metrics = ts.anonymous().get("/metrics").await.text();
    assert!(
        metrics.contains("mcp_pool_prefork_fallbacks{server=\"analytics\"} 0")
            && metrics.contains("mcp_pool_prefork_forks{server=\"time\"} "),
        "{metrics}"
    );
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forked_child_is_confined_like_a_spawned_one_and_sees_only_its_own_credentials() {
    let scripts = tempfile::tempdir().unwrap();
    let script = probe_script(scripts.path(), "mcp_pool_probe");
    let ts = TestServer::start(
        "",
        &probe_server("probe", &script, "prefork = true"),
        "",
        &[],
    )
    .await;
    let dir = ts.dir.path().to_owned();
    let alice = ts.user("alice");
    let mallory = ts.user("mallory");
    connect_with(&alice, "probe", "alice-secret-4f1d").await;
    connect_with(&mallory, "probe", "mallory-secret-9c2e").await;
    let zygote_pid = ready_zygote_pid(&ts, "probe").await;

    let alices = probe(&alice, "probe", "whoami", json!({})).await;
    let mallorys = probe(&mallory, "probe", "whoami", json!({})).await;
    // Each sees its own credentials (through the memfd), and nothing else's.
    for (who, token) in [
        (&alices, "alice-secret-4f1d"),
        (&mallorys, "mallory-secret-9c2e"),
    ] {
        let creds = &who["credentials_file"];
        assert!(
            creds["path"]
                .as_str()
                .unwrap()
                .starts_with("/proc/self/fd/"),
            "{creds}"
        );
        assert!(
            creds["contents"].as_str().unwrap().contains(token),
            "{creds}"
        );
    }
    assert!(!mallorys.to_string().contains("alice-secret"));
    let alice_server = session(&ts, "alice", "probe").await["pid"]
        .as_u64()
        .unwrap() as u32;
    assert_ne!(alice_server, 0);
    assert_eq!(parent_of(alice_server), Some(zygote_pid));
    let service = std::process::id();

    let alice_credentials = dir.join("creds/alice/probe/credentials.json");
    assert!(alice_credentials.is_file(), "alice's file exists");
    let config_file = std::env::current_dir().unwrap().join("Cargo.toml");
    let alice_memfd = format!("/proc/{alice_server}/fd/3");
    for target in [
        alice_credentials.display().to_string(),
        dir.join("data/key").display().to_string(),
        dir.join("data/api.key").display().to_string(),
        dir.join("data/db.sqlite").display().to_string(),
        config_file.display().to_string(),
        format!("/proc/{service}/environ"),
        format!("/proc/{zygote_pid}/environ"),
        format!("/proc/{alice_server}/environ"),
        alice_memfd,
        // Inside the zygote's namespace the pids are small: none of them is readable.
        "/proc/1/environ".to_owned(),
        "/proc/2/environ".to_owned(),
        "/proc/self/environ".to_owned(),
        "/etc/shadow".to_owned(),
    ] {
        let report = probe(&mallory, "probe", "read_file", json!({ "path": target })).await;
        denied(&report, &format!("reading {target}"));
    }
    // No /proc at all, nor the data or credentials directories.
    for target in [
        "/proc".to_owned(),
        dir.join("data").display().to_string(),
        dir.join("creds").display().to_string(),
        dir.join("state/alice").display().to_string(),
    ] {
        let report = probe(&mallory, "probe", "list_dir", json!({ "path": target })).await;
        assert_eq!(denied(&report, &format!("listing {target}")), EACCES);
    }
    // Writing outside its own state directory.
    for target in [
        dir.join("data/planted"),
        dir.join("state/alice/probe/planted"),
        PathBuf::from("/tmp/mcp-pool-prefork-probe"),
    ] {
        let report = probe(
            &mallory,
            "probe",
            "write_file",
            json!({ "path": target, "content": "x" }),
        )
        .await;
        assert_eq!(
            denied(&report, &format!("writing {}", target.display())),
            EACCES
        );
        assert!(!target.exists());
    }
    let own = dir.join("state/mallory/probe/scratch.txt");
    let wrote = probe(
        &mallory,
        "probe",
        "write_file",
        json!({ "path": own, "content": "mine" }),
    )
    .await;
    assert_eq!(wrote["ok"], true, "{wrote}");
    // Signals: the service, the zygote, alice's server, the namespace's init (pid 1) and
    // the zygote as the namespace sees it (pid 2): all outside its Landlock domain.
    for (pid, what) in [
        (service, "the service"),
        (zygote_pid, "the zygote"),
        (alice_server, "alice's server"),
        (1, "the namespace's init"),
        (2, "the zygote in its namespace"),
    ] {
        let report = probe(
            &mallory,
            "probe",
            "signal",
            json!({ "pid": pid, "signal": 15 }),
        )
        .await;
        denied(&report, &format!("signalling {what}"));
    }
    assert!(alive(alice_server) && alive(zygote_pid));

    // Environment: the allowlist, its HOME and its credentials variable.
    let env = probe(&mallory, "probe", "env", json!({})).await;
    for name in env["value"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        assert!(
            common::allowed_server_env(name, &["PYTHONPATH"]),
            "unexpected variable {name} in {env}"
        );
    }
    // No capabilities, no_new_privs, the session's file limit.
    let privileges = probe(&mallory, "probe", "privileges", json!({})).await;
    let privileges = &privileges["value"];
    for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        assert_eq!(privileges[set], "0000000000000000", "{set}: {privileges}");
    }
    assert_eq!(privileges["NoNewPrivs"], "1");
    assert_eq!(privileges["MaxOpenFiles"], "1024");
    // Each child sits in its own session cgroup, not the zygote's.
    let cgroup_of = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mallory_server = session(&ts, "mallory", "probe").await["pid"]
        .as_u64()
        .unwrap() as u32;
    let (a, m, z) = (
        cgroup_of(alice_server),
        cgroup_of(mallory_server),
        cgroup_of(zygote_pid),
    );
    let memory = |text: &str| {
        text.lines()
            .find(|l| l.contains(":memory:"))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(memory(&a).contains("mcp-pool-"), "{a}");
    assert_ne!(memory(&a), memory(&m));
    assert_ne!(memory(&a), memory(&z));

    // The zygote holds no secret: not in its environment, not in its memory, no file of the
    // credentials directory open.
    let environ = std::fs::read(format!("/proc/{zygote_pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(!environ.contains("MCP_POOL_CREDENTIALS_FILE"), "{environ}");
    assert!(!environ.contains("secret"), "{environ}");
    for token in ["alice-secret-4f1d", "mallory-secret-9c2e"] {
        assert!(
            !memory_contains(zygote_pid, token.as_bytes()),
            "{token} in the zygote's memory"
        );
    }
    for fd in std::fs::read_dir(format!("/proc/{zygote_pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        assert!(
            !target.starts_with(dir.join("creds")) && !target.to_string_lossy().contains("memfd"),
            "the zygote holds {}",
            target.display()
        );
    }
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_forked_child_restarts_it_and_leaves_other_users_alone() {
    let ts = TestServer::start("", &third_party_preforked(), "", &[]).await;
    let (bea, cal) = (ts.user("bea"), ts.user("cal"));
    connect_with(&bea, "time", "bea-token").await;
    connect_with(&cal, "time", "cal-token").await;
    let time_now = json!({ "timezone": "UTC" });
    for user in [&bea, &cal] {
        assert_eq!(
            user.call("time", "get_current_time", &time_now)
                .await
                .status,
            200
        );
    }
    let bea_pid = session(&ts, "bea", "time").await["pid"].as_u64().unwrap() as u32;
    let cal_pid = session(&ts, "cal", "time").await["pid"].as_u64().unwrap() as u32;
    kill(Pid::from_raw(bea_pid as i32), Signal::SIGKILL).unwrap();
    assert!(
        restarted(&ts, "bea", "time", bea_pid).await,
        "bea's session restarts"
    );
    let s = session(&ts, "bea", "time").await;
    assert_eq!(s["started"], "forked", "restarted by fork: {s}");
    assert_eq!(
        bea.call("time", "get_current_time", &time_now).await.status,
        200
    );
    // Cal's session never noticed.
    let c = session(&ts, "cal", "time").await;
    assert_eq!(c["pid"].as_u64(), Some(u64::from(cal_pid)), "{c}");
    assert_eq!(c["restarts"], 0, "{c}");
    assert_eq!(
        cal.call("time", "get_current_time", &time_now).await.status,
        200
    );
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_zygote_restarts_it_and_its_sessions() {
    let ts = TestServer::start(
        "restart_backoff_base = \"50ms\"\n",
        &third_party_preforked(),
        "",
        &[],
    )
    .await;
    let dee = ts.user("dee");
    connect_with(&dee, "time", "dee-token").await;
    let time_now = json!({ "timezone": "UTC" });
    assert_eq!(
        dee.call("time", "get_current_time", &time_now).await.status,
        200
    );
    let old_zygote = ready_zygote_pid(&ts, "time").await;
    let old_child = session(&ts, "dee", "time").await["pid"].as_u64().unwrap() as u32;
    kill(Pid::from_raw(old_zygote as i32), Signal::SIGKILL).unwrap();
    // Its children die with its PID namespace; the sessions restart, the zygote too.
    assert!(
        wait_until(PATIENCE, || std::future::ready(!alive(old_child))).await,
        "the forked child died with its zygote"
    );
    assert!(
        restarted(&ts, "dee", "time", old_child).await,
        "dee's session restarts"
    );
    assert_eq!(
        dee.call("time", "get_current_time", &time_now).await.status,
        200
    );
    // A new zygote is up, and new sessions fork from it again.
    let z = zygote(&ts, "time").await;
    assert!(
        z["restarts"].as_u64().unwrap() >= 1 || z["fallbacks"].as_u64().unwrap() >= 1,
        "{z}"
    );
    let new_zygote = ready_zygote_pid(&ts, "time").await;
    assert_ne!(new_zygote, old_zygote);
    let eve = ts.user("eve");
    connect_with(&eve, "time", "eve-token").await;
    assert_eq!(
        eve.call("time", "get_current_time", &time_now).await.status,
        200
    );
    let e = session(&ts, "eve", "time").await;
    assert_eq!(e["started"], "forked", "{e}");
    assert_eq!(
        parent_of(e["pid"].as_u64().unwrap() as u32),
        Some(new_zygote)
    );
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_at_import_or_a_broken_entry_point_fall_back_to_a_plain_spawn() {
    let scripts = tempfile::tempdir().unwrap();
    let threaded = probe_script(scripts.path(), "mcp_pool_probe_threaded");
    let plain = probe_script(scripts.path(), "mcp_pool_probe");
    let servers = format!(
        "{}{}",
        probe_server("threaded", &threaded, "prefork = true"),
        probe_server(
            "broken",
            &plain,
            "[servers.broken.prefork]\nmodule = \"no_such_module_here\"\nfunction = \"main\"\n"
        ),
    );
    let ts = TestServer::start("", &servers, "", &[]).await;
    let fay = ts.user("fay");
    for server in ["threaded", "broken"] {
        connect_with(&fay, server, "fay-token").await;
        let who = probe(&fay, server, "whoami", json!({})).await;
        assert!(who["pid"].as_u64().is_some(), "{who}");
        let s = session(&ts, "fay", server).await;
        assert_eq!(s["started"], "spawned", "{s}");
        assert_eq!(s["sandbox"], "enforced", "{s}");
        let z = zygote(&ts, server).await;
        assert!(z["fallbacks"].as_u64().unwrap() >= 1, "{z}");
        let events = ts.state.pool.recent_events();
        assert!(
            events.iter().any(|event| event.server.as_str() == server
                && event.user_id.as_str() == "fay"
                && matches!(&event.kind, EventKind::PreforkFallback { cause } if !cause.is_empty())),
            "a prefork_fallback event for {server}: {events:?}"
        );
    }
    let z = zygote(&ts, "threaded").await;
    assert_eq!(z["state"], "disabled", "{z}");
    assert!(z["reason"].as_str().unwrap().contains("threads"), "{z}");
    let z = zygote(&ts, "broken").await;
    assert_eq!(z["state"], "disabled", "{z}");
    assert!(
        z["reason"]
            .as_str()
            .unwrap()
            .contains("no_such_module_here"),
        "{z}"
    );
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_of_the_service_no_zygote_and_no_forked_child_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let time = required_env("MCP_POOL_TEST_TIME_BIN");
    let config = service::write_config(
        dir.path(),
        &format!(
            "[servers.time]\ncommand = {time:?}\nprefork = true\n\
             credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n"
        ),
    );
    let mut service = service::Service::start(&config);
    let data = dir.path().join("data");
    for user in ["gil", "hal"] {
        let client = service.client(user);
        connect_with(&client, "time", &format!("{user}-token")).await;
        let now = client
            .call("time", "get_current_time", &json!({ "timezone": "UTC" }))
            .await;
        assert_eq!(now.status, 200, "{}", now.text());
    }
    let stats = service.stats(&data).await;
    let mut pids: Vec<u32> = stats["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["started"], "forked", "{c}");
            c["pid"].as_u64().unwrap() as u32
        })
        .collect();
    let zygote = stats["prefork"][0]["pid"].as_u64().expect("zygote pid") as u32;
    pids.push(zygote);
    // The init of the zygote's namespace and the shim leading its group, too.
    let init = parent_of(zygote).expect("the zygote's init");
    pids.extend([init, parent_of(init).expect("the zygote's shim")]);
    assert!(pids.iter().all(|pid| alive(*pid)), "{pids:?}");

    service.signal(Signal::SIGKILL);
    service.wait();
    for pid in pids {
        assert!(
            wait_until(PATIENCE, || std::future::ready(!alive(pid))).await,
            "pid {pid} outlived a SIGKILLed service"
        );
    }
}
