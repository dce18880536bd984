-- The service is meant to run as an ordinary role that does not own the tables (0002_rls.sql:
-- row-level security binds the owner only through FORCE, and superusers or BYPASSRLS roles not
-- at all). Such a role needs, besides mcp_connections, the two tables added since:
--   oauth_states   the connect flow's pending states (0003; row-level security like
--                  mcp_connections): start inserts, the callback deletes, cleanup deletes;
--   oauth_clients  clients registered for remote servers (20261202133000; no row-level
--                  security, the rows belong to no user): discovery inserts and reads, key
--                  rotation updates;
-- and SELECT on _sqlx_migrations, so that `mcp-pool serve` can see that every migration is
-- applied without trying to create that table (src/store/repo.rs, `Store::migrate`). Set up once,
-- as the owner, after `mcp-pool migrate`:
--   CREATE ROLE mcp_pool_app LOGIN;
--   GRANT USAGE ON SCHEMA <schema> TO mcp_pool_app;
--   GRANT SELECT, INSERT, UPDATE, DELETE ON mcp_connections, oauth_states, oauth_clients
--       TO mcp_pool_app;
--   GRANT SELECT ON _sqlx_migrations TO mcp_pool_app;
--
-- A database set up by the earlier advice (0002: a grant on mcp_connections only) is carried
-- forward here: every role other than the owner that holds a privilege on mcp_connections gets
-- the same privilege on oauth_states and oauth_clients, and SELECT on _sqlx_migrations.
DO $$
DECLARE
    held record;
BEGIN
    FOR held IN
        SELECT DISTINCT r.rolname, a.privilege_type
        FROM pg_class c
        CROSS JOIN LATERAL aclexplode(c.relacl) AS a
        JOIN pg_roles r ON r.oid = a.grantee
        WHERE c.oid = 'mcp_connections'::regclass
          AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT %s ON oauth_states, oauth_clients TO %I',
                       held.privilege_type, held.rolname);
        EXECUTE format('GRANT SELECT ON _sqlx_migrations TO %I', held.rolname);
    END LOOP;
END
$$;
