//! Hostile traffic and crash hardening (issue 11), each against the real router, pool and demo
//! server on a loopback port: slow-header clients and the connection cap, nested arguments,
//! duplicate identity headers, per-user fairness, size bounds, a missing server program, the
//! open-files limit, and logging that does not flood.

mod common;
#[path = "common/http.rs"]
mod http;

use std::time::{Duration, Instant};

use http::{Client, TestServer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Polls `check` every 20 ms until it holds, for at most `limit`; panics with `what` otherwise.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads until the peer closes (or resets) the connection; returns what was read.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

const HTTP: &str = "[http]\nheader_read_timeout = \"1s\"\nmax_open_connections = 8\n";

/// Slow-header clients (a header trickled byte by byte, and connections that send nothing)
/// are closed once `http.header_read_timeout` has passed, however they trickle, while normal
/// requests on other connections are answered the whole time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_clients_are_closed_while_others_are_served() {
    let server = TestServer::start("", HTTP, "", &[]).await;
    let started = Instant::now();
    let mut slow = Vec::new();
    for i in 0..5 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        if i % 2 == 0 {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        slow.push(stream);
    }
    // Trickle one header byte per 100 ms on the first connection, and serve normal requests
    // meanwhile, until every slow connection is closed.
    let trickler = {
        let mut stream = slow.remove(0);
        tokio::spawn(async move {
            let started = Instant::now();
            for _ in 0..200 {
                if stream.write_all(b"X").await.is_err() {
                    return (started.elapsed(), true);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (started.elapsed(), false)
        })
    };
    let readers: Vec<_> = slow
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let started = Instant::now();
                read_until_closed(&mut stream).await;
                started.elapsed()
            })
        })
        .collect();
    let client = server.anonymous();
    let mut served = 0;
    while !readers.iter().all(|r| r.is_finished()) || !trickler.is_finished() {
        let resp = client.get("/healthz").await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        served += 1;
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "slow connections still open after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for reader in readers {
        let open_for = reader.await.unwrap();
        assert!(open_for >= Duration::from_millis(900), "{open_for:?}");
    }
    let (trickled_for, closed) = trickler.await.unwrap();
    assert!(closed, "the trickling client was never cut off");
    assert!(
        trickled_for >= Duration::from_millis(900),
        "{trickled_for:?}"
    );
    assert!(served >= 5, "normal requests answered meanwhile: {served}");
    server.stop().await;
}

/// Past `http.max_open_connections` a connection gets an immediate 503 `too_many_connections`
/// with `Retry-After` (refused, not queued); once the idle connections time out, requests are
/// served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_refused_with_503() {
    let http = "[http]\nheader_read_timeout = \"2s\"\nmax_open_connections = 3\n";
    let server = TestServer::start("", http, "", &[]).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // The three idle connections are accepted asynchronously: wait until the next is refused.
    let client = server.anonymous();
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let resp = client.get("/healthz").await;
        if resp.status == 503 {
            break resp;
        }
        assert!(Instant::now() < deadline, "never refused: {}", resp.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    refused.expect_error(503, "too_many_connections");
    assert_eq!(refused.headers["retry-after"], "1");
    // The idle ones are closed by the header timeout, freeing their places.
    for mut stream in idle {
        read_until_closed(&mut stream).await;
    }
    eventually(Duration::from_secs(10), "served again", || {
        let client = client.clone();
        async move { client.get("/healthz").await.status == 200 }
    })
    .await;
    let metrics = server.anonymous().get("/metrics").await.text();
    assert!(
        metrics.contains("code=\"too_many_connections\""),
        "refusals are counted: {metrics}"
    );
    server.stop().await;
}

