//! The `churn` scenario: keep about K connections open while opening new ones at a steady rate R
//! and closing as many, for a fixed duration. Every connection authenticates (`?session=`), waits
//! for `welcome`, joins a room and waits for `joined`; it closes itself (a normal close, 1000) when
//! its lifetime is over — fixed, or random between 0 and twice the mean. The mean lifetime defaults
//! to K / R, which keeps about K open (Little's law).
//!
//! Phases: fill (open the first K at `--fill-rate`; their remaining lifetimes are spread over one
//! lifetime, so they do not all close at once), churn (for the duration: open at R/s; close what
//! expires), end (no more opening or closing: what is open stays open while the server's memory is
//! read again after `--settle` seconds, so the start and end readings both have about K
//! connections open and a difference points at state that was not freed), stop (close the rest).
//!
//! The report has opened, closed, failed and dropped counts, connect + join latency percentiles of
//! the churned connections (and of the fill), and with `--server-pid` the servers' RSS at the
//! start and at the end. More connections than one process may hold go to worker processes
//! ([`crate::worker`]), each with its share of K and R.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::histogram::{Histogram, Percentiles};
use crate::plot::LatencyPlot;
use crate::procfs;
use crate::progress::{self, Counters, Progress};
use crate::session::{ConnectSpec, connect_and_join, create_sessions};
use crate::target::{Nodes, check_open_files};
use crate::worker::{
    ParentCommand, STARTUP_ALLOWANCE, WorkerIo, WorkerOptions, WorkerPool, WorkerTask, split_range,
    split_sources,
};
use crate::ws::{Incoming, WsConnection};

/// Most distinct failure messages kept for the report.
const MAX_FAILURE_SAMPLES: usize = 5;
/// Seconds of opening a share must budget file descriptors for (connects in flight, closes that
/// are still being flushed).
const IN_FLIGHT_SECS: f64 = 3.0;

/// How long each connection lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Lifetimes {
    /// Every connection lives exactly the mean lifetime.
    Fixed,
    /// Uniformly random between 0 and twice the mean lifetime.
    Random,
}

