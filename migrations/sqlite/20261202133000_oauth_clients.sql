-- OAuth clients registered by mcp-pool itself (RFC 7591 dynamic client registration) for remote
-- MCP servers whose operator configured no client: one row per server, shared by its users;
-- see migrations/postgres/20261202133000_oauth_clients.sql.
CREATE TABLE oauth_clients (
    server_name   TEXT    PRIMARY KEY NOT NULL CHECK (length(server_name) BETWEEN 1 AND 100),
    endpoints     TEXT    NOT NULL,
    client_id     TEXT    NOT NULL,
    client_secret TEXT,
    key_version   INTEGER NOT NULL,
    created_at    TEXT    NOT NULL
);
