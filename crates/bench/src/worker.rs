//! Worker processes: one process may hold at most ~19,000 connections here (20,000 open files per
//! process, less a spare), so a scenario with more spawns copies of the load generator — by
//! default the same executable (`std::env::current_exe()`) with the hidden `worker` subcommand —
//! and gives each a contiguous share of the connection indices and a share of the source
//! addresses. The parent then holds no test connections of its own (except fan-out publishers).
//!
//! The conversation runs over the worker's stdin and stdout, one JSON document per line:
//!
//! - parent → worker: first a [`WorkerSpec`] (the scenario and the share), then
//!   [`ParentCommand`]s (`go`, `stop`, the fan-out's final offsets and broadcast count) at the
//!   scenario's barriers;
//! - worker → parent: lines that carry [`WORKER_LINE_PREFIX`] (anything else on stdout, and
//!   anything before the prefix on its line, is ignored): progress counters twice a second, a named phase result at each barrier (counts and
//!   histogram buckets, never percentiles, so the parent can merge them), or a failure.
//!
//! Workers are bounded: each has a deadline after which it exits by itself, and it exits when its
//! stdin closes (the parent is gone). The parent kills every worker it started when it returns,
//! on success or error (`kill_on_drop`, by the child's own pid), after giving a finished worker a
//! few seconds to exit.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::progress::{self, Counters, Progress, Snapshot};
use crate::target;

/// Every protocol line a worker writes on stdout starts with this.
pub const WORKER_LINE_PREFIX: &str = "switchyard-bench-worker ";
/// Most worker processes one run may start.
pub const MAX_WORKERS: usize = 64;
/// How often a worker sends its progress counters.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// How long a worker that sent its last report may take to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// Added to every wait of the parent for its workers: process start, runtime start, session reads.
pub(crate) const STARTUP_ALLOWANCE: Duration = Duration::from_secs(15);

/// When and how to spread a scenario over worker processes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WorkerOptions {
    /// Most connections one process opens before the scenario is spread over worker processes
    /// (default: what the open-file limit allows, about 19,000 here). Small values test workers
    #[arg(long, hide = true)]
    pub connections_per_process: Option<usize>,
    /// How to start a worker (default: this executable with the hidden `worker` subcommand).
    #[arg(skip)]
    pub command: Option<WorkerCommand>,
}

/// The command that starts one worker process; it must end up in [`serve_stdio`].
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl WorkerCommand {
    /// This executable with the hidden `worker` subcommand.
    pub fn current_exe() -> anyhow::Result<WorkerCommand> {
        Ok(WorkerCommand {
            program: std::env::current_exe().context("cannot find this executable to start workers")?,
            args: vec!["worker".to_string()],
            env: Vec::new(),
        })
    }
}

impl WorkerOptions {
    /// How many processes `connections` need: 1 means "run them in this process"; more means that
    /// many worker processes.
    pub fn processes_for(&self, connections: usize) -> anyhow::Result<usize> {
        let per_process = match self.connections_per_process {
            Some(limit) => limit.max(1),
            None => target::connections_per_process()?,
        };
        let processes = connections.div_ceil(per_process).max(1);
        if processes > MAX_WORKERS {
            bail!(
                "{connections} connections would need {processes} worker processes of at most \
                 {per_process} connections each; the limit is {MAX_WORKERS}"
            );
        }
        Ok(processes)
    }
}

/// Splits `count` indices starting at `first` into `parts` contiguous `(first, count)` shares whose
/// sizes differ by at most one.
pub fn split_range(first: usize, count: usize, parts: usize) -> Vec<(usize, usize)> {
    let parts = parts.max(1);
    let mut shares = Vec::with_capacity(parts);
    let mut next = first;
    for part in 0..parts {
        let size = count / parts + usize::from(part < count % parts);
        shares.push((next, size));
        next += size;
    }
    shares
}

/// Gives each of `parts` workers its own source addresses when there are enough (worker `w` gets
/// every address whose position is `w` modulo `parts`), or one address round-robin otherwise.
pub fn split_sources(sources: &[IpAddr], parts: usize) -> Vec<Vec<IpAddr>> {
    let parts = parts.max(1);
    (0..parts)
        .map(|part| {
            if sources.is_empty() {
                Vec::new()
            } else if sources.len() >= parts {
                sources.iter().skip(part).step_by(parts).copied().collect()
            } else {
                vec![sources[part % sources.len()]]
            }
        })
        .collect()
}

/// What a worker is asked to do: the first line on its stdin.
#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub task: WorkerTask,
    /// The worker exits by itself this many seconds after it started.
    pub deadline_secs: f64,
    /// Whether to send progress counters (the parent draws a progress line).
    pub progress: bool,
}

