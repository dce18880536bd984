//! OAuth discovery the MCP way (authorization spec 2025-06-18 and later), for a remote server
//! whose operator configured no endpoints:
//!
//! 1. protected-resource metadata (RFC 9728): the URL from the `resource_metadata` parameter of
//!    the server's 401 `WWW-Authenticate`, else `/.well-known/oauth-protected-resource` with the
//!    endpoint's path, then at the root; its `resource` must be the server's own URL;
//! 2. authorization-server metadata of its first authorization server: RFC 8414, then OpenID
//!    Connect discovery (path-inserted, then path-appended); its `issuer` must match, and it
//!    must offer PKCE S256;
//! 3. dynamic client registration (RFC 7591) at its `registration_endpoint`, when the operator
//!    configured no `client_id`: a public client (`token_endpoint_auth_method = "none"`) whose
//!    one redirect URI is our callback.
//!
//! Written on our reqwest client rather than with rmcp's `auth` feature, which brings the
//! `oauth2` crate (and a second `thiserror` major version) and keeps one user's tokens in its
//! own in-memory manager; the pool already has per-user PKCE, states, the token exchange and
//! the single-flight refresh (`flow`, `provider`, `refresh`), which only need the endpoints.
//!
//! Every URL met on the way must be https (or loopback http when the server's
//! `allow_insecure_loopback` allows it), and no request here carries a user's token.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{ACCEPT, HeaderValue, WWW_AUTHENTICATE};

use super::{Provider, TokenRefresher};
use crate::config::ServerConfig;
use crate::store::{RegisteredClientRow, Secret, ServerName, Store};

/// Upper bound of each discovery request.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest metadata document read (they are a few KiB).
const MAX_DOCUMENT: usize = 256 * 1024;

/// Why discovery failed. Carries URLs of metadata (public) at most, never a secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot reach {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: {problem}")]
    Invalid { url: String, problem: String },
    #[error("no protected-resource metadata found for {0}")]
    NoResourceMetadata(String),
    #[error("no authorization-server metadata found for issuer {0}")]
    NoServerMetadata(String),
    #[error("the authorization server does not offer PKCE S256 (the MCP spec requires it)")]
    NoPkce,
    #[error("no client_id is configured and the authorization server offers no registration")]
    NoRegistration,
    #[error("insecure URL refused: {0} (https is required except on loopback)")]
    Insecure(String),
    #[error("this server is not configured for OAuth discovery")]
    NotConfigured,
    #[error("cannot store the registered client: {0}")]
    Store(String),
}

/// Where a remote server's users authorize, as discovered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Endpoints {
    /// The canonical URI of the MCP server, sent as RFC 8707 `resource` on authorize, token and
    /// refresh requests.
    pub resource: String,
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub registration_endpoint: Option<String>,
    /// From the resource's metadata, else the server's; requested when none are configured.
    pub scopes: Vec<String>,
    /// The server said it puts `iss` in authorization responses (RFC 9207): a callback
    /// without it is refused. (Absent in rows stored before this was read: then `iss` is
    /// checked when present.)
    #[serde(default)]
    pub iss_in_responses: bool,
}

/// A client registered at an authorization server (RFC 7591 response).
#[derive(Debug, Clone)]
pub struct RegisteredClient {
    pub client_id: String,
    pub client_secret: Option<Secret>,
}

/// What may be fetched: https, or http on a loopback address when allowed.
#[derive(Debug, Clone, Copy)]
pub struct UrlPolicy {
    pub allow_insecure_loopback: bool,
}

