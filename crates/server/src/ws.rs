//! The WebSocket transport: the handshake (on top of axum routing, so that buffer sizes and errors
//! stay under our control), the first-frame authentication, and one task per connection that moves
//! frames between the socket and the node: it reads and handles client frames, and writes what the
//! connection's queue holds, all queued frames in one flush. With a write delay (`write_delay_ms`,
//! or `busy_write_delay_ms` while the node is busy: `Node::write_delay`), a write waits that long
//! after its first frame was queued, so that the frames following it share the flush; the
//! connection keeps reading client requests meanwhile.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use hyper_util::rt::TokioIo;
use switchyard_core::conn::{ConnId, Connection};
use switchyard_core::metrics::FailReason;
use switchyard_core::node::{Node, seed_room};
use switchyard_core::queue::{CloseReason, Outbound};
use switchyard_proto::Ref;
use switchyard_proto::{
    ClientBody, CloseCode, ErrorCode, RoomName, SUBPROTOCOL_JSON, ServerFrame, decode_client_frame,
};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tracing::Instrument;

use crate::api::ApiError;
use crate::app::AppState;

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Which protocol a connection speaks after authentication.
enum Protocol {
    Native,
    Seed { room: RoomName, room_name: String },
}

/// Validates the handshake and answers 101, or explains in JSON why not. (The refusal is a
/// response like the acceptance; the size difference does not matter on this path.)
#[allow(clippy::result_large_err)]
fn accept(state: &AppState, req: &mut Request) -> Result<(Response, hyper::upgrade::OnUpgrade), Response> {
    let refuse = |status: StatusCode, message: &str| {
        state.node().metrics.failed(FailReason::Handshake);
        ApiError::new(status, ErrorCode::BadRequest, message).into_response()
    };
    if req.method() != Method::GET {
        return Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "a WebSocket handshake is a GET request",
        ));
    }
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(refuse(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint speaks WebSocket: send Connection: Upgrade and Upgrade: websocket",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut response = refuse(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported WebSocket version; use 13",
        );
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return Err(response);
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(refuse(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key"));
    };
    let accept_key = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let offers_json = has_token(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL_JSON);
    if state.node().is_draining() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "this node is draining; connect to another",
        )
        .into_response());
    }
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "this connection cannot be upgraded",
        ));
    };
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h: &mut HeaderMap = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(value) = HeaderValue::from_str(&accept_key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    if offers_json {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL_JSON),
        );
    }
    Ok((response, on_upgrade))
}

/// Spawns the connection task once the upgrade completes.
fn spawn_connection(
    state: &AppState,
    on_upgrade: hyper::upgrade::OnUpgrade,
    session: Option<String>,
    protocol: Protocol,
) {
    let node = state.node().clone();
    let id = node.hub.next_conn_id();
    state
        .tasks()
        .spawn(connection(state.clone(), node, id, on_upgrade, session, protocol));
}

/// `GET /ws[?session=ID]`: the main endpoint.
pub async fn main_endpoint(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    mut req: Request,
) -> Response {
    match accept(&state, &mut req) {
        Ok((response, on_upgrade)) => {
            spawn_connection(
                &state,
                on_upgrade,
                query.get("session").cloned(),
                Protocol::Native,
            );
            response
        }
        Err(response) => response,
    }
}

/// `GET /ws/chat/{session_id}/{room_name}/`: the seed's `ChatConsumer`.
pub async fn seed_endpoint(
    State(state): State<AppState>,
    Path((session_id, room_name)): Path<(String, String)>,
    mut req: Request,
) -> Response {
    let room = match seed_room(&room_name) {
        Ok(room) => room,
        Err(e) => return ApiError::bad_request(e.message).into_response(),
    };
    match accept(&state, &mut req) {
        Ok((response, on_upgrade)) => {
            spawn_connection(
                &state,
                on_upgrade,
                Some(session_id),
                Protocol::Seed { room, room_name },
            );
            response
        }
        Err(response) => response,
    }
}

