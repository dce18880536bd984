//! Helpers of the OAuth tests: a real OAuth 2 server (npm `oauth2-mock-server`, started by
//! `tests/fixtures/oauth/mock-server.mjs` as a child process on a loopback port), a plain HTTP
//! client for it, and the config of demo servers whose OAuth client points at it.
//! Include with `mod common; #[path = "common/http.rs"] mod http; #[path = "common/oauth.rs"]
//! mod oauth;`.
#![allow(dead_code)]

use std::process::Stdio;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

use super::common::{BIN, required_env};

/// The running mock server. Killed on drop (and it exits by itself when its stdin closes).
pub struct MockOAuth {
    pub url: String,
    child: tokio::process::Child,
}

impl MockOAuth {
    pub async fn start() -> MockOAuth {
        let package = required_env("MCP_POOL_TEST_OAUTH_MOCK");
        let launcher = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/oauth/mock-server.mjs"
        );
        let mut child = tokio::process::Command::new("node")
            .arg(launcher)
            .arg(&package)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs the OAuth mock server");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("mock server starts within 20s")
            .expect("read")
            .expect("mock server printed its URL");
        let url = serde_json::from_str::<Value>(&line).expect("JSON line")["url"]
            .as_str()
            .expect("url")
            .to_owned();
        MockOAuth { url, child }
    }

    /// Sets behaviours (see the launcher's header) and returns the stats.
    pub async fn control(&self, behaviour: Value) -> Value {
        let resp = send(
            "POST",
            &format!("{}/__control", self.url),
            Some(("application/json", behaviour.to_string())),
        )
        .await;
        assert_eq!(resp.0, 200, "control: {}", resp.2);
        serde_json::from_str(&resp.2).expect("stats JSON")
    }

    pub async fn stats(&self) -> Value {
        let resp = send("GET", &format!("{}/__stats", self.url), None).await;
        serde_json::from_str(&resp.2).expect("stats JSON")
    }

    /// Token requests with `grant_type=refresh_token` answered so far.
    pub async fn refresh_requests(&self) -> u64 {
        self.stats().await["by_grant"]["refresh_token"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Every POST to the token endpoint so far (whatever the outcome).
    pub async fn token_requests(&self) -> u64 {
        self.stats().await["token_requests"].as_u64().unwrap_or(0)
    }

    /// The whole connect flow of `server`: started by `user` (a client carrying the user's
    /// credentials), authorized here, its callback delivered through `callback` (any client of
    /// the service, such as another node of a cluster); asserts the success redirect.
    pub async fn connect(
        &self,
        user: &super::http::Client,
        callback: &super::http::Client,
        server: &str,
    ) {
        let started = user
            .post_json(&format!("/v1/oauth/{server}/start"), &serde_json::json!({}))
            .await;
        assert_eq!(started.status, 200, "{}", started.text());
        let url = started.json()["authorization_url"]
            .as_str()
            .expect("authorization_url")
            .to_owned();
        let redirect = self.authorize(&url).await;
        let back = callback.get(&path_and_query(&redirect)).await;
        assert_eq!(
            back.headers["location"].to_str().unwrap(),
            format!("{SUCCESS}?connected={server}")
        );
    }

    /// Plays the user's browser on the provider's page: GET the authorization URL, return the
    /// redirect it answers with (to our callback, carrying `code` and `state`).
    pub async fn authorize(&self, authorization_url: &str) -> String {
        let (status, headers, body) = send("GET", authorization_url, None).await;
        assert_eq!(status, 302, "authorize: {body}");
        headers
            .get("location")
            .expect("Location")
            .to_str()
            .expect("ascii")
            .to_owned()
    }
}

impl Drop for MockOAuth {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Path and query of an absolute URL (our callback, reached through the test client).
pub fn path_and_query(url: &str) -> String {
    let parsed = reqwest::Url::parse(url).expect("URL");
    match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_owned(),
    }
}

/// One query parameter of an absolute URL.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    reqwest::Url::parse(url)
        .expect("URL")
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Replaces one query parameter of an absolute URL.
pub fn with_param(url: &str, name: &str, value: &str) -> String {
    let mut parsed = reqwest::Url::parse(url).expect("URL");
    let pairs: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .filter(|(k, _)| k != name)
        .collect();
    parsed
        .query_pairs_mut()
        .clear()
        .extend_pairs(pairs)
        .append_pair(name, value);
    parsed.into()
}

/// A minimal HTTP/1.1 request to a loopback URL: (status, headers, body).
pub async fn send(
    method: &str,
    url: &str,
    body: Option<(&str, String)>,
) -> (u16, hyper::HeaderMap, String) {
    send_with(method, url, body, &[]).await
}

/// [`send`] with extra request headers (a browser's cookies, say).
pub async fn send_with(
    method: &str,
    url: &str,
    body: Option<(&str, String)>,
    headers: &[(&str, &str)],
) -> (u16, hyper::HeaderMap, String) {
    let parsed = reqwest::Url::parse(url).expect("URL");
    let addr = format!(
        "{}:{}",
        parsed.host_str().expect("host"),
        parsed.port_or_known_default().expect("port")
    );
    let stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let target = path_and_query(url);
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(target)
        .header("host", addr);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let bytes = match body {
        Some((content_type, text)) => {
            builder = builder.header("content-type", content_type);
            Bytes::from(text)
        }
        None => Bytes::new(),
    };
    let response = sender
        .send_request(builder.body(Full::new(bytes)).expect("request"))
        .await
        .expect("response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

pub const SUCCESS: &str = "http://chat.test/settings/connections";
pub const FAILURE: &str = "http://chat.test/settings/connections/error";

/// A demo server (`whoami` reports the credentials file it was given) whose OAuth client uses
/// the mock: `[servers.<name>]` plus its `[servers.<name>.oauth]`.
pub fn oauth_server(name: &str, mock: &MockOAuth, refresh_before: &str, restart: bool) -> String {
    format!(
        "[servers.{name}]\ncommand = {BIN:?}\nargs = [\"demo-server\", \"--test-tools\"]\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n\
         restart_on_token_refresh = {restart}\n\
         [servers.{name}.oauth]\nclient_id = \"mcp-pool-test\"\n\
         authorization_url = \"{url}/authorize\"\ntoken_url = \"{url}/token\"\n\
         scopes = [\"openid\", \"analytics.readonly\"]\n\
         redirect_uri = \"http://127.0.0.1:9/v1/oauth/{name}/callback\"\n\
         extra_auth_params = {{ access_type = \"offline\", prompt = \"consent\" }}\n\
         success_redirect = \"{SUCCESS}\"\nerror_redirect = \"{FAILURE}\"\n\
         refresh_before = \"{refresh_before}\"\ntoken_timeout = \"3s\"\n",
        url = mock.url
    )
}
