//! Authentication of callers. The acting user comes only from here, never from a body.
//!
//! - `api_key` mode: `Authorization: Bearer <service key>` plus `X-User-Id: <user>`. The service
//!   is trusted to name the user (service to service).
//! - `jwt` mode: `Authorization: Bearer <user's JWT>`; the user is the verified `sub`.
//! - Admin routes: `Authorization: Bearer <admin key>` in either mode.
//!
//! Keys come from an environment variable or a key file created 0600 on first run, and are
//! compared in constant time (`subtle`). Key length is not secret (43 characters when generated).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use subtle::ConstantTimeEq;

use super::HttpState;
use super::error::ApiError;
use crate::config::{ADMIN_KEY_ENV, API_KEY_ENV, AuthConfig, AuthMode, JwtAlgorithm, JwtConfig};
use crate::store::{Secret, UserId};

/// Header naming the acting user in `api_key` mode.
pub const USER_ID_HEADER: &str = "x-user-id";

/// Why authentication could not be set up at start-up. Never carries a key.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("key file {path}: {cause}")]
    KeyFile {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("key file {0} is empty")]
    EmptyKeyFile(PathBuf),
    #[error("auth.mode = \"jwt\" needs an [auth.jwt] section")]
    MissingJwtConfig,
    #[error("environment variable {0} (the JWT secret) is not set or empty")]
    MissingSecret(String),
    #[error("JWKS file {path}: {cause}")]
    Jwks { path: PathBuf, cause: String },
    #[error("JWKS file {0} holds no key usable with the configured algorithm")]
    NoUsableKey(PathBuf),
}

/// Verifies callers. Built once at start-up; cheap to share.
pub struct Auth {
    admin_key: Secret,
    users: UserAuth,
}

enum UserAuth {
    ApiKey { service_key: Secret },
    Jwt(Box<JwtVerifier>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.users {
            UserAuth::ApiKey { .. } => "api_key",
            UserAuth::Jwt(_) => "jwt",
        };
        f.debug_struct("Auth").field("mode", &mode).finish()
    }
}

