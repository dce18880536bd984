//! The credential store and the CredentialActor on both real backends: a SQLite file and the
//! PostgreSQL server on 127.0.0.1:5432 (a fresh schema per test).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use common::fresh_store;
use mcp_pool::actors::{CredentialArgs, CredentialError, CredentialHandle};
use mcp_pool::config::CredentialsFormat;
use mcp_pool::store::CredentialWriter;
use mcp_pool::store::{
    BackendKind, CredentialFiles, CredentialSpec, KeyRotation, NewOAuthState, RegisteredClientRow,
    Secret, ServerName, Store, StoreError, Stored, TokenUpdate, Tokens, UserId,
};

/// Runs an `async fn(BackendKind)` test case once per backend, as two named tests.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$case(mcp_pool::store::BackendKind::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$case(mcp_pool::store::BackendKind::Postgres).await;
            }
        }
    )*};
}

on_both_backends!(
    crud_round_trip,
    replace_and_reactivate,
    reconnect_required_is_stored_and_cleared_by_a_new_connect,
    update_is_compare_and_swap,
    cleanup_removes_only_old_inactive_rows,
    tampered_and_swapped_ciphertexts_are_rejected,
    key_rotation_leaves_no_row_on_the_old_key,
    a_failed_key_rotation_changes_nothing,
    actor_writes_files_privately_and_atomically,
    fifty_concurrent_updates_lose_nothing,
    missing_file_is_recreated_from_the_database,
    periodic_cleanup_runs_on_its_own,
);

fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}

fn server(name: &str) -> ServerName {
    ServerName::parse(name).unwrap()
}

fn tokens(access: &str, refresh: Option<&str>) -> Tokens {
    Tokens {
        access_token: Some(Secret::new(access)),
        refresh_token: refresh.map(Secret::new),
        token_expiry: Some(Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap()),
    }
}

fn specs() -> BTreeMap<ServerName, CredentialSpec> {
    let mut specs = BTreeMap::new();
    specs.insert(
        server("demo"),
        CredentialSpec {
            format: CredentialsFormat::TokenJson,
            client_id: None,
            client_secret: None,
            file: true,
        },
    );
    specs.insert(
        server("google-analytics"),
        CredentialSpec {
            format: CredentialsFormat::GoogleAuthorizedUser,
            client_id: Some("client-123.apps.googleusercontent.com".into()),
            client_secret: Some(Secret::new("client-secret")),
            file: true,
        },
    );
    specs
}

async fn spawn_actor(store: &Store, dir: &Path) -> (CredentialHandle, CredentialFiles) {
    spawn_actor_with(store, dir, None).await
}

async fn spawn_actor_with(
    store: &Store,
    dir: &Path,
    cleanup: Option<(Duration, Duration)>,
) -> (CredentialHandle, CredentialFiles) {
    let files = CredentialFiles::open(common::credentials_dir(dir)).unwrap();
    let (handle, _) = CredentialHandle::spawn(CredentialArgs {
        store: store.clone(),
        files: files.clone(),
        specs: specs(),
        cleanup,
    })
    .await
    .unwrap();
    (handle, files)
}