/// A worker's share of a scenario.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "scenario", rename_all = "snake_case")]
pub enum WorkerTask {
    Idle(crate::idle::IdleShare),
    Rtt(crate::rtt::RttShare),
    Churn(crate::churn::ChurnShare),
    FanoutSubscribers(crate::fanout::SubscriberShare),
}

/// What the parent tells its workers at the scenario's barriers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum ParentCommand {
    /// Start measuring (rtt, churn).
    Go,
    /// Close every connection and send the final report (idle, churn).
    Stop,
    /// Fan-out: publishing (and broadcasting) is over; receive up to these offsets (per room) and
    /// `broadcasts` server broadcasts, for at most `drain_secs`.
    Finals {
        top_offsets: Vec<u64>,
        drain_secs: f64,
        #[serde(default)]
        broadcasts: u64,
    },
}

/// One protocol line of a worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum WorkerLine {
    Progress { counters: Snapshot },
    Phase { name: String, body: serde_json::Value },
    Failed { message: String },
}

fn emit(line: &WorkerLine) -> anyhow::Result<()> {
    use std::io::Write as _;
    let json = serde_json::to_string(line).context("encoding a worker line")?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{WORKER_LINE_PREFIX}{json}").context("writing to the parent failed")?;
    stdout.flush().context("writing to the parent failed")
}

/// A worker's side of the conversation.
#[derive(Debug)]
pub struct WorkerIo {
    commands: mpsc::Receiver<String>,
}

impl WorkerIo {
    /// Sends the result of phase `name` to the parent.
    pub fn send_phase<T: Serialize>(&self, name: &str, body: &T) -> anyhow::Result<()> {
        let body = serde_json::to_value(body).with_context(|| format!("encoding phase {name}"))?;
        emit(&WorkerLine::Phase {
            name: name.to_string(),
            body,
        })
    }

    /// The parent's next command.
    pub async fn command(&mut self) -> anyhow::Result<ParentCommand> {
        let line = self
            .commands
            .recv()
            .await
            .ok_or_else(|| anyhow!("the parent closed the worker's stdin"))?;
        serde_json::from_str(&line).with_context(|| format!("unexpected command from the parent: {line}"))
    }
}

/// Runs this process as a worker: reads a [`WorkerSpec`] from stdin, runs the share, reports on
/// stdout. Returns when the share is done, the parent is gone, or the deadline passed.
pub async fn serve_stdio() -> anyhow::Result<()> {
    let (commands_tx, mut commands) = mpsc::channel::<String>(16);
    let parent_gone = CancellationToken::new();
    tokio::spawn(read_stdin(commands_tx, parent_gone.clone()));
    let first = commands.recv().await.ok_or_else(|| {
        anyhow!("no worker spec on stdin (this subcommand is for the load generator itself)")
    })?;
    let spec: WorkerSpec = serde_json::from_str(&first).context("invalid worker spec")?;
    if !spec.deadline_secs.is_finite() || spec.deadline_secs <= 0.0 {
        bail!("invalid worker deadline {}", spec.deadline_secs);
    }
    let deadline = Duration::from_secs_f64(spec.deadline_secs.min(7.0 * 86_400.0));
    // A plain thread: it fires even if the runtime is stuck.
    std::thread::spawn(move || {
        std::thread::sleep(deadline);
        eprintln!(
            "switchyard-bench worker {}: deadline of {deadline:?} passed; exiting",
            std::process::id()
        );
        std::process::exit(3);
    });
    let counters = Arc::new(Counters::default());
    if spec.progress {
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(PROGRESS_EVERY);
            loop {
                ticker.tick().await;
                let line = WorkerLine::Progress {
                    counters: counters.snapshot(),
                };
                if emit(&line).is_err() {
                    return;
                }
            }
        });
    }
    let mut io = WorkerIo { commands };
    let outcome = tokio::select! {
        outcome = run_task(spec.task, &mut io, counters) => outcome,
        _ = parent_gone.cancelled() => Err(anyhow!("the parent process went away (stdin closed)")),
    };
    if let Err(e) = &outcome {
        let _ = emit(&WorkerLine::Failed {
            message: format!("{e:#}"),
        });
    }
    outcome
}

async fn run_task(task: WorkerTask, io: &mut WorkerIo, counters: Arc<Counters>) -> anyhow::Result<()> {
    match task {
        WorkerTask::Idle(share) => crate::idle::serve_worker(share, io, counters).await,
        WorkerTask::Rtt(share) => crate::rtt::serve_worker(share, io, counters).await,
        WorkerTask::Churn(share) => crate::churn::serve_worker(share, io, counters).await,
        WorkerTask::FanoutSubscribers(share) => crate::fanout::serve_worker(share, io, counters).await,
    }
}

/// Forwards stdin lines; cancels `parent_gone` when stdin closes.
async fn read_stdin(commands: mpsc::Sender<String>, parent_gone: CancellationToken) {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if commands.send(line).await.is_err() {
            break;
        }
    }
    parent_gone.cancel();
}

