//! The backend traits (DESIGN.md §2): the broker (offsets, history, delivery between nodes, inboxes),
//! the session store and the presence store, with the data types they exchange. `memory` implements
//! them for one node; the Redis crate implements them for many. Both pass the same conformance suite
//! (`crate::conformance`).

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use switchyard_proto::{Payload, PresenceEntry, RoomName, StreamPosition, UserId};

pub mod memory;

/// A failed backend call.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    /// The backend cannot be reached or did not answer in time; nothing was stored.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The recipient's inbox holds as many unacknowledged messages as allowed.
    #[error("the inbox of user {user} is full ({limit} unacknowledged messages)")]
    InboxFull { user: String, limit: usize },
    /// Stored data is not in the expected format.
    #[error("backend data is corrupt: {0}")]
    Corrupt(String),
}

pub type BackendResult<T> = Result<T, BackendError>;

/// One stored publication of a room.
#[derive(Debug, Clone, PartialEq)]
pub struct Publication {
    pub room: RoomName,
    pub offset: u64,
    pub epoch: Arc<str>,
    pub from: Option<UserId>,
    pub data: Payload,
    /// Unix ms when the broker stored it.
    pub ts: u64,
    pub id: Option<String>,
}

/// A publish request, before the broker assigns its offset.
#[derive(Debug, Clone)]
pub struct NewPublication {
    pub from: Option<UserId>,
    pub data: Payload,
    /// Idempotency key: a repeat within the dedup window returns the first offset.
    pub id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOutcome {
    pub offset: u64,
    pub epoch: String,
    /// The id was seen before: nothing new was stored or delivered.
    pub duplicate: bool,
}

/// The result of a recovery attempt (rule 4): all missed publications, or none.
#[derive(Debug, Clone, PartialEq)]
pub enum Recovery {
    /// `publications` are exactly those after the client's offset, in order, up to `position`.
    Recovered {
        position: StreamPosition,
        publications: Vec<Arc<Publication>>,
    },
    /// History cannot cover the gap (epoch changed or too old); `position` is the current one.
    NotRecovered { position: StreamPosition },
}

/// A page of a room's history.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    /// The room's current position.
    pub position: StreamPosition,
    /// Publications with offsets greater than the requested one, oldest first, at most the limit.
    pub publications: Vec<Arc<Publication>>,
}

/// A direct message held in a user's inbox.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectMessage {
    pub to: UserId,
    pub from: Option<UserId>,
    pub data: Payload,
    pub ts: u64,
    /// Per-user sequence number, +1 per message.
    pub seq: u64,
    pub id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewDirect {
    pub from: Option<UserId>,
    pub data: Payload,
    pub id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectOutcome {
    pub seq: u64,
    pub duplicate: bool,
}

/// A server broadcast to every connection.
#[derive(Debug, Clone, PartialEq)]
pub struct SystemMessage {
    pub data: Payload,
    pub ts: u64,
}

/// Whose connections a disconnect command closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectTarget {
    User(UserId),
    Session(String),
}

/// Users who appeared in or left a room (first connection in, last connection out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceDiff {
    pub room: RoomName,
    pub joins: Vec<UserId>,
    pub leaves: Vec<UserId>,
}

/// Where a broker delivers what reaches this node. Implemented by the hub. Calls for one room arrive
/// in offset order and must not block.
pub trait DeliverySink: Send + Sync {
    fn publication(&self, publication: Arc<Publication>);
    fn presence(&self, diff: &PresenceDiff);
    fn direct(&self, message: Arc<DirectMessage>);
    fn system(&self, message: Arc<SystemMessage>);
    fn disconnect(&self, target: &DisconnectTarget);
    /// The node lost publications of a room that history cannot give back (the broker was
    /// unreachable too long, or its data was lost): members are told `recovered: false` with the
    /// room's current position, so a gap is never silent.
    fn reset(&self, room: &RoomName, position: &StreamPosition);
}

/// The channel layer: assigns offsets, keeps history, carries messages between nodes.
#[async_trait]
pub trait Broker: Send + Sync {
    /// Sets where this node's deliveries go. Called once, before any other call.
    fn attach(&self, sink: Weak<dyn DeliverySink>);

    /// Starts delivering the room's publications and presence events to this node.
    async fn subscribe(&self, room: &RoomName) -> BackendResult<()>;
    /// Stops delivering the room to this node.
    async fn unsubscribe(&self, room: &RoomName) -> BackendResult<()>;

    /// Stores a publication (offset, history, dedup) and delivers it to subscribed nodes. Returns
    /// only after it is stored (rule 2).
    async fn publish(&self, room: &RoomName, publication: NewPublication) -> BackendResult<PublishOutcome>;
    /// The room's current position (offset 0 when nothing was published yet).
    async fn position(&self, room: &RoomName) -> BackendResult<StreamPosition>;
    /// Publications with offset greater than `after`, oldest first, at most `limit`; without
    /// `after`, the latest `limit` publications.
    async fn history(&self, room: &RoomName, after: Option<u64>, limit: usize) -> BackendResult<HistoryPage>;
    /// Everything after `since`, or nothing (rule 4).
    async fn recover(&self, room: &RoomName, since: &StreamPosition) -> BackendResult<Recovery>;