async fn crud_round_trip(kind: BackendKind) {
    let (store, dir, _) = fresh_store(kind).await;
    let (alice, demo) = (user("alice"), server("demo"));
    let path = dir.path().join("x.json");
    assert!(store.get(&alice, &demo).await.unwrap().is_none());

    let (record, stored) = store
        .create(&alice, &demo, &path, &tokens("a1", Some("r1")))
        .await
        .unwrap();
    assert_eq!(stored, Stored::Created);
    assert_eq!(record.info.version, 1);
    assert!(record.info.is_active);

    let got = store.get(&alice, &demo).await.unwrap().expect("row");
    assert_eq!(got.tokens, tokens("a1", Some("r1")));
    assert_eq!(got.info.credentials_path, path);
    assert_eq!(got.info.id, record.info.id);

    let updated = store
        .update_tokens(
            &alice,
            &demo,
            Some(1),
            &TokenUpdate {
                access_token: Some(Secret::new("a2")),
                ..TokenUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.info.version, 2);
    assert_eq!(updated.tokens.access_token.unwrap().expose(), "a2");
    // A provider that does not rotate refresh tokens: the old one is kept.
    assert_eq!(updated.tokens.refresh_token.unwrap().expose(), "r1");

    assert!(store.deactivate(&alice, &demo).await.unwrap());
    assert!(store.get(&alice, &demo).await.unwrap().is_none());
    assert!(!store.deactivate(&alice, &demo).await.unwrap());
    let all = store.list(Some(&alice), true).await.unwrap();
    assert_eq!(all.len(), 1);
    assert!(!all[0].is_active);
    assert!(store.list(Some(&alice), false).await.unwrap().is_empty());

    assert_eq!(store.delete(&alice, &demo).await.unwrap(), 1);
    assert!(store.list(None, true).await.unwrap().is_empty());
}

async fn replace_and_reactivate(kind: BackendKind) {
    let (store, dir, _) = fresh_store(kind).await;
    let (bob, demo) = (user("bob"), server("demo"));
    let path = dir.path().join("f");
    store
        .create(&bob, &demo, &path, &tokens("a1", None))
        .await
        .unwrap();
    let (second, stored) = store
        .create(&bob, &demo, &path, &tokens("a2", None))
        .await
        .unwrap();
    assert_eq!(stored, Stored::Replaced);
    assert_eq!(second.tokens.access_token.unwrap().expose(), "a2");
    assert_eq!(store.list(None, true).await.unwrap().len(), 1);

    store.deactivate(&bob, &demo).await.unwrap();
    let (third, stored) = store
        .create(&bob, &demo, &path, &tokens("a3", None))
        .await
        .unwrap();
    assert_eq!(
        stored,
        Stored::Created,
        "re-connecting after a deactivation is a new connection"
    );
    assert_eq!(
        third.info.id, second.info.id,
        "the row is reactivated, not duplicated"
    );
    assert_eq!(store.list(None, true).await.unwrap().len(), 1);
}

async fn reconnect_required_is_stored_and_cleared_by_a_new_connect(kind: BackendKind) {
    let (store, dir, _) = fresh_store(kind).await;
    let (carol, demo) = (user("carol"), server("demo"));
    let path = dir.path().join("f");
    let (first, _) = store
        .create(&carol, &demo, &path, &tokens("a1", Some("r1")))
        .await
        .unwrap();
    assert!(!first.info.reconnect_required);
    assert!(!store.reconnect_required(&carol, &demo).await.unwrap());
    // A stale version (a concurrent refresh rotated the row): not revoked, nothing changes.
    let version = first.info.version;
    assert!(
        !store
            .require_reconnect(&carol, &demo, version + 1)
            .await
            .unwrap()
    );
    assert!(store.get(&carol, &demo).await.unwrap().is_some());

    assert!(
        store
            .require_reconnect(&carol, &demo, version)
            .await
            .unwrap()
    );
    assert!(
        store.get(&carol, &demo).await.unwrap().is_none(),
        "deactivated"
    );
    assert!(store.reconnect_required(&carol, &demo).await.unwrap());
    let rows = store.list(Some(&carol), true).await.unwrap();
    assert!(rows[0].reconnect_required && !rows[0].is_active);
    // Another user's flag, and a user's deactivation, are not a revoked grant.
    assert!(
        !store
            .reconnect_required(&user("dave"), &demo)
            .await
            .unwrap()
    );

    let (again, stored) = store
        .create(&carol, &demo, &path, &tokens("a2", Some("r2")))
        .await
        .unwrap();
    assert_eq!(stored, Stored::Created);
    assert!(again.info.is_active && !again.info.reconnect_required);
    assert!(!store.reconnect_required(&carol, &demo).await.unwrap());
    store.deactivate(&carol, &demo).await.unwrap();
    assert!(!store.reconnect_required(&carol, &demo).await.unwrap());
}

async fn update_is_compare_and_swap(kind: BackendKind) {
    let (store, dir, _) = fresh_store(kind).await;
    let (carol, demo) = (user("carol"), server("demo"));
    let update = TokenUpdate {
        access_token: Some(Secret::new("new")),
        ..TokenUpdate::default()
    };
    let missing = store.update_tokens(&carol, &demo, None, &update).await;
    assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");

    store
        .create(&carol, &demo, &dir.path().join("f"), &tokens("old", None))
        .await
        .unwrap();
    store
        .update_tokens(&carol, &demo, Some(1), &update)
        .await
        .unwrap();
    let stale = store.update_tokens(&carol, &demo, Some(1), &update).await;
    assert!(
        matches!(
            stale,
            Err(StoreError::Conflict {
                expected: 1,
                actual: 2
            })
        ),
        "{stale:?}"
    );
}

async fn cleanup_removes_only_old_inactive_rows(kind: BackendKind) {
    let (store, dir, _) = fresh_store(kind).await;
    let path = dir.path().join("f");
    let demo = server("demo");
    for id in ["u1", "u2", "u3"] {
        store
            .create(&user(id), &demo, &path, &tokens("t", None))
            .await
            .unwrap();
    }
    store.deactivate(&user("u1"), &demo).await.unwrap();
    store.deactivate(&user("u2"), &demo).await.unwrap();

    let none = store
        .cleanup_inactive(Duration::from_secs(30 * 86400))
        .await
        .unwrap();
    assert!(none.is_empty(), "fresh inactive rows are kept for 30 days");

    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut removed = store
        .cleanup_inactive(Duration::from_millis(1))
        .await
        .unwrap();
    removed.sort();
    assert_eq!(
        removed,
        vec![(user("u1"), demo.clone()), (user("u2"), demo.clone())]
    );
    let left = store.list(None, true).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].user_id, user("u3"));
}

