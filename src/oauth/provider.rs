//! One server's OAuth client: builds authorization URLs and talks to the token endpoint.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::Url;
use reqwest::header::{ACCEPT, HeaderValue};

use super::OAuthError;
use crate::config::{OAuthClientConfig, TokenAuthMethod};
use crate::store::{Secret, ServerName};

/// Expiry assumed when a token response has no `expires_in` (RFC 6749 makes it optional;
/// Google always sends it). Short enough that a wrong guess heals itself.
const DEFAULT_EXPIRES_IN: i64 = 3600;

/// A successful token response. `Debug` redacts both tokens.
#[derive(Debug, Clone)]
pub struct TokenResponse {
    pub access_token: Secret,
    /// `None`: the provider did not rotate it (keep the stored one).
    pub refresh_token: Option<Secret>,
    pub expires_at: DateTime<Utc>,
}

#[derive(serde::Deserialize)]
struct RawTokenResponse {
    access_token: Option<Secret>,
    refresh_token: Option<Secret>,
    expires_in: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct RawErrorResponse {
    error: Option<String>,
}

/// A configured server's OAuth client, resolved once at start-up (the client secret read from
/// its environment variable).
pub struct Provider {
    server: ServerName,
    client_id: String,
    client_secret: Option<Secret>,
    authorization_url: Option<Url>,
    token_url: Url,
    scopes: Vec<String>,
    redirect_uri: Option<String>,
    extra_auth_params: BTreeMap<String, String>,
    success_redirect: Option<Url>,
    error_redirect: Option<Url>,
    refresh_before: Duration,
    auth_method: TokenAuthMethod,
    timeout: Duration,
    cooldown: Duration,
    /// RFC 8707 resource indicator (the remote MCP server's URL), sent on authorize, token and
    /// refresh requests so the tokens are issued for that server only.
    resource: Option<String>,
    /// The authorization server's issuer, when discovered: its callbacks' `iss` (RFC 9207)
    /// must be this. `true` when the server promised to always send it.
    issuer: Option<(String, bool)>,
    http: reqwest::Client,
}

/// Why an authorization response's `iss` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IssuerProblem {
    #[error("the response names another authorization server")]
    Mismatch,
    #[error("the authorization server promised `iss` in its responses and sent none")]
    Missing,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("server", &self.server)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("token_url", &self.token_url.as_str())
            .finish_non_exhaustive()
    }
}

fn parse_url(value: Option<&String>) -> Option<Url> {
    value.and_then(|v| Url::parse(v).ok())
}

/// The HTTP client of token requests: rustls with ring (as the LLM client), no redirects (a
/// token request must never be replayed elsewhere).
pub fn http_client() -> Result<reqwest::Client, OAuthError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("mcp-pool/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|err| OAuthError::Setup(err.without_url().to_string()))
}

/// RFC 6749 section 2.3.1: id and secret are form-urlencoded before HTTP Basic.
fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(byte as char)
            }
            b' ' => out.push('+'),
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

/// Keeps a provider's error code printable and short; it may end up in a log line.
fn sanitize_code(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(64)
        .collect()
}

impl Provider {
    /// `None` when the server has no token endpoint (nothing to refresh, no connect flow).
    pub fn from_config(
        server: ServerName,
        config: &OAuthClientConfig,
        env: &dyn Fn(&str) -> Option<String>,
        http: reqwest::Client,
    ) -> Option<Provider> {
        let token_url = parse_url(config.token_url.as_ref())?;
        Some(Provider {
            server,
            client_id: config.client_id.clone(),
            client_secret: config
                .client_secret_env
                .as_deref()
                .and_then(env)
                .filter(|s| !s.is_empty())
                .map(Secret::new),
            authorization_url: parse_url(config.authorization_url.as_ref()),
            token_url,
            scopes: config.scopes.clone(),
            redirect_uri: config.redirect_uri.clone(),
            extra_auth_params: config.extra_auth_params.clone(),
            success_redirect: parse_url(config.success_redirect.as_ref()),
            error_redirect: parse_url(config.error_redirect.as_ref()),
            refresh_before: config.refresh_before,
            auth_method: config.token_auth_method,
            timeout: config.token_timeout,
            cooldown: config.refresh_cooldown,
            resource: None,
            issuer: None,
            http,
        })
    }

