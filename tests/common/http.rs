//! Helpers of the HTTP tests: the real router of a real `App` on a loopback port (port 0), and a
//! small HTTP/1.1 client on hyper (no TLS stack needed on loopback).
//! Include with `mod common; #[path = "common/http.rs"] mod http;`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use mcp_pool::app::App;
use mcp_pool::http::{Auth, HttpState};
use serde_json::Value;

use super::common::test_config;

/// A running facade: `App::build` + `mcp_pool::http::serve` on 127.0.0.1:0.
pub struct TestServer {
    pub addr: SocketAddr,
    pub service_key: String,
    pub admin_key: String,
    pub state: HttpState,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    app: Option<App>,
    pub dir: tempfile::TempDir,
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
        let config = test_config(dir.path(), pool, &format!("{extra}\n{auth_section}"));
        TestServer::start_with(dir, config, env).await
    }

    /// A facade on `config` (whose key files must lie under `dir`); `env` as in `start`.
    pub async fn start_with(
        dir: tempfile::TempDir,
        config: mcp_pool::config::Config,
        env: &[(&str, &str)],
    ) -> TestServer {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let auth = Auth::from_config(&config.auth, |name| env.get(name).cloned()).expect("auth");
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path)
                .expect("key file created")
                .trim()
                .to_owned()
        };
        let admin_key = read(&config.auth.admin_key_file);
        let service_key = if config.auth.mode == mcp_pool::config::AuthMode::ApiKey {
            read(&config.auth.api_key_file)
        } else {
            String::new()
        };
        let app = App::build(config).await.expect("app starts");
        let state = HttpState::new(
            app.pool.clone(),
            app.storage.credentials.clone(),
            app.storage.store.clone(),
            Arc::new(app.config.clone()),
            auth,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(mcp_pool::http::serve(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            service_key,
            admin_key,
            state,
            shutdown: Some(tx),
            server: Some(server),
            app: Some(app),
            dir,
        }
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
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("serve");
        }
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
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

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Resp {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
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
        let response = sender.send_request(request).await.expect("response");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
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
