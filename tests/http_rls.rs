//! PostgreSQL row-level security on `mcp_connections` (migrations/postgres/0002_rls.sql), seen
//! from a role that does not own the table, as the service should run.

mod common;

use std::str::FromStr;

use mcp_pool::store::{BackendKind, Secret, ServerName, Store, StoreOptions, Tokens, UserId};
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

    // The service role: may use the table, does not own it, is no superuser.
    let role = format!("app_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&common::postgres_admin_url())
        .await
        .unwrap();
    for sql in [
        format!("CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS"),
        format!("GRANT USAGE ON SCHEMA {schema} TO {role}"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.mcp_connections TO {role}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let base = PgConnectOptions::from_str(&owner_options.url).unwrap();
    let app_url =
        owner_options
            .url
            .replacen(&format!("{}@", base.get_username()), &format!("{role}@"), 1);
    assert_ne!(app_url, owner_options.url, "the URL names the role");

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
    for sql in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await;
    }
}
