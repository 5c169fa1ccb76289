//! The `rtt` scenario: K authenticated connections each send `{"type":"ping","ref":N}` and wait for
//! the `pong` with that `ref`, again and again for a fixed duration — back to back (one ping in
//! flight per connection), or at a fixed rate per connection. The report has the round-trip
//! latency percentiles and the round trips per second.
//!
//! At a fixed rate, a ping that is sent late because the previous pong came after it was due
//! counts its latency from the moment it was due, not from when it went out: a stall counts in
//! full instead of hiding behind the pings it delayed (no coordinated omission). A ping sent on
//! time, and every ping back to back, counts from the send.
//!
//! Round trips are recorded into a few shared histograms (a connection picks one by its index and
//! holds its lock for one increment), so thousands of connections do not each carry a histogram.
//! More connections than one process may open go to worker processes ([`crate::worker`]): each
//! connects its share, the parent says `go`, each pings for the duration and reports counts and
//! histogram buckets.

use std::io::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::histogram::{Histogram, Percentiles};
use crate::plot::LatencyPlot;
use crate::procfs::{self, now_ns};
use crate::progress::{self, Counters, Progress};
use crate::scan::{self, FrameKind};
use crate::session::{ConnectSpec, connect_and_join, create_sessions};
use crate::target::{Nodes, check_open_files};
use crate::worker::{
    ParentCommand, STARTUP_ALLOWANCE, WorkerIo, WorkerOptions, WorkerPool, WorkerTask, split_range,
    split_sources,
};
use crate::ws::{Incoming, WsConnection};

/// Histograms round trips are recorded into, per process.
const HISTOGRAM_SHARDS: usize = 8;
/// Most distinct failure messages kept for the report.
const MAX_FAILURE_SAMPLES: usize = 5;

/// Settings of the `rtt` scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct RttConfig {
    /// Base URL of the server, e.g. http://127.0.0.1:8000. Repeat it for several nodes that share a
    /// backend: connections are spread over them round-robin
    #[arg(long, required = true)]
    pub url: Vec<String>,
    /// Connections, each with one ping in flight at a time
    #[arg(long, default_value_t = 10)]
    pub connections: usize,
    /// Seconds of pinging
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Pings per second per connection (default: the next ping as soon as the pong arrived)
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds a pong may take; a connection whose pong is later stops and counts a timeout
    #[arg(long, default_value_t = 10.0)]
    pub pong_timeout: f64,
    /// New connections per second while connecting
    #[arg(long, default_value_t = 1000.0)]
    pub connect_rate: f64,
    /// Pid of the server process, to report its CPU time per round trip; repeat it for several nodes
    #[arg(long)]
    pub server_pid: Vec<u32>,
    /// Source addresses 127.0.0.1 ..= 127.0.0.K the connections are spread over
    #[arg(long, default_value_t = 1)]
    pub sources: u8,
    /// Sessions (users) the connections are spread over
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// Read buffer per connection, bytes
    #[arg(long, default_value_t = 1024)]
    pub read_buffer: usize,
    /// Seconds allowed for one connection's connect and welcome
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

