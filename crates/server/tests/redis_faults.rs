//! Redis faults with real Redis processes: client connections survive an outage, requests fail
//! fast with `UNAVAILABLE` (never a false ack), `/readyz` and the circuit breaker report it, and
//! after Redis returns every client's stream continues without a silent gap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Server, StreamCheck};
use serde_json::json;
use switchyard_proto::{ClientBody, ErrorCode, Payload, RoomName, ServerFrame};
use switchyard_testkit::redis::RedisProcess;

const FAULT_SETTINGS: [(&str, &str); 4] = [
    ("SWITCHYARD_BACKEND", "redis"),
    ("SWITCHYARD_REDIS_TIMEOUT_MS", "300"),
    ("SWITCHYARD_REDIS_BREAKER_FAILURES", "2"),
    ("SWITCHYARD_REDIS_BREAKER_COOLDOWN_MS", "300"),
];

async fn node(redis: &RedisProcess) -> Server {
    let url = redis.url();
    let mut env = FAULT_SETTINGS.to_vec();
    env.push(("SWITCHYARD_REDIS_URL", &url));
    Server::start(&env).await
}

#[tokio::test]
async fn redis_outage_fails_fast_and_the_stream_resumes_without_a_silent_gap() {
    let mut redis = RedisProcess::start().await;
    let server = node(&redis).await;
    let (mut alice, _) = server.connect("alice").await;
    let (_, epoch, _) = alice.join("r", None).await.unwrap();
    let (mut bob, _) = server.connect("bob").await;
    bob.join("r", None).await.unwrap();
    bob.publish("r", json!(1), None).await.unwrap();
    let mut stream = StreamCheck::new(&epoch, 0);
    stream.read_until(&mut alice, Some(&epoch), 1).await;

    redis.kill().await;
    // The WebSocket connection survives; publishing fails with UNAVAILABLE instead of an ack.
    let reference = bob
        .request(ClientBody::Publish {
            room: RoomName::parse("r").unwrap(),
            data: Payload::from_value(&2).unwrap(),
            id: None,
        })
        .await
        .unwrap();
    match bob.reply(&reference).await.unwrap() {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::Unavailable),
        other => panic!("a publish during the outage must not be acknowledged: {other:?}"),
    }
    let reference = alice.request(ClientBody::Ping).await.unwrap();
    assert!(
        matches!(alice.reply(&reference).await.unwrap(), ServerFrame::Pong { .. }),
        "connections survive the outage"
    );
    let api = server
        .http
        .post("/api/publish", &json!({ "room": "r", "data": 3 }))
        .await
        .unwrap();
    assert_eq!(api.status, 503);
    assert_eq!(api.body["code"], "UNAVAILABLE");
    server.wait_ready(503).await;
    assert!(
        server
            .metric("switchyard_backend_circuit_transitions_total{to=\"open\"}")
            .await
            >= 1.0
    );

    // Redis comes back empty (no persistence): the room's history is gone, so its epoch changes.
    redis.restart().await;
    server.wait_ready(200).await;
    assert!(
        server
            .metric("switchyard_backend_circuit_transitions_total{to=\"closed\"}")
            .await
            >= 1.0
    );
    let mut acked = Vec::new();
    for n in 0..3 {
        let response = server
            .http
            .post("/api/publish", &json!({ "room": "r", "data": n }))
            .await
            .unwrap();
        assert_eq!(response.status, 200, "{}", response.text);
        acked.push((
            response.body["offset"].as_u64().unwrap(),
            response.body["epoch"].as_str().unwrap().to_string(),
        ));
    }
    let (last_offset, new_epoch) = acked.last().cloned().unwrap();
    assert_ne!(new_epoch, epoch, "lost history means a new epoch");
    stream.read_until(&mut alice, Some(&new_epoch), last_offset).await;
    assert!(
        stream.resets >= 1,
        "the client was told that it could not be recovered"
    );
}

#[tokio::test]
async fn publications_missed_by_a_lost_subscriber_connection_come_from_history() {
    let redis = RedisProcess::start().await;
    let node_a = node(&redis).await;
    let node_b = node(&redis).await;
    let (mut alice, _) = node_a.connect("alice").await;
    let (_, epoch, _) = alice.join("r", None).await.unwrap();
    let (mut bob, _) = node_b.connect("bob").await;
    bob.join("r", None).await.unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let mut stream = StreamCheck::new(&epoch, 0);
    for round in 0..3u64 {
        // Cut every pub/sub connection, then publish while the nodes reconnect.
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut admin)
            .await
            .unwrap();
        assert!(killed >= 2, "both nodes' subscriber connections were cut");
        for n in 0..5 {
            bob.publish("r", json!({ "round": round, "n": n }), None)
                .await
                .unwrap();
        }
        stream.read_until(&mut alice, Some(&epoch), (round + 1) * 5).await;
    }
    assert_eq!(
        stream.resets, 0,
        "history covered every gap: nothing had to be reset"
    );
    assert_eq!(stream.last, 15);
}
