-- One row per (user, server) credentials. Tokens are XChaCha20-Poly1305 ciphertexts (base64)
-- bound to (user_id, server_name, column, key_version); see src/store/crypto.rs.
CREATE TABLE mcp_connections (
    id               BLOB    PRIMARY KEY NOT NULL,
    user_id          TEXT    NOT NULL CHECK (length(user_id) BETWEEN 1 AND 128),
    server_name      TEXT    NOT NULL CHECK (length(server_name) BETWEEN 1 AND 100),
    credentials_path TEXT    NOT NULL,
    access_token     TEXT,
    refresh_token    TEXT,
    token_expiry     TEXT,
    is_active        BOOLEAN NOT NULL DEFAULT 1,
    key_version      INTEGER NOT NULL,
    version          INTEGER NOT NULL DEFAULT 1,
    created_at       TEXT    NOT NULL,
    updated_at       TEXT    NOT NULL
);

CREATE UNIQUE INDEX mcp_connections_one_active
    ON mcp_connections (user_id, server_name) WHERE is_active;

CREATE INDEX mcp_connections_inactive_since
    ON mcp_connections (updated_at) WHERE NOT is_active;