/// Arguments nested past 64 levels get 400 `arguments_too_deep` at once, and no session is
/// started for them; 64 levels still reach the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_arguments_are_refused_at_once() {
    let server = TestServer::start("call_timeout = \"60s\"", "", "", &[]).await;
    let alice = server.user("alice");
    alice.connect("demo").await;
    let nested = |levels: usize| {
        let mut value = json!("deep");
        for _ in 1..levels {
            value = json!([value]);
        }
        json!({ "message": "hi", "extra": value })
    };
    let started = Instant::now();
    let resp = alice.call("demo", "echo", &nested(127)).await;
    resp.expect_error(400, "arguments_too_deep");
    assert!(
        resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("64")
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let stats = server.admin().get("/v1/stats").await.json();
    assert_eq!(stats["total_connections"], 0, "{stats}");
    // `nested(n)` is n levels deep (the arguments object is level 1): 64 reaches the server.
    let resp = alice.call("demo", "echo", &nested(64)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = alice.call("demo", "echo", &nested(65)).await;
    resp.expect_error(400, "arguments_too_deep");
    server.stop().await;
}

/// Two `X-User-Id` headers, or two `Authorization` headers, are refused with 400
/// `duplicate_header` (a proxy appending the real value must not let the client choose).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_identity_headers_are_refused() {
    let server = TestServer::api_key().await;
    let key = format!("Bearer {}", server.service_key);
    let two_users = Client {
        addr: server.addr,
        headers: vec![
            ("authorization".into(), key.clone()),
            ("x-user-id".into(), "mallory".into()),
            ("x-user-id".into(), "alice".into()),
        ],
    };
    let resp = two_users.get("/v1/connections").await;
    resp.expect_error(400, "duplicate_header");
    assert!(
        resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("X-User-Id")
    );
    let two_keys = Client {
        addr: server.addr,
        headers: vec![
            ("authorization".into(), "Bearer forged".into()),
            ("authorization".into(), key.clone()),
            ("x-user-id".into(), "alice".into()),
        ],
    };
    two_keys
        .get("/v1/connections")
        .await
        .expect_error(400, "duplicate_header");
    let admin_twice = Client {
        addr: server.addr,
        headers: vec![
            (
                "authorization".into(),
                format!("Bearer {}", server.admin_key),
            ),
            (
                "authorization".into(),
                format!("Bearer {}", server.admin_key),
            ),
        ],
    };
    admin_twice
        .get("/v1/stats")
        .await
        .expect_error(400, "duplicate_header");
    // One of each still works.
    assert_eq!(
        server.user("alice").get("/v1/connections").await.status,
        200
    );
    server.stop().await;
}

/// With `pool.max_in_flight_per_user = 2`, a user's third concurrent call gets 429
/// `too_many_calls` with `Retry-After`, while another user's calls go through meanwhile; once
/// the slow calls end, the throttled user is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_is_throttled_without_touching_others() {
    let server = TestServer::start("max_in_flight_per_user = 2", "", "", &[]).await;
    let (alice, bob) = (server.user("alice"), server.user("bob"));
    alice.connect("demo").await;
    bob.connect("demo").await;
    // Warm both sessions, so the slow calls below are in flight, not starting.
    assert_eq!(
        alice
            .call("demo", "echo", &json!({"message": "a"}))
            .await
            .status,
        200
    );
    assert_eq!(
        bob.call("demo", "echo", &json!({"message": "b"}))
            .await
            .status,
        200
    );
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let alice = alice.clone();
            tokio::spawn(async move { alice.call("demo", "sleep", &json!({"ms": 60_000})).await })
        })
        .collect();
    let in_flight = |server: &TestServer| {
        let admin = server.admin();
        async move {
            let stats = admin.get("/v1/stats").await.json();
            stats["connections"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["user_id"] == "alice")
                .map(|c| c["in_flight"].as_u64().unwrap())
                .sum::<u64>()
        }
    };
    eventually(Duration::from_secs(20), "two calls in flight", || async {
        in_flight(&server).await == 2
    })
    .await;
    let resp = alice
        .call("demo", "echo", &json!({"message": "third"}))
        .await;
    resp.expect_error(429, "too_many_calls");
    assert_eq!(resp.headers["retry-after"], "1");
    for i in 0..5 {
        let resp = bob
            .call("demo", "echo", &json!({"message": format!("bob {i}")}))
            .await;
        assert_eq!(resp.status, 200, "bob is not throttled: {}", resp.text());
    }
    // Ending alice's slow calls frees her places.
    let closed = server
        .admin()
        .delete("/v1/admin/users/alice/connections")
        .await;
    assert_eq!(closed.status, 200, "{}", closed.text());
    for call in slow {
        assert_ne!(call.await.unwrap().status, 200);
    }
    let resp = alice
        .call("demo", "echo", &json!({"message": "again"}))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    server.stop().await;
}

