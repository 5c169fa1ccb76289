//! The `/ws` protocol over real sockets: authentication, every request type, errors and close codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Server;
use serde_json::json;
use switchyard_client::{Client, ConnectOptions, WsMessage};
use switchyard_proto::{ClientBody, CloseCode, ErrorCode, Payload, Ref, RoomName, ServerFrame, UserId};

fn room(name: &str) -> RoomName {
    RoomName::parse(name).unwrap()
}

async fn expect_error(client: &mut Client, code: ErrorCode) -> (String, Option<Ref>) {
    match client.frame().await.unwrap() {
        ServerFrame::Error {
            code: got,
            message,
            reference,
        } => {
            assert_eq!(got, code, "message: {message}");
            (message, reference)
        }
        other => panic!("expected {code} error, got {other:?}"),
    }
}

async fn still_works(client: &mut Client) {
    let reference = client.request(ClientBody::Ping).await.unwrap();
    assert_eq!(
        client.reply(&reference).await.unwrap(),
        ServerFrame::Pong {
            reference: Some(reference)
        }
    );
}

#[tokio::test]
async fn query_session_gets_welcome() {
    let server = Server::start(&[("SWITCHYARD_NODE_ID", "node-a")]).await;
    let session = server.http.create_session("alice").await.unwrap();
    let mut client = Client::connect(&server.ws_url(&format!("?session={session}")))
        .await
        .unwrap();
    match client.frame().await.unwrap() {
        ServerFrame::Welcome {
            reference,
            session_id,
            user_id,
            node,
            inbox,
        } => {
            assert_eq!(session_id, session);
            assert_eq!(reference, None);
            assert_eq!(user_id.as_str(), "alice");
            assert_eq!(node, "node-a");
            assert_eq!(inbox, 0);
        }
        other => panic!("expected welcome, got {other:?}"),
    }
    still_works(&mut client).await;
    assert_eq!(server.metric("websocket_active_connections").await, 1.0);
    client.close().await.unwrap();
}

