//! The `HeartbeatActor` of cluster mode: keeps this node's membership row and leases alive,
//! and acts on what it learns (see `crate::cluster` for the design).
//!
//! It ticks twice per `cluster.heartbeat_interval`:
//! - every tick, the **fence**: leases whose local deadline passed (no renewal was sent for
//!   `ttl − heartbeat_interval`, e.g. PostgreSQL is unreachable) are dropped and their
//!   sessions closed at once, before the database could let another node take them (calls
//!   already refuse them: `PoolHandle` checks the deadline before every use);
//! - every other tick, a **beat** in a task of its own (a stalled database never blocks the
//!   mailbox, so the fence keeps running): membership row and lease renewal in one statement,
//!   then sessions whose lease was lost are closed, leases of closed sessions released, and
//!   idle sessions that now hash to another node closed (busy ones on a later beat).
//!
//! Its handlers never fail; it is not supervised (like the token refresh actor).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::connection::CloseReason;
use super::pool::PoolHandle;
use crate::cluster::{BeatReport, Cluster, ClusterError};

/// Messages of the [`HeartbeatActor`]; use [`HeartbeatHandle`].
pub enum HeartbeatMsg {
    /// Sent to itself every half heartbeat interval.
    Tick,
}

pub struct HeartbeatArgs {
    pub cluster: Arc<Cluster>,
    pub pool: PoolHandle,
}

pub struct HeartbeatState {
    cluster: Arc<Cluster>,
    pool: PoolHandle,
    ticks: u64,
    /// Set while a beat runs, so a slow database never stacks beats.
    beating: Arc<AtomicBool>,
    /// Whether the last beat failed (to log the change, not every failure).
    failing: Arc<AtomicBool>,
}

/// See the module docs.
pub struct HeartbeatActor;

impl Actor for HeartbeatActor {
    type Msg = HeartbeatMsg;
    type State = HeartbeatState;
    type Arguments = HeartbeatArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<HeartbeatMsg>,
        args: HeartbeatArgs,
    ) -> Result<HeartbeatState, ActorProcessingErr> {
        myself.send_interval(args.cluster.heartbeat_interval() / 2, || HeartbeatMsg::Tick);
        Ok(HeartbeatState {
            cluster: args.cluster,
            pool: args.pool,
            ticks: 0,
            beating: Arc::new(AtomicBool::new(false)),
            failing: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<HeartbeatMsg>,
        message: HeartbeatMsg,
        state: &mut HeartbeatState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            HeartbeatMsg::Tick => {
                state.ticks += 1;
                fence(&state.cluster, &state.pool);
                if state.ticks.is_multiple_of(2) && !state.beating.swap(true, Ordering::SeqCst) {
                    let (cluster, pool) = (state.cluster.clone(), state.pool.clone());
                    let (beating, failing) = (state.beating.clone(), state.failing.clone());
                    let prune = state.ticks.is_multiple_of(600);
                    tokio::spawn(async move {
                        match beat(&cluster, &pool).await {
                            Ok(()) => {
                                if failing.swap(false, Ordering::SeqCst) {
                                    tracing::info!("Cluster heartbeat restored");
                                }
                            }
                            Err(err) => {
                                if !failing.swap(true, Ordering::SeqCst) {
                                    tracing::warn!(cause = %err, "Cluster heartbeat failed; sessions stop being used at their lease's local deadline");
                                }
                            }
                        }
                        if prune && let Err(err) = cluster.prune().await {
                            tracing::debug!(cause = %err, "could not prune dead nodes");
                        }
                        beating.store(false, Ordering::SeqCst);
                    });
                }
            }
        }
        Ok(())
    }
}

/// Drops the leases past their local deadline and closes their sessions now.
fn fence(cluster: &Arc<Cluster>, pool: &PoolHandle) {
    let expired = cluster.expired_leases();
    if expired.is_empty() {
        return;
    }
    tracing::warn!(
        count = expired.len(),
        "Leases could not be renewed in time: closing their sessions before they expire"
    );
    let pool = pool.clone();
    tokio::spawn(async move {
        if let Err(err) = pool.close_now(expired, CloseReason::LeaseLost).await {
            tracing::warn!(cause = %err, "could not close sessions after losing their leases");
        }
    });
}

async fn beat(cluster: &Arc<Cluster>, pool: &PoolHandle) -> Result<(), ClusterError> {
    // The pool restarting (an error) renews anyway, with nothing to release.
    let live = pool.live_keys().await.unwrap_or_default();
    let BeatReport {
        lost,
        stray,
        membership_changed: _,
    } = cluster.beat(&live).await?;
    if !lost.is_empty() {
        tracing::warn!(
            count = lost.len(),
            "Leases were taken over by another node: closing their sessions"
        );
        if let Err(err) = pool.close_now(lost, CloseReason::LeaseLost).await {
            tracing::warn!(cause = %err, "could not close sessions whose leases were lost");
        }
    }
    for (key, epoch) in stray {
        let released = cluster
            .release_unless(&key, epoch, async {
                // When unsure, keep the lease: it expires on its own if nobody renews it.
                pool.has_session(&key).await.unwrap_or(true)
            })
            .await?;
        if released {
            tracing::debug!(user_id = %key.user, server = %key.server, "Released the lease of a closed session");
        }
    }
    // Every beat, not only after a join: a session that was busy moves once it is idle.
    let misplaced = cluster.misplaced();
    if !misplaced.is_empty() {
        match pool.close_idle(misplaced, CloseReason::Rebalance).await {
            Ok(moved) if moved.is_empty() => {}
            Ok(moved) => {
                // Not used here any more; released by a later beat once the process is gone.
                cluster.mark_moving(&moved);
                tracing::info!(
                    moved = moved.len(),
                    "Closed idle sessions that now belong on another node"
                );
            }
            Err(err) => tracing::warn!(cause = %err, "could not rebalance sessions"),
        }
    }
    Ok(())
}

/// Typed handle to the [`HeartbeatActor`].
#[derive(Clone)]
pub struct HeartbeatHandle {
    actor: ActorRef<HeartbeatMsg>,
}

impl HeartbeatHandle {
    /// Spawns the actor, unsupervised: its handlers never fail.
    pub async fn spawn(args: HeartbeatArgs) -> Result<HeartbeatHandle, ractor::SpawnErr> {
        let (actor, _) = Actor::spawn(None, HeartbeatActor, args).await?;
        Ok(HeartbeatHandle { actor })
    }

    /// Stops the ticks (a beat already running finishes on its own).
    pub async fn stop(&self) {
        let _ = self
            .actor
            .stop_and_wait(None, Some(Duration::from_secs(5)))
            .await;
    }
}
