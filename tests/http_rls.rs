//! PostgreSQL row-level security on `mcp_connections` (migrations/postgres/0002_rls.sql), seen
//! from a role that does not own the table, as the service should run; and that role's grants
//! (migrations/postgres/20261202180000_app_role_grants.sql): every store operation, the OAuth
//! tables included, works with exactly the documented ones, and a database set up by the
//! earlier advice is carried forward by the migration.

mod common;

use std::str::FromStr;

use chrono::Utc;
use mcp_pool::store::{
    BackendKind, NewOAuthState, RegisteredClientRow, Secret, ServerName, Store, StoreOptions,
    Tokens, UserId,
};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

fn tokens(value: &str) -> Tokens {
    Tokens {
        access_token: Some(Secret::new(value)),
        refresh_token: None,
        token_expiry: None,
    }
}

/// The schema a `fresh_database_url` selects (its `search_path` option).
fn schema_of(url: &str) -> String {
    let tail = url.rsplit("search_path%3D").next().expect("search_path");
    tail.split('&').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_invisible_without_the_right_user_even_on_a_reused_connection() {
    // Owner side: a fresh schema, migrated by the (superuser) test role, which owns the table.
    let dir = tempfile::tempdir().unwrap();
    let owner_options = common::store_options(BackendKind::Postgres, dir.path()).await;
    let owner = Store::connect(&owner_options).await.unwrap();
    owner.migrate().await.unwrap();
    let schema = schema_of(&owner_options.url);

    // The service role: may use the tables, owns none, is no superuser; granted exactly what
    // the migration's comment documents.
    let mut admin = sqlx::PgConnection::connect(&common::postgres_admin_url())
        .await
        .unwrap();
    let (role, app_url) = app_role(&mut admin, &owner_options.url, &schema).await;
    run_all(
        &mut admin,
        &[
            format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.mcp_connections, \
                 {schema}.oauth_states, {schema}.oauth_clients TO {role}"
            ),
            format!("GRANT SELECT ON {schema}._sqlx_migrations TO {role}"),
        ],
    )
    .await;

    // The store, as the service role: every operation works through the scoped transactions.
    let store = Store::connect(&StoreOptions {
        url: app_url.clone(),
        max_connections: 1,
        ..owner_options.clone()
    })
    .await
    .unwrap();
    let (alice, bob) = (
        UserId::parse("alice").unwrap(),
        UserId::parse("bob").unwrap(),
    );
    let demo = ServerName::parse("demo").unwrap();
    let path = dir.path().join("f.json");
    store
        .create(&alice, &demo, &path, &tokens("a-token"))
        .await
        .unwrap();
    store
        .create(&bob, &demo, &path, &tokens("b-token"))
        .await
        .unwrap();
    assert_eq!(
        store
            .get(&alice, &demo)
            .await
            .unwrap()
            .unwrap()
            .tokens
            .access_token,
        Some(Secret::new("a-token"))
    );
    assert_eq!(store.list(Some(&bob), false).await.unwrap().len(), 1);
    assert_eq!(
        store.list(None, false).await.unwrap().len(),
        2,
        "all-users scope"
    );
    assert!(store.deactivate(&bob, &demo).await.unwrap());
    assert!(store.list(Some(&bob), false).await.unwrap().is_empty());
    assert_eq!(
        store
            .cleanup_inactive(std::time::Duration::from_secs(3600))
            .await
            .unwrap()
            .len(),
        0
    );
    store
        .create(&bob, &demo, &path, &tokens("b-token"))
        .await
        .unwrap();
    // `serve` migrates at start-up: with nothing pending that needs no more than the grants.
    store.migrate().await.expect("migrate as the service role");
    // A registered client (discovery) and a pending connect flow, stored and read as the role.
    let notion = ServerName::parse("notion").unwrap();
    oauth_tables_work(&store, &alice, &notion).await;
    // Key rotation as the role re-encrypts all three tables (all-users scope where RLS applies).
    let rotation = store
        .rotate_key(true)
        .await
        .expect("rotate as the service role");
    assert_eq!(
        (rotation.credentials, rotation.clients),
        (2, 1),
        "{rotation:?}"
    );
    assert_eq!(
        store
            .oauth_client(&notion)
            .await
            .unwrap()
            .unwrap()
            .client_id
            .expose(),
        "client-of-notion"
    );
    store.close().await;

    // Raw queries as the service role on ONE pooled connection, reused by two users in turn.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&app_url)
        .await
        .unwrap();
    let backend_pid = || async {
        sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let pid = backend_pid().await;
    let count_all = "SELECT count(*) FROM mcp_connections";
    let users_seen = "SELECT user_id FROM mcp_connections ORDER BY user_id";

    // No setting at all: nothing.
    let n: i64 = sqlx::query_scalar(count_all)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "no app.user_id: no rows");

    for (user, other) in [("alice", "bob"), ("bob", "alice"), ("alice", "bob")] {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT set_config('app.user_id', $1, true)")
            .bind(user)
            .execute(&mut *tx)
            .await
            .unwrap();
        // No WHERE clause: RLS alone limits the rows.
        let seen: Vec<String> = sqlx::query_scalar(users_seen)
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        assert_eq!(seen, vec![user.to_owned()], "{user} sees only their row");
        let updated =
            sqlx::query("UPDATE mcp_connections SET credentials_path = 'x' WHERE user_id = $1")
                .bind(other)
                .execute(&mut *tx)
                .await
                .unwrap()
                .rows_affected();
        assert_eq!(updated, 0, "{user} cannot update {other}'s row");
        let deleted = sqlx::query("DELETE FROM mcp_connections WHERE user_id = $1")
            .bind(other)
            .execute(&mut *tx)
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(deleted, 0, "{user} cannot delete {other}'s row");
        let insert = sqlx::query(
            "INSERT INTO mcp_connections (id, user_id, server_name, credentials_path, is_active, \
             key_version, version, created_at, updated_at) \
             VALUES ($1, $2, 'demo2', 'p', TRUE, 1, 1, now(), now())",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(other)
        .execute(&mut *tx)
        .await;
        assert!(insert.is_err(), "{user} cannot insert a row for {other}");
        tx.rollback().await.unwrap();

        // The setting was transaction-local: the same connection, afterwards, sees nothing.
        assert_eq!(backend_pid().await, pid, "the pooled connection was reused");
        let n: i64 = sqlx::query_scalar(count_all)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(
            n, 0,
            "after {user}'s transaction the connection carries no user"
        );
    }

    // A wrong or empty user sees nothing either.
    for wrong in ["mallory", "", "alice' OR 'x'='x"] {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT set_config('app.user_id', $1, true)")
            .bind(wrong)
            .execute(&mut *tx)
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar(count_all)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, 0, "user {wrong:?} sees no rows");
        tx.rollback().await.unwrap();
    }
    // A session-level (not transaction-local) setting for another user is also scoped to it.
    sqlx::query("SELECT set_config('app.user_id', 'bob', false)")
        .execute(&pool)
        .await
        .unwrap();
    let seen: Vec<String> = sqlx::query_scalar(users_seen)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(seen, vec!["bob".to_owned()]);
    pool.close().await;

    // The owner (FORCE ROW LEVEL SECURITY) is bound by the policies too; only the superuser
    // of the test server bypasses them, which is why the service must not run as one.
    let rls: (bool, bool) = sqlx::query_as(
        "SELECT relrowsecurity, relforcerowsecurity FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = 'mcp_connections'",
    )
    .bind(&schema)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(rls, (true, true));

    owner.close().await;
    drop_role(&mut admin, &role).await;
}

