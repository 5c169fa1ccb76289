//! The `idle` scenario: ramp up N authenticated connections at a fixed rate, each joining one room,
//! hold them open, and report how many were established, how long connect + join took, and — given
//! the server's pid — how much resident memory the server spends per idle connection.
//!
//! Several nodes that share a backend can be loaded at once (`--url` given several times): the
//! connections go to the nodes round-robin, and the sessions are created on every node in turn.
//! Given every node's pid, the memory per connection is that of all of them together.
//!
//! More connections than one process may open are spread over worker processes ([`crate::worker`]):
//! each ramps its share at its share of the rate and reports what it established; the parent holds,
//! reads the servers' memory, tells the workers to stop, and merges their reports.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::histogram::{Histogram, Percentiles};
use crate::plot::LatencyPlot;
use crate::procfs;
use crate::progress::{self, Counters, Progress};
use crate::scan;
use crate::session::{ConnectSpec, connect_and_join, create_sessions};
use crate::target::{Nodes, check_open_files};
use crate::worker::{
    ParentCommand, STARTUP_ALLOWANCE, WorkerIo, WorkerOptions, WorkerPool, WorkerTask, split_range,
    split_sources,
};
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
    /// API key of the HTTP API (creating sessions), sent as `Authorization: Bearer`
    #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub workers: WorkerOptions,
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
            api_key: None,
            workers: WorkerOptions::default(),
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
    /// Worker processes that held the connections (0: this process held them).
    pub worker_processes: usize,
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
    /// Summed over the load generator's processes.
    pub bench_rss_holding_kib: u64,
    /// Summed over the load generator's processes.
    pub bench_cpu_secs: f64,
    /// The connect + join latencies themselves, for `--plot`.
    #[serde(skip)]
    pub connect_join_histogram: Histogram,
}

impl LatencyPlot for IdleReport {
    fn plot_title(&self) -> String {
        format!(
            "idle: connect + join latency of {} connections ({} established)",
            self.connections, self.established
        )
    }

    fn plot_series(&self) -> Vec<(String, &Histogram)> {
        vec![("connect + join".to_string(), &self.connect_join_histogram)]
    }
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
        if self.worker_processes > 0 {
            writeln!(f, "  spread over {} worker processes", self.worker_processes)?;
        }
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

/// A share of the idle connections: all of them in one process, or one worker's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleShare {
    pub urls: Vec<String>,
    pub allow_remote: bool,
    /// Source addresses of this share (empty: the kernel chooses).
    pub sources: Vec<IpAddr>,
    pub room: String,
    pub sessions: Vec<String>,
    /// Global index of the share's first connection (it picks the node, session and source).
    pub first_index: usize,
    pub count: usize,
    /// New connections per second of this share.
    pub rate: f64,
    pub read_buffer: usize,
    pub connect_timeout: f64,
}

/// A share's ramp: what it established.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleRamped {
    pub established: usize,
    pub established_per_node: Vec<usize>,
    pub failed: usize,
    pub latency: Histogram,
    pub failure_samples: Vec<String>,
}

/// A share's end: what happened while holding.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleFinished {
    pub dropped_while_holding: usize,
    pub bench_rss_holding_kib: u64,
    pub bench_cpu_secs: f64,
}

/// A share's connections, held open until [`IdlePart::finish`].
struct IdlePart {
    tasks: JoinSet<()>,
    stop: CancellationToken,
    dropped: Arc<AtomicUsize>,
    cpu_before: f64,
}

