//! Plaintext credential files never outlive their row: a crash between the two (kill -9 during
//! a purge, before purges removed the file first) or a file of the older layout is swept at
//! start-up, while files of active rows stay.

mod common;

use common::test_config;
use mcp_pool::app::App;
use mcp_pool::store::CredentialWriter;
use mcp_pool::store::{Secret, ServerName, Tokens, UserId};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_removes_credential_files_without_an_active_row() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    let app = App::build(test_config(dir.path(), "", "")).await.unwrap();
    let (kept_user, demo) = (
        UserId::parse("kept").unwrap(),
        ServerName::parse("demo").unwrap(),
    );
    app.storage
        .credentials
        .create(
            &kept_user,
            &demo,
            Tokens {
                access_token: Some(Secret::new("still-mine")),
                refresh_token: None,
                token_expiry: None,
            },
        )
        .await
        .unwrap();
    let gone_user = UserId::parse("gone").unwrap();
    app.storage
        .credentials
        .create(
            &gone_user,
            &demo,
            Tokens {
                access_token: Some(Secret::new("deactivated")),
                refresh_token: None,
                token_expiry: None,
            },
        )
        .await
        .unwrap();
    app.storage
        .credentials
        .deactivate(&gone_user, &demo)
        .await
        .unwrap();
    app.stop().await;

    let kept = creds.join("kept/demo/credentials.json");
    assert!(kept.is_file());
    // What a crash leaves: a plaintext file whose row is gone (never created, purged, or
    // deactivated), and a file in the layout before per-pair directories.
    let orphans = [
        creds.join("ghost/demo/credentials.json"),
        creds.join("gone/demo/credentials.json"),
        creds.join("kept/demo2/credentials.json"),
    ];
    for orphan in &orphans {
        std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
        std::fs::write(orphan, r#"{"access_token":"leaked"}"#).unwrap();
    }
    let legacy = creds.join("kept/demo.json");
    std::fs::write(&legacy, r#"{"access_token":"old-layout"}"#).unwrap();

    let app = App::build(test_config(dir.path(), "", "")).await.unwrap();
    for orphan in &orphans {
        assert!(
            !orphan.exists(),
            "{} survived the start-up sweep",
            orphan.display()
        );
    }
    assert!(!legacy.exists(), "the old-layout file survived");
    assert!(kept.is_file(), "an active row's file is kept");
    assert!(
        std::fs::read_to_string(&kept)
            .unwrap()
            .contains("still-mine"),
        "and untouched"
    );
    // A later orphan goes with the periodic cleanup too.
    let late = creds.join("late/demo/credentials.json");
    std::fs::create_dir_all(late.parent().unwrap()).unwrap();
    std::fs::write(&late, "{}").unwrap();
    app.storage
        .credentials
        .cleanup_inactive(std::time::Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(!late.exists(), "cleanup sweeps orphans");
    app.stop().await;
}
