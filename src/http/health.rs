//! Probes: `/healthz` (the process answers) and `/readyz` (pool running, database reachable,
//! not shutting down).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::HttpState;

/// A database that does not answer within this is as good as down for readiness.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

pub async fn readyz(State(state): State<HttpState>) -> (StatusCode, Json<serde_json::Value>) {
    let unready = |reason: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": reason })),
        )
    };
    // Checked first: a pool that was given up also starts a shutdown, and the probe should say
    // which of the two it is.
    if !state.pool.is_available() {
        return unready("pool_unavailable");
    }
    if state.is_shutting_down() {
        return unready("shutting_down");
    }
    match tokio::time::timeout(PING_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => (
            StatusCode::OK,
            Json(serde_json::json!({ "status": "ready" })),
        ),
        Ok(Err(err)) => {
            tracing::warn!(cause = %err, "readiness: database ping failed");
            unready("database_unreachable")
        }
        Err(_) => {
            tracing::warn!("readiness: database ping timed out");
            unready("database_unreachable")
        }
    }
}
