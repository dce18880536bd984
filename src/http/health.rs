//! Probes: `/healthz` (the process answers) and `/readyz` (pool running, database reachable,
//! not shutting down).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::HttpState;
use super::openapi::ErrorBody;

/// A 503 of `/readyz`: the probe's own body, or the connection cap's error body.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // a schema only
pub enum ProbeOrError {
    Probe(Probe),
    Error(ErrorBody),
}

/// A database that does not answer within this is as good as down for readiness.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Body of the probes.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Probe {
    /// `ok` (healthz), `ready`, or why not: `shutting_down`, `database_unreachable`.
    pub status: ProbeStatus,
}

#[derive(Debug, Clone, Copy, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProbeStatus {
    Ok,
    Ready,
    ShuttingDown,
    DatabaseUnreachable,
    /// The pool tree is down (between a supervisor's failure and its replacement, or for good
    /// once its guardian gave up).
    PoolUnavailable,
}

/// `GET /healthz`: the process answers.
#[utoipa::path(
    get, path = "/healthz", operation_id = "healthz", tag = "meta", security(()),
    responses(
        (status = 200, description = "The process answers", body = Probe),
        (status = 503, description = "`too_many_connections`", body = ErrorBody, headers(("Retry-After" = u64))),
    )
)]
pub async fn healthz() -> Json<Probe> {
    Json(Probe {
        status: ProbeStatus::Ok,
    })
}

/// `GET /readyz`: the pool runs, the database answers and shutdown has not begun.
#[utoipa::path(
    get, path = "/readyz", operation_id = "readyz", tag = "meta", security(()),
    responses(
        (status = 200, description = "Ready", body = Probe),
        (status = 503, description = "Not ready (`pool_unavailable`, `shutting_down`, `database_unreachable`), or the `too_many_connections` error body", body = inline(ProbeOrError)),
    )
)]
pub async fn readyz(State(state): State<HttpState>) -> (StatusCode, Json<Probe>) {
    let unready = |status: ProbeStatus| (StatusCode::SERVICE_UNAVAILABLE, Json(Probe { status }));
    // Checked first: a pool that was given up also starts a shutdown, and the probe should say
    // which of the two it is.
    if !state.pool.is_available() {
        return unready(ProbeStatus::PoolUnavailable);
    }
    if state.is_shutting_down() {
        return unready(ProbeStatus::ShuttingDown);
    }
    match tokio::time::timeout(PING_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => (
            StatusCode::OK,
            Json(Probe {
                status: ProbeStatus::Ready,
            }),
        ),
        Ok(Err(err)) => {
            tracing::warn!(cause = %err, "readiness: database ping failed");
            unready(ProbeStatus::DatabaseUnreachable)
        }
        Err(_) => {
            tracing::warn!("readiness: database ping timed out");
            unready(ProbeStatus::DatabaseUnreachable)
        }
    }
}
