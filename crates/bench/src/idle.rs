//! The `idle` scenario: ramp up N authenticated connections at a fixed rate, each joining one room,
//! hold them open, and report how many were established, how long connect + join took, and — given
//! the server's pid — how much resident memory the server spends per idle connection.
//!
//! Several nodes that share a backend can be loaded at once (`--url` given several times): the
//! connections go to the nodes round-robin, and the sessions are created on every node in turn.
//! Given every node's pid, the memory per connection is that of all of them together.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::histogram::{Histogram, Percentiles};
use crate::procfs;
use crate::scan;
use crate::session::{ConnectSpec, connect_and_join, create_sessions};
use crate::target::{Nodes, check_open_files};
use crate::ws::{Incoming, WsConnection};

/// Settings of the `idle` scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct IdleConfig {
    /// Base URL of the server, e.g. http://127.0.0.1:8000. Repeat it for several nodes that share a
    /// backend (e.g. one Redis): connections are spread over them round-robin
    #[arg(long, required = true)]
    pub url: Vec<String>,
    /// Connections to open
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// New connections per second during the ramp
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds to hold the connections open once the ramp is over
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
    /// Room every connection joins (default: a fresh room for this run)
    #[arg(long)]
    pub room: Option<String>,
    /// Pid of the server process, to read its VmRSS before connecting and while holding; repeat it
    /// for several nodes (their VmRSS are added up)
    #[arg(long)]
    pub server_pid: Vec<u32>,
    /// Source addresses 127.0.0.1 ..= 127.0.0.K the connections are spread over
    #[arg(long, default_value_t = 1)]
    pub sources: u8,
    /// Sessions (users) the connections are spread over; one user's connections share a session
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// Read buffer per connection, bytes (grown only for a larger frame)
    #[arg(long, default_value_t = 1024)]
    pub read_buffer: usize,
    /// Seconds allowed for one connection's connect, welcome and join
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Allow a target that is not a loopback address
    #[arg(long)]
    pub allow_remote: bool,
}

impl IdleConfig {
    /// The defaults of the command line, for one node at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self::nodes([url.into()])
    }

    /// The defaults of the command line, for nodes at `urls` that share a backend.
    pub fn nodes(urls: impl IntoIterator<Item = String>) -> Self {
        IdleConfig {
            url: urls.into_iter().collect(),
            connections: 1000,
            rate: 1000.0,
            hold: 10.0,
            room: None,
            server_pid: Vec::new(),
            sources: 1,
            sessions: 100,
            read_buffer: 1024,
            connect_timeout: 10.0,
            allow_remote: false,
        }
    }
}

/// What the `idle` scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub scenario: &'static str,
    pub connections: usize,
    pub established: usize,
    pub failed: usize,
    /// The nodes in the order of `--url`.
    pub nodes: Vec<String>,
    /// Connections established on each node, in the order of `nodes`.
    pub established_per_node: Vec<usize>,
    /// Established connections that the server closed (or that broke) while holding.
    pub dropped_while_holding: usize,
    /// A few distinct failure messages.
    pub failure_samples: Vec<String>,
    pub sources: usize,
    pub sessions: usize,
    pub room: String,
    pub ramp_secs: f64,
    pub hold_secs: f64,
    /// From the TCP connect to the `joined` reply.
    pub connect_join_latency: Percentiles,
    /// VmRSS before connecting (summed over every `--server-pid`, as are the other server figures).
    pub server_rss_before_kib: Option<u64>,
    /// VmRSS at the end of the hold.
    pub server_rss_holding_kib: Option<u64>,
    /// Highest VmRSS seen while holding.
    pub server_rss_holding_max_kib: Option<u64>,
    /// (VmRSS at the end of the hold − VmRSS before connecting) / established connections.
    pub server_rss_per_connection_bytes: Option<f64>,
    pub bench_rss_holding_kib: u64,
    pub bench_cpu_secs: f64,
}

