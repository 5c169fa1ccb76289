//! The HTTP API: sessions, server-side messaging, validation of bad input, API keys, OpenAPI, ops.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Server, run_cli};
use hyper::Method;
use serde_json::json;

#[tokio::test]
async fn sessions_in_the_seed_format() {
    let server = Server::start(&[]).await;
    let created = server
        .http
        .post(
            "/api/sessions",
            &json!({ "user_id": "alice", "preferences": { "theme": "dark" } }),
        )
        .await
        .unwrap();
    assert_eq!(created.status, 201);
    assert_eq!(created.body["expires_in"], 3600);
    let id = created.body["session_id"].as_str().unwrap();
    assert_eq!(id.len(), 36, "a UUID");
    let got = server.http.get(&format!("/api/sessions/{id}")).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.body["user_id"], "alice");
    assert_eq!(got.body["status"], "active");
    assert_eq!(got.body["preferences"], json!({ "theme": "dark" }));
    let created_at = got.body["created_at"].as_str().unwrap();
    assert_eq!(
        created_at.len(),
        26,
        "Python isoformat with microseconds: {created_at}"
    );
    let numeric = server
        .http
        .post("/api/sessions", &json!({ "user_id": 7 }))
        .await
        .unwrap();
    assert_eq!(numeric.status, 201);

    // Status follows the connections: disconnected after the last one closes.
    let mut client = switchyard_client::Client::connect(&server.ws_url(&format!("?session={id}")))
        .await
        .unwrap();
    client.welcome().await.unwrap();
    client.close().await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while server
        .http
        .get(&format!("/api/sessions/{id}"))
        .await
        .unwrap()
        .body["status"]
        != "disconnected"
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "status did not become disconnected"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    assert_eq!(
        server
            .http
            .delete(&format!("/api/sessions/{id}"))
            .await
            .unwrap()
            .status,
        204
    );
    let gone = server.http.get(&format!("/api/sessions/{id}")).await.unwrap();
    assert_eq!(gone.status, 404);
    assert_eq!(gone.body["code"], "BAD_REQUEST");
    assert_eq!(
        server
            .http
            .delete(&format!("/api/sessions/{id}"))
            .await
            .unwrap()
            .status,
        404
    );
}

