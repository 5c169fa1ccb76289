//! The seed-compatible endpoint `/ws/chat/{session_id}/{room_name}/` behaves as the Django
//! `ChatConsumer`, and shares rooms with `/ws` (`chat_{room}`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Server;
use serde_json::json;
use switchyard_client::Client;
use switchyard_proto::ServerFrame;

#[tokio::test]
async fn invalid_session_closes_with_4001() {
    let server = Server::start(&[]).await;
    let mut client = Client::connect(&format!("ws://{}/ws/chat/no-such-session/lobby/", server.addr))
        .await
        .unwrap();
    assert_eq!(client.closed().await.unwrap().0, Some(4001));
}

#[tokio::test]
async fn seed_clients_chat_with_each_other_and_with_ws_clients() {
    let server = Server::start(&[]).await;
    let alice_session = server.http.create_session("alice").await.unwrap();
    let mut alice = Client::connect(&format!("ws://{}/ws/chat/{alice_session}/lobby/", server.addr))
        .await
        .unwrap();
    let welcome = alice.json().await.unwrap();
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["session_id"], alice_session.as_str());
    assert_eq!(welcome["user_id"], "alice");
    assert_eq!(welcome["room"], "lobby");

    let bob_session = server.http.create_session("bob").await.unwrap();
    let mut bob = Client::connect(&format!("ws://{}/ws/chat/{bob_session}/lobby", server.addr))
        .await
        .unwrap();
    assert_eq!(bob.json().await.unwrap()["type"], "welcome");

    let (mut carol, _) = server.connect("carol").await;
    carol.join("chat_lobby", None).await.unwrap();

    alice.send_text(r#"{"message": "hello"}"#).await.unwrap();
    let expected = json!({ "type": "message", "message": "hello", "user_id": "alice" });
    assert_eq!(
        alice.json().await.unwrap(),
        expected,
        "the sender is in the group too"
    );
    assert_eq!(bob.json().await.unwrap(), expected);
    match carol
        .until("message", |f| matches!(f, ServerFrame::Message { .. }))
        .await
        .unwrap()
    {
        ServerFrame::Message {
            room,
            from,
            data,
            offset,
            ..
        } => {
            assert_eq!(room.as_str(), "chat_lobby");
            assert_eq!(from.unwrap().as_str(), "alice");
            assert_eq!(data.to_value(), json!("hello"));
            assert_eq!(offset, 1);
        }
        _ => unreachable!(),
    }
    carol
        .publish("chat_lobby", json!({ "text": "hi from /ws" }), None)
        .await
        .unwrap();
    let expected = json!({ "type": "message", "message": { "text": "hi from /ws" }, "user_id": "carol" });
    assert_eq!(alice.json().await.unwrap(), expected);
    assert_eq!(bob.json().await.unwrap(), expected);
    let presence = server.http.get("/api/rooms/chat_lobby/presence").await.unwrap();
    assert_eq!(presence.body["users"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn seed_error_frames() {
    let server = Server::start(&[]).await;
    let session = server.http.create_session(&42.to_string()).await.unwrap();
    let mut client = Client::connect(&format!("ws://{}/ws/chat/{session}/errors/", server.addr))
        .await
        .unwrap();
    client.json().await.unwrap();
    client.send_text("{not json").await.unwrap();
    let error = client.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "INVALID_MESSAGE_FORMAT");
    client.send_text("[1, 2]").await.unwrap();
    assert_eq!(
        client.json().await.unwrap()["code"],
        "INTERNAL_ERROR",
        "valid JSON that is not an object"
    );
    client.send_text(r#"{"text": "no message key"}"#).await.unwrap();
    assert_eq!(client.json().await.unwrap()["code"], "INTERNAL_ERROR");
    client.send_text(r#"{"message": 7}"#).await.unwrap();
    assert_eq!(
        client.json().await.unwrap(),
        json!({ "type": "message", "message": 7, "user_id": "42" })
    );
}

#[tokio::test]
async fn bad_room_name_is_refused() {
    let server = Server::start(&[]).await;
    let session = server.http.create_session("alice").await.unwrap();
    let response = server
        .http
        .get(&format!("/ws/chat/{session}/bad%20room/"))
        .await
        .unwrap();
    assert_eq!(response.status, 400);
    assert!(response.body["message"].as_str().unwrap().contains("room"));
}
