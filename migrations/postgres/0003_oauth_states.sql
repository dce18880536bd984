-- Server-side state of the OAuth connect flow (POST /v1/oauth/{server}/start, consumed once by
-- GET /v1/oauth/{server}/callback). In the database, not in memory, so a callback that reaches
-- another instance, or this one after a restart, still finds its flow.
--   state_hash     hex SHA-256 of the random `state` (the state itself is a bearer secret and
--                  is never stored: a reader of this table cannot forge a callback);
--   code_verifier  the PKCE verifier, XChaCha20-Poly1305 ciphertext bound to (user, server,
--                  "pkce_verifier", key_version) like the tokens: it must be sent to the token
--                  endpoint, so it is encrypted rather than hashed;
--   expires_at     created_at + 10 minutes; an expired row is refused and deleted.
CREATE TABLE oauth_states (
    state_hash    TEXT         PRIMARY KEY CHECK (char_length(state_hash) = 64),
    user_id       TEXT         NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 128),
    server_name   VARCHAR(100) NOT NULL CHECK (char_length(server_name) >= 1),
    code_verifier TEXT         NOT NULL,
    key_version   INTEGER      NOT NULL,
    created_at    TIMESTAMPTZ  NOT NULL,
    expires_at    TIMESTAMPTZ  NOT NULL
);

CREATE INDEX oauth_states_user ON oauth_states (user_id);
CREATE INDEX oauth_states_expires ON oauth_states (expires_at);

-- Row-level security, as on mcp_connections (0002_rls.sql), plus one more way in. The callback
-- is unauthenticated: the user is known only after the row is found, so it cannot set
-- app.user_id. It sets app.oauth_state to the hash of the presented state instead, which makes
-- exactly that row visible (SELECT) and deletable (DELETE ... RETURNING consumes it), nothing
-- else: a callback query that lost its WHERE clause still cannot read or burn other flows.
--   app.user_id     start: insert the user's row, delete the user's expired rows;
--   app.oauth_state callback: read and delete the one presented row;
--   app.all_users   periodic cleanup of expired rows.
ALTER TABLE oauth_states ENABLE ROW LEVEL SECURITY;
ALTER TABLE oauth_states FORCE ROW LEVEL SECURITY;

CREATE POLICY oauth_states_per_user ON oauth_states
    USING (user_id = current_setting('app.user_id', true))
    WITH CHECK (user_id = current_setting('app.user_id', true));

CREATE POLICY oauth_states_by_state_select ON oauth_states FOR SELECT
    USING (state_hash = current_setting('app.oauth_state', true));

CREATE POLICY oauth_states_by_state_delete ON oauth_states FOR DELETE
    USING (state_hash = current_setting('app.oauth_state', true));

CREATE POLICY oauth_states_all_users ON oauth_states
    USING (current_setting('app.all_users', true) = 'on')
    WITH CHECK (current_setting('app.all_users', true) = 'on');

-- The cross-instance refresh lease: an instance that is about to send a refresh request for a
-- row first claims it (version + 1, lease until now + its worst-case request time) unless
-- another claim's lease is still running; others wait for that instance's write instead of
-- sending the same refresh token again (src/oauth/refresh.rs).
ALTER TABLE mcp_connections ADD COLUMN refresh_lease_until TIMESTAMPTZ;