    /// Delivers a presence change to the room's subscribers on every node.
    async fn presence_event(&self, diff: &PresenceDiff) -> BackendResult<()>;
    /// Delivers a system message to every node.
    async fn broadcast(&self, message: SystemMessage) -> BackendResult<()>;
    /// Stores a direct message in the user's inbox and delivers it to every node.
    async fn send_direct(&self, to: &UserId, message: NewDirect) -> BackendResult<DirectOutcome>;
    /// The user's unacknowledged inbox, oldest first.
    async fn inbox(&self, user: &UserId) -> BackendResult<Vec<Arc<DirectMessage>>>;
    /// Removes inbox messages with `seq <= upto`.
    async fn inbox_ack(&self, user: &UserId, upto: u64) -> BackendResult<()>;
    /// Closes the target's connections on every node.
    async fn disconnect(&self, target: &DisconnectTarget) -> BackendResult<()>;
    /// Whether the broker is usable (for `/readyz`).
    async fn check(&self) -> BackendResult<()>;
}

/// A session status. Sessions that are `active` or `disconnected` can be resumed.
pub const STATUS_ACTIVE: &str = "active";
pub const STATUS_DISCONNECTED: &str = "disconnected";

/// A session in the seed's format: `session:{id}` → this JSON, with a TTL. Fields Switchyard does not
/// know are kept as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// A string or an integer (the seed's Django code accepts either).
    pub user_id: serde_json::Value,
    /// ISO 8601 in UTC without offset, as Python's `datetime.utcnow().isoformat()` writes it.
    pub created_at: String,
    #[serde(default)]
    pub preferences: serde_json::Value,
    pub status: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl SessionRecord {
    /// The user id as an identity: strings as they are, integers in decimal.
    pub fn user(&self) -> Option<UserId> {
        match &self.user_id {
            serde_json::Value::String(s) => UserId::parse(s).ok(),
            serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => UserId::parse(&n.to_string()).ok(),
            _ => None,
        }
    }

    /// Whether a connection may use this session.
    pub fn resumable(&self) -> bool {
        self.status == STATUS_ACTIVE || self.status == STATUS_DISCONNECTED
    }
}

/// A session with its id and remaining lifetime.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub id: String,
    pub record: SessionRecord,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// The seed's `SessionManager`, behind a trait.
#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Stores a new session under `id` with the full TTL.
    async fn create(&self, id: &str, record: &SessionRecord) -> BackendResult<Session>;
    /// Reads a session without extending it.
    async fn get(&self, id: &str) -> BackendResult<Option<Session>>;
    /// The seed's `validate_session`: a resumable session is marked `active` and its TTL extended;
    /// `None` when missing, expired or not resumable.
    async fn validate(&self, id: &str) -> BackendResult<Option<Session>>;
    /// Changes the status, keeping the TTL. False when the session does not exist.
    async fn set_status(&self, id: &str, status: &str) -> BackendResult<bool>;
    /// Removes the session. False when it did not exist.
    async fn delete(&self, id: &str) -> BackendResult<bool>;
    /// Counts a connection of the session, on whichever node.
    async fn connection_opened(&self, id: &str) -> BackendResult<()>;
    /// Uncounts a connection; when it was the session's last connection on any node, marks the
    /// session `disconnected` (keeping its TTL) and returns true.
    async fn connection_closed(&self, id: &str) -> BackendResult<bool>;
}

/// Who is in which room.
#[async_trait]
pub trait PresenceStore: Send + Sync {
    /// Records a connection of `user` in `room`; true when the user was not present before.
    async fn add(&self, room: &RoomName, user: &UserId, conn: u64) -> BackendResult<bool>;
    /// Removes the connection; true when it was the user's last one in the room.
    async fn remove(&self, room: &RoomName, user: &UserId, conn: u64) -> BackendResult<bool>;
    /// Users present in the room, sorted by user id.
    async fn list(&self, room: &RoomName) -> BackendResult<Vec<PresenceEntry>>;
}

/// The three backends a node runs on.
#[derive(Clone)]
pub struct Backends {
    pub broker: Arc<dyn Broker>,
    pub sessions: Arc<dyn SessionStore>,
    pub presence: Arc<dyn PresenceStore>,
}

/// Settings shared by backend implementations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSettings {
    /// Session TTL in seconds (the seed's 3600), extended on every validation.
    pub session_ttl_secs: u64,
    /// Publications kept per room.
    pub history_size: usize,
    /// How long publications are kept, in seconds.
    pub history_ttl_secs: u64,
    /// How long a publish or direct `id` is remembered, in seconds.
    pub dedup_window_secs: u64,
    /// How long an unacknowledged direct message is kept, in seconds.
    pub inbox_ttl_secs: u64,
    /// Most unacknowledged direct messages per user.
    pub inbox_max: usize,
}

impl Default for BackendSettings {
    fn default() -> Self {
        BackendSettings {
            session_ttl_secs: 3600,
            history_size: 5000,
            history_ttl_secs: 600,
            dedup_window_secs: 120,
            inbox_ttl_secs: 86_400,
            inbox_max: 1000,
        }
    }
}
