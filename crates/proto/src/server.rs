//! Frames the server sends on `/ws`, and the seed-compatible frames of `/ws/chat/{session}/{room}/`.

use serde::{Deserialize, Serialize};

use crate::codes::ErrorCode;
use crate::names::{RoomName, UserId};
use crate::payload::{Payload, Ref};

/// A position in a room's stream: the last offset seen and the epoch it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamPosition {
    pub offset: u64,
    pub epoch: String,
}

/// One user present in a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    pub user_id: UserId,
    /// How many connections of this user are in the room.
    pub connections: u32,
}

/// One publication in a `history` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryItem {
    pub offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<UserId>,
    pub data: Payload,
    pub ts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Frames of the `/ws` protocol from server to client. `ts` values are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        /// The `ref` of the `auth` frame, when authenticated by frame.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
        session_id: String,
        user_id: UserId,
        node: String,
        /// How many inbox messages follow as `direct` frames.
        inbox: u32,
    },
    /// Reply to `join`. With `recovered: true`, exactly the missed publications follow as `message`
    /// frames (offsets `since.offset + 1 ..= offset`), then live ones.
    Joined {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
        room: RoomName,
        offset: u64,
        epoch: String,
        recovered: bool,
    },
    Left {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
        room: RoomName,
    },
    Message {
        room: RoomName,
        offset: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<UserId>,
        data: Payload,
        ts: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    Direct {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<UserId>,
        data: Payload,
        ts: u64,
        /// Per-user inbox sequence; acknowledge with `inbox_ack {upto: seq}`.
        seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    PresenceDiff {
        room: RoomName,
        #[serde(default)]
        joins: Vec<UserId>,
        #[serde(default)]
        leaves: Vec<UserId>,
    },
    Presence {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
        room: RoomName,
        users: Vec<PresenceEntry>,
    },
    History {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
        room: RoomName,
        /// The room's current (latest) offset and epoch.
        offset: u64,
        epoch: String,
        publications: Vec<HistoryItem>,
    },
    System {
        data: Payload,
        ts: u64,
    },
    /// Reply to `publish` (with `offset`), `direct` (with `seq`) and `inbox_ack` (neither).
    Ack {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        /// True when this was a repeat of an idempotent publish: nothing new was stored.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        duplicate: bool,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
    /// The server is going away; reconnect after `after_ms` and resume.
    Reconnect {
        after_ms: u64,
        reason: String,
    },
    Pong {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
}

impl ServerFrame {
    /// Encodes the frame as JSON text.
    pub fn encode(&self) -> String {
        // Serialising these types cannot fail: all map keys are strings and payloads are valid JSON.
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"type":"error","code":"INTERNAL_ERROR","message":"encode failed: {e}"}}"#)
        })
    }

    /// Decodes a server frame (used by clients).
    pub fn decode(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    pub fn error(code: ErrorCode, message: impl Into<String>, reference: Option<Ref>) -> Self {
        ServerFrame::Error {
            code,
            message: message.into(),
            reference,
        }
    }
}

/// Frames of the seed-compatible endpoint `/ws/chat/{session_id}/{room_name}/`, in the exact shapes
/// the seed's Django `ChatConsumer` sends.
pub mod seed {
    use serde::{Deserialize, Serialize};

    use crate::codes::ErrorCode;
    use crate::payload::Payload;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum SeedFrame {
        /// Sent once after the connection is accepted.
        Welcome {
            session_id: String,
            user_id: String,
            room: String,
            message: String,
        },
        /// A message broadcast to the room (`chat_{room}`); `user_id` is the sender.
        Message {
            message: Payload,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            user_id: Option<String>,
        },
        Error {
            code: ErrorCode,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            message: Option<String>,
        },
    }

    impl SeedFrame {
        pub fn encode(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|e| {
                format!(r#"{{"type":"error","code":"INTERNAL_ERROR","message":"encode failed: {e}"}}"#)
            })
        }
    }
}
