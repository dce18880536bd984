//! `/openapi.json`: the OpenAPI 3.1 description of every route, generated from the code with
//! utoipa. Each handler carries a `#[utoipa::path]` with its parameters, body and every status
//! it can answer; request and response types derive `ToSchema`, so a changed type or route
//! changes the document. The document served is completed for the running instance (see
//! [`spec_for`]): the `{server}` parameter lists the configured servers, and in `api_key` mode
//! every user route requires `X-User-Id`.
//!
//! `tests/fuzz_api.rs` (run by `scripts/test`) checks the live document against the live service with schemathesis.

use std::borrow::Cow;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as Document, RefOr, Required};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use super::HttpState;
use crate::actors::SessionState;
use crate::config::{AuthMode, Config};
use crate::store::{ServerName, UserId};

/// The pattern of a user id (see [`UserId::parse`]).
pub const USER_ID_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$";
/// The pattern of a server name (see [`ServerName::parse`]).
pub const SERVER_NAME_PATTERN: &str = "^[a-z0-9][a-z0-9_-]{0,99}$";

/// Security scheme of user routes (`api_key`: the service key; `jwt`: the user's token).
pub const USER_SECURITY: &str = "bearer";
/// Security scheme of admin routes.
pub const ADMIN_SECURITY: &str = "admin";

// === schemas of types defined elsewhere ===

impl PartialSchema for UserId {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .pattern(Some(USER_ID_PATTERN))
            .min_length(Some(1))
            .max_length(Some(UserId::MAX_LEN))
            .into()
    }
}

impl ToSchema for UserId {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("UserId")
    }
}

impl PartialSchema for ServerName {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .pattern(Some(SERVER_NAME_PATTERN))
            .min_length(Some(1))
            .max_length(Some(ServerName::MAX_LEN))
            .into()
    }
}

impl ToSchema for ServerName {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ServerName")
    }
}

/// Every serialized name of [`SessionState`] (the unit test below keeps this in step).
const CONN_STATES: [&str; 5] = ["starting", "ready", "restarting", "failed", "closing"];

impl PartialSchema for SessionState {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .enum_values(Some(CONN_STATES))
            .into()
    }
}

impl ToSchema for SessionState {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("SessionState")
    }
}

// === the document ===

/// The error body every error response has.
#[derive(serde::Serialize, ToSchema)]
#[schema(as = Error)]
#[allow(dead_code)] // a schema only: the body is built by `ApiError`
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(serde::Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// Machine-readable, e.g. `unknown_server`, `pool_full`, `server_program_not_found`.
    code: String,
    /// For people; never a token, a path or another user's data.
    message: String,
    /// On 502/504: whether repeating the request cannot run the tool twice.
    #[schema(nullable = false)]
    retry_safe: Option<bool>,
    /// With 429/503: the same as the `Retry-After` header.
    #[schema(nullable = false, minimum = 1)]
    retry_after_secs: Option<u64>,
}

// === response sets shared by several routes ===

/// What every user route answers to a bad credential.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // documentation only: the errors are `ApiError`s
pub enum UserAuthErrors {
    #[response(status = 401, description = "Missing or invalid key or token")]
    Unauthorized(ErrorBody),
    #[response(status = 403, description = "The admin key cannot act as a user")]
    Forbidden(ErrorBody),
}

/// What every admin route answers to a bad credential.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum AdminAuthErrors {
    #[response(status = 401, description = "Missing or invalid admin key")]
    Unauthorized(ErrorBody),
    #[response(status = 403, description = "A user credential on an admin route")]
    Forbidden(ErrorBody),
}

/// What a route that uses (and may start) the caller's MCP session answers when that fails.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum SessionErrors {
    #[response(
        status = 409,
        description = "`reconnect_required`: the OAuth grant was revoked or expired; connect again"
    )]
    ReconnectRequired(ErrorBody),
    #[response(
        status = 429,
        description = "`pool_full`, or `too_many_calls` (pool.max_in_flight_per_user) on a tool call",
        headers(("Retry-After" = u64))
    )]
    TooMany(ErrorBody),
    #[response(
        status = 502,
        description = "The MCP server failed (`server_start_failed`, `server_program_not_found`, `server_crashed`, `server_error`, `server_protocol_error`, `token_refresh_failed`); `retry_safe` says whether a retry could run the tool twice"
    )]
    ServerFailed(ErrorBody),
    #[response(
        status = 503,
        description = "`circuit_open`, `shutting_down`, `reconnect`, `pool_unavailable`, `token_refresh_unavailable`, `credentials_unavailable` or `too_many_connections`",
        headers(("Retry-After" = u64))
    )]
    Unavailable(ErrorBody),
    #[response(status = 504, description = "`call_timeout` or `request_timeout`")]
    Timeout(ErrorBody),
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mcp-pool",
        description = "Persistent per-user MCP sessions for a chat backend. The acting user comes from authentication only (X-User-Id with the service key in api_key mode, the JWT's sub in jwt mode). Every route may also answer 503 `too_many_connections` when http.max_open_connections are open; a method a path does not list answers 405 `method_not_allowed` with `Allow`, and an unknown path 404 `not_found`."
    ),
    paths(
        super::connections::list,
        super::connections::put,
        super::connections::get,
        super::connections::delete,
        super::connections::warm,
        super::tools::list,
        super::tools::call,
        super::oauth::start,
        super::oauth::callback,
        super::chat::chat,
        super::admin::stats,
        super::admin::close_user,
        super::admin::close_session,
        super::admin::events,
        super::admin::cleanup,
        super::admin::page,
        super::admin::page_script,
        super::admin::page_style,
        super::health::healthz,
        super::health::readyz,
        super::metrics::scrape,
        super::mcp::mcp_route_doc,
        super::mcp::protected_resource,
        document,
    ),
    components(schemas(ErrorBody, SessionState)),
    modifiers(&SecuritySchemes),
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(description))
                    .build(),
            )
        };
        components.add_security_scheme(
            USER_SECURITY,
            bearer("api_key mode: the service key (plus X-User-Id); jwt mode: the user's token, whose `sub` is the user"),
        );
        components.add_security_scheme(ADMIN_SECURITY, bearer("The admin key"));
    }
}

