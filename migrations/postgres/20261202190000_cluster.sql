-- Cluster mode (src/cluster/, actors.md "Cluster mode"): membership and per-key session leases.
-- Every expiry is computed by PostgreSQL itself (now()), so the nodes' clocks never matter.
-- No row-level security: these rows hold no credentials and are read across users by design
-- (placement looks at every node and every lease). Grant the application role
--   GRANT SELECT, INSERT, UPDATE, DELETE ON cluster_nodes, session_leases TO mcp_pool_app;
--
-- cluster_nodes: one row per running node; node_id is fresh at every start, so a restarted
-- node never inherits the leases of its previous life. `leaving` is set when a node starts
-- draining (SIGTERM): new keys are no longer placed there, its leases still count.
CREATE TABLE cluster_nodes (
    node_id      TEXT        PRIMARY KEY CHECK (char_length(node_id) BETWEEN 1 AND 64),
    url          TEXT        NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    leaving      BOOLEAN     NOT NULL DEFAULT false
);

-- session_leases: who may run the session of a (user, server). Taken in one statement
-- (INSERT .. ON CONFLICT DO UPDATE .. WHERE expired or same owner), renewed with
-- the heartbeat, released on close by expiring it. Rows are kept after release so `epoch`, the
-- fencing token, only ever grows for a key.
CREATE TABLE session_leases (
    user_id     VARCHAR(128) NOT NULL,
    server      VARCHAR(100) NOT NULL,
    owner_node  TEXT         NOT NULL,
    epoch       BIGINT       NOT NULL,
    expires_at  TIMESTAMPTZ  NOT NULL,
    PRIMARY KEY (user_id, server)
);
-- The heartbeat renews by owner.
CREATE INDEX session_leases_owner ON session_leases (owner_node);
