//! Helpers of the HTTP tests: a real `App` served on a loopback port (port 0), and a
//! small HTTP/1.1 client on hyper (no TLS stack needed on loopback).
//! Include with `mod common; #[path = "common/http.rs"] mod http;`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use mcp_pool::app::{App, AppError};
use mcp_pool::http::HttpState;
use mcp_pool::store::CredentialWriter;
use serde_json::Value;

use super::common::{PATIENCE, test_config};

/// A running service: `App::build`, then `App::serve` on 127.0.0.1:0, exactly as `serve` runs
/// it (only the listener and the environment differ), so tests exercise the production wiring.
pub struct TestServer {
    /// The bound address (port 0 picked a free port).
    pub addr: SocketAddr,
    pub service_key: String,
    pub admin_key: String,
    /// A clone of the state the router serves: the pool, credentials and store handles.
    pub state: HttpState,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    /// `App::serve`: ends after the drain and `App::stop`.
    server: Option<tokio::task::JoinHandle<Result<(), AppError>>>,
    pub dir: tempfile::TempDir,
}

/// Builds the app from `test_config(dir, pool, extra)` and serves it on a free loopback port.
/// `env` stands in for the process environment.
pub async fn spawn_app(
    dir: tempfile::TempDir,
    pool: &str,
    extra: &str,
    env: &[(&str, &str)],
) -> TestServer {
    let config = test_config(dir.path(), pool, extra);
    spawn_app_with(dir, config, env).await
}

/// [`spawn_app`] on a ready `config` (whose key files must lie under `dir`).
pub async fn spawn_app_with(
    dir: tempfile::TempDir,
    config: mcp_pool::config::Config,
    env: &[(&str, &str)],
) -> TestServer {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let api_key_mode = config.auth.mode == mcp_pool::config::AuthMode::ApiKey;
    let (api_key_file, admin_key_file) = (
        config.auth.api_key_file.clone(),
        config.auth.admin_key_file.clone(),
    );
    let app = App::build(config).await.expect("app starts");
    let state = app.http_state(|name| env.get(name).cloned()).expect("auth");
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .expect("key file created")
            .trim()
            .to_owned()
    };
    let admin_key = env
        .get("MCP_POOL_ADMIN_KEY")
        .cloned()
        .unwrap_or_else(|| read(&admin_key_file));
    let service_key = match (api_key_mode, env.get("MCP_POOL_API_KEY")) {
        (false, _) => String::new(),
        (true, Some(key)) => key.clone(),
        (true, None) => read(&api_key_file),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.serve(listener, state.clone(), async move {
        let _ = rx.await;
    }));
    TestServer {
        addr,
        service_key,
        admin_key,
        state,
        shutdown: Some(tx),
        server: Some(server),
        dir,
    }
}

impl TestServer {
    /// `pool` and `extra` as in `test_config`; `auth` is appended as the `[auth]` section (key
    /// files are always under the tempdir); `env` stands in for the process environment.
    pub async fn start(pool: &str, extra: &str, auth: &str, env: &[(&str, &str)]) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth_section = format!(
            "[auth]\napi_key_file = \"{d}/data/api.key\"\nadmin_key_file = \"{d}/data/admin.key\"\n{auth}\n",
            d = dir.path().display()
        );
        spawn_app(dir, pool, &format!("{extra}\n{auth_section}"), env).await
    }

    /// A facade on `config` (whose key files must lie under `dir`); `env` as in `start`.
    pub async fn start_with(
        dir: tempfile::TempDir,
        config: mcp_pool::config::Config,
        env: &[(&str, &str)],
    ) -> TestServer {
        spawn_app_with(dir, config, env).await
    }

    /// API-key mode with no extras.
    pub async fn api_key() -> TestServer {
        TestServer::start("", "", "", &[]).await
    }

    /// A client acting as `user` with the service key.
    pub fn user(&self, user: &str) -> Client {
        Client {
            addr: self.addr,
            headers: vec![
                (
                    "authorization".into(),
                    format!("Bearer {}", self.service_key),
                ),
                ("x-user-id".into(), user.into()),
            ],
        }
    }

    pub fn admin(&self) -> Client {
        self.bearer(&self.admin_key)
    }

    pub fn bearer(&self, token: &str) -> Client {
        Client {
            addr: self.addr,
            headers: vec![("authorization".into(), format!("Bearer {token}"))],
        }
    }

    pub fn anonymous(&self) -> Client {
        Client {
            addr: self.addr,
            headers: vec![],
        }
    }

    /// Triggers the graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Stops serving (drain), then the app, in the production order.
    pub async fn stop(mut self) {
        self.begin_shutdown();
        self.stopped().await.expect("the app stops cleanly");
    }

    /// Stops the service, then starts a new one on the same directory, database and config:
    /// what a process restart keeps. The new one listens on another port.
    pub async fn restart(mut self) -> TestServer {
        self.begin_shutdown();
        self.stopped().await.expect("the app stops cleanly");
        let config = (*self.state.config).clone();
        spawn_app_with(self.dir, config, &[]).await
    }

    /// Waits for `App::serve` to return (after a shutdown, or on its own when the pool was
    /// given up) and hands back its result.
    pub async fn stopped(&mut self) -> Result<(), AppError> {
        let server = self.server.take().expect("still serving");
        server.await.expect("server task")
    }
}

