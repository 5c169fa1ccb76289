//! Frames a client sends, and their decoder.
//!
//! Decoding is one borrowed pass into an envelope of optional fields, then per-type validation. This
//! is what lets the server tell the two error classes apart: text that is not JSON is
//! `INVALID_MESSAGE_FORMAT`; JSON that is not a valid request (not an object, unknown `type`, missing
//! or invalid field) is `BAD_REQUEST`. Unknown extra fields are ignored, for forward compatibility.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::codes::ErrorCode;
use crate::names::{RoomName, UserId};
use crate::payload::{Payload, Ref};
use crate::server::StreamPosition;

/// Longest idempotency `id`, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// One request from a client: an optional `ref`, echoed in the reply, and the body.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    pub reference: Option<Ref>,
    pub body: ClientBody,
}

/// The request types of the `/ws` protocol.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientBody {
    /// Authenticate with a session id (alternative to the `?session=` query parameter).
    Auth {
        session: String,
    },
    /// Join a room; with `since`, recover what was missed after that position; with `presence`,
    /// also receive the room's `presence_diff` events (off by default: in a room of N users they
    /// cost N frames per join).
    Join {
        room: RoomName,
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<StreamPosition>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        presence: bool,
    },
    Leave {
        room: RoomName,
    },
    /// Publish to a joined room. `id` makes the publish idempotent within the dedup window.
    Publish {
        room: RoomName,
        data: Payload,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Send a direct message to every connection of a user (kept in the inbox while offline).
    Direct {
        to: UserId,
        data: Payload,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    Presence {
        room: RoomName,
    },
    /// Read a room's history: publications with an offset greater than `since` (default 0).
    History {
        room: RoomName,
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    Refresh {
        token: String,
    },
    /// Acknowledge inbox messages up to and including `upto` (a `direct` frame's `seq`).
    InboxAck {
        upto: u64,
    },
    Ping,
}

impl ClientBody {
    /// The `type` on the wire.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientBody::Auth { .. } => "auth",
            ClientBody::Join { .. } => "join",
            ClientBody::Leave { .. } => "leave",
            ClientBody::Publish { .. } => "publish",
            ClientBody::Direct { .. } => "direct",
            ClientBody::Presence { .. } => "presence",
            ClientBody::History { .. } => "history",
            ClientBody::Refresh { .. } => "refresh",
            ClientBody::InboxAck { .. } => "inbox_ack",
            ClientBody::Ping => "ping",
        }
    }
}

impl ClientFrame {
    pub fn new(body: ClientBody) -> Self {
        ClientFrame {
            reference: None,
            body,
        }
    }

    pub fn with_ref(reference: Ref, body: ClientBody) -> Self {
        ClientFrame {
            reference: Some(reference),
            body,
        }
    }

    /// Encodes the frame as JSON text.
    pub fn encode(&self) -> String {
        let mut value = serde_json::to_value(&self.body).unwrap_or_default();
        if let (Some(reference), Some(map)) = (&self.reference, value.as_object_mut()) {
            map.insert("ref".into(), serde_json::to_value(reference).unwrap_or_default());
        }
        value.to_string()
    }
}

/// Why a frame could not be decoded; becomes an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub code: ErrorCode,
    pub message: String,
    /// The frame's `ref`, when it could still be read.
    pub reference: Option<Ref>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(rename = "ref", borrow, default)]
    reference: Option<&'a RawValue>,
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    session: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default)]
    upto: Option<u64>,
    #[serde(default)]
    presence: Option<bool>,
}

fn bad(message: impl Into<String>, reference: &Option<Ref>) -> DecodeError {
    DecodeError {
        code: ErrorCode::BadRequest,
        message: message.into(),
        reference: reference.clone(),
    }
}

fn required<T>(field: Option<T>, name: &str, kind: &str, r: &Option<Ref>) -> Result<T, DecodeError> {
    field.ok_or_else(|| bad(format!("missing field `{name}` for `{kind}`"), r))
}

fn room(field: Option<Cow<'_, str>>, kind: &str, r: &Option<Ref>) -> Result<RoomName, DecodeError> {
    let name = required(field, "room", kind, r)?;
    RoomName::parse(&name).map_err(|e| bad(e.to_string(), r))
}

fn idempotency_id(field: Option<Cow<'_, str>>, r: &Option<Ref>) -> Result<Option<String>, DecodeError> {
    match field {
        None => Ok(None),
        Some(id) if id.is_empty() => Err(bad("id must not be empty", r)),
        Some(id) if id.len() > MAX_ID_BYTES => Err(bad(
            format!("id is {} bytes long; the limit is {MAX_ID_BYTES}", id.len()),
            r,
        )),
        Some(id) => Ok(Some(id.into_owned())),
    }
}

fn payload(field: Option<&RawValue>, kind: &str, r: &Option<Ref>) -> Result<Payload, DecodeError> {
    let raw = required(field, "data", kind, r)?;
    Ok(Payload::from_raw(raw.to_owned()))
}