impl RttConfig {
    /// The defaults of the command line, for one node at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self::nodes([url.into()])
    }

    /// The defaults of the command line, for nodes at `urls` that share a backend.
    pub fn nodes(urls: impl IntoIterator<Item = String>) -> Self {
        RttConfig {
            url: urls.into_iter().collect(),
            connections: 10,
            duration: 10.0,
            rate: None,
            pong_timeout: 10.0,
            connect_rate: 1000.0,
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

/// What the `rtt` scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct RttReport {
    pub scenario: &'static str,
    pub connections: usize,
    pub connected: usize,
    pub failed: usize,
    /// Pings per second per connection; `None`: back to back.
    pub rate: Option<f64>,
    pub duration_secs: f64,
    /// Pings sent during the duration whose pong came back.
    pub round_trips: u64,
    pub round_trips_per_sec: f64,
    /// `error` frames received in reply to a ping.
    pub errors: u64,
    /// Pongs that did not come within the pong timeout (each ends its connection).
    pub timeouts: u64,
    /// Pongs with a ref that was not the one awaited.
    pub unexpected_pongs: u64,
    /// Connections that the server closed (or that broke) while pinging.
    pub dropped: usize,
    /// From the send to the pong; at a fixed rate, a ping sent late (its connection was still
    /// waiting for the previous pong) counts from when it was due.
    pub rtt: Percentiles,
    /// From the TCP connect to the `welcome`.
    pub connect_latency: Percentiles,
    /// Worker processes that held the connections (0: this process held them).
    pub worker_processes: usize,
    /// CPU of the load generator's processes while pinging.
    pub bench_cpu_secs: f64,
    pub bench_cpu_us_per_round_trip: f64,
    /// Summed over every `--server-pid`, while pinging.
    pub server_cpu_secs: Option<f64>,
    pub server_cpu_us_per_round_trip: Option<f64>,
    pub failure_samples: Vec<String>,
    /// The round trips themselves, for `--plot`.
    #[serde(skip)]
    pub rtt_histogram: Histogram,
}

impl std::fmt::Display for RttReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pace = match self.rate {
            Some(rate) => format!("{rate}/s per connection"),
            None => "back to back".to_string(),
        };
        writeln!(
            f,
            "rtt: {} connections ({} connected, {} failed), {pace}, {:.1} s",
            self.connections, self.connected, self.failed, self.duration_secs
        )?;
        if self.worker_processes > 0 {
            writeln!(f, "  spread over {} worker processes", self.worker_processes)?;
        }
        writeln!(
            f,
            "  round trips {} → {:.0}/s; errors {}, timeouts {}, unexpected pongs {}, dropped {}",
            self.round_trips,
            self.round_trips_per_sec,
            self.errors,
            self.timeouts,
            self.unexpected_pongs,
            self.dropped
        )?;
        writeln!(f, "  round trip: {}", self.rtt)?;
        writeln!(f, "  connect: {}", self.connect_latency)?;
        write!(
            f,
            "  load generator CPU {:.2} s = {:.2} µs per round trip",
            self.bench_cpu_secs, self.bench_cpu_us_per_round_trip
        )?;
        if let (Some(cpu), Some(per)) = (self.server_cpu_secs, self.server_cpu_us_per_round_trip) {
            write!(f, "; server CPU {cpu:.2} s = {per:.2} µs per round trip")?;
        }
        writeln!(f)?;
        for sample in &self.failure_samples {
            writeln!(f, "  failure: {sample}")?;
        }
        Ok(())
    }
}

impl LatencyPlot for RttReport {
    fn plot_title(&self) -> String {
        let pace = match self.rate {
            Some(rate) => format!("{rate}/s each"),
            None => "back to back".to_string(),
        };
        format!(
            "rtt: ping → pong round-trip latency, {} connections {pace}, {:.0} round trips/s",
            self.connected, self.round_trips_per_sec
        )
    }

    fn plot_series(&self) -> Vec<(String, &Histogram)> {
        vec![("round trip".to_string(), &self.rtt_histogram)]
    }
}

/// A share of the rtt connections: all of them in one process, or one worker's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RttShare {
    pub urls: Vec<String>,
    pub allow_remote: bool,
    pub sources: Vec<IpAddr>,
    pub sessions: Vec<String>,
    pub first_index: usize,
    pub count: usize,
    /// New connections per second of this share.
    pub connect_rate: f64,
    pub rate: Option<f64>,
    pub duration: f64,
    pub pong_timeout: f64,
    pub read_buffer: usize,
    pub connect_timeout: f64,
}

/// A share's connections: how many connected.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RttConnected {
    pub connected: usize,
    pub failed: usize,
    pub latency: Histogram,
    pub failure_samples: Vec<String>,
}

/// A share's round trips.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RttFinished {
    pub round_trips: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub unexpected_pongs: u64,
    pub dropped: usize,
    pub rtt: Histogram,
    pub failure_samples: Vec<String>,
    pub bench_cpu_secs: f64,
}

/// When pinging starts and stops.
#[derive(Debug, Clone, Copy)]
struct Go {
    start: Instant,
    start_ns: u64,
    stop_at: Instant,
}

/// What one connection counted.
#[derive(Debug, Default)]
struct PingerTally {
    round_trips: u64,
    errors: u64,
    timeouts: u64,
    unexpected_pongs: u64,
    /// Why the connection ended before the duration was over, if it did.
    ended_early: Option<String>,
}

/// A share's connections, connected and waiting for `go`.
struct RttPart {
    tasks: JoinSet<PingerTally>,
    go: watch::Sender<Option<Go>>,
    histograms: Arc<[Mutex<Histogram>]>,
    duration: Duration,
    pong_timeout: Duration,
}

