//! The `fanout` scenario: S subscribers spread over K rooms, P publishers that publish timestamped
//! payloads to their rooms (at a fixed rate, or as fast as acknowledgements allow with at most W
//! publishes in flight), for a fixed duration. Subscribers check that offsets arrive consecutively
//! (per subscriber and room) and measure the latency from the timestamp in the payload. The report
//! has deliveries per second, latency percentiles, lost and out-of-order counts per room, and the
//! CPU time the load generator (and, given their pids, the servers) spent per delivery.
//!
//! Several nodes that share a backend can be loaded at once (`--url` given several times):
//! subscribers are spread round-robin over the nodes within each room, so that every room has
//! subscribers on every node, and publishers round-robin over the nodes; sessions are created on
//! every node in turn and used on any; the rooms' offsets are read from any node. The report then
//! has deliveries, losses and latency per node as well.
//!
//! More subscribers than one process may open go to worker processes ([`crate::worker`]): each
//! connects its share, the parent runs the publishers, then sends every worker the rooms' final
//! offsets and merges what they received (counts per room and node, latency histogram buckets).
//! Timestamps are `CLOCK_MONOTONIC`, one clock for all of the load generator's processes.
//!
//! With `--broadcasts N`, once publishing has stopped the coordinating process also sends N server
//! broadcasts (`POST /api/broadcast` on the first node, one at a time, `--broadcast-interval`
//! apart), each with its send timestamp, a sequence number and the run's id in its data. Every
//! subscriber counts the `system` frames of this run and records their latency in a second shared
//! histogram; it is done when it has the final offsets and every broadcast (or the drain deadline
//! passed). The report says how many broadcast deliveries arrived of the expected (broadcasts sent
//! × subscribers connected), how many subscribers received every broadcast, and their latency.

use std::collections::VecDeque;
use std::io::Write as _;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use memchr::memmem::Finder;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::histogram::{Histogram, Percentiles};
use crate::plot::LatencyPlot;
use crate::procfs::{self, now_ns};
use crate::progress::{self, Counters, Progress};
use crate::scan::{self, BROADCAST_RUN_KEY, BROADCAST_SEQ_KEY, FrameKind, SENT_NS_KEY};
use crate::session::{ConnectSpec, connect_and_join, create_sessions, room_offset};
use crate::target::{Nodes, Target, check_open_files};
use crate::worker::{
    ParentCommand, STARTUP_ALLOWANCE, WorkerIo, WorkerOptions, WorkerPool, WorkerTask, split_range,
    split_sources,
};
use crate::ws::{Incoming, WsConnection};

/// How fast each publisher publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PublishRate {
    /// Publications per second, per publisher.
    PerSecond(f64),
    /// As fast as acknowledgements come back, with at most `window` in flight.
    Max,
}

impl FromStr for PublishRate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("max") {
            return Ok(PublishRate::Max);
        }
        match s.parse::<f64>() {
            Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(PublishRate::PerSecond(rate)),
            _ => Err(format!(
                "expected a positive number of publications per second or `max`, got {s}"
            )),
        }
    }
}

impl std::fmt::Display for PublishRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishRate::PerSecond(rate) => write!(f, "{rate}/s per publisher"),
            PublishRate::Max => f.write_str("max"),
        }
    }
}

impl Serialize for PublishRate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PublishRate::PerSecond(rate) => s.serialize_f64(*rate),
            PublishRate::Max => s.serialize_str("max"),
        }
    }
}

/// Settings of the `fanout` scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct FanoutConfig {
    /// Base URL of the server, e.g. http://127.0.0.1:8000. Repeat it for several nodes that share a
    /// backend (e.g. one Redis): connections are spread over them round-robin
    #[arg(long, required = true)]
    pub url: Vec<String>,
    /// Subscribers, spread round-robin over the rooms
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Rooms
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Publishers; each publishes round-robin to its room(s), and every room has at least one
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Publications per second per publisher, or `max`
    #[arg(long, default_value = "max")]
    pub rate: PublishRate,
    /// Most unacknowledged publishes per publisher
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Seconds of publishing
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Size of each publication's `data` JSON, bytes (at least ~35 for the timestamp)
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Pid of the server process, to report its CPU time per delivery and its VmRSS; repeat it for
    /// several nodes (their CPU times and VmRSS are added up)
    #[arg(long)]
    pub server_pid: Vec<u32>,
    /// Source addresses 127.0.0.1 ..= 127.0.0.K the connections are spread over
    #[arg(long, default_value_t = 1)]
    pub sources: u8,
    /// Sessions (users) the subscribers are spread over
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// New subscriber connections per second while setting up
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Read buffer per connection, bytes
    #[arg(long, default_value_t = 4096)]
    pub read_buffer: usize,
    /// Seconds subscribers may take, after publishing stopped, to receive the last publication
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
    /// Seconds allowed for one connection's connect, welcome and join
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Allow a target that is not a loopback address
    #[arg(long)]
    pub allow_remote: bool,
    /// Server broadcasts (`POST /api/broadcast` on the first --url) sent one at a time after
    /// publishing stopped; every subscriber must receive each as a `system` frame
    #[arg(long, default_value_t = 0)]
    pub broadcasts: u64,
    /// Seconds from one broadcast to the next
    #[arg(long, default_value_t = 0.2)]
    pub broadcast_interval: f64,
    /// API key of the HTTP API (sessions, room offsets, broadcasts), sent as `Authorization: Bearer`
    #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub workers: WorkerOptions,
}

impl FanoutConfig {
    /// The defaults of the command line, for one node at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self::nodes([url.into()])
    }

    /// The defaults of the command line, for nodes at `urls` that share a backend.
    pub fn nodes(urls: impl IntoIterator<Item = String>) -> Self {
        FanoutConfig {
            url: urls.into_iter().collect(),
            subscribers: 100,
            rooms: 1,
            publishers: 1,
            rate: PublishRate::Max,
            window: 16,
            duration: 10.0,
            payload: 100,
            server_pid: Vec::new(),
            sources: 1,
            sessions: 100,
            connect_rate: 2000.0,
            read_buffer: 4096,
            drain_timeout: 10.0,
            connect_timeout: 10.0,
            allow_remote: false,
            broadcasts: 0,
            broadcast_interval: 0.2,
            api_key: None,
            workers: WorkerOptions::default(),
        }
    }
}

/// Delivery checks of one room.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoomReport {
    pub room: String,
    pub subscribers: usize,
    pub publications: u64,
    pub deliveries: u64,
    pub expected_deliveries: u64,
    /// Publications a subscriber never received (gaps, and what was missing at the end).
    pub lost: u64,
    /// Deliveries whose offset was not greater than the previous one.
    pub out_of_order: u64,
}

/// What the `fanout` scenario measured on one node (its connections).
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeReport {
    pub url: String,
    /// Subscribers that joined on this node.
    pub subscribers: usize,
    /// Of those, subscribers that the server closed (or that broke) during the run.
    pub subscribers_dropped: usize,
    /// Publishers connected to this node (including any that failed).
    pub publishers: usize,
    pub deliveries: u64,
    pub lost: u64,
    pub out_of_order: u64,
    /// Latency of the deliveries to this node's subscribers.
    pub latency: Percentiles,
    /// Broadcasts (`system` frames of this run) received by this node's subscribers.
    pub broadcast_deliveries: u64,
    /// Broadcasts sent × this node's subscribers.
    pub expected_broadcast_deliveries: u64,
    /// This node's subscribers that received every broadcast (0 when none was sent).
    pub subscribers_all_broadcasts: usize,
    /// Latency of the broadcasts to this node's subscribers.
    pub broadcast_latency: Percentiles,
}

/// CPU time and memory of one server process (given with `--server-pid`).
#[derive(Debug, Clone, Serialize)]
pub struct ServerUsage {
    pub pid: u32,
    /// User + system CPU time during the run (from the first publish until every subscriber finished).
    pub cpu_secs: f64,
    /// VmRSS at the end of the run.
    pub rss_kib: u64,
}

