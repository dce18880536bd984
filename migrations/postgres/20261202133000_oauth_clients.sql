-- OAuth clients registered by mcp-pool itself (RFC 7591 dynamic client registration) for remote
-- MCP servers whose operator configured no client (src/oauth/discovery.rs): one row per
-- server, written once (the first registration wins; a concurrent one is discarded) and shared
-- by all of that server's users.
--   endpoints      the discovered endpoints and resource (JSON; public metadata);
--   client_id      XChaCha20-Poly1305 ciphertext bound to ("registered-client", server,
--                  "client_id", key_version), like the tokens;
--   client_secret  the same for the secret, when the authorization server issued one.
-- No row-level security: the rows belong to no user (grant the application role SELECT and
-- INSERT on this table as on mcp_connections).
CREATE TABLE oauth_clients (
    server_name   VARCHAR(100) PRIMARY KEY CHECK (char_length(server_name) >= 1),
    endpoints     TEXT         NOT NULL,
    client_id     TEXT         NOT NULL,
    client_secret TEXT,
    key_version   INTEGER      NOT NULL,
    created_at    TIMESTAMPTZ  NOT NULL
);
