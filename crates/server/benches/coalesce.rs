//! Frame coalescing (issue 4): the cost of writing K = 1, 8 and 64 text frames of 200 bytes to a
//! WebSocket with one flush per frame, against feeding them all and flushing once, as the
//! connection's pump in `server::ws` does with everything it takes from its queue.
//!
//! The socket is tokio-tungstenite's `WebSocketStream` in the server role (no masking) over an
//! in-memory `tokio::io::duplex` pipe, with the server's own `WebSocketConfig` (built from
//! `Config::default()` as `app.rs` builds it: 16 KiB write buffer, so up to 64 frames stay buffered
//! until the flush). A task reads and discards the other end. Everything runs on a current-thread
//! runtime, so the reader runs when the writer waits (the pipe is full or tokio's cooperative
//! budget is spent) and its time is part of the measurement for both variants alike.
//!
//! On the duplex pipe a write is a lock and a copy; on a real TCP socket each one is a system call,
//! so the gap measured here is a lower bound of what one flush per burst saves a server.
//!
//! - `flush_per_frame/K`: `SinkExt::send` of each frame (feed, then flush).
//! - `one_flush/K`: `SinkExt::feed` of each frame (poll_ready + start_send), then one `flush`.
//!
//! Throughput is per frame. This bench lives in the server crate, not in core, because the
//! architecture keeps core's use of tungstenite to its `Utf8Bytes` type.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::SinkExt;
use switchyard::config::Config;
use switchyard_proto::{Payload, RoomName, ServerFrame, UserId};
use tokio::io::{AsyncReadExt, DuplexStream};
use tokio::runtime::Runtime;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

const FRAME_BYTES: usize = 200;

/// Bytes the pipe holds before the writer waits for the reader.
const PIPE_BYTES: usize = 64 * 1024;

/// The server's WebSocket configuration with default settings (as in `AppState::new`).
fn ws_config() -> WebSocketConfig {
    let config = Config::default();
    WebSocketConfig::default()
        .read_buffer_size(config.ws_read_buffer_bytes)
        .write_buffer_size(config.ws_write_buffer_bytes)
        .max_write_buffer_size(
            config.queue_max_bytes + config.ws_write_buffer_bytes + config.max_message_bytes,
        )
        .max_message_size(Some(config.max_message_bytes))
        .max_frame_size(Some(config.max_message_bytes))
}

fn message_frame(data: &str) -> String {
    ServerFrame::Message {
        room: RoomName::parse("bench").unwrap(),
        offset: 1,
        from: Some(UserId::parse("alice").unwrap()),
        data: Payload::from_value(&data).unwrap(),
        ts: 1_795_000_000_000,
        id: None,
    }
    .encode()
}

/// A `message` frame of exactly `FRAME_BYTES` bytes.
fn frame() -> Utf8Bytes {
    let bare = message_frame("").len();
    let text = message_frame(&"x".repeat(FRAME_BYTES - bare));
    assert_eq!(text.len(), FRAME_BYTES);
    Utf8Bytes::from(text)
}

/// A server-side WebSocket whose peer reads and discards everything.
fn socket(rt: &Runtime) -> WebSocketStream<DuplexStream> {
    rt.block_on(async {
        let (server, mut client) = tokio::io::duplex(PIPE_BYTES);
        tokio::spawn(async move {
            let mut buf = vec![0u8; PIPE_BYTES];
            while let Ok(n) = client.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        WebSocketStream::from_raw_socket(server, Role::Server, Some(ws_config())).await
    })
}

fn coalesce(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let frame = frame();
    let mut group = c.benchmark_group("coalesce");
    for k in [1u64, 8, 64] {
        group.throughput(Throughput::Elements(k));
        for (name, one_flush) in [("flush_per_frame", false), ("one_flush", true)] {
            group.bench_with_input(BenchmarkId::new(name, k), &k, |b, &k| {
                let mut ws = socket(&rt);
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            for _ in 0..k {
                                let message = Message::Text(frame.clone());
                                if one_flush {
                                    ws.feed(message).await.unwrap();
                                } else {
                                    ws.send(message).await.unwrap();
                                }
                            }
                            if one_flush {
                                ws.flush().await.unwrap();
                            }
                        }
                        start.elapsed()
                    })
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, coalesce);
criterion_main!(benches);
