//! [`TokenRefresher`]: access tokens are refreshed before they expire, exactly once at a time per
//! (user, server).
//!
//! # Why two refreshes of one grant cannot both be written
//! - **In this process**, every check of a key runs under that key's async mutex
//!   ([`TokenRefresher::check`]). The holder re-reads the row *after* taking the lock; a
//!   caller that waited behind a refresh therefore finds the new expiry and sends nothing. So
//!   at most one token request per key is in flight here, and concurrent callers (tool calls,
//!   a session start, the background sweep) all use its result.
//! - **Across processes** sharing the database, the row's `version` and a short lease:
//!   1. before any request, a claim ([`Store::claim_refresh`]: `UPDATE .. SET version =
//!      version + 1, refresh_lease_until = now + lease WHERE version = $v AND no earlier
//!      claim's lease is still running`). Of instances that read the same version exactly one
//!      claim matches (the others see a different version), and an instance that read the row
//!      only after that claim fails on the lease. The losers send *no* token request: they poll
//!      the row until the winner's tokens are there, use them and rewrite their own
//!      credentials file from the row. So a provider that rotates refresh tokens never sees
//!      the same one twice.
//!   2. the write itself is a compare-and-swap on the claimed version (`CredentialHandle::update`
//!      with `expected_version`): if anything wrote in between (a reconnect, or another
//!      instance's claim after this one's lease ran out) it gets `Conflict`, discards its
//!      response, re-reads and uses the stored tokens. Every token write clears the lease.
//! - An `invalid_grant` is believed only if the row still has the version that was claimed:
//!   a refresh token rotated away by a concurrent winner is not a revoked grant.
//!
//! [`Store::claim_refresh`]: crate::store::Store::claim_refresh
//!
//! A transient failure (5xx, timeout, network) keeps the credentials, is retried with backoff
//! within the request, and then the key backs off for a while (calls keep using a token that
//! has not expired yet). `invalid_grant` deactivates the credentials and answers "reconnect
//! required" until new credentials are stored.
//!
//! The refresher only looks after tokens: it never touches a session. Freshness has one owner,
//! the pool (`actors::pool`), which consults it before every tool call, tool listing and session
//! start (and in its background sweep), and acts on the outcome (restarts a `restart_on_token_refresh` server between calls,
//! closes the session of a revoked grant). So `oauth` depends on `store`, not on the actors.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::OAuthError;
use super::provider::{Provider, TokenResponse, http_client};
use crate::config::Config;
use crate::ids::SessionKey;
use crate::store::{
    CredentialError, CredentialWriter, Secret, ServerName, StoreError, TokenUpdate, Tokens, UserId,
};

/// Token requests per refresh before giving up for now.
const ATTEMPTS: u32 = 3;
/// Backoff between those attempts: full jitter over `base·2^n`, capped.
const RETRY_BASE: Duration = Duration::from_millis(200);
const RETRY_CAP: Duration = Duration::from_secs(2);
/// After a refresh that failed transiently, the key is not retried for
/// `refresh_cooldown·2^failures`, capped at this many times `refresh_cooldown`: an outage at
/// the provider must not turn every tool call into token requests.
const COOL_DOWN_CAP_FACTOR: u32 = 60;

/// What a freshness check found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Nothing to do: no token endpoint for the server, no stored credentials, no expiry or
    /// no refresh token.
    Unmanaged,
    /// The access token is valid for longer than `refresh_before`.
    Fresh,
    /// This check refreshed the tokens (and its write won).
    Refreshed,
    /// Another writer (another instance, a reconnect) stored newer tokens first; they are used.
    RefreshedElsewhere,
    /// Refreshing failed for now, but the access token has not expired: it is used meanwhile.
    Stale,
}

/// A key's transient failures, for the cool-down between refresh attempts.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    retry_at: Instant,
}

