//! One Switchyard node, independent of any transport: authenticates connections, handles every
//! client request of the `/ws` and seed protocols, offers the server-side operations of the HTTP
//! API, and runs the keepalive sweeper and the paced drain. Transports (crates/server) only move
//! frames between sockets and these methods.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use switchyard_proto::server::seed::SeedFrame;
use switchyard_proto::{
    ClientBody, ClientFrame, CloseCode, DecodeError, ErrorCode, Payload, Ref, RoomName, ServerFrame,
    StreamPosition, UserId,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tungstenite::Utf8Bytes;

use crate::backend::{
    BackendError, Backends, DirectOutcome, DisconnectTarget, NewDirect, NewPublication, PresenceDiff,
    PublishOutcome, Recovery, Session, SystemMessage,
};
use crate::clock::{Clock, unix_ms};
use crate::conn::{ConnId, ConnKind, Connection};
use crate::frames;
use crate::hub::Hub;
use crate::metrics::{FailReason, Metrics};
use crate::queue::{CloseReason, Outbound, QueueLimits};

/// Node settings that are not backend settings.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// Name reported in `welcome` frames and logs.
    pub node_id: String,
    pub queue: QueueLimits,
    /// Most rooms one connection may join.
    pub max_rooms_per_connection: usize,
    /// Most publications one `history` request returns.
    pub max_history_limit: usize,
    /// Most publications a rejoin replays; a larger gap gives `recovered: false`.
    pub recovery_max_publications: usize,
    /// Most payload bytes a rejoin replays; a larger gap gives `recovered: false`.
    pub recovery_max_bytes: usize,
    /// Keepalive ping interval, ms.
    pub ping_interval_ms: u64,
    /// A connection silent for this long (no frame, no pong) is closed, ms.
    pub idle_timeout_ms: u64,
    /// A write to a client blocked for this long closes it as a slow consumer, ms.
    pub write_timeout_ms: u64,
    /// How long a connection waits after its first queued frame before writing (0: at once).
    pub write_delay: Duration,
    /// The wait used instead while the node's workers are busy (see [`Node::run_load_monitor`]);
    /// 0 turns the monitor off.
    pub busy_write_delay: Duration,
    pub drain: DrainSettings,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            node_id: "switchyard".into(),
            queue: QueueLimits::default(),
            max_rooms_per_connection: 128,
            max_history_limit: 1000,
            // Larger than the queue's limits, so a client closed with 4008 can recover its gap.
            recovery_max_publications: 5000,
            recovery_max_bytes: 16 * 1024 * 1024,
            ping_interval_ms: 25_000,
            idle_timeout_ms: 60_000,
            write_timeout_ms: 10_000,
            write_delay: Duration::ZERO,
            busy_write_delay: Duration::ZERO,
            drain: DrainSettings::default(),
        }
    }
}

/// How a node drains (DESIGN.md §3 rule 7).
#[derive(Debug, Clone, Copy)]
pub struct DrainSettings {
    /// Longest drain; connections still open then are dropped.
    pub timeout: Duration,
    /// Connections told to reconnect per batch.
    pub batch_size: usize,
    /// Mean pause between batches (each pause is jittered ±50%).
    pub batch_interval: Duration,
    /// The `reconnect` frame's `after_ms` is random in `0..=reconnect_jitter_ms`.
    pub reconnect_jitter_ms: u64,
}

impl Default for DrainSettings {
    fn default() -> Self {
        DrainSettings {
            timeout: Duration::from_secs(30),
            batch_size: 500,
            batch_interval: Duration::from_millis(100),
            reconnect_jitter_ms: 2000,
        }
    }
}

/// Why a connection could not be authenticated; the transport closes with `close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthError {
    pub close: CloseReason,
}

/// A request error: becomes an `error` frame (or a 4xx/503 HTTP response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub code: ErrorCode,
    pub message: String,
}

impl RequestError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RequestError {
            code,
            message: message.into(),
        }
    }
}