/// Reads just the `ref` of a frame whose other fields are invalid, so the error can still be matched
/// to its request.
fn salvage_ref(text: &str) -> Option<Ref> {
    if !text.trim_start().starts_with('{') {
        return None;
    }
    #[derive(Deserialize)]
    struct OnlyRef<'a> {
        #[serde(rename = "ref", borrow, default)]
        reference: Option<&'a RawValue>,
    }
    let only: OnlyRef<'_> = serde_json::from_str(text).ok()?;
    Ref::from_raw(only.reference?).ok()
}

/// Decodes one text frame of the `/ws` JSON protocol.
pub fn decode_client_frame(text: &str) -> Result<ClientFrame, DecodeError> {
    let env: Envelope<'_> = serde_json::from_str(text).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => DecodeError {
                code: ErrorCode::InvalidMessageFormat,
                message: format!("invalid JSON: {e}"),
                reference: None,
            },
            Category::Data => DecodeError {
                code: ErrorCode::BadRequest,
                message: if text.trim_start().starts_with('{') {
                    format!("invalid frame: {e}")
                } else {
                    "a frame must be a JSON object".to_string()
                },
                reference: salvage_ref(text),
            },
        }
    })?;
    let r = match env.reference {
        None => None,
        Some(raw) => Some(Ref::from_raw(raw).map_err(|m| bad(m, &None))?),
    };
    let kind = env.kind.ok_or_else(|| bad("missing field `type`", &r))?;
    let body = match &*kind {
        "auth" => ClientBody::Auth {
            session: required(env.session, "session", &kind, &r)?.into_owned(),
        },
        "join" => {
            let since = match env.since {
                None => None,
                Some(raw) => Some(serde_json::from_str::<StreamPosition>(raw.get()).map_err(|e| {
                    bad(
                        format!("since must be {{\"offset\": <integer>, \"epoch\": <string>}}: {e}"),
                        &r,
                    )
                })?),
            };
            ClientBody::Join {
                room: room(env.room, &kind, &r)?,
                since,
                presence: env.presence.unwrap_or(false),
            }
        }
        "leave" => ClientBody::Leave {
            room: room(env.room, &kind, &r)?,
        },
        "publish" => ClientBody::Publish {
            room: room(env.room, &kind, &r)?,
            data: payload(env.data, &kind, &r)?,
            id: idempotency_id(env.id, &r)?,
        },
        "direct" => {
            let to = required(env.to, "to", &kind, &r)?;
            ClientBody::Direct {
                to: UserId::parse(&to).map_err(|e| bad(e.to_string(), &r))?,
                data: payload(env.data, &kind, &r)?,
                id: idempotency_id(env.id, &r)?,
            }
        }
        "presence" => ClientBody::Presence {
            room: room(env.room, &kind, &r)?,
        },
        "history" => {
            let since = match env.since {
                None => None,
                Some(raw) => Some(
                    serde_json::from_str::<u64>(raw.get())
                        .map_err(|_| bad("since must be an offset (unsigned integer) for `history`", &r))?,
                ),
            };
            let limit = match env.limit {
                None => None,
                Some(0) => return Err(bad("limit must be at least 1", &r)),
                Some(n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
            };
            ClientBody::History {
                room: room(env.room, &kind, &r)?,
                since,
                limit,
            }
        }
        "refresh" => ClientBody::Refresh {
            token: required(env.token, "token", &kind, &r)?.into_owned(),
        },
        "inbox_ack" => ClientBody::InboxAck {
            upto: required(env.upto, "upto", &kind, &r)?,
        },
        "ping" => ClientBody::Ping,
        other => {
            let mut shown: String = other.chars().take(64).collect();
            if shown.len() < other.len() {
                shown.push('…');
            }
            return Err(bad(format!("unknown type `{shown}`"), &r));
        }
    };
    Ok(ClientFrame { reference: r, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_errors() {
        let e = decode_client_frame("{not json").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidMessageFormat);
        let e = decode_client_frame("[1,2]").unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = decode_client_frame(r#"{"type":"nope","ref":7}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert_eq!(e.reference, Some(Ref::Num(7)));
        let e = decode_client_frame(r#"{"type":"join","ref":"a"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("room"), "{}", e.message);
        let e = decode_client_frame(r#"{"type":"join","room":"a b"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = decode_client_frame(r#"{"type":"publish","room":"a"}"#).unwrap_err();
        assert!(e.message.contains("data"));
        let e = decode_client_frame(r#"{"type":"publish","room":"a","data":null}"#).unwrap_err();
        assert!(e.message.contains("data"));
        let e = decode_client_frame(r#"{"type":"history","room":"a","limit":-1,"ref":9}"#).unwrap_err();
        assert_eq!(
            (e.code, e.reference),
            (ErrorCode::BadRequest, Some(Ref::Num(9))),
            "the ref survives a type error"
        );
    }

    #[test]
    fn decodes_publish_with_escapes() {
        let f = decode_client_frame(
            r#"{"type":"publish","room":"r\u0031","data":{"a":[1,"x"]},"id":"k","ref":3}"#,
        )
        .unwrap();
        assert_eq!(f.reference, Some(Ref::Num(3)));
        match f.body {
            ClientBody::Publish { room, data, id } => {
                assert_eq!(room.as_str(), "r1");
                assert_eq!(data.get(), r#"{"a":[1,"x"]}"#);
                assert_eq!(id.as_deref(), Some("k"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