impl std::fmt::Display for IdleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "idle: {} connections to room {}", self.connections, self.room)?;
        writeln!(
            f,
            "  established {} / failed {} / dropped while holding {} (ramp {:.1} s, held {:.1} s, {} sources, {} sessions)",
            self.established,
            self.failed,
            self.dropped_while_holding,
            self.ramp_secs,
            self.hold_secs,
            self.sources,
            self.sessions
        )?;
        if self.nodes.len() > 1 {
            for (node, established) in self.nodes.iter().zip(&self.established_per_node) {
                writeln!(f, "  node {node}: {established} established")?;
            }
        }
        writeln!(f, "  connect + join: {}", self.connect_join_latency)?;
        if let (Some(before), Some(holding), Some(per)) = (
            self.server_rss_before_kib,
            self.server_rss_holding_kib,
            self.server_rss_per_connection_bytes,
        ) {
            writeln!(
                f,
                "  server RSS: {before} KiB before, {holding} KiB holding (max {} KiB) → {:.0} bytes ({:.2} KiB) per connection",
                self.server_rss_holding_max_kib.unwrap_or(holding),
                per,
                per / 1024.0
            )?;
        }
        writeln!(
            f,
            "  load generator: RSS {} KiB, CPU {:.2} s",
            self.bench_rss_holding_kib, self.bench_cpu_secs
        )?;
        for sample in &self.failure_samples {
            writeln!(f, "  failure: {sample}")?;
        }
        Ok(())
    }
}

/// Most distinct failure messages kept for the report.
const MAX_FAILURE_SAMPLES: usize = 5;

/// Runs the `idle` scenario to completion (it stops by itself).
pub async fn run_idle(cfg: IdleConfig) -> anyhow::Result<IdleReport> {
    procfs::now_ns();
    if cfg.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if !cfg.rate.is_finite() || cfg.rate <= 0.0 {
        bail!("--rate must be a positive number of connections per second");
    }
    if !cfg.hold.is_finite() || cfg.hold < 0.0 || cfg.hold > 86_400.0 {
        bail!("--hold must be between 0 and 86400 seconds");
    }
    if !cfg.connect_timeout.is_finite() || cfg.connect_timeout <= 0.0 {
        bail!("--connect-timeout must be positive");
    }
    check_open_files(cfg.connections)?;
    let nodes = Nodes::resolve(&cfg.url, cfg.allow_remote, cfg.sources).await?;
    let run_id = crate::run_id();
    let room = cfg.room.clone().unwrap_or_else(|| format!("bench-idle-{run_id}"));
    let session_count = cfg.sessions.clamp(1, cfg.connections);
    let sessions = Arc::new(create_sessions(&nodes, &format!("bench-idle-{run_id}"), session_count).await?);
    let rss_before = servers_rss_kib(&cfg.server_pid)?;
    let cpu_before = procfs::own_cpu_secs()?;

    let nodes = Arc::new(nodes);
    let rooms: Arc<[String]> = Arc::from(vec![room.clone()]);
    let stop = CancellationToken::new();
    let dropped = Arc::new(AtomicUsize::new(0));
    let (results_tx, mut results_rx) = mpsc::channel::<Connected>(cfg.connections);
    let mut tasks = JoinSet::new();
    let connect_timeout = Duration::from_secs_f64(cfg.connect_timeout);
    let ramp_started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / cfg.rate);
    let mut results = Vec::with_capacity(cfg.connections);
    for index in 0..cfg.connections {
        tokio::time::sleep_until(ramp_started + interval.mul_f64(index as f64)).await;
        while let Ok(result) = results_rx.try_recv() {
            results.push(result);
        }
        let task = HeldConnection {
            nodes: nodes.clone(),
            node: index % nodes.len(),
            index,
            sessions: sessions.clone(),
            rooms: rooms.clone(),
            read_buffer: cfg.read_buffer,
            timeout: connect_timeout,
            results: results_tx.clone(),
            stop: stop.clone(),
            dropped: dropped.clone(),
        };
        tasks.spawn(task.run());
        if index > 0 && index % 5000 == 0 {
            eprintln!("idle: {index} connections started");
        }
    }
    drop(results_tx);
    // Every task reports once, within its connect timeout.
    let collect_deadline = Instant::now() + connect_timeout + Duration::from_secs(5);
    while results.len() < cfg.connections {
        match tokio::time::timeout_at(collect_deadline, results_rx.recv()).await {
            Ok(Some(result)) => results.push(result),
            Ok(None) => break,
            Err(_) => break,
        }
    }
    let ramp_secs = ramp_started.elapsed().as_secs_f64();

    let mut latency = Histogram::new();
    let mut failure_samples: Vec<String> = Vec::new();
    let mut established = 0;
    let mut established_per_node = vec![0; nodes.len()];
    for (node, result) in &results {
        match result {
            Ok(elapsed) => {
                established += 1;
                established_per_node[*node] += 1;
                latency.record(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
            }
            Err(message) => {
                if failure_samples.len() < MAX_FAILURE_SAMPLES && !failure_samples.contains(message) {
                    failure_samples.push(message.clone());
                }
            }
        }
    }
    eprintln!(
        "idle: {established} of {} connections established; holding",
        cfg.connections
    );

    let hold_started = Instant::now();
    let hold_until = hold_started + Duration::from_secs_f64(cfg.hold);
    let mut rss_max = None;
    let mut rss_last = None;
    loop {
        if let Some(rss) = servers_rss_kib(&cfg.server_pid)? {
            rss_last = Some(rss);
            rss_max = Some(rss_max.unwrap_or(0).max(rss));
        }
        let now = Instant::now();
        if now >= hold_until {
            break;
        }
        tokio::time::sleep_until(hold_until.min(now + Duration::from_secs(1))).await;
    }
    let hold_secs = hold_started.elapsed().as_secs_f64();
    let bench_rss_holding_kib = procfs::own_rss_kib()?;

    stop.cancel();
    let wind_down = tokio::time::timeout(Duration::from_secs(15), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if wind_down.is_err() {
        tasks.abort_all();
    }
    let bench_cpu_secs = procfs::own_cpu_secs()? - cpu_before;

    let per_connection = match (rss_before, rss_last) {
        (Some(before), Some(holding)) if established > 0 => {
            Some((holding as f64 - before as f64) * 1024.0 / established as f64)
        }
        _ => None,
    };
    Ok(IdleReport {
        scenario: "idle",
        connections: cfg.connections,
        established,
        failed: cfg.connections - established,
        nodes: cfg.url.clone(),
        established_per_node,
        dropped_while_holding: dropped.load(Ordering::Relaxed),
        failure_samples,
        sources: nodes.node(0).sources.len().max(1),
        sessions: session_count,
        room,
        ramp_secs,
        hold_secs,
        connect_join_latency: latency.percentiles(),
        server_rss_before_kib: rss_before,
        server_rss_holding_kib: rss_last,
        server_rss_holding_max_kib: rss_max,
        server_rss_per_connection_bytes: per_connection,
        bench_rss_holding_kib,
        bench_cpu_secs,
    })
}

/// VmRSS of the processes `pids`, added up; `None` without pids.
fn servers_rss_kib(pids: &[u32]) -> anyhow::Result<Option<u64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut total = 0;
    for &pid in pids {
        total += procfs::rss_kib(pid).with_context(|| format!("reading the VmRSS of server {pid}"))?;
    }
    Ok(Some(total))
}

