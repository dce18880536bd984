-- Row-level security on mcp_connections: defense in depth against a per-user query that lost its
-- WHERE clause. Every transaction of the service sets one of two transaction-local settings
-- (src/store/repo.rs, `Scope`):
--   app.user_id   = '<user>'  per-user work: only that user's rows are visible or writable;
--   app.all_users = 'on'      cleanup, key rotation, the operator's list: every row.
-- With neither set (a forgotten scope, a pooled connection after the previous transaction
-- ended) no row is visible. FORCE applies the policies to the table owner too; superusers and
-- BYPASSRLS roles still bypass them, so run the service as an ordinary role, e.g.
--   CREATE ROLE mcp_pool_app LOGIN;
--   GRANT SELECT, INSERT, UPDATE, DELETE ON mcp_connections TO mcp_pool_app;
-- A later migration that updates rows must set app.all_users itself.
ALTER TABLE mcp_connections ENABLE ROW LEVEL SECURITY;
ALTER TABLE mcp_connections FORCE ROW LEVEL SECURITY;

CREATE POLICY mcp_connections_per_user ON mcp_connections
    USING (user_id = current_setting('app.user_id', true))
    WITH CHECK (user_id = current_setting('app.user_id', true));

CREATE POLICY mcp_connections_all_users ON mcp_connections
    USING (current_setting('app.all_users', true) = 'on')
    WITH CHECK (current_setting('app.all_users', true) = 'on');
