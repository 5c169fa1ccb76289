//! Outbound queue push (issue 4): the cost of `OutboundQueue::push` of a shared, already-encoded
//! frame, and of the writer's cycle of pushes followed by one `take`.
//!
//! Every delivery of the hub's fan-out is one `push` (a lock, the limit checks, a `VecDeque` append
//! and a wake-up when the queue was empty), and every write burst of a connection starts with one
//! `take` of everything queued. The frame is a 200-byte `Utf8Bytes` shared by reference count, as
//! the hub shares it; no waker is registered, as for a connection whose writer is busy.
//!
//! - `push`: pushes alone, in runs of at most 1,000 (under the default capacity of 1,500 frames);
//!   the queue is taken outside the timing between runs (`iter_custom`).
//! - `push_take/B`: B pushes into an empty queue, then one `take` whose batch is dropped (the
//!   frames' reference counts and the taken `VecDeque` are released), all measured. B = 1 is a quiet
//!   connection (one frame per write), 64 a busy one. Throughput is per frame.
//! - `push_take_recycle/B`: the same, with the batch's buffer handed back to the queue after the
//!   (here empty) write, as the writer does: a burst of more than one frame then reuses it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchyard_core::Utf8Bytes;
use switchyard_core::queue::{Outbound, OutboundQueue, QueueLimits};

/// A `message` frame of 200 bytes, as the hub would have encoded it.
fn frame() -> Utf8Bytes {
    let text = format!(
        r#"{{"type":"message","room":"bench","offset":1,"from":"alice","data":"{}","ts":1795000000000}}"#,
        "x".repeat(112)
    );
    assert_eq!(text.len(), 200);
    Utf8Bytes::from(text)
}

fn queue(c: &mut Criterion) {
    let frame = frame();
    let mut group = c.benchmark_group("queue");

    group.throughput(Throughput::Elements(1));
    group.bench_function("push", |b| {
        let q = OutboundQueue::new(QueueLimits::default());
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let run = left.min(1_000);
                let start = Instant::now();
                for _ in 0..run {
                    q.push(Outbound::Text(frame.clone()), black_box(0)).unwrap();
                }
                total += start.elapsed();
                black_box(q.take());
                left -= run;
            }
            total
        })
    });

    for batch in [1u64, 8, 64] {
        group.throughput(Throughput::Elements(batch));
        group.bench_with_input(BenchmarkId::new("push_take", batch), &batch, |b, &batch| {
            let q = OutboundQueue::new(QueueLimits::default());
            b.iter(|| {
                for _ in 0..batch {
                    q.push(Outbound::Text(frame.clone()), black_box(0)).unwrap();
                }
                black_box(q.take())
            })
        });
        group.bench_with_input(
            BenchmarkId::new("push_take_recycle", batch),
            &batch,
            |b, &batch| {
                let q = OutboundQueue::new(QueueLimits::default());
                b.iter(|| {
                    for _ in 0..batch {
                        q.push(Outbound::Text(frame.clone()), black_box(0)).unwrap();
                    }
                    let mut taken = q.take();
                    taken.frames.clear();
                    q.recycle(taken.frames);
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, queue);
criterion_main!(benches);
