//! Cluster mode on real parts: `mcp-pool serve` processes on loopback sharing one fresh schema
//! of the real PostgreSQL, Debian's nginx in front (from `scripts/setup-test-env`), the bundled
//! demo server as the MCP server. Server processes are counted on the host: each session's
//! process carries its credentials file path (`<node>/creds/<user>/<server>/...`) in its
//! environment, so a key with two live processes anywhere in the cluster would show.

mod common;
#[path = "common/fake_llm.rs"]
mod fake_llm;
#[path = "common/http.rs"]
mod http;
#[path = "common/oauth.rs"]
mod oauth;
#[path = "common/service.rs"]
mod service;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{PATIENCE, alive, fresh_database_url, wait_until};
use mcp_pool::store::BackendKind;
use serde_json::json;
use service::{API_KEY, Service};

const ADMIN_KEY: &str = "cluster-test-admin-key-0123456789";
const HEARTBEAT: &str = "300ms";
const TTL: &str = "2s";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

/// One node's process and where it lives.
struct Node {
    service: Service,
    port: u16,
}

impl Node {
    fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn client(&self, user: &str) -> http::Client {
        user_client(self.addr(), user)
    }

    fn admin(&self) -> http::Client {
        http::Client {
            addr: self.addr(),
            headers: vec![("authorization".into(), format!("Bearer {ADMIN_KEY}"))],
        }
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self.admin().get("/metrics").await.text();
        text.lines()
            .filter(|line| line.starts_with(name))
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }
}

fn user_client(addr: std::net::SocketAddr, user: &str) -> http::Client {
    http::Client {
        addr,
        headers: vec![
            ("authorization".into(), format!("Bearer {API_KEY}")),
            ("x-user-id".into(), user.into()),
        ],
    }
}

/// Three (or more) nodes on one schema, sharing the encryption key, the cluster secret and
/// the keys of the HTTP API.
struct Cluster {
    root: tempfile::TempDir,
    database_url: String,
    nodes: Vec<Option<Node>>,
    /// `cluster.placement` of every node.
    placement: &'static str,
    /// `http.shutdown_delay` of nodes started from now on.
    shutdown_delay: &'static str,
    /// `[servers.*]` tables every node has besides `demo`.
    more_servers: String,
}

impl Cluster {
    async fn start(count: usize) -> Cluster {
        Cluster::start_with(count, "rendezvous").await
    }

    async fn start_with(count: usize, placement: &'static str) -> Cluster {
        Cluster::start_with_servers(count, placement, String::new()).await
    }

    async fn start_with_servers(
        count: usize,
        placement: &'static str,
        more_servers: String,
    ) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let database_url = fresh_database_url(BackendKind::Postgres, root.path()).await;
        write_private(&root.path().join("admin.key"), ADMIN_KEY);
        let mut cluster = Cluster {
            root,
            database_url,
            nodes: Vec::new(),
            placement,
            shutdown_delay: "0s",
            more_servers,
        };
        for _ in 0..count {
            cluster.add_node(None, (HEARTBEAT, TTL)).await;
        }
        cluster
    }

    /// Starts one more node (one at a time: the first creates the shared key files). With
    /// `database_url`, that node reaches PostgreSQL there instead (through a proxy).
    async fn add_node(
        &mut self,
        database_url: Option<&str>,
        (heartbeat, ttl): (&str, &str),
    ) -> usize {
        let index = self.nodes.len();
        let port = free_port();
        let root = self.root.path();
        let dir = root.join(format!("node{index}"));
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!(
            "[service]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{d}/data\"\n\
             shutdown_grace = \"20s\"\n[http]\nshutdown_delay = \"{delay}\"\n\
             [database]\nurl = \"{db}\"\nmax_connections = 8\n\
             [credentials]\ndir = \"{d}/creds\"\n\
             [encryption]\nkey_file = \"{r}/encryption.key\"\n\
             [auth]\napi_key_file = \"{d}/api.key\"\nadmin_key_file = \"{r}/admin.key\"\n\
             [pool]\nclose_grace = \"1s\"\nmax_connections = 500\nmax_in_flight_per_user = 64\n\
             [sandbox]\nmode = \"off\"\nstate_dir = \"{d}/state\"\n\
             [cluster]\nenabled = true\nnode_url = \"http://127.0.0.1:{port}\"\n\
             secret_file = \"{r}/cluster.key\"\nheartbeat_interval = \"{heartbeat}\"\nttl = \"{ttl}\"\n\
             placement = \"{placement}\"\n\
             [servers.demo]\ncommand = \"{{self}}\"\nargs = [\"demo-server\", \"--test-tools\"]\n\
             credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n\
             {more}",
            more = self.more_servers,
            d = dir.display(),
            r = root.display(),
            db = database_url.unwrap_or(&self.database_url),
            placement = self.placement,
            delay = self.shutdown_delay,
        );
        let config = dir.join("config.toml");
        std::fs::write(&config, text).unwrap();
        let service = Service::start(&config);
        self.nodes.push(Some(Node { service, port }));
        index
    }

    fn node(&self, index: usize) -> &Node {
        self.nodes[index].as_ref().expect("node running")
    }

    fn running(&self) -> impl Iterator<Item = (usize, &Node)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, node)| Some((i, node.as_ref()?)))
    }

    /// The ports of the running nodes, for a front's upstream.
    fn ports(&self) -> Vec<u16> {
        self.running().map(|(_, node)| node.port).collect()
    }

    /// Waits until every running node sees all running nodes as live members.
    async fn wait_for_membership(&self) {
        let expected = self.running().count() as u64;
        let settled = wait_until(PATIENCE, || async {
            for (_, node) in self.running() {
                let stats = node.admin().get("/v1/stats?scope=cluster").await.json();
                if stats["node_count"].as_u64() != Some(expected) {
                    return false;
                }
            }
            true
        })
        .await;
        assert!(settled, "every node sees {expected} nodes");
    }

    /// Live server processes per (node index, user, server) of this cluster.
    fn processes(&self) -> HashMap<(usize, String, String), usize> {
        processes_under(self.root.path())
    }

    /// The node whose process serves `user` (any server); panics if none does.
    fn owner_of(&self, user: &str) -> usize {
        self.processes()
            .keys()
            .find(|(_, u, _)| u == user)
            .map(|(node, _, _)| *node)
            .expect("a session")
    }

    /// Live server processes per user (any node), for the demo server.
    fn processes_per_user(&self) -> HashMap<String, usize> {
        let mut per_user = HashMap::new();
        for ((_, user, _), count) in self.processes() {
            *per_user.entry(user).or_insert(0) += count;
        }
        per_user
    }

    async fn sql(&self) -> sqlx::PgConnection {
        use sqlx::Connection as _;
        sqlx::PgConnection::connect(&self.database_url)
            .await
            .unwrap()
    }
}