/// Settings of the `churn` scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct ChurnConfig {
    /// Base URL of the server, e.g. http://127.0.0.1:8000. Repeat it for several nodes that share a
    /// backend: connections are spread over them round-robin
    #[arg(long, required = true)]
    pub url: Vec<String>,
    /// Connections kept open (about)
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// New connections per second while churning (and about as many closed)
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds of churning
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Mean lifetime of a connection, seconds (default: connections / rate, which keeps about
    /// --connections open)
    #[arg(long)]
    pub lifetime: Option<f64>,
    /// `fixed`: every connection lives the mean lifetime; `random`: between 0 and twice that
    #[arg(long, value_enum, default_value = "fixed")]
    pub lifetimes: Lifetimes,
    /// New connections per second while opening the first --connections
    #[arg(long, default_value_t = 1000.0)]
    pub fill_rate: f64,
    /// Rooms the connections join (connection i joins room i mod rooms)
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Seconds to wait after churning before reading the servers' memory again
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Pid of the server process, to read its VmRSS at the start and the end; repeat it for
    /// several nodes (their VmRSS are added up)
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

impl ChurnConfig {
    /// The defaults of the command line, for one node at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self::nodes([url.into()])
    }

    /// The defaults of the command line, for nodes at `urls` that share a backend.
    pub fn nodes(urls: impl IntoIterator<Item = String>) -> Self {
        ChurnConfig {
            url: urls.into_iter().collect(),
            connections: 100,
            rate: 50.0,
            duration: 10.0,
            lifetime: None,
            lifetimes: Lifetimes::Fixed,
            fill_rate: 1000.0,
            rooms: 1,
            settle: 1.0,
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

    /// The mean lifetime: `--lifetime`, or connections / rate.
    pub fn mean_lifetime(&self) -> f64 {
        self.lifetime.unwrap_or(self.connections as f64 / self.rate)
    }
}

/// What the `churn` scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnReport {
    pub scenario: &'static str,
    /// Connections to keep open (about).
    pub connections: usize,
    /// Openings per second while churning.
    pub rate: f64,
    pub duration_secs: f64,
    pub lifetime_secs: f64,
    pub lifetimes: Lifetimes,
    pub rooms: usize,
    pub sessions: usize,
    pub sources: usize,
    /// Worker processes that held the connections (0: this process held them).
    pub worker_processes: usize,
    /// The first `connections`, opened before churning.
    pub fill_established: u64,
    pub fill_failed: u64,
    /// Connections opened (connected and joined) while churning.
    pub opened: u64,
    /// Connections that could not connect or join while churning.
    pub failed: u64,
    /// Connections closed by the load generator when their lifetime was over.
    pub closed: u64,
    /// Connections that the server closed (or that broke), in any phase.
    pub dropped: u64,
    pub opened_per_sec: f64,
    pub closed_per_sec: f64,
    /// Connections open when churning stopped (and while the end RSS was read).
    pub open_at_end: u64,
    /// From the TCP connect to `joined`, of the connections opened while churning.
    pub connect_join_latency: Percentiles,
    /// The same, of the fill.
    pub fill_latency: Percentiles,
    /// VmRSS after the fill (summed over every `--server-pid`).
    pub server_rss_start_kib: Option<u64>,
    /// VmRSS after churning and `--settle` seconds, with about as many connections open.
    pub server_rss_end_kib: Option<u64>,
    /// End − start, in KiB (negative: the server shrank).
    pub server_rss_growth_kib: Option<i64>,
    /// End − start, per connection opened while churning, in bytes.
    pub server_rss_growth_per_opened_bytes: Option<f64>,
    /// CPU of the load generator's processes over the whole run.
    pub bench_cpu_secs: f64,
    pub failure_samples: Vec<String>,
    /// Connect + join latencies while churning, for `--plot`.
    #[serde(skip)]
    pub connect_join_histogram: Histogram,
    /// Connect + join latencies of the fill, for `--plot`.
    #[serde(skip)]
    pub fill_histogram: Histogram,
}

impl std::fmt::Display for ChurnReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "churn: about {} connections open, {}/s opened and closed for {:.1} s (lifetime {:.2} s, {:?})",
            self.connections, self.rate, self.duration_secs, self.lifetime_secs, self.lifetimes
        )?;
        if self.worker_processes > 0 {
            writeln!(f, "  spread over {} worker processes", self.worker_processes)?;
        }
        writeln!(
            f,
            "  fill: {} established, {} failed; {}",
            self.fill_established, self.fill_failed, self.fill_latency
        )?;
        writeln!(
            f,
            "  churn: opened {} ({:.0}/s), closed {} ({:.0}/s), failed {}, dropped by the server {}, open at the end {}",
            self.opened,
            self.opened_per_sec,
            self.closed,
            self.closed_per_sec,
            self.failed,
            self.dropped,
            self.open_at_end
        )?;
        writeln!(f, "  connect + join: {}", self.connect_join_latency)?;
        if let (Some(start), Some(end), Some(growth)) = (
            self.server_rss_start_kib,
            self.server_rss_end_kib,
            self.server_rss_growth_kib,
        ) {
            write!(
                f,
                "  server RSS: {start} KiB at the start, {end} KiB at the end ({growth:+} KiB"
            )?;
            if let Some(per) = self.server_rss_growth_per_opened_bytes {
                write!(f, ", {per:+.0} bytes per opened connection")?;
            }
            writeln!(f, ")")?;
        }
        writeln!(f, "  load generator CPU {:.2} s", self.bench_cpu_secs)?;
        for sample in &self.failure_samples {
            writeln!(f, "  failure: {sample}")?;
        }
        Ok(())
    }
}

impl LatencyPlot for ChurnReport {
    fn plot_title(&self) -> String {
        format!(
            "churn: connect + join latency, {} opened at {}/s with about {} open",
            self.opened, self.rate, self.connections
        )
    }

    fn plot_series(&self) -> Vec<(String, &Histogram)> {
        vec![
            ("while churning".to_string(), &self.connect_join_histogram),
            ("fill".to_string(), &self.fill_histogram),
        ]
    }
}

