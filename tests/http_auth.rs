//! Authentication and isolation: a user reaches only their own connections, whatever they put
//! in paths, headers or bodies; bad credentials get 401, the wrong kind 403.

mod common;
#[path = "common/http.rs"]
mod http;

use http::{TestServer, content_text};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn pid_of(resp: &http::Resp) -> u64 {
    let inner: Value = serde_json::from_str(&content_text(&resp.json())).unwrap();
    inner["instance"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_cannot_see_or_change_another_users_connections() {
    let server = TestServer::api_key().await;
    let bob = server.user("bob");
    let mallory = server.user("mallory");

    for name in ["demo", "demo2"] {
        assert_eq!(bob.connect(name).await.status, 201);
    }
    let bobs_call = bob.call("demo", "whoami", &json!({})).await;
    assert_eq!(bobs_call.status, 200, "{}", bobs_call.text());
    let bobs_pid = pid_of(&bobs_call);
    let bobs_before = bob.get("/v1/connections").await.json();

    // Every per-user route, with bob's server names.
    let list = mallory.get("/v1/connections").await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["connections"], json!([]));
    for name in ["demo", "demo2"] {
        mallory
            .get(&format!("/v1/connections/{name}"))
            .await
            .expect_error(404, "no_credentials");
        mallory
            .get(&format!("/v1/connections/{name}/tools"))
            .await
            .expect_error(404, "no_credentials");
        mallory
            .call(name, "whoami", &json!({}))
            .await
            .expect_error(404, "no_credentials");
        mallory
            .delete(&format!("/v1/connections/{name}"))
            .await
            .expect_error(404, "no_credentials");
        mallory
            .delete(&format!("/v1/connections/{name}?purge=true"))
            .await
            .expect_error(404, "no_credentials");
    }
    // The user never comes from a body.
    mallory
        .put_json(
            "/v1/connections/demo",
            &json!({ "access_token": "x", "user_id": "bob" }),
        )
        .await
        .expect_error(400, "invalid_body");
    // Nor from a path: admin routes are closed to the user key.
    mallory
        .delete("/v1/admin/users/bob/connections")
        .await
        .expect_error(403, "forbidden");
    mallory
        .get("/v1/stats")
        .await
        .expect_error(403, "forbidden");
    // Storing her own credentials under the same server name touches only her row.
    assert_eq!(mallory.connect("demo").await.status, 201);
    let hers = mallory.call("demo", "whoami", &json!({})).await;
    assert_eq!(hers.status, 200);
    assert_ne!(pid_of(&hers), bobs_pid, "her own process");
    assert!(!hers.text().contains("/bob/"), "{}", hers.text());
    assert_eq!(
        mallory.get("/v1/connections").await.json()["connections"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        mallory
            .delete("/v1/connections/demo?purge=true")
            .await
            .status,
        200
    );

    // Bob's connections are exactly as before, and his session is the same process.
    let bobs_after = bob.get("/v1/connections").await.json();
    let strip = |v: &Value| {
        let mut v = v.clone();
        for c in v["connections"].as_array_mut().unwrap() {
            c.as_object_mut().unwrap().remove("last_used");
        }
        v
    };
    assert_eq!(strip(&bobs_after), strip(&bobs_before));
    assert_eq!(
        pid_of(&bob.call("demo", "whoami", &json!({})).await),
        bobs_pid
    );

    // Bad API key, no key, malformed header: 401 on every route.
    for client in [
        server.bearer("wrong-key").with_header("x-user-id", "bob"),
        server.anonymous().with_header("x-user-id", "bob"),
        server
            .anonymous()
            .with_header("authorization", &format!("Basic {}", server.service_key))
            .with_header("x-user-id", "bob"),
    ] {
        client
            .get("/v1/connections")
            .await
            .expect_error(401, "unauthorized");
        client
            .get("/v1/connections/demo")
            .await
            .expect_error(401, "unauthorized");
        client
            .get("/v1/connections/demo/tools")
            .await
            .expect_error(401, "unauthorized");
        client
            .call("demo", "echo", &json!({}))
            .await
            .expect_error(401, "unauthorized");
        client
            .connect("demo")
            .await
            .expect_error(401, "unauthorized");
        client
            .delete("/v1/connections/demo")
            .await
            .expect_error(401, "unauthorized");
        // Unauthenticated callers do not even learn which servers exist.
        client
            .get("/v1/connections/nope")
            .await
            .expect_error(401, "unauthorized");
    }
    assert_eq!(
        bob.get("/v1/connections").await.json()["connections"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    server.stop().await;
}

const HS_SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters";

fn hs_token(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/http/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn rs_token(claims: &Value, kid: Option<&str>) -> String {
    let pem = std::fs::read(fixture("rs256-test-private.pem")).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_tokens_are_verified_like_supabase_ones() {
    let server = TestServer::start(
        "",
        "",
        "mode = \"jwt\"\n[auth.jwt]\nalgorithm = \"HS256\"\nsecret_env = \"TEST_JWT_SECRET\"\n\
         audience = \"authenticated\"\nissuer = \"https://example.supabase.co/auth/v1\"\nleeway = \"5s\"\n",
        &[("TEST_JWT_SECRET", HS_SECRET)],
    )
    .await;
    let claims = |sub: &str, exp: i64| {
        json!({ "sub": sub, "exp": exp, "aud": "authenticated",
                "iss": "https://example.supabase.co/auth/v1", "role": "authenticated" })
    };
    let alice_token = hs_token(&claims("alice", now() + 600), HS_SECRET);
    let alice = server.bearer(&alice_token);
    assert_eq!(alice.connect("demo").await.status, 201);
    let echo = alice
        .call("demo", "echo", &json!({ "message": "jwt" }))
        .await;
    assert_eq!(echo.status, 200, "{}", echo.text());

    // X-User-Id cannot override the token's subject.
    let as_bob = alice.clone().with_header("x-user-id", "bob");
    let listed = as_bob.get("/v1/connections").await.json();
    assert_eq!(
        listed["connections"].as_array().unwrap().len(),
        1,
        "alice's own"
    );
    let bob = server.bearer(&hs_token(&claims("bob", now() + 600), HS_SECRET));
    assert_eq!(
        bob.get("/v1/connections").await.json()["connections"],
        json!([])
    );
    bob.get("/v1/connections/demo")
        .await
        .expect_error(404, "no_credentials");
    bob.call("demo", "echo", &json!({ "message": "x" }))
        .await
        .expect_error(404, "no_credentials");

    let mut header_none = Header::new(Algorithm::HS256);
    header_none.typ = Some("JWT".into());
    let bad_tokens = [
        (
            "expired",
            hs_token(&claims("alice", now() - 3600), HS_SECRET),
        ),
        (
            "wrong secret",
            hs_token(
                &claims("alice", now() + 600),
                "another-secret-of-enough-length!!",
            ),
        ),
        (
            "not yet valid",
            hs_token(
                &json!({ "sub": "alice", "exp": now() + 7200, "nbf": now() + 3600,
                         "aud": "authenticated", "iss": "https://example.supabase.co/auth/v1" }),
                HS_SECRET,
            ),
        ),
        (
            "wrong audience",
            hs_token(
                &json!({ "sub": "alice", "exp": now() + 600, "aud": "anon",
                         "iss": "https://example.supabase.co/auth/v1" }),
                HS_SECRET,
            ),
        ),
        (
            "wrong issuer",
            hs_token(
                &json!({ "sub": "alice", "exp": now() + 600, "aud": "authenticated", "iss": "evil" }),
                HS_SECRET,
            ),
        ),
        (
            "no exp",
            hs_token(
                &json!({ "sub": "alice", "aud": "authenticated",
                         "iss": "https://example.supabase.co/auth/v1" }),
                HS_SECRET,
            ),
        ),
        (
            "no sub",
            hs_token(
                &json!({ "exp": now() + 600, "aud": "authenticated",
                         "iss": "https://example.supabase.co/auth/v1" }),
                HS_SECRET,
            ),
        ),
        (
            "invalid sub",
            hs_token(&claims("../etc", now() + 600), HS_SECRET),
        ),
        (
            "RS256 instead",
            rs_token(&claims("alice", now() + 600), Some("test-rs256")),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                base64_url(br#"{"alg":"none","typ":"JWT"}"#),
                base64_url(claims("alice", now() + 600).to_string().as_bytes())
            ),
        ),
        ("garbage", "not.a.jwt".to_owned()),
        ("almost the admin key", format!("{}x", server.admin_key)),
    ];
    for (why, token) in &bad_tokens {
        let resp = server.bearer(token).get("/v1/connections").await;
        assert_eq!(resp.status, 401, "{why}: {}", resp.text());
        assert_eq!(resp.code(), "unauthorized", "{why}");
        assert!(!resp.text().contains(token.as_str()), "{why}: token echoed");
    }
    server
        .anonymous()
        .get("/v1/connections")
        .await
        .expect_error(401, "unauthorized");

    // Admin routes: the admin key in jwt mode too; a valid user token is forbidden.
    alice.get("/v1/stats").await.expect_error(403, "forbidden");
    assert_eq!(server.admin().get("/v1/stats").await.status, 200);
    server.stop().await;
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_tokens_are_verified_against_the_jwks_file() {
    let jwks = fixture("rs256-test-jwks.json");
    let server = TestServer::start(
        "",
        "",
        &format!("mode = \"jwt\"\n[auth.jwt]\nalgorithm = \"RS256\"\njwks_file = {jwks:?}\n"),
        &[],
    )
    .await;
    let claims = |exp: i64| json!({ "sub": "erin", "exp": exp });
    let good = server.bearer(&rs_token(&claims(now() + 600), Some("test-rs256")));
    assert_eq!(good.get("/v1/connections").await.status, 200);
    // No kid: tried against every key of the set.
    assert_eq!(
        server
            .bearer(&rs_token(&claims(now() + 600), None))
            .get("/v1/connections")
            .await
            .status,
        200
    );

    // Algorithm confusion: an HS256 token keyed with the public JWKS text.
    let confused = hs_token(
        &claims(now() + 600),
        &std::fs::read_to_string(&jwks).unwrap(),
    );
    for (why, token) in [
        (
            "expired",
            rs_token(&claims(now() - 3600), Some("test-rs256")),
        ),
        ("unknown kid", rs_token(&claims(now() + 600), Some("other"))),
        ("hs256 confusion", confused),
        (
            "hs256 with the test secret",
            hs_token(&claims(now() + 600), HS_SECRET),
        ),
    ] {
        let resp = server.bearer(&token).get("/v1/connections").await;
        assert_eq!(resp.status, 401, "{why}: {}", resp.text());
    }
    server.stop().await;
}

fn es_token(claims: &Value, kid: Option<&str>) -> String {
    let pem = std::fs::read(fixture("es256-test-private.pem")).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_pem(&pem).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_are_verified_against_the_jwks_file() {
    let jwks = fixture("es256-test-jwks.json");
    let server = TestServer::start(
        "",
        "",
        &format!("mode = \"jwt\"\n[auth.jwt]\nalgorithm = \"ES256\"\njwks_file = {jwks:?}\n"),
        &[],
    )
    .await;
    let claims = |sub: &str, exp: i64| json!({ "sub": sub, "exp": exp });
    // The verified `sub` is the acting user: Fay's credentials are hers alone.
    let fay = server.bearer(&es_token(&claims("fay", now() + 600), Some("test-es256")));
    assert_eq!(fay.connect("demo").await.status, 201);
    let listed = fay.get("/v1/connections").await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    assert_eq!(
        listed.json()["connections"][0]["server"],
        "demo",
        "{}",
        listed.text()
    );
    let gus = server.bearer(&es_token(&claims("gus", now() + 600), None));
    let listed = gus.get("/v1/connections").await;
    assert_eq!(listed.status, 200, "no kid: tried against every key");
    assert_eq!(listed.json()["connections"], json!([]), "{}", listed.text());

    for (why, token) in [
        (
            "expired",
            es_token(&claims("fay", now() - 3600), Some("test-es256")),
        ),
        (
            "unknown kid",
            es_token(&claims("fay", now() + 600), Some("other")),
        ),
        (
            "an RS256 token where ES256 is configured",
            rs_token(&claims("fay", now() + 600), Some("test-es256")),
        ),
        (
            "hs256 keyed with the public JWKS",
            hs_token(
                &claims("fay", now() + 600),
                &std::fs::read_to_string(&jwks).unwrap(),
            ),
        ),
    ] {
        let resp = server.bearer(&token).get("/v1/connections").await;
        assert_eq!(resp.status, 401, "{why}: {}", resp.text());
    }
    server.stop().await;
}
