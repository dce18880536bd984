-- One row per (user, server) credentials. Tokens are XChaCha20-Poly1305 ciphertexts (base64)
-- bound to (user_id, server_name, column, key_version); see src/store/crypto.rs.
CREATE TABLE mcp_connections (
    id               UUID         PRIMARY KEY,
    user_id          TEXT         NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 128),
    server_name      VARCHAR(100) NOT NULL CHECK (char_length(server_name) >= 1),
    credentials_path TEXT         NOT NULL,
    access_token     TEXT,
    refresh_token    TEXT,
    token_expiry     TIMESTAMPTZ,
    is_active        BOOLEAN      NOT NULL DEFAULT TRUE,
    key_version      INTEGER      NOT NULL,
    version          BIGINT       NOT NULL DEFAULT 1,
    created_at       TIMESTAMPTZ  NOT NULL,
    updated_at       TIMESTAMPTZ  NOT NULL
);

CREATE UNIQUE INDEX mcp_connections_one_active
    ON mcp_connections (user_id, server_name) WHERE is_active;

CREATE INDEX mcp_connections_inactive_since
    ON mcp_connections (updated_at) WHERE NOT is_active;
