//! The supervised pool against real child processes: the bundled demo server, and the
//! third-party servers the test command installs.

mod common;

use std::time::{Duration, Instant};

use common::{alive, gone, test_config, wait_until};
use mcp_pool::actors::{PoolError, PoolHandle, SessionState};
use mcp_pool::app::App;
use mcp_pool::store::CredentialWriter;
use mcp_pool::store::{Secret, ServerName, Tokens, UserId};
use rmcp::model::CallToolResult;
use serde_json::{Value, json};

/// "Promptly": far below the 60 s call timeout, far above any honest scheduling delay.
const PROMPTLY: Duration = Duration::from_secs(20);
const LONG: Duration = Duration::from_secs(30);

struct Harness {
    app: App,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(pool: &str, extra: &str) -> Harness {
        Harness::start_with(pool, extra, |_| {}).await
    }

    /// Like `start`, with a last say on the config.
    async fn start_with(
        pool: &str,
        extra: &str,
        adjust: impl FnOnce(&mut mcp_pool::config::Config),
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path(), pool, extra);
        adjust(&mut config);
        let app = App::build(config).await.expect("app starts");
        Harness { app, _dir: dir }
    }

    fn pool(&self) -> &PoolHandle {
        &self.app.pool
    }

    /// Stores credentials for (user, server) so the pool can start it.
    async fn connect(&self, user: &str, server: &str) -> (UserId, ServerName) {
        let (user, server) = (
            UserId::parse(user).unwrap(),
            ServerName::parse(server).unwrap(),
        );
        let tokens = Tokens {
            access_token: Some(Secret::new(format!("token-of-{user}"))),
            refresh_token: Some(Secret::new("refresh")),
            token_expiry: None,
        };
        self.app
            .storage
            .credentials
            .create(&user, &server, tokens)
            .await
            .unwrap();
        (user, server)
    }

    async fn state_of(&self, user: &UserId, server: &ServerName) -> Option<SessionState> {
        let stats = self.pool().stats().await.unwrap();
        stats
            .connections
            .iter()
            .find(|c| &c.user_id == user && &c.server == server)
            .map(|c| c.state)
    }

    /// Restarts scheduled so far for the key, and whether its circuit is open.
    async fn restarts_of(&self, user: &UserId, server: &ServerName) -> (u32, bool) {
        let stats = self.pool().stats().await.unwrap();
        stats
            .connections
            .iter()
            .find(|c| &c.user_id == user && &c.server == server)
            .map_or((0, false), |c| {
                (c.restarts, c.state == SessionState::Failed)
            })
    }

    /// Connections with a call in flight.
    async fn busy_connections(&self) -> usize {
        let stats = self.pool().stats().await.unwrap();
        stats.connections.iter().filter(|c| c.in_flight > 0).count()
    }

    async fn stop(self) {
        self.app.stop().await;
    }
}