fn add_sample(samples: &mut Vec<String>, message: &str) {
    if samples.len() < MAX_FAILURE_SAMPLES && !samples.iter().any(|s| s == message) {
        samples.push(message.to_string());
    }
}

impl RttPart {
    /// Connects the share's connections at its connect rate and waits until each connected or failed.
    async fn connect(share: RttShare, counters: Arc<Counters>) -> anyhow::Result<(RttPart, RttConnected)> {
        check_open_files(share.count)?;
        let nodes = Arc::new(
            Nodes::resolve(&share.urls, share.allow_remote, 1)
                .await?
                .with_sources(&share.sources),
        );
        if share.sessions.is_empty() {
            bail!("an rtt share needs at least one session");
        }
        let sessions = Arc::new(share.sessions);
        let histograms: Arc<[Mutex<Histogram>]> = (0..HISTOGRAM_SHARDS)
            .map(|_| Mutex::new(Histogram::new()))
            .collect();
        let (go, go_rx) = watch::channel(None);
        let (ready_tx, mut ready_rx) = mpsc::channel::<Result<Duration, String>>(share.count.max(1));
        let connect_timeout = Duration::from_secs_f64(share.connect_timeout);
        let pong_timeout = Duration::from_secs_f64(share.pong_timeout);
        let interval = crate::interval_of(share.connect_rate);
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for local in 0..share.count {
            tokio::time::sleep_until(started + interval.mul_f64(local as f64)).await;
            let index = share.first_index + local;
            let pinger = Pinger {
                nodes: nodes.clone(),
                index,
                sessions: sessions.clone(),
                read_buffer: share.read_buffer,
                connect_timeout,
                pong_timeout,
                rate: share.rate,
                histograms: histograms.clone(),
                counters: counters.clone(),
                ready: Some(ready_tx.clone()),
                go: go_rx.clone(),
            };
            tasks.spawn(pinger.run());
        }
        drop(ready_tx);
        let mut connected = RttConnected {
            connected: 0,
            failed: 0,
            latency: Histogram::new(),
            failure_samples: Vec::new(),
        };
        let deadline = Instant::now() + connect_timeout + Duration::from_secs(5);
        let mut answered = 0;
        while answered < share.count {
            match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
                Ok(Some(Ok(latency))) => {
                    answered += 1;
                    connected.connected += 1;
                    connected
                        .latency
                        .record(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
                }
                Ok(Some(Err(message))) => {
                    answered += 1;
                    add_sample(&mut connected.failure_samples, &message);
                }
                Ok(None) | Err(_) => break,
            }
        }
        connected.failed = share.count - connected.connected;
        let part = RttPart {
            tasks,
            go,
            histograms,
            duration: Duration::from_secs_f64(share.duration),
            pong_timeout,
        };
        Ok((part, connected))
    }

    /// Pings for the duration, then waits (bounded) for every connection to finish.
    async fn run(mut self) -> anyhow::Result<RttFinished> {
        let cpu_before = procfs::own_cpu_secs()?;
        let start = Instant::now();
        let go = Go {
            start,
            start_ns: now_ns(),
            stop_at: start + self.duration,
        };
        let _ = self.go.send(Some(go));
        let mut finished = RttFinished::default();
        let bound = go.stop_at + self.pong_timeout + Duration::from_secs(5);
        let Some(tallies) = crate::join_all_by(&mut self.tasks, bound).await else {
            bail!(
                "rtt connections did not finish within {:?} after the duration",
                bound - go.stop_at
            );
        };
        for tally in tallies {
            let tally = tally.context("an rtt connection task failed")?;
            finished.round_trips += tally.round_trips;
            finished.errors += tally.errors;
            finished.timeouts += tally.timeouts;
            finished.unexpected_pongs += tally.unexpected_pongs;
            if let Some(ended) = tally.ended_early {
                finished.dropped += 1;
                add_sample(&mut finished.failure_samples, &ended);
            }
        }
        for shard in self.histograms.iter() {
            let shard = shard
                .lock()
                .map_err(|_| anyhow!("a round-trip histogram was poisoned"))?;
            finished.rtt.merge(&shard);
        }
        finished.bench_cpu_secs = procfs::own_cpu_secs()? - cpu_before;
        Ok(finished)
    }
}

/// One connection of the scenario.
struct Pinger {
    nodes: Arc<Nodes>,
    index: usize,
    sessions: Arc<Vec<String>>,
    read_buffer: usize,
    connect_timeout: Duration,
    pong_timeout: Duration,
    rate: Option<f64>,
    histograms: Arc<[Mutex<Histogram>]>,
    counters: Arc<Counters>,
    /// Told once whether the connection is ready (taken then, so the channel closes).
    ready: Option<mpsc::Sender<Result<Duration, String>>>,
    go: watch::Receiver<Option<Go>>,
}