/// The document as the code describes it, independent of any configuration.
pub fn spec() -> Document {
    ApiDoc::openapi()
}

/// The document of an instance running `config`, with what the types alone cannot say:
/// - the `{server}` path parameter lists the configured servers;
/// - in `api_key` mode every operation secured by the user scheme requires `X-User-Id` (in
///   `jwt` mode the header is not used);
/// - `PutCredentials` needs a non-null `access_token` or `refresh_token`.
pub fn spec_for(config: &Config) -> Value {
    let mut doc = serde_json::to_value(spec()).unwrap_or_default();
    let servers: Vec<&String> = config.servers.keys().collect();
    let api_key = config.auth.mode == AuthMode::ApiKey;
    let user_header = serde_json::to_value(user_header()).unwrap_or_default();
    // `get`/`get_mut` only: indexing a `Value` mutably would insert `null`s.
    let operations = doc
        .get_mut("paths")
        .and_then(Value::as_object_mut)
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.iter_mut())
        .filter(|(method, _)| HTTP_METHODS.contains(&method.as_str()))
        .filter_map(|(_, operation)| operation.as_object_mut());
    for operation in operations {
        let for_users = operation
            .get("security")
            .and_then(Value::as_array)
            .is_some_and(|reqs| reqs.iter().any(|r| r.get(USER_SECURITY).is_some()));
        if let Some(params) = operation
            .get_mut("parameters")
            .and_then(Value::as_array_mut)
        {
            for param in params.iter_mut() {
                if param["name"] == "server" && param["in"] == "path" {
                    param["schema"] = json!({ "type": "string", "enum": servers });
                }
            }
        }
        if api_key && for_users {
            let params = operation.entry("parameters").or_insert_with(|| json!([]));
            if let Some(params) = params.as_array_mut() {
                params.push(user_header.clone());
            }
        }
    }
    let put = &mut doc["components"]["schemas"]["PutCredentials"];
    if put.is_object() {
        put["anyOf"] = json!([
            { "required": ["access_token"], "properties": { "access_token": { "type": "string" } } },
            { "required": ["refresh_token"], "properties": { "refresh_token": { "type": "string" } } }
        ]);
    }
    doc
}

const HTTP_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// One server-sent event of a streamed chat, as a client reads it off the wire.
#[derive(serde::Serialize, ToSchema)]
#[allow(dead_code)] // a schema only: the stream is written by `http::chat`
pub struct ChatStreamEvent {
    /// The event's type (the same as `type` inside `data`).
    event: ChatStreamEventName,
    /// The event as JSON; `done` carries the whole chat outcome.
    #[schema(content_media_type = "application/json")]
    data: String,
}

#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum ChatStreamEventName {
    ServerSkipped,
    ToolCallStarted,
    ToolCallFinished,
    TextDelta,
    Done,
    Error,
}

/// One server-sent event of a streamed tool call (`Accept: text/event-stream`).
#[derive(serde::Serialize, ToSchema)]
#[allow(dead_code)] // a schema only: the stream is written by `http::tools`
pub struct ToolCallStreamEvent {
    event: ToolCallStreamEventName,
    /// `progress`: `{"progress", "total"?, "message"?}` as the server reported it; `result`:
    /// the call response; `error`: `{"status", "error": {"code", "message", ...}}`, the status
    /// and body the call would have been answered with.
    #[schema(content_media_type = "application/json")]
    data: String,
}

#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum ToolCallStreamEventName {
    Progress,
    Result,
    Error,
}

fn user_header() -> Parameter {
    ParameterBuilder::new()
        .name("X-User-Id")
        .parameter_in(ParameterIn::Header)
        .required(Required::True)
        .description(Some(
            "The acting user (api_key mode). Must appear exactly once: a repeated header is refused with 400 `duplicate_header`.",
        ))
        .schema(Some(UserId::schema()))
        .build()
}