impl IdlePart {
    /// Opens the share's connections at its rate and waits until each connected or failed.
    async fn ramp(share: IdleShare, counters: Arc<Counters>) -> anyhow::Result<(IdlePart, IdleRamped)> {
        check_open_files(share.count)?;
        let cpu_before = procfs::own_cpu_secs()?;
        let nodes = Arc::new(
            Nodes::resolve(&share.urls, share.allow_remote, 1)
                .await?
                .with_sources(&share.sources),
        );
        let sessions = Arc::new(share.sessions);
        if sessions.is_empty() {
            bail!("an idle share needs at least one session");
        }
        let rooms: Arc<[String]> = Arc::from(vec![share.room]);
        let stop = CancellationToken::new();
        let dropped = Arc::new(AtomicUsize::new(0));
        let (results_tx, mut results_rx) = mpsc::channel::<Connected>(share.count.max(1));
        let mut tasks = JoinSet::new();
        let connect_timeout = Duration::from_secs_f64(share.connect_timeout);
        let ramp_started = Instant::now();
        let interval = crate::interval_of(share.rate);
        let mut results = Vec::with_capacity(share.count);
        for local in 0..share.count {
            tokio::time::sleep_until(ramp_started + interval.mul_f64(local as f64)).await;
            while let Ok(result) = results_rx.try_recv() {
                results.push(result);
            }
            let index = share.first_index + local;
            let task = HeldConnection {
                nodes: nodes.clone(),
                node: index % nodes.len(),
                index,
                sessions: sessions.clone(),
                rooms: rooms.clone(),
                read_buffer: share.read_buffer,
                timeout: connect_timeout,
                results: results_tx.clone(),
                stop: stop.clone(),
                dropped: dropped.clone(),
                counters: counters.clone(),
            };
            tasks.spawn(task.run());
        }
        drop(results_tx);
        // Every task reports once, within its connect timeout.
        let collect_deadline = Instant::now() + connect_timeout + Duration::from_secs(5);
        while results.len() < share.count {
            match tokio::time::timeout_at(collect_deadline, results_rx.recv()).await {
                Ok(Some(result)) => results.push(result),
                Ok(None) | Err(_) => break,
            }
        }
        let mut ramped = IdleRamped {
            established: 0,
            established_per_node: vec![0; nodes.len()],
            failed: share.count,
            latency: Histogram::new(),
            failure_samples: Vec::new(),
        };
        for (node, result) in &results {
            match result {
                Ok(elapsed) => {
                    ramped.established += 1;
                    ramped.established_per_node[*node] += 1;
                    ramped
                        .latency
                        .record(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
                }
                Err(message) => add_sample(&mut ramped.failure_samples, message),
            }
        }
        ramped.failed = share.count - ramped.established;
        let part = IdlePart {
            tasks,
            stop,
            dropped,
            cpu_before,
        };
        Ok((part, ramped))
    }

    /// Reads this process's RSS, then closes every connection (bounded).
    async fn finish(mut self) -> anyhow::Result<IdleFinished> {
        let bench_rss_holding_kib = procfs::own_rss_kib()?;
        self.stop.cancel();
        // Whatever has not closed within the bound is aborted.
        let _ = crate::join_all_by(
            &mut self.tasks,
            tokio::time::Instant::now() + Duration::from_secs(15),
        )
        .await;
        Ok(IdleFinished {
            dropped_while_holding: self.dropped.load(Ordering::Relaxed),
            bench_rss_holding_kib,
            bench_cpu_secs: procfs::own_cpu_secs()? - self.cpu_before,
        })
    }
}

fn add_sample(samples: &mut Vec<String>, message: &str) {
    if samples.len() < MAX_FAILURE_SAMPLES && !samples.iter().any(|s| s == message) {
        samples.push(message.to_string());
    }
}

/// A worker's side of the idle scenario: ramp, report, hold until `stop`, report.
pub(crate) async fn serve_worker(
    share: IdleShare,
    io: &mut WorkerIo,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let (part, ramped) = IdlePart::ramp(share, counters).await?;
    io.send_phase("ramped", &ramped)?;
    match io.command().await? {
        ParentCommand::Stop => {}
        other => bail!("expected stop, got {other:?}"),
    }
    let finished = part.finish().await?;
    io.send_phase("finished", &finished)
}

/// The share in this process, or the worker processes that hold the shares.
enum Running {
    Here(IdlePart),
    Workers(WorkerPool),
}

/// Runs the `idle` scenario to completion (it stops by itself).
pub async fn run_idle(cfg: IdleConfig) -> anyhow::Result<IdleReport> {
    if cfg.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if !cfg.rate.is_finite() || cfg.rate <= 0.0 {
        bail!("--rate must be a positive number of connections per second");
    }
    if !cfg.hold.is_finite() || cfg.hold < 0.0 || cfg.hold > 86_400.0 {
        bail!("--hold must be between 0 and 86400 seconds");
    }
    if !cfg.connect_timeout.is_finite() || cfg.connect_timeout <= 0.0 || cfg.connect_timeout > 600.0 {
        bail!("--connect-timeout must be positive (at most 600 seconds)");
    }
    let processes = cfg.workers.processes_for(cfg.connections)?;
    if processes == 1 {
        check_open_files(cfg.connections)?;
    }
    let nodes = Nodes::resolve(&cfg.url, cfg.allow_remote, cfg.sources).await?;
    let run_id = crate::run_id();
    let room = cfg.room.clone().unwrap_or_else(|| format!("bench-idle-{run_id}"));
    let session_count = cfg.sessions.clamp(1, cfg.connections);
    let sessions = create_sessions(
        &nodes,
        &format!("bench-idle-{run_id}"),
        session_count,
        cfg.api_key.as_deref(),
    )
    .await?;
    let rss_before = servers_rss_kib(&cfg.server_pid)?;
    let cpu_before = procfs::own_cpu_secs()?;
    let progress = Progress::start("idle: ramping", "messages");

    let shares: Vec<IdleShare> = split_range(0, cfg.connections, processes)
        .into_iter()
        .zip(split_sources(nodes.sources(), processes))
        .map(|((first_index, count), sources)| IdleShare {
            urls: cfg.url.clone(),
            allow_remote: cfg.allow_remote,
            sources,
            room: room.clone(),
            sessions: sessions.clone(),
            first_index,
            count,
            rate: cfg.rate * count as f64 / cfg.connections as f64,
            read_buffer: cfg.read_buffer,
            connect_timeout: cfg.connect_timeout,
        })
        .collect();
    let ramp_allowance = Duration::from_secs_f64(cfg.connections as f64 / cfg.rate + cfg.connect_timeout)
        + Duration::from_secs(5)
        + STARTUP_ALLOWANCE;
    let ramp_started = Instant::now();
    let (mut running, ramped) = if processes == 1 {
        let share = shares
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no share to run"))?;
        let (part, ramped) = IdlePart::ramp(share, progress.counters()).await?;
        (Running::Here(part), vec![ramped])
    } else {
        let tasks = shares.into_iter().map(WorkerTask::Idle).collect();
        // Ramp, hold and wind-down, with room to spare: a worker never outlives a stuck parent.
        let deadline = ramp_allowance + Duration::from_secs_f64(cfg.hold) + Duration::from_secs(60);
        let mut pool = WorkerPool::spawn(tasks, &cfg.workers, deadline, &progress).await?;
        progress::detail(&format!(
            "idle: {} connections over {} worker processes (pids {:?})",
            cfg.connections,
            pool.len(),
            pool.pids()
        ));
        let ramped = pool.collect::<IdleRamped>("ramped", ramp_allowance).await?;
        (Running::Workers(pool), ramped)
    };
    let ramp_secs = ramp_started.elapsed().as_secs_f64();

    let mut latency = Histogram::new();
    let mut failure_samples: Vec<String> = Vec::new();
    let mut established = 0;
    let mut established_per_node = vec![0; nodes.len()];
    for share in &ramped {
        established += share.established;
        for (total, count) in established_per_node.iter_mut().zip(&share.established_per_node) {
            *total += count;
        }
        latency.merge(&share.latency);
        for sample in &share.failure_samples {
            add_sample(&mut failure_samples, sample);
        }
    }
    progress::note(&format!(
        "idle: {established} of {} connections established in {ramp_secs:.1} s; holding",
        cfg.connections
    ));
    progress.phase("idle: holding");

    let hold_started = Instant::now();
    let hold_until = hold_started + Duration::from_secs_f64(cfg.hold);
    let mut rss_max = None;
    let mut rss_last = None;
    loop {
        if let Running::Workers(pool) = &mut running {
            pool.check()?;
        }
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

    let (finished, worker_processes) = match running {
        Running::Here(part) => (part.finish().await?, 0),
        Running::Workers(mut pool) => {
            pool.send_all(&ParentCommand::Stop).await?;
            let shares = pool
                .collect::<IdleFinished>("finished", Duration::from_secs(30))
                .await?;
            let workers = pool.len();
            pool.shutdown().await;
            let mut sum = IdleFinished {
                dropped_while_holding: 0,
                bench_rss_holding_kib: procfs::own_rss_kib()?,
                bench_cpu_secs: 0.0,
            };
            for share in shares {
                sum.dropped_while_holding += share.dropped_while_holding;
                sum.bench_rss_holding_kib += share.bench_rss_holding_kib;
                sum.bench_cpu_secs += share.bench_cpu_secs;
            }
            (sum, workers)
        }
    };
    // In one process the share's CPU is this process's; workers add theirs.
    let bench_cpu_secs = procfs::own_cpu_secs()? - cpu_before
        + if worker_processes > 0 {
            finished.bench_cpu_secs
        } else {
            0.0
        };
    drop(progress);

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
        dropped_while_holding: finished.dropped_while_holding,
        failure_samples,
        sources: nodes.sources().len().max(1),
        sessions: session_count,
        room,
        worker_processes,
        ramp_secs,
        hold_secs,
        connect_join_latency: latency.percentiles(),
        server_rss_before_kib: rss_before,
        server_rss_holding_kib: rss_last,
        server_rss_holding_max_kib: rss_max,
        server_rss_per_connection_bytes: per_connection,
        bench_rss_holding_kib: finished.bench_rss_holding_kib,
        bench_cpu_secs,
        connect_join_histogram: latency,
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
    counters: Arc<Counters>,
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
        let (mut ws, _open) = match joined {
            Ok(joined) => {
                let open = self.counters.established();
                let _ = self.results.send((self.node, Ok(joined.latency))).await;
                (joined.ws, open)
            }
            Err(e) => {
                self.counters.failed();
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