#[tokio::test]
async fn bad_input_gets_4xx_json_naming_the_problem() {
    let server = Server::start(&[]).await;
    let cases: Vec<(Method, &str, Option<&str>, u16, &str)> = vec![
        (Method::POST, "/api/sessions", Some("{}"), 400, "user_id"),
        (
            Method::POST,
            "/api/sessions",
            Some(r#"{"user_id": ""}"#),
            400,
            "user_id",
        ),
        (
            Method::POST,
            "/api/sessions",
            Some(r#"{"user_id": [1]}"#),
            400,
            "user_id",
        ),
        (
            Method::POST,
            "/api/sessions",
            Some(r#"{"user_id": "a", "preferences": 3}"#),
            400,
            "preferences",
        ),
        (Method::POST, "/api/sessions", Some("{nope"), 400, "JSON"),
        (
            Method::POST,
            "/api/publish",
            Some(r#"{"room": "a b", "data": 1}"#),
            400,
            "room",
        ),
        (
            Method::POST,
            "/api/publish",
            Some(r#"{"room": "ok"}"#),
            400,
            "data",
        ),
        (
            Method::POST,
            "/api/publish",
            Some(r#"{"room": "ok", "data": 1, "id": ""}"#),
            400,
            "id",
        ),
        (
            Method::POST,
            "/api/direct",
            Some(r#"{"to": "", "data": 1}"#),
            400,
            "to",
        ),
        (
            Method::POST,
            "/api/disconnect",
            Some(r#"{"user": "x"}"#),
            400,
            "user",
        ),
        (Method::POST, "/api/broadcast", Some(r#"{}"#), 400, "data"),
        (Method::GET, "/api/rooms/a%20b/presence", None, 400, "room"),
        (Method::GET, "/api/rooms/ok/history?limit=x", None, 400, "limit"),
        (Method::GET, "/api/rooms/ok/history?limit=0", None, 400, "limit"),
        (Method::GET, "/api/nothing-here", None, 404, "endpoint"),
    ];
    for (method, path, body, status, mentions) in cases {
        let response = server
            .http
            .call(method.clone(), path, body.map(str::to_string))
            .await
            .unwrap();
        assert_eq!(
            response.status.as_u16(),
            status,
            "{method} {path} {body:?}: {}",
            response.text
        );
        let message = response.body["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no JSON error body for {path}: {}", response.text));
        assert!(response.body["code"].is_string());
        assert!(
            message.contains(mentions),
            "{method} {path}: message {message:?} should mention {mentions}"
        );
    }
    let no_json = server
        .http
        .call(Method::POST, "/api/publish", None)
        .await
        .unwrap();
    assert!(no_json.status.is_client_error());
    assert!(no_json.body["message"].is_string());
}

#[tokio::test]
async fn server_publish_is_idempotent_and_reaches_clients() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = server.connect("alice").await;
    alice.join("news", None).await.unwrap();
    let first = server
        .http
        .post(
            "/api/publish",
            &json!({ "room": "news", "data": { "a": 1 }, "id": "n1" }),
        )
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.body["offset"], 1);
    assert_eq!(first.body["duplicate"], false);
    let again = server
        .http
        .post(
            "/api/publish",
            &json!({ "room": "news", "data": { "a": 1 }, "id": "n1" }),
        )
        .await
        .unwrap();
    assert_eq!(again.body["offset"], 1);
    assert_eq!(again.body["duplicate"], true);
    match alice
        .until("message", |f| {
            matches!(f, switchyard_proto::ServerFrame::Message { .. })
        })
        .await
        .unwrap()
    {
        switchyard_proto::ServerFrame::Message { offset, from, .. } => {
            assert_eq!(offset, 1);
            assert_eq!(from, None);
        }
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn api_key_is_required_when_configured() {
    let key = "0123456789abcdef-test-key";
    let server = Server::start(&[("SWITCHYARD_API_KEY", key)]).await;
    let denied = server
        .http
        .post("/api/sessions", &json!({ "user_id": "a" }))
        .await
        .unwrap();
    assert_eq!(denied.status, 401);
    assert_eq!(denied.body["code"], "UNAUTHORIZED");
    let wrong = server
        .http
        .clone()
        .with_api_key("wrong-key-wrong-key")
        .get("/api/rooms/x/presence")
        .await
        .unwrap();
    assert_eq!(wrong.status, 401);
    let allowed = server
        .http
        .clone()
        .with_api_key(key)
        .post("/api/sessions", &json!({ "user_id": "a" }))
        .await
        .unwrap();
    assert_eq!(allowed.status, 201);
    assert_eq!(
        server.http.get("/healthz").await.unwrap().status,
        200,
        "ops endpoints stay open"
    );
    assert_eq!(server.http.get("/api/openapi.json").await.unwrap().status, 200);
}

#[tokio::test]
async fn openapi_lists_every_handler() {
    let server = Server::start(&[]).await;
    let doc = server.http.get("/api/openapi.json").await.unwrap().body;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/api/sessions", "post"),
        ("/api/sessions/{id}", "get"),
        ("/api/sessions/{id}", "delete"),
        ("/api/publish", "post"),
        ("/api/broadcast", "post"),
        ("/api/direct", "post"),
        ("/api/disconnect", "post"),
        ("/api/rooms/{room}/presence", "get"),
        ("/api/rooms/{room}/history", "get"),
        ("/api/drain", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing from the OpenAPI document"
        );
    }
}

#[tokio::test]
async fn ops_endpoints_and_seed_metric_names() {
    let server = Server::start(&[]).await;
    assert_eq!(
        server.http.get("/healthz").await.unwrap().body,
        json!({ "status": "ok" })
    );
    assert_eq!(
        server.http.get("/readyz").await.unwrap().body,
        json!({ "status": "ready" })
    );
    let (mut alice, _) = server.connect("alice").await;
    alice.join("m", None).await.unwrap();
    alice.publish("m", json!(1), None).await.unwrap();
    let text = server.http.get("/metrics").await.unwrap().text;
    for name in [
        "websocket_active_connections 1",
        "websocket_messages_total{type=\"publish\"} 1",
        "websocket_message_latency_seconds_count",
        "websocket_connections_opened_total 1",
        "websocket_connections_failed_total",
        "websocket_connection_duration_seconds",
        "websocket_message_size_bytes_count",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
    let page = server.http.get("/").await.unwrap();
    assert_eq!(page.status, 200);
    assert!(page.text.contains("<html") || page.text.contains("<!doctype html"));
}

#[tokio::test]
async fn invalid_configuration_names_the_field() {
    let (code, _, stderr) = run_cli(
        &["serve", "--listen", "127.0.0.1:0"],
        &[("SWITCHYARD_QUEUE_CAPACITY", "many")],
    )
    .await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("queue_capacity"), "{stderr}");
    let (code, _, stderr) = run_cli(&["serve", "--listen", "0.0.0.0:0"], &[]).await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("API key"), "{stderr}");
    let dir = std::env::temp_dir().join(format!("switchyard-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "history_size = -3\n").unwrap();
    let (code, _, stderr) = run_cli(&["serve", "--config", file.to_str().unwrap()], &[]).await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("history_size"), "{stderr}");
    std::fs::write(&file, "queue_capacity = 77\n").unwrap();
    let (code, stdout, _) = run_cli(
        &["config", "--config", file.to_str().unwrap()],
        &[("SWITCHYARD_HISTORY_SIZE", "9")],
    )
    .await;
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("queue_capacity = 77") && stdout.contains("history_size = 9"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let (code, stdout, _) = run_cli(&["--help"], &[]).await;
    assert_eq!(code, Some(0));
    for flag in [
        "serve",
        "config",
        "--listen",
        "--config",
        "--api-key",
        "SWITCHYARD_LISTEN",
    ] {
        assert!(stdout.contains(flag), "--help lacks {flag}");
    }
}