/// What the parent hears from a worker.
enum WorkerEvent {
    Phase { name: String, body: serde_json::Value },
    Failed(String),
    Ended(String),
}

struct WorkerProcess {
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
}

/// The worker processes of one scenario run. Dropping the pool kills every worker still running.
pub struct WorkerPool {
    workers: Vec<WorkerProcess>,
    events: mpsc::UnboundedReceiver<(usize, WorkerEvent)>,
    /// Events that [`WorkerPool::check`] took but that are for [`WorkerPool::collect`].
    pending: std::collections::VecDeque<(usize, WorkerEvent)>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool")
            .field("pids", &self.pids())
            .finish_non_exhaustive()
    }
}

impl WorkerPool {
    /// Starts one worker per task, each bounded by `deadline`, and sends them their specs. Their
    /// progress counters go into `progress`.
    pub async fn spawn(
        tasks: Vec<WorkerTask>,
        options: &WorkerOptions,
        deadline: Duration,
        progress: &Progress,
    ) -> anyhow::Result<WorkerPool> {
        let command = match &options.command {
            Some(command) => command.clone(),
            None => WorkerCommand::current_exe()?,
        };
        let slots = progress.remote_slots(tasks.len());
        let (events_tx, events) = mpsc::unbounded_channel();
        let mut pool = WorkerPool {
            workers: Vec::with_capacity(tasks.len()),
            events,
            pending: std::collections::VecDeque::new(),
        };
        for (index, task) in tasks.into_iter().enumerate() {
            let mut child = Command::new(&command.program)
                .args(&command.args)
                .envs(command.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start worker process {}", command.program.display()))?;
            let pid = child.id().unwrap_or(0);
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| anyhow!("worker {pid} has no stdout pipe"))?;
            let mut stdin = child
                .stdin
                .take()
                .ok_or_else(|| anyhow!("worker {pid} has no stdin pipe"))?;
            let spec = WorkerSpec {
                task,
                deadline_secs: deadline.as_secs_f64(),
                progress: progress::enabled(),
            };
            let mut line = serde_json::to_string(&spec).context("encoding a worker spec")?;
            line.push('\n');
            pool.workers.push(WorkerProcess {
                child,
                pid,
                stdin: None,
            });
            stdin
                .write_all(line.as_bytes())
                .await
                .with_context(|| format!("sending worker {pid} its share"))?;
            pool.workers[index].stdin = Some(stdin);
            tokio::spawn(read_worker(index, stdout, events_tx.clone(), slots.clone()));
        }
        Ok(pool)
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The workers' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.pid).collect()
    }

