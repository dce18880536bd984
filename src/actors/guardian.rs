//! The `PoolGuardian`: the root of the pool's actor tree. It supervises the
//! [`PoolSupervisor`] and the [`ReaperActor`], and brings either back if it fails.
//!
//! When the pool supervisor fails, ractor kills its linked `ConnectionActor`s without running
//! their cleanup; the guardian then SIGKILLs every process group recorded in the
//! [`ProcessRegistry`](crate::mcp::ProcessRegistry), so no server outlives its session, and
//! starts a fresh, empty supervisor. Handles read the current supervisor from a shared slot,
//! so callers never hold a dead reference.
//!
//! When the guardian itself gives up (too many failures in its window) it fails: the
//! [`PoolTree::ended`] future resolves, and the application shuts down and exits non-zero so
//! that systemd or Kubernetes restarts the process. Until then `PoolHandle::is_available`
//! reports the pool as unavailable (and `/readyz` with it).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::pool::{PoolArgs, PoolHandle, PoolMsg, PoolSupervisor};
use super::reaper::{ReaperActor, ReaperArgs};
use crate::backoff::FailureWindow;

/// More supervisor failures than this within [`GUARDIAN_WINDOW`] stop the guardian: something
/// is systematically wrong and the process should exit rather than spin.
const GUARDIAN_MAX_RESTARTS: usize = 5;
const GUARDIAN_WINDOW: Duration = Duration::from_secs(60);

pub enum GuardianMsg {
    /// The handle to the pool (used once, right after spawning).
    Handle(RpcReplyPort<PoolHandle>),
}

pub struct GuardianState {
    args: PoolArgs,
    slot: Arc<RwLock<ActorRef<PoolMsg>>>,
    reaper: ActorRef<super::reaper::ReaperMsg>,
    failures: FailureWindow,
}

/// See the module docs.
pub struct PoolGuardian;

/// The running pool tree: the handle callers use, the guardian at its root, and the guardian's
/// task, which ends only when the guardian stops (on purpose) or gives up.
pub struct PoolTree {
    pub pool: PoolHandle,
    pub guardian: ActorRef<GuardianMsg>,
    /// Resolves when the guardian's task ends. Kept rather than dropped: outside shutdown, its
    /// end means the pool is gone for good, and the process must not keep running without it.
    pub ended: tokio::task::JoinHandle<()>,
}

impl PoolGuardian {
    /// Spawns the guardian and the tree under it.
    pub async fn start(args: PoolArgs) -> Result<PoolTree, ractor::SpawnErr> {
        let (guardian, ended) = Actor::spawn(None, PoolGuardian, args).await?;
        let handle = guardian
            .call(GuardianMsg::Handle, None)
            .await
            .ok()
            .and_then(|result| match result {
                ractor::rpc::CallResult::Success(handle) => Some(handle),
                _ => None,
            })
            .ok_or_else(|| {
                ractor::SpawnErr::StartupFailed("pool guardian did not answer".into())
            })?;
        Ok(PoolTree {
            pool: handle,
            guardian,
            ended,
        })
    }
}

async fn spawn_pool(
    args: &PoolArgs,
    guardian: &ActorRef<GuardianMsg>,
) -> Result<ActorRef<PoolMsg>, ractor::SpawnErr> {
    let (pool, _) =
        Actor::spawn_linked(None, PoolSupervisor, args.clone(), guardian.get_cell()).await?;
    Ok(pool)
}

async fn spawn_reaper(
    args: &PoolArgs,
    handle: PoolHandle,
    guardian: &ActorRef<GuardianMsg>,
) -> Result<ActorRef<super::reaper::ReaperMsg>, ractor::SpawnErr> {
    let reaper_args = ReaperArgs {
        pool: handle,
        interval: args.pool.reap_interval,
    };
    let (reaper, _) =
        Actor::spawn_linked(None, ReaperActor, reaper_args, guardian.get_cell()).await?;
    Ok(reaper)
}

impl Actor for PoolGuardian {
    type Msg = GuardianMsg;
    type State = GuardianState;
    type Arguments = PoolArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<GuardianMsg>,
        args: PoolArgs,
    ) -> Result<GuardianState, ActorProcessingErr> {
        let pool = spawn_pool(&args, &myself).await?;
        let slot = Arc::new(RwLock::new(pool));
        let reaper = spawn_reaper(
            &args,
            PoolHandle::new(slot.clone(), &args, myself.get_cell()),
            &myself,
        )
        .await?;
        Ok(GuardianState {
            args,
            slot,
            reaper,
            failures: FailureWindow::new(GUARDIAN_WINDOW),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<GuardianMsg>,
        message: GuardianMsg,
        state: &mut GuardianState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            GuardianMsg::Handle(reply) => {
                let _ = reply.send(PoolHandle::new(
                    state.slot.clone(),
                    &state.args,
                    myself.get_cell(),
                ));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<GuardianMsg>,
        event: SupervisionEvent,
        state: &mut GuardianState,
    ) -> Result<(), ActorProcessingErr> {
        // Overridden: ractor's default would stop the guardian with its child. A supervisor
        // that stops is as gone as one that fails (the pool only stops when the guardian does).
        let (cell, err) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        let failures = state.failures.record();
        if failures > GUARDIAN_MAX_RESTARTS {
            tracing::error!(
                "pool tree failed {failures} times within {GUARDIAN_WINDOW:?}; giving up"
            );
            // Nothing will serve the pool's sessions any more: kill their servers now rather
            // than leave them to the application's shutdown (which does it again, harmlessly).
            state.args.index.clear();
            if let Some(registry) = &state.args.registry {
                registry.reap_leftovers();
            }
            return Err(format!("pool tree keeps failing: {err}").into());
        }
        if cell.get_id() == state.reaper.get_id() {
            tracing::error!(cause = %err, "reaper failed; restarting it");
            state.reaper = spawn_reaper(
                &state.args,
                PoolHandle::new(state.slot.clone(), &state.args, myself.get_cell()),
                &myself,
            )
            .await?;
            return Ok(());
        }
        let current = state
            .slot
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get_id();
        if cell.get_id() != current {
            return Ok(());
        }
        tracing::error!(cause = %err, "pool supervisor failed; killing its servers and restarting it");
        // Handles must stop handing out the dead supervisor's connections at once.
        state.args.index.clear();
        if let Some(registry) = &state.args.registry {
            let killed = registry.reap_leftovers();
            tracing::warn!(killed, "killed process groups of the failed pool");
        }
        let pool = spawn_pool(&state.args, &myself).await?;
        *state
            .slot
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = pool;
        Ok(())
    }
}