/// Tokens over 16 KiB, an empty or oversized `client_id`, and a cleanup age under 1 h get a
/// clear 400; the bounds themselves are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_and_cleanup_age_are_bounded() {
    let server = TestServer::api_key().await;
    let alice = server.user("alice");
    let put = |body: Value| {
        let alice = alice.clone();
        async move { alice.put_json("/v1/connections/demo", &body).await }
    };
    let resp = put(json!({ "access_token": "a".repeat(16 * 1024 + 1) })).await;
    resp.expect_error(400, "field_too_long");
    assert!(
        resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("access_token")
    );
    put(json!({ "refresh_token": "r".repeat(1024 * 1024 - 100) }))
        .await
        .expect_error(400, "field_too_long");
    put(json!({ "access_token": "a", "client_id": "" }))
        .await
        .expect_error(400, "field_too_long");
    put(json!({ "access_token": "a", "client_id": "c".repeat(257) }))
        .await
        .expect_error(400, "field_too_long");
    let resp = put(json!({ "access_token": "a".repeat(16 * 1024) })).await;
    assert_eq!(resp.status, 201, "{}", resp.text());

    let admin = server.admin();
    for short in ["1ns", "59m", "0s"] {
        let resp = admin
            .post_json(
                "/v1/admin/credentials/cleanup",
                &json!({ "inactive_for": short }),
            )
            .await;
        resp.expect_error(400, "invalid_duration");
        assert!(resp.text().contains("1h"), "{}", resp.text());
    }
    let resp = admin
        .post_json(
            "/v1/admin/credentials/cleanup",
            &json!({ "inactive_for": "1h" }),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["deleted"], 0);
    server.stop().await;
}

/// A server whose program is not installed answers 502 `server_program_not_found`, naming the
/// server and the program; other servers keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_server_program_is_named_in_the_error() {
    let extra = "[servers.ghost]\ncommand = \"mcp-pool-no-such-program\"\nargs = [\"run\"]\n\
                 credentials_env = \"X_CREDENTIALS\"\ncredentials_format = \"token_json\"\n";
    let server = TestServer::start("", extra, "", &[]).await;
    let alice = server.user("alice");
    alice.connect("ghost").await;
    alice.connect("demo").await;
    for _ in 0..2 {
        let resp = alice.get("/v1/connections/ghost/tools").await;
        resp.expect_error(502, "server_program_not_found");
        let message = resp.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(
            message.contains("`ghost`") && message.contains("`mcp-pool-no-such-program`"),
            "{message}"
        );
    }
    // Not a crash: no restart is scheduled and the circuit stays closed.
    let stats = server.admin().get("/v1/stats").await.json();
    assert_eq!(stats["counters"]["restarts"], 0, "{stats}");
    assert_eq!(alice.get("/v1/connections/demo/tools").await.status, 200);
    server.stop().await;
}

/// The soft RLIMIT_NOFILE is raised to the hard limit at start-up, and a capacity that cannot
/// fit even the hard limit refuses to start with a message that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_files_limit_is_raised_or_start_up_refused() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // Start from a low soft limit, as a default shell would give.
    setrlimit(Resource::RLIMIT_NOFILE, 1024.min(hard), hard).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = common::test_config(dir.path(), "", "");
    let app = mcp_pool::app::App::build(config).await.expect("starts");
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert_eq!(soft, hard, "the soft limit was raised to the hard one");
    app.stop().await;

    // More sessions than the hard limit can hold at 4 descriptors each.
    let sessions = hard / 4 + 1;
    let dir = tempfile::tempdir().unwrap();
    let config = common::test_config(dir.path(), &format!("max_connections = {sessions}"), "");
    let err = match mcp_pool::app::App::build(config).await {
        Ok(app) => {
            app.stop().await;
            panic!("started with {sessions} sessions and a hard limit of {hard}");
        }
        Err(err) => err.to_string(),
    };
    assert!(
        err.contains("pool.max_connections") && err.contains(&hard.to_string()),
        "{err}"
    );
}
