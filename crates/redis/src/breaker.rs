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

/// A background call's deadline, in response timeouts.
const BACKGROUND_TIMEOUT_FACTOR: u32 = 4;

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

    /// Runs one call that no client waits on (the clean-up of a closed connection) under the
    /// deadline. It fails fast unless the breaker is closed (it never probes), and neither its
    /// failures nor its successes move the breaker: when thousands of clients leave at once, their
    /// clean-ups time out because Redis is busy, not unwell, and must not cut off the live clients'
    /// requests; a real outage opens the breaker through those requests and the node's own checks.
    pub async fn call_background<T>(
        &self,
        what: &str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BackendError> {
        if !matches!(*self.state.lock(), State::Closed { .. }) {
            return Err(BackendError::Unavailable(
                "redis circuit open: failing fast after repeated errors".into(),
            ));
        }
        // Nobody waits on these, and under a burst they queue: a longer deadline saves work that
        // would otherwise be lost to a timeout and left to expire.
        self.attempt(what, self.timeout * BACKGROUND_TIMEOUT_FACTOR, call)
            .await
            .map_err(|(e, _)| e)
    }

    /// Runs one Redis call under the breaker and the deadline.
    pub async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BackendError> {
        self.admit()?;
        let outcome = self.attempt(what, self.timeout, call).await;
        self.record(!matches!(outcome, Err((_, true))));
        outcome.map_err(|(e, _)| e)
    }

    /// Runs `call` within `deadline`. A failure comes with whether it says Redis is unreachable or
    /// unwell (counted in the metrics), as opposed to a bad command.
    async fn attempt<T>(
        &self,
        what: &str,
        deadline: Duration,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, (BackendError, bool)> {
        match tokio::time::timeout(deadline, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if is_infrastructure(&e) => {
                self.metrics.backend_errors.inc();
                Err((BackendError::Unavailable(format!("redis {what}: {e}")), true))
            }
            Ok(Err(e)) => Err((BackendError::Corrupt(format!("redis {what}: {e}")), false)),
            Err(_) => {
                self.metrics.backend_errors.inc();
                Err((
                    BackendError::Unavailable(format!("redis {what}: no answer within {deadline:?}")),
                    true,
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn refused() -> redis::RedisError {
        redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    }

    #[tokio::test]
    async fn background_failures_do_not_open_the_breaker_but_respect_an_open_one() {
        let breaker = Breaker::new(
            1,
            Duration::from_secs(60),
            Duration::from_secs(5),
            Arc::new(Metrics::new()),
        );
        for _ in 0..5 {
            let failed = breaker
                .call_background("clean up", async { Err::<(), _>(refused()) })
                .await;
            assert!(matches!(failed, Err(BackendError::Unavailable(_))));
        }
        assert!(
            !breaker.is_open(),
            "clean-up failures alone leave the breaker closed"
        );
        assert_eq!(
            breaker
                .call_background("clean up", async { Ok::<_, redis::RedisError>(7) })
                .await
                .unwrap(),
            7
        );

        let failed = breaker.call("publish", async { Err::<(), _>(refused()) }).await;
        assert!(matches!(failed, Err(BackendError::Unavailable(_))));
        assert!(
            breaker.is_open(),
            "a live request's failure opens it (threshold 1)"
        );
        let polled = std::sync::atomic::AtomicBool::new(false);
        let result = breaker
            .call_background("clean up", async {
                polled.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok::<_, redis::RedisError>(())
            })
            .await;
        assert!(matches!(result, Err(BackendError::Unavailable(_))));
        assert!(
            !polled.load(std::sync::atomic::Ordering::Relaxed),
            "an open breaker fails the clean-up fast, without calling Redis"
        );
    }
}
