//! The `ReaperActor`: sends the pool an idle tick every `reap_interval`.
//!
//! It holds no state of its own, so a restart loses nothing; the pool decides what is idle.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::pool::PoolHandle;

/// The reaper's only message.
pub enum ReaperMsg {
    Tick,
}

pub struct ReaperArgs {
    pub pool: PoolHandle,
    pub interval: Duration,
}

/// See the module docs.
pub struct ReaperActor;

impl Actor for ReaperActor {
    type Msg = ReaperMsg;
    type State = PoolHandle;
    type Arguments = ReaperArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ReaperMsg>,
        args: ReaperArgs,
    ) -> Result<PoolHandle, ActorProcessingErr> {
        myself.send_interval(args.interval, || ReaperMsg::Tick);
        Ok(args.pool)
    }

    async fn handle(
        &self,
        _myself: ActorRef<ReaperMsg>,
        _message: ReaperMsg,
        pool: &mut PoolHandle,
    ) -> Result<(), ActorProcessingErr> {
        pool.request_reap();
        Ok(())
    }
}