fn args(value: Value) -> Option<serde_json::Map<String, Value>> {
    match value {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

fn text(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|block| block.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("")
}

async fn echo(pool: &PoolHandle, user: &UserId, server: &ServerName, message: &str) -> String {
    let result = pool
        .call_tool(user, server, "echo", args(json!({ "message": message })))
        .await
        .expect("echo succeeds");
    text(&result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reuses_its_session_and_users_get_their_own() {
    let h = Harness::start("", "").await;
    let (alice, demo) = h.connect("alice", "demo").await;
    let (bob, _) = h.connect("bob", "demo").await;

    let first = h.pool().get_session(&alice, &demo).await.unwrap();
    let second = h.pool().get_session(&alice, &demo).await.unwrap();
    assert_eq!(first.pid(), second.pid(), "same session reused");
    let bobs = h.pool().get_session(&bob, &demo).await.unwrap();
    assert_ne!(first.pid(), bobs.pid(), "each user has their own process");

    // The server was handed this user's credentials file, and can read it.
    let whoami: Value =
        serde_json::from_str(&text(&first.call_tool("whoami", None).await.unwrap())).unwrap();
    let rendered = whoami.to_string();
    assert!(
        rendered.contains("/creds/alice/demo/credentials.json"),
        "{rendered}"
    );
    assert!(rendered.contains("access_token"), "{rendered}");
    assert!(
        !rendered.contains("token-of-alice"),
        "whoami never shows secrets: {rendered}"
    );

    assert_eq!(echo(h.pool(), &alice, &demo, "hi").await, "hi");
    let stats = h.pool().stats().await.unwrap();
    assert_eq!(stats.total_connections, 2);
    assert_eq!(stats.active_connections, 2);
    assert_eq!(stats.user_breakdown.get("alice"), Some(&1));
    let alices = stats
        .connections
        .iter()
        .find(|c| c.user_id == alice)
        .unwrap();
    assert_eq!(alices.pid, Some(first.pid()));
    assert!(alices.tool_count >= 4);
    assert!(alices.last_used.is_some() && alices.started_at.is_some());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_first_requests_start_one_process() {
    let h = Harness::start("", "").await;
    let (carol, demo) = h.connect("carol", "demo").await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (pool, carol, demo) = (h.pool().clone(), carol.clone(), demo.clone());
        tasks.spawn(async move { pool.get_session(&carol, &demo).await.map(|c| c.pid()) });
    }
    let mut pids = std::collections::BTreeSet::new();
    while let Some(result) = tasks.join_next().await {
        pids.insert(result.unwrap().expect("connection"));
    }
    assert_eq!(pids.len(), 1, "one process for one key: {pids:?}");
    // The process registry records every group spawned and still running: exactly one.
    let records = std::fs::read_dir(h._dir.path().join("data/pgids"))
        .unwrap()
        .count();
    assert_eq!(records, 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_start_for_one_user_does_not_delay_another() {
    // A server whose start outlasts the test: whatever Erin does, Dave's start is still running,
    // however slow the machine. Its start is cut short by the shutdown grace at the end.
    let glacial = format!(
        "[servers.glacial]\ncommand = {:?}\nargs = [\"demo-server\", \"--slow-start\", \"1h\"]\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n",
        common::BIN
    );
    let h = Harness::start_with("", &glacial, |config| {
        config.pool.startup_timeout = Duration::from_secs(7200);
        config.service.shutdown_grace = Duration::from_secs(2);
    })
    .await;
    let (dave, slow) = h.connect("dave", "glacial").await;
    let (erin, demo) = h.connect("erin", "demo").await;
    assert_eq!(echo(h.pool(), &erin, &demo, "warm").await, "warm");

    let pool = h.pool().clone();
    let (d, s) = (dave.clone(), slow.clone());
    let slow_start = tokio::spawn(async move { pool.get_session(&d, &s).await.map(|c| c.pid()) });
    assert!(
        wait_until(LONG, || async {
            h.state_of(&dave, &slow).await == Some(SessionState::Starting)
        })
        .await
    );
    for i in 0..20 {
        assert_eq!(
            echo(h.pool(), &erin, &demo, &format!("m{i}")).await,
            format!("m{i}")
        );
    }
    // Erin's twenty warm calls completed while Dave's request still waits for its start.
    assert_eq!(h.state_of(&dave, &slow).await, Some(SessionState::Starting));
    assert!(!slow_start.is_finished(), "Dave's start ended early");
    h.stop().await;
    // The waiting request is answered at shutdown rather than left hanging.
    let answered = tokio::time::timeout(LONG, slow_start).await;
    assert!(
        matches!(answered, Ok(Ok(Err(_)))),
        "the waiter got an error at shutdown: {answered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_come_from_the_cache_and_list_changed_refreshes_it() {
    let h = Harness::start("", "").await;
    let (frank, demo) = h.connect("frank", "demo").await;
    let conn = h.pool().get_session(&frank, &demo).await.unwrap();
    let pid = conn.pid() as i32;

    // A stopped server cannot answer anything: the tool list must come from the cache.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let tools = h.pool().list_tools(&frank, &demo).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
    let names: Vec<String> = tools.unwrap().iter().map(|t| t.name.to_string()).collect();
    assert!(names.contains(&"echo".to_owned()) && names.contains(&"whoami".to_owned()));
    assert!(!names.contains(&"extra_1".to_owned()));

    conn.call_tool("trigger_list_changed", None).await.unwrap();
    let refreshed = wait_until(LONG, || async {
        h.pool()
            .list_tools(&frank, &demo)
            .await
            .unwrap()
            .iter()
            .any(|t| t.name == "extra_1")
    })
    .await;
    assert!(
        refreshed,
        "notifications/tools/list_changed refreshed the cache"
    );
    assert_eq!(
        conn.pid(),
        h.pool().get_session(&frank, &demo).await.unwrap().pid()
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_fails_in_flight_calls_promptly_and_the_connection_restarts() {
    let h = Harness::start(
        "restart_backoff_base = \"10ms\"\nrestart_backoff_cap = \"100ms\"",
        "",
    )
    .await;
    let (gina, demo) = h.connect("gina", "demo").await;
    let (hank, _) = h.connect("hank", "demo").await;
    let conn = h.pool().get_session(&gina, &demo).await.unwrap();
    let old_pid = conn.pid();
    assert_eq!(echo(h.pool(), &hank, &demo, "warm").await, "warm");

    let mut in_flight = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let conn = conn.clone();
        in_flight.spawn(async move {
            let started = Instant::now();
            let result = conn.call_tool("sleep", args(json!({ "ms": 50_000 }))).await;
            (result, started.elapsed())
        });
    }
    // Another user keeps calling throughout.
    let pool = h.pool().clone();
    let (hank2, demo2) = (hank.clone(), demo.clone());
    let others = tokio::spawn(async move {
        let mut ok = 0;
        for i in 0..50 {
            let result = pool
                .call_tool(
                    &hank2,
                    &demo2,
                    "echo",
                    args(json!({ "message": format!("{i}") })),
                )
                .await;
            assert_eq!(
                text(&result.expect("other users are unaffected")),
                format!("{i}")
            );
            ok += 1;
        }
        ok
    });
    assert!(
        wait_until(LONG, || async {
            h.pool()
                .stats()
                .await
                .unwrap()
                .connections
                .iter()
                .any(|c| c.user_id == gina && c.in_flight == 8)
        })
        .await
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    while let Some(joined) = in_flight.join_next().await {
        let (result, elapsed) = joined.unwrap();
        assert!(
            matches!(result, Err(PoolError::ServerCrashed)),
            "{result:?}"
        );
        assert!(elapsed < PROMPTLY, "failed after {elapsed:?}, not promptly");
    }
    // Restarted by the supervisor: a new process answers.
    let restarted = wait_until(LONG, || async {
        h.pool()
            .get_session(&gina, &demo)
            .await
            .is_ok_and(|c| c.pid() != old_pid)
    })
    .await;
    assert!(restarted);
    assert_eq!(echo(h.pool(), &gina, &demo, "back").await, "back");
    assert!(
        wait_until(LONG, || async { gone(old_pid) }).await,
        "the killed leader was reaped"
    );
    let stats = h.pool().stats().await.unwrap();
    let ginas = stats
        .connections
        .iter()
        .find(|c| c.user_id == gina)
        .unwrap();
    assert_eq!(ginas.restarts, 1);
    assert_eq!(others.await.unwrap(), 50);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_on_a_session_that_died_before_it_was_sent_is_retried_on_a_new_one() {
    let h = Harness::start(
        "restart_backoff_base = \"10ms\"\nrestart_backoff_cap = \"100ms\"",
        "",
    )
    .await;
    let (ivy, demo) = h.connect("ivy", "demo").await;
    let stale = h.pool().get_session(&ivy, &demo).await.unwrap();
    let old_pid = stale.pid();
    assert_eq!(echo(h.pool(), &ivy, &demo, "before").await, "before");

    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(old_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        wait_until(LONG, || async { stale.is_closed() }).await,
        "the killed session's transport closes"
    );
    // On the dead session itself the call is refused before anything is written: not a crash
    // during the call, so the caller may send it elsewhere.
    let unsent = stale
        .call_tool("echo", args(json!({ "message": "x" })))
        .await;
    assert!(matches!(unsent, Err(PoolError::Reconnect)), "{unsent:?}");

    // Through the pool, right away (whether or not the pool has seen the crash yet), the call
    // is retried once on a fresh session and succeeds.
    assert_eq!(echo(h.pool(), &ivy, &demo, "after").await, "after");
    let fresh = h.pool().get_session(&ivy, &demo).await.unwrap();
    assert_ne!(fresh.pid(), old_pid, "a new session answered");
    let stats = h.pool().stats().await.unwrap();
    let ivys = stats.connections.iter().find(|c| c.user_id == ivy).unwrap();
    assert_eq!(ivys.restarts, 1, "the crash counted once");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_beyond_the_limit_queue_and_their_timeout_runs_from_the_spawn() {
    // The slow server takes 8 s to start: two in a row take 16 s, past the 12 s limit, which
    // only the spawn-to-ready part of each may use.
    let startup_timeout = Duration::from_secs(12);
    let h = Harness::start_with("", "", |config| {
        config.pool.max_concurrent_starts = 1;
        config.pool.startup_timeout = startup_timeout;
    })
    .await;
    let (jo, slow) = h.connect("jo", "slow").await;
    let (kim, _) = h.connect("kim", "slow").await;

    let requested = Instant::now();
    let starts: Vec<_> = [jo.clone(), kim.clone()]
        .into_iter()
        .map(|user| {
            let (pool, slow) = (h.pool().clone(), slow.clone());
            tokio::spawn(async move {
                let connection = pool.get_session(&user, &slow).await;
                (connection, requested.elapsed())
            })
        })
        .collect();
    let mut waited = Vec::new();
    for start in starts {
        let (connection, elapsed) = start.await.unwrap();
        assert!(connection.is_ok(), "{:?}", connection.err());
        waited.push(elapsed);
    }
    let longest = waited.into_iter().max().unwrap();
    assert!(
        longest > startup_timeout,
        "the queued start waited {longest:?} in all and still succeeded"
    );
    // One after the other, not side by side: the two sessions became ready a start apart.
    let stats = h.pool().stats().await.unwrap();
    let ready_at: Vec<_> = stats
        .connections
        .iter()
        .map(|c| c.started_at.expect("ready"))
        .collect();
    assert_eq!(ready_at.len(), 2);
    let apart = (ready_at[0] - ready_at[1]).abs();
    assert!(
        apart >= chrono::Duration::seconds(7),
        "the second start ran only after the first: {apart}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_pings_is_restarted() {
    let h = Harness::start_with("", "", |config| {
        config.pool.health_interval = Duration::from_secs(2);
        config.pool.ping_timeout = Duration::from_secs(1);
        config.pool.restart_backoff_base = Duration::from_millis(10);
        config.pool.restart_backoff_cap = Duration::from_millis(100);
    })
    .await;
    let (lee, demo) = h.connect("lee", "demo").await;
    let old_pid = h.pool().get_session(&lee, &demo).await.unwrap().pid();
    let stats_of = || async {
        let stats = h.pool().stats().await.unwrap();
        stats.connections.into_iter().find(|c| c.user_id == lee)
    };
    // An idle healthy session is checked, and the check passes.
    assert!(
        wait_until(LONG, || async {
            stats_of()
                .await
                .is_some_and(|c| c.last_health_check.is_some())
        })
        .await,
        "an idle session was pinged"
    );
    let checked = stats_of().await.unwrap();
    assert_eq!((checked.restarts, checked.pid), (0, Some(old_pid)));

    // Alive but hung: the whole group (the sandbox shim leads it; the server is inside) stops.
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(old_pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    assert!(
        wait_until(LONG, || async {
            stats_of().await.is_some_and(|c| {
                c.state == SessionState::Ready && c.pid.is_some_and(|pid| pid != old_pid)
            })
        })
        .await,
        "the hung session was replaced by a new one"
    );
    let restarted = stats_of().await.unwrap();
    assert_eq!(restarted.restarts, 1, "restarted under the restart policy");
    assert!(
        wait_until(LONG, || async { gone(old_pid) }).await,
        "the stopped server was killed and reaped, not left behind"
    );
    assert_eq!(echo(h.pool(), &lee, &demo, "awake").await, "awake");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_trips_the_circuit_and_recovers_after_the_cool_down() {
    let h = Harness::start(
        "max_restarts = 2\nrestart_window = \"60s\"\nrestart_backoff_base = \"10ms\"\n\
         restart_backoff_cap = \"50ms\"\nfailed_cooldown = \"3s\"",
        "",
    )
    .await;
    let (ivan, demo) = h.connect("ivan", "demo").await;
    let (judy, _) = h.connect("judy", "demo").await;
    assert_eq!(echo(h.pool(), &judy, &demo, "x").await, "x");

    let mut crashes = 0;
    let (asked_at, circuit_open) = loop {
        let asked_at = Instant::now();
        match h.pool().get_session(&ivan, &demo).await {
            Ok(conn) => {
                let (restarts, _) = h.restarts_of(&ivan, &demo).await;
                let crashed = conn.call_tool("crash", None).await;
                assert!(crashed.is_err(), "{crashed:?}");
                crashes += 1;
                assert!(crashes <= 3, "still restarting after {crashes} crashes");
                // Wait for the supervisor to handle the crash before asking again: it either
                // schedules a restart (a counter, so a restart too quick to see as a state is
                // not missed) or opens the circuit.
                assert!(
                    wait_until(LONG, || async {
                        let (now, open) = h.restarts_of(&ivan, &demo).await;
                        now > restarts || open
                    })
                    .await,
                    "crash {crashes} was handled"
                );
            }
            Err(PoolError::CircuitOpen { retry_after }) => break (asked_at, retry_after),
            Err(other) => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(
        crashes, 3,
        "max_restarts = 2: the third crash trips the circuit"
    );
    assert!(
        circuit_open > Duration::ZERO && circuit_open <= Duration::from_secs(3),
        "{circuit_open:?}"
    );
    assert_eq!(h.state_of(&ivan, &demo).await, Some(SessionState::Failed));
    // Another key is untouched by Ivan's crash loop.
    assert_eq!(
        echo(h.pool(), &judy, &demo, "still fine").await,
        "still fine"
    );

    // During the cool-down every request is refused; the first success comes no earlier than
    // the cool-down the pool announced (it was computed after `asked_at`).
    let refused = std::cell::Cell::new(0);
    let recovered = wait_until(LONG, || async {
        match h.pool().get_session(&ivan, &demo).await {
            Ok(_) => true,
            Err(PoolError::CircuitOpen { .. }) => {
                refused.set(refused.get() + 1);
                false
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    })
    .await;
    assert!(recovered, "one probe start is allowed after the cool-down");
    let waited = asked_at.elapsed();
    assert!(
        waited >= circuit_open,
        "recovered after {waited:?}, before the announced cool-down of {circuit_open:?}"
    );
    assert!(
        refused.get() > 0,
        "requests during the cool-down were refused"
    );
    let probe = h.pool().get_session(&ivan, &demo).await.unwrap();
    assert_eq!(echo(h.pool(), &ivan, &demo, "ok").await, "ok");

    // The probe cleared the history: with the three old failures still inside the 60 s
    // window, one more crash would trip the circuit again; instead it restarts.
    assert!(probe.call_tool("crash", None).await.is_err());
    let restarted = wait_until(LONG, || async {
        match h.pool().get_session(&ivan, &demo).await {
            Ok(conn) => conn.pid() != probe.pid(),
            Err(PoolError::CircuitOpen { .. }) => panic!("the old failures were still counted"),
            Err(_) => false,
        }
    })
    .await;
    assert!(restarted, "the crash after recovery was restarted");
    assert_eq!(echo(h.pool(), &ivan, &demo, "again").await, "again");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_closes_idle_connections_but_never_a_busy_one() {
    let h = Harness::start("idle_timeout = \"500ms\"\nreap_interval = \"100ms\"", "").await;
    let (kate, demo) = h.connect("kate", "demo").await;
    let (leo, _) = h.connect("leo", "demo").await;
    let idle_pid = h.pool().get_session(&kate, &demo).await.unwrap().pid();
    let busy = h.pool().get_session(&leo, &demo).await.unwrap();
    let busy_pid = busy.pid();
    // A call far longer than the test: whatever the machine's speed, it is in flight below.
    let call = tokio::spawn(async move {
        busy.call_tool("sleep", args(json!({ "ms": 600_000 })))
            .await
    });

    assert!(
        wait_until(LONG, || async { h.state_of(&kate, &demo).await.is_none() }).await,
        "the idle connection is reaped"
    );
    assert!(
        wait_until(LONG, || async { gone(idle_pid) }).await,
        "and its process is gone"
    );
    // Leo's call has been running for longer than the idle timeout: still there.
    assert_eq!(h.state_of(&leo, &demo).await, Some(SessionState::Ready));
    assert!(alive(busy_pid));
    assert!(!call.is_finished(), "the busy call is still running");
    // Once its caller gives up (the request is cancelled) it is idle, and goes too.
    call.abort();
    assert!(wait_until(LONG, || async { h.state_of(&leo, &demo).await.is_none() }).await);
    assert!(wait_until(LONG, || async { gone(busy_pid) }).await);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_evicts_the_least_recently_used_idle_connection() {
    let h = Harness::start("max_connections = 3\nmax_connections_per_user = 2", "").await;
    let (mia, demo) = h.connect("mia", "demo").await;
    let (_, demo2) = h.connect("mia", "demo2").await;
    let (_, demo3) = h.connect("mia", "demo3").await;
    let (ned, _) = h.connect("ned", "demo").await;
    let (olga, _) = h.connect("olga", "demo").await;

    h.pool().get_session(&mia, &demo).await.unwrap();
    h.pool().get_session(&mia, &demo2).await.unwrap();
    echo(h.pool(), &mia, &demo, "touch").await; // demo2 is now the least recently used
    h.pool().get_session(&mia, &demo3).await.unwrap();
    assert_eq!(
        h.state_of(&mia, &demo2).await,
        None,
        "LRU evicted for the per-user cap"
    );
    assert!(h.state_of(&mia, &demo).await.is_some());

    // Both of Mia's connections busy: no room for a third of hers.
    let busy: Vec<_> = [demo.clone(), demo3.clone()]
        .into_iter()
        .map(|server| {
            let (pool, mia) = (h.pool().clone(), mia.clone());
            tokio::spawn(async move {
                pool.call_tool(&mia, &server, "sleep", args(json!({ "ms": 600_000 })))
                    .await
            })
        })
        .collect();
    assert!(wait_until(LONG, || async { h.busy_connections().await == 2 }).await);
    let full = h.pool().get_session(&mia, &demo2).await;
    assert!(
        matches!(full, Err(PoolError::PoolFull { .. })),
        "{:?}",
        full.map(|c| c.pid())
    );

    // Global cap 3: Ned takes the last slot; Olga's request evicts the only idle one, Ned's.
    h.pool().get_session(&ned, &demo).await.unwrap();
    h.pool().get_session(&olga, &demo).await.unwrap();
    assert_eq!(
        h.state_of(&ned, &demo).await,
        None,
        "LRU evicted for the global cap"
    );
    let (pool, o, d) = (h.pool().clone(), olga.clone(), demo.clone());
    let olgas = tokio::spawn(async move {
        pool.call_tool(&o, &d, "sleep", args(json!({ "ms": 600_000 })))
            .await
    });
    assert!(wait_until(LONG, || async { h.busy_connections().await == 3 }).await);
    // Everything busy: nothing to evict.
    let full = h.pool().get_session(&ned, &demo).await;
    assert!(
        matches!(full, Err(PoolError::PoolFull { .. })),
        "{:?}",
        full.map(|c| c.pid())
    );
    // The busy calls (far longer than the test, so busy however slow the machine) are given
    // up by their callers, which cancels them.
    for call in busy {
        call.abort();
    }
    olgas.abort();
    assert!(wait_until(LONG, || async { h.busy_connections().await == 0 }).await);
    // Idle again: Ned gets in by evicting the least recently used.
    h.pool().get_session(&ned, &demo).await.unwrap();
    assert_eq!(h.pool().stats().await.unwrap().total_connections, 3);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_and_shutdown_leave_no_process_behind() {
    let h = Harness::start("", "").await;
    let (pat, demo) = h.connect("pat", "demo").await;
    let (_, demo2) = h.connect("pat", "demo2").await;
    let (quinn, _) = h.connect("quinn", "demo").await;

    let conn = h.pool().get_session(&pat, &demo).await.unwrap();
    let leader = conn.pid();
    let inner: u32 = text(&conn.call_tool("spawn_grandchild", None).await.unwrap())
        .parse()
        .unwrap();
    let grandchild = common::host_pid(leader, inner).expect("grandchild's host pid");
    assert!(alive(grandchild));
    assert!(h.pool().close_session(&pat, &demo).await.unwrap());
    assert!(
        wait_until(LONG, || async { gone(leader) }).await,
        "leader reaped"
    );
    assert!(
        wait_until(LONG, || async { !alive(grandchild) }).await,
        "grandchild killed"
    );

    // Shutdown closes everything, grandchildren included.
    let mut pids = Vec::new();
    for (user, server) in [(&pat, &demo2), (&quinn, &demo)] {
        let conn = h.pool().get_session(user, server).await.unwrap();
        pids.push(conn.pid());
        let inner = text(&conn.call_tool("spawn_grandchild", None).await.unwrap())
            .parse()
            .unwrap();
        pids.push(common::host_pid(conn.pid(), inner).expect("grandchild's host pid"));
    }
    let registry = h._dir.path().join("data/pgids");
    let closed = h.pool().shutdown().await.unwrap();
    assert_eq!(closed, 2);
    assert!(matches!(
        h.pool().get_session(&quinn, &demo).await,
        Err(PoolError::ShuttingDown)
    ));
    for pid in &pids {
        assert!(
            wait_until(LONG, || async { !alive(*pid) }).await,
            "pid {pid} survived shutdown"
        );
    }
    assert_eq!(
        std::fs::read_dir(&registry).unwrap().count(),
        0,
        "no group left recorded"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_supervisor_leaks_no_process_and_the_pool_comes_back() {
    let h = Harness::start("", "").await;
    let (rita, demo) = h.connect("rita", "demo").await;
    let conn = h.pool().get_session(&rita, &demo).await.unwrap();
    let leader = conn.pid();
    let inner = text(&conn.call_tool("spawn_grandchild", None).await.unwrap())
        .parse::<u32>()
        .unwrap();
    let grandchild = common::host_pid(leader, inner).expect("grandchild's host pid");
    // Kill the supervisor outright: no cleanup code of its own runs.
    h.pool().supervisor_cell().kill();
    assert!(wait_until(LONG, || async { !alive(leader) && !alive(grandchild) }).await);
    let back = wait_until(LONG, || async {
        h.pool()
            .get_session(&rita, &demo)
            .await
            .is_ok_and(|c| c.pid() != leader)
    })
    .await;
    assert!(back, "a new supervisor serves the key again");
    assert_eq!(echo(h.pool(), &rita, &demo, "again").await, "again");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_credentials_and_unknown_servers_get_clear_errors() {
    let h = Harness::start("", "").await;
    let sam = UserId::parse("sam").unwrap();
    let demo = ServerName::parse("demo").unwrap();
    let missing = h.pool().get_session(&sam, &demo).await;
    assert!(
        matches!(missing, Err(PoolError::NoCredentials(_))),
        "{:?}",
        missing.map(|c| c.pid())
    );
    let unknown = h
        .pool()
        .get_session(&sam, &ServerName::parse("nope").unwrap())
        .await;
    assert!(
        matches!(unknown, Err(PoolError::UnknownServer(_))),
        "{:?}",
        unknown.map(|c| c.pid())
    );
    let (sam, demo) = h.connect("sam", "demo").await;
    let conn = h.pool().get_session(&sam, &demo).await.unwrap();
    let no_tool = conn.call_tool("does_not_exist", None).await;
    assert!(
        matches!(no_tool, Err(PoolError::UnknownTool(_))),
        "{no_tool:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_over_its_timeout_is_cancelled_and_the_session_stays_usable() {
    let h = Harness::start("call_timeout = \"300ms\"", "").await;
    let (tom, demo) = h.connect("tom", "demo").await;
    let conn = h.pool().get_session(&tom, &demo).await.unwrap();
    let slow = conn.call_tool("sleep", args(json!({ "ms": 20_000 }))).await;
    assert!(matches!(slow, Err(PoolError::CallTimeout(_))), "{slow:?}");
    assert_eq!(echo(h.pool(), &tom, &demo, "alive").await, "alive");
    let cancelled: Value =
        serde_json::from_str(&text(&conn.call_tool("stats", None).await.unwrap())).unwrap();
    assert_eq!(
        cancelled["cancelled_sleeps"], 1,
        "the server saw notifications/cancelled"
    );
    assert_eq!(
        conn.pid(),
        h.pool().get_session(&tom, &demo).await.unwrap().pid()
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_calls_on_one_connection_run_concurrently() {
    let h = Harness::start("", "").await;
    let (uma, demo) = h.connect("uma", "demo").await;
    let conn = h.pool().get_session(&uma, &demo).await.unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let conn = conn.clone();
        calls.spawn(async move { conn.call_tool("sleep", args(json!({ "ms": 5000 }))).await });
    }
    let peak = wait_until(LONG, || async {
        h.pool().stats().await.unwrap().connections[0].in_flight == 64
    })
    .await;
    assert!(peak, "all 64 calls were in flight at once");
    while let Some(result) = calls.join_next().await {
        assert_eq!(text(&result.unwrap().unwrap()), "slept 5000 ms");
    }
    // The server itself saw all 64 sleeping at the same time: nothing queued on the way.
    let stats: Value =
        serde_json::from_str(&text(&conn.call_tool("stats", None).await.unwrap())).unwrap();
    assert_eq!(stats["peak_concurrent_sleeps"], 64);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_starts_trips_the_circuit_too() {
    // A program that exists but exits at once: every start fails its handshake.
    let h = Harness::start(
        "max_restarts = 2\nfailed_cooldown = \"1h\"",
        "[servers.broken]\ncommand = \"/bin/false\"\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n",
    )
    .await;
    let (yara, broken) = h.connect("yara", "broken").await;
    for attempt in 1..=3 {
        let result = h.pool().get_session(&yara, &broken).await;
        assert!(
            matches!(result, Err(PoolError::StartFailed(_))),
            "attempt {attempt}: {:?}",
            result.map(|c| c.pid())
        );
    }
    let refused = h.pool().get_session(&yara, &broken).await;
    assert!(
        matches!(refused, Err(PoolError::CircuitOpen { .. })),
        "{:?}",
        refused.map(|c| c.pid())
    );
    assert_eq!(h.state_of(&yara, &broken).await, Some(SessionState::Failed));
    h.stop().await;
}

/// A program that is not installed is a configuration problem, not a crash: every request gets
/// `ServerProgramNotFound` naming the server and the program, and the circuit never opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_program_is_reported_and_never_trips_the_circuit() {
    let h = Harness::start(
        "max_restarts = 1\nfailed_cooldown = \"1h\"",
        "[servers.ghost]\ncommand = \"/nonexistent/mcp-server\"\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n",
    )
    .await;
    let (zoe, ghost) = h.connect("zoe", "ghost").await;
    for attempt in 1..=4 {
        match h.pool().get_session(&zoe, &ghost).await {
            Err(PoolError::ServerProgramNotFound { server, problem }) => {
                assert_eq!(server, ghost);
                assert!(problem.contains("`/nonexistent/mcp-server`"), "{problem}");
            }
            other => panic!("attempt {attempt}: {:?}", other.map(|c| c.pid())),
        }
    }
    assert_ne!(h.state_of(&zoe, &ghost).await, Some(SessionState::Failed));
    h.stop().await;
}

/// A server whose program disappears while its session runs (an upgrade, a removed venv): the
/// crash's restart finds no program, and the next request is told so at once instead of
/// waiting for a restart that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_removed_before_a_restart_is_reported_not_awaited() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("vanishing-server");
    std::os::unix::fs::symlink(common::BIN, &link).unwrap();
    let h = Harness::start(
        "restart_backoff_base = \"10ms\"\nrestart_backoff_cap = \"50ms\"",
        &format!(
            "[servers.vanishing]\ncommand = {link:?}\nargs = [\"demo-server\", \"--test-tools\"]\n\
             credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n"
        ),
    )
    .await;
    let (una, vanishing) = h.connect("una", "vanishing").await;
    let conn = h.pool().get_session(&una, &vanishing).await.unwrap();
    std::fs::remove_file(&link).unwrap();
    assert!(conn.call_tool("crash", None).await.is_err());
    // Wait for the supervisor to notice the crash before asking again.
    assert!(
        wait_until(LONG, || async {
            h.state_of(&una, &vanishing).await != Some(SessionState::Ready)
        })
        .await
    );
    let answer = tokio::time::timeout(LONG, h.pool().get_session(&una, &vanishing))
        .await
        .expect("answered, not left waiting");
    match answer {
        Err(PoolError::ServerProgramNotFound { server, problem }) => {
            assert_eq!(server, vanishing);
            assert!(problem.contains("vanishing-server"), "{problem}");
        }
        other => panic!("{:?}", other.map(|c| c.pid())),
    }
    // And again, now that the key has no restart pending.
    let again = tokio::time::timeout(LONG, h.pool().get_session(&una, &vanishing))
        .await
        .expect("answered");
    assert!(
        matches!(again, Err(PoolError::ServerProgramNotFound { .. })),
        "{:?}",
        again.map(|c| c.pid())
    );
    h.stop().await;
}
