//! Cluster mode: many mcp-pool nodes on one PostgreSQL, at most one live session per
//! (user, server) across all of them.
//!
//! - **Membership**: every node writes a `cluster_nodes` row (a fresh node id at every start,
//!   its advertised `node_url`) and refreshes it every `heartbeat_interval`; a node silent for
//!   `ttl` is dead.
//! - **Leases**: before a session starts here, the key's `session_leases` row is taken in one
//!   statement ([`Store::cluster_acquire`]); the heartbeat renews every lease of the node in the
//!   same statement as its membership row; a closed session's lease is released (expired) by the
//!   heartbeat's reconciliation. All expiries use the database's clock.
//! - **Local deadline**: a lease is used here only until `sent + ttl − heartbeat_interval`,
//!   where `sent` is when the last statement that extended it was *sent*. The database cannot
//!   have expired it before then, whatever the network did, so a node cut off from PostgreSQL
//!   stops using its sessions before any other node can take them.
//! - **Placement** ([`Cluster::route`]): a key held here is served here; otherwise an existing
//!   live lease wins; otherwise rendezvous hashing of the user over the live nodes (so a user's
//!   servers sit together for chat).
//! - **Forwarding** ([`Cluster::forward`]): to `<node_url>/internal/v1/...`, authenticated by
//!   the cluster secret ([`INTERNAL_SECRET_HEADER`]), carrying the already-verified user. A
//!   forwarded request is always served where it lands, never forwarded again.
//!
//! The [`crate::actors::heartbeat`] actor drives the periodic work; `PoolHandle` is the only
//! caller of placement and forwarding, so REST, chat and `/mcp` all get them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::time::Instant;

use crate::config::Placement;
use crate::ids::{ServerName, SessionKey, UserId};
use crate::mcp::{Progress, ProgressSink};
use crate::store::{Secret, SessionKeyRow, Store, StoreError};

/// Header carrying the cluster secret on internal routes. Never a user's key: the public
/// authentication ignores it, and the internal routes accept nothing else.
pub const INTERNAL_SECRET_HEADER: &str = "x-mcp-pool-cluster-secret";
/// Header naming the node that forwarded a request (for logs; loops are prevented by the route
/// itself: internal routes serve locally).
pub const FORWARDED_BY_HEADER: &str = "x-mcp-pool-forwarded-by";
/// Stripes of the per-key locks that order a lease's take against its release.
const KEY_LOCKS: usize = 512;

/// Why cluster coordination failed. Never carries the secret.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster coordination database: {0}")]
    Database(#[from] StoreError),
    #[error("cluster coordination database did not answer within {0:?}")]
    Timeout(Duration),
    /// A forwarded request found the key's lease held by another node (placement changed
    /// between the two nodes' views): the forwarding node looks again.
    #[error("the session of this key lives on another node")]
    LeasedElsewhere(Node),
    /// The owner node did not answer (connection refused or reset before the request was
    /// written) for longer than a failover takes.
    #[error("the node holding this session cannot be reached; retry")]
    OwnerUnreachable,
    /// The connection to the owner broke after the request was sent: a tool call may have run.
    #[error("the node holding this session failed during the request; it may or may not have run")]
    OwnerLost,
    /// This node is shutting down and takes no new sessions.
    #[error("this node is leaving the cluster")]
    Leaving,
    /// The key's session here was closed to move to another node, which takes it over once
    /// its lease is released (within a heartbeat of the process's end).
    #[error("the session of this key is moving to another node")]
    Moving,
    #[error("malformed answer from another node: {0}")]
    BadAnswer(String),
}

impl ClusterError {
    /// The stable error code callers see.
    pub fn code(&self) -> &'static str {
        match self {
            ClusterError::Database(_) | ClusterError::Timeout(_) => "cluster_unavailable",
            ClusterError::LeasedElsewhere(_) | ClusterError::Moving => "session_moved",
            ClusterError::OwnerUnreachable | ClusterError::Leaving => "owner_unreachable",
            ClusterError::OwnerLost => "owner_lost",
            ClusterError::BadAnswer(_) => "cluster_protocol_error",
        }
    }
}

/// An error answered by the node a request was forwarded to, as its HTTP error body said it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
    pub retry_safe: Option<bool>,
}

