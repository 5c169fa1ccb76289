//! The circuit breaker around Redis calls (the seed's circuit breaker): after `failures`
//! consecutive infrastructure failures it opens and calls fail at once with `UNAVAILABLE` for
//! `cooldown`; then one probe call is let through (half-open), whose outcome closes or re-opens it.
//! Every call also has a deadline, so nothing waits on Redis longer than the configured timeout.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use switchyard_core::backend::BackendError;
use switchyard_core::metrics::{BreakerState, Metrics};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

pub struct Breaker {
    state: Mutex<State>,
    failures: u32,
    cooldown: Duration,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

/// Whether an error says Redis itself is unreachable or unwell (as opposed to a bad command).
pub fn is_infrastructure(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::BusyLoading
                    | redis::ServerErrorKind::TryAgain
                    | redis::ServerErrorKind::ClusterDown
                    | redis::ServerErrorKind::MasterDown
                    | redis::ServerErrorKind::ReadOnly
            )
        )
}

impl Breaker {
    pub fn new(failures: u32, cooldown: Duration, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            failures: failures.max(1),
            cooldown,
            timeout,
            metrics,
        }
    }

    /// Whether calls currently fail fast.
    pub fn is_open(&self) -> bool {
        matches!(*self.state.lock(), State::Open { until } if Instant::now() < until)
    }

    fn admit(&self) -> Result<(), BackendError> {
        let mut state = self.state.lock();
        match *state {
            State::Closed { .. } => Ok(()),
            State::Open { until } if Instant::now() < until => Err(BackendError::Unavailable(
                "redis circuit open: failing fast after repeated errors".into(),
            )),
            State::Open { .. } => {
                *state = State::HalfOpen { probing: true };
                drop(state);
                self.metrics.breaker_changed(BreakerState::HalfOpen);
                Ok(())
            }
            State::HalfOpen { probing: true } => Err(BackendError::Unavailable(
                "redis circuit half-open: a probe is in flight".into(),
            )),
            State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                Ok(())
            }
        }
    }

    fn record(&self, ok: bool) {
        let mut state = self.state.lock();
        let next = match (*state, ok) {
            (State::Closed { .. }, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 < self.failures => State::Closed {
                failures: failures + 1,
            },
            (_, false) => State::Open {
                until: Instant::now() + self.cooldown,
            },
            (_, true) => State::Closed { failures: 0 },
        };
        let changed = match (*state, next) {
            (State::Closed { .. }, State::Open { .. }) | (State::HalfOpen { .. }, State::Open { .. }) => {
                Some(BreakerState::Open)
            }
            (State::HalfOpen { .. } | State::Open { .. }, State::Closed { .. }) => Some(BreakerState::Closed),
            _ => None,
        };
        *state = next;
        drop(state);
        if let Some(to) = changed {
            match to {
                BreakerState::Open => tracing::warn!("redis circuit opened: failing fast"),
                _ => tracing::info!("redis circuit closed: redis answers again"),
            }
            self.metrics.breaker_changed(to);
        }
    }

    /// Runs one Redis call under the breaker and the deadline.
    pub async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BackendError> {
        self.admit()?;
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => {
                self.record(true);
                Ok(value)
            }
            Ok(Err(e)) => {
                if is_infrastructure(&e) {
                    self.record(false);
                    self.metrics.backend_errors.inc();
                    Err(BackendError::Unavailable(format!("redis {what}: {e}")))
                } else {
                    self.record(true);
                    Err(BackendError::Corrupt(format!("redis {what}: {e}")))
                }
            }
            Err(_) => {
                self.record(false);
                self.metrics.backend_errors.inc();
                Err(BackendError::Unavailable(format!(
                    "redis {what}: no answer within {:?}",
                    self.timeout
                )))
            }
        }
    }
}