/// What the `fanout` scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    pub scenario: &'static str,
    pub subscribers: usize,
    pub subscribers_connected: usize,
    /// Subscribers that the server closed (or that broke) during the run, e.g. slow consumers (4008).
    pub subscribers_dropped: usize,
    pub rooms: usize,
    pub publishers: usize,
    pub rate: PublishRate,
    pub window: usize,
    pub payload_bytes: usize,
    pub duration_secs: f64,
    /// Worker processes that held the subscribers (0: this process held them).
    pub worker_processes: usize,
    /// Publications stored in the rooms (the rooms' final offsets, read over the HTTP API).
    pub publications: u64,
    /// Publish frames written.
    pub sent: u64,
    /// Publishes acknowledged with an offset.
    pub acknowledged: u64,
    pub publish_errors: u64,
    /// Publishes without a reply when the publisher stopped (gave up waiting, or was closed).
    pub unacknowledged: u64,
    /// Publishers that the server closed (or that broke) before they were done; a publisher is a
    /// member of its rooms, so it can be closed as a slow consumer like any subscriber.
    pub publishers_dropped: usize,
    pub publications_per_sec: f64,
    pub deliveries: u64,
    pub expected_deliveries: u64,
    /// From the first publish to the last delivery.
    pub delivery_secs: f64,
    pub deliveries_per_sec: f64,
    pub lost: u64,
    pub out_of_order: u64,
    /// From the send timestamp in the payload to the subscriber's read.
    pub latency: Percentiles,
    /// From the same timestamp to the publisher's read of the acknowledgement. It includes waiting
    /// behind the publisher's earlier publishes (up to `window` of them) on the server.
    pub ack_latency: Percentiles,
    pub per_room: Vec<RoomReport>,
    /// Server broadcasts asked for (`--broadcasts`).
    pub broadcasts: u64,
    /// Broadcasts the server accepted (`POST /api/broadcast` answered 200).
    pub broadcasts_sent: u64,
    /// Broadcast requests that failed (the first failure ends the broadcasts).
    pub broadcast_errors: u64,
    /// `system` frames of this run received by the subscribers.
    pub broadcast_deliveries: u64,
    /// Broadcasts sent × subscribers connected.
    pub expected_broadcast_deliveries: u64,
    /// Subscribers that received every broadcast (0 when none was sent).
    pub subscribers_all_broadcasts: usize,
    /// From the timestamp taken just before `POST /api/broadcast` (so including the HTTP request)
    /// to the subscriber's read of the `system` frame.
    pub broadcast_latency: Percentiles,
    pub bench_cpu_secs: f64,
    pub bench_cpu_us_per_delivery: f64,
    /// Summed over every `--server-pid`.
    pub server_cpu_secs: Option<f64>,
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Summed over every `--server-pid`.
    pub server_rss_kib: Option<u64>,
    /// Each `--server-pid` on its own.
    pub servers: Vec<ServerUsage>,
    /// The nodes in the order of `--url`, with their share of the connections and deliveries.
    pub nodes: Vec<NodeReport>,
    /// Close codes (or errors) of dropped subscribers and failed connections, a few of each.
    pub failure_samples: Vec<String>,
    /// The delivery latencies themselves, for `--plot`.
    #[serde(skip)]
    pub latency_histogram: Histogram,
    /// The publish → ack latencies themselves, for `--plot`.
    #[serde(skip)]
    pub ack_latency_histogram: Histogram,
    /// The broadcast latencies themselves, for `--plot`.
    #[serde(skip)]
    pub broadcast_latency_histogram: Histogram,
}

impl LatencyPlot for FanoutReport {
    fn plot_title(&self) -> String {
        format!(
            "fanout: delivery latency, {} subscribers in {} room(s), {:.0} deliveries/s",
            self.subscribers_connected, self.rooms, self.deliveries_per_sec
        )
    }

    fn plot_series(&self) -> Vec<(String, &Histogram)> {
        let mut series = vec![
            ("publish → delivery".to_string(), &self.latency_histogram),
            ("publish → ack".to_string(), &self.ack_latency_histogram),
        ];
        if !self.broadcast_latency_histogram.is_empty() {
            series.push((
                "broadcast → delivery".to_string(),
                &self.broadcast_latency_histogram,
            ));
        }
        series
    }
}

impl std::fmt::Display for FanoutReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "fanout: {} subscribers over {} room(s), {} publisher(s) at {} (window {}), payload {} B, {:.1} s",
            self.subscribers,
            self.rooms,
            self.publishers,
            self.rate,
            self.window,
            self.payload_bytes,
            self.duration_secs
        )?;
        writeln!(
            f,
            "  subscribers connected {} / dropped {}; publishers dropped {}",
            self.subscribers_connected, self.subscribers_dropped, self.publishers_dropped
        )?;
        if self.worker_processes > 0 {
            writeln!(
                f,
                "  subscribers spread over {} worker processes",
                self.worker_processes
            )?;
        }
        writeln!(
            f,
            "  publications {} stored ({:.0}/s): {} sent, {} acknowledged, {} errors, {} unacknowledged",
            self.publications,
            self.publications_per_sec,
            self.sent,
            self.acknowledged,
            self.publish_errors,
            self.unacknowledged
        )?;
        writeln!(
            f,
            "  deliveries {} of {} expected in {:.2} s → {:.0} deliveries/s; lost {}, out of order {}",
            self.deliveries,
            self.expected_deliveries,
            self.delivery_secs,
            self.deliveries_per_sec,
            self.lost,
            self.out_of_order
        )?;
        writeln!(f, "  latency: {}", self.latency)?;
        writeln!(f, "  publish → ack: {}", self.ack_latency)?;
        if self.broadcasts > 0 {
            writeln!(
                f,
                "  broadcasts {} of {} sent ({} failed): {} of {} expected deliveries; {} of {} subscribers received every one",
                self.broadcasts_sent,
                self.broadcasts,
                self.broadcast_errors,
                self.broadcast_deliveries,
                self.expected_broadcast_deliveries,
                self.subscribers_all_broadcasts,
                self.subscribers_connected
            )?;
            writeln!(f, "  broadcast latency: {}", self.broadcast_latency)?;
        }
        write!(
            f,
            "  load generator CPU {:.2} s = {:.2} µs per delivery",
            self.bench_cpu_secs, self.bench_cpu_us_per_delivery
        )?;
        if let (Some(cpu), Some(per)) = (self.server_cpu_secs, self.server_cpu_us_per_delivery) {
            write!(f, "; server CPU {cpu:.2} s = {per:.2} µs per delivery")?;
        }
        if let Some(rss) = self.server_rss_kib {
            write!(f, "; server RSS {rss} KiB")?;
        }
        writeln!(f)?;
        if self.servers.len() > 1 {
            for server in &self.servers {
                writeln!(
                    f,
                    "  server pid {}: CPU {:.2} s, RSS {} KiB",
                    server.pid, server.cpu_secs, server.rss_kib
                )?;
            }
        }
        if self.nodes.len() > 1 {
            for node in &self.nodes {
                writeln!(
                    f,
                    "  node {}: {} subscribers ({} dropped), {} publishers, {} deliveries, lost {}, out of order {}; latency {}",
                    node.url,
                    node.subscribers,
                    node.subscribers_dropped,
                    node.publishers,
                    node.deliveries,
                    node.lost,
                    node.out_of_order,
                    node.latency
                )?;
                if self.broadcasts > 0 {
                    writeln!(
                        f,
                        "  node {}: broadcasts {} of {} expected deliveries, {} of {} subscribers received every one; latency {}",
                        node.url,
                        node.broadcast_deliveries,
                        node.expected_broadcast_deliveries,
                        node.subscribers_all_broadcasts,
                        node.subscribers,
                        node.broadcast_latency
                    )?;
                }
            }
        }
        if self.per_room.len() > 1 {
            for room in &self.per_room {
                writeln!(
                    f,
                    "  room {}: {} subscribers, {} publications, {} of {} deliveries, lost {}, out of order {}",
                    room.room,
                    room.subscribers,
                    room.publications,
                    room.deliveries,
                    room.expected_deliveries,
                    room.lost,
                    room.out_of_order
                )?;
            }
        }
        for sample in &self.failure_samples {
            writeln!(f, "  failure: {sample}")?;
        }
        Ok(())
    }
}

const MAX_FAILURE_SAMPLES: usize = 5;

/// The rooms publisher `publisher` of `publishers` publishes to, out of `rooms`.
pub fn publisher_rooms(publisher: usize, publishers: usize, rooms: usize) -> Vec<usize> {
    if publishers >= rooms {
        vec![publisher % rooms]
    } else {
        (publisher..rooms).step_by(publishers).collect()
    }
}

/// The node of subscriber `index` (in room `index % rooms`) out of `nodes`: round-robin within each
/// room, starting at a different node in each room, so that every room has subscribers on every
/// node and the nodes have equal shares.
pub fn subscriber_node(index: usize, rooms: usize, nodes: usize) -> usize {
    (index / rooms.max(1) + index % rooms.max(1)) % nodes.max(1)
}

/// The node of publisher `publisher` out of `nodes`: round-robin.
pub fn publisher_node(publisher: usize, nodes: usize) -> usize {
    publisher % nodes.max(1)
}

/// A share of the fan-out's subscribers: all of them in this process, or one worker's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscriberShare {
    pub urls: Vec<String>,
    pub allow_remote: bool,
    pub sources: Vec<IpAddr>,
    pub room_names: Vec<String>,
    pub sessions: Vec<String>,
    /// Global index of the share's first subscriber (it picks the room, node, session and source).
    pub first_index: usize,
    pub count: usize,
    /// New subscriber connections per second of this share.
    pub connect_rate: f64,
    pub read_buffer: usize,
    pub connect_timeout: f64,
    /// The run's id: broadcasts that carry it (under [`BROADCAST_RUN_KEY`]) are this run's.
    pub run_id: String,
}

/// A share's subscribers, connected and joined.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscribersReady {
    pub connected: usize,
    pub failure_samples: Vec<String>,
}

/// Deliveries to a share's subscribers in one room.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoomTally {
    pub subscribers: usize,
    pub deliveries: u64,
    pub lost: u64,
    pub out_of_order: u64,
}

