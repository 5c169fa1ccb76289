//! A `rediss://` Redis: the node talks to a real TLS Redis whose certificate comes from a private
//! CA given in `redis_tls_ca_file`, and refuses to start when it cannot trust the certificate; the
//! same for a Redis Cluster whose clients, bus and replication all use TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Server, run_cli};
use serde_json::json;
use switchyard_proto::ServerFrame;
use switchyard_testkit::redis::{RedisCluster, TlsRedis};

#[tokio::test]
async fn a_tls_redis_with_a_private_ca() {
    let redis = TlsRedis::start().await;
    let url = redis.url();
    let ca_file = redis.certs.ca_file.to_string_lossy().into_owned();
    let settings = [
        ("SWITCHYARD_BACKEND", "redis"),
        ("SWITCHYARD_REDIS_URL", url.as_str()),
        ("SWITCHYARD_REDIS_TLS_CA_FILE", ca_file.as_str()),
    ];
    let node = Server::start(&settings).await;
    assert_eq!(node.http.get("/readyz").await.unwrap().status, 200);
    let (mut alice, _) = node.connect("alice").await;
    let (mut bob, _) = node.connect("bob").await;
    alice.join("r", None).await.unwrap();
    bob.join("r", None).await.unwrap();
    assert_eq!(bob.publish("r", json!("over tls"), None).await.unwrap(), 1);
    let message = alice
        .until("message", |f| matches!(f, ServerFrame::Message { .. }))
        .await
        .unwrap();
    assert!(
        matches!(&message, ServerFrame::Message { offset: 1, data, .. } if data.to_value() == json!("over tls")),
        "{message:?}"
    );

    // The publication is in this Redis (read over its plain port, which the node never used).
    let mut plain = redis::Client::open(redis.process.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*r*")
        .query_async(&mut plain)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "the room's keys are in the TLS Redis");

    // Without the CA the server's certificate is not trusted: the node says so and does not start.
    let (code, _, stderr) = run_cli(
        &["--listen", "127.0.0.1:0"],
        &[
            ("SWITCHYARD_BACKEND", "redis"),
            ("SWITCHYARD_REDIS_URL", url.as_str()),
        ],
    )
    .await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("cannot start the redis backend"), "{stderr}");

    // A CA file without a certificate is a configuration error naming the key.
    let (code, _, stderr) = run_cli(
        &["--listen", "127.0.0.1:0"],
        &[
            ("SWITCHYARD_BACKEND", "redis"),
            ("SWITCHYARD_REDIS_URL", url.as_str()),
            ("SWITCHYARD_REDIS_TLS_CA_FILE", "/dev/null"),
        ],
    )
    .await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("redis_tls_ca_file"), "{stderr}");
}

#[tokio::test]
async fn a_tls_redis_cluster() {
    let cluster = RedisCluster::start_tls().await;
    let urls = cluster.tls_urls().join(",");
    let ca_file = cluster
        .tls
        .as_ref()
        .map(|(_, certs)| certs.ca_file.to_string_lossy().into_owned())
        .unwrap();
    let settings = [
        ("SWITCHYARD_BACKEND", "redis"),
        ("SWITCHYARD_REDIS_CLUSTER_URLS", urls.as_str()),
        ("SWITCHYARD_REDIS_TLS_CA_FILE", ca_file.as_str()),
    ];
    let node_a = Server::start(&settings).await;
    let node_b = Server::start(&settings).await;
    assert_eq!(node_a.http.get("/readyz").await.unwrap().status, 200);
    let (mut alice, _) = node_a.connect("alice").await;
    let (mut bob, _) = node_b.connect("bob").await;
    // Rooms on different slots, so that more than one master is used.
    for room in ["r1", "r2", "r3"] {
        alice.join(room, None).await.unwrap();
        bob.join(room, None).await.unwrap();
        assert_eq!(bob.publish(room, json!(room), None).await.unwrap(), 1);
        let message = alice
            .until("message", |f| matches!(f, ServerFrame::Message { .. }))
            .await
            .unwrap();
        assert!(
            matches!(&message, ServerFrame::Message { offset: 1, data, .. } if data.to_value() == json!(room)),
            "{message:?}"
        );
    }
}
