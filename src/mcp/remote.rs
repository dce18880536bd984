//! The transport of a remote MCP server: rmcp's Streamable HTTP client on our reqwest client,
//! with the user's credentials put on every request here rather than in rmcp's static
//! `auth_header`, so that a token refreshed mid-session is used at once and a 401 can be
//! answered with one refresh and one retry.
//!
//! Who holds the credentials is not this module's business: a [`RemoteCredentials`] gives the
//! current secret and, when the server rejected one, a replacement (or the reason there is
//! none). `oauth::remote` implements it on the store and the token refresher.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderName, HeaderValue};
use rmcp::model::ClientJsonRpcMessage;
use rmcp::transport::streamable_http_client::{
    SseError, StreamableHttpClient, StreamableHttpError, StreamableHttpPostResponse,
    StreamableHttpResponseLimits,
};

use crate::store::{BoxFuture, CredentialError, Secret};

/// How the secret goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthScheme {
    /// `Authorization: Bearer <secret>`.
    Bearer,
    /// `<name>: <secret>` (an API key header such as `X-Api-Key`).
    Header(HeaderName),
}

/// A secret to send, with the instant after which it should be read again.
#[derive(Clone)]
pub struct CurrentSecret {
    pub secret: Secret,
    /// `None`: valid until the server rejects it.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Where a remote session's credentials come from (one user, one server).
pub trait RemoteCredentials: Send + Sync + 'static {
    /// The secret to send now.
    fn current(&self) -> BoxFuture<'_, Result<CurrentSecret, CredentialError>>;
    /// The server answered 401 to `rejected`: a different secret to retry with (stored by
    /// someone else meanwhile, or refreshed now through the single flight), or why there is
    /// none (`ReconnectRequired` for a revoked grant or a rejected API key).
    fn rejected<'a>(
        &'a self,
        rejected: &'a Secret,
    ) -> BoxFuture<'a, Result<CurrentSecret, CredentialError>>;
}

/// Everything a remote session needs to connect.
#[derive(Clone)]
pub struct RemoteLaunch {
    /// The MCP endpoint, validated at start-up (https, or http on loopback when allowed).
    pub url: String,
    /// `None`: the server needs no credentials.
    pub auth: Option<(AuthScheme, Arc<dyn RemoteCredentials>)>,
    /// Shared by every remote session (its connection pool is per host; headers are per
    /// request, so nothing of one user's leaks into another's requests).
    pub http: reqwest::Client,
}

impl std::fmt::Debug for RemoteLaunch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteLaunch")
            .field("url", &self.url)
            .field("auth", &self.auth.as_ref().map(|(scheme, _)| scheme))
            .finish()
    }
}

/// The HTTP client of remote sessions: rustls with ring, and no redirects at all, so a request
/// carrying a user's token never leaves the configured origin (rmcp's own default follows
/// same-origin 307/308; a server that needs one is configured with its final URL instead).
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("mcp-pool/", env!("CARGO_PKG_VERSION")))
        .build()
}

// === the authorizing client ===

/// The session's view of its credentials: a cached secret (so a warm call reads no database)
/// and the last reason a rejected secret could not be replaced, for the failed call to report.
struct Authorizer {
    scheme: AuthScheme,
    source: Arc<dyn RemoteCredentials>,
    cached: tokio::sync::Mutex<Option<CurrentSecret>>,
    failure: Mutex<Option<Arc<CredentialError>>>,
}

impl Authorizer {
    async fn secret(&self) -> Result<Secret, CredentialError> {
        let mut cached = self.cached.lock().await;
        if let Some(current) = cached.as_ref()
            && current.expires_at.is_none_or(|at| Utc::now() < at)
        {
            return Ok(current.secret.clone());
        }
        // Expired by our clock: the pool's freshness check has usually refreshed it already.
        let current = self.source.current().await?;
        let secret = current.secret.clone();
        *cached = Some(current);
        Ok(secret)
    }

    /// One replacement for a rejected secret; requests that were rejected with the same secret
    /// at the same time wait here and share it (the source's single flight does the rest).
    async fn replace(&self, rejected: &Secret) -> Option<Secret> {
        let mut cached = self.cached.lock().await;
        if let Some(current) = cached.as_ref()
            && current.secret != *rejected
        {
            return Some(current.secret.clone());
        }
        match self.source.rejected(rejected).await {
            Ok(fresh) if fresh.secret != *rejected => {
                let secret = fresh.secret.clone();
                *cached = Some(fresh);
                *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Some(secret)
            }
            // Nothing different to offer: the caller reports the challenge as it came.
            Ok(_) => None,
            Err(err) => {
                self.fail(err);
                None
            }
        }
    }

    fn fail(&self, err: CredentialError) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(err));
    }
}

/// rmcp's [`StreamableHttpClient`] over our reqwest client, adding the user's credentials to
/// each request and retrying a request the server answered 401 once with a replaced secret.
#[derive(Clone)]
pub(crate) struct AuthorizedHttp {
    http: reqwest::Client,
    auth: Option<Arc<Authorizer>>,
}

type HttpResult<T> = Result<T, StreamableHttpError<reqwest::Error>>;

impl AuthorizedHttp {
    pub(crate) fn new(launch: &RemoteLaunch) -> AuthorizedHttp {
        AuthorizedHttp {
            http: launch.http.clone(),
            auth: launch.auth.as_ref().map(|(scheme, source)| {
                Arc::new(Authorizer {
                    scheme: scheme.clone(),
                    source: source.clone(),
                    cached: tokio::sync::Mutex::new(None),
                    failure: Mutex::new(None),
                })
            }),
        }
    }

