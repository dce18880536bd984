//! Fairness between users: a bound on the tool calls one user may have in flight at once
//! (`pool.max_in_flight_per_user`), and the nesting bound of tool arguments.
//!
//! The count is taken in [`PoolHandle::call_tool`](super::PoolHandle::call_tool) before the
//! connection is looked up, so it covers every caller of the pool (REST and chat alike) and a
//! refused call costs no mailbox round trip. Other users' calls never touch a user's count.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::store::UserId;

/// Tool arguments nested deeper than this (objects and arrays; the arguments object itself is
/// level 1) are refused before they reach a server. Well below the 128 levels at which
/// serde_json (ours, and the servers' own parsers after JSON-RPC wrapping) gives up, so a
/// server never silently drops a message we sent.
pub const MAX_ARGUMENT_DEPTH: usize = 64;

/// How deeply `value` nests objects and arrays (a scalar is 0, `{}` is 1). Iterative, so a
/// hostile value cannot exhaust the stack.
pub fn json_depth(value: &serde_json::Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 1usize)];
    while let Some((value, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &serde_json::Value>> = match value {
            serde_json::Value::Object(map) => Box::new(map.values()),
            serde_json::Value::Array(items) => Box::new(items.iter()),
            _ => continue,
        };
        deepest = deepest.max(depth);
        stack.extend(children.map(|child| (child, depth + 1)));
    }
    deepest
}

/// Depth of an arguments object (`None` counts as `{}`).
pub fn arguments_depth(arguments: Option<&serde_json::Map<String, serde_json::Value>>) -> usize {
    arguments.map_or(1, |map| 1 + map.values().map(json_depth).max().unwrap_or(0))
}

/// Counts calls in flight per user. Cheap to clone (shared counts).
#[derive(Clone, Debug)]
pub struct UserCallLimiter {
    max: usize,
    counts: Arc<Mutex<HashMap<UserId, usize>>>,
}

/// One call's place in its user's count; dropping it frees the place.
#[derive(Debug)]
pub struct CallPermit {
    limiter: UserCallLimiter,
    user: UserId,
}

impl UserCallLimiter {
    pub fn new(max: usize) -> UserCallLimiter {
        UserCallLimiter {
            max,
            counts: Arc::default(),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, usize>> {
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A place for one more call of `user`, or `None` when they already have `max` in flight.
    pub fn try_acquire(&self, user: &UserId) -> Option<CallPermit> {
        let mut counts = self.counts();
        let count = counts.entry(user.clone()).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(CallPermit {
            limiter: self.clone(),
            user: user.clone(),
        })
    }

    /// Calls of `user` in flight now.
    pub fn in_flight(&self, user: &UserId) -> usize {
        self.counts().get(user).copied().unwrap_or(0)
    }
}

impl Drop for CallPermit {
    fn drop(&mut self) {
        let mut counts = self.limiter.counts();
        if let Some(count) = counts.get_mut(&self.user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn depth_counts_objects_and_arrays() {
        assert_eq!(json_depth(&json!(1)), 0);
        assert_eq!(json_depth(&json!({})), 1);
        assert_eq!(json_depth(&json!({"a": [1, {"b": []}]})), 4);
        assert_eq!(arguments_depth(None), 1);
        let mut nested = json!(1);
        for _ in 0..200 {
            nested = json!([nested]);
        }
        assert_eq!(json_depth(&nested), 200);
    }

    #[test]
    fn permits_are_per_user_and_freed_on_drop() {
        let limiter = UserCallLimiter::new(2);
        let (alice, bob) = (
            UserId::parse("alice").unwrap(),
            UserId::parse("bob").unwrap(),
        );
        let a1 = limiter.try_acquire(&alice).unwrap();
        let _a2 = limiter.try_acquire(&alice).unwrap();
        assert!(limiter.try_acquire(&alice).is_none());
        let _b1 = limiter
            .try_acquire(&bob)
            .expect("bob is not throttled by alice");
        drop(a1);
        assert_eq!(limiter.in_flight(&alice), 1);
        assert!(limiter.try_acquire(&alice).is_some());
    }
}