/// What a connection of the ramp reports: its node, and its connect + join time or why it failed.
type Connected = (usize, Result<Duration, String>);

/// One connection of the ramp: connects, joins, reports, then holds until stopped.
struct HeldConnection {
    nodes: Arc<Nodes>,
    /// Which of the nodes this connection goes to.
    node: usize,
    index: usize,
    sessions: Arc<Vec<String>>,
    rooms: Arc<[String]>,
    read_buffer: usize,
    timeout: Duration,
    results: mpsc::Sender<Connected>,
    stop: CancellationToken,
    dropped: Arc<AtomicUsize>,
}

impl HeldConnection {
    async fn run(self) {
        let spec = ConnectSpec {
            target: self.nodes.node(self.node),
            index: self.index,
            session: &self.sessions[self.index % self.sessions.len()],
            rooms: &self.rooms,
            read_buffer: self.read_buffer,
            timeout: self.timeout,
        };
        let joined = connect_and_join(spec).await;
        let mut ws = match joined {
            Ok(joined) => {
                let _ = self.results.send((self.node, Ok(joined.latency))).await;
                joined.ws
            }
            Err(e) => {
                let _ = self.results.send((self.node, Err(format!("{e:#}")))).await;
                return;
            }
        };
        drop(self.results);
        match hold(&mut ws, &self.stop).await {
            Ok(true) => ws.close(Duration::from_secs(2)).await,
            Ok(false) | Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Reads (and discards) whatever the server sends, answering pings, until `stop`. Returns false
/// if the connection ended first.
async fn hold(ws: &mut WsConnection, stop: &CancellationToken) -> anyhow::Result<bool> {
    loop {
        while let Some(incoming) = ws.next_frame()? {
            match incoming {
                Incoming::Message(frame) => {
                    let _ = scan::frame_kind(frame);
                }
                Incoming::Closed { .. } => return Ok(false),
            }
        }
        ws.flush().await?;
        tokio::select! {
            _ = stop.cancelled() => return Ok(true),
            read = ws.fill() => {
                if read? == 0 {
                    return Ok(false);
                }
            }
        }
    }
}
