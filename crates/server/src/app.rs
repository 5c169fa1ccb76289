//! Shared state of the HTTP layer and the router: API, ops endpoints, WebSocket endpoints, the
//! OpenAPI document and the demo page.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use switchyard_core::node::Node;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::{api, ws};

struct Shared {
    node: Arc<Node>,
    config: Config,
    ws_config: WebSocketConfig,
    drain_requested: CancellationToken,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Cheap to clone; handed to every handler.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(node: Arc<Node>, config: Config, tasks: TaskTracker) -> Self {
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(config.ws_read_buffer_bytes)
            .write_buffer_size(config.ws_write_buffer_bytes)
            .max_write_buffer_size(
                config.queue_max_bytes + config.ws_write_buffer_bytes + config.max_message_bytes,
            )
            .max_message_size(Some(config.max_message_bytes))
            .max_frame_size(Some(config.max_message_bytes));
        AppState(Arc::new(Shared {
            node,
            config,
            ws_config,
            drain_requested: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            tasks,
        }))
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.0.node
    }

    pub fn config(&self) -> &Config {
        &self.0.config
    }

    pub fn ws_config(&self) -> WebSocketConfig {
        self.0.ws_config
    }

    pub fn tasks(&self) -> &TaskTracker {
        &self.0.tasks
    }

    /// Fires when the node must stop: connections still open close with 1001.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.0.shutdown
    }

    /// Fires when a drain was requested (SIGTERM, SIGINT or `POST /api/drain`).
    pub fn drain_requested(&self) -> &CancellationToken {
        &self.0.drain_requested
    }

    /// Marks the node draining at once (so `/readyz` answers 503 from now on) and wakes the serve loop.
    pub fn request_drain(&self) {
        self.0.node.mark_draining();
        self.0.drain_requested.cancel();
    }

    pub fn auth_timeout(&self) -> Duration {
        Duration::from_secs(self.0.config.auth_timeout_secs)
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.0.config.write_timeout_secs)
    }
}

const DEMO_PAGE: &str = include_str!("../static/index.html");

/// The whole HTTP surface of a node.
pub fn router(state: AppState) -> Router {
    let (api, ops) = api::routes();
    let (api, openapi) = api.merge(ops).split_for_parts();
    let openapi_json = openapi
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    api.route(
        "/api/openapi.json",
        get(move || {
            let body = openapi_json.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body) }
        }),
    )
    .route("/ws", get(ws::main_endpoint))
    .route("/ws/chat/{session_id}/{room_name}/", get(ws::seed_endpoint))
    .route("/ws/chat/{session_id}/{room_name}", get(ws::seed_endpoint))
    .route("/", get(|| async { Html(DEMO_PAGE) }))
    .fallback(|| async {
        api::ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            switchyard_proto::ErrorCode::BadRequest,
            "no such endpoint",
        )
        .into_response()
    })
    .layer(axum::middleware::from_fn_with_state(
        state.clone(),
        api::require_api_key,
    ))
    .with_state(state)
}