/// A response, fully read.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "status {} body is not JSON ({err}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `error.code` of an error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {}", self.text()))
            .to_owned()
    }

    /// Asserts status and error code, with the body in the message.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status, self.code().as_str()),
            (status, code),
            "{}",
            self.text()
        );
    }
}

/// A response whose body is read as it arrives. Dropping it closes the connection, as a client
/// that goes away does.
pub struct Streaming {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    body: hyper::body::Incoming,
    buffer: String,
    connection: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

impl Streaming {
    /// The next server-sent event as `(event name, JSON data)`, waiting for it at most
    /// `PATIENCE`; `None` once the stream ended. Comments (keep-alives) are skipped.
    pub async fn next_event(&mut self) -> Option<(String, Value)> {
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let name = block.lines().find_map(|l| l.strip_prefix("event: "));
                let data = block.lines().find_map(|l| l.strip_prefix("data: "));
                if let (Some(name), Some(data)) = (name, data) {
                    let data = serde_json::from_str(data)
                        .unwrap_or_else(|err| panic!("event data is not JSON ({err}): {data}"));
                    return Some((name.to_owned(), data));
                }
            }
            let frame = tokio::time::timeout(PATIENCE, self.body.frame())
                .await
                .expect("more of the stream within patience");
            match frame {
                None => return None,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                Some(Err(err)) => panic!("stream failed: {err}"),
            }
        }
    }
}

impl Streaming {
    /// The JSON data of the next server-sent event, named or not (rmcp's MCP streams name
    /// none), waiting for it at most `PATIENCE`; `None` once the stream ended. Events with no
    /// data (keep-alives, priming) are skipped.
    pub async fn next_data(&mut self) -> Option<Value> {
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let data: Vec<&str> = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                let data = data.join("\n");
                if !data.trim().is_empty() {
                    return Some(
                        serde_json::from_str(&data)
                            .unwrap_or_else(|err| panic!("event data is not JSON ({err}): {data}")),
                    );
                }
            }
            let frame = tokio::time::timeout(PATIENCE, self.body.frame())
                .await
                .expect("more of the stream within patience");
            match frame {
                None => return None,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                Some(Err(err)) => panic!("stream failed: {err}"),
            }
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// A client with fixed headers; one connection per request.
#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub headers: Vec<(String, String)>,
}