impl Pinger {
    async fn run(mut self) -> PingerTally {
        let mut tally = PingerTally::default();
        let Some(ready) = self.ready.take() else {
            return tally;
        };
        let spec = ConnectSpec {
            target: self.nodes.node(self.index % self.nodes.len()),
            index: self.index,
            session: &self.sessions[self.index % self.sessions.len()],
            rooms: &[],
            read_buffer: self.read_buffer,
            timeout: self.connect_timeout,
        };
        let mut ws = match connect_and_join(spec).await {
            Ok(joined) => {
                let _ = ready.send(Ok(joined.latency)).await;
                joined.ws
            }
            Err(e) => {
                self.counters.failed();
                let _ = ready.send(Err(format!("{e:#}"))).await;
                return tally;
            }
        };
        let _open = self.counters.established();
        drop(ready);
        let go = loop {
            if let Some(go) = *self.go.borrow_and_update() {
                break go;
            }
            if self.go.changed().await.is_err() {
                // The scenario ended before pinging started.
                return tally;
            }
        };
        match self.ping(&mut ws, go, &mut tally).await {
            Ok(()) => ws.close(Duration::from_secs(1)).await,
            Err(e) => tally.ended_early = Some(format!("{e:#}")),
        }
        tally
    }

    async fn ping(&self, ws: &mut WsConnection, go: Go, tally: &mut PingerTally) -> anyhow::Result<()> {
        let interval = self.rate.map(crate::interval_of);
        // Connections at a fixed rate start at different points of their interval.
        let phase = (self.index as f64 * 0.618_033_988_75).fract();
        let mut due = match interval {
            Some(interval) => go.start + interval.mul_f64(phase),
            None => go.start,
        };
        let histogram = &self.histograms[self.index % self.histograms.len()];
        let mut reference: u64 = 1;
        let mut frame: Vec<u8> = Vec::with_capacity(48);
        loop {
            // Behind schedule (the last pong came after this ping was due): count from when it was
            // due. On time: wait for it, and count from the send, so that the timer's own lateness
            // (up to a millisecond) is not taken for the server's.
            let behind = interval.is_some() && due <= Instant::now();
            if interval.is_some() && !behind {
                tokio::time::sleep_until(due.min(go.stop_at)).await;
            }
            let now = Instant::now();
            if now >= go.stop_at {
                return Ok(());
            }
            let sent_ns = now_ns();
            let counted_from_ns = if behind {
                go.start_ns + u64::try_from(due.duration_since(go.start).as_nanos()).unwrap_or(0)
            } else {
                sent_ns
            };
            frame.clear();
            let _ = write!(frame, r#"{{"type":"ping","ref":{reference}}}"#);
            ws.send_text(&frame).await?;
            let reply = self
                .await_pong(ws, reference, now + self.pong_timeout, tally)
                .await?;
            if let Some(received_ns) = reply {
                let elapsed = received_ns.saturating_sub(counted_from_ns);
                if let Ok(mut histogram) = histogram.lock() {
                    histogram.record(elapsed);
                }
                tally.round_trips += 1;
                self.counters.messages(1);
            }
            reference += 1;
            if let Some(interval) = interval {
                due += interval;
            }
        }
    }

    /// Reads until the pong with `reference` (its arrival time), or an `error` with that ref
    /// (`None`). Fails on a close, the end of the connection, or when `deadline` passes.
    async fn await_pong(
        &self,
        ws: &mut WsConnection,
        reference: u64,
        deadline: Instant,
        tally: &mut PingerTally,
    ) -> anyhow::Result<Option<u64>> {
        let mut received_ns = now_ns();
        loop {
            while let Some(incoming) = ws.next_frame()? {
                let frame = match incoming {
                    Incoming::Message(frame) => frame,
                    Incoming::Closed { code } => bail!("closed by the server with code {code:?}"),
                };
                match scan::frame_kind(frame) {
                    FrameKind::Pong if scan::reference(frame) == Some(reference) => {
                        return Ok(Some(received_ns));
                    }
                    FrameKind::Pong => tally.unexpected_pongs += 1,
                    FrameKind::Error => {
                        tally.errors += 1;
                        if scan::reference(frame) == Some(reference) {
                            return Ok(None);
                        }
                    }
                    _ => {}
                }
            }
            ws.flush().await?;
            tokio::select! {
                read = ws.fill() => {
                    if read.context("reading from the server failed")? == 0 {
                        bail!("the server ended the connection");
                    }
                    received_ns = now_ns();
                }
                _ = tokio::time::sleep_until(deadline) => {
                    tally.timeouts += 1;
                    bail!("no pong for ref {reference} within the pong timeout");
                }
            }
        }
    }
}

/// A worker's side of the rtt scenario: connect, report, ping on `go`, report.
pub(crate) async fn serve_worker(
    share: RttShare,
    io: &mut WorkerIo,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let (part, connected) = RttPart::connect(share, counters).await?;
    io.send_phase("connected", &connected)?;
    match io.command().await? {
        ParentCommand::Go => {}
        other => bail!("expected go, got {other:?}"),
    }
    let finished = part.run().await?;
    io.send_phase("finished", &finished)
}

fn validate(cfg: &RttConfig) -> anyhow::Result<()> {
    if cfg.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if !cfg.duration.is_finite() || cfg.duration <= 0.0 || cfg.duration > 3600.0 {
        bail!("--duration must be between 0 and 3600 seconds");
    }
    if let Some(rate) = cfg.rate
        && (!rate.is_finite() || rate <= 0.0 || rate > 100_000.0)
    {
        bail!("--rate must be a positive number of pings per second per connection (at most 100000)");
    }
    if !cfg.pong_timeout.is_finite() || cfg.pong_timeout <= 0.0 || cfg.pong_timeout > 600.0 {
        bail!("--pong-timeout must be positive (at most 600 seconds)");
    }
    if !cfg.connect_rate.is_finite() || cfg.connect_rate <= 0.0 {
        bail!("--connect-rate must be positive");
    }
    if !cfg.connect_timeout.is_finite() || cfg.connect_timeout <= 0.0 || cfg.connect_timeout > 600.0 {
        bail!("--connect-timeout must be positive (at most 600 seconds)");
    }
    Ok(())
}

/// The share in this process, or the worker processes that hold the shares.
enum Running {
    Here(RttPart),
    Workers(WorkerPool),
}

/// Runs the `rtt` scenario to completion (it stops by itself).
pub async fn run_rtt(cfg: RttConfig) -> anyhow::Result<RttReport> {
    validate(&cfg)?;
    let processes = cfg.workers.processes_for(cfg.connections)?;
    if processes == 1 {
        check_open_files(cfg.connections)?;
    }
    let nodes = Nodes::resolve(&cfg.url, cfg.allow_remote, cfg.sources).await?;
    let run_id = crate::run_id();
    let session_count = cfg.sessions.clamp(1, cfg.connections);
    let sessions = create_sessions(
        &nodes,
        &format!("bench-rtt-{run_id}"),
        session_count,
        cfg.api_key.as_deref(),
    )
    .await?;
    let progress = Progress::start("rtt: connecting", "round trips");
    let shares: Vec<RttShare> = split_range(0, cfg.connections, processes)
        .into_iter()
        .zip(split_sources(nodes.sources(), processes))
        .map(|((first_index, count), sources)| RttShare {
            urls: cfg.url.clone(),
            allow_remote: cfg.allow_remote,
            sources,
            sessions: sessions.clone(),
            first_index,
            count,
            connect_rate: cfg.connect_rate * count as f64 / cfg.connections as f64,
            rate: cfg.rate,
            duration: cfg.duration,
            pong_timeout: cfg.pong_timeout,
            read_buffer: cfg.read_buffer,
            connect_timeout: cfg.connect_timeout,
        })
        .collect();
    let connect_allowance =
        Duration::from_secs_f64(cfg.connections as f64 / cfg.connect_rate + cfg.connect_timeout)
            + STARTUP_ALLOWANCE;
    let run_allowance = Duration::from_secs_f64(cfg.duration + cfg.pong_timeout) + Duration::from_secs(15);
    let (running, connected) = if processes == 1 {
        let share = shares
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no share to run"))?;
        let (part, connected) = RttPart::connect(share, progress.counters()).await?;
        (Running::Here(part), vec![connected])
    } else {
        let tasks = shares.into_iter().map(WorkerTask::Rtt).collect();
        let deadline = connect_allowance + run_allowance + Duration::from_secs(60);
        let mut pool = WorkerPool::spawn(tasks, &cfg.workers, deadline, &progress).await?;
        progress::detail(&format!(
            "rtt: {} connections over {} worker processes (pids {:?})",
            cfg.connections,
            pool.len(),
            pool.pids()
        ));
        let connected = pool
            .collect::<RttConnected>("connected", connect_allowance)
            .await?;
        (Running::Workers(pool), connected)
    };
    let mut connect_latency = Histogram::new();
    let mut failure_samples = Vec::new();
    let mut connected_count = 0;
    for share in &connected {
        connected_count += share.connected;
        connect_latency.merge(&share.latency);
        for sample in &share.failure_samples {
            add_sample(&mut failure_samples, sample);
        }
    }
    if connected_count == 0 {
        bail!(
            "no connection could be established: {}",
            failure_samples.join("; ")
        );
    }
    progress::note(&format!(
        "rtt: {connected_count} of {} connections ready; pinging for {} s",
        cfg.connections, cfg.duration
    ));
    progress.phase("rtt: pinging");

    let cpu_before = procfs::own_cpu_secs()?;
    let server_cpu_before = servers_cpu_secs(&cfg.server_pid)?;
    let (finished, worker_processes) = match running {
        Running::Here(part) => (vec![part.run().await?], 0),
        Running::Workers(mut pool) => {
            pool.send_all(&ParentCommand::Go).await?;
            let finished = pool.collect::<RttFinished>("finished", run_allowance).await?;
            let workers = pool.len();
            pool.shutdown().await;
            (finished, workers)
        }
    };
    let server_cpu_secs = if cfg.server_pid.is_empty() {
        None
    } else {
        let after = servers_cpu_secs(&cfg.server_pid)?;
        Some(after.iter().sum::<f64>() - server_cpu_before.iter().sum::<f64>())
    };
    let parent_cpu = procfs::own_cpu_secs()? - cpu_before;
    drop(progress);

    let mut total = RttFinished::default();
    for share in finished {
        total.round_trips += share.round_trips;
        total.errors += share.errors;
        total.timeouts += share.timeouts;
        total.unexpected_pongs += share.unexpected_pongs;
        total.dropped += share.dropped;
        total.rtt.merge(&share.rtt);
        total.bench_cpu_secs += share.bench_cpu_secs;
        for sample in &share.failure_samples {
            add_sample(&mut failure_samples, sample);
        }
    }
    // In one process the share's CPU is this process's own; workers add theirs to the parent's.
    let bench_cpu_secs = if worker_processes > 0 {
        parent_cpu + total.bench_cpu_secs
    } else {
        total.bench_cpu_secs
    };
    let per_round_trip_us = |cpu: f64| {
        if total.round_trips > 0 {
            cpu * 1e6 / total.round_trips as f64
        } else {
            0.0
        }
    };
    Ok(RttReport {
        scenario: "rtt",
        connections: cfg.connections,
        connected: connected_count,
        failed: cfg.connections - connected_count,
        rate: cfg.rate,
        duration_secs: cfg.duration,
        round_trips: total.round_trips,
        round_trips_per_sec: total.round_trips as f64 / cfg.duration,
        errors: total.errors,
        timeouts: total.timeouts,
        unexpected_pongs: total.unexpected_pongs,
        dropped: total.dropped,
        rtt: total.rtt.percentiles(),
        connect_latency: connect_latency.percentiles(),
        worker_processes,
        bench_cpu_secs,
        bench_cpu_us_per_round_trip: per_round_trip_us(bench_cpu_secs),
        server_cpu_secs,
        server_cpu_us_per_round_trip: server_cpu_secs.map(per_round_trip_us),
        failure_samples,
        rtt_histogram: total.rtt,
    })
}

/// CPU seconds of each process in `pids`, in order.
pub(crate) fn servers_cpu_secs(pids: &[u32]) -> anyhow::Result<Vec<f64>> {
    pids.iter()
        .map(|&pid| procfs::cpu_secs(pid).with_context(|| format!("reading the CPU time of server {pid}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_unbounded_or_empty_runs() {
        let mut cfg = RttConfig::new("http://127.0.0.1:9");
        assert!(validate(&cfg).is_ok());
        cfg.duration = 0.0;
        assert!(validate(&cfg).is_err());
        cfg.duration = 1.0;
        cfg.rate = Some(0.0);
        assert!(validate(&cfg).is_err());
        cfg.rate = Some(10.0);
        cfg.connections = 0;
        assert!(validate(&cfg).is_err());
    }
}
