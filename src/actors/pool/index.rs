//! [`PoolIndex`]: the ready sessions, readable by every handle without the supervisor.

use std::collections::HashMap;
use std::sync::Arc;

use crate::actors::connection::{Session, SessionShared, SessionState};
use crate::ids::SessionKey;

/// Ready connections by key, readable without the supervisor: a warm `get_session` is a
/// read lock and a hash lookup rather than a mailbox round trip. Only the supervisor writes it;
/// a fresh supervisor starts it empty.
#[derive(Clone, Default)]
pub struct PoolIndex(Arc<std::sync::RwLock<HashMap<SessionKey, Arc<SessionShared>>>>);

impl PoolIndex {
    pub(super) fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<SessionKey, Arc<SessionShared>>> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, HashMap<SessionKey, Arc<SessionShared>>> {
        self.0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Forgets every connection (their supervisor is gone).
    pub(crate) fn clear(&self) {
        self.write().clear();
    }

    /// The connection of `key` if it is ready now.
    pub(super) fn ready(&self, key: &SessionKey) -> Option<Session> {
        let shared = self.read().get(key)?.clone();
        if shared.state() != SessionState::Ready {
            return None;
        }
        let client = shared.client()?;
        Some(Session::new(shared, client))
    }
}