/// Live server processes per (node index, user, server) whose credentials file lies under
/// `root` (a cluster's directory): each session's process has the path of its credentials
/// file, `<root>/node<i>/creds/<user>/<server>/...`, in its environment.
fn processes_under(root: &Path) -> HashMap<(usize, String, String), usize> {
    let root = root.display().to_string();
    let mut found = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for pid in entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let Some(path) = environ
            .split(|b| *b == 0)
            .filter_map(|var| std::str::from_utf8(var).ok())
            .find_map(|var| var.strip_prefix("MCP_POOL_CREDENTIALS_FILE="))
        else {
            continue;
        };
        let Some(rest) = path.strip_prefix(&root) else {
            continue;
        };
        let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
        let (Some(node), Some(user), Some(server)) = (
            parts
                .first()
                .and_then(|n| n.strip_prefix("node")?.parse().ok()),
            parts.get(2),
            parts.get(3),
        ) else {
            continue;
        };
        if alive(pid) {
            *found
                .entry((node, (*user).to_owned(), (*server).to_owned()))
                .or_insert(0) += 1;
        }
    }
    found
}

/// nginx in front of the nodes, from Debian's package.
struct Nginx {
    child: Child,
    port: u16,
    prefix: std::path::PathBuf,
    hashing: bool,
}

impl Nginx {
    /// `hashing`: `hash $http_x_user_id consistent` as deploy/nginx.conf ships it; otherwise
    /// nginx's default round robin.
    async fn start(dir: &Path, ports: &[u16], hashing: bool) -> Nginx {
        let bin = common::required_env("MCP_POOL_TEST_NGINX");
        let port = free_port();
        let prefix = dir.join(format!("nginx-{port}"));
        std::fs::create_dir_all(prefix.join("logs")).unwrap();
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, nginx_conf(&prefix, port, ports, hashing)).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf_path)
            .arg("-g")
            .arg("daemon off;")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx starts");
        let nginx = Nginx {
            child,
            port,
            prefix,
            hashing,
        };
        let addr = nginx.addr();
        let up = wait_until(PATIENCE, || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        assert!(up, "nginx listens on {addr}");
        nginx
    }

    fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `nginx -s reload` with only `ports` in the upstream, as deploy/nginx.conf says to do
    /// before a node's SIGTERM; returns once every worker of the old configuration has exited
    /// (each finishes its requests first), so no request reaches a removed node after that.
    async fn reload_with(&self, ports: &[u16]) {
        let master = self.child.id();
        let old_workers = children_of(master);
        assert!(!old_workers.is_empty(), "nginx runs workers");
        std::fs::write(
            self.prefix.join("nginx.conf"),
            nginx_conf(&self.prefix, self.port, ports, self.hashing),
        )
        .unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(master as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
        let replaced = wait_until(PATIENCE, || async {
            let now = children_of(master);
            old_workers.iter().all(|pid| !now.contains(pid)) && !now.is_empty()
        })
        .await;
        assert!(replaced, "nginx replaced its workers");
    }
}

/// Live child processes of `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // `pid (comm) state ppid ...`; comm may hold spaces, so split after its `)`.
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                return false;
            };
            let mut fields = rest.split(' ');
            let (state, ppid) = (fields.next(), fields.next());
            state != Some("Z") && ppid.and_then(|p| p.parse::<u32>().ok()) == Some(parent)
        })
        .collect()
}

/// nginx's configuration for a front on `port` over the nodes on `ports`.
fn nginx_conf(prefix: &Path, port: u16, ports: &[u16], hashing: bool) -> String {
    let servers: String = ports
        .iter()
        .map(|p| format!("        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n"))
        .collect();
    let balance = if hashing {
        "        hash $http_x_user_id consistent;\n"
    } else {
        ""
    };
    format!(
        "user root;\nworker_processes 2;\nerror_log {p}/logs/error.log warn;\npid {p}/nginx.pid;\n\
         events {{ worker_connections 2048; }}\n\
         http {{\n    access_log off;\n    client_body_temp_path {p}/body;\n\
             proxy_temp_path {p}/proxy;\n    fastcgi_temp_path {p}/fastcgi;\n\
             uwsgi_temp_path {p}/uwsgi;\n    scgi_temp_path {p}/scgi;\n\
             upstream mcp_pool {{\n{balance}{servers}        keepalive 32;\n    }}\n\
             server {{\n        listen 127.0.0.1:{port};\n\
                 location /internal/ {{ return 404; }}\n\
                 location / {{\n            proxy_pass http://mcp_pool;\n\
                     proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n\
                     proxy_buffering off;\n            proxy_read_timeout 120s;\n\
                     proxy_next_upstream error timeout;\n            proxy_next_upstream_tries 3;\n\
                 }}\n    }}\n}}\n",
        p = prefix.display(),
    )
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three nodes with `receiver` placement behind nginx hashing users, as deploy/ recommends.
async fn behind_hashing_nginx() -> (Cluster, Nginx) {
    let cluster = Cluster::start_with(3, "receiver").await;
    cluster.wait_for_membership().await;
    let nginx = Nginx::start(cluster.root.path(), &cluster.ports(), true).await;
    (cluster, nginx)
}

/// Stores demo credentials for every user, through `addr`.
async fn connect_all(addr: std::net::SocketAddr, users: &[String]) {
    for user in users {
        let stored = user_client(addr, user).connect("demo").await;
        assert!(
            stored.status == 201 || stored.status == 200,
            "{}",
            stored.text()
        );
    }
}

/// One echo call for `user` through `addr`; returns the response.
async fn echo(addr: std::net::SocketAddr, user: &str, message: &str) -> http::Resp {
    user_client(addr, user)
        .call("demo", "echo", &json!({ "message": message }))
        .await
}

fn echoed(resp: &http::Resp) -> Option<String> {
    if resp.status != 200 {
        return None;
    }
    Some(resp.json()["content"][0]["text"].as_str()?.to_owned())
}

/// Calls echo for every user, `rounds` times, at most 16 at once; returns the failures.
async fn call_all(addr: std::net::SocketAddr, users: &[String], rounds: usize) -> Vec<String> {
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..rounds {
        for user in users {
            let (user, limit) = (user.clone(), limit.clone());
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let message = format!("{user}-{round}");
                let resp = echo(addr, &user, &message).await;
                (echoed(&resp) != Some(message))
                    .then(|| format!("{user}: {} {}", resp.status, resp.text()))
            });
        }
    }
    let mut failures = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Some(failure) = done.unwrap() {
            failures.push(failure);
        }
    }
    failures
}

