//! Progress while a scenario runs: one line on stderr, rewritten in place (`\r`, erase line) four
//! times a second, with the connections established, open, failed and closed and the messages per
//! second. Hand-written rather than a progress-bar crate: one line needs no dependency.
//!
//! It is drawn only when the command line enabled it ([`enable_on_terminal`]: stderr is a terminal
//! and the report is not `--json`); otherwise nothing but the few phase lines ([`note`]) is
//! printed, as before there was a progress line, and the counters are still kept (worker processes send
//! theirs to the parent) but nothing is printed. Connection tasks update [`Counters`] with relaxed
//! atomic increments — once per connection event, and once per batch of received messages.

use std::io::{IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// How often the line is redrawn.
const REDRAW_EVERY: Duration = Duration::from_millis(250);
/// Messages per second are averaged over this many redraws (one second).
const RATE_WINDOW: usize = 4;

/// Draw progress lines from now on if stderr is a terminal. The command line calls this unless the
/// report goes out as JSON.
pub fn enable_on_terminal() {
    if std::io::stderr().is_terminal() {
        ENABLED.store(true, Ordering::Relaxed);
    }
}

/// Whether progress lines are drawn in this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Prints a line about the scenario's phase on stderr (above the progress line, if one is drawn).
/// Scripts may time-stamp these lines, so they are printed with `--json` too.
pub fn note(message: &str) {
    let mut stderr = std::io::stderr().lock();
    if enabled() {
        let _ = write!(stderr, "\r\x1b[2K");
    }
    let _ = writeln!(stderr, "{message}");
}

/// Like [`note`], but only where the progress line is drawn: details for a person watching.
pub fn detail(message: &str) {
    if enabled() {
        note(message);
    }
}

/// Counters that connection tasks update.
#[derive(Debug, Default)]
pub struct Counters {
    established: AtomicU64,
    failed: AtomicU64,
    open: AtomicU64,
    closed: AtomicU64,
    messages: AtomicU64,
}

/// The counters at one instant (what a worker process sends its parent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub established: u64,
    pub failed: u64,
    pub open: u64,
    pub closed: u64,
    pub messages: u64,
}

impl Snapshot {
    fn add(&mut self, other: &Snapshot) {
        self.established += other.established;
        self.failed += other.failed;
        self.open += other.open;
        self.closed += other.closed;
        self.messages += other.messages;
    }
}

impl Counters {
    /// A connection was established; it counts as open until the returned guard is dropped.
    pub fn established(self: &Arc<Self>) -> OpenConnection {
        self.established.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection {
            counters: self.clone(),
        }
    }

    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection was closed by the load generator on purpose (churn).
    pub fn closed(&self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }

    /// `count` messages were received (deliveries, round trips).
    pub fn messages(&self, count: u64) {
        if count > 0 {
            self.messages.fetch_add(count, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            established: self.established.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            open: self.open.load(Ordering::Relaxed),
            closed: self.closed.load(Ordering::Relaxed),
            messages: self.messages.load(Ordering::Relaxed),
        }
    }
}

/// Keeps one connection counted as open; dropping it (however the task ends) uncounts it.
#[derive(Debug)]
pub struct OpenConnection {
    counters: Arc<Counters>,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The progress of one scenario run: the counters of this process's connections, the latest
/// counters of each worker process, and the task that draws the line.
#[derive(Debug)]
pub struct Progress {
    local: Arc<Counters>,
    remote: Arc<Mutex<Vec<Snapshot>>>,
    phase: Arc<Mutex<String>>,
    stop: CancellationToken,
}

impl Progress {
    /// Starts drawing (if enabled) with `phase` as the line's label; `messages` names what the
    /// messages per second count (e.g. "deliveries").
    pub fn start(phase: &str, messages: &'static str) -> Progress {
        let progress = Progress {
            local: Arc::new(Counters::default()),
            remote: Arc::new(Mutex::new(Vec::new())),
            phase: Arc::new(Mutex::new(phase.to_string())),
            stop: CancellationToken::new(),
        };
        if enabled() {
            let drawer = Drawer {
                local: progress.local.clone(),
                remote: progress.remote.clone(),
                phase: progress.phase.clone(),
                messages,
            };
            tokio::spawn(drawer.run(progress.stop.clone()));
        }
        progress
    }