/// A database whose service role was set up by 0002's advice (a grant on `mcp_connections`
/// only), before the OAuth tables' grants were documented: the grants migration gives that
/// role what it needs on them, so the upgraded service works without a manual step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_carries_the_service_roles_grant_to_the_oauth_tables() {
    let dir = tempfile::tempdir().unwrap();
    let owner_options = common::store_options(BackendKind::Postgres, dir.path()).await;
    let schema = schema_of(&owner_options.url);
    // The database as it was before the grants migration.
    let migrator = sqlx::migrate!("./migrations/postgres");
    let before = migrator
        .iter()
        .map(|m| m.version)
        .filter(|v| *v < 20261202180000)
        .max()
        .unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&owner_options.url)
        .await
        .unwrap();
    migrator.run_to(before, &pool).await.unwrap();
    pool.close().await;
    let mut admin = sqlx::PgConnection::connect(&common::postgres_admin_url())
        .await
        .unwrap();
    let (role, app_url) = app_role(&mut admin, &owner_options.url, &schema).await;
    run_all(
        &mut admin,
        &[format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.mcp_connections TO {role}"
        )],
    )
    .await;
    let store = Store::connect(&StoreOptions {
        url: app_url,
        max_connections: 1,
        ..owner_options.clone()
    })
    .await
    .unwrap();
    let (alice, notion) = (
        UserId::parse("alice").unwrap(),
        ServerName::parse("notion").unwrap(),
    );
    let refused = store
        .insert_oauth_client(&client_row(&notion))
        .await
        .expect_err("no grant on oauth_clients yet");
    assert!(
        refused.to_string().contains("permission denied"),
        "{refused}"
    );

    // The upgrade, by the owner.
    let owner = Store::connect(&owner_options).await.unwrap();
    owner.migrate().await.unwrap();
    owner.close().await;

    store
        .migrate()
        .await
        .expect("nothing pending, seen by the role");
    oauth_tables_work(&store, &alice, &notion).await;
    store.close().await;
    drop_role(&mut admin, &role).await;
}

