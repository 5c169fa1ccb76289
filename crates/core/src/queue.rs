//! The bounded outbound queue of one connection (DESIGN.md §3 rule 5).
//!
//! Producers (the hub's fan-out, the connection's own replies, the sweeper's pings) push shared,
//! already-encoded frames; the connection's writer takes everything queued at once and flushes it in
//! one write. The queue holds at most `capacity` frames and `max_bytes` bytes, and no frame may wait
//! longer than `expiry`: a connection that breaks any of these is a slow consumer and is closed with
//! 4008, after which it recovers from history. Nothing is dropped silently.

use std::collections::VecDeque;

use parking_lot::Mutex;
use std::task::{Context, Poll};
use switchyard_proto::CloseCode;

use futures_util::task::AtomicWaker;
use tungstenite::Utf8Bytes;

/// Limits of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most frames waiting (the seed's channel-layer `capacity`, 1500).
    pub capacity: usize,
    /// Most bytes waiting.
    pub max_bytes: usize,
    /// Longest time a frame may wait, in ms (the seed's `expiry`, 10 s).
    pub expiry_ms: u64,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            capacity: 1500,
            max_bytes: 8 * 1024 * 1024,
            expiry_ms: 10_000,
        }
    }
}

/// One frame to send.
#[derive(Debug, Clone)]
pub enum Outbound {
    Text(Utf8Bytes),
    /// A WebSocket-level keepalive ping.
    Ping,
}

impl Outbound {
    fn len(&self) -> usize {
        match self {
            Outbound::Text(t) => t.len(),
            Outbound::Ping => 0,
        }
    }
}

/// Why and how a connection is to be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    pub code: CloseCode,
    pub reason: String,
}

impl CloseReason {
    pub fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        CloseReason {
            code,
            reason: reason.into(),
        }
    }
}

/// The push failed: the queue overflowed (the connection is now closing with 4008) or was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    SlowConsumer,
    Closed,
}

#[derive(Default)]
struct Inner {
    items: VecDeque<(Outbound, u64)>,
    bytes: usize,
    close: Option<CloseReason>,
    /// The close discards what is queued and interrupts a write in progress (overflow, stuck
    /// write, shutdown), rather than following the queued frames (drain, disconnect).
    aborted: bool,
    /// Frames and bytes of a recovery backlog queued on top of the limits; cleared when the writer
    /// takes the queue.
    extra_items: usize,
    extra_bytes: usize,
    /// An empty buffer with capacity, handed back by the writer after a write, so that the next
    /// burst does not allocate (and grow) a new one. The sweeper drops it once the connection went
    /// a whole sweep without a write, so an idle connection holds none.
    spare: VecDeque<(Outbound, u64)>,
    taken_since_sweep: bool,
    /// The last batch taken carried a burst (more than one frame): only its buffer is kept as the
    /// spare. A connection that gets one frame at a time (every idle one, after its welcome and
    /// join replies) gains little from a spare and would hold one between sweeps; its heap then
    /// stays grown after the sweeper frees it (measured: +238 B of RSS per idle connection at 19,000).
    burst_taken: bool,
}

impl Inner {
    fn abort(&mut self, reason: CloseReason) {
        if self.aborted {
            return;
        }
        self.items = VecDeque::new();
        self.spare = VecDeque::new();
        self.bytes = 0;
        self.close = Some(reason);
        self.aborted = true;
    }

    fn has_work(&self) -> bool {
        !self.items.is_empty() || self.close.is_some()
    }
}

/// What the writer takes from the queue.
pub struct Batch {
    pub frames: VecDeque<(Outbound, u64)>,
    /// Set once the connection must close: after `frames` are sent, or at once when `aborted`.
    pub close: Option<CloseReason>,
    pub aborted: bool,
}

/// The queue of one connection. One task (the connection's writer) consumes it; it is woken
/// through an `AtomicWaker` (a few bytes, no future to keep per connection).
pub struct OutboundQueue {
    inner: Mutex<Inner>,
    waker: AtomicWaker,
    limits: QueueLimits,
}

