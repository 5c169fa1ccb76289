//! Smoke test of the load generator against the real server binary: a small `idle` ramp, a short
//! fixed-rate `fanout`, and the same fan-out over two nodes on one Redis (several `--url`). It
//! asserts behaviour only (every connection established, nothing lost or reordered, every
//! publication delivered to every subscriber of its room, on every node), never timings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use switchyard_bench::{FanoutConfig, IdleConfig, PublishRate, run_fanout, run_idle};
use switchyard_testkit::redis::RedisProcess;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The `switchyard` binary on 127.0.0.1 with a port chosen at run time; killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    async fn start() -> Server {
        Self::start_with(&[]).await
    }

    /// Starts it with these `SWITCHYARD_*` settings only (none from the environment of the test).
    async fn start_with(settings: &[(&str, &str)]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        command.arg("--listen").arg("127.0.0.1:0");
        for (key, _) in std::env::vars() {
            if key.starts_with("SWITCHYARD_") {
                command.env_remove(key);
            }
        }
        command.envs(settings.iter().copied());
        command
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("start switchyard");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("switchyard did not report its address in time")
            .expect("read stdout")
            .expect("switchyard exited before listening");
        let addr: SocketAddr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {line}"));
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server { child, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_ramp_establishes_every_connection() {
    let server = Server::start().await;
    let mut cfg = IdleConfig::new(server.url());
    cfg.connections = 20;
    cfg.rate = 200.0;
    cfg.hold = 0.5;
    cfg.sources = 2;
    cfg.sessions = 5;
    cfg.server_pid = vec![server.pid()];
    let report = run_idle(cfg).await.unwrap();
    assert_eq!(report.established, 20, "{report}");
    assert_eq!(report.failed, 0, "{report}");
    assert_eq!(report.dropped_while_holding, 0, "{report}");
    assert_eq!(report.connect_join_latency.samples, 20);
    assert!(report.server_rss_per_connection_bytes.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_everything_in_order() {
    let server = Server::start().await;
    let mut cfg = FanoutConfig::new(server.url());
    cfg.subscribers = 10;
    cfg.rooms = 2;
    cfg.publishers = 2;
    cfg.rate = PublishRate::PerSecond(20.0);
    cfg.duration = 2.0;
    cfg.payload = 64;
    cfg.sessions = 4;
    cfg.server_pid = vec![server.pid()];
    let report = run_fanout(cfg).await.unwrap();
    assert_eq!(report.subscribers_connected, 10, "{report}");
    assert_eq!(report.subscribers_dropped, 0, "{report}");
    assert_eq!(report.publish_errors, 0, "{report}");
    assert_eq!(report.unacknowledged, 0, "{report}");
    assert!(report.publications > 0, "{report}");
    assert_eq!(report.lost, 0, "{report}");
    assert_eq!(report.out_of_order, 0, "{report}");
    for room in &report.per_room {
        assert_eq!(room.subscribers, 5, "{report}");
        assert!(room.publications > 0, "{report}");
        assert_eq!(room.deliveries, room.publications * 5, "{report}");
        assert_eq!(room.lost, 0, "{report}");
        assert_eq!(room.out_of_order, 0, "{report}");
    }
    assert_eq!(report.deliveries, report.publications * 5, "{report}");
    assert_eq!(report.latency.samples, report.deliveries);
    assert_eq!(report.ack_latency.samples, report.acknowledged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_over_two_nodes_on_one_redis() {
    let redis = RedisProcess::start().await;
    let url = redis.url();
    let settings = [
        ("SWITCHYARD_BACKEND", "redis"),
        ("SWITCHYARD_REDIS_URL", url.as_str()),
    ];
    let nodes = [
        Server::start_with(&settings).await,
        Server::start_with(&settings).await,
    ];
    let mut cfg = FanoutConfig::nodes(nodes.iter().map(Server::url));
    cfg.subscribers = 12;
    cfg.rooms = 2;
    cfg.publishers = 2;
    cfg.rate = PublishRate::PerSecond(20.0);
    cfg.duration = 2.0;
    cfg.payload = 64;
    cfg.sessions = 3;
    cfg.server_pid = nodes.iter().map(Server::pid).collect();
    let report = run_fanout(cfg).await.unwrap();
    assert_eq!(report.subscribers_connected, 12, "{report}");
    assert_eq!(report.subscribers_dropped, 0, "{report}");
    assert_eq!(report.publish_errors, 0, "{report}");
    assert_eq!(report.unacknowledged, 0, "{report}");
    assert!(report.publications > 0, "{report}");
    assert_eq!(report.lost, 0, "{report}");
    assert_eq!(report.out_of_order, 0, "{report}");
    assert_eq!(report.deliveries, report.publications * 6, "{report}");
    assert_eq!(report.ack_latency.samples, report.acknowledged);
    assert_eq!(report.servers.len(), 2, "{report}");
    assert_eq!(report.nodes.len(), 2, "{report}");
    for node in &report.nodes {
        // Each node has 3 subscribers in each room and one publisher, and delivers every
        // publication of both rooms (published on either node) to its subscribers.
        assert_eq!(node.subscribers, 6, "{report}");
        assert_eq!(node.publishers, 1, "{report}");
        assert_eq!(node.deliveries, report.publications * 3, "{report}");
        assert_eq!(node.lost, 0, "{report}");
    }

    let mut cfg = IdleConfig::nodes(nodes.iter().map(Server::url));
    cfg.connections = 10;
    cfg.rate = 200.0;
    cfg.hold = 0.2;
    cfg.sessions = 3;
    let report = run_idle(cfg).await.unwrap();
    assert_eq!(report.established, 10, "{report}");
    assert_eq!(report.established_per_node, vec![5, 5], "{report}");
}

#[tokio::test]
async fn refuses_remote_targets() {
    let err = run_idle(IdleConfig::new("http://192.0.2.1:8000"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a loopback"), "{err}");
}
