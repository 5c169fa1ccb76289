//! Redis key and channel names. All keys of one room share the hash tag `{<room>}` (room names
//! cannot contain braces), all keys of one user share `{u:<user>}`, so each Lua script touches one
//! cluster slot. Sessions keep the seed's exact name, `session:<id>`, under the configured prefix.

use switchyard_proto::{RoomName, UserId};

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    pub fn session(&self, id: &str) -> String {
        format!("{}session:{id}", self.prefix)
    }

    /// Connections of a session on all nodes. The hash tag is the session key itself, so both
    /// share a Cluster slot.
    pub fn session_connections(&self, id: &str) -> String {
        format!("{{{}}}:conns", self.session(id))
    }

    /// Hash `{top, epoch}` of a room's stream.
    pub fn room_meta(&self, room: &RoomName) -> String {
        format!("{}sy:{{{room}}}:meta", self.prefix)
    }

    /// Stream of a room's publications; entry ids are `<offset>-0`.
    pub fn room_history(&self, room: &RoomName) -> String {
        format!("{}sy:{{{room}}}:hist", self.prefix)
    }

    /// Idempotency key of one publish id.
    pub fn room_dedup(&self, room: &RoomName, id: &str) -> String {
        format!("{}sy:{{{room}}}:dd:{id}", self.prefix)
    }

    /// Sorted set of present connections (`user\x1fnode\x1fconn` scored by expiry ms).
    pub fn presence_conns(&self, room: &RoomName) -> String {
        format!("{}sy:{{{room}}}:pc", self.prefix)
    }

    /// Hash user → number of present connections.
    pub fn presence_users(&self, room: &RoomName) -> String {
        format!("{}sy:{{{room}}}:pu", self.prefix)
    }

    /// Pub/sub channel of a room (publications and presence events).
    pub fn room_channel(&self, room: &RoomName) -> String {
        format!("{}sy:{{{room}}}:ch", self.prefix)
    }

    /// The room a channel name belongs to.
    pub fn room_of_channel(&self, channel: &str) -> Option<RoomName> {
        let rest = channel.strip_prefix(&self.prefix)?.strip_prefix("sy:{")?;
        let name = rest.strip_suffix("}:ch")?;
        RoomName::parse(name).ok()
    }

    pub fn inbox(&self, user: &UserId) -> String {
        format!("{}sy:{{u:{user}}}:inbox", self.prefix)
    }

    pub fn inbox_seq(&self, user: &UserId) -> String {
        format!("{}sy:{{u:{user}}}:seq", self.prefix)
    }

    pub fn inbox_dedup(&self, user: &UserId, id: &str) -> String {
        format!("{}sy:{{u:{user}}}:dd:{id}", self.prefix)
    }

    /// The node bus: direct messages, broadcasts and disconnect commands for every node.
    pub fn bus(&self) -> String {
        format!("{}sy:bus", self.prefix)
    }
}

/// The Redis Cluster hash slot of a key: CRC16 (XMODEM) of its hash tag, modulo 16384.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let close = bytes[open + 1..].iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &bytes[open + 1..open + 1 + close])
        })
        .unwrap_or(bytes);
    let mut crc: u16 = 0;
    for byte in tagged {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("123456789"), 0x31C3, "the CRC16-XMODEM check value");
    }

    #[test]
    fn room_keys_share_a_hash_tag_and_channels_parse_back() {
        let keys = Keys::new("app:");
        let room = RoomName::parse("chat_lobby").unwrap();
        assert_eq!(keys.room_meta(&room), "app:sy:{chat_lobby}:meta");
        assert_eq!(keys.session("abc"), "app:session:abc");
        assert_eq!(keys.room_of_channel(&keys.room_channel(&room)), Some(room));
        assert_eq!(keys.room_of_channel("app:sy:bus"), None);
    }
}
