//! `cluster_nodes` and `session_leases` (PostgreSQL only): membership and per-key leases of
//! cluster mode. Every expiry is computed with the database's `now()`, so the nodes' clocks
//! never matter; durations are bound as seconds (`float8 * interval '1 second'`).
//!
//! No session-level advisory locks: they live on one pooled connection and vanish silently
//! with it. A lease is a row, taken and renewed by single statements.

use std::time::Duration;

use sqlx::postgres::PgPool;

use super::{Backend, Store};
use crate::ids::SessionKey;
use crate::store::StoreError;

/// A live node as membership sees it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct NodeRow {
    pub node_id: String,
    pub url: String,
}

/// A lease: who owns a key, with which fencing epoch, and where that owner is reached (`None`
/// when the owner's membership row is gone).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LeaseRow {
    pub owner_node: String,
    pub epoch: i64,
    pub url: Option<String>,
}

fn secs(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

impl Store {
    fn pg(&self) -> Result<&PgPool, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => Ok(pool),
            Backend::Sqlite(_) => Err(StoreError::ClusterNeedsPostgres),
        }
    }

    /// Writes this node's membership row (a fresh node id at every start).
    pub async fn cluster_join(&self, node_id: &str, url: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO cluster_nodes (node_id, url) VALUES ($1, $2) \
             ON CONFLICT (node_id) DO UPDATE SET url = excluded.url, heartbeat_at = now()",
        )
        .bind(node_id)
        .bind(url)
        .execute(self.pg()?)
        .await?;
        Ok(())
    }

    /// One heartbeat, in one statement: refreshes this node's row (recreating it if someone
    /// removed it) and extends every unexpired lease it owns by `ttl`. Returns the leases
    /// renewed; a lease the node thinks it holds and that is not among them was lost.
    pub async fn cluster_beat(
        &self,
        node_id: &str,
        url: &str,
        ttl: Duration,
    ) -> Result<Vec<(SessionKeyRow, i64)>, StoreError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "WITH beat AS ( \
                INSERT INTO cluster_nodes (node_id, url) VALUES ($1, $2) \
                ON CONFLICT (node_id) DO UPDATE SET heartbeat_at = now() RETURNING 1) \
             UPDATE session_leases SET expires_at = now() + $3::float8 * interval '1 second' \
             WHERE owner_node = $1 AND expires_at > now() \
             RETURNING user_id, server, epoch",
        )
        .bind(node_id)
        .bind(url)
        .bind(secs(ttl))
        .fetch_all(self.pg()?)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(user, server, epoch)| (SessionKeyRow { user, server }, epoch))
            .collect())
    }

    /// Nodes that may take new keys: heartbeat within `ttl`, not leaving.
    pub async fn cluster_live_nodes(&self, ttl: Duration) -> Result<Vec<NodeRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT node_id, url FROM cluster_nodes \
             WHERE heartbeat_at > now() - $1::float8 * interval '1 second' AND NOT leaving \
             ORDER BY node_id",
        )
        .bind(secs(ttl))
        .fetch_all(self.pg()?)
        .await?)
    }

    /// Takes `key`'s lease for `node_id`, or learns who holds it, in one statement: a new row
    /// starts at epoch 1; an existing one is taken (epoch + 1) when it expired (its owner is
    /// dead, cut off, or released it) or when its owner is this node (a new session of ours:
    /// a new epoch). Otherwise the current owner is returned.
    ///
    /// A dead owner is recognised by its lease's expiry alone, never by this node's view of
    /// its heartbeat: the expiry was set by the owner with its own `ttl`, which its local
    /// deadline is computed from, so taking over never depends on two nodes agreeing on
    /// durations (a renewal and its heartbeat are one statement, so both age together).
    ///
    /// `None` only when a concurrent first insert committed after this statement's snapshot:
    /// the caller runs it again, and then sees that row.
    pub async fn cluster_acquire(
        &self,
        key: &SessionKey,
        node_id: &str,
        ttl: Duration,
    ) -> Result<Option<LeaseRow>, StoreError> {
        Ok(sqlx::query_as(
            "WITH taken AS ( \
                INSERT INTO session_leases AS l (user_id, server, owner_node, epoch, expires_at) \
                VALUES ($1, $2, $3, 1, now() + $4::float8 * interval '1 second') \
                ON CONFLICT (user_id, server) DO UPDATE \
                SET owner_node = excluded.owner_node, epoch = l.epoch + 1, \
                    expires_at = excluded.expires_at \
                WHERE l.expires_at <= now() OR l.owner_node = excluded.owner_node \
                RETURNING owner_node, epoch), \
             current AS ( \
                SELECT owner_node, epoch FROM taken \
                UNION ALL \
                SELECT owner_node, epoch FROM session_leases \
                WHERE user_id = $1 AND server = $2 AND NOT EXISTS (SELECT 1 FROM taken)) \
             SELECT c.owner_node, c.epoch, n.url FROM current c \
             LEFT JOIN cluster_nodes n ON n.node_id = c.owner_node",
        )
        .bind(key.user.as_str())
        .bind(key.server.as_str())
        .bind(node_id)
        .bind(secs(ttl))
        .fetch_optional(self.pg()?)
        .await?)
    }

    /// The live lease of `key`: unexpired, and its owner's heartbeat within `ttl`.
    pub async fn cluster_lease(
        &self,
        key: &SessionKey,
        ttl: Duration,
    ) -> Result<Option<LeaseRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT l.owner_node, l.epoch, n.url FROM session_leases l \
             JOIN cluster_nodes n ON n.node_id = l.owner_node \
             WHERE l.user_id = $1 AND l.server = $2 AND l.expires_at > now() \
               AND n.heartbeat_at > now() - $3::float8 * interval '1 second'",
        )
        .bind(key.user.as_str())
        .bind(key.server.as_str())
        .bind(secs(ttl))
        .fetch_optional(self.pg()?)
        .await?)
    }

    /// Releases `key`'s lease by expiring it, only if it is still this node's at `epoch` (a
    /// newer session's lease is left alone). The row stays, so the next epoch is higher.
    pub async fn cluster_release(
        &self,
        key: &SessionKey,
        node_id: &str,
        epoch: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE session_leases SET expires_at = now() \
             WHERE user_id = $1 AND server = $2 AND owner_node = $3 AND epoch = $4 \
               AND expires_at > now()",
        )
        .bind(key.user.as_str())
        .bind(key.server.as_str())
        .bind(node_id)
        .bind(epoch)
        .execute(self.pg()?)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Marks this node as draining: no new keys are placed here; its leases still count.
    pub async fn cluster_set_leaving(&self, node_id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE cluster_nodes SET leaving = true WHERE node_id = $1")
            .bind(node_id)
            .execute(self.pg()?)
            .await?;
        Ok(())
    }

    /// The end of a clean shutdown: every lease of this node released, its row removed.
    pub async fn cluster_leave(&self, node_id: &str) -> Result<u64, StoreError> {
        let pool = self.pg()?;
        let released = sqlx::query(
            "UPDATE session_leases SET expires_at = now() \
             WHERE owner_node = $1 AND expires_at > now()",
        )
        .bind(node_id)
        .execute(pool)
        .await?
        .rows_affected();
        sqlx::query("DELETE FROM cluster_nodes WHERE node_id = $1")
            .bind(node_id)
            .execute(pool)
            .await?;
        Ok(released)
    }

    /// Forgets nodes silent for longer than `older_than` (crashed nodes never delete their row).
    pub async fn cluster_prune(&self, older_than: Duration) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM cluster_nodes \
             WHERE heartbeat_at < now() - $1::float8 * interval '1 second'",
        )
        .bind(secs(older_than))
        .execute(self.pg()?)
        .await?
        .rows_affected())
    }
}

/// A lease's key as the database returned it (validated by the caller).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKeyRow {
    pub user: String,
    pub server: String,
}
