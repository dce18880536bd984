//! `oauth_states` on both backends: a state is consumed at most once, expired ones are swept,
//! and on PostgreSQL row-level security (migrations/postgres/0003_oauth_states.sql) lets the
//! unauthenticated callback see only the row whose hash it presents, seen from a role that
//! does not own the table, as the service should run.

mod common;

use std::str::FromStr;

use chrono::Utc;
use mcp_pool::oauth::pkce;
use mcp_pool::store::{
    BackendKind, NewOAuthState, Secret, ServerName, Store, StoreOptions, UserId,
};
use sqlx::Connection;
use sqlx::postgres::PgConnectOptions;

fn flow(user: &str, expires_in: i64) -> (Secret, NewOAuthState) {
    let state = pkce::random_token().unwrap();
    let new = NewOAuthState {
        state_hash: pkce::state_hash(state.expose()),
        user: UserId::parse(user).unwrap(),
        server: ServerName::parse("gdemo").unwrap(),
        code_verifier: Secret::new(format!("verifier-of-{user}")),
        expires_at: Utc::now() + chrono::Duration::seconds(expires_in),
    };
    (state, new)
}

async fn exercise(store: &Store) {
    let (state, alice) = flow("alice", 600);
    store.insert_oauth_state(&alice).await.unwrap();
    let (_, bob_expired) = flow("bob", -5);
    store.insert_oauth_state(&bob_expired).await.unwrap();

    let hash = pkce::state_hash(state.expose());
    let taken = store.take_oauth_state(&hash).await.unwrap().expect("found");
    assert_eq!(taken.user.as_str(), "alice");
    assert_eq!(taken.server.as_str(), "gdemo");
    assert_eq!(taken.code_verifier.expose(), "verifier-of-alice");
    assert!(format!("{taken:?}").contains("[REDACTED]"));
    assert!(
        store.take_oauth_state(&hash).await.unwrap().is_none(),
        "single use"
    );
    assert!(
        store
            .take_oauth_state(&pkce::state_hash("unknown"))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.cleanup_oauth_states().await.unwrap(),
        1,
        "bob's expired flow"
    );
}

async fn exercise_kind(kind: BackendKind) {
    let (store, _dir, _) = common::fresh_store(kind).await;
    exercise(&store).await;
}

#[tokio::test]
async fn states_are_single_use_and_swept_on_sqlite() {
    exercise_kind(BackendKind::Sqlite).await;
}

#[tokio::test]
async fn states_are_single_use_and_swept_on_postgres() {
    exercise_kind(BackendKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_the_callback_scope_sees_only_the_presented_state() {
    let dir = tempfile::tempdir().unwrap();
    let owner_options = common::store_options(BackendKind::Postgres, dir.path()).await;
    let owner = Store::connect(&owner_options).await.unwrap();
    owner.migrate().await.unwrap();
    let schema = owner_options
        .url
        .rsplit("search_path%3D")
        .next()
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_owned();
    let role = format!("app_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&common::postgres_admin_url())
        .await
        .unwrap();
    for sql in [
        format!("CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS"),
        format!("GRANT USAGE ON SCHEMA {schema} TO {role}"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.mcp_connections TO {role}"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.oauth_states TO {role}"),
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
    let store = Store::connect(&StoreOptions {
        url: app_url.clone(),
        max_connections: 1,
        ..owner_options.clone()
    })
    .await
    .unwrap();
    // Everything works through the scoped transactions.
    exercise(&store).await;
    let (_, pending) = flow("carol", 600);
    store.insert_oauth_state(&pending).await.unwrap();
    store.close().await;

    // Raw, as the service role: no scope → nothing; another state's hash → nothing; the
    // presented hash → that row only (and DELETE is limited the same way).
    let mut conn = sqlx::PgConnection::connect(&app_url).await.unwrap();
    let count = |setting: Option<(&'static str, String)>| {
        let sql = "SELECT count(*) FROM oauth_states";
        let url = app_url.clone();
        async move {
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            let mut tx = conn.begin().await.unwrap();
            if let Some((name, value)) = setting {
                sqlx::query("SELECT set_config($1, $2, true)")
                    .bind(name)
                    .bind(value)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&mut *tx)
                .await
                .unwrap()
        }
    };
    assert_eq!(count(None).await, 0);
    assert_eq!(
        count(Some(("app.oauth_state", pkce::state_hash("other")))).await,
        0
    );
    assert_eq!(
        count(Some(("app.oauth_state", pending.state_hash.clone()))).await,
        1
    );
    assert_eq!(count(Some(("app.user_id", "carol".into()))).await, 1);
    assert_eq!(count(Some(("app.user_id", "dave".into()))).await, 0);
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("SELECT set_config('app.oauth_state', $1, true)")
        .bind(pkce::state_hash("other"))
        .execute(&mut *tx)
        .await
        .unwrap();
    let deleted = sqlx::query("DELETE FROM oauth_states")
        .execute(&mut *tx)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(deleted, 0, "a callback scope cannot burn other flows");
    tx.rollback().await.unwrap();
}