impl UrlPolicy {
    fn check(&self, url: &str) -> Result<Url, DiscoveryError> {
        let parsed = Url::parse(url).map_err(|_| DiscoveryError::Invalid {
            url: url.to_owned(),
            problem: "not an absolute URL".into(),
        })?;
        let loopback = parsed.host_str().is_some_and(|host| {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        match parsed.scheme() {
            "https" => Ok(parsed),
            "http" if loopback && self.allow_insecure_loopback => Ok(parsed),
            _ => Err(DiscoveryError::Insecure(url.to_owned())),
        }
    }
}

#[derive(serde::Deserialize)]
struct ResourceMetadata {
    resource: Option<String>,
    #[serde(default)]
    authorization_servers: Vec<String>,
    #[serde(default)]
    scopes_supported: Vec<String>,
}

#[derive(serde::Deserialize)]
struct ServerMetadata {
    issuer: Option<String>,
    authorization_endpoint: Option<String>,
    token_endpoint: Option<String>,
    registration_endpoint: Option<String>,
    #[serde(default)]
    code_challenge_methods_supported: Vec<String>,
    #[serde(default)]
    scopes_supported: Vec<String>,
    #[serde(default)]
    authorization_response_iss_parameter_supported: bool,
}

/// The OAuth client of `server`, a remote server configured for discovery
/// ([`crate::config::ServerConfig::uses_discovery`]): the refresher's if it has one, else the
/// one registered earlier (from the store), else discovered and registered now, and stored
/// once for the server. The refresher gets it, so tokens are refreshed with it from then on.
pub async fn ensure_provider(
    refresher: &TokenRefresher,
    store: &Store,
    server: &ServerName,
    config: &ServerConfig,
    http: &reqwest::Client,
) -> Result<Arc<Provider>, DiscoveryError> {
    if let Some(provider) = refresher.provider(server) {
        return Ok(provider);
    }
    let (Some(url), Some(oauth)) = (config.url.as_deref(), config.oauth.as_ref()) else {
        return Err(DiscoveryError::NotConfigured);
    };
    if !config.uses_discovery() {
        return Err(DiscoveryError::NotConfigured);
    }
    if let Some(provider) = load_provider(refresher, store, server, config, http).await? {
        return Ok(provider);
    }
    let policy = UrlPolicy {
        allow_insecure_loopback: config.allow_insecure_loopback,
    };
    let endpoints = discover(http, url, policy).await?;
    let redirect_uri = oauth
        .redirect_uri
        .as_deref()
        .ok_or(DiscoveryError::NotConfigured)?;
    let (client_id, client_secret) = if oauth.client_id.is_empty() {
        let scopes = if oauth.scopes.is_empty() {
            &endpoints.scopes
        } else {
            &oauth.scopes
        };
        let registered = register(http, &endpoints, redirect_uri, scopes).await?;
        tracing::info!(
            server = %server, issuer = %endpoints.issuer,
            "Registered mcp-pool as an OAuth client (dynamic client registration)"
        );
        let stored = store
            .insert_oauth_client(&RegisteredClientRow {
                server: server.clone(),
                endpoints: serde_json::to_string(&endpoints)
                    .map_err(|err| DiscoveryError::Store(err.to_string()))?,
                client_id: Secret::new(registered.client_id),
                client_secret: registered.client_secret,
                created_at: chrono::Utc::now(),
            })
            .await
            .map_err(|err| DiscoveryError::Store(err.to_string()))?;
        // Another instance may have registered first: its client is the one used.
        let endpoints: Endpoints = serde_json::from_str(&stored.endpoints)
            .map_err(|err| DiscoveryError::Store(err.to_string()))?;
        return install(
            refresher,
            server,
            config,
            &endpoints,
            stored.client_id.expose().to_owned(),
            stored.client_secret,
            http,
        );
    } else {
        let secret = oauth
            .client_secret_env
            .as_deref()
            .and_then(|name| std::env::var(name).ok())
            .filter(|s| !s.is_empty())
            .map(Secret::new);
        (oauth.client_id.clone(), secret)
    };
    install(
        refresher,
        server,
        config,
        &endpoints,
        client_id,
        client_secret,
        http,
    )
}

/// The client registered earlier for `server`, if the store has one (no network): at start-up,
/// so that tokens obtained before a restart are still refreshed.
pub async fn load_provider(
    refresher: &TokenRefresher,
    store: &Store,
    server: &ServerName,
    config: &ServerConfig,
    http: &reqwest::Client,
) -> Result<Option<Arc<Provider>>, DiscoveryError> {
    let Some(row) = store
        .oauth_client(server)
        .await
        .map_err(|err| DiscoveryError::Store(err.to_string()))?
    else {
        return Ok(None);
    };
    let endpoints: Endpoints = serde_json::from_str(&row.endpoints)
        .map_err(|err| DiscoveryError::Store(err.to_string()))?;
    install(
        refresher,
        server,
        config,
        &endpoints,
        row.client_id.expose().to_owned(),
        row.client_secret,
        http,
    )
    .map(Some)
}

fn install(
    refresher: &TokenRefresher,
    server: &ServerName,
    config: &ServerConfig,
    endpoints: &Endpoints,
    client_id: String,
    client_secret: Option<Secret>,
    http: &reqwest::Client,
) -> Result<Arc<Provider>, DiscoveryError> {
    let oauth = config.oauth.as_ref().ok_or(DiscoveryError::NotConfigured)?;
    let provider = Provider::discovered(
        server.clone(),
        oauth,
        endpoints,
        client_id,
        client_secret,
        http.clone(),
    )
    .ok_or_else(|| DiscoveryError::Invalid {
        url: endpoints.issuer.clone(),
        problem: "unusable endpoint URLs".into(),
    })?;
    let provider = Arc::new(provider);
    refresher.add_provider(provider.clone());
    Ok(provider)
}

/// Discovers the endpoints of the MCP server at `mcp_url`.
pub async fn discover(
    http: &reqwest::Client,
    mcp_url: &str,
    policy: UrlPolicy,
) -> Result<Endpoints, DiscoveryError> {
    let server = policy.check(mcp_url)?;
    let resource = resource_metadata(http, &server, policy).await?;
    let issuer = resource
        .authorization_servers
        .first()
        .cloned()
        .ok_or_else(|| DiscoveryError::Invalid {
            url: mcp_url.to_owned(),
            problem: "its resource metadata names no authorization server".into(),
        })?;
    let meta = server_metadata(http, &issuer, policy).await?;
    if !meta
        .code_challenge_methods_supported
        .iter()
        .any(|m| m == "S256")
    {
        return Err(DiscoveryError::NoPkce);
    }
    let endpoint = |value: Option<String>, name: &str| -> Result<String, DiscoveryError> {
        let value = value.ok_or_else(|| DiscoveryError::Invalid {
            url: issuer.clone(),
            problem: format!("its metadata has no {name}"),
        })?;
        policy.check(&value)?;
        Ok(value)
    };
    let registration_endpoint = match meta.registration_endpoint {
        Some(url) => Some(endpoint(Some(url), "registration_endpoint")?),
        None => None,
    };
    Ok(Endpoints {
        resource: resource.resource.unwrap_or_else(|| mcp_url.to_owned()),
        authorization_endpoint: endpoint(meta.authorization_endpoint, "authorization_endpoint")?,
        token_endpoint: endpoint(meta.token_endpoint, "token_endpoint")?,
        registration_endpoint,
        scopes: if resource.scopes_supported.is_empty() {
            meta.scopes_supported
        } else {
            resource.scopes_supported
        },
        iss_in_responses: meta.authorization_response_iss_parameter_supported,
        issuer,
    })
}

/// Registers mcp-pool as a public client whose one redirect URI is `redirect_uri`.
pub async fn register(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    redirect_uri: &str,
    scopes: &[String],
) -> Result<RegisteredClient, DiscoveryError> {
    let url = endpoints
        .registration_endpoint
        .as_deref()
        .ok_or(DiscoveryError::NoRegistration)?;
    let mut body = serde_json::json!({
        "client_name": "mcp-pool",
        "redirect_uris": [redirect_uri],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    });
    if !scopes.is_empty() {
        body["scope"] = scopes.join(" ").into();
    }
    let response = http
        .post(url)
        .header(ACCEPT, HeaderValue::from_static("application/json"))
        .timeout(TIMEOUT)
        .json(&body)
        .send()
        .await
        .map_err(|err| unreachable(url, err))?;
    let status = response.status().as_u16();
    let bytes = read_limited(url, response).await?;
    if !(200..300).contains(&status) {
        return Err(DiscoveryError::Status {
            url: url.to_owned(),
            status,
        });
    }
    #[derive(serde::Deserialize)]
    struct Registration {
        client_id: Option<String>,
        client_secret: Option<Secret>,
    }
    let registration: Registration =
        serde_json::from_slice(&bytes).map_err(|_| DiscoveryError::Invalid {
            url: url.to_owned(),
            problem: "not a JSON registration response".into(),
        })?;
    let client_id = registration
        .client_id
        .filter(|id| !id.is_empty() && id.len() <= 256)
        .ok_or_else(|| DiscoveryError::Invalid {
            url: url.to_owned(),
            problem: "no usable client_id".into(),
        })?;
    Ok(RegisteredClient {
        client_id,
        client_secret: registration
            .client_secret
            .filter(|secret| !secret.expose().is_empty()),
    })
}

async fn resource_metadata(
    http: &reqwest::Client,
    server: &Url,
    policy: UrlPolicy,
) -> Result<ResourceMetadata, DiscoveryError> {
    let mut candidates = Vec::new();
    // An unauthenticated request: the 401 names the metadata (RFC 9728 section 5.1).
    if let Ok(response) = http
        .post(server.clone())
        .header(ACCEPT, "application/json, text/event-stream")
        .timeout(TIMEOUT)
        .json(&serde_json::json!({
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "mcp-pool", "version": env!("CARGO_PKG_VERSION")}}
        }))
        .send()
        .await
        && let Some(challenge) = response.headers().get(WWW_AUTHENTICATE)
        && let Ok(challenge) = challenge.to_str()
        && let Some(url) = challenge_param(challenge, "resource_metadata")
    {
        candidates.push(url);
    }
    let path = server.path().trim_end_matches('/');
    let origin = origin(server);
    if !path.is_empty() {
        candidates.push(format!(
            "{origin}/.well-known/oauth-protected-resource{path}"
        ));
    }
    candidates.push(format!("{origin}/.well-known/oauth-protected-resource"));
    for url in candidates {
        let checked = policy.check(&url)?;
        if let Some(meta) = fetch_json::<ResourceMetadata>(http, checked).await? {
            // RFC 9728 section 3.3: the metadata must be about this very resource.
            if let Some(resource) = &meta.resource
                && !same_resource(resource, server)
            {
                return Err(DiscoveryError::Invalid {
                    url,
                    problem: format!("its resource `{resource}` is not this server"),
                });
            }
            return Ok(meta);
        }
    }
    Err(DiscoveryError::NoResourceMetadata(server.to_string()))
}

