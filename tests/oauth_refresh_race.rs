//! Two independent instances (their own `Store`, `CredentialActor`, credentials directory and
//! `TokenRefresher`) on one database, racing to refresh the same expiring tokens against a
//! real OAuth server: exactly one token request is sent and exactly one write wins; the other
//! instance re-reads and uses the winner's tokens. On PostgreSQL (as in production with several
//! instances) and on SQLite.

mod common;
#[path = "common/http.rs"]
mod http;
#[path = "common/oauth.rs"]
mod oauth;

use std::collections::BTreeMap;

use mcp_pool::actors::{CredentialArgs, CredentialError, CredentialHandle};
use mcp_pool::config::Config;
use mcp_pool::oauth::{Freshness, Provider, TokenRefresher, pkce};
use mcp_pool::store::CredentialWriter;
use mcp_pool::store::{
    BackendKind, CredentialFiles, CredentialSpec, Secret, ServerName, Store, StoreError,
    TokenUpdate, Tokens, UserId,
};
use oauth::{MockOAuth, oauth_server, query_param};
use serde_json::json;

struct Instance {
    credentials: CredentialHandle,
    refresher: TokenRefresher,
    files: CredentialFiles,
    _dir: tempfile::TempDir,
}

async fn instance(config: &Config, store: Store) -> Instance {
    let dir = tempfile::tempdir().unwrap();
    let files = CredentialFiles::open(dir.path().join("creds")).unwrap();
    let specs: BTreeMap<ServerName, CredentialSpec> = config
        .servers
        .iter()
        .map(|(name, server)| {
            (
                ServerName::parse(name).unwrap(),
                CredentialSpec::from_config(server, |_| None),
            )
        })
        .collect();
    let (credentials, _) = CredentialHandle::spawn(CredentialArgs {
        store,
        files: files.clone(),
        specs,
        cleanup: None,
    })
    .await
    .unwrap();
    let refresher =
        TokenRefresher::from_config(config, std::sync::Arc::new(credentials.clone()), &|_| None)
            .unwrap();
    Instance {
        credentials,
        refresher,
        files,
        _dir: dir,
    }
}

/// A refresh token the mock server will honour, obtained through its real code flow.
async fn real_tokens(mock: &MockOAuth, provider: &Provider) -> Tokens {
    let verifier = pkce::random_token().unwrap();
    let url = provider
        .authorization_url(
            &pkce::random_token().unwrap(),
            &pkce::s256_challenge(&verifier),
        )
        .unwrap();
    let code = query_param(&mock.authorize(url.as_str()).await, "code").unwrap();
    let tokens = provider
        .exchange_code(&Secret::new(code), &verifier)
        .await
        .unwrap();
    Tokens {
        access_token: Some(tokens.access_token),
        refresh_token: tokens.refresh_token,
        // Due: within refresh_before (5m).
        token_expiry: Some(chrono::Utc::now() + chrono::Duration::seconds(60)),
    }
}

async fn race(kind: BackendKind) {
    let mock = MockOAuth::start().await;
    let config = Config::parse(&oauth_server("gdemo", &mock, "5m", false)).unwrap();
    config.validate().unwrap();
    let (store_a, _dir, options) = common::fresh_store(kind).await;
    // A second, independent connection pool on the same database and key file.
    let store_b = Store::connect(&options).await.unwrap();
    let a = instance(&config, store_a).await;
    let b = instance(&config, store_b).await;
    let (user, server) = (
        UserId::parse("alice").unwrap(),
        ServerName::parse("gdemo").unwrap(),
    );
    let provider = a.refresher.provider(&server).unwrap().clone();
    let (info, _) = a
        .credentials
        .create(&user, &server, real_tokens(&mock, &provider).await)
        .await
        .unwrap();
    b.credentials.prepare_file(&user, &server).await.unwrap();

    // Both instances see the same due tokens; the token endpoint is slow, so the two checks
    // overlap.
    mock.control(json!({ "delay_ms": 400, "reset_stats": true }))
        .await;
    let (ra, rb) = tokio::join!(
        a.refresher.check_now(&user, &server),
        b.refresher.check_now(&user, &server)
    );
    let stats = mock.stats().await;
    let mut outcomes = [
        ra.unwrap_or_else(|e| panic!("a: {e} {stats}")),
        rb.unwrap_or_else(|e| panic!("b: {e} {stats}")),
    ];
    outcomes.sort_by_key(|f| format!("{f:?}"));
    assert_eq!(
        outcomes,
        [Freshness::Refreshed, Freshness::RefreshedElsewhere],
        "one refreshed, the other used its tokens"
    );
    let stats = mock.stats().await;
    assert_eq!(
        stats["token_requests"], 1,
        "exactly one token request: {stats}"
    );

    // One write: created (v1), claimed (v2), written (v3). Both files hold the winner's token.
    let stored = a
        .credentials
        .store()
        .get(&user, &server)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.info.version, info.version + 2);
    assert!(stored.info.is_active);
    let token = stored.tokens.access_token.clone().unwrap();
    for files in [&a.files, &b.files] {
        let text = std::fs::read_to_string(files.path_for(&user, &server)).unwrap();
        let file: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(file["access_token"].as_str(), Some(token.expose()));
    }

    // The write itself is a compare-and-swap: of two writers holding the same version exactly
    // one wins, the other gets Conflict (and, in the refresher, re-reads).
    let version = stored.info.version;
    let update = |t: &str| TokenUpdate {
        access_token: Some(Secret::new(t)),
        ..TokenUpdate::default()
    };
    let (wa, wb) = tokio::join!(
        a.credentials
            .update(&user, &server, Some(version), update("from-a")),
        b.credentials
            .update(&user, &server, Some(version), update("from-b"))
    );
    let conflicts = [&wa, &wb]
        .iter()
        .filter(|r| matches!(r, Err(CredentialError::Store(StoreError::Conflict { .. }))))
        .count();
    assert_eq!(conflicts, 1, "{wa:?} / {wb:?}");
    assert_eq!([&wa, &wb].iter().filter(|r| r.is_ok()).count(), 1);
    let last = a
        .credentials
        .store()
        .get(&user, &server)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last.info.version, version + 1);

    a.credentials.shutdown().await;
    b.credentials.shutdown().await;
}

#[tokio::test]
async fn two_instances_on_postgres_send_one_refresh_and_write_once() {
    race(BackendKind::Postgres).await;
}

#[tokio::test]
async fn two_instances_on_sqlite_send_one_refresh_and_write_once() {
    race(BackendKind::Sqlite).await;
}