/// Stores `user`'s demo credentials and starts their session with one call through node 0;
/// returns the index of the node that runs it.
async fn demo_session_owner(cluster: &Cluster, user: &str) -> usize {
    connect_all(cluster.node(0).addr(), &[user.to_owned()]).await;
    assert_eq!(
        echoed(&echo(cluster.node(0).addr(), user, "warm").await).as_deref(),
        Some("warm")
    );
    cluster.owner_of(user)
}

fn users(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i}")).collect()
}

/// Asserts exactly one live demo process per user, and none for anyone else.
#[track_caller]
fn assert_one_process_per_user(cluster: &Cluster, users: &[String]) {
    let per_user = cluster.processes_per_user();
    let wrong: Vec<_> = users
        .iter()
        .filter(|user| per_user.get(*user).copied().unwrap_or(0) != 1)
        .map(|user| (user.clone(), per_user.get(user).copied().unwrap_or(0)))
        .collect();
    assert!(
        wrong.is_empty(),
        "users without exactly one process: {wrong:?}"
    );
    assert_eq!(
        per_user.values().sum::<usize>(),
        users.len(),
        "{per_user:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_users_through_hashing_nginx_get_one_process_each_across_three_nodes() {
    // `receiver` placement, as deploy/ recommends behind a hashing front.
    let (cluster, nginx) = behind_hashing_nginx().await;
    let users = users("hashed", 300);
    connect_all(nginx.addr(), &users).await;

    let failures = call_all(nginx.addr(), &users, 3).await;
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_one_process_per_user(&cluster, &users);

    // Every node took part, and the cluster's stats add up to one session per user.
    let per_node = cluster.processes();
    for (index, _) in cluster.running() {
        assert!(
            per_node.keys().any(|(node, _, _)| *node == index),
            "node {index} holds sessions"
        );
    }
    let stats = cluster
        .node(0)
        .admin()
        .get("/v1/stats?scope=cluster")
        .await
        .json();
    assert_eq!(stats["node_count"], 3, "{stats}");
    assert_eq!(
        stats["total_connections"].as_u64(),
        Some(users.len() as u64)
    );
    // With the front hashing users, forwarding is the exception (none, when no node changed).
    let forwarded = stats["forwarded_out"].as_u64().unwrap();
    // nginx never exposes the nodes' internal routes (deploy/nginx.conf does the same).
    let probe = user_client(nginx.addr(), &users[0]);
    let hidden = probe.post_json("/internal/v1/stats", &json!({})).await;
    assert_eq!(hidden.status, 404);
    eprintln!(
        "FIGURE hashing nginx, receiver placement: {forwarded} of {} calls forwarded",
        users.len() * 3
    );
    assert!(
        forwarded * 20 <= (users.len() * 3) as u64,
        "{forwarded} forwarded"
    );
    // One lease per user, each held by the node that runs its process.
    let mut sql = cluster.sql().await;
    let leases: i64 =
        sqlx::query_scalar("SELECT count(*) FROM session_leases WHERE expires_at > now()")
            .fetch_one(&mut sql)
            .await
            .unwrap();
    assert_eq!(leases, users.len() as i64);
    // Spawns across the cluster: one per user, no more.
    let mut spawns = 0.0;
    for (_, node) in cluster.running() {
        spawns += node.metric("mcp_pool_session_spawns_total").await;
    }
    assert_eq!(spawns as usize, users.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_robin_front_still_gives_one_process_per_key() {
    let cluster = Cluster::start(3).await;
    cluster.wait_for_membership().await;
    let ports = cluster.ports();
    let nginx = Nginx::start(cluster.root.path(), &ports, false).await;
    let users = users("rr", 45);
    connect_all(nginx.addr(), &users).await;
    let failures = call_all(nginx.addr(), &users, 4).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_one_process_per_user(&cluster, &users);
    // Each user's requests reached all three nodes; most were forwarded to the owner, and the
    // owner is where the user hashes (rendezvous): the same node whichever node received it.
    let mut forwarded_calls = 0.0;
    for (_, node) in cluster.running() {
        forwarded_calls += node.metric("mcp_pool_tool_calls_total").await;
    }
    assert_eq!(
        forwarded_calls as usize,
        users.len() * 4,
        "each call ran once"
    );
    // `/metrics` counts the hops on both sides, and every forward was answered.
    let (mut forwarded, mut answered, mut timed, mut served) = (0.0, 0.0, 0.0, 0.0);
    for (_, node) in cluster.running() {
        forwarded += node.metric("mcp_pool_cluster_forwarded_total").await;
        answered += node
            .metric("mcp_pool_cluster_forwarded_total{outcome=\"answered\"}")
            .await;
        timed += node
            .metric("mcp_pool_cluster_forward_duration_seconds_count")
            .await;
        served += node.metric("mcp_pool_cluster_served_for_peers_total").await;
    }
    assert!(forwarded >= users.len() as f64, "{forwarded} forwarded");
    assert_eq!(answered, forwarded);
    assert_eq!(timed, forwarded);
    assert_eq!(served, forwarded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_first_requests_on_three_nodes_start_one_session() {
    let cluster = Cluster::start(3).await;
    cluster.wait_for_membership().await;
    let user = "stampede";
    connect_all(cluster.node(0).addr(), &[user.to_owned()]).await;
    let addrs: Vec<_> = cluster.running().map(|(_, n)| n.addr()).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let addr = addrs[i % addrs.len()];
        tasks.spawn(async move {
            let message = format!("m{i}");
            let resp = echo(addr, user, &message).await;
            (echoed(&resp) == Some(message), resp.text())
        });
    }
    while let Some(done) = tasks.join_next().await {
        let (ok, body) = done.unwrap();
        assert!(ok, "{body}");
    }
    assert_one_process_per_user(&cluster, &[user.to_owned()]);
    let mut spawns = 0.0;
    for (_, node) in cluster.running() {
        spawns += node.metric("mcp_pool_session_spawns_total").await;
    }
    assert_eq!(spawns, 1.0, "one spawn cluster-wide");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn internal_routes_take_the_cluster_secret_and_never_a_users_key() {
    let cluster = Cluster::start(1).await;
    let node = cluster.node(0);
    let body = json!({ "user_id": "mallory", "server": "demo" });
    // The service key with a user: refused.
    let with_user_key = node
        .client("mallory")
        .post_json("/internal/v1/tools/list", &body)
        .await;
    with_user_key.expect_error(401, "unauthorized");
    // The admin key: refused too.
    let with_admin = node
        .admin()
        .post_json("/internal/v1/tools/list", &body)
        .await;
    with_admin.expect_error(401, "unauthorized");
    // A wrong secret of the right length: refused.
    let secret = std::fs::read_to_string(cluster.root.path().join("cluster.key")).unwrap();
    let wrong: String = secret
        .trim()
        .chars()
        .map(|c| if c == 'a' { 'b' } else { 'a' })
        .collect();
    let forged = http::Client {
        addr: node.addr(),
        headers: vec![("x-mcp-pool-cluster-secret".into(), wrong)],
    };
    forged
        .post_json("/internal/v1/tools/list", &body)
        .await
        .expect_error(401, "unauthorized");
    // The secret file is private.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(cluster.root.path().join("cluster.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The real secret: served here (no credentials stored for this user).
    let peer = http::Client {
        addr: node.addr(),
        headers: vec![("x-mcp-pool-cluster-secret".into(), secret.trim().to_owned())],
    };
    peer.post_json("/internal/v1/tools/list", &body)
        .await
        .expect_error(404, "no_credentials");
    // The secret never reaches the log.
    assert!(!node.service.logged(secret.trim()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_s_users_are_served_again_elsewhere_and_never_twice() {
    let (mut cluster, nginx) = behind_hashing_nginx().await;
    let users = users("failover", 30);
    connect_all(nginx.addr(), &users).await;
    assert!(call_all(nginx.addr(), &users, 1).await.is_empty());

    // The victim: node 2; its users are those whose processes it runs.
    let victim = 2;
    let victims: Vec<String> = cluster
        .processes()
        .keys()
        .filter(|(node, _, _)| *node == victim)
        .map(|(_, user, _)| user.clone())
        .collect();
    assert!(!victims.is_empty(), "node {victim} holds sessions");
    let others: Vec<String> = users
        .iter()
        .filter(|u| !victims.contains(u))
        .cloned()
        .collect();

    // Sample the processes throughout: never two for one key.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (sampling, root) = (sampling.clone(), cluster.root.path().to_owned());
        std::thread::spawn(move || {
            let mut worst = 0;
            while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                let mut per_key: HashMap<(String, String), usize> = HashMap::new();
                for ((_, user, server), count) in processes_under(&root) {
                    *per_key.entry((user, server)).or_insert(0) += count;
                }
                worst = worst.max(per_key.values().copied().max().unwrap_or(0));
                std::thread::sleep(Duration::from_millis(10));
            }
            worst
        })
    };

    // Other users call without pause from before the kill until every victim is back.
    let loading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load = {
        let (loading, others, addr) = (loading.clone(), others.clone(), nginx.addr());
        tokio::spawn(async move {
            let (mut calls, mut failures) = (0, Vec::new());
            while loading.load(std::sync::atomic::Ordering::SeqCst) {
                failures.extend(call_all(addr, &others, 1).await);
                calls += others.len();
            }
            (calls, failures)
        })
    };
    // The kill lands while that load runs: wait until a round has passed the front.
    let loaded = wait_until(PATIENCE, || async {
        let mut served = 0.0;
        for (_, node) in cluster.running() {
            served += node.metric("mcp_pool_tool_calls_total").await;
        }
        served as usize >= users.len() + others.len()
    })
    .await;
    assert!(loaded, "the load reaches the nodes");

    let killed_at = Instant::now();
    cluster.nodes[victim]
        .as_ref()
        .unwrap()
        .service
        .signal(nix::sys::signal::Signal::SIGKILL);
    let mut dead = cluster.nodes[victim].take().unwrap();
    dead.service.wait();

    // The victims' calls succeed again on a surviving node: measure when the first does.
    let mut recovered = Vec::new();
    for user in &victims {
        let back = wait_until(PATIENCE, || async {
            echoed(&echo(nginx.addr(), user, "back").await).as_deref() == Some("back")
        })
        .await;
        assert!(back, "{user} is served again");
        recovered.push(killed_at.elapsed());
    }
    let failover = recovered.iter().min().unwrap();
    let all_back = recovered.iter().max().unwrap();
    eprintln!(
        "FIGURE failover after kill -9 (ttl {TTL}, heartbeat {HEARTBEAT}): first user back after {failover:?}, all {} after {all_back:?}",
        victims.len()
    );
    loading.store(false, std::sync::atomic::Ordering::SeqCst);
    let (calls, failures) = load.await.unwrap();
    // Other users' calls are unaffected (served by their own nodes through nginx).
    assert!(
        failures.is_empty(),
        "{} of {calls} failed: {failures:?}",
        failures.len()
    );
    assert!(calls >= 2 * others.len(), "the load ran across the kill");
    sampling.store(false, std::sync::atomic::Ordering::SeqCst);
    let worst = sampler.join().unwrap();
    assert!(worst <= 1, "a key had {worst} live processes at once");
    let all: Vec<String> = users.clone();
    assert!(call_all(nginx.addr(), &all, 1).await.is_empty());
    assert_one_process_per_user(&cluster, &users);
}

/// Node id of the node listening on `port`, from its membership row.
async fn node_id(cluster: &Cluster, port: u16) -> String {
    let mut sql = cluster.sql().await;
    sqlx::query_scalar("SELECT node_id FROM cluster_nodes WHERE url = $1")
        .bind(format!("http://127.0.0.1:{port}"))
        .fetch_one(&mut sql)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_scale_in_drains_releases_leases_and_fails_no_call() {
    // HAProxy, as deploy/haproxy.cfg: its /readyz check takes a draining node out before the
    // node closes its listener (http.shutdown_delay longer than the check's inter × fall).
    let mut cluster = Cluster::start_with(0, "receiver").await;
    cluster.shutdown_delay = "2s";
    for _ in 0..3 {
        cluster.add_node(None, (HEARTBEAT, TTL)).await;
    }
    cluster.wait_for_membership().await;
    let ports = cluster.ports();
    let haproxy = Haproxy::start(cluster.root.path(), &ports).await;
    scale_in_under_load(&mut cluster, haproxy.addr(), 1, async {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_in_behind_nginx_takes_the_node_out_then_sigterm_fails_no_call() {
    // nginx OSS has no active checks: deploy/nginx.conf's procedure takes the node out of the
    // upstream (`nginx -s reload`) before its SIGTERM.
    let (mut cluster, nginx) = behind_hashing_nginx().await;
    let leaving = 2;
    let remaining: Vec<u16> = cluster
        .running()
        .filter(|(i, _)| *i != leaving)
        .map(|(_, n)| n.port)
        .collect();
    scale_in_under_load(
        &mut cluster,
        nginx.addr(),
        leaving,
        nginx.reload_with(&remaining),
    )
    .await;
}

/// Node `leaving` leaves while every user calls through `front` without pause: `take_out`
/// (the front's own step, if it needs one), then SIGTERM. No call fails; the node releases its
/// leases and removes its row; its users are served once each on the others.
async fn scale_in_under_load(
    cluster: &mut Cluster,
    front: std::net::SocketAddr,
    leaving: usize,
    take_out: impl std::future::Future<Output = ()>,
) {
    let users = users("scalein", 30);
    connect_all(front, &users).await;
    assert!(call_all(front, &users, 1).await.is_empty());
    let leaving_id = node_id(cluster, cluster.node(leaving).port).await;
    let moved: Vec<String> = cluster
        .processes()
        .keys()
        .filter(|(node, _, _)| *node == leaving)
        .map(|(_, user, _)| user.clone())
        .collect();
    assert!(!moved.is_empty(), "node {leaving} holds sessions");

    // Calls keep coming through the front while the node is taken out, drains and exits.
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load = {
        let (running, users) = (running.clone(), users.clone());
        tokio::spawn(async move {
            let (mut failures, mut rounds, mut after_exit) = (Vec::new(), 0, 0);
            // Until the node has exited, then two more rounds.
            while after_exit < 2 {
                if !running.load(std::sync::atomic::Ordering::SeqCst) {
                    after_exit += 1;
                }
                failures.extend(call_all(front, &users, 1).await);
                rounds += 1;
            }
            (failures, rounds)
        })
    };
    take_out.await;
    let mut node = cluster.nodes[leaving].take().unwrap();
    node.service.signal(nix::sys::signal::Signal::SIGTERM);
    let status = node.service.wait();
    assert!(status.success(), "the node exits cleanly: {status:?}");
    assert!(node.service.logged("Left the cluster"));
    running.store(false, std::sync::atomic::Ordering::SeqCst);
    let (failures, rounds) = load.await.unwrap();
    if !failures.is_empty() {
        for line in node.service.log.lock().unwrap().iter() {
            eprintln!("LEAVING {line}");
        }
        for (i, n) in cluster.running() {
            for line in n
                .service
                .log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("forward") || l.contains("WARN") || l.contains("ERROR"))
            {
                eprintln!("NODE{i} {line}");
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} calls failed over {rounds} rounds: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    // Its leases were released and its row removed; its users live on the others, once each.
    let mut sql = cluster.sql().await;
    let (leases, rows): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM session_leases WHERE owner_node = $1 AND expires_at > now()), \
                (SELECT count(*) FROM cluster_nodes WHERE node_id = $1)",
    )
    .bind(&leaving_id)
    .fetch_one(&mut sql)
    .await
    .unwrap();
    assert_eq!((leases, rows), (0, 0));
    assert!(call_all(front, &users, 1).await.is_empty());
    assert_one_process_per_user(cluster, &users);
    assert!(
        cluster
            .processes()
            .keys()
            .all(|(node, _, _)| *node != leaving)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joining_node_takes_idle_sessions_that_now_hash_to_it_and_breaks_no_busy_one() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_for_membership().await;
    let entry = cluster.node(0).addr();
    let users = users("join", 40);
    connect_all(entry, &users).await;
    assert!(call_all(entry, &users, 1).await.is_empty());
    assert_one_process_per_user(&cluster, &users);

    // One call stays busy across the join: a 3 s sleep on some user's session.
    let busy_user = users[0].clone();
    let busy = tokio::spawn(async move {
        user_client(entry, &busy_user)
            .call("demo", "sleep", &json!({ "ms": 3000 }))
            .await
    });
    let fourth = cluster.add_node(None, (HEARTBEAT, TTL)).await;
    cluster.wait_for_membership().await;
    // Idle sessions that hash to the new node move there on their next use: the old node
    // closes them, and the next call starts them on the new node.
    let moved = wait_until(PATIENCE, || async {
        assert!(call_all(entry, &users, 1).await.is_empty());
        cluster
            .processes()
            .keys()
            .any(|(node, _, _)| *node == fourth)
    })
    .await;
    assert!(moved, "sessions moved to the new node");
    let busy = busy.await.unwrap();
    assert_eq!(busy.status, 200, "{}", busy.text());
    assert!(
        !busy.json()["is_error"].as_bool().unwrap_or(true),
        "{}",
        busy.text()
    );
    // Rebalancing may still be closing idle sessions that hash to the new node (each user is
    // then without a process until its next call), never running two for one user.
    let settled = wait_until(PATIENCE, || async {
        assert!(call_all(entry, &users, 1).await.is_empty());
        let per_user = cluster.processes_per_user();
        assert!(per_user.values().all(|count| *count <= 1), "{per_user:?}");
        users.iter().all(|user| per_user.get(user) == Some(&1))
    })
    .await;
    assert!(settled, "{:?}", cluster.processes_per_user());
    assert_one_process_per_user(&cluster, &users);
}

/// A TCP proxy in front of PostgreSQL that the test can cut.
struct Proxy {
    addr: std::net::SocketAddr,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(upstream: &str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let upstream = upstream.to_owned();
        let accept = {
            let tasks = tasks.clone();
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let upstream = upstream.clone();
                    let pipe = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    tasks.lock().unwrap().push(pipe);
                }
            })
        };
        tasks.lock().unwrap().push(accept);
        Proxy { addr, tasks }
    }

    /// Stops accepting and drops every proxied connection.
    fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_postgres_stops_serving_before_its_leases_expire() {
    let mut cluster = Cluster::start(2).await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let through_proxy = cluster
        .database_url
        .replace("127.0.0.1:5432", &proxy.addr.to_string());
    assert_ne!(
        through_proxy, cluster.database_url,
        "the test database is on 127.0.0.1:5432"
    );
    // A longer heartbeat on this node: its fence margin (one heartbeat) is what the test
    // measures against, and it must not hinge on how fast this machine schedules the test.
    let cut = cluster.add_node(Some(&through_proxy), ("1s", "5s")).await;
    cluster.wait_for_membership().await;
    let cut_id = node_id(&cluster, cluster.node(cut).port).await;
    let users = users("cut", 24);
    let entry = cluster.node(cut).addr();
    connect_all(cluster.node(0).addr(), &users).await;
    assert!(call_all(entry, &users, 1).await.is_empty());
    let mine: Vec<String> = cluster
        .processes()
        .keys()
        .filter(|(node, _, _)| *node == cut)
        .map(|(_, user, _)| user.clone())
        .collect();
    assert!(!mine.is_empty(), "the cut node holds sessions");

    // A thread notes when the cut node's last server process is gone (wall clock, the same
    // clock PostgreSQL's now() reads on this host).
    proxy.cut();
    let watcher = {
        let root = cluster.root.path().to_owned();
        std::thread::spawn(move || {
            let deadline = Instant::now() + PATIENCE;
            while Instant::now() < deadline {
                if !processes_under(&root)
                    .keys()
                    .any(|(node, _, _)| *node == cut)
                {
                    return Some(chrono::Utc::now());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            None
        })
    };
    let stopped_at = watcher
        .join()
        .unwrap()
        .expect("the cut node closes its sessions");
    let mut sql = cluster.sql().await;
    let expiry: Vec<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT expires_at FROM session_leases WHERE owner_node = $1")
            .bind(&cut_id)
            .fetch_all(&mut sql)
            .await
            .unwrap();
    assert_eq!(expiry.len(), mine.len());
    let first_expiry = *expiry.iter().min().unwrap();
    eprintln!(
        "FIGURE cut-off node closed its sessions {} ms before its first lease expired",
        (first_expiry - stopped_at).num_milliseconds()
    );
    assert!(
        stopped_at < first_expiry,
        "closed at {stopped_at}, a lease expired at {first_expiry}"
    );
    // It refuses its keys meanwhile (no session, no database to place them with).
    let refused = echo(entry, &mine[0], "x").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    // After expiry the others take the keys over: served again, once each.
    for user in &mine {
        let back = wait_until(PATIENCE, || async {
            echoed(&echo(cluster.node(0).addr(), user, "back").await).as_deref() == Some("back")
        })
        .await;
        assert!(back, "{user} is served by another node");
    }
    let per_user = cluster.processes_per_user();
    assert!(
        mine.iter().all(|user| per_user.get(user) == Some(&1)),
        "{per_user:?}"
    );
}

/// p50 and p99 of `samples`, in microseconds.
fn percentiles(mut samples: Vec<Duration>) -> (u128, u128) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize].as_micros();
    (at(0.50), at(0.99))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarded_call_takes_one_hop_to_the_owner() {
    let cluster = Cluster::start(2).await;
    cluster.wait_for_membership().await;
    let user = "hop";
    let owner = demo_session_owner(&cluster, user).await;
    let other = 1 - owner;
    let mut timings = [Vec::new(), Vec::new()];
    for round in 0..400 {
        for (slot, node) in [owner, other].into_iter().enumerate() {
            let message = format!("m{round}");
            let began = Instant::now();
            let resp = echo(cluster.node(node).addr(), user, &message).await;
            timings[slot].push(began.elapsed());
            assert_eq!(echoed(&resp), Some(message), "{}", resp.text());
        }
    }
    let [direct, forwarded] = timings;
    let (direct, forwarded) = (percentiles(direct), percentiles(forwarded));
    eprintln!(
        "FIGURE warm echo, new connection per request ({} build): direct p50 {} µs p99 {} µs; \
         via another node p50 {} µs p99 {} µs; one hop adds p50 {} µs, p99 {} µs",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        direct.0,
        direct.1,
        forwarded.0,
        forwarded.1,
        forwarded.0.saturating_sub(direct.0),
        forwarded.1.saturating_sub(direct.1),
    );
    // Every call ran on the owner's one session: the other node never started one.
    assert_one_process_per_user(&cluster, &[user.to_owned()]);
    assert_eq!(
        cluster
            .node(other)
            .metric("mcp_pool_tool_calls_total")
            .await,
        0.0
    );
    assert_eq!(
        cluster
            .node(owner)
            .metric("mcp_pool_tool_calls_total")
            .await,
        801.0
    );
}

/// HAProxy in front of the nodes, from Debian's package, configured like deploy/haproxy.cfg.
struct Haproxy {
    child: Child,
    port: u16,
}

impl Haproxy {
    async fn start(dir: &Path, ports: &[u16]) -> Haproxy {
        let bin = common::required_env("MCP_POOL_TEST_HAPROXY");
        let port = free_port();
        let servers: String = ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!("    server node{i} 127.0.0.1:{p} check inter 1s fall 2 rise 1\n")
            })
            .collect();
        let conf = format!(
            "global\n    maxconn 2048\n\
             defaults\n    mode http\n    timeout connect 2s\n    timeout client 120s\n\
                 timeout server 120s\n    retries 2\n    option redispatch 1\n\
                 retry-on conn-failure\n\
             frontend front\n    bind 127.0.0.1:{port}\n\
                 http-request deny deny_status 404 if {{ path_beg /internal/ }}\n\
                 default_backend nodes\n\
             backend nodes\n    balance hdr(X-User-Id)\n    hash-type consistent\n\
                 option httpchk GET /readyz\n    http-check expect status 200\n{servers}"
        );
        let path = dir.join(format!("haproxy-{port}.cfg"));
        std::fs::write(&path, conf).unwrap();
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy starts");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let up = wait_until(PATIENCE, || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        assert!(up, "haproxy listens on {addr}");
        Haproxy { child, port }
    }

    fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn haproxy_hashing_front_serves_every_user_once_and_hides_internal_routes() {
    let cluster = Cluster::start_with(3, "receiver").await;
    cluster.wait_for_membership().await;
    let ports = cluster.ports();
    let haproxy = Haproxy::start(cluster.root.path(), &ports).await;
    let users = users("haproxy", 30);
    connect_all(haproxy.addr(), &users).await;
    let failures = call_all(haproxy.addr(), &users, 3).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_one_process_per_user(&cluster, &users);
    let stats = cluster
        .node(0)
        .admin()
        .get("/v1/stats?scope=cluster")
        .await
        .json();
    let forwarded = stats["forwarded_out"].as_u64().unwrap();
    assert!(
        forwarded * 20 <= (users.len() * 3) as u64,
        "{forwarded} forwarded"
    );
    // The front never exposes the nodes' internal routes, whatever the headers.
    let secret = std::fs::read_to_string(cluster.root.path().join("cluster.key")).unwrap();
    let probe = http::Client {
        addr: haproxy.addr(),
        headers: vec![("x-mcp-pool-cluster-secret".into(), secret.trim().to_owned())],
    };
    let hidden = probe
        .post_json(
            "/internal/v1/tools/list",
            &json!({ "user_id": "haproxy-0", "server": "demo" }),
        )
        .await;
    assert_eq!(hidden.status, 404);
}

/// npm's server-everything, whose prompts and resources the demo server lacks.
fn everything() -> String {
    let js = common::required_env("MCP_POOL_TEST_EVERYTHING");
    format!(
        "[servers.everything]\ncommand = \"node\"\nargs = [{js:?}, \"stdio\"]\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n"
    )
}

/// A 2025-06-18 session at a node's `/mcp`, spoken as raw JSON-RPC over HTTP.
struct RawMcp {
    client: http::Client,
    session: String,
    next_id: u64,
}

impl RawMcp {
    async fn open(addr: std::net::SocketAddr, user: &str) -> RawMcp {
        let mut mcp = RawMcp {
            client: user_client(addr, user)
                .with_header("accept", "application/json, text/event-stream"),
            session: String::new(),
            next_id: 1,
        };
        let resp = mcp
            .post(
                &json!({ "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": { "name": "raw", "version": "1" } } }),
            )
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        mcp.session = resp.headers["mcp-session-id"].to_str().unwrap().to_owned();
        let done = mcp
            .post(&json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }))
            .await;
        assert_eq!(done.status, 202, "{}", done.text());
        mcp
    }

    async fn post(&self, body: &serde_json::Value) -> http::Resp {
        let mut client = self.client.clone();
        if !self.session.is_empty() {
            client = client.with_header("mcp-session-id", &self.session);
        }
        client
            .request(
                "POST",
                "/mcp",
                Some("application/json"),
                body.to_string().into_bytes(),
            )
            .await
    }

    /// The `result` of one request; panics with the answer when it is an error.
    async fn result(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let resp = self
            .post(&json!({ "jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params }))
            .await;
        let text = resp.text();
        let answer = text
            .lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .chain(std::iter::once(text.as_str()))
            .filter_map(|data| serde_json::from_str::<serde_json::Value>(data.trim()).ok())
            .find(|message| message.get("id").is_some())
            .unwrap_or_else(|| panic!("no JSON-RPC answer in {} {text}", resp.status));
        answer
            .get("result")
            .cloned()
            .unwrap_or_else(|| panic!("{method}: {answer}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prompts_and_resources_are_served_by_the_owner_whichever_node_receives_them() {
    let cluster = Cluster::start_with_servers(3, "rendezvous", everything()).await;
    cluster.wait_for_membership().await;
    let user = "reader";
    let stored = cluster.node(0).client(user).connect("everything").await;
    assert_eq!(stored.status, 201, "{}", stored.text());
    let architecture = "mcp-pool://everything/demo://resource/static/document/architecture.md";
    let document = {
        let js = std::path::PathBuf::from(common::required_env("MCP_POOL_TEST_EVERYTHING"));
        std::fs::read_to_string(js.parent().unwrap().join("docs/architecture.md")).unwrap()
    };
    let mut answers = Vec::new();
    for (_, node) in cluster.running() {
        let mut mcp = RawMcp::open(node.addr(), user).await;
        let prompts = mcp.result("prompts/list", json!({})).await;
        let prompt = mcp
            .result(
                "prompts/get",
                json!({ "name": "everything__args-prompt", "arguments": { "city": "Paris" } }),
            )
            .await;
        let resources = mcp.result("resources/list", json!({})).await;
        let templates = mcp.result("resources/templates/list", json!({})).await;
        let read = mcp
            .result("resources/read", json!({ "uri": architecture }))
            .await;
        assert_eq!(
            prompt["messages"][0]["content"]["text"], "What's weather in Paris?",
            "{prompt}"
        );
        assert_eq!(read["contents"][0]["uri"], architecture, "{read}");
        assert_eq!(read["contents"][0]["text"], document.as_str());
        assert!(
            resources["resources"]
                .as_array()
                .is_some_and(|list| list.iter().any(|r| r["uri"] == architecture)),
            "{resources}"
        );
        answers.push([prompts, prompt, resources, templates, read]);
    }
    // Every node gave the owner's answers, unchanged by the hop.
    assert!(answers.windows(2).all(|pair| pair[0] == pair[1]));
    // One session cluster-wide, and the two other nodes forwarded each of their requests.
    let sessions: usize = cluster
        .processes()
        .iter()
        .filter(|((_, u, server), _)| u == user && server == "everything")
        .map(|(_, count)| count)
        .sum();
    assert_eq!(sessions, 1);
    let stats = cluster
        .node(0)
        .admin()
        .get("/v1/stats?scope=cluster")
        .await
        .json();
    assert!(stats["forwarded_out"].as_u64().unwrap() >= 2 * 5, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_refresh_happens_once_cluster_wide() {
    let mock = oauth::MockOAuth::start().await;
    let cluster = Cluster::start_with_servers(
        3,
        "rendezvous",
        oauth::oauth_server("gdemo", &mock, "1h", false),
    )
    .await;
    cluster.wait_for_membership().await;
    let users = users("refresh", 6);
    // Issued due: 30 minutes left, inside the one-hour `refresh_before`.
    mock.control(json!({ "expires_in": 1800 })).await;
    for (i, user) in users.iter().enumerate() {
        // The flow starts at one node and its callback lands on another.
        let (start, callback) = (cluster.node(i % 3), cluster.node((i + 1) % 3));
        let anonymous = http::Client {
            addr: callback.addr(),
            headers: Vec::new(),
        };
        mock.connect(&start.client(user), &anonymous, "gdemo").await;
    }
    // From here the provider issues tokens that are not due: a second refresh of one user
    // would be a bug, not a due token.
    mock.control(json!({ "expires_in": 7200 })).await;
    let refreshes_before = mock.refresh_requests().await;

    // Each user's calls arrive at all three nodes at once.
    let mut tasks = tokio::task::JoinSet::new();
    for user in &users {
        for (_, node) in cluster.running() {
            for _ in 0..4 {
                let client = node.client(user);
                tasks.spawn(async move { client.call("gdemo", "whoami", &json!({})).await });
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        let resp = done.unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    assert_eq!(
        mock.refresh_requests().await - refreshes_before,
        users.len() as u64,
        "one refresh per user, cluster-wide"
    );
    // Each stored token is the refreshed one, good for the two hours issued.
    let mut sql = cluster.sql().await;
    let fresh: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM mcp_connections WHERE server_name = 'gdemo' \
         AND token_expiry > now() + interval '90 minutes'",
    )
    .fetch_one(&mut sql)
    .await
    .unwrap();
    assert_eq!(fresh, users.len() as i64);
    let mut spawns = 0.0;
    for (_, node) in cluster.running() {
        spawns += node.metric("mcp_pool_session_spawns_total").await;
    }
    assert_eq!(spawns as usize, users.len(), "one session per user");
}

/// Server-sent events in a response body: (event name, JSON data) in order.
fn sse_events(text: &str) -> Vec<(String, serde_json::Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = String::from("message");
            let mut data = None;
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    name = value.trim().to_owned();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data = serde_json::from_str(value.trim()).ok();
                }
            }
            Some((name, data?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarded_call_relays_its_progress_to_rest_and_mcp_callers() {
    let cluster = Cluster::start_with_servers(3, "rendezvous", everything()).await;
    cluster.wait_for_membership().await;
    let user = "patient";
    let stored = cluster.node(0).client(user).connect("everything").await;
    assert_eq!(stored.status, 201, "{}", stored.text());
    let warm = cluster
        .node(0)
        .client(user)
        .call("everything", "echo", &json!({ "message": "warm" }))
        .await;
    assert_eq!(warm.status, 200, "{}", warm.text());
    let owner = cluster.owner_of(user);
    let arguments = json!({ "duration": 1, "steps": 4 });
    let others: Vec<usize> = cluster
        .running()
        .map(|(i, _)| i)
        .filter(|i| *i != owner)
        .collect();
    for index in others {
        let node = cluster.node(index);
        // REST with server-sent events: each step, then the result.
        let resp = node
            .client(user)
            .with_header("accept", "text/event-stream")
            .call("everything", "trigger-long-running-operation", &arguments)
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let events = sse_events(&resp.text());
        let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            ["progress", "progress", "progress", "progress", "result"],
            "{}",
            resp.text()
        );
        for (step, (_, update)) in events.iter().take(4).enumerate() {
            assert_eq!(
                update["progress"].as_f64(),
                Some(step as f64 + 1.0),
                "{update}"
            );
            assert_eq!(update["total"].as_f64(), Some(4.0), "{update}");
        }
        let text = events[4].1["content"][0]["text"]
            .as_str()
            .unwrap_or_default();
        assert!(text.contains("completed"), "{}", events[4].1);

        // `/mcp` with a progress token: four notifications carrying it, then the result.
        let mcp = RawMcp::open(node.addr(), user).await;
        let resp = mcp
            .post(
                &json!({ "jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {
                "name": "everything__trigger-long-running-operation", "arguments": arguments,
                "_meta": { "progressToken": "relayed" } } }),
            )
            .await;
        let messages: Vec<serde_json::Value> = sse_events(&resp.text())
            .into_iter()
            .map(|(_, data)| data)
            .collect();
        let steps: Vec<&serde_json::Value> = messages
            .iter()
            .filter(|m| m["method"] == "notifications/progress")
            .collect();
        assert_eq!(steps.len(), 4, "{}", resp.text());
        assert!(
            steps
                .iter()
                .all(|m| m["params"]["progressToken"] == "relayed"),
            "{}",
            resp.text()
        );
        let answer = messages.last().expect("an answer");
        assert_eq!(answer["id"], 9, "{answer}");
        assert!(
            answer["result"]["content"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .contains("completed"),
            "{answer}"
        );
    }
    // All of it ran on the owner's one session.
    let sessions: usize = cluster
        .processes()
        .iter()
        .filter(|((_, u, _), _)| u == user)
        .map(|(_, count)| count)
        .sum();
    assert_eq!(sessions, 1);
    let mut served = 0.0;
    for (_, node) in cluster.running() {
        served += node.metric("mcp_pool_cluster_served_for_peers_total").await;
    }
    assert!(served >= 4.0, "{served}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_tool_call_of_a_chat_runs_on_the_owner_node() {
    let fake = fake_llm::FakeLlm::start([
        fake_llm::Reply::calls(&[(
            "call_1",
            "demo__echo",
            json!({ "message": "via the owner" }),
        )]),
        fake_llm::Reply::text("Done."),
    ])
    .await;
    let llm = format!(
        "[llm]\nbase_url = {:?}\nmodel = {:?}\ntimeout = \"20s\"\n",
        fake.base_url,
        fake_llm::MODEL
    );
    let cluster = Cluster::start_with_servers(3, "rendezvous", llm).await;
    cluster.wait_for_membership().await;
    let user = "chatter";
    let owner = demo_session_owner(&cluster, user).await;
    let other = (owner + 1) % 3;

    let chat = cluster
        .node(other)
        .client(user)
        .post_json("/v1/chat", &json!({ "message": "echo something" }))
        .await;
    assert_eq!(chat.status, 200, "{}", chat.text());
    let body = chat.json();
    assert_eq!(body["reply"], "Done.", "{body}");
    assert_eq!(body["trace"][0]["is_error"], false, "{body}");
    // The model saw the owner's answer, and the tool list the receiving node offered it.
    let sent = fake.requests();
    assert_eq!(sent.len(), 2);
    let offered = sent[0].body["tools"].to_string();
    assert!(offered.contains("demo__echo"), "{offered}");
    let tool_result = sent[1].body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "tool")
        .cloned()
        .expect("a tool message");
    assert_eq!(tool_result["content"], "via the owner", "{tool_result}");
    // Both calls ran on the owner's one session; the receiving node forwarded and ran nothing.
    assert_one_process_per_user(&cluster, &[user.to_owned()]);
    assert_eq!(
        cluster
            .node(owner)
            .metric("mcp_pool_tool_calls_total")
            .await,
        2.0
    );
    assert_eq!(
        cluster
            .node(other)
            .metric("mcp_pool_tool_calls_total")
            .await,
        0.0
    );
    assert!(
        cluster
            .node(other)
            .metric("mcp_pool_cluster_forwarded_total")
            .await
            >= 1.0
    );
}

/// `cancelled_sleeps` of `user`'s demo server (its `stats` tool), asked through `node`.
async fn cancelled_sleeps(node: &Node, user: &str) -> u64 {
    let stats = node.client(user).call("demo", "stats", &json!({})).await;
    let text = echoed(&stats).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|s| s["cancelled_sleeps"].as_u64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_that_gives_up_cancels_the_call_on_the_owner_node() {
    let cluster = Cluster::start(3).await;
    cluster.wait_for_membership().await;
    let user = "impatient";
    let owner = demo_session_owner(&cluster, user).await;
    let other = cluster.node((owner + 1) % 3);
    let busy = || async {
        let stats = cluster.node(owner).admin().get("/v1/stats").await.json();
        stats["connections"].as_array().is_some_and(|all| {
            all.iter()
                .any(|c| c["user_id"] == user && c["in_flight"] != 0)
        })
    };

    // `/mcp` on another node: the client's `notifications/cancelled` reaches the owner's server.
    let mcp = std::sync::Arc::new(RawMcp::open(other.addr(), user).await);
    let call = {
        let mcp = mcp.clone();
        tokio::spawn(async move {
            mcp.post(
                &json!({ "jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {
                "name": "demo__sleep", "arguments": { "ms": 600_000 } } }),
            )
            .await
        })
    };
    assert!(
        wait_until(PATIENCE, busy).await,
        "the sleep reached the owner"
    );
    let cancel = mcp
        .post(
            &json!({ "jsonrpc": "2.0", "method": "notifications/cancelled",
                       "params": { "requestId": 5, "reason": "the user gave up" } }),
        )
        .await;
    assert_eq!(cancel.status, 202, "{}", cancel.text());
    let cancelled = wait_until(PATIENCE, || async {
        cancelled_sleeps(other, user).await == 1
    })
    .await;
    assert!(cancelled, "the owner's server ended the sleep");
    call.abort();

    // REST with server-sent events on another node: a client that disconnects cancels too.
    let rest = {
        let client = other
            .client(user)
            .with_header("accept", "text/event-stream");
        tokio::spawn(async move {
            client
                .call("demo", "sleep", &json!({ "ms": 600_000 }))
                .await
        })
    };
    assert!(
        wait_until(PATIENCE, busy).await,
        "the second sleep reached the owner"
    );
    rest.abort();
    let cancelled = wait_until(PATIENCE, || async {
        cancelled_sleeps(other, user).await == 2
    })
    .await;
    assert!(cancelled, "the owner's server ended the second sleep");
    assert_one_process_per_user(&cluster, &[user.to_owned()]);
}
