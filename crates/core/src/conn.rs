//! The state of one client connection that others touch: identity, outbound queue, activity stamps,
//! joined rooms. The connection's own task (in the transport) owns the socket; everything else holds
//! an `Arc<Connection>` and talks to it only through its queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use switchyard_proto::{RoomName, UserId};

use crate::queue::{OutboundQueue, QueueLimits};

pub type ConnId = u64;

/// Which protocol the connection speaks; decides how shared frames are encoded for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// The `/ws` JSON protocol.
    Native,
    /// The seed-compatible `/ws/chat/{session}/{room}/` protocol.
    Seed,
}

pub struct Connection {
    pub id: ConnId,
    pub user: UserId,
    pub session_id: Arc<str>,
    pub kind: ConnKind,
    pub queue: OutboundQueue,
    /// Coarse ms of the last frame received from the client.
    last_seen_ms: AtomicU64,
    /// Coarse ms of the last keepalive ping sent.
    last_ping_ms: AtomicU64,
    /// Coarse ms when the write in progress started; 0 when not writing.
    write_started_ms: AtomicU64,
    rooms: Mutex<Vec<RoomName>>,
}

impl Connection {
    pub fn new(
        id: ConnId,
        user: UserId,
        session_id: Arc<str>,
        kind: ConnKind,
        limits: QueueLimits,
        now_ms: u64,
    ) -> Arc<Self> {
        Arc::new(Connection {
            id,
            user,
            session_id,
            kind,
            queue: OutboundQueue::new(limits),
            last_seen_ms: AtomicU64::new(now_ms),
            last_ping_ms: AtomicU64::new(now_ms),
            write_started_ms: AtomicU64::new(0),
            rooms: Mutex::new(Vec::new()),
        })
    }

    /// Records client activity (any frame, including pongs).
    pub fn touch(&self, now_ms: u64) {
        self.last_seen_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Marks the start of a write to the socket.
    pub fn write_started(&self, now_ms: u64) {
        self.write_started_ms.store(now_ms.max(1), Ordering::Relaxed);
    }

    pub fn write_finished(&self) {
        self.write_started_ms.store(0, Ordering::Relaxed);
    }

    /// Whether a write has been blocked for longer than `timeout_ms`.
    pub(crate) fn write_stuck(&self, now_ms: u64, timeout_ms: u64) -> bool {
        let started = self.write_started_ms.load(Ordering::Relaxed);
        started != 0 && now_ms.saturating_sub(started) > timeout_ms
    }

    pub fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn ping_due(&self, now_ms: u64, interval_ms: u64) -> bool {
        let last = self.last_ping_ms.load(Ordering::Relaxed);
        // The sweep runs once a second: a ping due within the next half second goes now, so the
        // interval is kept to within half a sweep instead of slipping by a whole one.
        if now_ms.saturating_sub(last) + 500 >= interval_ms {
            self.last_ping_ms.store(now_ms, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    pub fn in_room(&self, room: &RoomName) -> bool {
        self.rooms.lock().contains(room)
    }

    /// Adds the room; false when already joined.
    pub(crate) fn add_room(&self, room: &RoomName) -> bool {
        let mut rooms = self.rooms.lock();
        if rooms.contains(room) {
            return false;
        }
        rooms.push(room.clone());
        true
    }

    /// Removes the room; false when not joined.
    pub(crate) fn remove_room(&self, room: &RoomName) -> bool {
        let mut rooms = self.rooms.lock();
        match rooms.iter().position(|r| r == room) {
            Some(i) => {
                rooms.swap_remove(i);
                true
            }
            None => false,
        }
    }

    pub fn room_count(&self) -> usize {
        self.rooms.lock().len()
    }

    /// Takes every joined room (on close).
    pub(crate) fn take_rooms(&self) -> Vec<RoomName> {
        std::mem::take(&mut *self.rooms.lock())
    }
}