/// Rewrites a row's column behind the repository's back, as an attacker with database access.
async fn set_column(
    kind: BackendKind,
    url: &str,
    sql: &str,
    value: Option<String>,
    id: uuid::Uuid,
) {
    match kind {
        BackendKind::Sqlite => {
            let pool = sqlx::SqlitePool::connect(url).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                .bind(value)
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
        BackendKind::Postgres => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                .bind(value)
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
    }
}

async fn tampered_and_swapped_ciphertexts_are_rejected(kind: BackendKind) {
    let (store, dir, options) = fresh_store(kind).await;
    let demo = server("demo");
    let path = dir.path().join("f");
    let (a, _) = store
        .create(&user("mallory"), &demo, &path, &tokens("mine", None))
        .await
        .unwrap();
    let (b, _) = store
        .create(&user("victim"), &demo, &path, &tokens("theirs", None))
        .await
        .unwrap();

    // Copy the victim's ciphertext into the attacker's row: it must not decrypt there.
    let victims = read_access_ciphertext(kind, &options.url, b.info.id).await;
    set_column(
        kind,
        &options.url,
        "UPDATE mcp_connections SET access_token = $1 WHERE id = $2",
        Some(victims.clone()),
        a.info.id,
    )
    .await;
    let swapped = store.get(&user("mallory"), &demo).await;
    assert!(matches!(swapped, Err(StoreError::Crypto(_))), "{swapped:?}");

    // Flip one character of the victim's own ciphertext.
    let mut tampered = victims.into_bytes();
    let mid = tampered.len() / 2;
    tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    set_column(
        kind,
        &options.url,
        "UPDATE mcp_connections SET access_token = $1 WHERE id = $2",
        Some(tampered),
        b.info.id,
    )
    .await;
    let broken = store.get(&user("victim"), &demo).await;
    assert!(matches!(broken, Err(StoreError::Crypto(_))), "{broken:?}");
}

async fn read_access_ciphertext(kind: BackendKind, url: &str, id: uuid::Uuid) -> String {
    let sql = "SELECT access_token FROM mcp_connections WHERE id = $1";
    let value: Option<String> = match kind {
        BackendKind::Sqlite => {
            let pool = sqlx::SqlitePool::connect(url).await.unwrap();
            let value = sqlx::query_scalar(sql)
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            value
        }
        BackendKind::Postgres => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            let value = sqlx::query_scalar(sql)
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            value
        }
    };
    let value = value.expect("ciphertext");
    assert!(
        !value.contains("mine") && !value.contains("theirs"),
        "stored in clear"
    );
    value
}

