//! Redis Cluster failover under traffic: a master is killed while publications flow; the service
//! continues without a restart, no client sees a silent gap, and the test measures how many
//! acknowledged publications the failover lost (Redis replicates asynchronously). With
//! `redis_ack_replicas = 1`, an acknowledgement means a replica has the publication: none is lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Server, StreamCheck};
use serde_json::json;
use switchyard_testkit::redis::RedisCluster;

/// Index (in `cluster.nodes`) of the master serving `slot`, if one does (not during a failover).
async fn master_of(cluster: &RedisCluster, slot: u16) -> Option<usize> {
    let client = redis::Client::open(cluster.urls()[0].as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut conn)
        .await
        .unwrap();
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
            continue;
        }
        let serves = fields[8..].iter().any(|range| {
            let mut bounds = range.split('-').filter_map(|b| b.parse::<u16>().ok());
            match (bounds.next(), bounds.next()) {
                (Some(a), Some(b)) => (a..=b).contains(&slot),
                (Some(a), None) => a == slot,
                _ => false,
            }
        });
        if serves {
            let port: u16 = fields[1]
                .split('@')
                .next()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            return cluster.nodes.iter().position(|n| n.port == port);
        }
    }
    None
}

/// Publishes `total` messages through the HTTP API of `node` (retrying each, with the same id,
/// until acknowledged), killing the room's master after `kill_after` acknowledgements. With
/// `rejoin`, the killed node is started again once its replica took over, so that the new master
/// has a replica again. Returns the acknowledged ids and the final (epoch, offset).
async fn publish_through_failover(
    node: &Server,
    cluster: &mut RedisCluster,
    total: usize,
    kill_after: usize,
    rejoin: bool,
) -> (Vec<String>, String, u64) {
    let slot = switchyard_redis::keys::slot("sy:{r}:meta");
    let master = master_of(cluster, slot)
        .await
        .expect("a master serves the room's slot");
    let mut acked = Vec::new();
    let mut last = (String::new(), 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    for n in 0..total {
        if n == kill_after {
            cluster.nodes[master].kill().await;
            if rejoin {
                while master_of(cluster, slot).await.is_none_or(|m| m == master) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                cluster.nodes[master].restart().await;
                cluster.wait_ok().await;
            }
        }
        let id = format!("m{n}");
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the service did not come back after the failover"
            );
            let response = node
                .http
                .post("/api/publish", &json!({ "room": "r", "data": n, "id": id }))
                .await
                .unwrap();
            if response.status == 200 {
                last = (
                    response.body["epoch"].as_str().unwrap().to_string(),
                    response.body["offset"].as_u64().unwrap(),
                );
                acked.push(id);
                break;
            }
            assert_eq!(response.body["code"], "UNAVAILABLE", "{}", response.text);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    (acked, last.0, last.1)
}

async fn failover(ack_replicas: &str) -> usize {
    let mut cluster = RedisCluster::start().await;
    let urls = cluster.urls().join(",");
    let env = [
        ("SWITCHYARD_BACKEND", "redis"),
        ("SWITCHYARD_REDIS_CLUSTER_URLS", urls.as_str()),
        ("SWITCHYARD_REDIS_TIMEOUT_MS", "500"),
        ("SWITCHYARD_REDIS_BREAKER_COOLDOWN_MS", "200"),
        ("SWITCHYARD_REDIS_ACK_REPLICAS", ack_replicas),
        ("SWITCHYARD_HISTORY_SIZE", "100000"),
    ];
    let node_a = Server::start(&env).await;
    let node_b = Server::start(&env).await;
    let (mut alice, _) = node_a.connect("alice").await;
    let (_, epoch, _) = alice.join("r", None).await.unwrap();
    let mut stream = StreamCheck::new(&epoch, 0);
    let rejoin = ack_replicas != "0";
    let (acked, final_epoch, final_offset) =
        publish_through_failover(&node_b, &mut cluster, 60, 20, rejoin).await;
    // The subscriber on the other node follows the whole way, told of any loss.
    stream
        .read_until(&mut alice, Some(&final_epoch), final_offset)
        .await;
    assert_ne!(final_epoch, epoch, "a new master starts a new epoch");
    assert!(stream.resets >= 1);
    let history = node_a
        .http
        .get("/api/rooms/r/history?since=0&limit=1000")
        .await
        .unwrap();
    let kept: HashSet<String> = history.body["publications"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_str().map(str::to_string))
        .collect();
    let lost = acked.iter().filter(|id| !kept.contains(*id)).count();
    eprintln!(
        "failover with redis_ack_replicas={ack_replicas}: {lost} of {} acknowledged publications lost",
        acked.len()
    );
    // The service continued without a restart: both nodes are ready again. (Right after the
    // failover a node may still answer 503 for a moment: its readiness PINGs every master of its
    // cluster map, and a map that still lists the dead master fails until it is refreshed.)
    for node in [&node_a, &node_b] {
        node.wait_ready(200).await;
    }
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_failover_under_traffic() {
    // Asynchronous replication: the count is measured and reported, not asserted (it is often 0).
    failover("0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_failover_with_replica_acks_loses_nothing_acknowledged() {
    assert_eq!(failover("1").await, 0);
}

/// One Redis command on cluster node `index` (by its own port, no redirection).
async fn on_node<T: redis::FromRedisValue>(cluster: &RedisCluster, index: usize, cmd: &redis::Cmd) -> T {
    let client = redis::Client::open(cluster.nodes[index].url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rooms_slot_moving_to_another_master_keeps_its_stream() {
    let cluster = RedisCluster::start().await;
    let urls = cluster.urls().join(",");
    let settings = [
        ("SWITCHYARD_BACKEND", "redis"),
        ("SWITCHYARD_REDIS_CLUSTER_URLS", urls.as_str()),
    ];
    let node_a = Server::start(&settings).await;
    let node_b = Server::start(&settings).await;
    let (mut alice, _) = node_a.connect("alice").await;
    let (mut bob, _) = node_b.connect("bob").await;
    let (_, epoch, _) = alice.join("moving", None).await.unwrap();
    bob.join("moving", None).await.unwrap();
    let mut check = StreamCheck::new(&epoch, 0);
    for n in 1..=3 {
        assert_eq!(bob.publish("moving", json!(n), None).await.unwrap(), n);
    }
    check.read_until(&mut alice, Some(&epoch), 3).await;

    // Move the room's slot, keys included, to another master (what `redis-cli --cluster reshard`
    // does, for one slot).
    let slot: u16 = on_node(
        &cluster,
        0,
        redis::cmd("CLUSTER").arg("KEYSLOT").arg("sy:{moving}:meta"),
    )
    .await;
    let source = master_of(&cluster, slot).await.unwrap();
    let mut target = None;
    for index in 0..cluster.nodes.len() {
        let info: String = on_node(&cluster, index, redis::cmd("INFO").arg("replication")).await;
        if index != source && info.contains("role:master") {
            target = Some(index);
            break;
        }
    }
    let target = target.expect("another master");
    let source_id: String = on_node(&cluster, source, redis::cmd("CLUSTER").arg("MYID")).await;
    let target_id: String = on_node(&cluster, target, redis::cmd("CLUSTER").arg("MYID")).await;
    let _: () = on_node(
        &cluster,
        target,
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&source_id),
    )
    .await;
    let _: () = on_node(
        &cluster,
        source,
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&target_id),
    )
    .await;
    loop {
        let keys: Vec<String> = on_node(
            &cluster,
            source,
            redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(100),
        )
        .await;
        if keys.is_empty() {
            break;
        }
        let _: () = on_node(
            &cluster,
            source,
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(cluster.nodes[target].port)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys),
        )
        .await;
    }
    for index in [target, source] {
        let _: () = on_node(
            &cluster,
            index,
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&target_id),
        )
        .await;
    }
    assert_eq!(master_of(&cluster, slot).await, Some(target));

    // Publishing goes on against the new owner; alice's stream goes on without a silent gap. The
    // new master starts a new epoch (a publish cannot tell a migration from a failover), so alice
    // may see one reset, and then every publication.
    for n in 4..=6 {
        bob.publish("moving", json!(n), None).await.unwrap();
    }
    let top = node_b
        .http
        .get("/api/rooms/moving/history?limit=1")
        .await
        .unwrap()
        .body;
    let top_epoch = top["epoch"].as_str().unwrap().to_string();
    let top_offset = top["offset"].as_u64().unwrap();
    assert_eq!(top_offset, 6, "offsets continue on the new master: {top}");
    tokio::time::timeout(
        Duration::from_secs(30),
        check.read_until(&mut alice, Some(&top_epoch), top_offset),
    )
    .await
    .expect("alice's stream continues after the slot moved");
    assert!(check.resets <= 1, "at most the one reset of the new epoch");
}