    /// Waits (at most `within`) until every worker sent phase `name`, and returns their results in
    /// worker order. A worker that fails, ends or sends another phase fails the run.
    pub async fn collect<T: DeserializeOwned>(
        &mut self,
        name: &str,
        within: Duration,
    ) -> anyhow::Result<Vec<T>> {
        let deadline = Instant::now() + within;
        let mut results: Vec<Option<T>> = (0..self.workers.len()).map(|_| None).collect();
        while results.iter().any(Option::is_none) {
            let next = match self.pending.pop_front() {
                Some(event) => Ok(Some(event)),
                None => tokio::time::timeout_at(deadline, self.events.recv()).await,
            };
            let (index, event) = match next {
                Ok(Some(event)) => event,
                Ok(None) => bail!("every worker's output ended before phase {name}"),
                Err(_) => {
                    let missing: Vec<u32> = results
                        .iter()
                        .zip(&self.workers)
                        .filter(|(result, _)| result.is_none())
                        .map(|(_, worker)| worker.pid)
                        .collect();
                    bail!("worker(s) {missing:?} did not reach phase {name} within {within:?}")
                }
            };
            let pid = self.workers[index].pid;
            match event {
                WorkerEvent::Phase { name: got, body } if got == name => {
                    let value = serde_json::from_value(body)
                        .with_context(|| format!("worker {pid} sent an unreadable {name} report"))?;
                    results[index] = Some(value);
                }
                WorkerEvent::Phase { name: got, .. } => {
                    bail!("worker {pid} sent phase {got} while phase {name} was expected")
                }
                WorkerEvent::Failed(message) => bail!("worker {pid} failed: {message}"),
                WorkerEvent::Ended(why) => bail!("worker {pid} ended before phase {name}: {why}"),
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// Fails if a worker failed or ended since the last look (without waiting): for the parent's
    /// own phases, such as holding, during which the workers have nothing to report.
    pub fn check(&mut self) -> anyhow::Result<()> {
        while let Ok((index, event)) = self.events.try_recv() {
            let pid = self.workers[index].pid;
            match event {
                WorkerEvent::Failed(message) => bail!("worker {pid} failed: {message}"),
                WorkerEvent::Ended(why) => bail!("worker {pid} ended early: {why}"),
                phase @ WorkerEvent::Phase { .. } => self.pending.push_back((index, phase)),
            }
        }
        Ok(())
    }

    /// Sends `command` to every worker.
    pub async fn send_all(&mut self, command: &ParentCommand) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(command).context("encoding a command")?;
        line.push('\n');
        for worker in &mut self.workers {
            let stdin = worker
                .stdin
                .as_mut()
                .ok_or_else(|| anyhow!("worker {} has no stdin", worker.pid))?;
            stdin
                .write_all(line.as_bytes())
                .await
                .with_context(|| format!("sending a command to worker {}", worker.pid))?;
        }
        Ok(())
    }

    /// After the last report: closes the workers' stdin, gives each a few seconds to exit, and
    /// kills (by its pid) any that did not.
    pub async fn shutdown(mut self) {
        for worker in &mut self.workers {
            worker.stdin = None;
        }
        let grace_until = Instant::now() + EXIT_GRACE;
        for worker in &mut self.workers {
            if tokio::time::timeout_at(grace_until, worker.child.wait())
                .await
                .is_err()
            {
                let _ = worker.child.start_kill();
                let _ = worker.child.wait().await;
            }
        }
    }
}

/// Reads a worker's stdout: progress into `slots`, everything else to `events`.
async fn read_worker(
    index: usize,
    stdout: tokio::process::ChildStdout,
    events: mpsc::UnboundedSender<(usize, WorkerEvent)>,
    slots: Arc<Mutex<Vec<Snapshot>>>,
) {
    let mut lines = BufReader::new(stdout).lines();
    let why = loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break "its output ended (the process exited)".to_string(),
            Err(e) => break format!("reading its output failed: {e}"),
        };
        // Anything before the prefix is someone else's output that did not end its line.
        let Some(json) = line
            .find(WORKER_LINE_PREFIX)
            .map(|start| &line[start + WORKER_LINE_PREFIX.len()..])
        else {
            continue;
        };
        let event = match serde_json::from_str::<WorkerLine>(json) {
            Ok(WorkerLine::Progress { counters }) => {
                if let Ok(mut slots) = slots.lock()
                    && let Some(slot) = slots.get_mut(index)
                {
                    *slot = counters;
                }
                continue;
            }
            Ok(WorkerLine::Phase { name, body }) => WorkerEvent::Phase { name, body },
            Ok(WorkerLine::Failed { message }) => WorkerEvent::Failed(message),
            Err(e) => WorkerEvent::Failed(format!("unreadable line ({e}): {json}")),
        };
        if events.send((index, event)).is_err() {
            return;
        }
    };
    let _ = events.send((index, WorkerEvent::Ended(why)));
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn shares_cover_every_index_once() {
        assert_eq!(split_range(0, 10, 3), vec![(0, 4), (4, 3), (7, 3)]);
        assert_eq!(split_range(5, 2, 3), vec![(5, 1), (6, 1), (7, 0)]);
        let shares = split_range(0, 25_000, 2);
        assert_eq!(shares, vec![(0, 12_500), (12_500, 12_500)]);
    }

    #[test]
    fn sources_are_split_between_workers() {
        let sources: Vec<IpAddr> = (1..=4).map(|n| IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))).collect();
        let split = split_sources(&sources, 2);
        assert_eq!(split[0], vec![sources[0], sources[2]]);
        assert_eq!(split[1], vec![sources[1], sources[3]]);
        let few = split_sources(&sources[..1], 3);
        assert!(few.iter().all(|s| s == &vec![sources[0]]));
        assert!(split_sources(&[], 2).iter().all(Vec::is_empty));
    }

    #[test]
    fn processes_follow_the_per_process_limit() {
        let options = WorkerOptions {
            connections_per_process: Some(19_000),
            command: None,
        };
        assert_eq!(options.processes_for(19_000).unwrap(), 1);
        assert_eq!(options.processes_for(25_000).unwrap(), 2);
        assert_eq!(options.processes_for(0).unwrap(), 1);
        assert!(options.processes_for(19_000 * 65).is_err());
    }

    #[test]
    fn protocol_lines_round_trip() {
        let command = ParentCommand::Finals {
            top_offsets: vec![3, 4],
            drain_secs: 1.5,
            broadcasts: 2,
        };
        let line = serde_json::to_string(&command).unwrap();
        assert!(line.contains(r#""command":"finals""#), "{line}");
        assert!(matches!(
            serde_json::from_str::<ParentCommand>(&line).unwrap(),
            ParentCommand::Finals { broadcasts: 2, .. }
        ));
        let line = serde_json::to_string(&WorkerLine::Failed { message: "x".into() }).unwrap();
        assert_eq!(line, r#"{"kind":"failed","message":"x"}"#);
    }
}