/// A share of the churn: all of it in one process, or one worker's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChurnShare {
    pub urls: Vec<String>,
    pub allow_remote: bool,
    pub sources: Vec<IpAddr>,
    pub room_names: Vec<String>,
    pub sessions: Vec<String>,
    /// Which share this is, of how many: new connections take the global indices
    /// `total + n * shares + share`, so every connection of the run has its own index.
    pub share: usize,
    pub shares: usize,
    /// Connections of the whole run (the fill's indices are `0..total`).
    pub total: usize,
    /// This share's fill: indices `first_index..first_index + count`.
    pub first_index: usize,
    pub count: usize,
    /// Openings per second of this share.
    pub rate: f64,
    pub fill_rate: f64,
    pub duration: f64,
    pub lifetime: f64,
    pub lifetimes: Lifetimes,
    pub read_buffer: usize,
    pub connect_timeout: f64,
}

/// A share's fill.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChurnFilled {
    pub established: u64,
    pub failed: u64,
    pub latency: Histogram,
    pub failure_samples: Vec<String>,
}

/// A share's churn, taken when it stopped opening and closing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChurnChurned {
    pub opened: u64,
    pub failed: u64,
    pub closed: u64,
    pub dropped: u64,
    pub open: u64,
    pub latency: Histogram,
    pub failure_samples: Vec<String>,
}

/// A share's end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChurnFinished {
    pub dropped: u64,
    pub bench_cpu_secs: f64,
}

/// When churning started and when it stops.
#[derive(Debug, Clone, Copy)]
struct ChurnWindow {
    start: Instant,
    end: Instant,
}

/// Counts shared by a share's connection tasks.
#[derive(Debug, Default)]
struct Tally {
    opened: AtomicU64,
    failed: AtomicU64,
    closed: AtomicU64,
    dropped: AtomicU64,
    open: AtomicU64,
    /// Connections still connecting.
    connecting: AtomicU64,
    latency: Mutex<Histogram>,
    samples: Mutex<Vec<String>>,
}

impl Tally {
    fn sample(&self, message: String) {
        if let Ok(mut samples) = self.samples.lock() {
            add_sample(&mut samples, &message);
        }
    }
}

fn add_sample(samples: &mut Vec<String>, message: &str) {
    if samples.len() < MAX_FAILURE_SAMPLES && !samples.iter().any(|s| s == message) {
        samples.push(message.to_string());
    }
}

/// Which phase opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opened {
    /// Position `n` of the share's fill: it closes `n + 1` lifetime steps after churning starts.
    Fill(usize),
    Churn,
}

/// What every connection task of a share needs.
struct Shared {
    nodes: Nodes,
    sessions: Vec<String>,
    room_names: Vec<String>,
    read_buffer: usize,
    connect_timeout: Duration,
    lifetime: f64,
    lifetimes: Lifetimes,
    /// The share's fill count and index (for the fill's spread of closing times).
    fill_count: usize,
    share: usize,
    shares: usize,
    window: OnceLock<ChurnWindow>,
    started: CancellationToken,
    stop: CancellationToken,
    tally: Tally,
    counters: Arc<Counters>,
}

/// A share's connections and the task that opens new ones.
struct ChurnPart {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
    rate: f64,
    duration: Duration,
    total: usize,
    cpu_before: f64,
}

