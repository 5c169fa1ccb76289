//! The hub: this node's routing table (room → local connections, user → local connections) and the
//! broker's delivery sink. It encodes each publication once and pushes the shared bytes into every
//! local member's queue. It also keeps the node subscribed at the broker to exactly the rooms that
//! have local members.
//!
//! Joining (and connecting, for direct messages) is two-phase so that nothing is lost or repeated
//! between reading history and going live: a new member first collects live deliveries in a pending
//! buffer; completing the join queues the reply, then the history, then the pending deliveries that
//! history did not cover, and makes the member live, all under the room's lock.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use switchyard_proto::{CloseCode, RoomName, ServerFrame, StreamPosition, UserId};
use tungstenite::Utf8Bytes;

use crate::backend::{
    BackendResult, Broker, DeliverySink, DirectMessage, DisconnectTarget, PresenceDiff, Publication,
    SystemMessage,
};
use crate::clock::Clock;
use crate::conn::{ConnId, ConnKind, Connection};
use crate::frames;
use crate::metrics::Metrics;
use crate::queue::{CloseReason, Outbound, PushError};
use crate::shard::ShardedMap;

struct Member {
    conn: Arc<Connection>,
    /// Whether it asked for the room's `presence_diff` events.
    presence_events: bool,
    /// `Some` while joining: live deliveries wait here until the join completes.
    pending: Option<Vec<Arc<Publication>>>,
}

struct UserSlot {
    conn: Arc<Connection>,
    pending: Option<Vec<Arc<DirectMessage>>>,
}

/// Whether the node is subscribed to a room at the broker; the lock serialises changes per room.
type SubscriptionLock = Arc<tokio::sync::Mutex<bool>>;

pub struct Hub {
    clock: Clock,
    queue_capacity: usize,
    metrics: Arc<Metrics>,
    broker: Arc<dyn Broker>,
    rooms: ShardedMap<RoomName, HashMap<ConnId, Member>>,
    users: ShardedMap<UserId, Vec<UserSlot>>,
    sessions: ShardedMap<Arc<str>, Vec<Arc<Connection>>>,
    conns: ShardedMap<ConnId, Arc<Connection>>,
    subscriptions: ShardedMap<RoomName, SubscriptionLock>,
    next_id: AtomicU64,
}

