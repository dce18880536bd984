//! One code per pool error: what a chat trace reports (`PoolError::code`) is what an HTTP error
//! body says (`ApiError::from(PoolError)`), for every variant and every cause HTTP tells apart.

use std::sync::Arc;
use std::time::Duration;

use mcp_pool::actors::{CredentialError, PoolError};
use mcp_pool::cluster::{ClusterError, RemoteError};
use mcp_pool::http::ApiError;
use mcp_pool::mcp::McpError;
use mcp_pool::store::{ServerName, StoreError};

fn every_pool_error() -> Vec<PoolError> {
    let server = ServerName::parse("demo").unwrap();
    let credential_causes = vec![
        CredentialError::UnknownServer(server.clone()),
        CredentialError::NotFound(server.clone()),
        CredentialError::Store(StoreError::NotFound),
        CredentialError::Store(StoreError::Conflict {
            expected: 1,
            actual: 2,
        }),
        CredentialError::Store(StoreError::UnsupportedUrl),
        CredentialError::File {
            path: "/x".into(),
            cause: std::io::Error::other("disk"),
        },
        CredentialError::Unavailable,
        CredentialError::ReconnectRequired(server.clone()),
        CredentialError::RefreshUnavailable(server.clone()),
        CredentialError::RefreshRejected(server.clone()),
    ];
    let server_error = |code| McpError::Server(Box::new(rmcp::ErrorData::new(code, "no", None)));
    let mcp_causes = vec![
        server_error(rmcp::model::ErrorCode::INVALID_PARAMS),
        server_error(rmcp::model::ErrorCode::METHOD_NOT_FOUND),
        server_error(rmcp::model::ErrorCode::INTERNAL_ERROR),
        McpError::Timeout(Duration::from_secs(1)),
        McpError::Closed,
        McpError::NotSent,
        McpError::StartupTimeout(Duration::from_secs(1)),
        McpError::Spawn {
            command: "x".into(),
            source: std::io::Error::other("nope"),
        },
        McpError::DemoServer("x".into()),
    ];
    let mut errors = vec![
        PoolError::UnknownServer(server.clone()),
        PoolError::NoCredentials(server.clone()),
        PoolError::PoolFull {
            retry_after: Duration::from_secs(5),
        },
        PoolError::CircuitOpen {
            retry_after: Duration::from_secs(5),
        },
        PoolError::StartFailed(Arc::new(McpError::Closed)),
        PoolError::ServerCrashed,
        PoolError::CallTimeout(Duration::from_secs(1)),
        PoolError::UnknownTool("t".into()),
        PoolError::Reconnect,
        PoolError::ShuttingDown,
        PoolError::Unavailable,
    ];
    errors.extend(
        credential_causes
            .into_iter()
            .map(|cause| PoolError::Credentials(Arc::new(cause))),
    );
    errors.extend(
        mcp_causes
            .into_iter()
            .map(|cause| PoolError::Mcp(Arc::new(cause))),
    );
    // Cluster mode: coordination failures, and an error answered by the node a request was
    // forwarded to (its code passes through).
    let node = mcp_pool::cluster::Node {
        id: "n".into(),
        url: "http://127.0.0.1:1".into(),
    };
    let cluster_causes = vec![
        ClusterError::Database(StoreError::ClusterNeedsPostgres),
        ClusterError::Timeout(Duration::from_secs(1)),
        ClusterError::LeasedElsewhere(node),
        ClusterError::OwnerUnreachable,
        ClusterError::OwnerLost,
        ClusterError::Leaving,
        ClusterError::Moving,
        ClusterError::BadAnswer("x".into()),
    ];
    errors.extend(
        cluster_causes
            .into_iter()
            .map(|cause| PoolError::Cluster(Arc::new(cause))),
    );
    errors.push(PoolError::Forwarded(Arc::new(RemoteError {
        status: 503,
        code: "pool_full",
        message: "full".into(),
        retry_after: Some(Duration::from_secs(2)),
        retry_safe: None,
    })));
    errors
}

#[test]
fn http_and_chat_report_the_same_code_for_every_pool_error() {
    let errors = every_pool_error();
    assert_eq!(errors.len(), 39, "every variant and cause is listed");
    for err in errors {
        let chat = err.code();
        let http = ApiError::from(err.clone()).code();
        assert_eq!(http, chat, "{err:?}");
    }
}

#[test]
fn a_revoked_grant_is_reconnect_required_everywhere() {
    let server = ServerName::parse("demo").unwrap();
    let err = PoolError::Credentials(Arc::new(CredentialError::ReconnectRequired(server)));
    assert_eq!(err.code(), "reconnect_required");
}