impl ChurnPart {
    /// Opens the share's fill at its fill rate and waits until each connected or failed.
    async fn fill(share: ChurnShare, counters: Arc<Counters>) -> anyhow::Result<(ChurnPart, ChurnFilled)> {
        check_open_files(share.count + (share.rate * IN_FLIGHT_SECS).ceil() as usize)?;
        let cpu_before = procfs::own_cpu_secs()?;
        if share.sessions.is_empty() || share.room_names.is_empty() {
            bail!("a churn share needs at least one session and one room");
        }
        let nodes = Nodes::resolve(&share.urls, share.allow_remote, 1)
            .await?
            .with_sources(&share.sources);
        let shared = Arc::new(Shared {
            nodes,
            sessions: share.sessions,
            room_names: share.room_names,
            read_buffer: share.read_buffer,
            connect_timeout: Duration::from_secs_f64(share.connect_timeout),
            lifetime: share.lifetime,
            lifetimes: share.lifetimes,
            fill_count: share.count,
            share: share.share,
            shares: share.shares.max(1),
            window: OnceLock::new(),
            started: CancellationToken::new(),
            stop: CancellationToken::new(),
            tally: Tally::default(),
            counters,
        });
        let (ready_tx, mut ready_rx) = mpsc::channel::<Result<Duration, String>>(share.count.max(1));
        let mut tasks = JoinSet::new();
        let interval = crate::interval_of(share.fill_rate);
        let fill_started = Instant::now();
        for position in 0..share.count {
            tokio::time::sleep_until(fill_started + interval.mul_f64(position as f64)).await;
            let connection = ChurnConnection {
                shared: shared.clone(),
                index: share.first_index + position,
                opened: Opened::Fill(position),
                ready: Some(ready_tx.clone()),
            };
            tasks.spawn(connection.run());
        }
        drop(ready_tx);
        let mut filled = ChurnFilled {
            established: 0,
            failed: 0,
            latency: Histogram::new(),
            failure_samples: Vec::new(),
        };
        let deadline = Instant::now() + shared.connect_timeout + Duration::from_secs(5);
        let mut answered = 0;
        while answered < share.count {
            match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
                Ok(Some(Ok(latency))) => {
                    answered += 1;
                    filled.established += 1;
                    filled
                        .latency
                        .record(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
                }
                Ok(Some(Err(message))) => {
                    answered += 1;
                    add_sample(&mut filled.failure_samples, &message);
                }
                Ok(None) | Err(_) => break,
            }
        }
        filled.failed = share.count as u64 - filled.established;
        let part = ChurnPart {
            shared,
            tasks,
            rate: share.rate,
            duration: Duration::from_secs_f64(share.duration),
            total: share.total,
            cpu_before,
        };
        Ok((part, filled))
    }

