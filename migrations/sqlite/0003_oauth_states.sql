-- Server-side state of the OAuth connect flow; see migrations/postgres/0003_oauth_states.sql.
-- state_hash: hex SHA-256 of the random state; code_verifier: encrypted PKCE verifier.
CREATE TABLE oauth_states (
    state_hash    TEXT    PRIMARY KEY NOT NULL CHECK (length(state_hash) = 64),
    user_id       TEXT    NOT NULL CHECK (length(user_id) BETWEEN 1 AND 128),
    server_name   TEXT    NOT NULL CHECK (length(server_name) BETWEEN 1 AND 100),
    code_verifier TEXT    NOT NULL,
    key_version   INTEGER NOT NULL,
    created_at    TEXT    NOT NULL,
    expires_at    TEXT    NOT NULL
);

CREATE INDEX oauth_states_user ON oauth_states (user_id);
CREATE INDEX oauth_states_expires ON oauth_states (expires_at);

-- The cross-instance refresh lease: an instance that is about to send a refresh request for a
-- row first claims it (version + 1, lease until now + its worst-case request time) unless
-- another claim's lease is still running; others wait for that instance's write instead of
-- sending the same refresh token again (src/oauth/refresh.rs).
ALTER TABLE mcp_connections ADD COLUMN refresh_lease_until TEXT;