impl OutboundQueue {
    pub fn new(limits: QueueLimits) -> Self {
        OutboundQueue {
            inner: Mutex::new(Inner::default()),
            waker: AtomicWaker::new(),
            limits,
        }
    }

    fn slow_reason(&self, too_old: bool) -> CloseReason {
        let reason = if too_old {
            format!(
                "slow consumer: a queued message waited over {} ms",
                self.limits.expiry_ms
            )
        } else {
            format!(
                "slow consumer: outbound queue full ({} messages / {} bytes)",
                self.limits.capacity, self.limits.max_bytes
            )
        };
        CloseReason::new(CloseCode::SlowConsumer, reason)
    }

    /// Queues one frame, stamped with the coarse time `now_ms`.
    pub fn push(&self, frame: Outbound, now_ms: u64) -> Result<(), PushError> {
        let mut inner = self.inner.lock();
        if inner.close.is_some() {
            return Err(PushError::Closed);
        }
        let len = frame.len();
        let too_old = inner
            .items
            .front()
            .is_some_and(|(_, at)| now_ms.saturating_sub(*at) > self.limits.expiry_ms);
        if inner.items.len() >= self.limits.capacity + inner.extra_items
            || inner.bytes + len > self.limits.max_bytes + inner.extra_bytes
            || too_old
        {
            inner.abort(self.slow_reason(too_old));
            drop(inner);
            self.waker.wake();
            return Err(PushError::SlowConsumer);
        }
        let was_empty = inner.items.is_empty();
        inner.items.push_back((frame, now_ms));
        inner.bytes += len;
        drop(inner);
        if was_empty {
            self.waker.wake();
        }
        Ok(())
    }

    /// Queues a recovery backlog (the `joined` reply and the missed publications) on top of the
    /// limits: it was bounded by the caller, and the live limits apply again once the writer has
    /// taken it.
    pub fn push_backlog(
        &self,
        frames: impl IntoIterator<Item = Outbound>,
        now_ms: u64,
    ) -> Result<(), PushError> {
        let mut inner = self.inner.lock();
        if inner.close.is_some() {
            return Err(PushError::Closed);
        }
        let was_empty = inner.items.is_empty();
        for frame in frames {
            let len = frame.len();
            inner.items.push_back((frame, now_ms));
            inner.bytes += len;
            inner.extra_items += 1;
            inner.extra_bytes += len;
        }
        drop(inner);
        if was_empty {
            self.waker.wake();
        }
        Ok(())
    }