    /// Opens new connections at the share's rate for the duration while the old ones expire; then
    /// waits (bounded) for the connects still in flight and reports.
    async fn churn(&mut self) -> anyhow::Result<ChurnChurned> {
        let start = Instant::now();
        let window = ChurnWindow {
            start,
            end: start + self.duration,
        };
        self.shared
            .window
            .set(window)
            .map_err(|_| anyhow!("churning started twice"))?;
        self.shared.started.cancel();
        if self.rate > 0.0 {
            let interval = crate::interval_of(self.rate);
            // Shares interleave their openings rather than opening on the same instants.
            let offset = interval.mul_f64(self.shared.share as f64 / self.shared.shares as f64);
            for n in 0.. {
                let due = start + offset + interval.mul_f64(n as f64);
                if due >= window.end {
                    break;
                }
                tokio::time::sleep_until(due).await;
                // Reap finished tasks as we go, so the set stays as large as the open connections.
                while self.tasks.try_join_next().is_some() {}
                let connection = ChurnConnection {
                    shared: self.shared.clone(),
                    index: self.total + n * self.shared.shares + self.shared.share,
                    opened: Opened::Churn,
                    ready: None,
                };
                self.tasks.spawn(connection.run());
            }
        }
        tokio::time::sleep_until(window.end).await;
        // Connections that were still connecting at the end are counted when they are done.
        let settle_by = Instant::now() + self.shared.connect_timeout + Duration::from_secs(1);
        while self.shared.tally.connecting.load(Ordering::Relaxed) > 0 && Instant::now() < settle_by {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let tally = &self.shared.tally;
        let latency = tally
            .latency
            .lock()
            .map_err(|_| anyhow!("the latency histogram was poisoned"))?
            .clone();
        let failure_samples = tally.samples.lock().map(|s| s.clone()).unwrap_or_default();
        Ok(ChurnChurned {
            opened: tally.opened.load(Ordering::Relaxed),
            failed: tally.failed.load(Ordering::Relaxed),
            closed: tally.closed.load(Ordering::Relaxed),
            dropped: tally.dropped.load(Ordering::Relaxed),
            open: tally.open.load(Ordering::Relaxed),
            latency,
            failure_samples,
        })
    }

    /// Closes every connection still open (bounded) and reports.
    async fn finish(mut self) -> anyhow::Result<ChurnFinished> {
        self.shared.stop.cancel();
        // Whatever has not closed within the bound is aborted.
        let _ = crate::join_all_by(
            &mut self.tasks,
            tokio::time::Instant::now() + Duration::from_secs(15),
        )
        .await;
        Ok(ChurnFinished {
            dropped: self.shared.tally.dropped.load(Ordering::Relaxed),
            bench_cpu_secs: procfs::own_cpu_secs()? - self.cpu_before,
        })
    }
}

/// One connection: connect and join, live, close.
struct ChurnConnection {
    shared: Arc<Shared>,
    index: usize,
    opened: Opened,
    /// The fill reports here once connected (or failed).
    ready: Option<mpsc::Sender<Result<Duration, String>>>,
}

/// Why a connection stopped holding.
enum HoldEnd {
    /// What it waited for happened.
    Woken,
    /// The server closed it, or it broke.
    Ended(String),
}

impl ChurnConnection {
    async fn run(mut self) {
        let ready = self.ready.take();
        let shared = self.shared.clone();
        let tally = &shared.tally;
        tally.connecting.fetch_add(1, Ordering::Relaxed);
        let rooms = [shared.room_names[self.index % shared.room_names.len()].clone()];
        let spec = ConnectSpec {
            target: shared.nodes.node(self.index % shared.nodes.len()),
            index: self.index,
            session: &shared.sessions[self.index % shared.sessions.len()],
            rooms: &rooms,
            read_buffer: shared.read_buffer,
            timeout: shared.connect_timeout,
        };
        let joined = connect_and_join(spec).await;
        let (mut ws, _open) = match joined {
            Ok(joined) => {
                let open = shared.counters.established();
                tally.open.fetch_add(1, Ordering::Relaxed);
                match &ready {
                    Some(ready) => {
                        let _ = ready.send(Ok(joined.latency)).await;
                    }
                    None => {
                        tally.opened.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut latency) = tally.latency.lock() {
                            latency.record(u64::try_from(joined.latency.as_nanos()).unwrap_or(u64::MAX));
                        }
                    }
                }
                tally.connecting.fetch_sub(1, Ordering::Relaxed);
                (joined.ws, open)
            }
            Err(e) => {
                shared.counters.failed();
                let message = format!("{e:#}");
                match &ready {
                    Some(ready) => {
                        let _ = ready.send(Err(message)).await;
                    }
                    None => {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                        tally.sample(message);
                    }
                }
                tally.connecting.fetch_sub(1, Ordering::Relaxed);
                return;
            }
        };
        drop(ready);
        let ended = self.live(&mut ws).await;
        tally.open.fetch_sub(1, Ordering::Relaxed);
        match ended {
            Some(why) => {
                tally.dropped.fetch_add(1, Ordering::Relaxed);
                tally.sample(format!("dropped: {why}"));
            }
            None => ws.close(Duration::from_secs(2)).await,
        }
    }

    /// Holds the connection until its lifetime is over (then counts it closed) or the scenario
    /// stops. Returns why it ended if the server ended it first.
    async fn live(&self, ws: &mut WsConnection) -> Option<String> {
        let shared = &self.shared;
        if !shared.started.is_cancelled() {
            let woken = tokio::select! {
                end = hold(ws, shared.started.cancelled()) => end,
                _ = shared.stop.cancelled() => return None,
            };
            if let HoldEnd::Ended(why) = woken {
                return Some(why);
            }
        }
        let window = *shared.window.get()?;
        let close_at = match self.opened {
            Opened::Fill(position) => window.start + self.remaining_lifetime(position),
            Opened::Churn => Instant::now() + self.lifetime(),
        };
        if close_at < window.end {
            let woken = tokio::select! {
                end = hold(ws, tokio::time::sleep_until(close_at)) => end,
                _ = shared.stop.cancelled() => return None,
            };
            match woken {
                HoldEnd::Woken => {
                    shared.tally.closed.fetch_add(1, Ordering::Relaxed);
                    shared.counters.closed();
                    None
                }
                HoldEnd::Ended(why) => Some(why),
            }
        } else {
            // Past the end of churning: stay open until the scenario stops.
            match hold(ws, shared.stop.cancelled()).await {
                HoldEnd::Woken => None,
                HoldEnd::Ended(why) => Some(why),
            }
        }
    }

