//! Three nodes on one Redis act as one service: ordered cross-node delivery, recovery on another
//! node, presence/history agreement, idempotency, direct messages, broadcasts, seed-format sessions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Server;
use serde_json::json;
use switchyard_client::Client;
use switchyard_proto::{ServerFrame, StreamPosition};
use switchyard_testkit::redis::RedisProcess;

async fn nodes(redis: &RedisProcess, n: usize) -> Vec<Server> {
    let url = redis.url();
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(Server::start(&[("SWITCHYARD_BACKEND", "redis"), ("SWITCHYARD_REDIS_URL", &url)]).await);
    }
    nodes
}

async fn messages(client: &mut Client, n: usize) -> Vec<(u64, serde_json::Value)> {
    let mut got = Vec::new();
    while got.len() < n {
        if let ServerFrame::Message { offset, data, .. } = client
            .until("message", |f| matches!(f, ServerFrame::Message { .. }))
            .await
            .unwrap()
        {
            got.push((offset, data.to_value()));
        }
    }
    got
}

#[tokio::test]
async fn publications_cross_nodes_in_offset_order() {
    let redis = RedisProcess::start().await;
    let nodes = nodes(&redis, 3).await;
    let mut clients = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let (mut client, _) = node.connect(&format!("user{i}")).await;
        client.join("r", None).await.unwrap();
        clients.push(client);
    }
    for round in 0..5 {
        for (i, client) in clients.iter_mut().enumerate() {
            client
                .publish("r", json!({ "from": i, "round": round }), None)
                .await
                .unwrap();
        }
    }
    let mut seen = Vec::new();
    for client in &mut clients {
        let got = messages(client, 15).await;
        assert_eq!(
            got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            (1..=15).collect::<Vec<_>>(),
            "offset order, no gap"
        );
        seen.push(got);
    }
    assert!(
        seen.windows(2).all(|w| w[0] == w[1]),
        "every node delivers the same sequence"
    );
}

#[tokio::test]
async fn rejoin_on_another_node_recovers_exactly_what_was_missed() {
    let redis = RedisProcess::start().await;
    let nodes = nodes(&redis, 2).await;
    let (mut alice, session) = nodes[0].connect("alice").await;
    let (mut bob, _) = nodes[1].connect("bob").await;
    let (_, epoch, _) = alice.join("r", None).await.unwrap();
    bob.join("r", None).await.unwrap();
    bob.publish("r", json!(1), None).await.unwrap();
    assert_eq!(messages(&mut alice, 1).await[0].0, 1);
    alice.close().await.unwrap();
    for n in 2..=4 {
        bob.publish("r", json!(n), None).await.unwrap();
    }
    let mut alice = Client::connect(&nodes[1].ws_url(&format!("?session={session}")))
        .await
        .unwrap();
    alice.welcome().await.unwrap();
    let (offset, _, recovered) = alice
        .join("r", Some(StreamPosition { offset: 1, epoch }))
        .await
        .unwrap();
    assert_eq!((offset, recovered), (4, true));
    assert_eq!(
        messages(&mut alice, 3).await,
        vec![(2, json!(2)), (3, json!(3)), (4, json!(4))]
    );
    bob.publish("r", json!(5), None).await.unwrap();
    assert_eq!(messages(&mut alice, 1).await, vec![(5, json!(5))]);
}

#[tokio::test]
async fn presence_history_and_idempotency_agree_on_every_node() {
    let redis = RedisProcess::start().await;
    let nodes = nodes(&redis, 3).await;
    let (mut alice, _) = nodes[0].connect("alice").await;
    let (mut bob, _) = nodes[1].connect("bob").await;
    alice.join_with("p", None, true).await.unwrap();
    bob.join_with("p", None, true).await.unwrap();
    let diff = alice
        .until("bob's join", |f| matches!(f, ServerFrame::PresenceDiff { joins, .. } if joins.iter().any(|u| u.as_str() == "bob")))
        .await;
    assert!(diff.is_ok(), "presence_diff crosses nodes");
    let first = alice.publish("p", json!("once"), Some("k1")).await.unwrap();
    let again = nodes[2]
        .http
        .post(
            "/api/publish",
            &json!({ "room": "p", "data": "once", "id": "k1" }),
        )
        .await
        .unwrap();
    assert_eq!(
        again.body["offset"], first,
        "the same id on another node returns the first offset"
    );
    assert_eq!(again.body["duplicate"], true);
    bob.publish("p", json!("twice"), None).await.unwrap();
    let expected_users =
        json!([{ "user_id": "alice", "connections": 1 }, { "user_id": "bob", "connections": 1 }]);
    let mut histories = Vec::new();
    for node in &nodes {
        let presence = node.http.get("/api/rooms/p/presence").await.unwrap();
        assert_eq!(presence.body["users"], expected_users);
        histories.push(node.http.get("/api/rooms/p/history").await.unwrap().body);
    }
    assert!(histories.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        histories[0]["publications"].as_array().unwrap().len(),
        2,
        "the duplicate was not stored"
    );
    let got = messages(&mut bob, 2).await;
    assert_eq!(
        got,
        vec![(1, json!("once")), (2, json!("twice"))],
        "delivered once"
    );
}