    /// A remote server's OAuth client found by discovery (`oauth::discovery`): the endpoints
    /// and the client come from there, everything else (redirects, timings, configured scopes)
    /// from the server's `[oauth]` table.
    pub fn discovered(
        server: ServerName,
        config: &OAuthClientConfig,
        endpoints: &super::discovery::Endpoints,
        client_id: String,
        client_secret: Option<Secret>,
        http: reqwest::Client,
    ) -> Option<Provider> {
        Some(Provider {
            server,
            client_id,
            auth_method: if client_secret.is_some() {
                config.token_auth_method
            } else {
                TokenAuthMethod::ClientSecretPost
            },
            client_secret,
            authorization_url: Some(Url::parse(&endpoints.authorization_endpoint).ok()?),
            token_url: Url::parse(&endpoints.token_endpoint).ok()?,
            scopes: if config.scopes.is_empty() {
                endpoints.scopes.clone()
            } else {
                config.scopes.clone()
            },
            redirect_uri: config.redirect_uri.clone(),
            extra_auth_params: config.extra_auth_params.clone(),
            success_redirect: parse_url(config.success_redirect.as_ref()),
            error_redirect: parse_url(config.error_redirect.as_ref()),
            refresh_before: config.refresh_before,
            timeout: config.token_timeout,
            cooldown: config.refresh_cooldown,
            resource: Some(endpoints.resource.clone()),
            issuer: Some((endpoints.issuer.clone(), endpoints.iss_in_responses)),
            http,
        })
    }

    /// RFC 9207: the `iss` of an authorization response names the server this flow went to.
    /// A mix-up attack (a response from another authorization server replayed to our
    /// callback) fails here, before the code is sent anywhere. A configured (not discovered)
    /// provider has no issuer to compare with.
    pub fn check_issuer(&self, iss: Option<&str>) -> Result<(), IssuerProblem> {
        let Some((issuer, always_sent)) = &self.issuer else {
            return Ok(());
        };
        match iss {
            Some(iss) if iss == issuer => Ok(()),
            Some(_) => Err(IssuerProblem::Mismatch),
            None if *always_sent => Err(IssuerProblem::Missing),
            None => Ok(()),
        }
    }

    pub fn server(&self) -> &ServerName {
        &self.server
    }

    /// Access tokens expiring within this are refreshed.
    pub fn refresh_before(&self) -> Duration {
        self.refresh_before
    }

    /// The first wait after a refresh that failed transiently (`refresh_cooldown`).
    pub fn cooldown(&self) -> Duration {
        self.cooldown
    }

    /// Upper bound of one token request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether `POST /v1/oauth/{server}/start` is available.
    pub fn connect_flow_enabled(&self) -> bool {
        self.authorization_url.is_some()
            && self.redirect_uri.is_some()
            && self.success_redirect.is_some()
            && self.error_redirect.is_some()
    }

