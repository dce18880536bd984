-- Set when the provider rejected the refresh token (invalid_grant): the row is deactivated and
-- the user must connect again. Persisted so a restarted service, and every instance of a
-- cluster, answers `reconnect_required` rather than `no_credentials`. A new connect clears it.
ALTER TABLE mcp_connections ADD COLUMN reconnect_required BOOLEAN NOT NULL DEFAULT FALSE;
