//! Switchyard's wire protocol: the frames clients and servers exchange, the names they use (rooms,
//! users), and the error and close codes. This crate does no I/O and knows nothing of tokio, axum or
//! redis; it is the only vocabulary that crosses the wire. `docs/protocol.md` documents the same
//! shapes for people.

pub mod client;
pub mod codes;
pub mod names;
pub mod payload;
pub mod server;

pub use client::{ClientBody, ClientFrame, DecodeError, decode_client_frame};
pub use codes::{CloseCode, ErrorCode};
pub use names::{NameError, RoomName, UserId};
pub use payload::{Payload, Ref};
pub use server::{HistoryItem, PresenceEntry, ServerFrame, StreamPosition};

/// WebSocket subprotocol of the JSON encoding.
pub const SUBPROTOCOL_JSON: &str = "switchyard.v1.json";