impl From<BackendError> for RequestError {
    fn from(e: BackendError) -> Self {
        let code = match e {
            BackendError::Unavailable(_) => ErrorCode::Unavailable,
            BackendError::InboxFull { .. } => ErrorCode::RateLimited,
            BackendError::Corrupt(_) => ErrorCode::InternalError,
        };
        RequestError::new(code, e.to_string())
    }
}

pub struct Node {
    pub settings: NodeSettings,
    pub hub: Arc<Hub>,
    pub backends: Backends,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    draining: AtomicBool,
    /// Set by the load monitor while the workers are busy: writes then wait `busy_write_delay`.
    busy: AtomicBool,
    /// Fires when the last connection closes (the drain waits on it).
    emptied: Notify,
}

/// How often the load monitor samples the runtime's busy time.
const LOAD_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// Busy share of the workers' time from which writes are coalesced, and below which they stop
/// being coalesced again (apart, so that a load near the line does not flip the mode every sample).
const BUSY_ON: f64 = 0.90;
const BUSY_OFF: f64 = 0.75;

/// Whether the node counts as busy after a sample in which its workers were busy for
/// `busy_fraction` of the time.
fn next_busy(was_busy: bool, busy_fraction: f64) -> bool {
    if was_busy {
        busy_fraction >= BUSY_OFF
    } else {
        busy_fraction >= BUSY_ON
    }
}

impl Node {
    pub fn new(settings: NodeSettings, backends: Backends, metrics: Arc<Metrics>, clock: Clock) -> Arc<Self> {
        let hub = Hub::new(
            backends.broker.clone(),
            clock.clone(),
            metrics.clone(),
            settings.queue.capacity,
        );
        Arc::new(Node {
            settings,
            hub,
            backends,
            metrics,
            clock,
            draining: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            emptied: Notify::new(),
        })
    }

