//! Delivery rules 4, 5 and 7 of DESIGN.md §3 over real sockets: recovery on rejoin, slow consumers
//! closed with 4008 and recovering, and draining.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::Server;
use serde_json::json;
use switchyard_client::{Client, ConnectOptions, Event};
use switchyard_proto::{ServerFrame, StreamPosition};

async fn next_message(client: &mut Client) -> (u64, serde_json::Value) {
    match client
        .until("message", |f| matches!(f, ServerFrame::Message { .. }))
        .await
        .unwrap()
    {
        ServerFrame::Message { offset, data, .. } => (offset, data.to_value()),
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn rejoin_recovers_exactly_the_missed_publications() {
    let server = Server::start(&[]).await;
    let (mut alice, alice_session) = server.connect("alice").await;
    let (mut bob, _) = server.connect("bob").await;
    let (_, epoch, _) = alice.join("r", None).await.unwrap();
    bob.join("r", None).await.unwrap();
    bob.publish("r", json!(1), None).await.unwrap();
    assert_eq!(next_message(&mut alice).await, (1, json!(1)));
    alice.close().await.unwrap();
    for n in 2..=4 {
        bob.publish("r", json!(n), None).await.unwrap();
    }
    let mut alice = Client::connect(&server.ws_url(&format!("?session={alice_session}")))
        .await
        .unwrap();
    alice.welcome().await.unwrap();
    let (offset, epoch_now, recovered) = alice
        .join(
            "r",
            Some(StreamPosition {
                offset: 1,
                epoch: epoch.clone(),
            }),
        )
        .await
        .unwrap();
    assert_eq!((offset, &epoch_now, recovered), (4, &epoch, true));
    for n in 2..=4u64 {
        assert_eq!(
            next_message(&mut alice).await,
            (n, json!(n)),
            "exactly the missed ones, in order"
        );
    }
    bob.publish("r", json!(5), None).await.unwrap();
    assert_eq!(
        next_message(&mut alice).await,
        (5, json!(5)),
        "then live ones, without a gap or repeat"
    );
    alice.leave_and_rejoin_wrong_epoch(&epoch).await;
}

trait WrongEpoch {
    async fn leave_and_rejoin_wrong_epoch(&mut self, epoch: &str);
}

impl WrongEpoch for Client {
    async fn leave_and_rejoin_wrong_epoch(&mut self, epoch: &str) {
        let reference = self
            .request(switchyard_proto::ClientBody::Leave {
                room: switchyard_proto::RoomName::parse("r").unwrap(),
            })
            .await
            .unwrap();
        self.reply(&reference).await.unwrap();
        let (offset, _, recovered) = self
            .join(
                "r",
                Some(StreamPosition {
                    offset: 2,
                    epoch: format!("{epoch}-old"),
                }),
            )
            .await
            .unwrap();
        assert_eq!(
            (offset, recovered),
            (5, false),
            "another epoch cannot be recovered"
        );
    }
}

#[tokio::test]
async fn recovery_fails_whole_when_history_is_too_short() {
    let server = Server::start(&[("SWITCHYARD_HISTORY_SIZE", "3")]).await;
    let (mut bob, _) = server.connect("bob").await;
    let (_, epoch, _) = bob.join("r", None).await.unwrap();
    for n in 1..=6 {
        bob.publish("r", json!(n), None).await.unwrap();
    }
    let (mut alice, _) = server.connect("alice").await;
    let (offset, _, recovered) = alice
        .join(
            "r",
            Some(StreamPosition {
                offset: 1,
                epoch: epoch.clone(),
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        (offset, recovered),
        (6, false),
        "offsets 2 and 3 are gone: no partial replay"
    );
    bob.publish("r", json!(7), None).await.unwrap();
    assert_eq!(
        next_message(&mut alice).await,
        (7, json!(7)),
        "the first message after joined is live"
    );
    let (mut carol, _) = server.connect("carol").await;
    let (offset, _, recovered) = carol
        .join("r", Some(StreamPosition { offset: 4, epoch }))
        .await
        .unwrap();
    assert_eq!((offset, recovered), (7, true));
    for n in 5..=7u64 {
        assert_eq!(next_message(&mut carol).await.0, n);
    }
}

#[tokio::test]
async fn slow_consumer_is_closed_with_4008_and_recovers() {
    let server = Server::start(&[
        ("SWITCHYARD_QUEUE_CAPACITY", "20"),
        ("SWITCHYARD_QUEUE_MAX_BYTES", "65536"),
        ("SWITCHYARD_HISTORY_SIZE", "100000"),
    ])
    .await;
    let (mut publisher, _) = server.connect("pub").await;
    let (_, epoch, _) = publisher.join("firehose", None).await.unwrap();
    let session = server.http.create_session("slow").await.unwrap();
    let options = ConnectOptions {
        recv_buffer: Some(4096),
        ..ConnectOptions::default()
    };
    let mut slow = Client::connect_with(&server.ws_url(&format!("?session={session}")), &options)
        .await
        .unwrap();
    slow.welcome().await.unwrap();
    slow.join("firehose", None).await.unwrap();
    // The slow client stops reading. Publish until the server reports it gone (presence leave).
    let payload = "x".repeat(8 * 1024);
    let mut published = 0u64;
    let mut left = false;
    while !left {
        assert!(published < 20_000, "the slow consumer was never closed");
        publisher
            .publish("firehose", json!({ "pad": payload }), None)
            .await
            .unwrap();
        published += 1;
        if published.is_multiple_of(50) {
            let presence = server.http.get("/api/rooms/firehose/presence").await.unwrap();
            left = presence.body["users"]
                .as_array()
                .unwrap()
                .iter()
                .all(|u| u["user_id"] != "slow");
        }
    }
    assert!(server.metric("websocket_slow_consumers_total").await >= 1.0);
    // Now it reads: what was written before the overflow, then close 4008.
    let mut last_offset = 0;
    let code = loop {
        match slow.recv().await.unwrap() {
            Event::Frame(ServerFrame::Message { offset, .. }) => {
                assert_eq!(offset, last_offset + 1, "no gap before the close");
                last_offset = offset;
            }
            Event::Closed { code, .. } => break code,
            _ => {}
        }
    };
    assert_eq!(code, Some(4008));
    assert!(
        last_offset < published,
        "the close came before the end of the stream"
    );
    // Reconnect and recover from the last offset seen: everything after it, in order.
    let mut again = Client::connect(&server.ws_url(&format!("?session={session}")))
        .await
        .unwrap();
    again.welcome().await.unwrap();
    let (top, _, recovered) = again
        .join(
            "firehose",
            Some(StreamPosition {
                offset: last_offset,
                epoch,
            }),
        )
        .await
        .unwrap();
    assert!(
        recovered,
        "last offset {last_offset}, published {published}, top {top}"
    );
    assert_eq!(top, published);
    for expected in last_offset + 1..=published {
        assert_eq!(next_message(&mut again).await.0, expected);
    }
}

#[tokio::test]
async fn drain_on_sigterm_tells_clients_to_reconnect_in_batches_and_exits() {
    let mut server = Server::start(&[
        ("SWITCHYARD_DRAIN_BATCH_SIZE", "1"),
        ("SWITCHYARD_DRAIN_BATCH_INTERVAL_MS", "1000"),
        ("SWITCHYARD_RECONNECT_JITTER_MS", "500"),
    ])
    .await;
    let mut clients = Vec::new();
    for n in 0..4 {
        clients.push(server.connect(&format!("user{n}")).await.0);
    }
    server.terminate();
    // The node says it is not ready and takes no new connections, while the clients are still on.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.http.get("/readyz").await.unwrap().status != 503 {
        assert!(tokio::time::Instant::now() < deadline, "readyz never turned 503");
        tokio::task::yield_now().await;
    }
    let refused = Client::connect(&server.ws_url("?session=x")).await;
    assert!(
        refused.is_err(),
        "a draining node refuses new WebSocket connections"
    );
    for client in &mut clients {
        match client
            .until("reconnect", |f| matches!(f, ServerFrame::Reconnect { .. }))
            .await
            .unwrap()
        {
            ServerFrame::Reconnect { after_ms, reason } => {
                assert!(after_ms <= 500);
                assert_eq!(reason, "draining");
            }
            _ => unreachable!(),
        }
        assert_eq!(client.closed().await.unwrap().0, Some(1012));
    }
    assert_eq!(server.wait_exit(Duration::from_secs(30)).await, Some(0));
}

#[tokio::test]
async fn drain_over_the_api() {
    let mut server = Server::start(&[]).await;
    let (mut client, _) = server.connect("alice").await;
    let response = server.http.post("/api/drain", &json!({})).await.unwrap();
    assert_eq!(response.status, 202);
    assert!(
        client
            .until("reconnect", |f| matches!(f, ServerFrame::Reconnect { .. }))
            .await
            .is_ok()
    );
    assert_eq!(client.closed().await.unwrap().0, Some(1012));
    assert_eq!(server.wait_exit(Duration::from_secs(30)).await, Some(0));
}

#[tokio::test]
async fn a_write_blocked_longer_than_the_write_timeout_closes_with_4008() {
    let server = Server::start(&[
        ("SWITCHYARD_WRITE_TIMEOUT_SECS", "1"),
        ("SWITCHYARD_QUEUE_CAPACITY", "1000000"),
        ("SWITCHYARD_QUEUE_MAX_BYTES", "1000000000"),
        ("SWITCHYARD_QUEUE_EXPIRY_SECS", "600"),
    ])
    .await;
    let (mut publisher, _) = server.connect("pub").await;
    publisher.join("w", None).await.unwrap();
    let session = server.http.create_session("stuck").await.unwrap();
    let options = ConnectOptions {
        recv_buffer: Some(4096),
        ..ConnectOptions::default()
    };
    let mut stuck = Client::connect_with(&server.ws_url(&format!("?session={session}")), &options)
        .await
        .unwrap();
    stuck.welcome().await.unwrap();
    stuck.join("w", None).await.unwrap();
    // The stuck client reads nothing; its socket fills and the server's write blocks.
    let payload = "y".repeat(16 * 1024);
    let mut published = 0;
    loop {
        assert!(published < 20_000, "the blocked writer was never cut off");
        publisher
            .publish("w", json!({ "pad": payload }), None)
            .await
            .unwrap();
        published += 1;
        if published % 25 == 0 {
            let presence = server.http.get("/api/rooms/w/presence").await.unwrap();
            if presence.body["users"]
                .as_array()
                .unwrap()
                .iter()
                .all(|u| u["user_id"] != "stuck")
            {
                break;
            }
        }
    }
    let (code, reason) = stuck.closed().await.unwrap();
    assert_eq!(code, Some(4008));
    assert!(reason.contains("write timed out"), "{reason}");
}

#[tokio::test]
async fn a_write_delay_still_delivers_everything_in_order_and_acks_every_publish() {
    let server = Server::start(&[("SWITCHYARD_WRITE_DELAY_MS", "30")]).await;
    let (mut alice, _) = server.connect("alice").await;
    let (mut bob, _) = server.connect("bob").await;
    alice.join("r", None).await.unwrap();
    bob.join("r", None).await.unwrap();
    for n in 1..=20u64 {
        let offset = bob.publish("r", json!(n), None).await.unwrap();
        assert_eq!(offset, n, "each publish is acknowledged with its offset");
    }
    for n in 1..=20u64 {
        assert_eq!(next_message(&mut alice).await, (n, json!(n)));
    }
}