    /// Where the user authorizes: response_type=code, PKCE S256, the state, the scopes and the
    /// provider's extra parameters.
    pub fn authorization_url(&self, state: &Secret, challenge: &str) -> Result<Url, OAuthError> {
        let (Some(mut url), Some(redirect_uri)) =
            (self.authorization_url.clone(), self.redirect_uri.as_deref())
        else {
            return Err(OAuthError::NotConfigured("connect flow"));
        };
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("response_type", "code")
                .append_pair("client_id", &self.client_id)
                .append_pair("redirect_uri", redirect_uri);
            if !self.scopes.is_empty() {
                query.append_pair("scope", &self.scopes.join(" "));
            }
            query
                .append_pair("state", state.expose())
                .append_pair("code_challenge", challenge)
                .append_pair("code_challenge_method", "S256");
            for (name, value) in &self.extra_auth_params {
                query.append_pair(name, value);
            }
            if let Some(resource) = &self.resource {
                query.append_pair("resource", resource);
            }
        }
        Ok(url)
    }

    /// `success_redirect?connected=<server>`.
    pub fn success_url(&self) -> Option<Url> {
        let mut url = self.success_redirect.clone()?;
        url.query_pairs_mut()
            .append_pair("connected", self.server.as_str());
        Some(url)
    }

    /// `error_redirect?error=<code>&server=<server>`.
    pub fn error_url(&self, code: &str) -> Option<Url> {
        let mut url = self.error_redirect.clone()?;
        url.query_pairs_mut()
            .append_pair("error", code)
            .append_pair("server", self.server.as_str());
        Some(url)
    }

    /// Exchanges an authorization code (with the flow's PKCE verifier).
    pub async fn exchange_code(
        &self,
        code: &Secret,
        verifier: &Secret,
    ) -> Result<TokenResponse, OAuthError> {
        let redirect_uri = self
            .redirect_uri
            .as_deref()
            .ok_or(OAuthError::NotConfigured("redirect_uri"))?;
        self.token_request(&[
            ("grant_type", "authorization_code"),
            ("code", code.expose()),
            ("code_verifier", verifier.expose()),
            ("redirect_uri", redirect_uri),
        ])
        .await
    }

    /// Uses a refresh token.
    pub async fn refresh(&self, refresh_token: &Secret) -> Result<TokenResponse, OAuthError> {
        self.token_request(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
        ])
        .await
    }

    async fn token_request(&self, params: &[(&str, &str)]) -> Result<TokenResponse, OAuthError> {
        let mut form: Vec<(&str, &str)> = params.to_vec();
        if let Some(resource) = &self.resource {
            form.push(("resource", resource));
        }
        let mut request = self
            .http
            .post(self.token_url.clone())
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .timeout(self.timeout);
        match (&self.client_secret, self.auth_method) {
            (Some(secret), TokenAuthMethod::ClientSecretBasic) => {
                request = request.basic_auth(
                    form_encode(&self.client_id),
                    Some(form_encode(secret.expose())),
                );
            }
            (Some(secret), TokenAuthMethod::ClientSecretPost) => {
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", secret.expose()));
            }
            // A public client identifies itself; PKCE is its proof.
            (None, _) => form.push(("client_id", &self.client_id)),
        }
        let response = request.form(&form).send().await.map_err(|err| {
            if err.is_timeout() {
                OAuthError::Timeout(self.timeout)
            } else {
                OAuthError::Transport(err.without_url().to_string())
            }
        })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|err| {
            if err.is_timeout() {
                OAuthError::Timeout(self.timeout)
            } else {
                OAuthError::Transport(err.without_url().to_string())
            }
        })?;
        if status.is_success() {
            return parse_tokens(&body);
        }
        let code = status.as_u16();
        if status.is_server_error() || code == 429 || code == 408 {
            return Err(OAuthError::ServerError(code));
        }
        let error = serde_json::from_slice::<RawErrorResponse>(&body)
            .ok()
            .and_then(|e| e.error)
            .map(|e| sanitize_code(&e))
            .unwrap_or_else(|| format!("http_{code}"));
        if error == "invalid_grant" {
            return Err(OAuthError::InvalidGrant);
        }
        Err(OAuthError::Rejected {
            status: code,
            error,
        })
    }
}

fn parse_tokens(body: &[u8]) -> Result<TokenResponse, OAuthError> {
    let raw: RawTokenResponse = serde_json::from_slice(body)
        // serde's message could quote the body (tokens): keep only the position.
        .map_err(|err| {
            OAuthError::Malformed(format!(
                "not a JSON token response (line {}, column {})",
                err.line(),
                err.column()
            ))
        })?;
    let access_token = raw
        .access_token
        .filter(|t| !t.expose().is_empty())
        .ok_or_else(|| OAuthError::Malformed("no access_token".into()))?;
    let expires_in = match raw.expires_in {
        None => DEFAULT_EXPIRES_IN,
        Some(serde_json::Value::Number(n)) => n.as_i64().unwrap_or(DEFAULT_EXPIRES_IN),
        Some(serde_json::Value::String(s)) => s.trim().parse().unwrap_or(DEFAULT_EXPIRES_IN),
        Some(_) => return Err(OAuthError::Malformed("expires_in is not a number".into())),
    };
    Ok(TokenResponse {
        access_token,
        refresh_token: raw.refresh_token.filter(|t| !t.expose().is_empty()),
        expires_at: Utc::now() + chrono::Duration::seconds(expires_in.clamp(0, 10 * 365 * 86400)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_parts_are_form_encoded() {
        assert_eq!(form_encode("a b:c/d%"), "a+b%3Ac%2Fd%25");
        assert_eq!(form_encode("id.apps-x_y"), "id.apps-x_y");
    }

    #[test]
    fn token_parse_keeps_missing_refresh_as_none() {
        let t = parse_tokens(br#"{"access_token":"a","expires_in":"60"}"#).unwrap();
        assert!(t.refresh_token.is_none());
        assert!(t.expires_at > Utc::now() + chrono::Duration::seconds(50));
        let err = parse_tokens(br#"{"token_type":"Bearer"}"#).unwrap_err();
        assert!(matches!(err, OAuthError::Malformed(_)));
        let err = parse_tokens(b"access_token=secret").unwrap_err();
        assert!(!err.to_string().contains("secret"));
    }

    #[test]
    fn error_codes_are_sanitized() {
        assert_eq!(sanitize_code("invalid_grant"), "invalid_grant");
        assert_eq!(sanitize_code("bad\ncode<script>"), "badcodescript");
    }
}
