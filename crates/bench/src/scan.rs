//! Byte scanning of server frames on the receive path: the frame type and a few integer fields are
//! found by searching the raw JSON text, never by decoding it. This relies on the server's encoding
//! (`{"type":"...", ...}` with `type` first, as `switchyard-proto` writes every frame) and on the
//! load generator's own payload keys being unique in the frame.

use std::sync::LazyLock;

use memchr::memmem::Finder;

/// Key of the send timestamp inside a publication's `data` (ns since the bench process started).
pub const SENT_NS_KEY: &str = "sent_ns";

static OFFSET: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"offset\":"));
static SENT_NS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"sent_ns\":"));
static REF: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"ref\":"));

/// The kinds of server frame the load generator tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Welcome,
    Joined,
    Message,
    Ack,
    Error,
    Pong,
    Other,
}

/// The frame's `type`, from the prefix `{"type":"<name>"`.
pub fn frame_kind(frame: &[u8]) -> FrameKind {
    const PREFIX: &[u8] = b"{\"type\":\"";
    let Some(rest) = frame.strip_prefix(PREFIX) else {
        return FrameKind::Other;
    };
    let name_end = memchr::memchr(b'"', rest).unwrap_or(0);
    match &rest[..name_end] {
        b"message" => FrameKind::Message,
        b"ack" => FrameKind::Ack,
        b"joined" => FrameKind::Joined,
        b"welcome" => FrameKind::Welcome,
        b"error" => FrameKind::Error,
        b"pong" => FrameKind::Pong,
        _ => FrameKind::Other,
    }
}

/// The first `"offset":` integer in the frame (a `message`'s, `joined`'s or `ack`'s offset).
pub fn offset(frame: &[u8]) -> Option<u64> {
    integer_after(frame, &OFFSET)
}

/// The `"sent_ns":` integer the load generator put into a publication's data.
pub fn sent_ns(frame: &[u8]) -> Option<u64> {
    integer_after(frame, &SENT_NS)
}

/// Whether the frame carries a `ref` (a reply to a request rather than an unsolicited error).
pub fn has_ref(frame: &[u8]) -> bool {
    REF.find(frame).is_some()
}

/// The `"ref":` of a reply, when it is an unsigned integer (the load generator's refs always are).
pub fn reference(frame: &[u8]) -> Option<u64> {
    integer_after(frame, &REF)
}

fn integer_after(frame: &[u8], key: &Finder<'_>) -> Option<u64> {
    let start = key.find(frame)? + key.needle().len();
    let mut value: u64 = 0;
    let mut digits = 0;
    for &byte in frame[start..].iter().skip_while(|b| **b == b' ') {
        if !byte.is_ascii_digit() {
            break;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(byte - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_kind_offset_and_timestamp() {
        let frame = br#"{"type":"message","room":"r","offset":42,"from":"u","data":{"sent_ns":1234,"pad":"x"},"ts":9}"#;
        assert_eq!(frame_kind(frame), FrameKind::Message);
        assert_eq!(offset(frame), Some(42));
        assert_eq!(sent_ns(frame), Some(1234));
        let ack = br#"{"type":"ack","ref":7,"offset":3}"#;
        assert_eq!(frame_kind(ack), FrameKind::Ack);
        assert_eq!(offset(ack), Some(3));
        assert!(has_ref(ack));
        assert_eq!(frame_kind(br#"{"type":"presence_diff"}"#), FrameKind::Other);
        assert_eq!(frame_kind(b"[1]"), FrameKind::Other);
        assert_eq!(offset(br#"{"type":"ack"}"#), None);
        let pong = br#"{"type":"pong","ref":18446744073709551615}"#;
        assert_eq!(frame_kind(pong), FrameKind::Pong);
        assert_eq!(reference(pong), Some(u64::MAX));
        assert_eq!(reference(br#"{"type":"pong","ref":"a1"}"#), None);
    }
}