impl Client {
    pub fn with_header(mut self, name: &str, value: &str) -> Client {
        self.headers.retain(|(n, _)| n != name);
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sends one request on a new connection; returns the response head with its body unread,
    /// and the connection's task.
    async fn send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (
        hyper::Response<hyper::body::Incoming>,
        tokio::task::JoinHandle<Result<(), hyper::Error>>,
    ) {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        let connection = tokio::spawn(conn);
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        if let Some(ct) = content_type {
            builder = builder.header("content-type", ct);
        }
        let request = builder.body(Full::new(Bytes::from(body))).expect("request");
        let response = tokio::time::timeout(PATIENCE, sender.send_request(request))
            .await
            .expect("a response head within patience")
            .expect("response");
        (response, connection)
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Resp {
        let (response, _) = self.send(method, path, content_type, body).await;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    /// Sends a JSON POST and returns as soon as the response head arrives; the body is read
    /// as it comes (server-sent events).
    pub async fn post_streaming(&self, path: &str, body: &Value) -> Streaming {
        let body = body.to_string().into_bytes();
        self.streaming("POST", path, Some("application/json"), body)
            .await
    }

    /// A GET whose body is read as it comes (server-sent events).
    pub async fn get_streaming(&self, path: &str) -> Streaming {
        self.streaming("GET", path, None, Vec::new()).await
    }

    async fn streaming(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Streaming {
        let (response, connection) = self.send(method, path, content_type, body).await;
        let (parts, body) = response.into_parts();
        Streaming {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
            buffer: String::new(),
            connection,
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.request("GET", path, None, Vec::new()).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.request("DELETE", path, None, Vec::new()).await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Resp {
        self.request(
            "PUT",
            path,
            Some("application/json"),
            body.to_string().into_bytes(),
        )
        .await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Resp {
        self.request(
            "POST",
            path,
            Some("application/json"),
            body.to_string().into_bytes(),
        )
        .await
    }

    pub async fn raw(&self, method: &str, path: &str, body: &str) -> Resp {
        self.request(
            method,
            path,
            Some("application/json"),
            body.as_bytes().to_vec(),
        )
        .await
    }

    /// Stores demo credentials for this client's user.
    pub async fn connect(&self, server: &str) -> Resp {
        self.put_json(
            &format!("/v1/connections/{server}"),
            &serde_json::json!({ "access_token": "secret-access-token", "refresh_token": "secret-refresh" }),
        )
        .await
    }

    /// Calls `tool` on `server` with `args`.
    pub async fn call(&self, server: &str, tool: &str, args: &Value) -> Resp {
        self.post_json(&format!("/v1/connections/{server}/tools/{tool}/call"), args)
            .await
    }
}

/// Runs a sandbox probe tool (the demo server's `--test-tools`, or the Python probe server of
/// tests/prefork.rs) and returns its `{"ok", "value", "error", "errno"}` report.
pub async fn probe_on(client: &Client, server: &str, tool: &str, args: Value) -> Value {
    let resp = client.call(server, tool, &args).await;
    assert_eq!(resp.status, 200, "{tool}: {}", resp.text());
    serde_json::from_str(&content_text(&resp.json())).expect("probe answers JSON")
}

/// Asserts the probe was refused, and returns its errno. Each probe and its answer is printed
/// (`cargo nextest run --test sandbox --no-capture` lists them).
pub fn denied(report: &Value, what: &str) -> i64 {
    eprintln!("probe: {what} -> {}", report["error"]);
    assert_eq!(report["ok"], false, "{what} was allowed: {report}");
    report["errno"].as_i64().unwrap_or(0)
}

/// Text of the content blocks of a call response.
pub fn content_text(body: &Value) -> String {
    body["content"]
        .as_array()
        .map(|blocks| {
            blocks
                .iter()
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default()
}

impl TestServer {
    /// Leaves the service behind without waiting for it (its task is aborted): for a test
    /// that ends while the service sits in a long `shutdown_delay`.
    pub fn abandon(mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

impl TestServer {
    /// Sets the stored access token of (user, server) to expire `expires_in` from now (negative:
    /// already expired), as if that much time had passed: with a `refresh_before` of an hour,
    /// anything shorter is due at once, so no test waits for a token to become due. The
    /// refresher's in-memory "fresh until" is dropped too, as storing new credentials does.
    pub async fn set_token_expiry(&self, user: &str, server: &str, expires_in: chrono::Duration) {
        let user = mcp_pool::store::UserId::parse(user).unwrap();
        let server = mcp_pool::store::ServerName::parse(server).unwrap();
        let update = mcp_pool::store::TokenUpdate {
            access_token: None,
            refresh_token: None,
            token_expiry: Some(chrono::Utc::now() + expires_in),
        };
        self.state
            .credentials
            .update(&user, &server, None, update)
            .await
            .expect("the expiry is stored");
        if let Some(refresher) = self.state.pool.refresher() {
            refresher.forget(&user, &server);
        }
    }
}