impl Auth {
    /// From `[auth]` and the environment (`env` is `std::env::var` in production).
    pub fn from_config(
        config: &AuthConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Auth, AuthSetupError> {
        let admin_key = load_or_create_key(env(ADMIN_KEY_ENV), &config.admin_key_file)?;
        let users = match config.mode {
            AuthMode::ApiKey => UserAuth::ApiKey {
                service_key: load_or_create_key(env(API_KEY_ENV), &config.api_key_file)?,
            },
            AuthMode::Jwt => {
                let jwt = config
                    .jwt
                    .as_ref()
                    .ok_or(AuthSetupError::MissingJwtConfig)?;
                UserAuth::Jwt(Box::new(JwtVerifier::new(jwt, &env)?))
            }
        };
        Ok(Auth { admin_key, users })
    }

    /// Keys given directly (tests, embedding).
    pub fn with_api_keys(service_key: Secret, admin_key: Secret) -> Auth {
        Auth {
            admin_key,
            users: UserAuth::ApiKey { service_key },
        }
    }

    fn is_admin_key(&self, presented: &str) -> bool {
        keys_equal(presented, &self.admin_key)
    }

    /// The user a request acts for, or why not.
    pub(crate) fn user_of(&self, parts: &Parts) -> Result<UserId, ApiError> {
        let token = bearer(parts)?;
        match &self.users {
            UserAuth::ApiKey { service_key } => {
                if !keys_equal(token, service_key) {
                    return Err(if self.is_admin_key(token) {
                        ApiError::forbidden("the admin key cannot act as a user")
                    } else {
                        ApiError::unauthorized("invalid API key")
                    });
                }
                let header =
                    single_header(parts, USER_ID_HEADER, "X-User-Id")?.ok_or_else(|| {
                        ApiError::bad_request("missing_user_id", "the X-User-Id header is required")
                    })?;
                let value = header.to_str().map_err(|_| {
                    ApiError::bad_request("invalid_user_id", "X-User-Id must be ASCII")
                })?;
                UserId::parse(value).map_err(ApiError::invalid_id)
            }
            UserAuth::Jwt(verifier) => {
                if self.is_admin_key(token) {
                    return Err(ApiError::forbidden("the admin key cannot act as a user"));
                }
                verifier.verify(token)
            }
        }
    }

    /// Whether the request carries the admin key; a valid user credential gets 403.
    fn check_admin(&self, parts: &Parts) -> Result<(), ApiError> {
        let token = bearer(parts)?;
        if self.is_admin_key(token) {
            return Ok(());
        }
        let is_user = match &self.users {
            UserAuth::ApiKey { service_key } => keys_equal(token, service_key),
            UserAuth::Jwt(verifier) => verifier.verify(token).is_ok(),
        };
        Err(if is_user {
            ApiError::forbidden("this route needs the admin key")
        } else {
            ApiError::unauthorized("invalid admin key")
        })
    }
}

fn keys_equal(presented: &str, expected: &Secret) -> bool {
    bool::from(presented.as_bytes().ct_eq(expected.expose().as_bytes()))
}

/// The only value of an identity header. Two or more are refused: a proxy that appends the
/// real value after a client-supplied one would otherwise let the client choose (the first
/// value would win).
fn single_header<'a>(
    parts: &'a Parts,
    name: &str,
    display: &str,
) -> Result<Option<&'a axum::http::HeaderValue>, ApiError> {
    let mut values = parts.headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "duplicate_header",
            format!("the {display} header must appear at most once"),
        ));
    }
    Ok(first)
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = single_header(
        parts,
        axum::http::header::AUTHORIZATION.as_str(),
        "Authorization",
    )?
    .ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer` header"))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("malformed Authorization header"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| ApiError::unauthorized("expected `Authorization: Bearer <token>`"))?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(ApiError::unauthorized(
            "expected `Authorization: Bearer <token>`",
        ));
    }
    Ok(token)
}

// === key files ===

/// The key from `env_value` if set, else from `path`, creating the file (0600, 32 random bytes
/// as base64url) on first run.
pub fn load_or_create_key(
    env_value: Option<String>,
    path: &Path,
) -> Result<Secret, AuthSetupError> {
    if let Some(value) = env_value
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
    {
        return Ok(Secret::new(value));
    }
    let err = |cause| AuthSetupError::KeyFile {
        path: path.to_owned(),
        cause,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = text.trim();
            if key.is_empty() {
                return Err(AuthSetupError::EmptyKeyFile(path.to_owned()));
            }
            Ok(Secret::new(key))
        }
        Err(cause) if cause.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                crate::store::files::create_private_dir(dir).map_err(err)?;
            }
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| err(std::io::Error::other(e.to_string())))?;
            let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            // create_new: two instances starting at once must not overwrite each other's key.
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|cause| {
                    if cause.kind() == std::io::ErrorKind::AlreadyExists {
                        std::io::Error::other("created concurrently; restart to read it")
                    } else {
                        cause
                    }
                })
                .map_err(err)?;
            file.write_all(format!("{key}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(err)?;
            tracing::info!(path = %path.display(), "Created a new key file (mode 0600)");
            Ok(Secret::new(key))
        }
        Err(cause) => Err(err(cause)),
    }
}

// === JWT ===

/// Claims we read; the signature, `exp`, `nbf`, `iss` and `aud` are checked by `jsonwebtoken`.
#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

struct JwtVerifier {
    /// `(kid, key)`; a token whose header names a `kid` is only tried against that key.
    keys: Vec<(Option<String>, DecodingKey)>,
    validation: Validation,
}

impl JwtVerifier {
    fn new(
        config: &JwtConfig,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<JwtVerifier, AuthSetupError> {
        let (algorithm, keys) = match config.algorithm {
            JwtAlgorithm::HS256 => {
                let name = config.secret_env.clone().unwrap_or_default();
                let secret = env(&name)
                    .filter(|s| !s.is_empty())
                    .ok_or(AuthSetupError::MissingSecret(name))?;
                (
                    Algorithm::HS256,
                    vec![(None, DecodingKey::from_secret(secret.as_bytes()))],
                )
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                let path = config.jwks_file.clone().unwrap_or_default();
                let algorithm = if config.algorithm == JwtAlgorithm::RS256 {
                    Algorithm::RS256
                } else {
                    Algorithm::ES256
                };
                (algorithm, load_jwks(&path, algorithm)?)
            }
        };
        let mut validation = Validation::new(algorithm);
        let mut required = vec!["exp", "sub"];
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = config.leeway.as_secs();
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // Not configured: accept any `aud` (Supabase always sends one).
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(JwtVerifier { keys, validation })
    }

    fn verify(&self, token: &str) -> Result<UserId, ApiError> {
        let invalid = || ApiError::unauthorized("invalid or expired token");
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid())?;
        let mut last = None;
        for (kid, key) in &self.keys {
            if let (Some(want), Some(have)) = (&header.kid, kid)
                && want != have
            {
                continue;
            }
            match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
                Ok(data) => {
                    return UserId::parse(&data.claims.sub).map_err(|_| {
                        ApiError::unauthorized("the token's subject is not a valid user id")
                    });
                }
                Err(err) => last = Some(err),
            }
        }
        if let Some(err) = last {
            tracing::debug!(cause = %err, "JWT rejected");
        }
        Err(invalid())
    }
}

fn load_jwks(
    path: &Path,
    algorithm: Algorithm,
) -> Result<Vec<(Option<String>, DecodingKey)>, AuthSetupError> {
    let err = |cause: String| AuthSetupError::Jwks {
        path: path.to_owned(),
        cause,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let family = algorithm.family();
    let keys: Vec<_> = set
        .keys
        .iter()
        .filter_map(|jwk| {
            let key = DecodingKey::from_jwk(jwk).ok()?;
            (key.family() == family).then(|| (jwk.common.key_id.clone(), key))
        })
        .collect();
    if keys.is_empty() {
        return Err(AuthSetupError::NoUsableKey(path.to_owned()));
    }
    Ok(keys)
}

// === extractors ===

/// The authenticated user of a request. Records `user_id` on the request span.
#[derive(Debug, Clone)]
pub struct AuthUser(pub UserId);

impl FromRequestParts<HttpState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ApiError> {
        let user = state.auth.user_of(parts)?;
        tracing::Span::current().record("user_id", user.as_str());
        Ok(AuthUser(user))
    }
}

/// Proof that a request carries the admin key.
#[derive(Debug, Clone, Copy)]
pub struct AdminAuth;

impl FromRequestParts<HttpState> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ApiError> {
        state.auth.check_admin(parts)?;
        Ok(AdminAuth)
    }
}

/// Shared so the state stays cheap to clone.
pub type SharedAuth = Arc<Auth>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_created_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/api.key");
        let first = load_or_create_key(None, &path).unwrap();
        assert_eq!(first.expose().len(), 43);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create_key(None, &path).unwrap(), first);
        let env = load_or_create_key(Some("from-env".into()), &path).unwrap();
        assert_eq!(env.expose(), "from-env");
    }
}
