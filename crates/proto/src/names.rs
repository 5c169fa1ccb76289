//! Validated names: rooms and users.
//!
//! Room grammar: 1 to 255 bytes, each one of `A-Z a-z 0-9 _ - . : @ =`. The set keeps names safe in
//! URL paths (`/api/rooms/{room}/history`), Redis keys and log lines without escaping.
//! User ids: 1 to 255 bytes of UTF-8 without control characters.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest room name or user id, in bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes long; the limit is {MAX_NAME_BYTES}")]
    TooLong { what: &'static str, len: usize },
    #[error("{what} contains {ch:?}; allowed are A-Z a-z 0-9 and _ - . : @ =")]
    BadRoomChar { what: &'static str, ch: char },
    #[error("{what} contains a control character")]
    ControlChar { what: &'static str },
}

fn is_room_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@' | '=')
}

/// A room name that follows the grammar. Cheap to clone (shared).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

impl RoomName {
    /// Validates `name` against the room grammar.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        const WHAT: &str = "room name";
        if name.is_empty() {
            return Err(NameError::Empty { what: WHAT });
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(NameError::TooLong {
                what: WHAT,
                len: name.len(),
            });
        }
        if let Some(ch) = name.chars().find(|c| !is_room_char(*c)) {
            return Err(NameError::BadRoomChar { what: WHAT, ch });
        }
        Ok(RoomName(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for RoomName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RoomName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        RoomName::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A user id: the session's `user_id` (or later a token's `sub`). Cheap to clone (shared).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

impl UserId {
    pub fn parse(id: &str) -> Result<Self, NameError> {
        const WHAT: &str = "user id";
        if id.is_empty() {
            return Err(NameError::Empty { what: WHAT });
        }
        if id.len() > MAX_NAME_BYTES {
            return Err(NameError::TooLong {
                what: WHAT,
                len: id.len(),
            });
        }
        if id.chars().any(char::is_control) {
            return Err(NameError::ControlChar { what: WHAT });
        }
        Ok(UserId(Arc::from(id)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for UserId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        UserId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_grammar() {
        assert!(RoomName::parse("chat_lobby").is_ok());
        assert!(RoomName::parse("a.b:c@d=e-f").is_ok());
        assert!(RoomName::parse(&"x".repeat(255)).is_ok());
        assert!(matches!(
            RoomName::parse(&"x".repeat(256)),
            Err(NameError::TooLong { len: 256, .. })
        ));
        assert!(matches!(RoomName::parse(""), Err(NameError::Empty { .. })));
        assert!(matches!(
            RoomName::parse("a b"),
            Err(NameError::BadRoomChar { ch: ' ', .. })
        ));
        assert!(matches!(
            RoomName::parse("a/b"),
            Err(NameError::BadRoomChar { ch: '/', .. })
        ));
        assert!(matches!(RoomName::parse("é"), Err(NameError::BadRoomChar { .. })));
    }

    #[test]
    fn user_ids() {
        assert!(UserId::parse("alice").is_ok());
        assert!(UserId::parse("Zoë 42").is_ok());
        assert!(UserId::parse("a\nb").is_err());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse(&"u".repeat(256)).is_err());
    }
}