    /// Turns `/readyz` to 503 and refuses new connections; [`Node::drain`] does the rest.
    pub fn mark_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.metrics.draining.set(1);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Validates a session (the seed's `validate_session`: extends its TTL and marks it active).
    pub async fn authenticate(&self, session_id: &str) -> Result<(Session, UserId), AuthError> {
        let invalid = |why: &str| {
            self.metrics.failed(FailReason::Auth);
            AuthError {
                close: CloseReason::new(CloseCode::InvalidSession, why),
            }
        };
        if session_id.is_empty() || session_id.len() > 128 {
            return Err(invalid("invalid session"));
        }
        match self.backends.sessions.validate(session_id).await {
            Ok(Some(session)) => match session.record.user() {
                Some(user) => Ok((session, user)),
                None => Err(invalid("session has no valid user_id")),
            },
            Ok(None) => Err(invalid("invalid or expired session")),
            Err(e) => {
                self.metrics.failed(FailReason::Backend);
                tracing::warn!(error = %e, "session validation failed");
                Err(AuthError {
                    close: CloseReason::new(CloseCode::TryLater, "backend unavailable"),
                })
            }
        }
    }

    async fn new_connection(
        &self,
        id: ConnId,
        session: &Session,
        user: UserId,
        kind: ConnKind,
    ) -> Arc<Connection> {
        let conn = Connection::new(
            id,
            user,
            Arc::from(session.id.as_str()),
            kind,
            self.settings.queue,
            self.clock.now_ms(),
        );
        self.hub.register(&conn);
        self.metrics.connections_opened.inc();
        self.metrics.active_connections.inc();
        if let Err(e) = self.backends.sessions.connection_opened(&session.id).await {
            tracing::warn!(conn = id, error = %e, "session connection not counted");
        }
        conn
    }

    /// Opens an authenticated `/ws` connection: queues `welcome` and the user's inbox.
    /// `id` comes from [`Hub::next_conn_id`], taken when the transport accepted the connection.
    pub async fn open(
        &self,
        id: ConnId,
        session: &Session,
        user: UserId,
        auth_ref: Option<Ref>,
    ) -> Arc<Connection> {
        let conn = self.new_connection(id, session, user, ConnKind::Native).await;
        let inbox = match self.backends.broker.inbox(&conn.user).await {
            Ok(inbox) => inbox,
            Err(e) => {
                self.metrics.backend_errors.inc();
                tracing::warn!(conn = conn.id, error = %e, "inbox read failed; it is delivered on the next connect");
                Vec::new()
            }
        };
        let welcome = frames::text(&ServerFrame::Welcome {
            reference: auth_ref,
            session_id: session.id.clone(),
            user_id: conn.user.clone(),
            node: self.settings.node_id.clone(),
            inbox: u32::try_from(inbox.len()).unwrap_or(u32::MAX),
        });
        self.hub.complete_register(&conn, welcome, &inbox);
        conn
    }

    /// Opens a seed-protocol connection in room `chat_{room_name}`: queues the seed's welcome.
    pub async fn open_seed(
        &self,
        id: ConnId,
        session: &Session,
        user: UserId,
        room_name: &str,
    ) -> Result<(Arc<Connection>, RoomName), RequestError> {
        let room = seed_room(room_name)?;
        let conn = self.new_connection(id, session, user, ConnKind::Seed).await;
        let welcome = Utf8Bytes::from(
            SeedFrame::Welcome {
                session_id: session.id.clone(),
                user_id: conn.user.to_string(),
                room: room_name.to_string(),
                message: format!("Connected to room {room_name}"),
            }
            .encode(),
        );
        self.hub.complete_register(&conn, welcome, &[]);
        if let Err(e) = self.join(&conn, &room, None, false, None).await {
            self.close(&conn).await;
            return Err(e);
        }
        Ok((conn, room))
    }

    fn reply(&self, conn: &Connection, frame: &ServerFrame) {
        self.hub.send(conn, frames::text(frame));
    }

    /// Queues an `error` frame.
    pub fn send_error(
        &self,
        conn: &Connection,
        code: ErrorCode,
        message: impl Into<String>,
        reference: Option<Ref>,
    ) {
        self.reply(conn, &ServerFrame::error(code, message, reference));
    }

    /// Answers a frame that could not be decoded.
    pub fn reject(&self, conn: &Connection, error: DecodeError) {
        self.metrics.message("invalid");
        self.send_error(conn, error.code, error.message, error.reference);
    }

    /// Handles one decoded `/ws` request; the reply (or error) is queued on the connection.
    pub async fn handle(&self, conn: &Arc<Connection>, frame: ClientFrame) {
        let started = Instant::now();
        self.metrics.message(frame.body.type_name());
        let reference = frame.reference;
        let result = match frame.body {
            ClientBody::Auth { .. } => Err(RequestError::new(ErrorCode::BadRequest, "already authenticated")),
            ClientBody::Join {
                room,
                since,
                presence,
            } => {
                self.join(conn, &room, since.as_ref(), presence, reference.clone())
                    .await
            }
            ClientBody::Leave { room } => self.leave(conn, &room).await.map(|()| {
                self.reply(
                    conn,
                    &ServerFrame::Left {
                        reference: reference.clone(),
                        room,
                    },
                );
            }),
            ClientBody::Publish { room, data, id } => {
                if conn.in_room(&room) {
                    self.publish(&room, Some(conn.user.clone()), data, id)
                        .await
                        .map(|outcome| {
                            self.reply(
                                conn,
                                &ServerFrame::Ack {
                                    reference: reference.clone(),
                                    offset: Some(outcome.offset),
                                    seq: None,
                                    duplicate: outcome.duplicate,
                                },
                            );
                        })
                } else {
                    Err(RequestError::new(
                        ErrorCode::Forbidden,
                        format!("join room {room} before publishing to it"),
                    ))
                }
            }
            ClientBody::Direct { to, data, id } => self
                .direct(&to, Some(conn.user.clone()), data, id)
                .await
                .map(|outcome| {
                    self.reply(
                        conn,
                        &ServerFrame::Ack {
                            reference: reference.clone(),
                            offset: None,
                            seq: Some(outcome.seq),
                            duplicate: outcome.duplicate,
                        },
                    );
                }),
            ClientBody::Presence { room } => self
                .backends
                .presence
                .list(&room)
                .await
                .map_err(Into::into)
                .map(|users| {
                    self.reply(
                        conn,
                        &ServerFrame::Presence {
                            reference: reference.clone(),
                            room,
                            users,
                        },
                    );
                }),
            ClientBody::History { room, since, limit } => {
                let limit = limit
                    .map_or(100, |l| l as usize)
                    .min(self.settings.max_history_limit);
                self.backends
                    .broker
                    .history(&room, since, limit)
                    .await
                    .map_err(Into::into)
                    .map(|page| {
                        self.reply(
                            conn,
                            &ServerFrame::History {
                                reference: reference.clone(),
                                room,
                                offset: page.position.offset,
                                epoch: page.position.epoch,
                                publications: page.publications.iter().map(frames::history_item).collect(),
                            },
                        );
                    })
            }
            ClientBody::Refresh { .. } => Err(RequestError::new(
                ErrorCode::BadRequest,
                "token authentication is not enabled on this server",
            )),
            ClientBody::InboxAck { upto } => self
                .backends
                .broker
                .inbox_ack(&conn.user, upto)
                .await
                .map_err(Into::into)
                .map(|()| {
                    self.reply(
                        conn,
                        &ServerFrame::Ack {
                            reference: reference.clone(),
                            offset: None,
                            seq: None,
                            duplicate: false,
                        },
                    );
                }),
            ClientBody::Ping => {
                self.reply(
                    conn,
                    &ServerFrame::Pong {
                        reference: reference.clone(),
                    },
                );
                Ok(())
            }
        };
        if let Err(e) = result {
            self.send_error(conn, e.code, e.message, reference);
        }
        self.metrics
            .message_latency
            .observe(started.elapsed().as_secs_f64());
    }

    /// Queues an error frame in the seed's format.
    pub fn send_seed_error(&self, conn: &Connection, code: ErrorCode, message: impl Into<String>) {
        self.hub.send(
            conn,
            Utf8Bytes::from(
                SeedFrame::Error {
                    code,
                    message: Some(message.into()),
                }
                .encode(),
            ),
        );
    }

    /// Handles one text frame of the seed protocol: `{"message": ...}` is published to the room.
    pub async fn handle_seed(&self, conn: &Arc<Connection>, room: &RoomName, text: &str) {
        let started = Instant::now();
        self.metrics.message("chat");
        let seed_error = |code: ErrorCode, message: String| self.send_seed_error(conn, code, message);
        // The seed's consumer: json.loads failure → INVALID_MESSAGE_FORMAT; any other failure while
        // processing (not an object, no `message` key) → INTERNAL_ERROR with the exception text.
        match serde_json::from_str::<serde_json::Value>(text) {
            Err(e) => {
                self.metrics.message("invalid");
                seed_error(ErrorCode::InvalidMessageFormat, format!("invalid JSON: {e}"));
            }
            Ok(serde_json::Value::Object(mut map)) => match map.remove("message") {
                None => seed_error(ErrorCode::InternalError, "'message'".to_string()),
                Some(message) => match Payload::from_value(&message) {
                    Ok(data) => {
                        if let Err(e) = self.publish(room, Some(conn.user.clone()), data, None).await {
                            seed_error(e.code, e.message);
                        }
                    }
                    Err(e) => seed_error(ErrorCode::InternalError, e.to_string()),
                },
            },
            Ok(other) => {
                let kind = match other {
                    serde_json::Value::Array(_) => "list",
                    serde_json::Value::String(_) => "str",
                    serde_json::Value::Number(_) => "number",
                    serde_json::Value::Bool(_) => "bool",
                    _ => "NoneType",
                };
                seed_error(
                    ErrorCode::InternalError,
                    format!("a message must be a JSON object, not {kind}"),
                );
            }
        }
        self.metrics
            .message_latency
            .observe(started.elapsed().as_secs_f64());
    }

    async fn join(
        &self,
        conn: &Arc<Connection>,
        room: &RoomName,
        since: Option<&StreamPosition>,
        presence_events: bool,
        reference: Option<Ref>,
    ) -> Result<(), RequestError> {
        if conn.in_room(room) {
            return Err(RequestError::new(
                ErrorCode::BadRequest,
                format!("already joined room {room}"),
            ));
        }
        if conn.room_count() >= self.settings.max_rooms_per_connection {
            return Err(RequestError::new(
                ErrorCode::BadRequest,
                format!(
                    "a connection may join at most {} rooms",
                    self.settings.max_rooms_per_connection
                ),
            ));
        }
        self.hub.begin_join(room, conn, presence_events);
        let fetched = async {
            self.hub.sync_subscription(room).await?;
            match since {
                Some(since) => self.backends.broker.recover(room, since).await,
                None => self
                    .backends
                    .broker
                    .position(room)
                    .await
                    .map(|position| Recovery::NotRecovered { position }),
            }
        }
        .await;
        let recovery = match fetched {
            Ok(recovery) => recovery,
            Err(e) => {
                self.metrics.backend_errors.inc();
                self.hub.leave(room, conn);
                let _ = self.hub.sync_subscription(room).await;
                return Err(e.into());
            }
        };
        let (position, recovered, backlog) = match recovery {
            Recovery::Recovered {
                position,
                publications,
            } if self.replayable(&publications) => (position, true, publications),
            Recovery::Recovered { position, .. } | Recovery::NotRecovered { position } => {
                (position, false, Vec::new())
            }
        };
        let reply = (conn.kind == ConnKind::Native).then(|| {
            frames::text(&ServerFrame::Joined {
                reference,
                room: room.clone(),
                offset: position.offset,
                epoch: position.epoch.clone(),
                recovered,
            })
        });
        self.hub
            .complete_join(room, conn, reply, &backlog, position.offset);
        match self.backends.presence.add(room, &conn.user, conn.id).await {
            Ok(true) => {
                let diff = PresenceDiff {
                    room: room.clone(),
                    joins: vec![conn.user.clone()],
                    leaves: vec![],
                };
                if let Err(e) = self.backends.broker.presence_event(&diff).await {
                    tracing::warn!(conn = conn.id, error = %e, %room, "presence event not sent");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(conn = conn.id, error = %e, %room, "presence not recorded"),
        }
        Ok(())
    }

    /// Whether a recovery backlog is within the replay limits (all or nothing, rule 4).
    fn replayable(&self, publications: &[Arc<crate::backend::Publication>]) -> bool {
        publications.len() <= self.settings.recovery_max_publications
            && publications.iter().map(|p| p.data.get().len()).sum::<usize>()
                <= self.settings.recovery_max_bytes
    }

    async fn leave(&self, conn: &Arc<Connection>, room: &RoomName) -> Result<(), RequestError> {
        if !self.hub.leave(room, conn) {
            return Err(RequestError::new(
                ErrorCode::BadRequest,
                format!("not in room {room}"),
            ));
        }
        self.after_leave(conn, room).await;
        Ok(())
    }

    async fn after_leave(&self, conn: &Connection, room: &RoomName) {
        if let Err(e) = self.hub.sync_subscription(room).await {
            tracing::warn!(conn = conn.id, error = %e, %room, "unsubscribe failed");
        }
        match self.backends.presence.remove(room, &conn.user, conn.id).await {
            Ok(true) => {
                let diff = PresenceDiff {
                    room: room.clone(),
                    joins: vec![],
                    leaves: vec![conn.user.clone()],
                };
                if let Err(e) = self.backends.broker.presence_event(&diff).await {
                    tracing::warn!(conn = conn.id, error = %e, %room, "presence event not sent");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(conn = conn.id, error = %e, %room, "presence not removed"),
        }
    }

    /// Releases everything a connection holds: rooms, presence, subscriptions, counters, and marks
    /// its session `disconnected` when it was the session's last connection on any node.
    pub async fn close(&self, conn: &Arc<Connection>) {
        let (rooms, _) = self.hub.unregister(conn);
        for room in &rooms {
            self.after_leave(conn, room).await;
        }
        if let Err(e) = self.backends.sessions.connection_closed(&conn.session_id).await {
            tracing::warn!(conn = conn.id, error = %e, "session status not updated");
        }
        self.metrics.active_connections.dec();
        if self.hub.connection_count() == 0 {
            self.emptied.notify_waiters();
        }
    }

    /// Publishes to a room (from a client, or from the HTTP API with `from: None`).
    pub async fn publish(
        &self,
        room: &RoomName,
        from: Option<UserId>,
        data: Payload,
        id: Option<String>,
    ) -> Result<PublishOutcome, RequestError> {
        self.backends
            .broker
            .publish(room, NewPublication { from, data, id })
            .await
            .map_err(|e| {
                self.metrics.backend_errors.inc();
                e.into()
            })
    }

    /// Sends a direct message to every connection of `to`, keeping it in the inbox until acked.
    pub async fn direct(
        &self,
        to: &UserId,
        from: Option<UserId>,
        data: Payload,
        id: Option<String>,
    ) -> Result<DirectOutcome, RequestError> {
        self.backends
            .broker
            .send_direct(to, NewDirect { from, data, id })
            .await
            .map_err(Into::into)
    }

    /// Sends a `system` frame to every connection on every node.
    pub async fn broadcast(&self, data: Payload) -> Result<(), RequestError> {
        self.backends
            .broker
            .broadcast(SystemMessage { data, ts: unix_ms() })
            .await
            .map_err(Into::into)
    }

    /// Closes a user's or a session's connections on every node.
    pub async fn disconnect(&self, target: &DisconnectTarget) -> Result<(), RequestError> {
        self.backends.broker.disconnect(target).await.map_err(Into::into)
    }

    /// Closes every connection at once (discarding what is queued), e.g. when the drain timeout
    /// has passed.
    pub fn abort_all(&self, reason: CloseReason) {
        for conn in self.hub.connections() {
            conn.queue.abort(reason.clone());
        }
    }

    /// Closes connections that are idle, stuck behind expired queued messages, and pings the rest
    /// when due. One shared pass for all connections instead of a timer each.
    pub fn sweep(&self) {
        let now = self.clock.now_ms();
        for conn in self.hub.connections() {
            if conn.queue.check_expiry(now) {
                self.metrics.slow_consumers.inc();
                continue;
            }
            if conn.write_stuck(now, self.settings.write_timeout_ms) {
                conn.queue.abort_slow("slow consumer: write timed out");
                self.metrics.slow_consumers.inc();
                continue;
            }
            if now.saturating_sub(conn.last_seen_ms()) > self.settings.idle_timeout_ms {
                conn.queue
                    .close(CloseReason::new(CloseCode::GoingAway, "idle timeout"));
            } else if conn.ping_due(now, self.settings.ping_interval_ms) {
                let _ = conn.queue.push(Outbound::Ping, now);
            }
        }
    }

    /// How long a connection's write waits after its first queued frame, now.
    pub fn write_delay(&self) -> Duration {
        if self.busy.load(Ordering::Relaxed) {
            self.settings.write_delay.max(self.settings.busy_write_delay)
        } else {
            self.settings.write_delay
        }
    }

    /// Samples the runtime's worker busy time every 100 ms and, while the workers are busy (90 %
    /// of their time, until it falls below 75 %), makes writes wait `busy_write_delay` so that the
    /// frames of a burst share one send. A send costs several microseconds of system time whatever
    /// it carries, so a saturated node that writes every frame as it comes spends its CPU on sends
    /// and falls behind; an idle or moderately loaded node keeps writing at once (no added latency).
    /// Returns at once when `busy_write_delay` is 0.
    pub async fn run_load_monitor(self: Arc<Self>, stop: CancellationToken) {
        if self.settings.busy_write_delay.is_zero() {
            return;
        }
        let metrics = tokio::runtime::Handle::current().metrics();
        let busy_total = || -> Duration {
            (0..metrics.num_workers())
                .map(|worker| metrics.worker_total_busy_duration(worker))
                .sum()
        };
        let mut tick = tokio::time::interval(LOAD_SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut last_at, mut last_busy) = (std::time::Instant::now(), busy_total());
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (now, busy) = (std::time::Instant::now(), busy_total());
            let capacity = now.duration_since(last_at).as_secs_f64() * metrics.num_workers() as f64;
            if capacity > 0.0 {
                let fraction = busy.saturating_sub(last_busy).as_secs_f64() / capacity;
                let was = self.busy.load(Ordering::Relaxed);
                let is = next_busy(was, fraction);
                if is != was {
                    self.busy.store(is, Ordering::Relaxed);
                    self.metrics.write_coalescing.set(i64::from(is));
                    tracing::debug!(busy = is, fraction, "write coalescing changed");
                }
            }
            (last_at, last_busy) = (now, busy);
        }
    }

    /// Runs [`Node::sweep`] every second until `stop` fires.
    pub async fn run_sweeper(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.sweep(),
            }
        }
    }

    /// Drains the node: stops taking connections (the transport checks [`Node::is_draining`]), tells
    /// connections in paced, jittered batches to reconnect (`reconnect` frame, close 1012), and
    /// returns when all are gone or the drain timeout has passed. Returns the connections left.
    pub async fn drain(&self) -> usize {
        self.mark_draining();
        let settings = self.settings.drain;
        let deadline = tokio::time::Instant::now() + settings.timeout;
        tracing::info!(
            connections = self.hub.connection_count(),
            timeout_s = settings.timeout.as_secs_f64(),
            "draining"
        );
        'batches: loop {
            let waiting: Vec<_> = self
                .hub
                .connections()
                .into_iter()
                .filter(|c| !c.queue.is_closing())
                .collect();
            if waiting.is_empty() {
                break;
            }
            for batch in waiting.chunks(settings.batch_size.max(1)) {
                for conn in batch {
                    let after_ms = rand::rng().random_range(0..=settings.reconnect_jitter_ms);
                    if conn.kind == ConnKind::Native {
                        self.hub.send(
                            conn,
                            frames::text(&ServerFrame::Reconnect {
                                after_ms,
                                reason: "draining".into(),
                            }),
                        );
                    }
                    conn.queue
                        .close(CloseReason::new(CloseCode::ServiceRestart, "draining"));
                }
                let pause = settings
                    .batch_interval
                    .mul_f64(rand::rng().random_range(0.5..1.5));
                if tokio::time::timeout_at(deadline, tokio::time::sleep(pause))
                    .await
                    .is_err()
                {
                    break 'batches;
                }
            }
        }
        loop {
            let notified = self.emptied.notified();
            if self.hub.connection_count() == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        let left = self.hub.connection_count();
        tracing::info!(left, "drain finished");
        left
    }
}

/// The seed endpoint's room: `chat_{room_name}`.
pub fn seed_room(room_name: &str) -> Result<RoomName, RequestError> {
    RoomName::parse(&format!("chat_{room_name}"))
        .map_err(|e| RequestError::new(ErrorCode::BadRequest, format!("invalid room name: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendSettings;
    use crate::backend::memory::MemoryBackend;

    #[tokio::test]
    async fn writes_wait_the_busy_delay_only_while_busy() {
        let settings = NodeSettings {
            write_delay: Duration::from_millis(5),
            busy_write_delay: Duration::from_millis(50),
            ..NodeSettings::default()
        };
        let backends = MemoryBackend::backends(BackendSettings::default());
        let node = Node::new(settings, backends, Arc::new(Metrics::new()), Clock::new());
        assert_eq!(node.write_delay(), Duration::from_millis(5));
        node.busy.store(true, Ordering::Relaxed);
        assert_eq!(node.write_delay(), Duration::from_millis(50));
    }

    #[test]
    fn coalescing_starts_at_90_percent_busy_and_stops_below_75() {
        assert!(!next_busy(false, 0.0));
        assert!(!next_busy(false, 0.89));
        assert!(next_busy(false, 0.90));
        assert!(next_busy(true, 0.80), "between the two lines the mode stays");
        assert!(!next_busy(false, 0.80), "between the two lines the mode stays");
        assert!(next_busy(true, 0.75));
        assert!(!next_busy(true, 0.74));
    }
}
