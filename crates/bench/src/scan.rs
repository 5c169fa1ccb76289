//! Byte scanning of server frames on the receive path: the frame type and a few integer fields are
//! found by searching the raw JSON text, never by decoding it. This relies on the server's encoding
//! (`{"type":"...", ...}` with `type` first, as `switchyard-proto` writes every frame) and on the
//! load generator's own payload keys being unique in the frame.
//!
//! The fan-out's server broadcasts (`system` frames) carry [`SENT_NS_KEY`] too, plus the run's id
//! under [`BROADCAST_RUN_KEY`] so that one run counts only its own broadcasts; [`run_marker`] builds
//! the finder for that once per run, so that recognising a broadcast allocates nothing either.

use std::sync::LazyLock;

use memchr::memmem::Finder;

/// Key of the send timestamp inside a publication's or a broadcast's `data` (absolute
/// `CLOCK_MONOTONIC` nanoseconds, comparable between the load generator's processes).
pub const SENT_NS_KEY: &str = "sent_ns";
/// Key of the run id inside a fan-out broadcast's `data`.
pub const BROADCAST_RUN_KEY: &str = "bench_run";
/// Key of the broadcast's sequence number (1, 2, ...) inside a fan-out broadcast's `data`.
pub const BROADCAST_SEQ_KEY: &str = "broadcast";

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
    System,
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
        b"system" => FrameKind::System,
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

/// A finder for `"bench_run":"<run_id>"`, the mark of run `run_id`'s broadcasts (`run_id` must need
/// no JSON escaping, as the load generator's hex run ids do not).
pub fn run_marker(run_id: &str) -> Finder<'static> {
    Finder::new(format!(r#""{BROADCAST_RUN_KEY}":"{run_id}""#).as_bytes()).into_owned()
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

    #[test]
    fn recognises_this_runs_broadcasts() {
        // As the server sends `POST /api/broadcast {"data": ...}` (keys in serde_json's order).
        let data = serde_json::json!({ BROADCAST_RUN_KEY: "ab12", BROADCAST_SEQ_KEY: 2, SENT_NS_KEY: 99 });
        let frame = format!(r#"{{"type":"system","data":{data},"ts":1795771301859}}"#);
        let frame = frame.as_bytes();
        assert_eq!(frame_kind(frame), FrameKind::System);
        assert!(run_marker("ab12").find(frame).is_some());
        assert!(run_marker("ab1").find(frame).is_none());
        assert!(run_marker("ab123").find(frame).is_none());
        assert_eq!(sent_ns(frame), Some(99));
        let other = br#"{"type":"system","data":{"notice":"hi all"},"ts":1}"#;
        assert_eq!(frame_kind(other), FrameKind::System);
        assert!(run_marker("ab12").find(other).is_none());
    }
}
