//! Encoding of shared frames: each is encoded once per node into `Utf8Bytes` and then shared by all
//! local recipients of the same protocol.

use std::sync::Arc;

use switchyard_proto::server::seed::SeedFrame;
use switchyard_proto::{HistoryItem, ServerFrame};
use tungstenite::Utf8Bytes;

use crate::backend::{DirectMessage, PresenceDiff, Publication, SystemMessage};

pub fn text(frame: &ServerFrame) -> Utf8Bytes {
    Utf8Bytes::from(frame.encode())
}

pub fn native_publication(p: &Publication) -> Utf8Bytes {
    text(&message(p))
}

/// The `/ws` frame of a publication.
pub fn message(p: &Publication) -> ServerFrame {
    ServerFrame::Message {
        room: p.room.clone(),
        offset: p.offset,
        from: p.from.clone(),
        data: p.data.clone(),
        ts: p.ts,
        id: p.id.clone(),
    }
}

/// The seed's group message: `{"type":"message","message":<data>,"user_id":<from>}`.
pub fn seed_publication(p: &Publication) -> Utf8Bytes {
    Utf8Bytes::from(
        SeedFrame::Message {
            message: p.data.clone(),
            user_id: p.from.as_ref().map(|u| u.to_string()),
        }
        .encode(),
    )
}

pub fn direct(m: &DirectMessage) -> Utf8Bytes {
    text(&ServerFrame::Direct {
        from: m.from.clone(),
        data: m.data.clone(),
        ts: m.ts,
        seq: m.seq,
        id: m.id.clone(),
    })
}

pub fn system(m: &SystemMessage) -> Utf8Bytes {
    text(&ServerFrame::System {
        data: m.data.clone(),
        ts: m.ts,
    })
}

pub fn presence(d: &PresenceDiff) -> Utf8Bytes {
    text(&ServerFrame::PresenceDiff {
        room: d.room.clone(),
        joins: d.joins.clone(),
        leaves: d.leaves.clone(),
    })
}

pub fn history_item(p: &Arc<Publication>) -> HistoryItem {
    HistoryItem {
        offset: p.offset,
        from: p.from.clone(),
        data: p.data.clone(),
        ts: p.ts,
        id: p.id.clone(),
    }
}
