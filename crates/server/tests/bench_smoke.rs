//! Smoke test of the load generator against the real server binary: a small `idle` ramp, a short
//! fixed-rate `fanout` (also with server broadcasts), the same fan-out over two nodes on one Redis
//! (several `--url`), short `rtt` and `churn` runs, and every scenario spread over worker processes
//! at a tiny per-process limit. It asserts behaviour only (every connection established, nothing
//! lost or reordered, every publication delivered to every subscriber of its room, every broadcast
//! to every subscriber, on every node and in every worker process, every pong matched, the churn's
//! counts adding up), never timings.
//!
//! The worker processes of these tests are this test binary itself, started with a filter that
//! runs only [`bench_worker_process_entry`] (which serves the worker side when
//! `SWITCHYARD_BENCH_TEST_WORKER` is set): the `switchyard-bench` executable is not built for the
//! server's tests. Its `worker` subcommand runs the same [`switchyard_bench::worker::serve_stdio`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use switchyard_bench::{
    ChurnConfig, FanoutConfig, FanoutReport, IdleConfig, Lifetimes, PublishRate, RttConfig, WorkerCommand,
    WorkerOptions, run_churn, run_fanout, run_idle, run_rtt,
};
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
async fn scenarios_send_the_api_key_of_a_protected_server() {
    let key = "bench-smoke-key-0123456789";
    let server = Server::start_with(&[("SWITCHYARD_API_KEY", key)]).await;
    let idle = |api_key: Option<&str>| {
        let mut cfg = IdleConfig::new(server.url());
        cfg.connections = 4;
        cfg.rate = 100.0;
        cfg.hold = 0.1;
        cfg.sessions = 2;
        cfg.api_key = api_key.map(str::to_string);
        cfg
    };
    let refused = run_idle(idle(None)).await.unwrap_err();
    assert!(format!("{refused:#}").contains("401"), "{refused:#}");
    let report = run_idle(idle(Some(key))).await.unwrap();
    assert_eq!(report.established, 4, "{report}");

    let mut cfg = FanoutConfig::new(server.url());
    cfg.subscribers = 4;
    cfg.rate = PublishRate::PerSecond(20.0);
    cfg.duration = 0.3;
    cfg.sessions = 2;
    cfg.broadcasts = 1;
    cfg.api_key = Some(key.to_string());
    let report = run_fanout(cfg).await.unwrap();
    assert_eq!((report.subscribers_connected, report.lost), (4, 0), "{report}");
    assert_every_broadcast_delivered(&json_line(&report), 1, 4);
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

/// The report as `switchyard-bench fanout --json` prints it: one JSON line, read back.
fn json_line(report: &FanoutReport) -> serde_json::Value {
    let line = serde_json::to_string(report).unwrap();
    assert!(!line.contains('\n'));
    serde_json::from_str(&line).unwrap()
}

/// Asserts from the JSON line that `broadcasts` broadcasts were sent and that each reached every
/// one of the `subscribers` subscribers, with a latency sample per delivery.
fn assert_every_broadcast_delivered(json: &serde_json::Value, broadcasts: u64, subscribers: u64) {
    assert_eq!(json["broadcasts"], broadcasts, "{json}");
    assert_eq!(json["broadcasts_sent"], broadcasts, "{json}");
    assert_eq!(json["broadcast_errors"], 0, "{json}");
    assert_eq!(json["subscribers_connected"], subscribers, "{json}");
    assert_eq!(
        json["expected_broadcast_deliveries"],
        broadcasts * subscribers,
        "{json}"
    );
    assert_eq!(
        json["broadcast_deliveries"], json["expected_broadcast_deliveries"],
        "{json}"
    );
    assert_eq!(json["subscribers_all_broadcasts"], subscribers, "{json}");
    assert_eq!(
        json["broadcast_latency"]["samples"],
        broadcasts * subscribers,
        "{json}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_broadcasts_reach_every_subscriber() {
    let server = Server::start().await;
    let mut cfg = FanoutConfig::new(server.url());
    cfg.subscribers = 6;
    cfg.rooms = 2;
    cfg.publishers = 1;
    cfg.rate = PublishRate::PerSecond(20.0);
    cfg.duration = 0.5;
    cfg.payload = 64;
    cfg.sessions = 2;
    cfg.broadcasts = 2;
    cfg.broadcast_interval = 0.05;
    let report = run_fanout(cfg).await.unwrap();
    let json = json_line(&report);
    assert_every_broadcast_delivered(&json, 2, 6);
    // The broadcasts do not count as publications, nor disturb their checks.
    assert_eq!((report.lost, report.out_of_order), (0, 0), "{report}");
    assert_eq!(report.deliveries, report.publications * 3, "{report}");
    assert_eq!(report.latency.samples, report.deliveries, "{report}");
    assert_eq!(json["nodes"][0]["broadcast_deliveries"], 12, "{json}");
    assert_eq!(json["nodes"][0]["expected_broadcast_deliveries"], 12, "{json}");
    assert_eq!(json["nodes"][0]["subscribers_all_broadcasts"], 6, "{json}");
    assert!(
        report
            .to_string()
            .contains("6 of 6 subscribers received every one"),
        "{report}"
    );

    // Without --broadcasts, the broadcast fields are all zero.
    let mut cfg = FanoutConfig::new(server.url());
    cfg.subscribers = 2;
    cfg.rate = PublishRate::PerSecond(20.0);
    cfg.duration = 0.2;
    cfg.sessions = 1;
    let report = run_fanout(cfg).await.unwrap();
    let json = json_line(&report);
    for field in [
        "broadcasts",
        "broadcasts_sent",
        "broadcast_errors",
        "broadcast_deliveries",
        "expected_broadcast_deliveries",
        "subscribers_all_broadcasts",
    ] {
        assert_eq!(json[field], 0, "{field}: {json}");
    }
    assert_eq!(json["broadcast_latency"]["samples"], 0, "{json}");
    assert!(!report.to_string().contains("broadcast"), "{report}");
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
    // Sent through the first node only: Redis must carry it to the second node's subscribers.
    cfg.broadcasts = 1;
    let report = run_fanout(cfg).await.unwrap();
    let json = json_line(&report);
    assert_every_broadcast_delivered(&json, 1, 12);
    for node in json["nodes"].as_array().unwrap() {
        assert_eq!(node["broadcast_deliveries"], 6, "{json}");
        assert_eq!(node["expected_broadcast_deliveries"], 6, "{json}");
        assert_eq!(node["subscribers_all_broadcasts"], 6, "{json}");
        assert_eq!(node["broadcast_latency"]["samples"], 6, "{json}");
    }
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

#[tokio::test]
async fn rtt_and_churn_refuse_remote_targets() {
    let err = run_rtt(RttConfig::new("http://192.0.2.1:8000"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a loopback"), "{err}");
    let err = run_churn(ChurnConfig::new("http://192.0.2.1:8000"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a loopback"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtt_matches_every_pong_to_its_ping() {
    let server = Server::start().await;
    let mut cfg = RttConfig::new(server.url());
    cfg.connections = 4;
    cfg.duration = 1.0;
    cfg.sources = 2;
    cfg.sessions = 2;
    cfg.server_pid = vec![server.pid()];
    let report = run_rtt(cfg.clone()).await.unwrap();
    assert_eq!(report.connected, 4, "{report}");
    assert_eq!(report.failed, 0, "{report}");
    assert!(report.round_trips > 0, "{report}");
    assert_eq!(
        (
            report.errors,
            report.timeouts,
            report.unexpected_pongs,
            report.dropped
        ),
        (0, 0, 0, 0),
        "{report}"
    );
    assert_eq!(report.rtt.samples, report.round_trips, "{report}");
    assert_eq!(report.connect_latency.samples, 4, "{report}");
    assert!(report.server_cpu_secs.is_some(), "{report}");

    // At a fixed rate, no connection sends more than its schedule allows.
    cfg.rate = Some(20.0);
    let report = run_rtt(cfg).await.unwrap();
    assert!(report.round_trips > 0, "{report}");
    assert!(report.round_trips <= 4 * 20 + 4, "{report}");
    assert_eq!(
        (report.errors, report.timeouts, report.dropped),
        (0, 0, 0),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_counts_add_up() {
    let server = Server::start().await;
    for lifetimes in [Lifetimes::Fixed, Lifetimes::Random] {
        let mut cfg = ChurnConfig::new(server.url());
        cfg.connections = 10;
        cfg.rate = 20.0;
        cfg.duration = 1.5;
        cfg.lifetimes = lifetimes;
        cfg.rooms = 2;
        cfg.settle = 0.1;
        cfg.sources = 2;
        cfg.sessions = 3;
        cfg.server_pid = vec![server.pid()];
        let report = run_churn(cfg).await.unwrap();
        assert_eq!(report.fill_established, 10, "{report}");
        assert_eq!(report.fill_failed, 0, "{report}");
        assert!(report.opened > 0, "{report}");
        assert!(report.closed > 0, "{report}");
        assert_eq!((report.failed, report.dropped), (0, 0), "{report}");
        // What is open at the end is the fill plus what was opened, less what was closed.
        assert_eq!(report.open_at_end, 10 + report.opened - report.closed, "{report}");
        assert_eq!(report.connect_join_latency.samples, report.opened, "{report}");
        assert_eq!(report.fill_latency.samples, 10, "{report}");
        assert!(report.server_rss_start_kib.is_some() && report.server_rss_end_kib.is_some());
    }
}

/// Set in the environment of worker processes started by these tests.
const TEST_WORKER_ENV: &str = "SWITCHYARD_BENCH_TEST_WORKER";

/// Not a test of its own: when the load generator starts this binary as its worker process (with
/// `SWITCHYARD_BENCH_TEST_WORKER` set), this serves the worker side; otherwise it passes at once.
#[test]
fn bench_worker_process_entry() {
    if std::env::var_os(TEST_WORKER_ENV).is_none() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // As a task, so that a panic comes back as an error instead of unwinding through the runtime
    // (whose drop would wait for the blocking thread that reads stdin).
    let outcome = runtime.block_on(async { tokio::spawn(switchyard_bench::worker::serve_stdio()).await });
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome.unwrap().unwrap();
}

/// Worker processes for at most `per_process` connections each: this test binary, running only
/// [`bench_worker_process_entry`].
fn test_workers(per_process: usize) -> WorkerOptions {
    WorkerOptions {
        connections_per_process: Some(per_process),
        command: Some(WorkerCommand {
            program: std::env::current_exe().unwrap(),
            args: [
                "bench_worker_process_entry",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ]
            .map(String::from)
            .to_vec(),
            env: vec![(TEST_WORKER_ENV.to_string(), "1".to_string())],
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenarios_spread_over_worker_processes() {
    let server = Server::start().await;

    let mut idle = IdleConfig::new(server.url());
    idle.connections = 7;
    idle.rate = 200.0;
    idle.hold = 0.2;
    idle.sources = 3;
    idle.sessions = 2;
    idle.server_pid = vec![server.pid()];
    idle.workers = test_workers(3);
    let report = run_idle(idle).await.unwrap();
    assert_eq!(report.worker_processes, 3, "{report}");
    assert_eq!(report.established, 7, "{report}");
    assert_eq!(report.dropped_while_holding, 0, "{report}");
    assert_eq!(report.connect_join_latency.samples, 7, "{report}");

    let mut rtt = RttConfig::new(server.url());
    rtt.connections = 4;
    rtt.duration = 0.5;
    rtt.workers = test_workers(2);
    let report = run_rtt(rtt).await.unwrap();
    assert_eq!(report.worker_processes, 2, "{report}");
    assert_eq!(report.connected, 4, "{report}");
    assert!(report.round_trips > 0, "{report}");
    assert_eq!(report.rtt.samples, report.round_trips, "{report}");
    assert_eq!(
        (report.errors, report.timeouts, report.dropped),
        (0, 0, 0),
        "{report}"
    );

    let mut churn = ChurnConfig::new(server.url());
    // 6 connections and 2/s × 3 s of connections in flight: 12, two processes of 6.
    churn.connections = 6;
    churn.rate = 2.0;
    churn.duration = 1.5;
    churn.settle = 0.0;
    churn.workers = test_workers(6);
    let report = run_churn(churn).await.unwrap();
    assert_eq!(report.worker_processes, 2, "{report}");
    assert_eq!(report.fill_established, 6, "{report}");
    assert!(report.opened > 0 && report.closed > 0, "{report}");
    assert_eq!((report.failed, report.dropped), (0, 0), "{report}");
    assert_eq!(report.open_at_end, 6 + report.opened - report.closed, "{report}");

    // Subscribers in workers, publishers here: timestamps and offsets must still line up.
    let mut fanout = FanoutConfig::new(server.url());
    fanout.subscribers = 6;
    fanout.rooms = 2;
    fanout.publishers = 2;
    fanout.rate = PublishRate::PerSecond(20.0);
    fanout.duration = 1.0;
    fanout.payload = 64;
    fanout.sessions = 2;
    fanout.workers = test_workers(3);
    fanout.broadcasts = 1;
    let report = run_fanout(fanout).await.unwrap();
    // Counted in two worker processes and merged here.
    assert_every_broadcast_delivered(&json_line(&report), 1, 6);
    assert_eq!(report.worker_processes, 2, "{report}");
    assert_eq!(report.subscribers_connected, 6, "{report}");
    assert!(report.publications > 0, "{report}");
    assert_eq!((report.lost, report.out_of_order), (0, 0), "{report}");
    assert_eq!(report.deliveries, report.publications * 3, "{report}");
    assert_eq!(report.latency.samples, report.deliveries, "{report}");
    for room in &report.per_room {
        assert_eq!(room.subscribers, 3, "{report}");
        assert_eq!(room.deliveries, room.publications * 3, "{report}");
    }
}
