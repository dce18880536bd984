//! `App::stop` bounded by `service.shutdown_grace`, and background work wired from config.

mod common;

use std::time::{Duration, Instant};

use common::{BIN, PATIENCE, alive, test_config, wait_until};
use mcp_pool::app::App;
use mcp_pool::store::CredentialWriter;
use mcp_pool::store::{Secret, ServerName, Tokens, UserId};

fn ids(user: &str, server: &str) -> (UserId, ServerName) {
    (
        UserId::parse(user).unwrap(),
        ServerName::parse(server).unwrap(),
    )
}

fn tokens() -> Tokens {
    Tokens {
        access_token: Some(Secret::new("access")),
        refresh_token: None,
        token_expiry: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_will_not_close_is_sigkilled_when_the_shutdown_grace_runs_out() {
    // A leader that outlives stdin EOF and ignores SIGTERM (ignored signals stay ignored across
    // exec, so the demo server and the `sleep` after it ignore it too): only SIGKILL ends it.
    // Its own close would take two `close_grace` periods (2 × 60 s); the shutdown grace is 2 s.
    let stubborn = format!(
        "[servers.stubborn]\ncommand = \"/bin/sh\"\n\
         args = [\"-c\", \"trap '' TERM; \\\"$0\\\" demo-server; exec sleep 3600\", {BIN:?}]\n\
         credentials_env = \"MCP_POOL_CREDENTIALS_FILE\"\ncredentials_format = \"token_json\"\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), "", &stubborn);
    config.pool.close_grace = Duration::from_secs(60);
    config.service.shutdown_grace = Duration::from_secs(2);
    let app = App::build(config).await.expect("app starts");
    let (user, server) = ids("lou", "stubborn");
    app.storage
        .credentials
        .create(&user, &server, tokens())
        .await
        .unwrap();
    let leader = app.pool.get_session(&user, &server).await.unwrap().pid();
    assert!(alive(leader));

    let started = Instant::now();
    app.stop().await;
    let took = started.elapsed();
    // Far below the 120 s the graceful close would take: the grace cut it short.
    assert!(took < Duration::from_secs(60), "stop took {took:?}");
    assert!(
        wait_until(PATIENCE, || std::future::ready(!alive(leader))).await,
        "the stubborn server {leader} survived the shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactive_credentials_are_cleaned_up_on_the_configured_interval() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), "", "");
    config.credentials.cleanup_interval = Duration::from_millis(200);
    config.credentials.cleanup_inactive_after = Duration::from_secs(1);
    let app = App::build(config).await.expect("app starts");
    let (gone_user, server) = ids("mo", "demo");
    let (kept_user, _) = ids("ned", "demo");
    let credentials = &app.storage.credentials;
    credentials
        .create(&gone_user, &server, tokens())
        .await
        .unwrap();
    credentials
        .create(&kept_user, &server, tokens())
        .await
        .unwrap();
    assert!(credentials.deactivate(&gone_user, &server).await.unwrap());

    // Nobody asks for a cleanup: only the periodic one can delete the inactive row.
    let store = &app.storage.store;
    let cleaned = wait_until(PATIENCE, || async {
        store.list(Some(&gone_user), true).await.unwrap().is_empty()
    })
    .await;
    assert!(cleaned, "the periodic cleanup deleted the inactive row");
    assert_eq!(
        store.list(Some(&kept_user), true).await.unwrap().len(),
        1,
        "active credentials are never cleaned up"
    );
    app.stop().await;
}
