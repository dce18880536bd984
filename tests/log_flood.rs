//! Refused requests do not flood the log (issue 11, item 5): hundreds of expected client errors
//! and an expected 5xx write no ERROR line, each one DEBUG line, and one WARN summary per error
//! code. Its own test binary: it installs the process-wide tracing subscriber.

mod common;
#[path = "common/http.rs"]
mod http;

use std::io::Write;
use std::sync::{Arc, Mutex};

use http::TestServer;

/// Everything the subscriber writes, shared with the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_summarised_not_logged_at_error() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "mcp_pool=debug,tower_http=debug",
        ))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let extra = "[servers.ghost]\ncommand = \"mcp-pool-no-such-program\"\n\
                 credentials_env = \"X_CREDENTIALS\"\ncredentials_format = \"token_json\"\n";
    let server = TestServer::start("", extra, "", &[]).await;
    let alice = server.user("alice");
    alice.connect("ghost").await;
    let anonymous = server.anonymous();
    const EACH: usize = 100;
    for _ in 0..EACH {
        assert_eq!(alice.get("/v1/connections/nope").await.status, 404);
        assert_eq!(anonymous.get("/v1/connections").await.status, 401);
        // An expected 5xx: the old trace layer logged every one of these at ERROR.
        assert_eq!(alice.get("/v1/connections/ghost/tools").await.status, 502);
    }
    server.stop().await;
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(lines(" ERROR "), 0, "{text}");
    let summaries = lines("Refusing requests with");
    assert!(
        (3..=6).contains(&summaries),
        "one WARN per code (and window): {summaries}\n{text}"
    );
    assert!(lines("request refused") >= 3 * EACH, "{text}");
}
