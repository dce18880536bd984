//! The `TokenRefreshActor`: refreshes the OAuth tokens of live sessions in the background.
//!
//! Every tick it lists the pool's ready sessions of servers with a token endpoint and has the
//! pool check each ([`PoolHandle::refresh_now`]: the refresher's `check_now`, then a restart or
//! close as the outcome requires), in a task of its own so the mailbox never waits for a token
//! endpoint. The refresher's per-key single flight makes this safe next to tool calls and
//! session starts checking the same key. Errors are logged; the handler never fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::connection::SessionState;
use super::pool::{PoolError, PoolHandle};
use crate::oauth::Freshness;

/// Why a sweep on request could not run. (A failed refresh of one session is no sweep
/// failure: it is logged, and the sweep goes on with the next.)
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("the token refresh actor is not running")]
    Unavailable,
    #[error("cannot list the pool's sessions: {0}")]
    Pool(#[from] PoolError),
}

/// Messages of the [`TokenRefreshActor`]; use [`TokenRefreshHandle`].
pub enum RefreshMsg {
    /// Sent to itself every interval.
    Tick,
    /// Sweep now; replies with how many sessions got new tokens.
    Sweep {
        reply: RpcReplyPort<Result<usize, SweepError>>,
    },
}

pub struct RefreshArgs {
    /// The pool, whose refresher (`PoolHandle::refresher`) knows the providers.
    pub pool: PoolHandle,
    /// `None`: no ticks (sweeps only on request).
    pub interval: Option<Duration>,
}

pub struct RefreshState {
    pool: PoolHandle,
    /// Set while a tick's sweep runs, so a slow token endpoint never stacks sweeps.
    sweeping: Arc<AtomicBool>,
}

/// See the module docs.
pub struct TokenRefreshActor;

impl Actor for TokenRefreshActor {
    type Msg = RefreshMsg;
    type State = RefreshState;
    type Arguments = RefreshArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RefreshMsg>,
        args: RefreshArgs,
    ) -> Result<RefreshState, ActorProcessingErr> {
        if let Some(interval) = args.interval {
            myself.send_interval(interval, || RefreshMsg::Tick);
        }
        Ok(RefreshState {
            pool: args.pool,
            sweeping: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<RefreshMsg>,
        message: RefreshMsg,
        state: &mut RefreshState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RefreshMsg::Tick => {
                if state.sweeping.swap(true, Ordering::SeqCst) {
                    return Ok(());
                }
                let (pool, sweeping) = (state.pool.clone(), state.sweeping.clone());
                tokio::spawn(async move {
                    if let Err(err) = sweep(&pool).await {
                        tracing::warn!(cause = %err, "token refresh sweep skipped");
                    }
                    sweeping.store(false, Ordering::SeqCst);
                });
            }
            RefreshMsg::Sweep { reply } => {
                let pool = state.pool.clone();
                tokio::spawn(async move {
                    let _ = reply.send(sweep(&pool).await);
                });
            }
        }
        Ok(())
    }
}

/// Checks every ready session of a managed server; returns how many were refreshed.
async fn sweep(pool: &PoolHandle) -> Result<usize, SweepError> {
    let Some(refresher) = pool.refresher() else {
        return Ok(0);
    };
    let stats = pool.stats().await?;
    let mut refreshed = 0;
    for conn in stats.connections {
        if conn.state != SessionState::Ready || !refresher.manages(&conn.server) {
            continue;
        }
        match pool.refresh_now(&conn.user_id, &conn.server).await {
            Ok(Freshness::Refreshed | Freshness::RefreshedElsewhere) => refreshed += 1,
            Ok(_) => {}
            Err(err) => tracing::warn!(
                user_id = %conn.user_id, server = %conn.server, cause = %err,
                "Background token refresh failed"
            ),
        }
    }
    Ok(refreshed)
}

/// Typed handle to the [`TokenRefreshActor`].
#[derive(Clone)]
pub struct TokenRefreshHandle {
    actor: ActorRef<RefreshMsg>,
}

impl TokenRefreshHandle {
    /// Spawns the actor, unsupervised: its handlers never fail (see the module docs).
    pub async fn spawn(args: RefreshArgs) -> Result<TokenRefreshHandle, ractor::SpawnErr> {
        let (actor, _) = Actor::spawn(None, TokenRefreshActor, args).await?;
        Ok(TokenRefreshHandle { actor })
    }

    /// The sweep interval for a shortest `refresh_before`: a fifth of it, between 1 s and 60 s,
    /// so a token is looked at several times before it is due.
    pub fn interval_for(min_refresh_before: Duration) -> Duration {
        (min_refresh_before / 5).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Runs one sweep now; returns how many sessions got new tokens.
    pub async fn sweep_now(&self) -> Result<usize, SweepError> {
        match self
            .actor
            .call(|reply| RefreshMsg::Sweep { reply }, None)
            .await
        {
            Ok(ractor::rpc::CallResult::Success(result)) => result,
            _ => Err(SweepError::Unavailable),
        }
    }

    /// Stops the ticks (a sweep already running finishes on its own).
    pub async fn stop(&self) {
        let _ = self
            .actor
            .stop_and_wait(None, Some(Duration::from_secs(5)))
            .await;
    }
}