impl Hub {
    /// Creates the hub and attaches it to the broker as its delivery sink.
    pub fn new(
        broker: Arc<dyn Broker>,
        clock: Clock,
        metrics: Arc<Metrics>,
        queue_capacity: usize,
    ) -> Arc<Self> {
        let hub = Arc::new(Hub {
            clock,
            queue_capacity,
            metrics,
            broker: broker.clone(),
            rooms: ShardedMap::new(),
            users: ShardedMap::new(),
            sessions: ShardedMap::new(),
            conns: ShardedMap::new(),
            subscriptions: ShardedMap::new(),
            next_id: AtomicU64::new(1),
        });
        let sink: Arc<dyn DeliverySink> = hub.clone();
        broker.attach(Arc::downgrade(&sink));
        hub
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn push(&self, conn: &Connection, frame: Utf8Bytes) -> bool {
        match conn.queue.push(Outbound::Text(frame), self.clock.now_ms()) {
            Ok(()) => true,
            Err(PushError::SlowConsumer) => {
                self.metrics.slow_consumers.inc();
                false
            }
            Err(PushError::Closed) => false,
        }
    }

    /// Queues one frame for one connection.
    pub fn send(&self, conn: &Connection, frame: Utf8Bytes) -> bool {
        self.push(conn, frame)
    }

    /// Registers a connection; direct messages for its user collect in a pending buffer until
    /// [`Hub::complete_register`].
    pub fn register(&self, conn: &Arc<Connection>) {
        self.sessions
            .shard(&conn.session_id)
            .entry(conn.session_id.clone())
            .or_default()
            .push(conn.clone());
        let pending = (conn.kind == ConnKind::Native).then(Vec::new);
        self.users
            .shard(&conn.user)
            .entry(conn.user.clone())
            .or_default()
            .push(UserSlot {
                conn: conn.clone(),
                pending,
            });
    }

    /// Queues `welcome` and the inbox, then the direct messages that arrived meanwhile and were not
    /// in the inbox read, and makes the connection live for direct messages and broadcasts.
    pub fn complete_register(
        &self,
        conn: &Arc<Connection>,
        welcome: Utf8Bytes,
        inbox: &[Arc<DirectMessage>],
    ) {
        self.complete_user_slot(conn, welcome, inbox);
        self.conns.shard(&conn.id).insert(conn.id, conn.clone());
    }

    fn complete_user_slot(&self, conn: &Arc<Connection>, welcome: Utf8Bytes, inbox: &[Arc<DirectMessage>]) {
        let mut users = self.users.shard(&conn.user);
        let Some(slot) = users
            .get_mut(&conn.user)
            .and_then(|slots| slots.iter_mut().find(|s| s.conn.id == conn.id))
        else {
            return;
        };
        self.push(conn, welcome);
        let mut last_seq = 0;
        for message in inbox {
            last_seq = last_seq.max(message.seq);
            self.push(conn, frames::direct(message));
        }
        for message in slot.pending.take().unwrap_or_default() {
            if message.seq > last_seq {
                self.push(conn, frames::direct(&message));
            }
        }
    }

    /// Removes a connection from every map. Returns the rooms it was in (for presence and
    /// subscription clean-up) and whether it was its session's last connection on this node.
    pub fn unregister(&self, conn: &Arc<Connection>) -> (Vec<RoomName>, bool) {
        let rooms = conn.take_rooms();
        for room in &rooms {
            self.remove_member(room, conn.id);
        }
        self.conns.shard(&conn.id).remove(&conn.id);
        {
            let mut users = self.users.shard(&conn.user);
            if let Some(slots) = users.get_mut(&conn.user) {
                slots.retain(|s| s.conn.id != conn.id);
                if slots.is_empty() {
                    users.remove(&conn.user);
                }
            }
        }
        let mut sessions = self.sessions.shard(&conn.session_id);
        let mut last_of_session = true;
        if let Some(conns) = sessions.get_mut(&conn.session_id) {
            conns.retain(|c| c.id != conn.id);
            last_of_session = conns.is_empty();
            if last_of_session {
                sessions.remove(&conn.session_id);
            }
        }
        (rooms, last_of_session)
    }

    /// First phase of a join: the connection becomes a pending member. False if already joined.
    pub fn begin_join(&self, room: &RoomName, conn: &Arc<Connection>, presence_events: bool) -> bool {
        if !conn.add_room(room) {
            return false;
        }
        let mut shard = self.rooms.shard(room);
        let members = shard.entry(room.clone()).or_insert_with(|| {
            self.metrics.rooms.inc();
            HashMap::new()
        });
        members.insert(
            conn.id,
            Member {
                conn: conn.clone(),
                presence_events,
                pending: Some(Vec::new()),
            },
        );
        true
    }

    /// Second phase: queues `reply`, then `backlog` (publications up to offset `top`), then what
    /// arrived meanwhile with a greater offset; the member is live from now on.
    pub fn complete_join(
        &self,
        room: &RoomName,
        conn: &Connection,
        reply: Option<Utf8Bytes>,
        backlog: &[Arc<Publication>],
        top: u64,
    ) {
        let mut shard = self.rooms.shard(room);
        let Some(member) = shard.get_mut(room).and_then(|m| m.get_mut(&conn.id)) else {
            return;
        };
        let pending = member.pending.take().unwrap_or_default();
        let encode = |p: &Publication| match conn.kind {
            ConnKind::Native => frames::native_publication(p),
            ConnKind::Seed => frames::seed_publication(p),
        };
        let catch_up = reply
            .into_iter()
            .chain(backlog.iter().map(|p| encode(p)))
            .chain(pending.iter().filter(|p| p.offset > top).map(|p| encode(p)))
            .map(Outbound::Text);
        let _ = conn.queue.push_backlog(catch_up, self.clock.now_ms());
    }

    /// Removes the connection from the room. False if it was not a member.
    pub fn leave(&self, room: &RoomName, conn: &Connection) -> bool {
        if !conn.remove_room(room) {
            return false;
        }
        self.remove_member(room, conn.id);
        true
    }

    fn remove_member(&self, room: &RoomName, id: ConnId) {
        let mut shard = self.rooms.shard(room);
        if let Some(members) = shard.get_mut(room) {
            members.remove(&id);
            if members.is_empty() {
                shard.remove(room);
                self.metrics.rooms.dec();
            }
        }
    }

    /// Local members of a room (live or joining).
    pub fn member_count(&self, room: &RoomName) -> usize {
        self.rooms.shard(room).get(room).map_or(0, HashMap::len)
    }

    /// Makes the broker subscription of `room` match whether it has local members. Changes for one
    /// room are serialised and each call re-reads the membership, so the last call always wins.
    pub async fn sync_subscription(&self, room: &RoomName) -> BackendResult<()> {
        let lock = self
            .subscriptions
            .shard(room)
            .entry(room.clone())
            .or_default()
            .clone();
        let result = {
            let mut subscribed = lock.lock().await;
            let wanted = self.member_count(room) > 0;
            match (wanted, *subscribed) {
                (true, false) => self.broker.subscribe(room).await.map(|()| *subscribed = true),
                (false, true) => self.broker.unsubscribe(room).await.map(|()| *subscribed = false),
                _ => Ok(()),
            }
        };
        let mut shard = self.subscriptions.shard(room);
        // Forget the lock once unsubscribed and unused (this shard lock blocks new users of it).
        if Arc::strong_count(&lock) == 2 && lock.try_lock().is_ok_and(|s| !*s) {
            shard.remove(room);
        }
        result
    }

    /// Every connection of this node (a snapshot).
    pub fn connections(&self) -> Vec<Arc<Connection>> {
        let mut all = Vec::with_capacity(self.conns.len());
        self.conns
            .for_each_shard(|shard| all.extend(shard.values().cloned()));
        all
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Local connections of a user.
    pub fn user_connections(&self, user: &UserId) -> Vec<Arc<Connection>> {
        self.users
            .shard(user)
            .get(user)
            .map(|s| s.iter().map(|s| s.conn.clone()).collect())
            .unwrap_or_default()
    }

    /// Closes every local connection of a user or session.
    pub fn close(&self, target: &DisconnectTarget, reason: CloseReason) -> usize {
        let conns: Vec<Arc<Connection>> = match target {
            DisconnectTarget::User(user) => self.user_connections(user),
            DisconnectTarget::Session(id) => self
                .sessions
                .shard(id.as_str())
                .get(id.as_str())
                .cloned()
                .unwrap_or_default(),
        };
        for conn in &conns {
            conn.queue.close(reason.clone());
        }
        conns.len()
    }
}

impl DeliverySink for Hub {
    fn publication(&self, publication: Arc<Publication>) {
        let mut shard = self.rooms.shard(&publication.room);
        let Some(members) = shard.get_mut(&publication.room) else {
            return;
        };
        let mut native = None;
        let mut seed = None;
        let mut delivered = 0u64;
        for member in members.values_mut() {
            if let Some(pending) = &mut member.pending {
                // Joins take one backend round trip; a room faster than the queue allows meanwhile
                // makes this member a slow consumer like any other.
                if pending.len() >= self.queue_capacity {
                    member
                        .conn
                        .queue
                        .abort_slow("slow consumer: too many publications while joining");
                    self.metrics.slow_consumers.inc();
                } else {
                    pending.push(publication.clone());
                }
                continue;
            }
            let frame = match member.conn.kind {
                ConnKind::Native => native.get_or_insert_with(|| frames::native_publication(&publication)),
                ConnKind::Seed => seed.get_or_insert_with(|| frames::seed_publication(&publication)),
            };
            if self.push(&member.conn, frame.clone()) {
                delivered += 1;
            }
        }
        self.metrics.messages_delivered.inc_by(delivered);
    }

    fn presence(&self, diff: &PresenceDiff) {
        let shard = self.rooms.shard(&diff.room);
        let Some(members) = shard.get(&diff.room) else {
            return;
        };
        let frame = frames::presence(diff);
        for member in members.values() {
            if member.presence_events && member.pending.is_none() && member.conn.kind == ConnKind::Native {
                self.push(&member.conn, frame.clone());
            }
        }
    }

    fn direct(&self, message: Arc<DirectMessage>) {
        let mut shard = self.users.shard(&message.to);
        let Some(slots) = shard.get_mut(&message.to) else {
            return;
        };
        let mut frame = None;
        let mut delivered = 0u64;
        for slot in slots.iter_mut().filter(|s| s.conn.kind == ConnKind::Native) {
            if let Some(pending) = &mut slot.pending {
                pending.push(message.clone());
                continue;
            }
            if self.push(
                &slot.conn,
                frame.get_or_insert_with(|| frames::direct(&message)).clone(),
            ) {
                delivered += 1;
            }
        }
        self.metrics.messages_delivered.inc_by(delivered);
    }

    fn system(&self, message: Arc<SystemMessage>) {
        let frame = frames::system(&message);
        let mut delivered = 0u64;
        self.conns.for_each_shard(|shard| {
            for conn in shard.values().filter(|c| c.kind == ConnKind::Native) {
                if self.push(conn, frame.clone()) {
                    delivered += 1;
                }
            }
        });
        self.metrics.messages_delivered.inc_by(delivered);
    }

    fn reset(&self, room: &RoomName, position: &StreamPosition) {
        let shard = self.rooms.shard(room);
        let Some(members) = shard.get(room) else { return };
        let frame = frames::text(&ServerFrame::Joined {
            reference: None,
            room: room.clone(),
            offset: position.offset,
            epoch: position.epoch.clone(),
            recovered: false,
        });
        for member in members.values() {
            if member.pending.is_none() && member.conn.kind == ConnKind::Native {
                self.push(&member.conn, frame.clone());
            }
        }
    }

    fn disconnect(&self, target: &DisconnectTarget) {
        let reason = match target {
            DisconnectTarget::User(_) => CloseReason::new(CloseCode::Forbidden, "disconnected by the server"),
            DisconnectTarget::Session(_) => CloseReason::new(CloseCode::InvalidSession, "session terminated"),
        };
        self.close(target, reason);
    }
}
