//! Encode-once fan-out (issue 4): what one publication costs the hub when a room has N = 1, 100 and
//! 1,000 local members, against what encoding it once per recipient would cost.
//!
//! `Hub::publication` (the broker's `DeliverySink` path) encodes the `message` frame once and pushes
//! a shared `Utf8Bytes` (a reference count, no copy) into every member's `OutboundQueue`; the
//! architecture's invariant is "a publication is encoded at most once per protocol per node, never
//! per recipient". These benchmarks show what that buys: the per-delivery cost of the fan-out next to
//! the cost of one serialisation of the same 200-byte frame, repeated N times.
//!
//! Throughput is in elements = deliveries (N per publication), so criterion's "thrpt" line gives
//! deliveries per second and time / N is the cost of one delivery.
//!
//! - `encode_once_push_take/N`: one publication to N members, then each member's writer takes its
//!   queue (what `server::ws` does before writing). The queues are drained inside the measured
//!   closure, so every publication finds empty queues, as on a server that keeps up.
//! - `encode_once_push/N`: the same publication, timed alone (`iter_custom`); the queues are drained
//!   outside the timing after each publication. Two `Instant::now` calls are included per
//!   publication, which matters only for N = 1.
//! - `encode_per_recipient/N`: `ServerFrame::encode` of the same frame N times, each result dropped
//!   at once: a lower bound of a per-recipient design (no queue push, no buffers kept alive).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchyard_core::backend::memory::MemoryBackend;
use switchyard_core::backend::{BackendSettings, DeliverySink, Publication};
use switchyard_core::clock::Clock;
use switchyard_core::conn::{ConnKind, Connection};
use switchyard_core::frames;
use switchyard_core::hub::Hub;
use switchyard_core::metrics::Metrics;
use switchyard_core::queue::QueueLimits;
use switchyard_proto::{Payload, RoomName, UserId};

/// Size of the encoded `message` frame, as in the load generator's `--payload 100` runs plus the
/// frame's own fields.
const FRAME_BYTES: usize = 200;

fn room() -> RoomName {
    RoomName::parse("bench").unwrap()
}

fn publication_with(data: &str) -> Publication {
    Publication {
        room: room(),
        offset: 1,
        epoch: Arc::from("epoch"),
        from: Some(UserId::parse("alice").unwrap()),
        data: Payload::from_value(&data).unwrap(),
        ts: 1_795_000_000_000,
        id: None,
    }
}

/// A publication whose native frame encodes to exactly `FRAME_BYTES` bytes.
fn publication() -> Arc<Publication> {
    let bare = frames::native_publication(&publication_with("")).len();
    let p = publication_with(&"x".repeat(FRAME_BYTES - bare));
    assert_eq!(frames::native_publication(&p).len(), FRAME_BYTES);
    Arc::new(p)
}

/// A hub on the memory broker with `n` live native members in one room, each with the default
/// queue limits (1,500 frames, 8 MiB).
fn room_with_members(n: usize) -> (Arc<Hub>, Vec<Arc<Connection>>) {
    let broker = MemoryBackend::new(BackendSettings::default());
    let limits = QueueLimits::default();
    let hub = Hub::new(broker, Clock::new(), Arc::new(Metrics::new()), limits.capacity);
    let members: Vec<Arc<Connection>> = (0..n)
        .map(|i| {
            let conn = Connection::new(
                hub.next_conn_id(),
                UserId::parse(&format!("user{i}")).unwrap(),
                Arc::from(format!("session{i}")),
                ConnKind::Native,
                limits,
                0,
            );
            assert!(hub.begin_join(&room(), &conn, false));
            hub.complete_join(&room(), &conn, None, &[], 0);
            conn
        })
        .collect();
    assert_eq!(hub.member_count(&room()), n);
    (hub, members)
}

fn drain(members: &[Arc<Connection>]) {
    for member in members {
        black_box(member.queue.take());
    }
}

fn fanout(c: &mut Criterion) {
    let publication = publication();
    let frame = frames::message(&publication);
    let mut group = c.benchmark_group("fanout");
    for n in [1usize, 100, 1_000] {
        let (hub, members) = room_with_members(n);
        // Check once that every member gets the frame, so the benchmark measures real deliveries.
        hub.publication(publication.clone());
        assert!(members.iter().all(|m| m.queue.take().frames.len() == 1));

        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("encode_once_push_take", n), &n, |b, _| {
            // Drained inside the measured closure: publish, then every member takes its queue.
            b.iter(|| {
                hub.publication(black_box(publication.clone()));
                drain(&members);
            })
        });
        group.bench_with_input(BenchmarkId::new("encode_once_push", n), &n, |b, _| {
            // Drained outside the timing (iter_custom): only `Hub::publication` is measured.
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let p = publication.clone();
                    let start = Instant::now();
                    hub.publication(black_box(p));
                    total += start.elapsed();
                    drain(&members);
                }
                total
            })
        });
        group.bench_with_input(BenchmarkId::new("encode_per_recipient", n), &n, |b, &n| {
            b.iter(|| {
                for _ in 0..n {
                    black_box(frames::text(black_box(&frame)));
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