    /// Asks the writer to close the connection after sending what is queued. The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        let mut inner = self.inner.lock();
        if inner.close.is_none() {
            inner.close = Some(reason);
        }
        drop(inner);
        self.waker.wake();
    }

    /// Closes at once: discards what is queued and interrupts a write in progress, even if a
    /// graceful close was requested before (whose frames may be what the client is not reading).
    pub fn abort(&self, reason: CloseReason) {
        self.inner.lock().abort(reason);
        self.waker.wake();
    }

    /// Aborts as a slow consumer (4008).
    pub fn abort_slow(&self, reason: impl Into<String>) {
        self.abort(CloseReason::new(CloseCode::SlowConsumer, reason));
    }

    /// Whether a close was requested.
    pub fn is_closing(&self) -> bool {
        self.inner.lock().close.is_some()
    }

    /// Aborts with 4008 when the oldest queued frame is past the expiry. Called by the sweeper, so
    /// that a writer stuck on a dead socket is found even when nothing new is published. Also
    /// releases the spare buffer of a connection that has not written since the last sweep.
    pub fn check_expiry(&self, now_ms: u64) -> bool {
        let mut inner = self.inner.lock();
        if !std::mem::take(&mut inner.taken_since_sweep) && inner.spare.capacity() > 0 {
            inner.spare = VecDeque::new();
        }
        let expired = inner.close.is_none()
            && inner
                .items
                .front()
                .is_some_and(|(_, at)| now_ms.saturating_sub(*at) > self.limits.expiry_ms);
        if expired {
            inner.abort(self.slow_reason(true));
            drop(inner);
            self.waker.wake();
        }
        expired
    }

    /// Ready when there is something to write or a close was requested.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.inner.lock().has_work() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.inner.lock().has_work() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Ready (with the reason) once the queue was aborted; the writer polls this while a write is
    /// blocked, so a slow consumer is cut off at once.
    pub fn poll_aborted(&self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        let aborted = |inner: &Inner| inner.aborted.then(|| inner.close.clone()).flatten();
        if let Some(reason) = aborted(&self.inner.lock()) {
            return Poll::Ready(reason);
        }
        self.waker.register(cx.waker());
        match aborted(&self.inner.lock()) {
            Some(reason) => Poll::Ready(reason),
            None => Poll::Pending,
        }
    }

    /// Waits until there is something to write or a close was requested.
    pub async fn ready(&self) {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await
    }

    /// Waits until the queue is aborted.
    pub async fn aborted(&self) -> CloseReason {
        std::future::poll_fn(|cx| self.poll_aborted(cx)).await
    }

    /// Takes everything queued (and the close request, if any).
    pub fn take(&self) -> Batch {
        let mut inner = self.inner.lock();
        inner.bytes = 0;
        inner.extra_items = 0;
        inner.extra_bytes = 0;
        inner.taken_since_sweep = true;
        inner.burst_taken = inner.items.len() > 1;
        let spare = std::mem::take(&mut inner.spare);
        Batch {
            frames: std::mem::replace(&mut inner.items, spare),
            close: inner.close.clone(),
            aborted: inner.aborted,
        }
    }

    /// Hands a written batch's buffer back for the next burst (kept if the batch was a burst and
    /// the buffer is not large).
    pub fn recycle(&self, mut frames: VecDeque<(Outbound, u64)>) {
        /// Larger buffers (a recovery backlog, a burst after a stall) are freed instead.
        const MAX_SPARE_FRAMES: usize = 64;
        frames.clear();
        if frames.capacity() == 0 || frames.capacity() > MAX_SPARE_FRAMES {
            return;
        }
        let mut inner = self.inner.lock();
        if inner.burst_taken && inner.spare.capacity() == 0 && !inner.aborted {
            inner.spare = frames;
        }
    }

    /// Frames waiting now.
    pub fn len(&self) -> usize {
        self.inner.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Outbound {
        Outbound::Text(Utf8Bytes::from(s.to_string()))
    }

    fn spare_capacity(q: &OutboundQueue) -> usize {
        q.inner.lock().spare.capacity()
    }

    fn burst(q: &OutboundQueue, frames: usize) -> VecDeque<(Outbound, u64)> {
        for _ in 0..frames {
            q.push(text("x"), 0).unwrap();
        }
        q.take().frames
    }

    #[test]
    fn a_bursts_buffer_is_reused_until_a_sweep_finds_the_connection_idle() {
        let q = OutboundQueue::new(QueueLimits::default());
        let first = burst(&q, 20);
        let capacity = first.capacity();
        q.recycle(first);
        assert_eq!(spare_capacity(&q), capacity);
        let second = burst(&q, 20);
        assert_eq!(
            second.capacity(),
            capacity,
            "the next burst went into the spare buffer"
        );
        q.recycle(second);
        assert!(!q.check_expiry(0));
        assert_eq!(spare_capacity(&q), capacity, "written since the last sweep: kept");
        assert!(!q.check_expiry(0));
        assert_eq!(
            spare_capacity(&q),
            0,
            "a sweep without a write in between frees it"
        );
    }

    #[test]
    fn single_frames_large_bursts_and_aborted_queues_keep_no_spare() {
        let q = OutboundQueue::new(QueueLimits::default());
        q.recycle(burst(&q, 1));
        assert_eq!(spare_capacity(&q), 0);
        q.recycle(burst(&q, 100));
        assert_eq!(spare_capacity(&q), 0);
        q.recycle(burst(&q, 5));
        assert!(spare_capacity(&q) > 0);
        let being_written = burst(&q, 5);
        q.abort_slow("test");
        q.recycle(being_written);
        assert_eq!(spare_capacity(&q), 0, "a closing queue keeps nothing");
    }

    #[test]
    fn overflow_by_count_closes_with_4008() {
        let q = OutboundQueue::new(QueueLimits {
            capacity: 2,
            max_bytes: 1000,
            expiry_ms: 10_000,
        });
        q.push(text("a"), 0).unwrap();
        q.push(text("b"), 0).unwrap();
        assert_eq!(q.push(text("c"), 0), Err(PushError::SlowConsumer));
        let batch = q.take();
        assert!(
            batch.frames.is_empty(),
            "an overflowing queue is discarded, not half-sent"
        );
        assert_eq!(batch.close.unwrap().code, CloseCode::SlowConsumer);
        assert_eq!(q.push(text("d"), 0), Err(PushError::Closed));
    }

    #[test]
    fn overflow_by_bytes_and_by_age() {
        let q = OutboundQueue::new(QueueLimits {
            capacity: 100,
            max_bytes: 5,
            expiry_ms: 10_000,
        });
        q.push(text("abc"), 0).unwrap();
        assert_eq!(q.push(text("abc"), 0), Err(PushError::SlowConsumer));

        let q = OutboundQueue::new(QueueLimits {
            capacity: 100,
            max_bytes: 100,
            expiry_ms: 10,
        });
        q.push(text("a"), 0).unwrap();
        q.push(text("b"), 10).unwrap();
        assert_eq!(q.push(text("c"), 11), Err(PushError::SlowConsumer));
    }

    #[test]
    fn sweeper_expiry_and_draining_take() {
        let q = OutboundQueue::new(QueueLimits {
            capacity: 100,
            max_bytes: 100,
            expiry_ms: 10,
        });
        q.push(text("a"), 0).unwrap();
        assert!(!q.check_expiry(10));
        let batch = q.take();
        assert_eq!(batch.frames.len(), 1);
        assert!(batch.close.is_none());
        q.push(text("b"), 20).unwrap();
        assert!(q.check_expiry(31));
        assert_eq!(q.take().close.unwrap().code, CloseCode::SlowConsumer);
    }

    #[test]
    fn close_keeps_queued_frames_and_first_reason() {
        let q = OutboundQueue::new(QueueLimits::default());
        q.push(text("bye"), 0).unwrap();
        q.close(CloseReason::new(CloseCode::ServiceRestart, "drain"));
        q.close(CloseReason::new(CloseCode::Normal, "later"));
        let batch = q.take();
        assert_eq!(batch.frames.len(), 1);
        assert_eq!(batch.close.unwrap().code, CloseCode::ServiceRestart);
    }

    #[test]
    fn backlog_goes_beyond_the_limits_until_taken() {
        let q = OutboundQueue::new(QueueLimits {
            capacity: 2,
            max_bytes: 100,
            expiry_ms: 10_000,
        });
        q.push_backlog((0..5).map(|_| text("abc")), 0).unwrap();
        q.push(text("live"), 0).unwrap();
        q.push(text("live"), 0).unwrap();
        assert_eq!(
            q.push(text("live"), 0),
            Err(PushError::SlowConsumer),
            "live frames still have their own limit"
        );

        let q = OutboundQueue::new(QueueLimits {
            capacity: 2,
            max_bytes: 100,
            expiry_ms: 10_000,
        });
        q.push_backlog((0..5).map(|_| text("abc")), 0).unwrap();
        assert_eq!(q.take().frames.len(), 5);
        q.push(text("a"), 0).unwrap();
        q.push(text("b"), 0).unwrap();
        assert_eq!(q.push(text("c"), 0), Err(PushError::SlowConsumer));
    }

    #[tokio::test]
    async fn ready_wakes_on_push() {
        let q = std::sync::Arc::new(OutboundQueue::new(QueueLimits::default()));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.ready().await }
        });
        q.push(text("x"), 0).unwrap();
        waiter.await.unwrap();
    }
}