#[tokio::test]
async fn direct_broadcast_and_disconnect_reach_every_node() {
    let redis = RedisProcess::start().await;
    let nodes = nodes(&redis, 3).await;
    let (mut alice, _) = nodes[0].connect("alice").await;
    let (mut bob_a, bob_session) = nodes[1].connect("bob").await;
    let mut bob_b = Client::connect(&nodes[2].ws_url(&format!("?session={bob_session}")))
        .await
        .unwrap();
    bob_b.welcome().await.unwrap();
    let seq = alice.direct("bob", json!("hi")).await.unwrap();
    for bob in [&mut bob_a, &mut bob_b] {
        let frame = bob
            .until("direct", |f| matches!(f, ServerFrame::Direct { .. }))
            .await
            .unwrap();
        assert!(
            matches!(frame, ServerFrame::Direct { seq: s, .. } if s == seq),
            "{frame:?}"
        );
    }
    // Offline: stored, delivered on connect to whichever node.
    alice.direct("carol", json!("later")).await.unwrap();
    let session = nodes[0].http.create_session("carol").await.unwrap();
    let mut carol = Client::connect(&nodes[2].ws_url(&format!("?session={session}")))
        .await
        .unwrap();
    assert!(matches!(
        carol.frame().await.unwrap(),
        ServerFrame::Welcome { inbox: 1, .. }
    ));
    assert!(matches!(
        carol.frame().await.unwrap(),
        ServerFrame::Direct { seq: 1, .. }
    ));

    nodes[1]
        .http
        .post("/api/broadcast", &json!({ "data": "all" }))
        .await
        .unwrap();
    for client in [&mut alice, &mut bob_a, &mut bob_b, &mut carol] {
        assert!(
            client
                .until("system", |f| matches!(f, ServerFrame::System { .. }))
                .await
                .is_ok()
        );
    }
    nodes[0]
        .http
        .post("/api/disconnect", &json!({ "user_id": "bob" }))
        .await
        .unwrap();
    assert_eq!(bob_a.closed().await.unwrap().0, Some(4003));
    assert_eq!(bob_b.closed().await.unwrap().0, Some(4003));
}