    /// A new connection's lifetime.
    fn lifetime(&self) -> Duration {
        let mean = self.shared.lifetime;
        let secs = match self.shared.lifetimes {
            Lifetimes::Fixed => mean,
            Lifetimes::Random => rand::rng().random_range(0.0..=2.0 * mean),
        };
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// What is left of a fill connection's lifetime when churning starts: spread so that the fill
    /// expires at the same steady pace as new connections open. Fixed lifetimes: evenly over one
    /// lifetime (shares interleaved). Random (uniform on 0..2L): drawn from the distribution of a
    /// steady state's remaining lifetimes, density (1 − t / 2L) / L on 0..2L.
    fn remaining_lifetime(&self, position: usize) -> Duration {
        let shared = &self.shared;
        let mean = shared.lifetime;
        let secs = match shared.lifetimes {
            Lifetimes::Fixed => {
                let step = mean / shared.fill_count.max(1) as f64;
                step * (position as f64 + (shared.share as f64 + 1.0) / shared.shares as f64)
            }
            Lifetimes::Random => {
                let u: f64 = rand::rng().random_range(0.0..1.0);
                2.0 * mean * (1.0 - (1.0 - u).sqrt())
            }
        };
        Duration::from_secs_f64(secs.max(0.0))
    }
}

/// Reads (and discards) what the server sends, answering its pings, until `wake` completes.
async fn hold(ws: &mut WsConnection, wake: impl std::future::Future<Output = ()>) -> HoldEnd {
    tokio::pin!(wake);
    loop {
        loop {
            match ws.next_frame() {
                Ok(Some(Incoming::Message(_))) => {}
                Ok(Some(Incoming::Closed { code })) => {
                    return HoldEnd::Ended(format!("closed by the server with code {code:?}"));
                }
                Ok(None) => break,
                Err(e) => return HoldEnd::Ended(format!("{e:#}")),
            }
        }
        if let Err(e) = ws.flush().await {
            return HoldEnd::Ended(format!("{e:#}"));
        }
        tokio::select! {
            _ = &mut wake => return HoldEnd::Woken,
            read = ws.fill() => match read {
                Ok(0) => return HoldEnd::Ended("the server ended the connection".to_string()),
                Ok(_) => {}
                Err(e) => return HoldEnd::Ended(format!("reading failed: {e}")),
            },
        }
    }
}

/// A worker's side of the churn scenario: fill, report, churn on `go`, report, close on `stop`,
/// report.
pub(crate) async fn serve_worker(
    share: ChurnShare,
    io: &mut WorkerIo,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let (mut part, filled) = ChurnPart::fill(share, counters).await?;
    io.send_phase("filled", &filled)?;
    match io.command().await? {
        ParentCommand::Go => {}
        other => bail!("expected go, got {other:?}"),
    }
    let churned = part.churn().await?;
    io.send_phase("churned", &churned)?;
    match io.command().await? {
        ParentCommand::Stop => {}
        other => bail!("expected stop, got {other:?}"),
    }
    let finished = part.finish().await?;
    io.send_phase("finished", &finished)
}

fn validate(cfg: &ChurnConfig) -> anyhow::Result<()> {
    if cfg.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if !cfg.rate.is_finite() || cfg.rate <= 0.0 || cfg.rate > 100_000.0 {
        bail!("--rate must be a positive number of connections per second (at most 100000)");
    }
    if !cfg.duration.is_finite() || cfg.duration <= 0.0 || cfg.duration > 3600.0 {
        bail!("--duration must be between 0 and 3600 seconds");
    }
    let lifetime = cfg.mean_lifetime();
    if !lifetime.is_finite() || lifetime <= 0.0 || lifetime > 86_400.0 {
        bail!("--lifetime must be positive (at most 86400 seconds)");
    }
    if !cfg.fill_rate.is_finite() || cfg.fill_rate <= 0.0 {
        bail!("--fill-rate must be positive");
    }
    if cfg.rooms == 0 {
        bail!("--rooms must be at least 1");
    }
    if !cfg.settle.is_finite() || cfg.settle < 0.0 || cfg.settle > 600.0 {
        bail!("--settle must be between 0 and 600 seconds");
    }
    if !cfg.connect_timeout.is_finite() || cfg.connect_timeout <= 0.0 || cfg.connect_timeout > 600.0 {
        bail!("--connect-timeout must be positive (at most 600 seconds)");
    }
    Ok(())
}

/// The share in this process, or the worker processes that hold the shares.
enum Running {
    Here(ChurnPart),
    Workers(WorkerPool),
}

/// Runs the `churn` scenario to completion (it stops by itself).
pub async fn run_churn(cfg: ChurnConfig) -> anyhow::Result<ChurnReport> {
    validate(&cfg)?;
    let in_flight = (cfg.rate * IN_FLIGHT_SECS).ceil() as usize;
    // Every process holds at least one connection of the fill.
    let processes = cfg
        .workers
        .processes_for(cfg.connections + in_flight)?
        .min(cfg.connections);
    if processes == 1 {
        check_open_files(cfg.connections + in_flight)?;
    }
    let lifetime = cfg.mean_lifetime();
    let nodes = Nodes::resolve(&cfg.url, cfg.allow_remote, cfg.sources).await?;
    let run_id = crate::run_id();
    let room_names: Vec<String> = (0..cfg.rooms)
        .map(|k| format!("bench-churn-{run_id}-{k}"))
        .collect();
    let session_count = cfg.sessions.max(1);
    let sessions = create_sessions(
        &nodes,
        &format!("bench-churn-{run_id}"),
        session_count,
        cfg.api_key.as_deref(),
    )
    .await?;
    let cpu_before = procfs::own_cpu_secs()?;
    let progress = Progress::start("churn: filling", "messages");
    let shares: Vec<ChurnShare> = split_range(0, cfg.connections, processes)
        .into_iter()
        .zip(split_sources(nodes.sources(), processes))
        .enumerate()
        .map(|(share, ((first_index, count), sources))| ChurnShare {
            urls: cfg.url.clone(),
            allow_remote: cfg.allow_remote,
            sources,
            room_names: room_names.clone(),
            sessions: sessions.clone(),
            share,
            shares: processes,
            total: cfg.connections,
            first_index,
            count,
            rate: cfg.rate / processes as f64,
            fill_rate: cfg.fill_rate * count as f64 / cfg.connections as f64,
            duration: cfg.duration,
            lifetime,
            lifetimes: cfg.lifetimes,
            read_buffer: cfg.read_buffer,
            connect_timeout: cfg.connect_timeout,
        })
        .collect();
    let fill_allowance =
        Duration::from_secs_f64(cfg.connections as f64 / cfg.fill_rate + cfg.connect_timeout)
            + STARTUP_ALLOWANCE;
    let churn_allowance =
        Duration::from_secs_f64(cfg.duration + cfg.connect_timeout) + Duration::from_secs(15);
    let (mut running, filled) = if processes == 1 {
        let share = shares
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no share to run"))?;
        let (part, filled) = ChurnPart::fill(share, progress.counters()).await?;
        (Running::Here(part), vec![filled])
    } else {
        let tasks = shares.into_iter().map(WorkerTask::Churn).collect();
        let deadline =
            fill_allowance + churn_allowance + Duration::from_secs_f64(cfg.settle) + Duration::from_secs(60);
        let mut pool = WorkerPool::spawn(tasks, &cfg.workers, deadline, &progress).await?;
        progress::detail(&format!(
            "churn: {} connections over {} worker processes (pids {:?})",
            cfg.connections,
            pool.len(),
            pool.pids()
        ));
        let filled = pool.collect::<ChurnFilled>("filled", fill_allowance).await?;
        (Running::Workers(pool), filled)
    };
    let mut fill_latency = Histogram::new();
    let mut failure_samples = Vec::new();
    let (mut fill_established, mut fill_failed) = (0, 0);
    for share in &filled {
        fill_established += share.established;
        fill_failed += share.failed;
        fill_latency.merge(&share.latency);
        for sample in &share.failure_samples {
            add_sample(&mut failure_samples, sample);
        }
    }
    let rss_start = servers_rss_kib(&cfg.server_pid)?;
    progress::note(&format!(
        "churn: {fill_established} of {} connections open; churning at {}/s for {} s",
        cfg.connections, cfg.rate, cfg.duration
    ));
    progress.phase("churn: churning");

    let churn_started = Instant::now();
    let churned = match &mut running {
        Running::Here(part) => vec![part.churn().await?],
        Running::Workers(pool) => {
            pool.send_all(&ParentCommand::Go).await?;
            pool.collect::<ChurnChurned>("churned", churn_allowance).await?
        }
    };
    let churn_secs = churn_started.elapsed().as_secs_f64().max(cfg.duration);
    progress.phase("churn: settling");
    tokio::time::sleep(Duration::from_secs_f64(cfg.settle)).await;
    let rss_end = servers_rss_kib(&cfg.server_pid)?;
    let (finished, worker_processes) = match running {
        Running::Here(part) => (vec![part.finish().await?], 0),
        Running::Workers(mut pool) => {
            pool.send_all(&ParentCommand::Stop).await?;
            let finished = pool
                .collect::<ChurnFinished>("finished", Duration::from_secs(30))
                .await?;
            let workers = pool.len();
            pool.shutdown().await;
            (finished, workers)
        }
    };
    drop(progress);

    let mut total = ChurnChurned::default();
    for share in churned {
        total.opened += share.opened;
        total.failed += share.failed;
        total.closed += share.closed;
        total.open += share.open;
        total.latency.merge(&share.latency);
        for sample in &share.failure_samples {
            add_sample(&mut failure_samples, sample);
        }
    }
    // Drops are counted until the very end (a connection held past churning can be dropped too).
    let dropped = finished.iter().map(|f| f.dropped).sum();
    let parent_cpu = procfs::own_cpu_secs()? - cpu_before;
    let bench_cpu_secs = if worker_processes > 0 {
        parent_cpu + finished.iter().map(|f| f.bench_cpu_secs).sum::<f64>()
    } else {
        parent_cpu
    };
    let growth = match (rss_start, rss_end) {
        (Some(start), Some(end)) => Some(end as i64 - start as i64),
        _ => None,
    };
    Ok(ChurnReport {
        scenario: "churn",
        connections: cfg.connections,
        rate: cfg.rate,
        duration_secs: cfg.duration,
        lifetime_secs: lifetime,
        lifetimes: cfg.lifetimes,
        rooms: cfg.rooms,
        sessions: session_count,
        sources: nodes.sources().len().max(1),
        worker_processes,
        fill_established,
        fill_failed,
        opened: total.opened,
        failed: total.failed,
        closed: total.closed,
        dropped,
        opened_per_sec: total.opened as f64 / churn_secs,
        closed_per_sec: total.closed as f64 / churn_secs,
        open_at_end: total.open,
        connect_join_latency: total.latency.percentiles(),
        fill_latency: fill_latency.percentiles(),
        server_rss_start_kib: rss_start,
        server_rss_end_kib: rss_end,
        server_rss_growth_kib: growth,
        server_rss_growth_per_opened_bytes: growth
            .filter(|_| total.opened > 0)
            .map(|kib| kib as f64 * 1024.0 / total.opened as f64),
        bench_cpu_secs,
        failure_samples,
        connect_join_histogram: total.latency,
        fill_histogram: fill_latency,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_lifetime_keeps_the_requested_connections_open() {
        let mut cfg = ChurnConfig::new("http://127.0.0.1:9");
        cfg.connections = 200;
        cfg.rate = 50.0;
        assert_eq!(cfg.mean_lifetime(), 4.0);
        cfg.lifetime = Some(1.5);
        assert_eq!(cfg.mean_lifetime(), 1.5);
        assert!(validate(&cfg).is_ok());
        cfg.rate = 0.0;
        assert!(validate(&cfg).is_err());
    }
}