fn client_row(server: &ServerName) -> RegisteredClientRow {
    RegisteredClientRow {
        server: server.clone(),
        endpoints: "{}".into(),
        client_id: Secret::new(format!("client-of-{server}")),
        client_secret: Some(Secret::new("client-secret")),
        created_at: Utc::now(),
    }
}

/// Stores and reads back a registered client and a pending connect flow through `store`.
async fn oauth_tables_work(store: &Store, user: &UserId, server: &ServerName) {
    let stored = store
        .insert_oauth_client(&client_row(server))
        .await
        .expect("store a registered client");
    assert_eq!(stored.client_id.expose(), format!("client-of-{server}"));
    let read = store.oauth_client(server).await.unwrap().expect("stored");
    assert_eq!(read.client_secret.unwrap().expose(), "client-secret");
    let state_hash = "cd".repeat(32);
    store
        .insert_oauth_state(&NewOAuthState {
            state_hash: state_hash.clone(),
            user: user.clone(),
            server: server.clone(),
            code_verifier: Secret::new("verifier"),
            expires_at: Utc::now() + chrono::Duration::minutes(10),
        })
        .await
        .expect("store a pending flow");
    let flow = store
        .take_oauth_state(&state_hash)
        .await
        .unwrap()
        .expect("the flow");
    assert_eq!(flow.code_verifier.expose(), "verifier");
    assert_eq!(store.cleanup_oauth_states().await.unwrap(), 0);
}

/// A new login role that owns nothing and bypasses nothing, with USAGE on the test's schema;
/// returns it and the test's database URL with it as the user.
async fn app_role(admin: &mut sqlx::PgConnection, url: &str, schema: &str) -> (String, String) {
    let role = format!("app_{}", uuid::Uuid::new_v4().simple());
    run_all(
        admin,
        &[
            format!("CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS"),
            format!("GRANT USAGE ON SCHEMA {schema} TO {role}"),
        ],
    )
    .await;
    let base = PgConnectOptions::from_str(url).unwrap();
    let app_url = url.replacen(&format!("{}@", base.get_username()), &format!("{role}@"), 1);
    assert_ne!(app_url, url, "the URL names the role");
    (role, app_url)
}

async fn run_all(admin: &mut sqlx::PgConnection, statements: &[String]) {
    for sql in statements {
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut *admin)
            .await
            .unwrap();
    }
}

async fn drop_role(admin: &mut sqlx::PgConnection, role: &str) {
    for sql in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *admin)
            .await;
    }
}