/// A node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: String,
    /// Its advertised internal URL, without a trailing `/`.
    pub url: String,
}

/// Where a key's work happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Local,
    Remote(Node),
}

/// What one forward attempt came to.
#[derive(Debug)]
pub enum ForwardError {
    /// The request was never written (connection refused, DNS, connect timeout): safe to retry.
    NotSent,
    /// Written, then the connection failed or timed out: the work may have happened.
    Lost,
    /// The other node answered with an error.
    Answered(RemoteError),
    /// It answered something that is not the protocol.
    Malformed(String),
}

/// What a heartbeat found.
#[derive(Debug, Default)]
pub struct BeatReport {
    /// Leases this node held that the database no longer gives it: close these sessions now.
    pub lost: Vec<SessionKey>,
    /// Leases of keys with no session here: release each with [`Cluster::release_unless`].
    pub stray: Vec<(SessionKey, i64)>,
    /// Whether the set of live nodes changed.
    pub membership_changed: bool,
}

/// `[cluster]` as the node uses it.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub node_url: String,
    pub secret: Secret,
    pub heartbeat_interval: Duration,
    pub ttl: Duration,
    /// Upper bound of one forwarded request (a cold start plus a call).
    pub forward_timeout: Duration,
    /// Where a key without a live lease starts.
    pub placement: Placement,
    /// The longest a closing session's process may take to end (EOF, grace, SIGTERM, grace,
    /// SIGKILL): a moving key's lease is released only after it.
    pub session_close: Duration,
    /// How long a node stays in the balancer after SIGTERM (`http.shutdown_delay`): its keys
    /// move only after it, so a request for one of them may wait that long too.
    pub drain: Duration,
}

/// A lease held here.
#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: i64,
    /// When the last statement that extended it (its take, or a renewal that returned it) was
    /// sent: the database set its expiry to that statement's `now() + ttl`, which is later.
    extended_sent: Instant,
    /// When its take returned. A heartbeat sent before then may not see the row (its snapshot
    /// predates the take's commit), so it must not call the lease lost.
    taken: Instant,
    /// Its session was closed to move to the node the key now hashes to: no longer used
    /// here, released once the process is gone.
    moving: bool,
    /// Requests for it that arrived forwarded, in a row (`receiver` placement moves a key
    /// whose traffic arrives at another node).
    forwarded_in_a_row: u32,
}

/// `receiver` placement: an idle session whose last this many requests all arrived forwarded
/// from other nodes moves (its users' traffic now reaches another node first). More than one,
/// so a stray request does not move a session.
const FORWARDED_BEFORE_MOVE: u32 = 3;

#[derive(Default)]
struct Shared {
    held: HashMap<SessionKey, Held>,
    /// Live nodes that take new keys, this one included unless it is leaving.
    live: Vec<Node>,
    /// Owners recently looked up, valid for one heartbeat interval.
    owners: HashMap<SessionKey, (Node, Instant)>,
    leaving: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Forwarding, as `/metrics` exports it and `/v1/stats` counts it.
struct ForwardingMetrics {
    /// Requests forwarded to other nodes, by what came back: `answered` (a result),
    /// `error` (an error the owner answered), `not_sent`, `lost` or `malformed`.
    forwarded: Family<OutcomeLabel, Counter>,
    served_for_peers: Counter,
    /// Round trip of forwarded requests, the owner's work included.
    duration: Histogram,
}

impl ForwardingMetrics {
    fn new() -> ForwardingMetrics {
        ForwardingMetrics {
            forwarded: Family::default(),
            served_for_peers: Counter::default(),
            // 0.5 ms to about 33 s: a warm hop on loopback up to a forwarded cold start.
            duration: Histogram::new(exponential_buckets(0.0005, 2.0, 17)),
        }
    }