/// Deliveries to a share's subscribers on one node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeTally {
    pub subscribers: usize,
    pub dropped: usize,
    pub deliveries: u64,
    pub lost: u64,
    pub out_of_order: u64,
    pub latency: Histogram,
    pub broadcast_deliveries: u64,
    /// Subscribers that received every broadcast (counted only when broadcasts were sent).
    pub subscribers_all_broadcasts: usize,
    pub broadcast_latency: Histogram,
}

/// What a share's subscribers received, per room and per node (node tallies carry the latency
/// histograms: the share's latency is their merge).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SubscribersFinished {
    pub rooms: Vec<RoomTally>,
    pub nodes: Vec<NodeTally>,
    /// `now_ns` of the last delivery (0: none).
    pub last_delivery_ns: u64,
    pub failure_samples: Vec<String>,
    /// CPU of the share's process from the subscribers' setup to their end.
    pub bench_cpu_secs: f64,
}

impl SubscribersFinished {
    fn merge(&mut self, other: &SubscribersFinished) {
        if self.rooms.len() < other.rooms.len() {
            self.rooms.resize(other.rooms.len(), RoomTally::default());
        }
        for (mine, theirs) in self.rooms.iter_mut().zip(&other.rooms) {
            mine.subscribers += theirs.subscribers;
            mine.deliveries += theirs.deliveries;
            mine.lost += theirs.lost;
            mine.out_of_order += theirs.out_of_order;
        }
        if self.nodes.len() < other.nodes.len() {
            self.nodes.resize(other.nodes.len(), NodeTally::default());
        }
        for (mine, theirs) in self.nodes.iter_mut().zip(&other.nodes) {
            mine.subscribers += theirs.subscribers;
            mine.dropped += theirs.dropped;
            mine.deliveries += theirs.deliveries;
            mine.lost += theirs.lost;
            mine.out_of_order += theirs.out_of_order;
            mine.latency.merge(&theirs.latency);
            mine.broadcast_deliveries += theirs.broadcast_deliveries;
            mine.subscribers_all_broadcasts += theirs.subscribers_all_broadcasts;
            mine.broadcast_latency.merge(&theirs.broadcast_latency);
        }
        self.last_delivery_ns = self.last_delivery_ns.max(other.last_delivery_ns);
        for sample in &other.failure_samples {
            if self.failure_samples.len() < MAX_FAILURE_SAMPLES {
                self.failure_samples.push(sample.clone());
            }
        }
        self.bench_cpu_secs += other.bench_cpu_secs;
    }
}

/// Delivery latencies of a share's subscribers, per node, in a few shards: one histogram per
/// subscriber would cost 9.5 KB each (about 1 GB at 100,000 subscribers).
struct SharedLatency {
    shards: Vec<parking_lot::Mutex<Histogram>>,
}

const LATENCY_SHARDS: usize = 16;

impl SharedLatency {
    fn new(nodes: usize) -> Self {
        SharedLatency {
            shards: (0..nodes * LATENCY_SHARDS)
                .map(|_| parking_lot::Mutex::new(Histogram::new()))
                .collect(),
        }
    }

    fn slot(node: usize, index: usize) -> usize {
        node * LATENCY_SHARDS + index % LATENCY_SHARDS
    }

    fn record(&self, slot: usize, nanos: u64) {
        if let Some(shard) = self.shards.get(slot) {
            shard.lock().record(nanos);
        }
    }

    /// The merged latencies of one node's subscribers.
    fn node(&self, node: usize) -> Histogram {
        let mut merged = Histogram::new();
        for shard in self
            .shards
            .iter()
            .skip(node * LATENCY_SHARDS)
            .take(LATENCY_SHARDS)
        {
            merged.merge(&shard.lock());
        }
        merged
    }
}

/// What all of a share's subscribers record into: the latencies of publications and of broadcasts
/// (apart), and the finder that tells this run's broadcasts from any other `system` frame.
struct SharedRecords {
    latency: SharedLatency,
    broadcast_latency: SharedLatency,
    run_marker: Finder<'static>,
}

impl SharedRecords {
    fn new(nodes: usize, run_id: &str) -> Self {
        SharedRecords {
            latency: SharedLatency::new(nodes),
            broadcast_latency: SharedLatency::new(nodes),
            run_marker: scan::run_marker(run_id),
        }
    }
}

/// A share's subscriber tasks, joined and receiving until told the final offsets.
struct SubscriberGroup {
    records: Arc<SharedRecords>,
    tasks: JoinSet<Option<SubscriberReport>>,
    finals: watch::Sender<Option<Finals>>,
    finals_once: Vec<oneshot::Sender<Finals>>,
    rooms: usize,
    nodes: usize,
    cpu_before: f64,
}

