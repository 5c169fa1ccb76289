//! `switchyard-bench`: the load generator of Switchyard. Four scenarios, each bounded in time and
//! count so that it stops by itself:
//!
//! - [`run_idle`]: ramp up N authenticated connections that each join one room, hold them, and
//!   report how many were established, connect + join latency, and the server's resident memory per
//!   connection (given its pid);
//! - [`run_fanout`]: S subscribers over K rooms and P publishers; report deliveries per second,
//!   latency percentiles from a timestamp in the payload, lost and out-of-order deliveries per room,
//!   and the CPU time spent per delivery; with `--broadcasts`, also whether every server broadcast
//!   reached every subscriber, and its latency;
//! - [`run_rtt`]: K connections send `ping` and wait for the `pong` with the same `ref`, back to
//!   back or at a fixed rate; report round-trip latency percentiles and round trips per second;
//! - [`run_churn`]: keep about K connections open while opening and closing R per second; report
//!   opened / closed / failed counts, connect + join latency, and the server's memory at the start
//!   and the end (to spot leaks).
//!
//! The load generator must not be the bottleneck: it speaks WebSocket through its own minimal
//! client ([`ws`]) with small read buffers, finds the few fields it needs by scanning bytes
//! ([`scan`]) instead of decoding JSON, runs one task per connection on a multi-threaded runtime,
//! and spreads connections over several loopback source addresses. When a scenario needs more
//! connections than one process may open (20,000 files per process here), it spreads them over
//! worker processes that it starts, stops and merges by itself ([`worker`]). It refuses
//! non-loopback targets unless explicitly allowed.
//!
//! Every scenario can load several nodes that share a backend (e.g. one Redis) at once: given
//! several `--url`s, they spread connections and session creation over the nodes round-robin
//! ([`target::Nodes`]). On a terminal a progress line shows what is going on ([`progress`]);
//! `--plot` draws the latency distribution as SVG ([`plot`]).

pub mod churn;
pub mod fanout;
pub mod histogram;
pub mod idle;
pub mod plot;
pub mod procfs;
pub mod progress;
pub mod rtt;
pub mod scan;
pub mod session;
pub mod target;
pub mod worker;
pub mod ws;

pub use churn::{ChurnConfig, ChurnReport, Lifetimes, run_churn};
pub use fanout::{FanoutConfig, FanoutReport, NodeReport, PublishRate, RoomReport, ServerUsage, run_fanout};
pub use histogram::{Histogram, Percentiles};
pub use idle::{IdleConfig, IdleReport, run_idle};
pub use plot::LatencyPlot;
pub use rtt::{RttConfig, RttReport, run_rtt};
pub use worker::{WorkerCommand, WorkerOptions};

/// The time between two events at `per_second` events per second; zero (no pacing) for a rate
/// that has no finite interval (0 for an empty share, infinity).
pub(crate) fn interval_of(per_second: f64) -> std::time::Duration {
    std::time::Duration::try_from_secs_f64(1.0 / per_second).unwrap_or(std::time::Duration::ZERO)
}

/// Every task's outcome, in the order they finish; `None` (the rest aborted) if they are not all
/// done by `deadline`.
pub(crate) async fn join_all_by<T: 'static>(
    tasks: &mut tokio::task::JoinSet<T>,
    deadline: tokio::time::Instant,
) -> Option<Vec<Result<T, tokio::task::JoinError>>> {
    let joined = tokio::time::timeout_at(deadline, async {
        let mut outcomes = Vec::new();
        while let Some(outcome) = tasks.join_next().await {
            outcomes.push(outcome);
        }
        outcomes
    })
    .await;
    if joined.is_err() {
        tasks.abort_all();
    }
    joined.ok()
}

/// A short id that keeps the rooms and users of one run apart from any other run's.
pub(crate) fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", std::process::id(), nanos & 0xFF_FFFF_FFFF)
}