    /// The counters for this process's connections.
    pub fn counters(&self) -> Arc<Counters> {
        self.local.clone()
    }

    /// Changes the line's label.
    pub fn phase(&self, phase: &str) {
        if let Ok(mut current) = self.phase.lock() {
            phase.clone_into(&mut current);
        }
    }

    /// Where worker processes' counters go: slot `worker` holds that worker's latest snapshot.
    pub(crate) fn remote_slots(&self, workers: usize) -> Arc<Mutex<Vec<Snapshot>>> {
        if let Ok(mut slots) = self.remote.lock() {
            slots.resize(workers, Snapshot::default());
        }
        self.remote.clone()
    }

    /// The counters of this process and every worker, added up.
    pub fn total(&self) -> Snapshot {
        total(&self.local, &self.remote)
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.cancel();
        if enabled() {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
        }
    }
}

fn total(local: &Counters, remote: &Mutex<Vec<Snapshot>>) -> Snapshot {
    let mut sum = local.snapshot();
    if let Ok(slots) = remote.lock() {
        for slot in slots.iter() {
            sum.add(slot);
        }
    }
    sum
}

struct Drawer {
    local: Arc<Counters>,
    remote: Arc<Mutex<Vec<Snapshot>>>,
    phase: Arc<Mutex<String>>,
    messages: &'static str,
}

impl Drawer {
    async fn run(self, stop: CancellationToken) {
        let started = Instant::now();
        let mut ticker = tokio::time::interval(REDRAW_EVERY);
        let mut recent: std::collections::VecDeque<(Instant, u64)> =
            std::collections::VecDeque::with_capacity(RATE_WINDOW + 1);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let now = Instant::now();
            let sum = total(&self.local, &self.remote);
            recent.push_back((now, sum.messages));
            if recent.len() > RATE_WINDOW + 1 {
                recent.pop_front();
            }
            let rate = match (recent.front(), recent.back()) {
                (Some((t0, m0)), Some((t1, m1))) if t1 > t0 => {
                    (m1 - m0) as f64 / t1.duration_since(*t0).as_secs_f64()
                }
                _ => 0.0,
            };
            let phase = self.phase.lock().map(|p| p.clone()).unwrap_or_default();
            let line = render_line(&phase, now.duration_since(started), &sum, rate, self.messages);
            let mut stderr = std::io::stderr().lock();
            let _ = write!(stderr, "\r\x1b[2K{line}");
            let _ = stderr.flush();
        }
    }
}

/// The progress line (without the control characters).
pub fn render_line(phase: &str, elapsed: Duration, sum: &Snapshot, rate: f64, messages: &str) -> String {
    let mut line = format!(
        "{phase} {:>5.1}s | established {} | open {}",
        elapsed.as_secs_f64(),
        sum.established,
        sum.open
    );
    if sum.failed > 0 {
        line.push_str(&format!(" | failed {}", sum.failed));
    }
    if sum.closed > 0 {
        line.push_str(&format!(" | closed {}", sum.closed));
    }
    if sum.messages > 0 {
        line.push_str(&format!(" | {rate:.0} {messages}/s ({} total)", sum.messages));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_open_connections_until_dropped() {
        let counters = Arc::new(Counters::default());
        let first = counters.established();
        let second = counters.established();
        counters.failed();
        counters.messages(5);
        drop(first);
        let snapshot = counters.snapshot();
        assert_eq!(
            (
                snapshot.established,
                snapshot.open,
                snapshot.failed,
                snapshot.messages
            ),
            (2, 1, 1, 5)
        );
        drop(second);
        assert_eq!(counters.snapshot().open, 0);
        let line = render_line("idle", Duration::from_secs(2), &snapshot, 10.0, "deliveries");
        assert!(
            line.contains("established 2") && line.contains("failed 1"),
            "{line}"
        );
        assert!(line.contains("10 deliveries/s"), "{line}");
    }
}