    fn forwarded_total(&self) -> u64 {
        ["answered", "error", "not_sent", "lost", "malformed"]
            .into_iter()
            .map(|outcome| {
                self.forwarded
                    .get_or_create(&OutcomeLabel { outcome })
                    .get()
            })
            .sum()
    }
}

/// This node's view of the cluster. Shared (`Arc`) by the pool handles, the heartbeat actor
/// and the internal routes.
pub struct Cluster {
    store: Store,
    node: Node,
    settings: ClusterSettings,
    http: reqwest::Client,
    shared: Mutex<Shared>,
    key_locks: Vec<tokio::sync::Mutex<()>>,
    metrics: ForwardingMetrics,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Rendezvous (highest random weight) score of `user` on `node`: stable across nodes and
/// restarts of the caller, and when a node joins or leaves only the users whose top node
/// changed move.
fn score(node_id: &str, user: &UserId) -> u64 {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    hasher.update(node_id.as_bytes());
    hasher.update([0]);
    hasher.update(user.as_str().as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The node `user` hashes to among `nodes` (ties broken by id, so every node agrees).
pub fn rendezvous<'a>(user: &UserId, nodes: &'a [Node]) -> Option<&'a Node> {
    nodes
        .iter()
        .max_by(|a, b| (score(&a.id, user), &a.id).cmp(&(score(&b.id, user), &b.id)))
}

impl Cluster {
    /// Joins the cluster: a fresh node id, its membership row, the current live nodes.
    pub async fn join(
        store: Store,
        settings: ClusterSettings,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let node = Node {
            id: uuid::Uuid::new_v4().simple().to_string(),
            url: settings.node_url.trim_end_matches('/').to_owned(),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(settings.forward_timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|err| ClusterError::BadAnswer(format!("HTTP client: {err}")))?;
        let cluster = Cluster {
            store,
            node,
            settings,
            http,
            shared: Mutex::new(Shared::default()),
            key_locks: (0..KEY_LOCKS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            metrics: ForwardingMetrics::new(),
        };
        cluster
            .bounded(
                cluster
                    .store
                    .cluster_join(&cluster.node.id, &cluster.node.url),
            )
            .await?;
        cluster.refresh_membership().await?;
        tracing::info!(node_id = %cluster.node.id, url = %cluster.node.url, "Joined the cluster");
        Ok(Arc::new(cluster))
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn heartbeat_interval(&self) -> Duration {
        self.settings.heartbeat_interval
    }

    /// Whether `presented` is the cluster secret, compared in constant time.
    pub fn secret_matches(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        let expected = self.settings.secret.expose().as_bytes();
        // Lengths are not secret (every node's secret has the same, public, format).
        expected.len() == presented.len() && bool::from(expected.ct_eq(presented.as_bytes()))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Statements are bounded by the TTL: a stalled database fails a request rather than
    /// holding it. Safety never depends on this bound: a lease's local deadline counts from
    /// when its statement was *sent*, however long the answer took.
    async fn bounded<T>(
        &self,
        statement: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, ClusterError> {
        self.bounded_by(self.settings.ttl, statement).await
    }

    async fn bounded_by<T>(
        &self,
        limit: Duration,
        statement: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, ClusterError> {
        match tokio::time::timeout(limit, statement).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(ClusterError::Timeout(limit)),
        }
    }

    /// How long a lease may be used after the statement that extended it was sent: the TTL
    /// minus one heartbeat interval, so the fence (checked twice per interval) closes the
    /// session before the database could let another node take the key.
    fn usable_for(&self) -> Duration {
        self.settings.ttl - self.settings.heartbeat_interval
    }

    /// Whether this node holds `key`'s lease and may still use it.
    pub fn holds(&self, key: &SessionKey) -> bool {
        let usable = self.usable_for();
        self.state()
            .held
            .get(key)
            .is_some_and(|held| !held.moving && held.extended_sent.elapsed() < usable)
    }

    /// Marks `keys` as moving to another node (their sessions here were closed to rebalance):
    /// requests go to the node they hash to, which takes each lease once it is released.
    pub fn mark_moving(&self, keys: &[SessionKey]) {
        let mut state = self.state();
        for key in keys {
            if let Some(held) = state.held.get_mut(key) {
                held.moving = true;
            }
        }
    }

    /// The lock ordering a lease's take (and the start that follows) against its release.
    pub async fn lock_key(&self, key: &SessionKey) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        let stripe = usize::try_from(hasher.finish() % KEY_LOCKS as u64).unwrap_or(0);
        self.key_locks[stripe].lock().await
    }

    /// Live nodes (this one included unless leaving).
    pub fn live_nodes(&self) -> Vec<Node> {
        self.state().live.clone()
    }

    /// Where `key`'s work happens, for a request that arrived from a client (a forwarded one is
    /// always served locally). See the module docs for the rules.
    pub async fn route(&self, key: &SessionKey) -> Result<Route, ClusterError> {
        if self.holds(key) {
            return Ok(Route::Local);
        }
        let (target, cached) = {
            let state = self.state();
            let cached = state
                .owners
                .get(key)
                .filter(|(_, until)| Instant::now() < *until)
                .map(|(node, _)| node.clone());
            (rendezvous(&key.user, &state.live).cloned(), cached)
        };
        if let Some(owner) = cached {
            return Ok(Route::Remote(owner));
        }
        // Hashed here: the take of the lease (`ensure_lease`) also says who holds it otherwise.
        let receiver = self.settings.placement == Placement::Receiver;
        if !receiver && target.as_ref().is_some_and(|t| t.id == self.node.id) {
            return Ok(Route::Local);
        }
        let ttl = self.settings.ttl;
        let lease = self.bounded(self.store.cluster_lease(key, ttl)).await?;
        match lease {
            // Ours but not usable here (moving away, or past the local deadline): the node the
            // key hashes to takes it over once it is released or expired.
            Some(lease) if lease.owner_node == self.node.id => match target {
                Some(target) if !receiver && target.id != self.node.id => Ok(Route::Remote(target)),
                _ => Ok(Route::Local),
            },
            Some(lease) => {
                let owner = Node {
                    id: lease.owner_node,
                    url: lease.url.unwrap_or_default(),
                };
                self.remember_owner(key, &owner);
                Ok(Route::Remote(owner))
            }
            None if receiver && !self.state().leaving => Ok(Route::Local),
            None => match target {
                Some(target) => Ok(Route::Remote(target)),
                // No live node takes new keys (this one is leaving and no other is up).
                None => Err(ClusterError::Leaving),
            },
        }
    }

    /// The other live node holding `key`'s lease, if any (`None`: held here, or by nobody).
    pub async fn owner_elsewhere(&self, key: &SessionKey) -> Result<Option<Node>, ClusterError> {
        if self.holds(key) {
            return Ok(None);
        }
        let lease = self
            .bounded(self.store.cluster_lease(key, self.settings.ttl))
            .await?;
        Ok(lease
            .filter(|lease| lease.owner_node != self.node.id)
            .map(|lease| Node {
                id: lease.owner_node,
                url: lease.url.unwrap_or_default(),
            }))
    }

    fn remember_owner(&self, key: &SessionKey, owner: &Node) {
        let until = Instant::now() + self.settings.heartbeat_interval;
        self.state()
            .owners
            .insert(key.clone(), (owner.clone(), until));
    }

    /// Forgets a looked-up owner (it did not answer, or said the key moved).
    pub fn forget_owner(&self, key: &SessionKey) {
        self.state().owners.remove(key);
    }

    /// Makes sure this node holds `key`'s lease before a session of it starts or is used here:
    /// nothing to do if held; otherwise takes it in one statement. Call with [`lock_key`] held.
    ///
    /// [`lock_key`]: Cluster::lock_key
    pub async fn ensure_lease(&self, key: &SessionKey) -> Result<(), ClusterError> {
        if self.holds(key) {
            return Ok(());
        }
        // Closed here to move: not taken again here until released (the request's sender
        // looks again after a pause, and by then the node it belongs to can take it).
        if self.state().held.get(key).is_some_and(|held| held.moving) {
            return Err(ClusterError::Moving);
        }
        let ttl = self.settings.ttl;
        for _ in 0..3 {
            let sent = Instant::now();
            let taken = self
                .bounded(self.store.cluster_acquire(key, &self.node.id, ttl))
                .await?;
            let Some(lease) = taken else {
                // A concurrent first take committed after this statement's snapshot.
                continue;
            };
            if lease.owner_node == self.node.id {
                self.state().held.insert(
                    key.clone(),
                    Held {
                        epoch: lease.epoch,
                        extended_sent: sent,
                        taken: Instant::now(),
                        moving: false,
                        forwarded_in_a_row: 0,
                    },
                );
                tracing::debug!(user_id = %key.user, server = %key.server, epoch = lease.epoch, "Took the session lease");
                return Ok(());
            }
            let owner = Node {
                id: lease.owner_node,
                url: lease.url.unwrap_or_default(),
            };
            self.remember_owner(key, &owner);
            return Err(ClusterError::LeasedElsewhere(owner));
        }
        Err(ClusterError::Timeout(self.settings.heartbeat_interval))
    }

    /// Leases whose local deadline passed: dropped here (the caller closes their sessions).
    pub fn expired_leases(&self) -> Vec<SessionKey> {
        let usable = self.usable_for();
        let mut state = self.state();
        let expired: Vec<SessionKey> = state
            .held
            .iter()
            .filter(|(_, held)| held.extended_sent.elapsed() >= usable)
            .map(|(key, _)| key.clone())
            .collect();
        for key in &expired {
            state.held.remove(key);
        }
        expired
    }

    /// Held keys that belong on another node: with `rendezvous` placement those whose user now
    /// hashes elsewhere (after a join); with `receiver` placement those whose requests keep
    /// arriving forwarded from other nodes; with either, all of them while leaving.
    pub fn misplaced(&self) -> Vec<SessionKey> {
        let state = self.state();
        let receiver = self.settings.placement == Placement::Receiver;
        state
            .held
            .iter()
            .filter(|(key, held)| {
                !held.moving
                    && (state.leaving
                        || if receiver {
                            held.forwarded_in_a_row >= FORWARDED_BEFORE_MOVE
                        } else {
                            rendezvous(&key.user, &state.live)
                                .is_none_or(|node| node.id != self.node.id)
                        })
            })
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Records how a request for `key` that was served here arrived.
    pub fn note_arrival(&self, key: &SessionKey, forwarded: bool) {
        if forwarded {
            self.metrics.served_for_peers.inc();
        }
        let mut state = self.state();
        if let Some(held) = state.held.get_mut(key) {
            held.forwarded_in_a_row = if forwarded {
                held.forwarded_in_a_row.saturating_add(1)
            } else {
                0
            };
        }
    }

    /// `(forwarded to other nodes, served here for other nodes)` since start.
    pub fn forwarding_counts(&self) -> (u64, u64) {
        (
            self.metrics.forwarded_total(),
            self.metrics.served_for_peers.get(),
        )
    }

    /// Adds the forwarding families to `registry` (`/metrics`).
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "cluster_forwarded",
            "Requests forwarded to the node that owns their session, by outcome (answered, \
             error, not_sent, lost, malformed)",
            self.metrics.forwarded.clone(),
        );
        registry.register(
            "cluster_served_for_peers",
            "Requests served here that other nodes forwarded",
            self.metrics.served_for_peers.clone(),
        );
        registry.register_with_unit(
            "cluster_forward_duration",
            "Round trip of forwarded requests as the forwarding node sees it, the owner's work \
             included",
            Unit::Seconds,
            self.metrics.duration.clone(),
        );
    }

    async fn refresh_membership(&self) -> Result<bool, ClusterError> {
        let rows = self
            .bounded(self.store.cluster_live_nodes(self.settings.ttl))
            .await?;
        let mut live: Vec<Node> = rows
            .into_iter()
            .map(|row| Node {
                id: row.node_id,
                url: row.url,
            })
            .collect();
        let mut state = self.state();
        if state.leaving {
            live.retain(|node| node.id != self.node.id);
        } else if !live.iter().any(|node| node.id == self.node.id) {
            live.push(self.node.clone());
        }
        live.sort_by(|a, b| a.id.cmp(&b.id));
        let changed = live != state.live;
        if changed {
            tracing::info!(nodes = live.len(), "Cluster membership changed");
        }
        state.live = live;
        Ok(changed)
    }

    /// One heartbeat: membership row and lease renewal in one statement, then reconciliation:
    /// leases held here that the database no longer gives us are lost; leases of keys with no
    /// session here (`live_keys` is the pool's view, closing sessions included) are released.
    pub async fn beat(&self, live_keys: &HashSet<SessionKey>) -> Result<BeatReport, ClusterError> {
        let sent = Instant::now();
        // A renewal that answers after its leases' local deadline is of no use.
        let renewed = self
            .bounded_by(
                self.usable_for(),
                self.store
                    .cluster_beat(&self.node.id, &self.node.url, self.settings.ttl),
            )
            .await?;
        let renewed: HashMap<SessionKeyRow, i64> = renewed.into_iter().collect();
        let mut report = BeatReport::default();
        let mut stray: Vec<(SessionKey, i64)> = Vec::new();
        {
            let mut state = self.state();
            let now = Instant::now();
            state.owners.retain(|_, (_, until)| *until > now);
            let mut lost = Vec::new();
            for (key, held) in state.held.iter_mut() {
                let row = SessionKeyRow {
                    user: key.user.as_str().to_owned(),
                    server: key.server.as_str().to_owned(),
                };
                match renewed.get(&row) {
                    Some(epoch) if *epoch == held.epoch => held.extended_sent = sent,
                    // Taken (or taken again) after this beat was sent: the beat's snapshot may
                    // predate the take's commit.
                    _ if held.taken > sent => {}
                    _ => lost.push(key.clone()),
                }
            }
            for key in &lost {
                state.held.remove(key);
            }
            report.lost = lost;
            // Renewed rows this node does not hold (a release that failed, a lease taken by a
            // request whose start then failed): released below unless a session needs them.
            for (row, epoch) in &renewed {
                let (Ok(user), Ok(server)) =
                    (UserId::parse(&row.user), ServerName::parse(&row.server))
                else {
                    continue;
                };
                let key = SessionKey::new(&user, &server);
                if !state.held.contains_key(&key) {
                    stray.push((key, *epoch));
                }
            }
            for (key, held) in &state.held {
                if !live_keys.contains(key) {
                    stray.push((key.clone(), held.epoch));
                }
            }
        }
        report.stray = stray;
        report.membership_changed = self.refresh_membership().await?;
        Ok(report)
    }

    /// Releases `key`'s lease at `epoch` unless `live` finds a session of it here. Runs
    /// under the key's lock, which a request holds from taking the lease until the pool has
    /// registered the start: so either `live` sees that start, or the start takes a new lease.
    pub async fn release_unless(
        &self,
        key: &SessionKey,
        epoch: i64,
        live: impl Future<Output = bool>,
    ) -> Result<bool, ClusterError> {
        let _guard = self.lock_key(key).await;
        // Futures are lazy: `live` asks the pool only now, under the lock.
        if live.await {
            return Ok(false);
        }
        {
            let mut state = self.state();
            match state.held.get(key) {
                Some(held) if held.epoch != epoch => return Ok(false),
                _ => {}
            }
            state.held.remove(key);
        }
        let released = self
            .bounded(self.store.cluster_release(key, &self.node.id, epoch))
            .await?;
        if released {
            tracing::debug!(user_id = %key.user, server = %key.server, epoch, "Released the session lease");
        }
        Ok(released)
    }

    /// Drops the local claim on `key` (its session is being closed because the lease was lost).
    pub fn drop_lease(&self, key: &SessionKey) {
        self.state().held.remove(key);
    }

    /// Starts draining: no new keys are placed here (other nodes see it on their next beat),
    /// leases held still count until [`Cluster::leave`].
    pub async fn begin_leaving(&self) -> Result<(), ClusterError> {
        {
            let mut state = self.state();
            state.leaving = true;
            let own = self.node.id.clone();
            state.live.retain(|node| node.id != own);
        }
        self.bounded(self.store.cluster_set_leaving(&self.node.id))
            .await
    }

    pub fn is_leaving(&self) -> bool {
        self.state().leaving
    }

    /// The end of a clean shutdown (after every session closed): releases every lease of this
    /// node and removes its membership row.
    pub async fn leave(&self) -> Result<u64, ClusterError> {
        self.state().held.clear();
        let released = self
            .bounded(self.store.cluster_leave(&self.node.id))
            .await?;
        tracing::info!(released, "Left the cluster");
        Ok(released)
    }

    /// Forgets nodes silent for a long time (crashed nodes never remove their own row).
    pub async fn prune(&self) -> Result<u64, ClusterError> {
        self.bounded(self.store.cluster_prune(self.settings.ttl * 60))
            .await
    }

    /// How long a caller keeps retrying an owner that does not answer, or a key that is moving:
    /// long enough for a dead owner's leases to expire, or a moving session's process to end
    /// and its lease to be released, and another node to take over.
    pub fn failover_wait(&self) -> Duration {
        // Twice the nominal time: a loaded node or database stretches every step, and giving
        // up early fails a call that would have succeeded (the request timeout still bounds it).
        (self.settings.ttl + self.settings.heartbeat_interval * 2 + self.settings.session_close) * 2
            + self.settings.drain
    }

    /// POSTs `body` to `node`'s internal route `path`. With `progress`, the owner answers with
    /// server-sent events and each `progress` event reaches the sink as it arrives.
    pub async fn forward(
        &self,
        node: &Node,
        path: &str,
        body: &serde_json::Value,
        progress: Option<&ProgressSink>,
    ) -> Result<serde_json::Value, ForwardError> {
        let began = std::time::Instant::now();
        let request = self.http.post(format!("{}{path}", node.url)).json(body);
        let outcome = match progress {
            None => self.send(node, request).await,
            Some(sink) => self.send_relaying_progress(node, request, sink).await,
        };
        self.metrics.duration.observe(began.elapsed().as_secs_f64());
        let label = match &outcome {
            Ok(_) => "answered",
            Err(ForwardError::Answered(_)) => "error",
            Err(ForwardError::NotSent) => "not_sent",
            Err(ForwardError::Lost) => "lost",
            Err(ForwardError::Malformed(_)) => "malformed",
        };
        self.metrics
            .forwarded
            .get_or_create(&OutcomeLabel { outcome: label })
            .inc();
        outcome
    }

    /// GETs `node`'s internal route `path`.
    pub async fn fetch(&self, node: &Node, path: &str) -> Result<serde_json::Value, ForwardError> {
        self.send(node, self.http.get(format!("{}{path}", node.url)))
            .await
    }

    async fn send(
        &self,
        node: &Node,
        request: reqwest::RequestBuilder,
    ) -> Result<serde_json::Value, ForwardError> {
        let response = self.sent(node, request).await?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        let body: serde_json::Value = response.json().await.map_err(|_| ForwardError::Lost)?;
        if status.is_success() {
            return Ok(body);
        }
        Err(remote_error(status.as_u16(), &body["error"], retry_after))
    }

    /// Like [`Cluster::send`], asking for server-sent events: `progress` events go to `sink`,
    /// the stream's last event (`result`, or `error` with the status the JSON answer would
    /// have had) is the answer. An owner that answers JSON (an error before the call began)
    /// is read as [`Cluster::send`] reads it.
    async fn send_relaying_progress(
        &self,
        node: &Node,
        request: reqwest::RequestBuilder,
        sink: &ProgressSink,
    ) -> Result<serde_json::Value, ForwardError> {
        let mut response = self
            .sent(
                node,
                request.header(reqwest::header::ACCEPT, "text/event-stream"),
            )
            .await?;
        let streamed = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("text/event-stream"));
        let status = response.status();
        if !streamed {
            let body: serde_json::Value = response.json().await.map_err(|_| ForwardError::Lost)?;
            return if status.is_success() {
                Ok(body)
            } else {
                Err(remote_error(status.as_u16(), &body["error"], None))
            };
        }
        let mut events = crate::sse::SseParser::default();
        loop {
            let chunk = response.chunk().await.map_err(|_| ForwardError::Lost)?;
            // The stream ended before its answer: the call may have run.
            let Some(chunk) = chunk else {
                return Err(ForwardError::Lost);
            };
            for event in events.push(&chunk) {
                let malformed = |err: serde_json::Error| {
                    ForwardError::Malformed(format!("`{}` event: {err}", event.name))
                };
                match event.name.as_str() {
                    "progress" => {
                        let step: Progress =
                            serde_json::from_str(&event.data).map_err(malformed)?;
                        // Lossy, like the owner's own sink: a full sink misses a step.
                        let _ = sink.try_send(step);
                    }
                    "result" => return serde_json::from_str(&event.data).map_err(malformed),
                    "error" => {
                        let data: serde_json::Value =
                            serde_json::from_str(&event.data).map_err(malformed)?;
                        let status = data["status"].as_u64().unwrap_or(502);
                        return Err(remote_error(
                            u16::try_from(status).unwrap_or(502),
                            &data["error"],
                            data["error"]["retry_after_secs"]
                                .as_u64()
                                .map(Duration::from_secs),
                        ));
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends `request` with the cluster's headers; maps a failure to whether it was written.
    async fn sent(
        &self,
        node: &Node,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ForwardError> {
        if node.url.is_empty() {
            return Err(ForwardError::NotSent);
        }
        request
            .header(INTERNAL_SECRET_HEADER, self.settings.secret.expose())
            .header(FORWARDED_BY_HEADER, &self.node.id)
            .send()
            .await
            .map_err(|err| {
                let not_sent = err.is_connect();
                // Never log the request itself: it carries the secret header.
                tracing::debug!(node = %node.id, cause = %err.without_url(), "forwarding failed");
                if not_sent {
                    ForwardError::NotSent
                } else {
                    ForwardError::Lost
                }
            })
    }
}

/// The error another node answered, from its error body's `error` object.
fn remote_error(
    status: u16,
    detail: &serde_json::Value,
    retry_after: Option<Duration>,
) -> ForwardError {
    let Some(code) = detail["code"].as_str() else {
        return ForwardError::Malformed(format!("status {status} without an error code"));
    };
    ForwardError::Answered(RemoteError {
        status,
        code: intern_code(code),
        message: detail["message"].as_str().unwrap_or_default().to_owned(),
        retry_after,
        retry_safe: detail["retry_safe"].as_bool(),
    })
}

/// Error codes are `&'static str` everywhere (metrics labels, the error body). Codes from
/// another node are few and come from the same code base over an authenticated route; they
/// are interned once each, with a cap so a misbehaving peer cannot grow the set.
fn intern_code(code: &str) -> &'static str {
    static CODES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut codes = CODES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(known) = codes.iter().find(|known| **known == code) {
        return known;
    }
    let valid = !code.is_empty()
        && code.len() <= 64
        && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    if !valid || codes.len() >= 256 {
        return "remote_error";
    }
    let leaked: &'static str = Box::leak(code.to_owned().into_boxed_str());
    codes.push(leaked);
    leaked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: &[&str]) -> Vec<Node> {
        ids.iter()
            .map(|id| Node {
                id: (*id).to_owned(),
                url: format!("http://{id}"),
            })
            .collect()
    }

    #[test]
    fn rendezvous_moves_only_the_users_of_a_joining_node() {
        let three = nodes(&["a", "b", "c"]);
        let four = nodes(&["a", "b", "c", "d"]);
        let users: Vec<UserId> = (0..2000)
            .map(|i| UserId::parse(&format!("user-{i}")).unwrap())
            .collect();
        let mut moved = 0;
        let mut per_node = HashMap::new();
        for user in &users {
            let before = rendezvous(user, &three).unwrap();
            let after = rendezvous(user, &four).unwrap();
            *per_node.entry(before.id.clone()).or_insert(0) += 1;
            if before != after {
                moved += 1;
                // A user only ever moves to the new node.
                assert_eq!(after.id, "d");
            }
        }
        // About a quarter move; every node gets a fair share.
        assert!((300..700).contains(&moved), "{moved} moved");
        assert!(
            per_node.values().all(|n| (500..850).contains(n)),
            "{per_node:?}"
        );
        // Order of the list does not matter.
        let shuffled = nodes(&["c", "a", "b"]);
        for user in users.iter().take(100) {
            assert_eq!(rendezvous(user, &three), rendezvous(user, &shuffled));
        }
        assert!(rendezvous(&users[0], &[]).is_none());
    }

    #[test]
    fn codes_are_interned_and_bounded() {
        assert_eq!(intern_code("pool_full"), "pool_full");
        assert!(std::ptr::eq(
            intern_code("pool_full"),
            intern_code("pool_full")
        ));
        assert_eq!(intern_code("Bad Code"), "remote_error");
        assert_eq!(intern_code(""), "remote_error");
    }
}
