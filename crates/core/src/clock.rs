//! A coarse shared clock. Hot paths (queue pushes, activity stamps) read one atomic instead of
//! calling into the OS clock; one task advances it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the coarse clock advances.
pub const TICK: Duration = Duration::from_millis(50);

/// Milliseconds since the clock started, updated every [`TICK`].
#[derive(Clone)]
pub struct Clock {
    start: Instant,
    now_ms: Arc<AtomicU64>,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            start: Instant::now(),
            now_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Coarse milliseconds since start (at most one tick behind).
    pub fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    /// Advances the coarse time to the precise time now. Called by [`Clock::run`]; tests may call it.
    pub fn update(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.now_ms.store(ms, Ordering::Relaxed);
    }

    /// Advances the clock until `stop` fires.
    pub async fn run(self, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.update(),
            }
        }
    }
}

/// Wall-clock Unix time in milliseconds (for `ts` fields).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
        .unwrap_or(0)
}