/// Sends the close frame and waits for the client's reply, at most `grace`, so that the close
/// frame is not lost to a reset. A slow consumer may first need to read what is still in flight.
async fn send_close(ws: &mut Socket, reason: &CloseReason, grace: Duration) {
    let mut text = reason.reason.clone();
    while text.len() > 123 {
        text.pop();
    }
    let frame = CloseFrame {
        code: WsCloseCode::from(reason.code.code()),
        reason: Utf8Bytes::from(text),
    };
    let _ = tokio::time::timeout(grace, async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

/// The close a read error calls for, if any.
fn close_for_read_error(e: &tungstenite::Error) -> Option<CloseReason> {
    match e {
        tungstenite::Error::Capacity(_) => Some(CloseReason::new(CloseCode::TooBig, "message too large")),
        tungstenite::Error::Utf8(_) => Some(CloseReason::new(
            CloseCode::InvalidPayload,
            "text frame is not valid UTF-8",
        )),
        tungstenite::Error::Protocol(p) => Some(CloseReason::new(CloseCode::ProtocolError, p.to_string())),
        _ => None,
    }
}

/// Waits for the first `auth` frame. Other frames get `UNAUTHORIZED` errors meanwhile.
/// Returns the session id and the `auth` frame's `ref`.
async fn await_auth(
    ws: &mut Socket,
    node: &Node,
    timeout: Duration,
) -> Result<(String, Option<Ref>), Option<CloseReason>> {
    let wait = async {
        while let Some(msg) = ws.next().await {
            let text = match msg {
                Ok(Message::Text(text)) => text,
                Ok(Message::Binary(_)) => {
                    let frame =
                        ServerFrame::error(ErrorCode::BadRequest, "binary frames are not supported", None);
                    let _ = ws.send(Message::text(frame.encode())).await;
                    continue;
                }
                Ok(Message::Close(_)) => return Err(None),
                Ok(_) => continue,
                Err(e) => return Err(close_for_read_error(&e)),
            };
            let reply = match decode_client_frame(&text) {
                Ok(frame) => match frame.body {
                    ClientBody::Auth { session } => return Ok((session, frame.reference)),
                    _ => ServerFrame::error(
                        ErrorCode::Unauthorized,
                        "authenticate first: send {\"type\":\"auth\",\"session\":\"<session id>\"} or connect with ?session=",
                        frame.reference,
                    ),
                },
                Err(e) => ServerFrame::error(e.code, e.message, e.reference),
            };
            if ws.send(Message::text(reply.encode())).await.is_err() {
                return Err(None);
            }
        }
        Err(None)
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(result) => result,
        Err(_) => {
            node.metrics.failed(FailReason::AuthTimeout);
            Err(Some(CloseReason::new(
                CloseCode::Policy,
                "authentication timeout",
            )))
        }
    }
}

/// One connection's life: set-up, the pump, tear-down. Set-up and tear-down are boxed and the
/// socket is created inside the set-up and then owned by the pump, so the future an idle connection
/// keeps in memory is little more than the pump's.
async fn connection(
    state: AppState,
    node: Arc<Node>,
    id: ConnId,
    on_upgrade: hyper::upgrade::OnUpgrade,
    session: Option<String>,
    protocol: Protocol,
) {
    // Set-up and tear-down log inside a `conn` span; no span is kept while the connection idles
    // (a live span costs memory per connection and work on every wake-up), so the request path logs
    // the connection id as a field instead.
    let Some((ws, conn)) = Box::pin(
        open(&state, &node, id, on_upgrade, session, &protocol).instrument(tracing::info_span!("conn", id)),
    )
    .await
    else {
        return;
    };
    let opened = Instant::now();
    // The pump is built here, not in a helper taking the socket by value: an async fn keeps its
    // arguments for its whole life, which would store the socket twice.
    let mut pump = Pump {
        node: &node,
        conn: &conn,
        protocol: &protocol,
        ws,
        state: PumpState::Idle,
        write_due: None,
    };
    let close = std::future::poll_fn(|cx| pump.poll(cx)).await;
    let ws = pump.ws;
    Box::pin(finish(&state, &node, &conn, ws, close, opened).instrument(tracing::info_span!("conn", id)))
        .await;
}

/// Authenticates and registers the connection, or closes it with the reason.
async fn open(
    state: &AppState,
    node: &Node,
    id: ConnId,
    on_upgrade: hyper::upgrade::OnUpgrade,
    session: Option<String>,
    protocol: &Protocol,
) -> Option<(Socket, Arc<Connection>)> {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return None;
        }
    };
    let mut socket =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(state.ws_config())).await;
    let ws = &mut socket;
    let (session_id, auth_ref) = match session {
        Some(session) => (session, None),
        None => match await_auth(ws, node, state.auth_timeout()).await {
            Ok(found) => found,
            Err(close) => {
                if let Some(close) = close {
                    node.metrics.closed_with(close.code.code());
                    send_close(ws, &close, state.write_timeout()).await;
                }
                return None;
            }
        },
    };
    let (session, user) = match node.authenticate(&session_id).await {
        Ok(found) => found,
        Err(e) => {
            tracing::info!(reason = %e.close.reason, "connection refused");
            node.metrics.closed_with(e.close.code.code());
            send_close(ws, &e.close, state.write_timeout()).await;
            return None;
        }
    };
    if node.is_draining() {
        let close = CloseReason::new(CloseCode::ServiceRestart, "draining");
        let frame = ServerFrame::Reconnect {
            after_ms: 0,
            reason: "draining".into(),
        };
        let _ = ws.send(Message::text(frame.encode())).await;
        node.metrics.closed_with(close.code.code());
        send_close(ws, &close, state.write_timeout()).await;
        return None;
    }
    let conn = match protocol {
        Protocol::Native => node.open(id, &session, user, auth_ref).await,
        Protocol::Seed { room_name, .. } => match node.open_seed(id, &session, user, room_name).await {
            Ok((conn, _)) => conn,
            Err(e) => {
                let close = CloseReason::new(CloseCode::TryLater, e.message);
                node.metrics.closed_with(close.code.code());
                send_close(ws, &close, state.write_timeout()).await;
                return None;
            }
        },
    };
    // The session id is a bearer credential: it stays out of the logs. Connects and client-side
    // disconnects are debug-level (a line per connection is heavy at tens of thousands); closes
    // the server decides stay at info.
    tracing::debug!(user = %conn.user, "connected");
    Some((socket, conn))
}