    /// Why the last rejected secret could not be replaced, if it could not.
    pub(crate) fn auth_failure(&self) -> Option<Arc<CredentialError>> {
        let auth = self.auth.as_ref()?;
        auth.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the secret before the session starts, so missing credentials fail the start
    /// with their own error instead of a 401 from the server.
    pub(crate) async fn preload(&self) -> Result<(), CredentialError> {
        match &self.auth {
            Some(auth) => auth.secret().await.map(drop),
            None => Ok(()),
        }
    }

    /// Runs `call` with the credentials; on a 401 challenge, once more with a replacement.
    async fn authorized<T, F, Fut>(
        &self,
        mut headers: HashMap<HeaderName, HeaderValue>,
        call: F,
    ) -> HttpResult<T>
    where
        F: Fn(Option<String>, HashMap<HeaderName, HeaderValue>) -> Fut,
        Fut: Future<Output = HttpResult<T>>,
    {
        let Some(auth) = &self.auth else {
            return call(None, headers).await;
        };
        let sent = match auth.secret().await {
            Ok(secret) => secret,
            Err(err) => {
                let challenge = StreamableHttpError::AuthRequired(
                    rmcp::transport::streamable_http_client::AuthRequiredError::new(
                        "mcp-pool: no credentials".to_owned(),
                    ),
                );
                auth.fail(err);
                return Err(challenge);
            }
        };
        let attempt =
            |secret: &Secret, headers: &mut HashMap<HeaderName, HeaderValue>| match &auth.scheme {
                AuthScheme::Bearer => Some(secret.expose().to_owned()),
                AuthScheme::Header(name) => {
                    if let Ok(mut value) = HeaderValue::from_str(secret.expose()) {
                        value.set_sensitive(true);
                        headers.insert(name.clone(), value);
                    }
                    None
                }
            };
        let mut first = headers.clone();
        let bearer = attempt(&sent, &mut first);
        match call(bearer, first).await {
            Err(StreamableHttpError::AuthRequired(challenge)) => {
                let Some(fresh) = auth.replace(&sent).await else {
                    return Err(StreamableHttpError::AuthRequired(challenge));
                };
                let bearer = attempt(&fresh, &mut headers);
                call(bearer, headers).await
            }
            other => other,
        }
    }
}

type SseStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<sse_stream::Sse, SseError>> + Send>>;

impl StreamableHttpClient for AuthorizedHttp {
    type Error = reqwest::Error;

    async fn post_message(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        _auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> HttpResult<StreamableHttpPostResponse> {
        self.post_message_with_response_limits(
            uri,
            message,
            session_id,
            None,
            custom_headers,
            StreamableHttpResponseLimits::default(),
        )
        .await
    }

    async fn post_message_with_response_limits(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        _auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        limits: StreamableHttpResponseLimits,
    ) -> HttpResult<StreamableHttpPostResponse> {
        let on_session_request =
            session_id.is_some() && matches!(message, ClientJsonRpcMessage::Request(_));
        let answer = self
            .authorized(custom_headers, |bearer, headers| {
                self.http.post_message_with_response_limits(
                    uri.clone(),
                    message.clone(),
                    session_id.clone(),
                    bearer,
                    headers,
                    limits,
                )
            })
            .await;
        match answer {
            // A request on a session answered with an error that names no request: the server
            // refused the session itself, not the request (server-everything answers an
            // unknown `Mcp-Session-Id` with 400 and an id-less error instead of the 404 the
            // spec asks for). Nothing was processed, so it is reported as an expired session,
            // which rmcp answers by initializing again and sending the request once more;
            // left as it is, the error could be routed to no request and the call would hang
            // until its timeout.
            Ok(StreamableHttpPostResponse::Json(
                rmcp::model::JsonRpcMessage::Error(rmcp::model::JsonRpcError { id: None, .. }),
                _,
            )) if on_session_request => Err(StreamableHttpError::SessionExpired),
            other => other,
        }
    }

    async fn delete_session(
        &self,
        uri: Arc<str>,
        session_id: Arc<str>,
        _auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> HttpResult<()> {
        self.authorized(custom_headers, |bearer, headers| {
            self.http
                .delete_session(uri.clone(), session_id.clone(), bearer, headers)
        })
        .await
    }

    async fn get_stream(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        _auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> HttpResult<SseStream> {
        self.authorized(custom_headers, |bearer, headers| {
            self.http.get_stream(
                uri.clone(),
                session_id.clone(),
                last_event_id.clone(),
                bearer,
                headers,
            )
        })
        .await
    }

    async fn get_stream_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        _auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> HttpResult<SseStream> {
        self.authorized(custom_headers, |bearer, headers| {
            self.http.get_stream_with_max_sse_event_size(
                uri.clone(),
                session_id.clone(),
                last_event_id.clone(),
                bearer,
                headers,
                max_sse_event_size,
            )
        })
        .await
    }
}

/// Whether `err` (a failed request or handshake) is the server's 401/403 challenge.
pub(crate) fn is_auth_challenge(err: &(dyn std::error::Error + 'static)) -> bool {
    use rmcp::transport::streamable_http_client::{AuthRequiredError, InsufficientScopeError};
    let mut source = Some(err);
    while let Some(current) = source {
        if current.downcast_ref::<AuthRequiredError>().is_some()
            || current.downcast_ref::<InsufficientScopeError>().is_some()
        {
            return true;
        }
        source = current.source();
    }
    false
}