async fn server_metadata(
    http: &reqwest::Client,
    issuer: &str,
    policy: UrlPolicy,
) -> Result<ServerMetadata, DiscoveryError> {
    let parsed = policy.check(issuer)?;
    let origin = origin(&parsed);
    let path = parsed.path().trim_end_matches('/');
    let candidates = if path.is_empty() {
        vec![
            format!("{origin}/.well-known/oauth-authorization-server"),
            format!("{origin}/.well-known/openid-configuration"),
        ]
    } else {
        vec![
            format!("{origin}/.well-known/oauth-authorization-server{path}"),
            format!("{origin}/.well-known/openid-configuration{path}"),
            format!("{origin}{path}/.well-known/openid-configuration"),
        ]
    };
    for url in candidates {
        if let Some(meta) = fetch_json::<ServerMetadata>(
            http,
            Url::parse(&url).map_err(|_| DiscoveryError::Invalid {
                url: url.clone(),
                problem: "not a URL".into(),
            })?,
        )
        .await?
        {
            // RFC 8414 section 3.3: the issuer in the document must be the one asked for.
            if meta.issuer.as_deref().map(|i| i.trim_end_matches('/'))
                != Some(issuer.trim_end_matches('/'))
            {
                return Err(DiscoveryError::Invalid {
                    url,
                    problem: "its issuer is not the one the resource names".into(),
                });
            }
            return Ok(meta);
        }
    }
    Err(DiscoveryError::NoServerMetadata(issuer.to_owned()))
}