/// `GET /openapi.json`: this document, for the running configuration.
#[utoipa::path(
    get, path = "/openapi.json", operation_id = "openapi", tag = "meta", security(()),
    responses(
        (status = 200, description = "OpenAPI 3.1", body = Object),
        (status = 503, description = "`too_many_connections`", body = ErrorBody),
    )
)]
pub async fn document(State(state): State<HttpState>) -> Json<Value> {
    Json(spec_for(&state.config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_states_match_their_serialization() {
        let states = [
            SessionState::Starting,
            SessionState::Ready,
            SessionState::Restarting,
            SessionState::Failed,
            SessionState::Closing,
        ];
        let names: Vec<String> = states
            .iter()
            .map(|s| {
                serde_json::to_value(s)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(names, CONN_STATES);
    }

    #[test]
    fn patterns_agree_with_the_parsers() {
        // The parsers are the truth; the patterns must accept and refuse the same samples.
        let user = regex_like(USER_ID_PATTERN);
        let server = regex_like(SERVER_NAME_PATTERN);
        for sample in ["alice", "a.b@c+d-e_f", "9", &"x".repeat(128)] {
            assert!(UserId::parse(sample).is_ok() && user(sample), "{sample}");
        }
        for sample in ["", ".a", "a/b", "a b", &"x".repeat(129)] {
            assert!(UserId::parse(sample).is_err() && !user(sample), "{sample}");
        }
        for sample in ["demo", "google-analytics", "a_1", &"x".repeat(100)] {
            assert!(
                ServerName::parse(sample).is_ok() && server(sample),
                "{sample}"
            );
        }
        for sample in ["", "Demo", "-a", "a.b", &"x".repeat(101)] {
            assert!(
                ServerName::parse(sample).is_err() && !server(sample),
                "{sample}"
            );
        }
    }

    /// A matcher for the two patterns above (`^[first][rest]{0,n}$`), without a regex crate.
    fn regex_like(pattern: &'static str) -> impl Fn(&str) -> bool {
        let body = pattern.trim_start_matches('^').trim_end_matches('$');
        let (first, rest) = body[1..].split_once(']').unwrap();
        let rest = rest.trim_start_matches('[');
        let (rest, count) = rest.split_once("]{0,").unwrap();
        let max: usize = count.trim_end_matches('}').parse().unwrap();
        let class = |set: &str| {
            let set = set.to_owned();
            move |c: char| {
                let bytes = set.as_bytes();
                let mut i = 0;
                while i < bytes.len() {
                    if i + 2 < bytes.len() && bytes[i + 1] == b'-' {
                        if (bytes[i] as char..=bytes[i + 2] as char).contains(&c) {
                            return true;
                        }
                        i += 3;
                    } else {
                        if bytes[i] as char == c {
                            return true;
                        }
                        i += 1;
                    }
                }
                false
            }
        };
        let (first, rest) = (class(first), class(rest));
        move |s: &str| {
            let mut chars = s.chars();
            chars.next().is_some_and(&first) && s.chars().count() <= max + 1 && chars.all(&rest)
        }
    }

    #[test]
    fn every_user_route_requires_the_user_header_in_api_key_mode() {
        let config = Config::parse(include_str!("../../config.toml")).unwrap();
        let doc = spec_for(&config);
        let call = &doc["paths"]["/v1/connections/{server}/tools/{tool}/call"]["post"];
        let params = call["parameters"].as_array().unwrap();
        assert!(
            params
                .iter()
                .any(|p| p["name"] == "X-User-Id" && p["required"] == true),
            "{params:?}"
        );
        let stats = &doc["paths"]["/v1/stats"]["get"];
        assert!(
            stats["parameters"]
                .as_array()
                .is_none_or(|p| p.iter().all(|p| p["name"] != "X-User-Id"))
        );
        // The `{server}` parameter lists exactly the configured servers.
        let server = &params.iter().find(|p| p["name"] == "server").unwrap()["schema"];
        assert_eq!(server["enum"], json!(["demo", "google-analytics"]));
        // Operation ids are unique (they name client functions).
        let mut ids: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|item| item.as_object().unwrap().values())
            .filter_map(|op| op["operationId"].as_str())
            .collect();
        let count = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!((ids.len(), count), (24, 24), "{ids:?}");
        // No operation carries a `null` where a list belongs.
        assert!(!doc.to_string().contains("\"parameters\":null"));

        let jwt = Config::parse(
            "[auth]\nmode = \"jwt\"\n[auth.jwt]\nalgorithm = \"HS256\"\nsecret_env = \"S\"\n",
        )
        .unwrap();
        let doc = spec_for(&jwt);
        let params = doc["paths"]["/v1/connections"]["get"]["parameters"].as_array();
        assert!(
            params.is_none_or(|p| p.iter().all(|p| p["name"] != "X-User-Id")),
            "{params:?}"
        );
    }
}