#[tokio::test]
async fn sessions_are_shared_in_the_seed_format() {
    let redis = RedisProcess::start().await;
    let nodes = nodes(&redis, 2).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // Written the way the seed's Django SessionManager writes it (json.dumps, SETEX 3600).
    let seed_json = r#"{"user_id": "dana", "created_at": "2026-11-27T07:00:00.123456", "preferences": {}, "status": "active"}"#;
    let _: () = redis::cmd("SETEX")
        .arg("session:seed-made")
        .arg(3600)
        .arg(seed_json)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut dana = Client::connect(&nodes[1].ws_url("?session=seed-made"))
        .await
        .unwrap();
    assert!(
        matches!(dana.welcome().await.unwrap(), ServerFrame::Welcome { ref user_id, .. } if user_id.as_str() == "dana")
    );
    // And the other way round: what Switchyard writes, the seed reads.
    let id = nodes[0].http.create_session("erik").await.unwrap();
    let raw: String = redis::cmd("GET")
        .arg(format!("session:{id}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let stored: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(stored["user_id"], "erik");
    assert_eq!(stored["status"], "active");
    assert!(stored["created_at"].is_string() && stored["preferences"].is_object());
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("session:{id}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((3590..=3600).contains(&ttl), "TTL {ttl}");
    assert_eq!(
        nodes[1]
            .http
            .get(&format!("/api/sessions/{id}"))
            .await
            .unwrap()
            .status,
        200
    );
    dana.close().await.unwrap();
}

#[tokio::test]
async fn a_crashed_nodes_members_leave_within_the_presence_ttl() {
    let redis = RedisProcess::start().await;
    let url = redis.url();
    let env = [
        ("SWITCHYARD_BACKEND", "redis"),
        ("SWITCHYARD_REDIS_URL", url.as_str()),
        ("SWITCHYARD_REDIS_PRESENCE_TTL_SECS", "2"),
    ];
    let mut node_a = Server::start(&env).await;
    let node_b = Server::start(&env).await;
    let (mut alice, _) = node_a.connect("alice").await;
    alice.join("r", None).await.unwrap();
    let (mut bob, _) = node_b.connect("bob").await;
    bob.join_with("r", None, true).await.unwrap();
    let users = node_b.http.get("/api/rooms/r/presence").await.unwrap().body["users"].clone();
    assert_eq!(users.as_array().unwrap().len(), 2);
    node_a.kill().await;
    // Node A can no longer say goodbye; its entries expire and node B reports the leave.
    let diff = bob
        .until("alice's leave", |f| matches!(f, ServerFrame::PresenceDiff { leaves, .. } if leaves.iter().any(|u| u.as_str() == "alice")))
        .await;
    assert!(diff.is_ok(), "{diff:?}");
    let users = node_b.http.get("/api/rooms/r/presence").await.unwrap().body["users"].clone();
    assert_eq!(users, json!([{ "user_id": "bob", "connections": 1 }]));
}

#[tokio::test]
async fn a_session_is_disconnected_only_when_its_last_connection_on_any_node_closes() {
    let redis = RedisProcess::start().await;
    let nodes = nodes(&redis, 2).await;
    let (on_a, session) = nodes[0].connect("fay").await;
    let mut on_b = Client::connect(&nodes[1].ws_url(&format!("?session={session}")))
        .await
        .unwrap();
    on_b.welcome().await.unwrap();
    on_a.close().await.unwrap();
    // Node A has finished closing once its active-connection gauge is back to zero.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while nodes[0].metric("websocket_active_connections").await != 0.0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let status = |body: serde_json::Value| body["status"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        status(
            nodes[1]
                .http
                .get(&format!("/api/sessions/{session}"))
                .await
                .unwrap()
                .body
        ),
        "active"
    );
    on_b.close().await.unwrap();
    while status(
        nodes[0]
            .http
            .get(&format!("/api/sessions/{session}"))
            .await
            .unwrap()
            .body,
    ) != "disconnected"
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the last close marks the session disconnected"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn many_clients_leaving_at_once_leave_presence_and_sessions_clean() {
    let redis = RedisProcess::start().await;
    let nodes = nodes(&redis, 1).await;
    let node = &nodes[0];
    let mut clients = Vec::new();
    let mut sessions = Vec::new();
    for i in 0..300 {
        let (mut client, session) = node.connect(&format!("crowd{i}")).await;
        client.join("crowd", None).await.unwrap();
        clients.push(client);
        sessions.push(session);
    }
    let users = node.http.get("/api/rooms/crowd/presence").await.unwrap().body["users"].clone();
    assert_eq!(users.as_array().unwrap().len(), 300);
    let closing: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(async move { client.close().await }))
        .collect();
    for close in closing {
        close.await.unwrap().unwrap();
    }
    // The gauge drops once a close has finished its clean-up (presence, session status).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while node.metric("websocket_active_connections").await != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "every close finishes");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let users = node.http.get("/api/rooms/crowd/presence").await.unwrap().body["users"].clone();
    assert_eq!(users, json!([]), "nobody is left present");
    for session in &sessions {
        let body = node
            .http
            .get(&format!("/api/sessions/{session}"))
            .await
            .unwrap()
            .body;
        assert_eq!(body["status"], "disconnected", "{session}: {body}");
    }
    let metrics = node.http.get("/metrics").await.unwrap().text;
    assert!(
        metrics.contains("switchyard_backend_errors_total 0"),
        "no clean-up failed:\n{metrics}"
    );
}