async fn key_rotation_leaves_no_row_on_the_old_key(kind: BackendKind) {
    let (store, dir, options) = fresh_store(kind).await;
    let (handle, _files) = spawn_actor(&store, dir.path()).await;
    let demo = server("demo");
    for i in 0..7 {
        handle
            .create(
                &user(&format!("user{i}")),
                &demo,
                tokens(&format!("a{i}"), Some("r")),
            )
            .await
            .unwrap();
    }
    handle.deactivate(&user("user0"), &demo).await.unwrap();
    // Registered OAuth clients (one with a secret, one public) and a pending connect flow hold
    // ciphertexts too.
    for (name, secret) in [("notion", Some("client-secret")), ("linear", None)] {
        store
            .insert_oauth_client(&RegisteredClientRow {
                server: server(name),
                endpoints: "{}".into(),
                client_id: Secret::new(format!("client-of-{name}")),
                client_secret: secret.map(Secret::new),
                created_at: Utc::now(),
            })
            .await
            .unwrap();
    }
    let state_hash = "ab".repeat(32);
    store
        .insert_oauth_state(&NewOAuthState {
            state_hash: state_hash.clone(),
            user: user("user1"),
            server: server("notion"),
            code_verifier: Secret::new("the-verifier"),
            expires_at: Utc::now() + chrono::Duration::minutes(10),
        })
        .await
        .unwrap();

    let rotation = handle.rotate_key(true).await.unwrap();
    assert_eq!(
        rotation,
        KeyRotation {
            version: 2,
            credentials: 7,
            clients: 2,
            states: 1
        },
        "inactive rows, clients and pending flows are re-encrypted too"
    );
    let rows = store.list(None, true).await.unwrap();
    // Every row, the inactive one included, and no other key version anywhere.
    assert_eq!(rows.len(), 7, "{rows:?}");
    let versions: std::collections::BTreeSet<_> = rows.iter().map(|row| row.key_version).collect();
    assert_eq!(versions, [2].into(), "{rows:?}");
    // A second rotation without a new key has nothing to do.
    assert_eq!(
        handle.rotate_key(false).await.unwrap(),
        KeyRotation {
            version: 2,
            ..KeyRotation::default()
        }
    );
    handle.shutdown().await;
    store.close().await;

    // The operator retires key 1: a fresh store that knows only key 2 reads everything.
    let keys = std::fs::read_to_string(&options.key_file).unwrap();
    let kept: String = keys
        .lines()
        .filter(|l| l.starts_with("2:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(kept, keys, "key 1 was in the file");
    std::fs::write(&options.key_file, kept).unwrap();
    let retired = Store::connect(&options).await.unwrap();
    for i in 1..7 {
        let record = retired
            .get(&user(&format!("user{i}")), &demo)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            record.tokens.access_token.unwrap().expose(),
            format!("a{i}")
        );
    }
    let notion = retired
        .oauth_client(&server("notion"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(notion.client_id.expose(), "client-of-notion");
    assert_eq!(notion.client_secret.unwrap().expose(), "client-secret");
    let linear = retired
        .oauth_client(&server("linear"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(linear.client_id.expose(), "client-of-linear");
    assert!(linear.client_secret.is_none());
    let flow = retired
        .take_oauth_state(&state_hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(flow.code_verifier.expose(), "the-verifier");
    retired.close().await;
}

async fn a_failed_key_rotation_changes_nothing(kind: BackendKind) {
    let (store, _dir, options) = fresh_store(kind).await;
    let demo = server("demo");
    let path = options.key_file.with_file_name("f.json");
    for name in ["alice", "bob"] {
        store
            .create(&user(name), &demo, &path, &tokens(name, None))
            .await
            .unwrap();
    }
    // A registered client whose ciphertext does not decrypt (tampered, or from another key).
    run_sql(
        kind,
        &options.url,
        "INSERT INTO oauth_clients (server_name, endpoints, client_id, client_secret, \
         key_version, created_at) VALUES ('broken', '{}', 'not-a-ciphertext', NULL, 1, \
         CURRENT_TIMESTAMP)",
    )
    .await;
    let failed = store.rotate_key(true).await;
    assert!(matches!(failed, Err(StoreError::Crypto(_))), "{failed:?}");
    // The credentials came before the client in the transaction: rolled back with it.
    let versions: Vec<u32> = store
        .list(None, true)
        .await
        .unwrap()
        .iter()
        .map(|row| row.key_version)
        .collect();
    assert_eq!(versions, [1, 1], "no row moved to key 2 alone");
    // Once the broken row is gone the rotation goes through, onto the key added before.
    run_sql(
        kind,
        &options.url,
        "DELETE FROM oauth_clients WHERE server_name = 'broken'",
    )
    .await;
    let done = store.rotate_key(false).await.unwrap();
    assert_eq!((done.version, done.credentials), (2, 2), "{done:?}");
    store.close().await;
}

/// Runs one statement as the test's own database user (no row-level security on SQLite; the
/// PostgreSQL test user is a superuser).
async fn run_sql(kind: BackendKind, url: &str, sql: &str) {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    match kind {
        BackendKind::Sqlite => {
            let pool = sqlx::SqlitePool::connect(url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        }
        BackendKind::Postgres => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        }
    }
}

async fn actor_writes_files_privately_and_atomically(kind: BackendKind) {
    let (store, dir, _) = fresh_store(kind).await;
    let (handle, files) = spawn_actor(&store, dir.path()).await;
    let root = files.root().to_owned();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;

    // The design's `{user}-{server}.json` would make these two share a file.
    let (a_b, c) = (user("a-b"), server("c"));
    let (a, b_c) = (user("a"), server("b-c"));
    specs_require(&handle, &a_b, &c).await;
    let registered = server("demo");
    let (info1, _) = handle
        .create(&a_b, &registered, tokens("one", None))
        .await
        .unwrap();
    let (info2, _) = handle
        .create(&a, &registered, tokens("two", None))
        .await
        .unwrap();
    assert_ne!(info1.credentials_path, info2.credentials_path);
    assert_ne!(files.path_for(&a_b, &c), files.path_for(&a, &b_c));

    let file = &info1.credentials_path;
    assert!(file.starts_with(&root));
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(file.parent().unwrap()), 0o700);
    assert_eq!(mode(file), 0o600);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    assert_eq!(json["access_token"], "one");

    // Google's format carries the OAuth client and the refresh token.
    let ga = server("google-analytics");
    let (info, _) = handle
        .create(&a, &ga, tokens("acc", Some("ref")))
        .await
        .unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&info.credentials_path).unwrap()).unwrap();
    assert_eq!(json["type"], "authorized_user");
    assert_eq!(json["client_id"], "client-123.apps.googleusercontent.com");
    assert_eq!(json["client_secret"], "client-secret");
    assert_eq!(json["refresh_token"], "ref");

    // Atomic replacement: new content, same mode, no temp file left behind.
    handle
        .update(
            &a_b,
            &registered,
            None,
            TokenUpdate {
                access_token: Some(Secret::new("one-b")),
                ..TokenUpdate::default()
            },
        )
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    assert_eq!(json["access_token"], "one-b");
    assert_eq!(mode(file), 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");

    // A symlink planted at the target is replaced, never followed.
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::remove_file(file).unwrap();
    std::os::unix::fs::symlink(&victim, file).unwrap();
    handle
        .update(
            &a_b,
            &registered,
            None,
            TokenUpdate {
                access_token: Some(Secret::new("one-c")),
                ..TokenUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(
        !std::fs::symlink_metadata(file)
            .unwrap()
            .file_type()
            .is_symlink()
    );

    // A symlinked user directory is refused, not followed.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, root.join("evil")).unwrap();
    let refused = handle
        .create(&user("evil"), &registered, tokens("x", None))
        .await;
    assert!(
        matches!(refused, Err(CredentialError::File { .. })),
        "{refused:?}"
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);

    // Deactivate removes the file; delete removes row and file.
    handle.deactivate(&a, &registered).await.unwrap();
    assert!(!files.exists(&a, &registered));
    handle.delete(&a, &ga).await.unwrap();
    assert!(!files.exists(&a, &ga));
    assert!(store.get(&a, &ga).await.unwrap().is_none());

    let unknown = handle.create(&a, &server("nope"), tokens("x", None)).await;
    assert!(
        matches!(unknown, Err(CredentialError::UnknownServer(_))),
        "{unknown:?}"
    );
    handle.shutdown().await;
}

async fn specs_require(handle: &CredentialHandle, user: &UserId, server: &ServerName) {
    // `c` is not a configured server: credentials for it are refused outright.
    let refused = handle.create(user, server, tokens("x", None)).await;
    assert!(
        matches!(refused, Err(CredentialError::UnknownServer(_))),
        "{refused:?}"
    );
}

async fn fifty_concurrent_updates_lose_nothing(kind: BackendKind) {
    let (store, dir, options) = fresh_store(kind).await;
    let (handle, _files) = spawn_actor(&store, dir.path()).await;
    let demo = server("demo");
    let dave = user("dave");
    handle
        .create(&dave, &demo, tokens("t0", None))
        .await
        .unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let (writer, dave, server_name) = (handle.clone(), dave.clone(), demo.clone());
        tasks.spawn(async move {
            writer
                .update(
                    &dave,
                    &server_name,
                    None,
                    TokenUpdate {
                        access_token: Some(Secret::new(format!("t{i}"))),
                        ..TokenUpdate::default()
                    },
                )
                .await
        });
        // Fifty new users at the same time as well.
        let (handle, demo) = (handle.clone(), demo.clone());
        tasks.spawn(async move {
            handle
                .create(&user(&format!("new{i}")), &demo, tokens("n", None))
                .await
                .map(|(info, _)| info)
        });
    }
    // A second writer outside the actor (e.g. the operator CLI) on the same database.
    let other = Store::connect(&options).await.unwrap();
    for i in 0..20 {
        other
            .create(
                &user(&format!("cli{i}")),
                &demo,
                &dir.path().join("f"),
                &tokens("c", None),
            )
            .await
            .expect("a concurrent writer must never see SQLITE_BUSY");
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap().expect("every write succeeds");
    }
    let record = store.get(&dave, &demo).await.unwrap().unwrap();
    assert_eq!(record.info.version, 51, "every update landed");
    assert_eq!(store.list(None, false).await.unwrap().len(), 1 + 50 + 20);
    handle.shutdown().await;
}

async fn missing_file_is_recreated_from_the_database(kind: BackendKind) {
    let (store, dir, _) = fresh_store(kind).await;
    let (handle, files) = spawn_actor(&store, dir.path()).await;
    let (erin, demo) = (user("erin"), server("demo"));
    let (info, _) = handle
        .create(&erin, &demo, tokens("keep-me", None))
        .await
        .unwrap();
    std::fs::remove_file(&info.credentials_path).unwrap();
    let path = handle.prepare_file(&erin, &demo).await.unwrap();
    assert_eq!(path, info.credentials_path);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(json["access_token"], "keep-me");
    assert!(files.exists(&erin, &demo));
    let none = handle.prepare_file(&user("nobody"), &demo).await;
    assert!(
        matches!(none, Err(CredentialError::NotFound(_))),
        "{none:?}"
    );
    handle.shutdown().await;
}

async fn periodic_cleanup_runs_on_its_own(kind: BackendKind) {
    let (store, dir, _) = fresh_store(kind).await;
    // Every 50 ms, delete inactive rows older than 1 ms.
    let cleanup = Some((Duration::from_millis(50), Duration::from_millis(1)));
    let (handle, _) = spawn_actor_with(&store, dir.path(), cleanup).await;
    let demo = server("demo");
    handle
        .create(&user("old"), &demo, tokens("t", None))
        .await
        .unwrap();
    handle
        .create(&user("kept"), &demo, tokens("t", None))
        .await
        .unwrap();
    handle.deactivate(&user("old"), &demo).await.unwrap();
    let cleaned = common::wait_until(common::PATIENCE, || async {
        store.list(None, true).await.unwrap().len() == 1
    })
    .await;
    assert!(cleaned, "the periodic cleanup never ran");
    let left = store.list(None, true).await.unwrap();
    assert_eq!(
        left[0].user_id,
        user("kept"),
        "active rows are never cleaned up"
    );
    handle.shutdown().await;
}