/// Releases the connection and closes the socket.
async fn finish(
    state: &AppState,
    node: &Node,
    conn: &Arc<Connection>,
    mut ws: Socket,
    close: Option<CloseReason>,
    opened: Instant,
) {
    // Release rooms, presence and counters first: the close handshake may take a while with a slow
    // client, and the rest of the system should not wait for it.
    node.close(conn).await;
    node.metrics
        .connection_duration
        .observe(opened.elapsed().as_secs_f64());
    match close {
        Some(close) => {
            tracing::info!(code = close.code.code(), reason = %close.reason, "closing");
            node.metrics.closed_with(close.code.code());
            send_close(&mut ws, &close, state.write_timeout()).await;
        }
        None => tracing::debug!("disconnected"),
    }
}

/// Local members from which a publish makes its publisher yield its turn (see `PumpState::Handling`).
const BIG_ROOM: usize = 256;

/// The steady state of a connection, written as a plain state machine rather than an `async`
/// loop over `select!`: an idle connection then costs its socket and a few words, instead of the
/// stored futures of every branch.
struct Pump<'a> {
    node: &'a Node,
    conn: &'a Arc<Connection>,
    protocol: &'a Protocol,
    ws: Socket,
    state: PumpState<'a>,
    /// When the frames queued now are written (set while the write delay runs).
    write_due: Option<Pin<Box<tokio::time::Sleep>>>,
}

enum PumpState<'a> {
    /// Waiting for the queue or the client.
    Idle,
    /// Writing a batch taken from the queue; `close` follows it.
    Writing {
        frames: std::collections::VecDeque<(Outbound, u64)>,
        close: Option<CloseReason>,
    },
    /// Handling one client request (it may wait on the backend); then yield the turn if asked.
    Handling(Pin<Box<dyn Future<Output = ()> + Send + 'a>>, bool),
    /// The client closed; our close reply is being flushed.
    ClosingReply,
}

