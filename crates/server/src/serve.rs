//! `switchyard serve`: builds the node, binds the listener, runs the accept loop, and drains on
//! SIGTERM, SIGINT or `POST /api/drain` before exiting.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use switchyard_core::backend::memory::MemoryBackend;
use switchyard_core::clock::Clock;
use switchyard_core::metrics::Metrics;
use switchyard_core::node::Node;
use switchyard_core::queue::CloseReason;
use switchyard_proto::CloseCode;
use switchyard_redis::RedisBackend;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{AppState, router};
use crate::config::{BackendKind, Config};

/// Pending connections the kernel may hold (this machine's `somaxconn` is 4096).
const LISTEN_BACKLOG: i32 = 4096;

fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot bind {addr}"))?;
    socket
        .listen(LISTEN_BACKLOG)
        .with_context(|| format!("cannot listen on {addr}"))?;
    TcpListener::from_std(socket.into()).context("cannot register the listener")
}

/// Runs a node until it has drained.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = bind(config.listen)?;
    let local = listener.local_addr()?;
    let node_id = config
        .node_id
        .clone()
        .unwrap_or_else(|| format!("switchyard-{}", local.port()));
    let stop_background = CancellationToken::new();
    let clock = Clock::new();
    tokio::spawn(clock.clone().run(stop_background.clone()));
    let metrics = Arc::new(Metrics::new());
    let backends = match config.backend {
        BackendKind::Memory => {
            let memory = MemoryBackend::new(config.backend_settings());
            tokio::spawn(
                memory
                    .clone()
                    .run_sweeper(Duration::from_secs(5), stop_background.clone()),
            );
            switchyard_core::backend::Backends {
                broker: memory.clone(),
                sessions: memory.clone(),
                presence: memory,
            }
        }
        BackendKind::Redis => {
            let redis = config.redis_settings()?.context("redis settings missing")?;
            let backend = RedisBackend::connect(
                config.backend_settings(),
                redis,
                metrics.clone(),
                stop_background.clone(),
            )
            .await
            .context("cannot start the redis backend")?;
            backend.backends()
        }
    };
    let node = Node::new(config.node_settings(node_id.clone()), backends, metrics, clock);
    tokio::spawn(node.clone().run_sweeper(stop_background.clone()));
    tokio::spawn(node.clone().run_load_monitor(stop_background.clone()));

    let tasks = TaskTracker::new();
    let state = AppState::new(node.clone(), config.clone(), tasks.clone());
    let app = router(state.clone());

    println!(
        "switchyard listening on http://{local} (backend: {}, node: {node_id})",
        config.backend.name()
    );
    let _ = std::io::stdout().flush();
    tracing::info!(%local, node = %node_id, backend = config.backend.name(), "listening");

    let accept_loop = tokio::spawn(accept_loop(listener, app, state.clone(), tasks.clone()));
    wait_for_drain_request(&state).await;
    let left = node.drain().await;
    if left > 0 {
        tracing::warn!(left, "drain timeout reached; closing the remaining connections");
    }
    node.abort_all(CloseReason::new(CloseCode::GoingAway, "server shutting down"));
    state.shutdown().cancel();
    let _ = accept_loop.await;
    tasks.close();
    // Close handshakes in progress are bounded by the write timeout.
    let grace = Duration::from_secs(config.write_timeout_secs + 1);
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!("some connections did not finish closing in time");
    }
    stop_background.cancel();
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_drain_request(state: &AppState) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = state.drain_requested().cancelled() => tracing::info!("drain requested over the API"),
        _ = terminate => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
    state.request_drain();
}

async fn accept_loop(listener: TcpListener, app: axum::Router, state: AppState, tasks: TaskTracker) {
    let shutdown = state.shutdown().clone();
    let handshake_timeout = Duration::from_secs(state.config().handshake_timeout_secs);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(handshake_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "http connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
                }
            }
        });
    }
}