struct Inner {
    /// The single writer of credentials (the `CredentialActor`'s handle).
    credentials: Arc<dyn CredentialWriter>,
    /// Configured at start-up; remote servers found by discovery are added later
    /// ([`TokenRefresher::add_provider`]).
    providers: std::sync::RwLock<BTreeMap<ServerName, Arc<Provider>>>,
    restart_on_refresh: BTreeSet<ServerName>,
    /// One async mutex per key being checked; entries go when nobody holds or waits for them.
    locks: Mutex<HashMap<SessionKey, Arc<tokio::sync::Mutex<()>>>>,
    /// No refresh is needed before this instant (expiry − `refresh_before`): the per-call fast
    /// path, which then does not touch the database.
    fresh_until: Mutex<HashMap<SessionKey, DateTime<Utc>>>,
    backoff: Mutex<HashMap<SessionKey, Backoff>>,
}

/// See the module docs. Cheap to clone; one per process (its locks are the single flight).
#[derive(Clone)]
pub struct TokenRefresher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TokenRefresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRefresher")
            .field(
                "servers",
                &self.providers().keys().cloned().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// When the tokens next need a refresh; `None` when they never do (no expiry or nothing to
/// refresh with).
fn refresh_due(tokens: &Tokens, refresh_before: Duration) -> Option<DateTime<Utc>> {
    tokens.refresh_token.as_ref()?;
    let expiry = tokens.token_expiry?;
    Some(
        expiry
            .checked_sub_signed(chrono_duration(refresh_before))
            .unwrap_or(DateTime::<Utc>::MIN_UTC),
    )
}

impl TokenRefresher {
    /// One [`Provider`] per configured server with an `oauth.token_url`; the client secrets
    /// come from `env` (`std::env::var` in production).
    pub fn from_config(
        config: &Config,
        credentials: Arc<dyn CredentialWriter>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<TokenRefresher, OAuthError> {
        let http = http_client()?;
        let mut providers = BTreeMap::new();
        let mut restart_on_refresh = BTreeSet::new();
        for (name, server) in &config.servers {
            // Config validation already rejected bad names.
            let Ok(name) = ServerName::parse(name) else {
                continue;
            };
            if server.restart_on_token_refresh {
                restart_on_refresh.insert(name.clone());
            }
            if let Some(oauth) = &server.oauth
                && let Some(provider) =
                    Provider::from_config(name.clone(), oauth, env, http.clone())
            {
                providers.insert(name, Arc::new(provider));
            }
        }
        Ok(TokenRefresher {
            inner: Arc::new(Inner {
                credentials,
                providers: std::sync::RwLock::new(providers),
                restart_on_refresh,
                locks: Mutex::new(HashMap::new()),
                fresh_until: Mutex::new(HashMap::new()),
                backoff: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The OAuth client of `server`, if it has a token endpoint.
    pub fn provider(&self, server: &ServerName) -> Option<Arc<Provider>> {
        self.providers().get(server).cloned()
    }

    /// Adds (or replaces) the OAuth client of a server found by discovery.
    pub fn add_provider(&self, provider: Arc<Provider>) {
        self.inner
            .providers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(provider.server().clone(), provider);
    }

    fn providers(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<ServerName, Arc<Provider>>> {
        self.inner
            .providers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `server`'s tokens are refreshed here.
    pub fn manages(&self, server: &ServerName) -> bool {
        self.providers().contains_key(server)
    }

    /// Whether `server` reads its token only at start-up (`restart_on_token_refresh`): its
    /// session must be restarted, between calls, after a refresh.
    pub fn restarts_on_refresh(&self, server: &ServerName) -> bool {
        self.inner.restart_on_refresh.contains(server)
    }

    /// The shortest `refresh_before` of all servers, for the background sweep's interval.
    pub fn min_refresh_before(&self) -> Option<Duration> {
        self.providers().values().map(|p| p.refresh_before()).min()
    }

    /// Before a tool call: refreshes if the access token expires within `refresh_before`.
    /// Cheap when it does not (an in-memory check, no database read).
    pub async fn ensure_fresh(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<Freshness, CredentialError> {
        self.check(SessionKey::new(user, server), true, None).await
    }

    /// Before a session starts (it is about to read the file) and in the background sweep:
    /// like [`ensure_fresh`](Self::ensure_fresh) but always reads the row.
    pub async fn check_now(
        &self,
        user: &UserId,
        server: &ServerName,
    ) -> Result<Freshness, CredentialError> {
        self.check(SessionKey::new(user, server), false, None).await
    }

    /// A remote server answered 401 to `rejected`, the access token it was sent: refresh now,
    /// whatever the expiry says, through the same single flight and compare-and-swap as a
    /// refresh that is due. A caller that waited behind another refresh of the key finds a
    /// different token stored and sends nothing. `Ok` means the stored token is now another
    /// one; a token that cannot be replaced is an error (`ReconnectRequired` without a refresh
    /// token or after `invalid_grant`, `RefreshUnavailable` while the provider fails).
    pub async fn refresh_rejected(
        &self,
        user: &UserId,
        server: &ServerName,
        rejected: &Secret,
    ) -> Result<Freshness, CredentialError> {
        let result = self
            .check(SessionKey::new(user, server), false, Some(rejected))
            .await;
        match result {
            Ok(Freshness::Refreshed | Freshness::RefreshedElsewhere) => result,
            // No provider for the server, or the refresh could not be made now: the rejected
            // token is all there is.
            Ok(Freshness::Stale) => Err(CredentialError::RefreshUnavailable(server.clone())),
            Ok(Freshness::Unmanaged | Freshness::Fresh) => {
                Err(CredentialError::ReconnectRequired(server.clone()))
            }
            Err(err) => Err(err),
        }
    }

    /// Forgets what is known about the key: new credentials were stored (connect flow).
    pub fn forget(&self, user: &UserId, server: &ServerName) {
        let key = SessionKey::new(user, server);
        lock(&self.inner.fresh_until).remove(&key);
        lock(&self.inner.backoff).remove(&key);
    }

    // === the single flight ===

    async fn check(
        &self,
        key: SessionKey,
        use_cache: bool,
        rejected: Option<&Secret>,
    ) -> Result<Freshness, CredentialError> {
        let Some(provider) = self.provider(&key.server) else {
            return Ok(Freshness::Unmanaged);
        };
        if use_cache
            && lock(&self.inner.fresh_until)
                .get(&key)
                .is_some_and(|until| Utc::now() < *until)
        {
            return Ok(Freshness::Fresh);
        }
        let mutex = lock(&self.inner.locks)
            .entry(key.clone())
            .or_default()
            .clone();
        let result = {
            let _guard = mutex.lock().await;
            self.check_locked(&key, &provider, rejected).await
        };
        // Drop the key's mutex from the map once only the map and this caller hold it. Under the
        // map's lock nobody can clone it meanwhile; a later caller makes a new one, which is
        // fine because nobody holds the old one.
        let mut locks = lock(&self.inner.locks);
        if Arc::strong_count(&mutex) == 2 {
            locks.remove(&key);
        }
        result
    }

    async fn check_locked(
        &self,
        key: &SessionKey,
        provider: &Provider,
        rejected: Option<&Secret>,
    ) -> Result<Freshness, CredentialError> {
        let store = self.inner.credentials.store();
        let Some(record) = store.get(&key.user, &key.server).await? else {
            // Persisted, so a restarted service and every instance of a cluster say so too.
            if store.reconnect_required(&key.user, &key.server).await? {
                return Err(CredentialError::ReconnectRequired(key.server.clone()));
            }
            return Ok(Freshness::Unmanaged);
        };
        // A rejected token forces the refresh, unless it is no longer the stored one (a
        // concurrent refresh or a reconnect replaced it: that one is used).
        let forced = match rejected {
            Some(sent) if record.tokens.access_token.as_ref() != Some(sent) => {
                self.remember_expiry(key, record.tokens.token_expiry);
                return Ok(Freshness::RefreshedElsewhere);
            }
            Some(_) if record.tokens.refresh_token.is_none() => {
                return Err(CredentialError::ReconnectRequired(key.server.clone()));
            }
            Some(_) => true,
            None => false,
        };
        let now = Utc::now();
        let due = refresh_due(&record.tokens, provider.refresh_before())
            // A token without an expiry is refreshed only when it was rejected.
            .or(forced.then_some(now));
        let Some(due) = due else {
            lock(&self.inner.fresh_until).insert(key.clone(), DateTime::<Utc>::MAX_UTC);
            return Ok(Freshness::Unmanaged);
        };
        if now < due && !forced {
            lock(&self.inner.fresh_until).insert(key.clone(), due);
            return Ok(Freshness::Fresh);
        }
        let expiry = record.tokens.token_expiry;
        let backoff = lock(&self.inner.backoff).get(key).copied();
        if let Some(backoff) = backoff
            && Instant::now() < backoff.retry_at
        {
            return self.not_refreshed(key, expiry, None);
        }
        // Checked above: due is Some only with a refresh token.
        let Some(refresh_token) = record.tokens.refresh_token.clone() else {
            return Ok(Freshness::Unmanaged);
        };
        // Across instances: only the one whose claim bumps the version sends a request.
        let Some(version) = self
            .inner
            .credentials
            .claim_refresh(&key.user, &key.server, record.info.version, lease(provider))
            .await?
        else {
            return self.wait_for_other_refresh(key, provider, expiry).await;
        };
        let mut last_error = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(crate::backoff::full_jitter(
                    RETRY_BASE,
                    RETRY_CAP,
                    attempt - 1,
                ))
                .await;
            }
            match provider.refresh(&refresh_token).await {
                Ok(tokens) => return self.store_refreshed(key, version, tokens).await,
                Err(OAuthError::InvalidGrant) => {
                    return self.on_invalid_grant(key, version).await;
                }
                Err(err) if err.is_transient() => {
                    tracing::warn!(
                        user_id = %key.user, server = %key.server, attempt, cause = %err,
                        "Token refresh failed; retrying"
                    );
                    last_error = Some(err);
                }
                Err(err) => {
                    tracing::error!(
                        user_id = %key.user, server = %key.server, cause = %err,
                        "The token endpoint refused to refresh; credentials kept"
                    );
                    last_error = Some(err);
                    break;
                }
            }
        }
        // Nothing written: let the next check (here or elsewhere) claim again without waiting
        // for the lease.
        if let Err(err) = self
            .inner
            .credentials
            .release_refresh(&key.user, &key.server, version)
            .await
        {
            tracing::warn!(cause = %err, "could not release the refresh claim; it lapses by itself");
        }
        self.not_refreshed(key, expiry, last_error)
    }

    /// Another instance claimed the refresh: poll the row until its tokens are fresh, for at
    /// most as long as that instance's own attempts may take. If it never writes (it died, or
    /// the provider failed it too) this check gives up like a failed refresh, and the next one
    /// claims the row again at its current version.
    async fn wait_for_other_refresh(
        &self,
        key: &SessionKey,
        provider: &Provider,
        expiry: Option<DateTime<Utc>>,
    ) -> Result<Freshness, CredentialError> {
        let lease = lease(provider);
        let deadline = Instant::now() + lease;
        let store = self.inner.credentials.store();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let Some(record) = store.get(&key.user, &key.server).await? else {
                return Ok(Freshness::Unmanaged);
            };
            if refresh_due(&record.tokens, provider.refresh_before())
                .is_none_or(|due| Utc::now() < due)
            {
                return self.adopt_stored(key).await;
            }
        }
        self.not_refreshed(key, expiry, Some(OAuthError::Timeout(lease)))
    }

    /// The refresh did not happen: keep using a token that has not expired yet, otherwise
    /// report why. Starts (or extends) the key's cool-down.
    fn not_refreshed(
        &self,
        key: &SessionKey,
        expiry: Option<DateTime<Utc>>,
        error: Option<OAuthError>,
    ) -> Result<Freshness, CredentialError> {
        if let Some(error) = &error {
            let mut backoffs = lock(&self.inner.backoff);
            let failures = backoffs.get(key).map_or(0, |b| b.failures) + 1;
            let base = self
                .provider(&key.server)
                .map_or(Duration::from_secs(1), |p| p.cooldown());
            let wait = base
                .saturating_mul(2u32.saturating_pow((failures - 1).min(16)))
                .min(base.saturating_mul(COOL_DOWN_CAP_FACTOR));
            backoffs.insert(
                key.clone(),
                Backoff {
                    failures,
                    retry_at: Instant::now() + wait,
                },
            );
            tracing::warn!(
                user_id = %key.user, server = %key.server, failures, retry_in = ?wait, cause = %error,
                "Access token not refreshed; credentials kept"
            );
        }
        if expiry.is_some_and(|e| e > Utc::now()) {
            return Ok(Freshness::Stale);
        }
        match error {
            Some(OAuthError::Rejected { .. }) | Some(OAuthError::Malformed(_)) => {
                Err(CredentialError::RefreshRejected(key.server.clone()))
            }
            _ => Err(CredentialError::RefreshUnavailable(key.server.clone())),
        }
    }

    async fn store_refreshed(
        &self,
        key: &SessionKey,
        version: i64,
        tokens: TokenResponse,
    ) -> Result<Freshness, CredentialError> {
        let rotated = tokens.refresh_token.is_some();
        let update = TokenUpdate {
            access_token: Some(tokens.access_token),
            // None keeps the stored refresh token (the provider did not rotate it).
            refresh_token: tokens.refresh_token,
            token_expiry: Some(tokens.expires_at),
        };
        match self
            .inner
            .credentials
            .update(&key.user, &key.server, Some(version), update)
            .await
        {
            Ok(info) => {
                lock(&self.inner.backoff).remove(key);
                self.remember_expiry(key, info.token_expiry);
                tracing::info!(
                    user_id = %key.user, server = %key.server, version = info.version, rotated,
                    "Refreshed the access token"
                );
                Ok(Freshness::Refreshed)
            }
            Err(CredentialError::Store(StoreError::Conflict { .. })) => {
                tracing::info!(
                    user_id = %key.user, server = %key.server,
                    "Tokens were written concurrently; using the stored ones"
                );
                self.adopt_stored(key).await
            }
            Err(CredentialError::NotFound(_)) => Ok(Freshness::Unmanaged),
            Err(other) => Err(other),
        }
    }

    /// Another writer won: use its tokens, and rewrite this instance's credentials file from
    /// the row (the winner may have written only its own).
    async fn adopt_stored(&self, key: &SessionKey) -> Result<Freshness, CredentialError> {
        let store = self.inner.credentials.store();
        let Some(record) = store.get(&key.user, &key.server).await? else {
            return Ok(Freshness::Unmanaged);
        };
        self.inner
            .credentials
            .prepare_file(&key.user, &key.server)
            .await?;
        lock(&self.inner.backoff).remove(key);
        self.remember_expiry(key, record.tokens.token_expiry);
        Ok(Freshness::RefreshedElsewhere)
    }

    /// The grant is gone: deactivate the credentials and answer "reconnect required" (the
    /// pool closes the session on that answer).
    async fn on_invalid_grant(
        &self,
        key: &SessionKey,
        version: i64,
    ) -> Result<Freshness, CredentialError> {
        lock(&self.inner.fresh_until).remove(key);
        lock(&self.inner.backoff).remove(key);
        let marked = self
            .inner
            .credentials
            .require_reconnect(&key.user, &key.server, version)
            .await?;
        if !marked {
            // Rotated away by a concurrent winner, or replaced by a reconnect: not revoked.
            return self.adopt_stored(key).await;
        }
        tracing::warn!(
            user_id = %key.user, server = %key.server,
            "The provider rejected the refresh token (invalid_grant); credentials deactivated, reconnect required"
        );
        Err(CredentialError::ReconnectRequired(key.server.clone()))
    }

    fn remember_expiry(&self, key: &SessionKey, expiry: Option<DateTime<Utc>>) {
        let refresh_before = self
            .provider(&key.server)
            .map_or(Duration::ZERO, |p| p.refresh_before());
        let until = expiry.map_or(DateTime::<Utc>::MAX_UTC, |e| {
            e.checked_sub_signed(chrono_duration(refresh_before))
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
        });
        lock(&self.inner.fresh_until).insert(key.clone(), until);
    }
}

/// How long a refresh claim holds off other instances: the claimer's worst case (every attempt
/// timing out, plus the backoff between them).
fn lease(provider: &Provider) -> Duration {
    provider.timeout().saturating_add(RETRY_CAP) * ATTEMPTS
}