#[tokio::test]
async fn auth_frame_and_requests_before_auth() {
    let server = Server::start(&[]).await;
    let session = server.http.create_session("bob").await.unwrap();
    let mut client = Client::connect(&server.ws_url("")).await.unwrap();
    client
        .send(&switchyard_proto::ClientFrame::with_ref(
            Ref::Num(5),
            ClientBody::Ping,
        ))
        .await
        .unwrap();
    let (_, reference) = expect_error(&mut client, ErrorCode::Unauthorized).await;
    assert_eq!(reference, Some(Ref::Num(5)));
    client.send_text("{oops").await.unwrap();
    expect_error(&mut client, ErrorCode::InvalidMessageFormat).await;
    match client.auth(&session).await.unwrap() {
        ServerFrame::Welcome {
            user_id, reference, ..
        } => {
            assert_eq!(user_id.as_str(), "bob");
            assert!(reference.is_some(), "welcome echoes the auth frame's ref");
        }
        other => panic!("{other:?}"),
    }
    client
        .send_text(&format!(r#"{{"type":"auth","session":"{session}"}}"#))
        .await
        .unwrap();
    expect_error(&mut client, ErrorCode::BadRequest).await;
    still_works(&mut client).await;
}

#[tokio::test]
async fn invalid_deleted_and_expired_sessions_close_with_4001() {
    let server = Server::start(&[("SWITCHYARD_SESSION_TTL_SECS", "1")]).await;
    let mut client = Client::connect(&server.ws_url("?session=not-a-session"))
        .await
        .unwrap();
    assert_eq!(client.closed().await.unwrap().0, Some(4001));

    let mut client = Client::connect(&server.ws_url("")).await.unwrap();
    client
        .send_text(r#"{"type":"auth","session":"nope"}"#)
        .await
        .unwrap();
    assert_eq!(client.closed().await.unwrap().0, Some(4001));

    let session = server.http.create_session("carol").await.unwrap();
    assert_eq!(
        server
            .http
            .delete(&format!("/api/sessions/{session}"))
            .await
            .unwrap()
            .status,
        204
    );
    let mut client = Client::connect(&server.ws_url(&format!("?session={session}")))
        .await
        .unwrap();
    assert_eq!(client.closed().await.unwrap().0, Some(4001));

    let session = server.http.create_session("carol").await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while server
        .http
        .get(&format!("/api/sessions/{session}"))
        .await
        .unwrap()
        .status
        == 200
    {
        assert!(tokio::time::Instant::now() < deadline, "session did not expire");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let mut client = Client::connect(&server.ws_url(&format!("?session={session}")))
        .await
        .unwrap();
    assert_eq!(
        client.closed().await.unwrap().0,
        Some(4001),
        "an expired session is refused"
    );
    assert!(
        server
            .metric("websocket_connections_failed_total{reason=\"auth\"}")
            .await
            >= 4.0
    );
}

#[tokio::test]
async fn auth_timeout_closes_with_policy() {
    let server = Server::start(&[("SWITCHYARD_AUTH_TIMEOUT_SECS", "1")]).await;
    let mut client = Client::connect(&server.ws_url("")).await.unwrap();
    let (code, reason) = client.closed().await.unwrap();
    assert_eq!(code, Some(CloseCode::Policy.code()));
    assert!(reason.contains("authentication"), "{reason}");
}

#[tokio::test]
async fn join_publish_ack_and_ordered_delivery() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = server.connect("alice").await;
    let (mut bob, _) = server.connect("bob").await;
    let (offset, epoch, recovered) = alice.join("lobby", None).await.unwrap();
    assert_eq!((offset, recovered), (0, false));
    let (offset_b, epoch_b, _) = bob.join("lobby", None).await.unwrap();
    assert_eq!((offset_b, &epoch_b), (0, &epoch));
    for n in 1..=20u64 {
        assert_eq!(alice.publish("lobby", json!({ "n": n }), None).await.unwrap(), n);
    }
    for n in 1..=20u64 {
        let frame = bob
            .until("message", |f| matches!(f, ServerFrame::Message { .. }))
            .await
            .unwrap();
        match frame {
            ServerFrame::Message {
                room: r,
                offset,
                from,
                data,
                ts,
                id,
            } => {
                assert_eq!(r.as_str(), "lobby");
                assert_eq!(offset, n, "in offset order, no gaps");
                assert_eq!(from.unwrap().as_str(), "alice");
                assert_eq!(data.to_value(), json!({ "n": n }));
                assert!(ts > 0);
                assert_eq!(id, None);
            }
            _ => unreachable!(),
        }
    }
    let reference = bob
        .request(ClientBody::Leave { room: room("lobby") })
        .await
        .unwrap();
    assert_eq!(
        bob.reply(&reference).await.unwrap(),
        ServerFrame::Left {
            reference: Some(reference),
            room: room("lobby")
        }
    );
    alice.publish("lobby", json!("after leave"), None).await.unwrap();
    still_works(&mut bob).await; // no message frame arrived before the pong
    let reference = bob
        .request(ClientBody::Leave { room: room("lobby") })
        .await
        .unwrap();
    assert_eq!(
        bob.reply(&reference).await.unwrap(),
        ServerFrame::Error {
            code: ErrorCode::BadRequest,
            message: "not in room lobby".into(),
            reference: Some(reference)
        }
    );
}

#[tokio::test]
async fn publish_rules_forbidden_and_idempotent() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = server.connect("alice").await;
    let (mut bob, _) = server.connect("bob").await;
    let reference = alice
        .request(ClientBody::Publish {
            room: room("r"),
            data: Payload::from_value(&json!(1)).unwrap(),
            id: None,
        })
        .await
        .unwrap();
    match alice.reply(&reference).await.unwrap() {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::Forbidden),
        other => panic!("{other:?}"),
    }
    alice.join("r", None).await.unwrap();
    bob.join("r", None).await.unwrap();
    let first = alice.publish("r", json!("once"), Some("msg-1")).await.unwrap();
    let reference = alice
        .request(ClientBody::Publish {
            room: room("r"),
            data: Payload::from_value(&json!("once")).unwrap(),
            id: Some("msg-1".into()),
        })
        .await
        .unwrap();
    assert_eq!(
        alice.reply(&reference).await.unwrap(),
        ServerFrame::Ack {
            reference: Some(reference),
            offset: Some(first),
            seq: None,
            duplicate: true
        }
    );
    let second = alice.publish("r", json!("twice"), Some("msg-2")).await.unwrap();
    assert_eq!(second, first + 1);
    let got = bob
        .until("msg", |f| matches!(f, ServerFrame::Message { .. }))
        .await
        .unwrap();
    assert!(
        matches!(got, ServerFrame::Message { offset, ref id, .. } if offset == first && id.as_deref() == Some("msg-1"))
    );
    let got = bob
        .until("msg", |f| matches!(f, ServerFrame::Message { .. }))
        .await
        .unwrap();
    assert!(
        matches!(got, ServerFrame::Message { offset, .. } if offset == second),
        "the duplicate was not delivered: {got:?}"
    );
}

#[tokio::test]
async fn malformed_frames_get_errors_and_the_connection_keeps_working() {
    let server = Server::start(&[]).await;
    let (mut client, _) = server.connect("alice").await;
    client.send_text("not json").await.unwrap();
    expect_error(&mut client, ErrorCode::InvalidMessageFormat).await;
    client.send_text(r#"{"type":"teleport","ref":1}"#).await.unwrap();
    let (message, reference) = expect_error(&mut client, ErrorCode::BadRequest).await;
    assert!(message.contains("teleport"));
    assert_eq!(reference, Some(Ref::Num(1)));
    client.send_text(r#"{"type":"join","ref":"x"}"#).await.unwrap();
    let (message, _) = expect_error(&mut client, ErrorCode::BadRequest).await;
    assert!(message.contains("room"), "{message}");
    client
        .send_text(r#"{"type":"join","room":"no spaces allowed"}"#)
        .await
        .unwrap();
    expect_error(&mut client, ErrorCode::BadRequest).await;
    client
        .send_text(&format!(r#"{{"type":"join","room":"{}"}}"#, "x".repeat(256)))
        .await
        .unwrap();
    let (message, _) = expect_error(&mut client, ErrorCode::BadRequest).await;
    assert!(message.contains("255"), "{message}");
    client.send_text(r#"[1,2,3]"#).await.unwrap();
    expect_error(&mut client, ErrorCode::BadRequest).await;
    client.send_text(r#"{"no_type":true}"#).await.unwrap();
    expect_error(&mut client, ErrorCode::BadRequest).await;
    client
        .send_message(WsMessage::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    expect_error(&mut client, ErrorCode::BadRequest).await;
    client
        .send_text(r#"{"type":"refresh","token":"abc"}"#)
        .await
        .unwrap();
    expect_error(&mut client, ErrorCode::BadRequest).await;
    still_works(&mut client).await;
    assert!(server.metric("websocket_messages_total{type=\"invalid\"}").await >= 6.0);
}

#[tokio::test]
async fn oversized_frame_closes_with_1009() {
    let server = Server::start(&[("SWITCHYARD_MAX_MESSAGE_BYTES", "1024")]).await;
    let (mut client, _) = server.connect("alice").await;
    client
        .send_text(&format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(2000)))
        .await
        .unwrap();
    assert_eq!(client.closed().await.unwrap().0, Some(1009));
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let server = Server::start(&[]).await;
    let (mut client, _) = server.connect("alice").await;
    let frame = Frame::message(vec![0xff_u8, 0xfe, 0x22], OpCode::Data(Data::Text), true);
    client.send_message(WsMessage::Frame(frame)).await.unwrap();
    assert_eq!(client.closed().await.unwrap().0, Some(1007));
}

#[tokio::test]
async fn presence_queries_and_diffs() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = server.connect("alice").await;
    let (mut bob, _) = server.connect("bob").await;
    alice.join_with("p", None, true).await.unwrap();
    bob.join_with("p", None, true).await.unwrap();
    let own = alice
        .until("own presence_diff", |f| {
            matches!(f, ServerFrame::PresenceDiff { .. })
        })
        .await
        .unwrap();
    assert_eq!(
        own,
        ServerFrame::PresenceDiff {
            room: room("p"),
            joins: vec![UserId::parse("alice").unwrap()],
            leaves: vec![]
        }
    );
    let diff = alice
        .until("presence_diff", |f| matches!(f, ServerFrame::PresenceDiff { .. }))
        .await
        .unwrap();
    assert_eq!(
        diff,
        ServerFrame::PresenceDiff {
            room: room("p"),
            joins: vec![UserId::parse("bob").unwrap()],
            leaves: vec![]
        }
    );
    let reference = alice
        .request(ClientBody::Presence { room: room("p") })
        .await
        .unwrap();
    match alice.reply(&reference).await.unwrap() {
        ServerFrame::Presence { users, .. } => {
            let names: Vec<_> = users
                .iter()
                .map(|u| (u.user_id.as_str().to_string(), u.connections))
                .collect();
            assert_eq!(names, vec![("alice".to_string(), 1), ("bob".to_string(), 1)]);
        }
        other => panic!("{other:?}"),
    }
    bob.close().await.unwrap();
    let diff = alice
        .until(
            "presence_diff leave",
            |f| matches!(f, ServerFrame::PresenceDiff { leaves, .. } if !leaves.is_empty()),
        )
        .await
        .unwrap();
    assert_eq!(
        diff,
        ServerFrame::PresenceDiff {
            room: room("p"),
            joins: vec![],
            leaves: vec![UserId::parse("bob").unwrap()]
        }
    );
    let response = server.http.get("/api/rooms/p/presence").await.unwrap();
    assert_eq!(
        response.body,
        json!({ "room": "p", "users": [{ "user_id": "alice", "connections": 1 }] })
    );
}

#[tokio::test]
async fn presence_diffs_are_only_sent_to_those_who_ask() {
    let server = Server::start(&[]).await;
    let (mut quiet, _) = server.connect("quiet").await;
    quiet.join("q", None).await.unwrap();
    let (mut bob, _) = server.connect("bob").await;
    bob.join("q", None).await.unwrap();
    bob.publish("q", json!("after the join"), None).await.unwrap();
    // Bob's presence_diff would have been queued before his publication; the quiet member did not
    // ask for presence events, so the publication is the next frame it gets.
    match quiet.frame().await.unwrap() {
        ServerFrame::Message { data, .. } => assert_eq!(data.to_value(), json!("after the join")),
        other => panic!("expected the message, got {other:?}"),
    }
}

#[tokio::test]
async fn history_queries() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = server.connect("alice").await;
    alice.join("h", None).await.unwrap();
    for n in 1..=5 {
        alice.publish("h", json!(n), None).await.unwrap();
    }
    let reference = alice
        .request(ClientBody::History {
            room: room("h"),
            since: Some(2),
            limit: Some(2),
        })
        .await
        .unwrap();
    match alice.reply(&reference).await.unwrap() {
        ServerFrame::History {
            offset, publications, ..
        } => {
            assert_eq!(offset, 5);
            assert_eq!(
                publications.iter().map(|p| p.offset).collect::<Vec<_>>(),
                vec![3, 4]
            );
            assert_eq!(publications[0].data.to_value(), json!(3));
        }
        other => panic!("{other:?}"),
    }
    let reference = alice
        .request(ClientBody::History {
            room: room("h"),
            since: None,
            limit: Some(2),
        })
        .await
        .unwrap();
    match alice.reply(&reference).await.unwrap() {
        ServerFrame::History { publications, .. } => assert_eq!(
            publications.iter().map(|p| p.offset).collect::<Vec<_>>(),
            vec![4, 5]
        ),
        other => panic!("{other:?}"),
    }
    let response = server.http.get("/api/rooms/h/history?since=4").await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body["publications"][0]["offset"], 5);
    assert_eq!(response.body["publications"][0]["from"], "alice");
}

#[tokio::test]
async fn direct_messages_reach_every_connection_and_wait_in_the_inbox() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = server.connect("alice").await;
    let (mut bob1, bob_session) = server.connect("bob").await;
    let mut bob2 = Client::connect(&server.ws_url(&format!("?session={bob_session}")))
        .await
        .unwrap();
    bob2.welcome().await.unwrap();
    let seq = alice.direct("bob", json!({ "hi": 1 })).await.unwrap();
    assert_eq!(seq, 1);
    for bob in [&mut bob1, &mut bob2] {
        match bob
            .until("direct", |f| matches!(f, ServerFrame::Direct { .. }))
            .await
            .unwrap()
        {
            ServerFrame::Direct { from, data, seq, .. } => {
                assert_eq!(from.unwrap().as_str(), "alice");
                assert_eq!(data.to_value(), json!({ "hi": 1 }));
                assert_eq!(seq, 1);
            }
            _ => unreachable!(),
        }
    }
    // Offline user: the message waits and arrives on connect, until acknowledged.
    assert_eq!(alice.direct("carol", json!("first")).await.unwrap(), 1);
    let response = server
        .http
        .post("/api/direct", &json!({ "to": "carol", "data": "second" }))
        .await
        .unwrap();
    assert_eq!(response.body["seq"], 2);
    let session = server.http.create_session("carol").await.unwrap();
    let mut carol = Client::connect(&server.ws_url(&format!("?session={session}")))
        .await
        .unwrap();
    assert!(matches!(
        carol.frame().await.unwrap(),
        ServerFrame::Welcome { inbox: 2, .. }
    ));
    let mut seqs = vec![];
    for _ in 0..2 {
        match carol.frame().await.unwrap() {
            ServerFrame::Direct { seq, from, .. } => {
                seqs.push(seq);
                if seq == 2 {
                    assert_eq!(from, None, "sent by the server");
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seqs, vec![1, 2]);
    let reference = carol.request(ClientBody::InboxAck { upto: 1 }).await.unwrap();
    assert!(matches!(
        carol.reply(&reference).await.unwrap(),
        ServerFrame::Ack {
            offset: None,
            seq: None,
            ..
        }
    ));
    carol.close().await.unwrap();
    let mut carol = Client::connect(&server.ws_url(&format!("?session={session}")))
        .await
        .unwrap();
    assert!(
        matches!(
            carol.frame().await.unwrap(),
            ServerFrame::Welcome { inbox: 1, .. }
        ),
        "seq 1 was acknowledged"
    );
    assert!(matches!(
        carol.frame().await.unwrap(),
        ServerFrame::Direct { seq: 2, .. }
    ));
}

#[tokio::test]
async fn broadcast_disconnect_and_session_termination() {
    let server = Server::start(&[]).await;
    let (mut alice, alice_session) = server.connect("alice").await;
    let (mut bob, _) = server.connect("bob").await;
    let response = server
        .http
        .post("/api/broadcast", &json!({ "data": { "notice": "maintenance" } }))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    for client in [&mut alice, &mut bob] {
        match client
            .until("system", |f| matches!(f, ServerFrame::System { .. }))
            .await
            .unwrap()
        {
            ServerFrame::System { data, .. } => {
                assert_eq!(data.to_value(), json!({ "notice": "maintenance" }))
            }
            _ => unreachable!(),
        }
    }
    let response = server
        .http
        .post("/api/disconnect", &json!({ "user_id": "bob" }))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(bob.closed().await.unwrap().0, Some(4003));
    assert_eq!(
        server
            .http
            .delete(&format!("/api/sessions/{alice_session}"))
            .await
            .unwrap()
            .status,
        204
    );
    assert_eq!(alice.closed().await.unwrap().0, Some(4001));
}

#[tokio::test]
async fn keepalive_pings_and_idle_timeout() {
    let server = Server::start(&[
        ("SWITCHYARD_PING_INTERVAL_SECS", "1"),
        ("SWITCHYARD_IDLE_TIMEOUT_SECS", "2"),
    ])
    .await;
    // A client that answers pings (tungstenite does while reading) outlives several idle timeouts.
    let (mut lively, _) = server.connect("alice").await;
    let mut pings = 0;
    while pings < 4 {
        match lively.raw().await.unwrap() {
            Some(WsMessage::Ping(_)) => pings += 1,
            Some(WsMessage::Close(frame)) => panic!("a client answering pings was closed: {frame:?}"),
            _ => {}
        }
    }
    still_works(&mut lively).await;
    // A client that never reads sends no pongs and is closed as idle.
    let session = server.http.create_session("bob").await.unwrap();
    let options = ConnectOptions::default();
    let mut silent = Client::connect_with(&server.ws_url(&format!("?session={session}")), &options)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let closes = server.metric("websocket_closes_total{code=\"1001\"}").await;
        if closes >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent connection was not closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let (code, reason) = silent.closed().await.unwrap();
    assert_eq!(code, Some(1001));
    assert_eq!(reason, "idle timeout");
}

#[tokio::test]
async fn slow_header_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start(&[("SWITCHYARD_HANDSHAKE_TIMEOUT_SECS", "1")]).await;
    let mut stream = switchyard_client::tcp_connect(server.addr, None).await.unwrap();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(std::time::Duration::from_secs(15), stream.read(&mut buf))
        .await
        .expect("not closed");
    match read {
        Ok(n) => {
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(
                n == 0 || text.starts_with("HTTP/1.1 408"),
                "unexpected answer: {text}"
            );
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
}

#[tokio::test]
async fn non_websocket_request_to_ws_is_refused_with_json() {
    let server = Server::start(&[]).await;
    let response = server.http.get("/ws").await.unwrap();
    assert_eq!(response.status, 426);
    assert_eq!(response.body["code"], "BAD_REQUEST");
}