/// `Ok(None)` for a 404 (try the next well-known location).
async fn fetch_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: Url,
) -> Result<Option<T>, DiscoveryError> {
    let shown = url.to_string();
    let response = http
        .get(url)
        .header(ACCEPT, HeaderValue::from_static("application/json"))
        .timeout(TIMEOUT)
        .send()
        .await
        .map_err(|err| unreachable(&shown, err))?;
    let status = response.status().as_u16();
    if matches!(status, 404 | 405 | 400) {
        return Ok(None);
    }
    if !(200..300).contains(&status) {
        return Err(DiscoveryError::Status { url: shown, status });
    }
    let bytes = read_limited(&shown, response).await?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|_| DiscoveryError::Invalid {
            url: shown,
            problem: "not a JSON metadata document".into(),
        })
}

async fn read_limited(
    url: &str,
    mut response: reqwest::Response,
) -> Result<Vec<u8>, DiscoveryError> {
    let mut out = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| unreachable(url, err))?
    {
        if out.len() + chunk.len() > MAX_DOCUMENT {
            return Err(DiscoveryError::Invalid {
                url: url.to_owned(),
                problem: format!("larger than {MAX_DOCUMENT} bytes"),
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn unreachable(url: &str, err: reqwest::Error) -> DiscoveryError {
    DiscoveryError::Unreachable {
        url: url.to_owned(),
        cause: err.without_url().to_string(),
    }
}

fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// The same resource: equal once a trailing slash and a fragment are ignored.
fn same_resource(a: &str, server: &Url) -> bool {
    let strip = |s: &str| {
        s.split('#')
            .next()
            .unwrap_or(s)
            .trim_end_matches('/')
            .to_owned()
    };
    strip(a) == strip(server.as_str())
}

/// One auth-param of a `WWW-Authenticate` challenge (`name="value"` or `name=value`).
fn challenge_param(challenge: &str, name: &str) -> Option<String> {
    let mut rest = challenge;
    while let Some(at) = rest.find(name) {
        let before = rest[..at].chars().next_back();
        let after = &rest[at + name.len()..];
        rest = after;
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let Some(value) = after.trim_start().strip_prefix('=') else {
            continue;
        };
        let value = value.trim_start();
        return Some(match value.strip_prefix('"') {
            Some(quoted) => quoted.split('"').next().unwrap_or_default().to_owned(),
            None => value
                .split([',', ' '])
                .next()
                .unwrap_or_default()
                .to_owned(),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_params_are_found_quoted_or_not() {
        let header = r#"Bearer error="invalid_token", error_description="Missing", resource_metadata="http://127.0.0.1:1/.well-known/oauth-protected-resource/mcp""#;
        assert_eq!(
            challenge_param(header, "resource_metadata").as_deref(),
            Some("http://127.0.0.1:1/.well-known/oauth-protected-resource/mcp")
        );
        assert_eq!(
            challenge_param(
                "Bearer resource_metadata=https://x/y, scope=a",
                "resource_metadata"
            )
            .as_deref(),
            Some("https://x/y")
        );
        assert_eq!(
            challenge_param("Bearer xresource_metadata=\"a\"", "resource_metadata"),
            None
        );
    }

    #[test]
    fn http_is_refused_off_loopback() {
        let strict = UrlPolicy {
            allow_insecure_loopback: false,
        };
        let loose = UrlPolicy {
            allow_insecure_loopback: true,
        };
        assert!(strict.check("https://as.example.com/").is_ok());
        assert!(strict.check("http://127.0.0.1:1/").is_err());
        assert!(loose.check("http://127.0.0.1:1/").is_ok());
        assert!(loose.check("http://[::1]:1/").is_ok());
        assert!(loose.check("http://as.example.com/").is_err());
        assert!(loose.check("file:///etc/passwd").is_err());
    }

    #[test]
    fn resources_compare_without_trailing_slash() {
        let server = Url::parse("https://mcp.example.com/mcp").unwrap();
        assert!(same_resource("https://mcp.example.com/mcp/", &server));
        assert!(!same_resource("https://evil.example.com/mcp", &server));
    }
}
