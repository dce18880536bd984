//! `/openapi.json`: an OpenAPI 3.1 description of every route, built by hand with `json!` (a
//! derive-based generator would add a proc-macro dependency for one static document). The
//! integration tests check that every routed path is listed here.

use axum::Json;
use serde_json::{Value, json};

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    })
}

fn json_response(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

fn server_param() -> Value {
    json!({
        "name": "server", "in": "path", "required": true,
        "description": "A configured server name: [a-z0-9][a-z0-9_-]{0,99}",
        "schema": { "type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,99}$" }
    })
}

fn user_header() -> Value {
    json!({
        "name": "X-User-Id", "in": "header", "required": false,
        "description": "The acting user (api_key mode only; ignored in jwt mode)",
        "schema": { "type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$" }
    })
}

/// Error responses every authenticated user route can give.
fn user_errors() -> Value {
    json!({
        "400": { "$ref": "#/components/responses/BadRequest" },
        "401": { "$ref": "#/components/responses/Unauthorized" },
        "403": { "$ref": "#/components/responses/Forbidden" },
        "404": { "$ref": "#/components/responses/NotFound" }
    })
}

fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
    base
}

/// The document.
pub fn spec() -> Value {
    let pool_errors = json!({
        "409": error_response("`reconnect_required`: the OAuth grant was revoked or expired; the credentials were deactivated, connect again"),
        "413": error_response("Body larger than http.max_body_bytes"),
        "429": error_response("Pool full (Retry-After)"),
        "502": error_response("The MCP server failed or crashed (`retry_safe` tells whether a retry is safe), or `token_refresh_failed`"),
        "503": error_response("Circuit open, shutting down, or `token_refresh_unavailable` (Retry-After)"),
        "504": error_response("Tool call or request timeout")
    });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "mcp-pool",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Persistent per-user MCP sessions for a chat backend. The user comes from authentication only."
        },
        "security": [ { "bearer": [] } ],
        "paths": {
            "/v1/connections": {
                "get": {
                    "summary": "The caller's connections with live session state",
                    "parameters": [ user_header() ],
                    "responses": merge(json!({
                        "200": json_response("Connections", json!({
                            "type": "object",
                            "properties": { "connections": { "type": "array", "items": { "$ref": "#/components/schemas/Connection" } } }
                        }))
                    }), user_errors())
                }
            },
            "/v1/connections/warm": {
                "post": {
                    "summary": "Start the caller's sessions in the background (all active servers, or the ones named) and answer at once",
                    "parameters": [ user_header() ],
                    "requestBody": { "required": false, "content": { "application/json": { "schema": {
                        "type": "object", "additionalProperties": false, "required": ["servers"],
                        "properties": { "servers": { "type": "array", "items": { "type": "string", "pattern": "^[a-z0-9_-]{1,100}$" } } }
                    } } } },
                    "responses": merge(json!({
                        "202": json_response("Starts begun", json!({
                            "type": "object",
                            "properties": {
                                "warming": { "type": "array", "items": { "type": "object", "properties": {
                                    "server": { "type": "string" },
                                    "state": { "type": "string", "enum": ["ready", "starting", "started"] }
                                } } },
                                "skipped": { "type": "array", "items": { "type": "object", "properties": {
                                    "server": { "type": "string" }, "code": { "type": "string" }, "message": { "type": "string" }
                                } } }
                            }
                        })),
                        "413": error_response("Body too large")
                    }), user_errors())
                }
            },
            "/v1/connections/{server}": {
                "parameters": [ server_param(), user_header() ],
                "put": {
                    "summary": "Store credentials for the caller (replacing closes the live session)",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/PutConnection" } } } },
                    "responses": merge(json!({
                        "200": json_response("Replaced", json!({ "$ref": "#/components/schemas/Connection" })),
                        "201": json_response("Created", json!({ "$ref": "#/components/schemas/Connection" })),
                        "413": error_response("Body too large")
                    }), user_errors())
                },
                "get": {
                    "summary": "One connection with live session state",
                    "responses": merge(json!({
                        "200": json_response("Connection", json!({ "$ref": "#/components/schemas/Connection" }))
                    }), user_errors())
                },
                "delete": {
                    "summary": "Deactivate the credentials and close the session",
                    "parameters": [ {
                        "name": "purge", "in": "query", "required": false,
                        "description": "Delete the row and the credentials file instead of deactivating",
                        "schema": { "type": "boolean", "default": false }
                    } ],
                    "responses": merge(json!({
                        "200": json_response("Removed", json!({
                            "type": "object",
                            "properties": {
                                "server": { "type": "string" }, "deactivated": { "type": "boolean" },
                                "purged": { "type": "boolean" }, "session_closed": { "type": "boolean" }
                            }
                        }))
                    }), user_errors())
                }
            },
            "/v1/connections/{server}/tools": {
                "parameters": [ server_param(), user_header() ],
                "get": {
                    "summary": "The server's tools (starts the session if needed)",
                    "responses": merge(merge(json!({
                        "200": json_response("Tools", json!({
                            "type": "object",
                            "properties": {
                                "server": { "type": "string" },
                                "tools": { "type": "array", "items": { "$ref": "#/components/schemas/Tool" } }
                            }
                        }))
                    }), user_errors()), pool_errors.clone())
                }
            },
            "/v1/connections/{server}/tools/{tool}/call": {
                "parameters": [
                    server_param(),
                    { "name": "tool", "in": "path", "required": true, "schema": { "type": "string" } },
                    user_header()
                ],
                "post": {
                    "summary": "Call a tool; the body is the arguments object",
                    "requestBody": { "required": false, "content": { "application/json": { "schema": { "type": "object", "additionalProperties": true } } } },
                    "responses": merge(merge(json!({
                        "200": json_response("The MCP result", json!({ "$ref": "#/components/schemas/CallResult" }))
                    }), user_errors()), pool_errors.clone())
                }
            },
            "/v1/oauth/{server}/start": {
                "parameters": [ server_param(), user_header() ],
                "post": {
                    "summary": "Start the OAuth connect flow: the URL of the provider's consent page (PKCE S256, single-use state valid 10 minutes)",
                    "responses": merge(json!({
                        "200": json_response("Authorization URL", json!({
                            "type": "object",
                            "required": ["server", "authorization_url", "expires_at"],
                            "properties": {
                                "server": { "type": "string" },
                                "authorization_url": { "type": "string", "format": "uri" },
                                "expires_at": { "type": "string", "format": "date-time" }
                            }
                        }))
                    }), user_errors())
                }
            },
            "/v1/oauth/{server}/callback": {
                "parameters": [ server_param() ],
                "get": {
                    "summary": "The provider's redirect target (register it as the OAuth client's redirect URI). Unauthenticated: the single-use state is the proof.",
                    "security": [],
                    "parameters": [
                        { "name": "code", "in": "query", "required": false, "schema": { "type": "string" } },
                        { "name": "state", "in": "query", "required": false, "schema": { "type": "string" } },
                        { "name": "error", "in": "query", "required": false, "schema": { "type": "string" }, "description": "Set by the provider instead of code, e.g. access_denied" }
                    ],
                    "responses": {
                        "303": {
                            "description": "To success_redirect?connected={server}, or to error_redirect?error=<code>&server={server} with code one of invalid_state, state_expired, access_denied, provider_error, invalid_request, token_exchange_failed, provider_unavailable, internal",
                            "headers": { "Location": { "schema": { "type": "string", "format": "uri" } } }
                        },
                        "404": { "$ref": "#/components/responses/NotFound" }
                    }
                }
            },
            "/v1/chat": {
                "post": {
                    "summary": "Chat with an LLM that may call the caller's tools",
                    "parameters": [ user_header() ],
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ChatRequest" } } } },
                    "responses": merge(json!({
                        "200": {
                            "description": "The final reply and a trace of tool calls; with `stream: true`, server-sent events (tool call started/finished, text deltas, done)",
                            "content": {
                                "application/json": { "schema": { "$ref": "#/components/schemas/ChatResponse" } },
                                "text/event-stream": { "schema": { "type": "string" } }
                            }
                        },
                        "502": error_response("The LLM endpoint failed")
                    }), user_errors())
                }
            },
            "/v1/stats": {
                "get": {
                    "summary": "Pool stats (admin key)",
                    "security": [ { "admin": [] } ],
                    "responses": {
                        "200": json_response("Stats", json!({ "$ref": "#/components/schemas/PoolStats" })),
                        "401": { "$ref": "#/components/responses/Unauthorized" },
                        "403": { "$ref": "#/components/responses/Forbidden" }
                    }
                }
            },
            "/v1/admin/users/{user}/connections": {
                "delete": {
                    "summary": "Close all of a user's sessions (admin key)",
                    "security": [ { "admin": [] } ],
                    "parameters": [ { "name": "user", "in": "path", "required": true, "schema": { "type": "string" } } ],
                    "responses": {
                        "200": json_response("Closed", json!({
                            "type": "object",
                            "properties": { "user_id": { "type": "string" }, "closed": { "type": "integer" } }
                        })),
                        "400": { "$ref": "#/components/responses/BadRequest" },
                        "401": { "$ref": "#/components/responses/Unauthorized" },
                        "403": { "$ref": "#/components/responses/Forbidden" }
                    }
                }
            },
            "/v1/admin/credentials/cleanup": {
                "post": {
                    "summary": "Delete credentials inactive for longer than `inactive_for` (admin key)",
                    "security": [ { "admin": [] } ],
                    "requestBody": { "required": true, "content": { "application/json": { "schema": {
                        "type": "object",
                        "properties": { "inactive_for": { "type": "string", "examples": ["30d"] } },
                        "additionalProperties": false
                    } } } },
                    "responses": {
                        "200": json_response("Deleted", json!({
                            "type": "object",
                            "properties": { "deleted": { "type": "integer" }, "inactive_for": { "type": "string" } }
                        })),
                        "400": { "$ref": "#/components/responses/BadRequest" },
                        "401": { "$ref": "#/components/responses/Unauthorized" },
                        "403": { "$ref": "#/components/responses/Forbidden" }
                    }
                }
            },
            "/healthz": {
                "get": { "summary": "The process answers", "security": [],
                         "responses": { "200": json_response("OK", json!({ "type": "object" })) } }
            },
            "/readyz": {
                "get": { "summary": "Database reachable and not shutting down", "security": [],
                         "responses": {
                             "200": json_response("Ready", json!({ "type": "object" })),
                             "503": json_response("Not ready", json!({ "type": "object" }))
                         } }
            },
            "/metrics": {
                "get": { "summary": "Prometheus metrics (OpenMetrics text); no user ids", "security": [],
                         "responses": { "200": { "description": "Metrics", "content": { "application/openmetrics-text": { "schema": { "type": "string" } } } } } }
            },
            "/openapi.json": {
                "get": { "summary": "This document", "security": [],
                         "responses": { "200": json_response("OpenAPI 3.1", json!({ "type": "object" })) } }
            }
        },
        "components": {
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer", "description": "api_key mode: the service key plus X-User-Id; jwt mode: the user's token (`sub` is the user)" },
                "admin": { "type": "http", "scheme": "bearer", "description": "The admin key" }
            },
            "responses": {
                "BadRequest": error_response("Bad input: malformed JSON, wrong types, invalid identifiers"),
                "Unauthorized": error_response("Missing or invalid credentials"),
                "Forbidden": error_response("Authenticated but not allowed"),
                "NotFound": error_response("Unknown server or tool, or no credentials stored for the server")
            },
            "schemas": {
                "Error": {
                    "type": "object", "required": ["error"],
                    "properties": { "error": {
                        "type": "object", "required": ["code", "message"],
                        "properties": {
                            "code": { "type": "string" }, "message": { "type": "string" },
                            "retry_safe": { "type": "boolean" }, "retry_after_secs": { "type": "integer" }
                        }
                    } }
                },
                "PutConnection": {
                    "type": "object", "additionalProperties": false,
                    "properties": {
                        "access_token": { "type": "string" }, "refresh_token": { "type": "string" },
                        "token_expiry": { "type": "string", "format": "date-time" },
                        "client_id": { "type": "string" }
                    }
                },
                "Connection": {
                    "type": "object",
                    "properties": {
                        "server": { "type": "string" },
                        "state": { "enum": ["starting", "ready", "restarting", "failed", "closed"] },
                        "tool_count": { "type": "integer" },
                        "last_used": { "type": ["string", "null"], "format": "date-time" },
                        "started_at": { "type": ["string", "null"], "format": "date-time" },
                        "restarts": { "type": "integer" },
                        "has_access_token": { "type": "boolean" }, "has_refresh_token": { "type": "boolean" },
                        "token_expiry": { "type": ["string", "null"], "format": "date-time" },
                        "created_at": { "type": "string", "format": "date-time" },
                        "updated_at": { "type": "string", "format": "date-time" }
                    }
                },
                "Tool": {
                    "type": "object", "required": ["name", "input_schema"],
                    "properties": {
                        "name": { "type": "string" }, "title": { "type": "string" }, "description": { "type": "string" },
                        "input_schema": { "type": "object" }, "output_schema": { "type": "object" }, "annotations": { "type": "object" }
                    }
                },
                "CallResult": {
                    "type": "object", "required": ["content", "is_error", "duration_ms"],
                    "properties": {
                        "content": { "type": "array", "items": { "type": "object" } },
                        "is_error": { "type": "boolean" },
                        "structured_content": {},
                        "duration_ms": { "type": "integer" }
                    }
                },
                "ChatRequest": {
                    "type": "object", "required": ["message"],
                    "properties": {
                        "message": { "type": "string" },
                        "history": { "type": "array", "items": { "type": "object", "properties": { "role": { "type": "string" }, "content": { "type": "string" } } } },
                        "servers": { "type": "array", "items": { "type": "string" } },
                        "stream": { "type": "boolean", "default": false }
                    }
                },
                "ChatResponse": {
                    "type": "object",
                    "properties": {
                        "reply": { "type": "string" },
                        "tool_calls": { "type": "array", "items": { "type": "object", "properties": {
                            "server": { "type": "string" }, "tool": { "type": "string" }, "arguments": { "type": "object" },
                            "is_error": { "type": "boolean" }, "duration_ms": { "type": "integer" }
                        } } }
                    }
                },
                "PoolStats": {
                    "type": "object",
                    "properties": {
                        "total_connections": { "type": "integer" }, "active_connections": { "type": "integer" },
                        "user_breakdown": { "type": "object", "additionalProperties": { "type": "integer" } },
                        "connections": { "type": "array", "items": { "type": "object" } },
                        "counters": { "type": "object" }
                    }
                }
            }
        }
    })
}

/// `GET /openapi.json`.
pub async fn document() -> Json<Value> {
    Json(spec())
}
