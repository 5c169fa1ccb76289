//! `switchyard-bench`: the load generator of Switchyard. Two scenarios, each bounded in time and
//! count so that it stops by itself:
//!
//! - [`run_idle`]: ramp up N authenticated connections that each join one room, hold them, and
//!   report how many were established, connect + join latency, and the server's resident memory per
//!   connection (given its pid);
//! - [`run_fanout`]: S subscribers over K rooms and P publishers; report deliveries per second,
//!   latency percentiles from a timestamp in the payload, lost and out-of-order deliveries per room,
//!   and the CPU time spent per delivery.
//!
//! The load generator must not be the bottleneck: it speaks WebSocket through its own minimal
//! client ([`ws`]) with small read buffers, finds the few fields it needs by scanning bytes
//! ([`scan`]) instead of decoding JSON, runs one task per connection on a multi-threaded runtime,
//! and spreads connections over several loopback source addresses. It refuses non-loopback targets
//! unless explicitly allowed.
//!
//! Both scenarios can load several nodes that share a backend (e.g. one Redis) at once: given
//! several `--url`s, they spread connections and session creation over the nodes round-robin
//! ([`target::Nodes`]) and report per node as well.

pub mod fanout;
pub mod histogram;
pub mod idle;
pub mod procfs;
pub mod scan;
pub mod session;
pub mod target;
pub mod ws;

pub use fanout::{FanoutConfig, FanoutReport, NodeReport, PublishRate, RoomReport, ServerUsage, run_fanout};
pub use histogram::Percentiles;
pub use idle::{IdleConfig, IdleReport, run_idle};

/// A short id that keeps the rooms and users of one run apart from any other run's.
pub(crate) fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", std::process::id(), nanos & 0xFF_FFFF_FFFF)
}