impl SubscriberGroup {
    /// Connects and joins the share's subscribers at its connect rate; returns once each joined or
    /// failed (bounded by the connect timeout).
    async fn connect(
        share: SubscriberShare,
        counters: Arc<Counters>,
    ) -> anyhow::Result<(SubscriberGroup, SubscribersReady)> {
        check_open_files(share.count)?;
        let cpu_before = procfs::own_cpu_secs()?;
        if share.sessions.is_empty() || share.room_names.is_empty() {
            bail!("a subscriber share needs at least one session and one room");
        }
        let nodes = Arc::new(
            Nodes::resolve(&share.urls, share.allow_remote, 1)
                .await?
                .with_sources(&share.sources),
        );
        let rooms = share.room_names.len();
        let (finals_tx, finals_rx) = watch::channel::<Option<Finals>>(None);
        let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(share.count.max(1));
        let mut tasks = JoinSet::new();
        let mut finals_once_senders = Vec::with_capacity(share.count);
        let records = Arc::new(SharedRecords::new(nodes.len(), &share.run_id));
        let interval = crate::interval_of(share.connect_rate);
        let connect_timeout = Duration::from_secs_f64(share.connect_timeout);
        let setup_started = Instant::now();
        for local in 0..share.count {
            tokio::time::sleep_until(setup_started + interval.mul_f64(local as f64)).await;
            let index = share.first_index + local;
            let room = index % rooms;
            let (finals_once_tx, finals_once) = oneshot::channel();
            finals_once_senders.push(finals_once_tx);
            let subscriber = Subscriber {
                nodes: nodes.clone(),
                node: subscriber_node(index, rooms, nodes.len()),
                index,
                session: share.sessions[index % share.sessions.len()].clone(),
                room,
                room_name: share.room_names[room].clone(),
                read_buffer: share.read_buffer,
                timeout: connect_timeout,
                ready: ready_tx.clone(),
                finals: finals_rx.clone(),
                finals_once,
                counters: counters.clone(),
                records: records.clone(),
            };
            tasks.spawn(subscriber.run());
        }
        drop(ready_tx);
        let mut ready = SubscribersReady {
            connected: 0,
            failure_samples: Vec::new(),
        };
        let mut answered = 0;
        let ready_deadline = Instant::now() + connect_timeout + Duration::from_secs(5);
        while answered < share.count {
            match tokio::time::timeout_at(ready_deadline, ready_rx.recv()).await {
                Ok(Some(Ok(()))) => {
                    ready.connected += 1;
                    answered += 1;
                }
                Ok(Some(Err(message))) => {
                    answered += 1;
                    if ready.failure_samples.len() < MAX_FAILURE_SAMPLES {
                        ready.failure_samples.push(format!("subscriber: {message}"));
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        let group = SubscriberGroup {
            records,
            tasks,
            finals: finals_tx,
            finals_once: finals_once_senders,
            rooms,
            nodes: nodes.len(),
            cpu_before,
        };
        Ok((group, ready))
    }

    /// Tells the subscribers the rooms' final offsets and the number of broadcasts sent, waits
    /// until each received them (or gave up at the drain deadline), and adds up what they received.
    async fn finish(
        mut self,
        top_offsets: Vec<u64>,
        broadcasts: u64,
        drain: Duration,
    ) -> anyhow::Result<SubscribersFinished> {
        if top_offsets.len() != self.rooms {
            bail!("{} final offsets for {} rooms", top_offsets.len(), self.rooms);
        }
        let drain_deadline = Instant::now() + drain;
        let finals = Finals {
            top_offsets: Arc::new(top_offsets),
            broadcasts,
            deadline: drain_deadline,
        };
        for sender in self.finals_once.drain(..) {
            let _ = sender.send(finals.clone());
        }
        let _ = self.finals.send(Some(finals));
        let Some(reports) =
            crate::join_all_by(&mut self.tasks, drain_deadline + Duration::from_secs(5)).await
        else {
            bail!("subscribers did not finish within the drain timeout");
        };
        let mut finished = SubscribersFinished {
            rooms: vec![RoomTally::default(); self.rooms],
            nodes: vec![NodeTally::default(); self.nodes],
            ..SubscribersFinished::default()
        };
        for joined in reports {
            let report = match joined {
                Ok(report) => report,
                Err(e) => {
                    if finished.failure_samples.len() < MAX_FAILURE_SAMPLES {
                        finished.failure_samples.push(format!("subscriber task: {e}"));
                    }
                    continue;
                }
            };
            let Some(report) = report else { continue };
            let room = &mut finished.rooms[report.room];
            room.subscribers += 1;
            room.deliveries += report.deliveries;
            room.lost += report.lost;
            room.out_of_order += report.out_of_order;
            let node = &mut finished.nodes[report.node];
            node.subscribers += 1;
            node.deliveries += report.deliveries;
            node.lost += report.lost;
            node.out_of_order += report.out_of_order;
            node.broadcast_deliveries += report.broadcasts;
            if broadcasts > 0 && report.broadcasts >= broadcasts {
                node.subscribers_all_broadcasts += 1;
            }
            if report.deliveries > 0 {
                finished.last_delivery_ns = finished.last_delivery_ns.max(report.last_delivery_ns);
            }
            if let Some(ended) = report.ended_early {
                node.dropped += 1;
                if finished.failure_samples.len() < MAX_FAILURE_SAMPLES {
                    finished
                        .failure_samples
                        .push(format!("subscriber dropped: {ended}"));
                }
            }
        }
        for (index, node) in finished.nodes.iter_mut().enumerate() {
            node.latency = self.records.latency.node(index);
            node.broadcast_latency = self.records.broadcast_latency.node(index);
        }
        finished.bench_cpu_secs = procfs::own_cpu_secs()? - self.cpu_before;
        Ok(finished)
    }
}

/// A worker's side of the fan-out: connect its subscribers, report, receive until the final
/// offsets and the broadcast count arrive and all of it is received (or the drain time is over),
/// report.
pub(crate) async fn serve_worker(
    share: SubscriberShare,
    io: &mut WorkerIo,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let (group, ready) = SubscriberGroup::connect(share, counters).await?;
    io.send_phase("ready", &ready)?;
    let (top_offsets, drain_secs, broadcasts) = match io.command().await? {
        ParentCommand::Finals {
            top_offsets,
            drain_secs,
            broadcasts,
        } => (top_offsets, drain_secs, broadcasts),
        other => bail!("expected the final offsets, got {other:?}"),
    };
    if !drain_secs.is_finite() || drain_secs < 0.0 {
        bail!("invalid drain time {drain_secs}");
    }
    let finished = group
        .finish(top_offsets, broadcasts, Duration::from_secs_f64(drain_secs))
        .await?;
    io.send_phase("finished", &finished)
}

/// The subscribers in this process, or the worker processes that hold them.
enum Subscribers {
    Here(SubscriberGroup),
    Workers(WorkerPool),
}

/// Runs the `fanout` scenario to completion (it stops by itself).
pub async fn run_fanout(cfg: FanoutConfig) -> anyhow::Result<FanoutReport> {
    validate(&cfg)?;
    // Publishers always stay in this process; subscribers go to workers when there are too many.
    let processes = cfg.workers.processes_for(cfg.subscribers)?;
    check_open_files(cfg.publishers + if processes == 1 { cfg.subscribers } else { 0 })?;
    let nodes = Arc::new(Nodes::resolve(&cfg.url, cfg.allow_remote, cfg.sources).await?);
    let run_id = crate::run_id();
    let room_names: Arc<Vec<String>> =
        Arc::new((0..cfg.rooms).map(|k| format!("bench-{run_id}-{k}")).collect());
    let session_count = cfg.sessions.clamp(1, cfg.subscribers);
    let subscriber_sessions = create_sessions(
        &nodes,
        &format!("bench-sub-{run_id}"),
        session_count,
        cfg.api_key.as_deref(),
    )
    .await?;
    let publisher_sessions = create_sessions(
        &nodes,
        &format!("bench-pub-{run_id}"),
        cfg.publishers,
        cfg.api_key.as_deref(),
    )
    .await?;
    let connect_timeout = Duration::from_secs_f64(cfg.connect_timeout);
    let mut failure_samples = Vec::new();
    let progress = Progress::start("fanout: subscribing", "deliveries");

    // Subscribers: connect and join at the connect rate, here or in worker processes.
    let shares: Vec<SubscriberShare> = split_range(0, cfg.subscribers, processes)
        .into_iter()
        .zip(split_sources(nodes.sources(), processes))
        .map(|((first_index, count), sources)| SubscriberShare {
            urls: cfg.url.clone(),
            allow_remote: cfg.allow_remote,
            sources,
            room_names: room_names.to_vec(),
            sessions: subscriber_sessions.clone(),
            first_index,
            count,
            connect_rate: cfg.connect_rate * count as f64 / cfg.subscribers as f64,
            read_buffer: cfg.read_buffer,
            connect_timeout: cfg.connect_timeout,
            run_id: run_id.clone(),
        })
        .collect();
    let setup_allowance =
        Duration::from_secs_f64(cfg.subscribers as f64 / cfg.connect_rate + cfg.connect_timeout)
            + Duration::from_secs(5)
            + STARTUP_ALLOWANCE;
    let setup_started = Instant::now();
    let (subscribers, ready) = if processes == 1 {
        let share = shares
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no subscriber share to run"))?;
        let (group, ready) = SubscriberGroup::connect(share, progress.counters()).await?;
        (Subscribers::Here(group), vec![ready])
    } else {
        let tasks = shares.into_iter().map(WorkerTask::FanoutSubscribers).collect();
        // Setup, publishers' setup, publishing, both drains, the broadcasts, and room to spare.
        let deadline = setup_allowance
            + connect_timeout * 2
            + Duration::from_secs_f64(cfg.duration + 2.0 * cfg.drain_timeout)
            + broadcasts_allowance(&cfg)
            + Duration::from_secs(60);
        let mut pool = WorkerPool::spawn(tasks, &cfg.workers, deadline, &progress).await?;
        progress::detail(&format!(
            "fanout: {} subscribers over {} worker processes (pids {:?})",
            cfg.subscribers,
            pool.len(),
            pool.pids()
        ));
        let ready = pool.collect::<SubscribersReady>("ready", setup_allowance).await?;
        (Subscribers::Workers(pool), ready)
    };
    let mut subscribers_connected = 0;
    for share in ready {
        subscribers_connected += share.connected;
        for sample in share.failure_samples {
            if failure_samples.len() < MAX_FAILURE_SAMPLES {
                failure_samples.push(sample);
            }
        }
    }
    progress::note(&format!(
        "fanout: {subscribers_connected} of {} subscribers joined in {:.1} s; starting {} publisher(s)",
        cfg.subscribers,
        setup_started.elapsed().as_secs_f64(),
        cfg.publishers
    ));
    progress.phase("fanout: publishing");

    // Publishers: connect and join, then start together.
    let (start_tx, start_rx) = watch::channel::<Option<Instant>>(None);
    let mut publisher_tasks = JoinSet::new();
    let (publisher_ready_tx, mut publisher_ready_rx) = mpsc::channel::<()>(cfg.publishers);
    for (index, session) in publisher_sessions.into_iter().enumerate() {
        let rooms: Vec<usize> = publisher_rooms(index, cfg.publishers, cfg.rooms);
        let publisher = Publisher {
            nodes: nodes.clone(),
            node: publisher_node(index, nodes.len()),
            index: cfg.subscribers + index,
            phase: index as f64 / cfg.publishers.max(1) as f64,
            session,
            room_names: rooms.iter().map(|&k| room_names[k].clone()).collect(),
            rooms,
            rate: cfg.rate,
            window: cfg.window,
            duration: Duration::from_secs_f64(cfg.duration),
            payload: cfg.payload,
            read_buffer: cfg.read_buffer,
            timeout: connect_timeout,
            drain_timeout: Duration::from_secs_f64(cfg.drain_timeout),
            ready: publisher_ready_tx.clone(),
            start: start_rx.clone(),
        };
        publisher_tasks.spawn(publisher.run());
    }
    drop(publisher_ready_tx);
    let publisher_ready_deadline = Instant::now() + connect_timeout + Duration::from_secs(5);
    let mut publishers_ready = 0;
    while publishers_ready < cfg.publishers {
        match tokio::time::timeout_at(publisher_ready_deadline, publisher_ready_rx.recv()).await {
            Ok(Some(())) => publishers_ready += 1,
            Ok(None) | Err(_) => break,
        }
    }

    // The rooms are fresh, but read where they start anyway: publications = final − initial offset.
    // Room k's offsets are read from node k (any node answers the same on a shared backend).
    let mut base_offsets = Vec::with_capacity(cfg.rooms);
    for (room, name) in room_names.iter().enumerate() {
        base_offsets.push(room_offset(nodes.node(room), name, cfg.api_key.as_deref()).await?);
    }
    let cpu_before = procfs::own_cpu_secs()?;
    let server_cpu_before = servers_cpu_secs(&cfg.server_pid)?;
    let publish_started = Instant::now();
    let publish_started_ns = now_ns();
    let _ = start_tx.send(Some(publish_started));

    let mut per_room: Vec<RoomReport> = room_names
        .iter()
        .map(|name| RoomReport {
            room: name.clone(),
            ..RoomReport::default()
        })
        .collect();
    let mut sent = 0;
    let mut acknowledged = 0;
    let mut publish_errors = 0;
    let mut unacknowledged = 0;
    let mut publishers_dropped = 0;
    let mut ack_latency = Histogram::new();
    while let Some(joined) = publisher_tasks.join_next().await {
        let report = match joined {
            Ok(report) => report,
            Err(e) => {
                publishers_dropped += 1;
                failure_samples.push(format!("publisher task: {e}"));
                continue;
            }
        };
        sent += report.sent;
        ack_latency.merge(&report.ack_latency);
        publish_errors += report.errors;
        unacknowledged += report.unacknowledged;
        acknowledged += report.rooms.iter().map(|(_, acked, _)| acked).sum::<u64>();
        for sample in [
            report.first_error.map(|e| format!("publish error: {e}")),
            report.failure.clone(),
        ]
        .into_iter()
        .flatten()
        {
            if failure_samples.len() < MAX_FAILURE_SAMPLES {
                failure_samples.push(format!("publisher: {sample}"));
            }
        }
        if report.failure.is_some() {
            publishers_dropped += 1;
        }
    }
    let publishing_secs = publish_started.elapsed().as_secs_f64();
    // The server's own offsets count every stored publication, also those whose acknowledgement
    // a dropped publisher never read.
    let mut top_offsets = Vec::with_capacity(cfg.rooms);
    for (room, name) in room_names.iter().enumerate() {
        let top = room_offset(nodes.node(room), name, cfg.api_key.as_deref()).await?;
        per_room[room].publications = top.saturating_sub(base_offsets[room]);
        top_offsets.push(top);
    }
    // The subscribers are still receiving (they have no final offsets yet), so they count these.
    let broadcasts = if cfg.broadcasts > 0 {
        progress.phase("fanout: broadcasting");
        send_broadcasts(
            nodes.node(0),
            cfg.api_key.as_deref(),
            &run_id,
            cfg.broadcasts,
            Duration::from_secs_f64(cfg.broadcast_interval),
        )
        .await
    } else {
        BroadcastsSent::default()
    };
    if let Some(failure) = &broadcasts.failure
        && failure_samples.len() < MAX_FAILURE_SAMPLES
    {
        failure_samples.push(format!("broadcast: {failure}"));
    }
    progress.phase("fanout: draining");
    let drain = Duration::from_secs_f64(cfg.drain_timeout);
    let (finished, worker_processes) = match subscribers {
        Subscribers::Here(group) => (group.finish(top_offsets, broadcasts.sent, drain).await?, 0),
        Subscribers::Workers(mut pool) => {
            pool.send_all(&ParentCommand::Finals {
                top_offsets,
                drain_secs: cfg.drain_timeout,
                broadcasts: broadcasts.sent,
            })
            .await?;
            let shares = pool
                .collect::<SubscribersFinished>("finished", drain + Duration::from_secs(15))
                .await?;
            let workers = pool.len();
            pool.shutdown().await;
            let mut merged = SubscribersFinished::default();
            for share in &shares {
                merged.merge(share);
            }
            (merged, workers)
        }
    };
    let parent_cpu = procfs::own_cpu_secs()? - cpu_before;
    // In one process the subscribers' CPU is part of this process's; workers add theirs.
    let cpu_secs = if worker_processes > 0 {
        parent_cpu + finished.bench_cpu_secs
    } else {
        parent_cpu
    };
    drop(progress);
    let server_cpu_after = servers_cpu_secs(&cfg.server_pid)?;
    let mut servers = Vec::with_capacity(cfg.server_pid.len());
    for ((&pid, before), after) in cfg
        .server_pid
        .iter()
        .zip(&server_cpu_before)
        .zip(&server_cpu_after)
    {
        servers.push(ServerUsage {
            pid,
            cpu_secs: after - before,
            rss_kib: procfs::rss_kib(pid).with_context(|| format!("reading the VmRSS of server {pid}"))?,
        });
    }
    let server_cpu_secs = (!servers.is_empty()).then(|| servers.iter().map(|s| s.cpu_secs).sum::<f64>());
    let server_rss_kib = (!servers.is_empty()).then(|| servers.iter().map(|s| s.rss_kib).sum::<u64>());
    let mut node_reports: Vec<NodeReport> = cfg
        .url
        .iter()
        .map(|url| NodeReport {
            url: url.clone(),
            ..NodeReport::default()
        })
        .collect();
    for publisher in 0..cfg.publishers {
        node_reports[publisher_node(publisher, nodes.len())].publishers += 1;
    }
    let mut latency = Histogram::new();
    let mut broadcast_latency = Histogram::new();
    let mut subscribers_dropped = 0;
    let mut broadcast_deliveries = 0;
    let mut subscribers_all_broadcasts = 0;
    for (report, tally) in node_reports.iter_mut().zip(&finished.nodes) {
        report.subscribers = tally.subscribers;
        report.subscribers_dropped = tally.dropped;
        report.deliveries = tally.deliveries;
        report.lost = tally.lost;
        report.out_of_order = tally.out_of_order;
        report.latency = tally.latency.percentiles();
        report.broadcast_deliveries = tally.broadcast_deliveries;
        report.expected_broadcast_deliveries = broadcasts.sent * tally.subscribers as u64;
        report.subscribers_all_broadcasts = tally.subscribers_all_broadcasts;
        report.broadcast_latency = tally.broadcast_latency.percentiles();
        latency.merge(&tally.latency);
        broadcast_latency.merge(&tally.broadcast_latency);
        subscribers_dropped += tally.dropped;
        broadcast_deliveries += tally.broadcast_deliveries;
        subscribers_all_broadcasts += tally.subscribers_all_broadcasts;
    }
    for (room, tally) in per_room.iter_mut().zip(&finished.rooms) {
        room.subscribers = tally.subscribers;
        room.deliveries = tally.deliveries;
        room.lost = tally.lost;
        room.out_of_order = tally.out_of_order;
        room.expected_deliveries = room.publications * room.subscribers as u64;
    }
    for sample in &finished.failure_samples {
        if failure_samples.len() < MAX_FAILURE_SAMPLES {
            failure_samples.push(sample.clone());
        }
    }
    if acknowledged == 0 && publishers_dropped == cfg.publishers {
        bail!("every publisher failed: {}", failure_samples.join("; "));
    }
    let last_delivery_ns = finished.last_delivery_ns.max(publish_started_ns);
    let publications: u64 = per_room.iter().map(|r| r.publications).sum();
    let deliveries: u64 = per_room.iter().map(|r| r.deliveries).sum();
    let delivery_secs = (last_delivery_ns.saturating_sub(publish_started_ns)) as f64 / 1e9;
    let per_delivery_us = |cpu: f64| {
        if deliveries > 0 {
            cpu * 1e6 / deliveries as f64
        } else {
            0.0
        }
    };
    Ok(FanoutReport {
        scenario: "fanout",
        subscribers: cfg.subscribers,
        subscribers_connected,
        subscribers_dropped,
        rooms: cfg.rooms,
        publishers: cfg.publishers,
        rate: cfg.rate,
        window: cfg.window,
        payload_bytes: cfg.payload,
        duration_secs: cfg.duration,
        worker_processes,
        publications,
        sent,
        acknowledged,
        publish_errors,
        unacknowledged,
        publishers_dropped,
        publications_per_sec: if publishing_secs > 0.0 {
            publications as f64 / publishing_secs
        } else {
            0.0
        },
        deliveries,
        expected_deliveries: per_room.iter().map(|r| r.expected_deliveries).sum(),
        delivery_secs,
        deliveries_per_sec: if delivery_secs > 0.0 {
            deliveries as f64 / delivery_secs
        } else {
            0.0
        },
        lost: per_room.iter().map(|r| r.lost).sum(),
        out_of_order: per_room.iter().map(|r| r.out_of_order).sum(),
        latency: latency.percentiles(),
        ack_latency: ack_latency.percentiles(),
        per_room,
        broadcasts: cfg.broadcasts,
        broadcasts_sent: broadcasts.sent,
        broadcast_errors: broadcasts.errors,
        broadcast_deliveries,
        expected_broadcast_deliveries: broadcasts.sent * subscribers_connected as u64,
        subscribers_all_broadcasts,
        broadcast_latency: broadcast_latency.percentiles(),
        bench_cpu_secs: cpu_secs,
        bench_cpu_us_per_delivery: per_delivery_us(cpu_secs),
        server_cpu_secs,
        server_cpu_us_per_delivery: server_cpu_secs.map(per_delivery_us),
        server_rss_kib,
        servers,
        nodes: node_reports,
        failure_samples,
        latency_histogram: latency,
        ack_latency_histogram: ack_latency,
        broadcast_latency_histogram: broadcast_latency,
    })
}

/// Most `--broadcasts` one run may send.
const MAX_BROADCASTS: u64 = 10_000;
/// Longest `--broadcast-interval`, seconds.
const MAX_BROADCAST_INTERVAL_SECS: f64 = 60.0;

/// What [`send_broadcasts`] did.
#[derive(Debug, Default)]
struct BroadcastsSent {
    /// Broadcasts the server accepted.
    sent: u64,
    /// Requests that failed (at most one: the first failure ends the broadcasts).
    errors: u64,
    failure: Option<String>,
}

/// The longest [`send_broadcasts`] may take: every interval, and every request to its timeout.
fn broadcasts_allowance(cfg: &FanoutConfig) -> Duration {
    let per_broadcast = Duration::try_from_secs_f64(cfg.broadcast_interval).unwrap_or(Duration::ZERO)
        + switchyard_client::DEFAULT_TIMEOUT;
    per_broadcast.saturating_mul(u32::try_from(cfg.broadcasts).unwrap_or(u32::MAX))
}

/// The body of broadcast `seq` of run `run_id`, sent at `sent_ns`: `{"data": {...}}` with the
/// timestamp, the sequence number and the run's id, which subscribers find by scanning.
fn broadcast_body(run_id: &str, seq: u64, sent_ns: u64) -> serde_json::Value {
    serde_json::json!({
        "data": {
            BROADCAST_RUN_KEY: run_id,
            BROADCAST_SEQ_KEY: seq,
            SENT_NS_KEY: sent_ns,
        }
    })
}

/// Sends `count` broadcasts through `target`'s `POST /api/broadcast`, one at a time (each waits
/// for the previous answer), `interval` apart; each request is bounded by the HTTP client's
/// timeout and the first failure ends the broadcasts.
async fn send_broadcasts(
    target: &Target,
    api_key: Option<&str>,
    run_id: &str,
    count: u64,
    interval: Duration,
) -> BroadcastsSent {
    let http = crate::session::http_client(target, api_key);
    let mut outcome = BroadcastsSent::default();
    let started = Instant::now();
    for seq in 1..=count {
        let due = started + interval.saturating_mul(u32::try_from(seq - 1).unwrap_or(u32::MAX));
        tokio::time::sleep_until(due).await;
        let body = broadcast_body(run_id, seq, now_ns());
        let failure = match http.post("/api/broadcast", &body).await {
            Ok(response) if response.status.is_success() => None,
            Ok(response) => Some(format!(
                "POST /api/broadcast to {}: {} {}",
                target.endpoint.host, response.status, response.text
            )),
            Err(e) => Some(format!("POST /api/broadcast to {}: {e:#}", target.endpoint.host)),
        };
        match failure {
            None => outcome.sent += 1,
            Some(failure) => {
                outcome.errors += 1;
                outcome.failure = Some(failure);
                break;
            }
        }
    }
    outcome
}

/// CPU seconds of each process in `pids`, in order.
fn servers_cpu_secs(pids: &[u32]) -> anyhow::Result<Vec<f64>> {
    pids.iter()
        .map(|&pid| procfs::cpu_secs(pid).with_context(|| format!("reading the CPU time of server {pid}")))
        .collect()
}

fn validate(cfg: &FanoutConfig) -> anyhow::Result<()> {
    if cfg.subscribers == 0 || cfg.rooms == 0 || cfg.publishers == 0 {
        bail!("--subscribers, --rooms and --publishers must each be at least 1");
    }
    if cfg.rooms > cfg.subscribers {
        bail!(
            "--rooms ({}) must not exceed --subscribers ({})",
            cfg.rooms,
            cfg.subscribers
        );
    }
    if cfg.window == 0 {
        bail!("--window must be at least 1");
    }
    if !cfg.duration.is_finite() || cfg.duration <= 0.0 || cfg.duration > 3600.0 {
        bail!("--duration must be between 0 and 3600 seconds");
    }
    if cfg.connect_rate.is_nan() || cfg.connect_rate <= 0.0 {
        bail!("--connect-rate must be positive");
    }
    if cfg.drain_timeout.is_nan()
        || cfg.drain_timeout < 0.0
        || cfg.connect_timeout.is_nan()
        || cfg.connect_timeout <= 0.0
    {
        bail!("--drain-timeout must be ≥ 0 and --connect-timeout positive");
    }
    if cfg.url.is_empty() {
        bail!("at least one --url is needed");
    }
    if cfg.payload > 60 * 1024 {
        bail!("--payload must be at most 61440 bytes (the server's default frame limit is 64 KiB)");
    }
    if cfg.broadcasts > MAX_BROADCASTS {
        bail!("--broadcasts must be at most {MAX_BROADCASTS}");
    }
    if !(0.0..=MAX_BROADCAST_INTERVAL_SECS).contains(&cfg.broadcast_interval) {
        bail!("--broadcast-interval must be between 0 and {MAX_BROADCAST_INTERVAL_SECS} seconds");
    }
    Ok(())
}

/// What subscribers learn once publishing (and broadcasting) has stopped.
#[derive(Debug, Clone)]
struct Finals {
    /// Per room, the highest acknowledged offset.
    top_offsets: Arc<Vec<u64>>,
    /// Broadcasts the server accepted: every subscriber should receive this many.
    broadcasts: u64,
    /// Subscribers stop waiting for missing publications at this instant.
    deadline: Instant,
}

struct SubscriberReport {
    room: usize,
    node: usize,
    deliveries: u64,
    lost: u64,
    out_of_order: u64,
    last_delivery_ns: u64,
    /// This run's broadcasts received.
    broadcasts: u64,
    /// Why the connection ended before the subscriber was done, if it did.
    ended_early: Option<String>,
}

struct Subscriber {
    nodes: Arc<Nodes>,
    /// Which of the nodes this subscriber connects to.
    node: usize,
    index: usize,
    session: String,
    room: usize,
    room_name: String,
    read_buffer: usize,
    timeout: Duration,
    ready: mpsc::Sender<Result<(), String>>,
    finals: watch::Receiver<Option<Finals>>,
    /// The same finals, for the receive loop.
    finals_once: oneshot::Receiver<Finals>,
    counters: Arc<Counters>,
    records: Arc<SharedRecords>,
}

impl Subscriber {
    /// Returns `None` if the subscriber never joined (already reported as a failure).
    async fn run(mut self) -> Option<SubscriberReport> {
        let rooms = [self.room_name.clone()];
        let spec = ConnectSpec {
            target: self.nodes.node(self.node),
            index: self.index,
            session: &self.session,
            rooms: &rooms,
            read_buffer: self.read_buffer,
            timeout: self.timeout,
        };
        let joined = match connect_and_join(spec).await {
            Ok(joined) => joined,
            Err(e) => {
                self.counters.failed();
                let _ = self.ready.send(Err(format!("{e:#}"))).await;
                return None;
            }
        };
        let _ = self.ready.send(Ok(())).await;
        drop(self.ready);
        let open = self.counters.established();
        let mut ws = joined.ws;
        let mut check = DeliveryCheck::new(
            joined.offset,
            self.records.clone(),
            SharedLatency::slot(self.node, self.index),
        );
        let ended_early = check
            .receive(&mut ws, &mut self.finals_once, self.room, &self.counters)
            .await
            .err();
        drop(open);
        if ended_early.is_none() {
            ws.close(Duration::from_secs(1)).await;
        }
        // A subscriber that ended early learns the final offset when the publishers are done.
        let top = match self.finals.wait_for(Option::is_some).await {
            Ok(finals) => finals.as_ref().map(|f| f.top_offsets[self.room]),
            Err(_) => None,
        };
        if let Some(top) = top {
            check.missing_up_to(top);
        }
        Some(SubscriberReport {
            room: self.room,
            node: self.node,
            deliveries: check.deliveries,
            lost: check.lost,
            out_of_order: check.out_of_order,
            last_delivery_ns: check.last_delivery_ns,
            broadcasts: check.broadcasts,
            ended_early: ended_early.map(|e| format!("{e:#}")),
        })
    }
}

/// Offset, broadcast and latency bookkeeping of one subscriber in one room.
struct DeliveryCheck {
    next_offset: u64,
    deliveries: u64,
    lost: u64,
    out_of_order: u64,
    /// This run's broadcasts received.
    broadcasts: u64,
    records: Arc<SharedRecords>,
    latency_slot: usize,
    last_delivery_ns: u64,
}

impl DeliveryCheck {
    fn new(joined_offset: u64, records: Arc<SharedRecords>, latency_slot: usize) -> Self {
        DeliveryCheck {
            next_offset: joined_offset + 1,
            deliveries: 0,
            lost: 0,
            out_of_order: 0,
            broadcasts: 0,
            records,
            latency_slot,
            last_delivery_ns: 0,
        }
    }

    /// Takes one frame: a publication of the room, a broadcast of this run, or anything else
    /// (ignored). Scans bytes only; allocates nothing.
    fn frame(&mut self, frame: &[u8], received_ns: u64) {
        match scan::frame_kind(frame) {
            FrameKind::Message => {
                if let Some(offset) = scan::offset(frame) {
                    self.delivered(offset, scan::sent_ns(frame), received_ns);
                }
            }
            FrameKind::System if self.records.run_marker.find(frame).is_some() => {
                self.broadcast(scan::sent_ns(frame), received_ns);
            }
            _ => {}
        }
    }

    fn broadcast(&mut self, sent_ns: Option<u64>, received_ns: u64) {
        self.broadcasts += 1;
        if let Some(sent) = sent_ns {
            self.records
                .broadcast_latency
                .record(self.latency_slot, received_ns.saturating_sub(sent));
        }
    }

    fn delivered(&mut self, offset: u64, sent_ns: Option<u64>, received_ns: u64) {
        self.deliveries += 1;
        self.last_delivery_ns = received_ns;
        if let Some(sent) = sent_ns {
            self.records
                .latency
                .record(self.latency_slot, received_ns.saturating_sub(sent));
        }
        if offset == self.next_offset {
            self.next_offset += 1;
        } else if offset > self.next_offset {
            self.lost += offset - self.next_offset;
            self.next_offset = offset + 1;
        } else {
            self.out_of_order += 1;
        }
    }

    /// Receives until the room's final offset and every broadcast arrived, or the drain deadline
    /// passed. An error means the connection ended first; what it missed is counted as lost either
    /// way.
    async fn receive(
        &mut self,
        ws: &mut WsConnection,
        finals: &mut oneshot::Receiver<Finals>,
        room: usize,
        counters: &Counters,
    ) -> anyhow::Result<()> {
        // (final offset of the room, broadcasts sent, drain deadline)
        let mut target: Option<(u64, u64, Instant)> = None;
        loop {
            let received_ns = now_ns();
            let received_before = self.deliveries + self.broadcasts;
            let mut closed = None;
            loop {
                match ws.next_frame() {
                    Ok(Some(Incoming::Message(frame))) => self.frame(frame, received_ns),
                    Ok(Some(Incoming::Closed { code })) => {
                        closed = Some(anyhow::anyhow!("closed by the server with code {code:?}"));
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        closed = Some(e);
                        break;
                    }
                }
            }
            counters.messages(self.deliveries + self.broadcasts - received_before);
            if let Some(e) = closed {
                break Err(e);
            }
            if let Some((top, broadcasts, _)) = target
                && self.next_offset > top
                && self.broadcasts >= broadcasts
            {
                break Ok(());
            }
            if let Err(e) = ws.flush().await {
                break Err(e);
            }
            let deadline = target.map(|(_, _, deadline)| deadline);
            tokio::select! {
                read = ws.fill() => match read {
                    Ok(0) => break Err(anyhow::anyhow!("the connection ended")),
                    Ok(_) => {}
                    Err(e) => break Err(anyhow::Error::new(e).context("reading failed")),
                },
                // A oneshot per subscriber: polling a shared `watch` takes the channel's one waiter
                // lock on every wake-up of every subscriber (about 6 % of the load generator's CPU).
                arrived = &mut *finals, if target.is_none() => match arrived {
                    Ok(finals) => target = Some((finals.top_offsets[room], finals.broadcasts, finals.deadline)),
                    Err(_) => break Err(anyhow::anyhow!("the scenario ended")),
                },
                _ = sleep_until_opt(deadline) => break Ok(()),
            }
        }
    }

    /// Counts every offset up to `top` that has not arrived as lost.
    fn missing_up_to(&mut self, top: u64) {
        if self.next_offset <= top {
            self.lost += top + 1 - self.next_offset;
            self.next_offset = top + 1;
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

struct PublisherReport {
    /// Per room: (room index, acknowledged publications, highest acknowledged offset).
    rooms: Vec<(usize, u64, u64)>,
    sent: u64,
    errors: u64,
    unacknowledged: u64,
    ack_latency: Histogram,
    first_error: Option<String>,
    /// Why the publisher stopped early (e.g. closed by the server), if it did.
    failure: Option<String>,
}

struct Publisher {
    nodes: Arc<Nodes>,
    /// Which of the nodes this publisher connects to.
    node: usize,
    index: usize,
    /// Offset of this publisher's first send, as a fraction of its interval: fixed-rate publishers
    /// are spread evenly over the interval instead of all sending on the same instant.
    phase: f64,
    session: String,
    rooms: Vec<usize>,
    room_names: Vec<String>,
    rate: PublishRate,
    window: usize,
    duration: Duration,
    payload: usize,
    read_buffer: usize,
    timeout: Duration,
    drain_timeout: Duration,
    ready: mpsc::Sender<()>,
    start: watch::Receiver<Option<Instant>>,
}

impl Publisher {
    /// Connects, joins, publishes until the duration is over, then waits (bounded) for the last
    /// acknowledgements. A failure is part of the report, so that what was acknowledged before it
    /// still counts.
    async fn run(mut self) -> PublisherReport {
        let mut state = PublishState {
            acked: vec![0; self.rooms.len()],
            top: vec![0; self.rooms.len()],
            in_flight: VecDeque::with_capacity(self.window),
            sent: 0,
            errors: 0,
            ack_latency: Histogram::new(),
            first_error: None,
        };
        let spec = ConnectSpec {
            target: self.nodes.node(self.node),
            index: self.index,
            session: &self.session,
            rooms: &self.room_names,
            read_buffer: self.read_buffer,
            timeout: self.timeout,
        };
        let joined = connect_and_join(spec).await;
        let _ = self.ready.send(()).await;
        let failure = match joined {
            Ok(joined) => {
                let mut ws = joined.ws;
                match self.publish(&mut ws, &mut state).await {
                    Ok(()) => {
                        ws.close(Duration::from_secs(1)).await;
                        None
                    }
                    Err(e) => Some(format!("{e:#}")),
                }
            }
            Err(e) => Some(format!("could not connect and join: {e:#}")),
        };
        PublisherReport {
            rooms: self
                .rooms
                .iter()
                .enumerate()
                .map(|(slot, &room)| (room, state.acked[slot], state.top[slot]))
                .collect(),
            sent: state.sent,
            errors: state.errors,
            unacknowledged: state.in_flight.len() as u64,
            ack_latency: state.ack_latency,
            first_error: state.first_error,
            failure,
        }
    }

    async fn publish(&mut self, ws: &mut WsConnection, state: &mut PublishState) -> anyhow::Result<()> {
        let started = loop {
            if let Some(started) = *self.start.borrow_and_update() {
                break started;
            }
            self.start
                .changed()
                .await
                .context("the scenario ended before publishing started")?;
        };
        let stop_at = started + self.duration;
        let interval = match self.rate {
            PublishRate::PerSecond(rate) => Some(Duration::from_secs_f64(1.0 / rate)),
            PublishRate::Max => None,
        };
        let mut next_send = match interval {
            Some(interval) => started + interval.mul_f64(self.phase),
            None => started,
        };
        let mut next_reference: u64 = 100;
        let mut next_room = 0;
        let mut frame = Vec::with_capacity(self.payload + 128);
        let mut drain_until = None;
        loop {
            let now = Instant::now();
            if drain_until.is_none() && now >= stop_at {
                drain_until = Some(now + self.drain_timeout);
            }
            if let Some(until) = drain_until
                && (state.in_flight.is_empty() || now >= until)
            {
                return Ok(());
            }
            // Queue every publish that is due and fits in the window, then write them at once.
            if drain_until.is_none() {
                while state.in_flight.len() < self.window && next_send <= now {
                    let slot = next_room;
                    next_room = (next_room + 1) % self.rooms.len();
                    let sent_ns =
                        encode_publish(&mut frame, &self.room_names[slot], next_reference, self.payload);
                    next_reference += 1;
                    ws.queue_text(&frame);
                    state.in_flight.push_back((slot, sent_ns));
                    state.sent += 1;
                    match interval {
                        Some(interval) => next_send += interval,
                        None => next_send = now,
                    }
                }
            }
            ws.flush().await?;
            let wake = match (drain_until, interval) {
                (Some(until), _) => until,
                (None, Some(_)) if state.in_flight.len() < self.window => next_send.min(stop_at),
                (None, _) => stop_at,
            };
            tokio::select! {
                read = ws.fill() => {
                    let read = read.context("reading from the server failed")?;
                    state.take_replies(ws)?;
                    if read == 0 {
                        bail!("the server ended the publisher's connection");
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

/// A publisher's bookkeeping: acknowledgements arrive in request order, so a FIFO of room slots
/// (with the send timestamps) tells which room each acknowledged offset belongs to.
struct PublishState {
    acked: Vec<u64>,
    top: Vec<u64>,
    in_flight: VecDeque<(usize, u64)>,
    sent: u64,
    errors: u64,
    ack_latency: Histogram,
    first_error: Option<String>,
}

impl PublishState {
    fn take_replies(&mut self, ws: &mut WsConnection) -> anyhow::Result<()> {
        let received_ns = now_ns();
        while let Some(incoming) = ws.next_frame()? {
            let frame = match incoming {
                Incoming::Message(frame) => frame,
                Incoming::Closed { code } => {
                    bail!("the server closed the publisher's connection (code {code:?})")
                }
            };
            match scan::frame_kind(frame) {
                FrameKind::Ack => {
                    let Some((slot, sent_ns)) = self.in_flight.pop_front() else {
                        bail!("an ack arrived with no publish in flight");
                    };
                    self.ack_latency.record(received_ns.saturating_sub(sent_ns));
                    self.acked[slot] += 1;
                    if let Some(offset) = scan::offset(frame) {
                        self.top[slot] = self.top[slot].max(offset);
                    }
                }
                FrameKind::Error => {
                    self.errors += 1;
                    if self.first_error.is_none() {
                        self.first_error = Some(String::from_utf8_lossy(frame).into_owned());
                    }
                    if scan::has_ref(frame) {
                        self.in_flight.pop_front();
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Writes `{"type":"publish","room":..,"ref":..,"data":{"sent_ns":..,"pad":".."}}` into `frame`,
/// padding `data` to `payload` bytes (or as few as the timestamp needs). Returns the timestamp.
fn encode_publish(frame: &mut Vec<u8>, room: &str, reference: u64, payload: usize) -> u64 {
    frame.clear();
    let _ = write!(
        frame,
        r#"{{"type":"publish","room":"{room}","ref":{reference},"data":"#
    );
    let data_start = frame.len();
    let sent_ns = now_ns();
    let _ = write!(frame, r#"{{"{SENT_NS_KEY}":{sent_ns},"pad":""#);
    let closing = br#""}"#;
    let written = frame.len() - data_start + closing.len();
    frame.resize(frame.len() + payload.saturating_sub(written), b'x');
    frame.extend_from_slice(closing);
    frame.push(b'}');
    sent_ns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_frames_have_the_requested_data_size() {
        let mut frame = Vec::new();
        encode_publish(&mut frame, "r", 7, 100);
        let value: serde_json::Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(value["type"], "publish");
        assert_eq!(value["ref"], 7);
        assert_eq!(value["data"].to_string().len(), 100);
        assert!(value["data"][SENT_NS_KEY].as_u64().is_some());
        encode_publish(&mut frame, "r", 8, 1);
        let value: serde_json::Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(value["data"]["pad"], "");
    }

    #[test]
    fn every_room_has_subscribers_on_every_node() {
        let (subscribers, rooms, nodes) = (1000, 10, 3);
        let mut per_node = vec![0; nodes];
        let mut per_room_node = vec![vec![0; nodes]; rooms];
        for index in 0..subscribers {
            let node = subscriber_node(index, rooms, nodes);
            per_node[node] += 1;
            per_room_node[index % rooms][node] += 1;
        }
        assert!(per_node.iter().all(|&n| (333..=334).contains(&n)), "{per_node:?}");
        for counts in &per_room_node {
            assert!(counts.iter().all(|&n| (33..=34).contains(&n)), "{counts:?}");
        }
        // As many rooms as nodes must not put each room on one node.
        let on_nodes: Vec<usize> = (0..9).map(|index| subscriber_node(index, 3, 3)).collect();
        assert_eq!(on_nodes, vec![0, 1, 2, 1, 2, 0, 2, 0, 1]);
        assert_eq!((0..5).map(|i| subscriber_node(i, 1, 1)).sum::<usize>(), 0);
        assert_eq!(publisher_node(4, 3), 1);
    }

    #[test]
    fn every_room_has_a_publisher() {
        assert_eq!(publisher_rooms(0, 2, 5), vec![0, 2, 4]);
        assert_eq!(publisher_rooms(1, 2, 5), vec![1, 3]);
        assert_eq!(publisher_rooms(3, 4, 2), vec![1]);
    }

    #[test]
    fn gaps_and_reorders_are_counted() {
        let records = Arc::new(SharedRecords::new(2, "r1"));
        let mut check = DeliveryCheck::new(0, records.clone(), SharedLatency::slot(1, 3));
        for offset in [1, 2, 4, 3, 5] {
            check.delivered(offset, Some(0), 10);
        }
        assert_eq!((check.deliveries, check.lost, check.out_of_order), (5, 1, 1));
        assert_eq!(records.latency.node(0).count(), 0);
        assert_eq!(records.latency.node(1).count(), 5);
        assert_eq!(records.broadcast_latency.node(1).count(), 0);
    }

    #[test]
    fn this_runs_broadcasts_are_counted_apart_from_publications() {
        let records = Arc::new(SharedRecords::new(2, "abc1"));
        let mut check = DeliveryCheck::new(0, records.clone(), SharedLatency::slot(1, 0));
        // A system frame as the server writes it for `POST /api/broadcast` with this body.
        let system = |run: &str, seq: u64, sent_ns: u64| {
            let data = broadcast_body(run, seq, sent_ns)["data"].to_string();
            format!(r#"{{"type":"system","data":{data},"ts":1795771301859}}"#)
        };
        check.frame(system("abc1", 1, 1_000).as_bytes(), 3_000);
        check.frame(
            br#"{"type":"message","room":"r","offset":1,"data":{"sent_ns":5},"ts":1}"#,
            10,
        );
        check.frame(system("abc12", 2, 1_000).as_bytes(), 3_000);
        check.frame(br#"{"type":"system","data":{"notice":"hi all"},"ts":1}"#, 3_000);
        check.frame(system("abc1", 2, 2_000).as_bytes(), 2_500);
        assert_eq!((check.broadcasts, check.deliveries, check.lost), (2, 1, 0));
        let broadcasts = records.broadcast_latency.node(1);
        assert_eq!(broadcasts.count(), 2);
        assert_eq!(broadcasts.max(), 2_000);
        assert_eq!(records.latency.node(1).count(), 1);
        assert_eq!(records.broadcast_latency.node(0).count(), 0);
    }

    #[test]
    fn broadcast_tallies_merge_like_the_others() {
        let tally = |deliveries: u64, all: usize, latencies: &[u64]| {
            let mut latency = Histogram::new();
            for &nanos in latencies {
                latency.record(nanos);
            }
            SubscribersFinished {
                nodes: vec![NodeTally {
                    subscribers: 2,
                    broadcast_deliveries: deliveries,
                    subscribers_all_broadcasts: all,
                    broadcast_latency: latency,
                    ..NodeTally::default()
                }],
                ..SubscribersFinished::default()
            }
        };
        let mut merged = SubscribersFinished::default();
        for share in [tally(4, 2, &[10, 20]), tally(3, 1, &[30])] {
            // As it comes back from a worker process.
            let wire: SubscribersFinished =
                serde_json::from_value(serde_json::to_value(&share).unwrap()).unwrap();
            merged.merge(&wire);
        }
        let node = &merged.nodes[0];
        assert_eq!(
            (
                node.subscribers,
                node.broadcast_deliveries,
                node.subscribers_all_broadcasts
            ),
            (4, 7, 3)
        );
        assert_eq!(node.broadcast_latency.count(), 3);
        assert_eq!(node.broadcast_latency.max(), 30);
    }

    /// Reads one HTTP/1.1 request (head and `content-length` body) as text.
    async fn read_request(stream: &mut tokio::net::TcpStream) -> String {
        use tokio::io::AsyncReadExt as _;
        let mut request = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let text = String::from_utf8_lossy(&request).into_owned();
            if let Some(head_end) = text.find("\r\n\r\n") {
                let length = text[..head_end]
                    .lines()
                    .find_map(|line| {
                        line.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(str::to_string)
                    })
                    .and_then(|value| value.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if request.len() >= head_end + 4 + length {
                    return text;
                }
            }
            let read = stream.read(&mut chunk).await.unwrap();
            assert!(read > 0, "the request ended early");
            request.extend_from_slice(&chunk[..read]);
        }
    }

    #[tokio::test]
    async fn broadcasts_carry_the_key_and_stop_at_the_first_failure() {
        use tokio::io::AsyncWriteExt as _;
        // A stand-in for the HTTP API: accepts the first broadcast, refuses the second.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let api = tokio::spawn(async move {
            let mut requests = Vec::new();
            for answer in ["200 OK", "503 Service Unavailable"] {
                let (mut stream, _) = listener.accept().await.unwrap();
                requests.push(read_request(&mut stream).await);
                let response = format!(
                    "HTTP/1.1 {answer}\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{{\"ok\":true}}"
                );
                stream.write_all(response.as_bytes()).await.unwrap();
            }
            requests
        });
        let nodes = Nodes::resolve(&[url], false, 1).await.unwrap();
        let before = now_ns();
        let outcome = send_broadcasts(nodes.node(0), Some("k123"), "ab12", 3, Duration::ZERO).await;
        assert_eq!((outcome.sent, outcome.errors), (1, 1), "{outcome:?}");
        assert!(outcome.failure.unwrap().contains("503"));
        let requests = api.await.unwrap();
        for (seq, request) in requests.iter().enumerate() {
            assert!(request.starts_with("POST /api/broadcast "), "{request}");
            assert!(
                request
                    .to_ascii_lowercase()
                    .contains("authorization: bearer k123"),
                "{request}"
            );
            let body: serde_json::Value =
                serde_json::from_str(request.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            assert_eq!(body["data"][BROADCAST_RUN_KEY], "ab12");
            assert_eq!(body["data"][BROADCAST_SEQ_KEY], seq as u64 + 1);
            assert!(body["data"][SENT_NS_KEY].as_u64().unwrap() >= before);
        }
    }

    #[test]
    fn broadcasts_are_bounded() {
        let mut cfg = FanoutConfig::new("http://127.0.0.1:1");
        cfg.broadcasts = 3;
        assert!(validate(&cfg).is_ok());
        cfg.broadcasts = MAX_BROADCASTS + 1;
        assert!(validate(&cfg).is_err());
        cfg.broadcasts = 3;
        cfg.broadcast_interval = f64::NAN;
        assert!(validate(&cfg).is_err());
        cfg.broadcast_interval = -1.0;
        assert!(validate(&cfg).is_err());
        cfg.broadcast_interval = 0.5;
        assert_eq!(
            broadcasts_allowance(&cfg),
            (Duration::from_millis(500) + switchyard_client::DEFAULT_TIMEOUT) * 3
        );
    }

    #[test]
    fn rates_parse() {
        assert_eq!("max".parse::<PublishRate>().unwrap(), PublishRate::Max);
        assert_eq!("50".parse::<PublishRate>().unwrap(), PublishRate::PerSecond(50.0));
        assert!("0".parse::<PublishRate>().is_err());
    }
}