impl Pump<'_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<CloseReason>> {
        loop {
            match &mut self.state {
                PumpState::Handling(request, yield_after) => {
                    ready!(request.as_mut().poll(cx));
                    let yield_after = *yield_after;
                    self.state = PumpState::Idle;
                    if yield_after {
                        // This publish queued a frame for every member of a big room: let their
                        // writers run before this client's next request, so a fast publisher cannot
                        // push a room's members over their queue limits between two of their turns.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
                PumpState::Writing { frames, close } => {
                    // No timer per write: the sweeper aborts the queue (4008) when a write stays
                    // blocked longer than the write timeout; an overflow or a shutdown aborts it too.
                    if let Poll::Ready(reason) = self.conn.queue.poll_aborted(cx) {
                        return Poll::Ready(Some(reason));
                    }
                    while !frames.is_empty() {
                        match Pin::new(&mut self.ws).poll_ready(cx) {
                            Poll::Ready(Ok(())) => {}
                            Poll::Ready(Err(_)) => return Poll::Ready(None),
                            Poll::Pending => return Poll::Pending,
                        }
                        let Some((frame, _)) = frames.pop_front() else {
                            break;
                        };
                        let message = match frame {
                            Outbound::Text(text) => Message::Text(text),
                            Outbound::Ping => Message::Ping(Default::default()),
                        };
                        if Pin::new(&mut self.ws).start_send(message).is_err() {
                            return Poll::Ready(None);
                        }
                    }
                    match Pin::new(&mut self.ws).poll_flush(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(_)) => return Poll::Ready(None),
                        Poll::Pending => return Poll::Pending,
                    }
                    self.conn.write_finished();
                    self.conn.queue.recycle(std::mem::take(frames));
                    if let Some(close) = close.take() {
                        return Poll::Ready(Some(close));
                    }
                    self.state = PumpState::Idle;
                }
                PumpState::ClosingReply => {
                    // Bounded like any write: the sweeper aborts a stuck one.
                    if self.conn.queue.poll_aborted(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    let _ = ready!(Pin::new(&mut self.ws).poll_flush(cx));
                    self.conn.write_finished();
                    return Poll::Ready(None);
                }
                PumpState::Idle => {
                    // Backpressure comes from this order: a request is read only when everything
                    // queued for this connection has been written to its socket. A publisher in a
                    // busy room (it receives its room's messages too) is thereby held to the pace at
                    // which it can take the room's traffic, through TCP flow control.
                    if self.conn.queue.poll_ready(cx).is_ready() {
                        let delay = self.node.write_delay();
                        let due = if delay.is_zero() {
                            true
                        } else {
                            let due = self
                                .write_due
                                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
                            due.as_mut().poll(cx).is_ready()
                        };
                        if due {
                            self.write_due = None;
                            if let Some(close) = self.start_write() {
                                return Poll::Ready(close);
                            }
                            continue;
                        }
                    }
                    let message = match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                        None => return Poll::Ready(None),
                        Some(Err(e)) => return Poll::Ready(close_for_read_error(&e)),
                        Some(Ok(message)) => message,
                    };
                    self.conn.touch(self.node.clock.now_ms());
                    match message {
                        Message::Text(text) => self.receive(text),
                        Message::Binary(_) => match self.protocol {
                            Protocol::Native => self.node.send_error(
                                self.conn,
                                ErrorCode::BadRequest,
                                "binary frames are not supported; send JSON text",
                                None,
                            ),
                            Protocol::Seed { .. } => self.node.send_seed_error(
                                self.conn,
                                ErrorCode::InvalidMessageFormat,
                                "binary frames are not supported; send JSON text",
                            ),
                        },
                        Message::Close(_) => {
                            // tungstenite queued the close reply; send it before dropping the socket.
                            self.conn.write_started(self.node.clock.now_ms());
                            self.state = PumpState::ClosingReply;
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Takes everything queued and starts writing it; `Some` when the queue was aborted instead (the
    /// connection ends with that reason).
    fn start_write(&mut self) -> Option<Option<CloseReason>> {
        let batch = self.conn.queue.take();
        if batch.aborted {
            return Some(batch.close);
        }
        self.conn.write_started(self.node.clock.now_ms());
        self.state = PumpState::Writing {
            frames: batch.frames,
            close: batch.close,
        };
        None
    }

    /// Starts handling one text frame.
    fn receive(&mut self, text: Utf8Bytes) {
        let (node, conn) = (self.node, self.conn);
        node.metrics.message_size.observe(text.len() as f64);
        match self.protocol {
            Protocol::Native => match decode_client_frame(&text) {
                Ok(frame) => {
                    let big_room = matches!(&frame.body, ClientBody::Publish { room, .. } if node.hub.member_count(room) >= BIG_ROOM);
                    self.state = PumpState::Handling(Box::pin(node.handle(conn, frame)), big_room);
                }
                Err(e) => node.reject(conn, e),
            },
            Protocol::Seed { room, .. } => {
                let big_room = node.hub.member_count(room) >= BIG_ROOM;
                let request = Box::pin(async move { node.handle_seed(conn, room, &text).await });
                self.state = PumpState::Handling(request, big_room);
            }
        }
    }
}
