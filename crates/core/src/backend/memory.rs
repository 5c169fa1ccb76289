//! The embedded default backend: one node, everything in process memory. Offsets, history, dedup,
//! inboxes, sessions and presence follow the same contract as the Redis backend (the conformance
//! suite checks both). Expired entries are removed lazily on access and by [`MemoryBackend::sweep`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use switchyard_proto::{PresenceEntry, RoomName, StreamPosition, UserId};
use tokio::time::Instant;

use super::*;
use crate::clock::unix_ms;
use crate::shard::ShardedMap;

struct Stored<T> {
    item: T,
    expires: Instant,
}

struct RoomStream {
    epoch: Arc<str>,
    /// Offset of the latest publication (0: none yet).
    top: u64,
    history: VecDeque<Stored<Arc<Publication>>>,
    dedup: HashMap<String, Stored<u64>>,
    subscribed: bool,
    /// When the last publication was stored (streams with no history left are evicted).
    last_write: Instant,
}

impl RoomStream {
    fn new() -> Self {
        RoomStream {
            epoch: Arc::from(new_epoch()),
            top: 0,
            history: VecDeque::new(),
            dedup: HashMap::new(),
            subscribed: false,
            last_write: Instant::now(),
        }
    }

    fn position(&self) -> StreamPosition {
        StreamPosition {
            offset: self.top,
            epoch: self.epoch.to_string(),
        }
    }

    fn trim(&mut self, now: Instant, max_len: usize) {
        while self.history.len() > max_len || self.history.front().is_some_and(|p| p.expires <= now) {
            self.history.pop_front();
        }
    }

    fn after(&self, offset: u64, limit: usize) -> Vec<Arc<Publication>> {
        // Offsets are contiguous within the retained history, so the start index is arithmetic.
        let first = self.history.front().map_or(self.top + 1, |p| p.item.offset);
        let skip = usize::try_from((offset + 1).saturating_sub(first)).unwrap_or(usize::MAX);
        self.history
            .iter()
            .skip(skip)
            .take(limit)
            .map(|p| p.item.clone())
            .collect()
    }
}

fn new_epoch() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// How long a user's sequence counter outlives an empty inbox, so `seq` never goes back for a client
/// that may still remember it.
const SEQ_RETENTION: Duration = Duration::from_secs(30 * 86_400);

struct Inbox {
    next_seq: u64,
    touched: Instant,
    messages: VecDeque<Stored<Arc<DirectMessage>>>,
    dedup: HashMap<String, Stored<u64>>,
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox {
            next_seq: 0,
            touched: Instant::now(),
            messages: VecDeque::new(),
            dedup: HashMap::new(),
        }
    }
}

/// All backends in one process.
pub struct MemoryBackend {
    settings: BackendSettings,
    sink: OnceLock<Weak<dyn DeliverySink>>,
    streams: ShardedMap<RoomName, Arc<Mutex<RoomStream>>>,
    inboxes: ShardedMap<UserId, Inbox>,
    sessions: Mutex<HashMap<String, Stored<SessionRecord>>>,
    session_connections: Mutex<HashMap<String, u32>>,
    presence: ShardedMap<RoomName, BTreeMap<UserId, HashSet<u64>>>,
}

impl MemoryBackend {
    pub fn new(settings: BackendSettings) -> Arc<Self> {
        Arc::new(MemoryBackend {
            settings,
            sink: OnceLock::new(),
            streams: ShardedMap::new(),
            inboxes: ShardedMap::new(),
            sessions: Mutex::new(HashMap::new()),
            session_connections: Mutex::new(HashMap::new()),
            presence: ShardedMap::new(),
        })
    }

    /// The three backend roles, all served by one memory backend.
    pub fn backends(settings: BackendSettings) -> Backends {
        let backend = Self::new(settings);
        Backends {
            broker: backend.clone(),
            sessions: backend.clone(),
            presence: backend,
        }
    }

    fn sink(&self) -> Option<Arc<dyn DeliverySink>> {
        self.sink.get().and_then(Weak::upgrade)
    }

    fn stream(&self, room: &RoomName) -> Arc<Mutex<RoomStream>> {
        self.streams
            .shard(room)
            .entry(room.clone())
            .or_insert_with(|| Arc::new(Mutex::new(RoomStream::new())))
            .clone()
    }

    fn secs(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    /// Removes expired sessions, history, dedup entries and inboxes, and forgets room streams that
    /// are neither subscribed nor hold history (their epoch is then renewed on next use).
    pub fn sweep(&self) {
        let now = Instant::now();
        let history_ttl = Self::secs(self.settings.history_ttl_secs);
        let max_len = self.settings.history_size;
        self.streams.for_each_shard(|shard| {
            shard.retain(|_, stream| {
                let mut s = stream.lock();
                s.trim(now, max_len);
                s.dedup.retain(|_, d| d.expires > now);
                s.subscribed || !s.history.is_empty() || now.duration_since(s.last_write) < history_ttl
            })
        });
        self.inboxes.for_each_shard(|shard| {
            shard.retain(|_, inbox| {
                while inbox.messages.front().is_some_and(|m| m.expires <= now) {
                    inbox.messages.pop_front();
                }
                inbox.dedup.retain(|_, d| d.expires > now);
                !inbox.messages.is_empty() || now.duration_since(inbox.touched) < SEQ_RETENTION
            })
        });
        self.sessions.lock().retain(|_, s| s.expires > now);
    }

    /// Runs [`Self::sweep`] every `every` until `stop` fires.
    pub async fn run_sweeper(self: Arc<Self>, every: Duration, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.sweep(),
            }
        }
    }
}

#[async_trait]
impl Broker for MemoryBackend {
    fn attach(&self, sink: Weak<dyn DeliverySink>) {
        let _ = self.sink.set(sink);
    }

    async fn subscribe(&self, room: &RoomName) -> BackendResult<()> {
        self.stream(room).lock().subscribed = true;
        Ok(())
    }

    async fn unsubscribe(&self, room: &RoomName) -> BackendResult<()> {
        if let Some(stream) = self.streams.shard(room).get(room) {
            stream.lock().subscribed = false;
        }
        Ok(())
    }

    async fn publish(&self, room: &RoomName, new: NewPublication) -> BackendResult<PublishOutcome> {
        let now = Instant::now();
        let stream = self.stream(room);
        let mut s = stream.lock();
        if let Some(id) = &new.id {
            if let Some(seen) = s.dedup.get(id)
                && seen.expires > now
            {
                return Ok(PublishOutcome {
                    offset: seen.item,
                    epoch: s.epoch.to_string(),
                    duplicate: true,
                });
            }
            if s.dedup.len() >= 4096 && s.dedup.len().is_power_of_two() {
                s.dedup.retain(|_, d| d.expires > now);
            }
            let expires = now + Self::secs(self.settings.dedup_window_secs);
            let offset = s.top + 1;
            s.dedup.insert(
                id.clone(),
                Stored {
                    item: offset,
                    expires,
                },
            );
        }
        s.top += 1;
        s.last_write = now;
        let publication = Arc::new(Publication {
            room: room.clone(),
            offset: s.top,
            epoch: s.epoch.clone(),
            from: new.from,
            data: new.data,
            ts: unix_ms(),
            id: new.id,
        });
        let expires = now + Self::secs(self.settings.history_ttl_secs);
        s.history.push_back(Stored {
            item: publication.clone(),
            expires,
        });
        s.trim(now, self.settings.history_size);
        let outcome = PublishOutcome {
            offset: s.top,
            epoch: s.epoch.to_string(),
            duplicate: false,
        };
        // Delivering under the stream lock keeps every subscriber's view in offset order.
        if s.subscribed
            && let Some(sink) = self.sink()
        {
            sink.publication(publication);
        }
        Ok(outcome)
    }

    async fn position(&self, room: &RoomName) -> BackendResult<StreamPosition> {
        Ok(self.stream(room).lock().position())
    }

    async fn history(&self, room: &RoomName, after: Option<u64>, limit: usize) -> BackendResult<HistoryPage> {
        let stream = self.stream(room);
        let mut s = stream.lock();
        s.trim(Instant::now(), self.settings.history_size);
        let after = after.unwrap_or_else(|| s.top.saturating_sub(u64::try_from(limit).unwrap_or(u64::MAX)));
        Ok(HistoryPage {
            position: s.position(),
            publications: s.after(after, limit),
        })
    }

    async fn recover(&self, room: &RoomName, since: &StreamPosition) -> BackendResult<Recovery> {
        let stream = self.stream(room);
        let mut s = stream.lock();
        s.trim(Instant::now(), self.settings.history_size);
        let position = s.position();
        let oldest = s.history.front().map_or(s.top + 1, |p| p.item.offset);
        if *s.epoch != *since.epoch || since.offset > s.top || since.offset + 1 < oldest {
            return Ok(Recovery::NotRecovered { position });
        }
        let publications = s.after(since.offset, usize::MAX);
        Ok(Recovery::Recovered {
            position,
            publications,
        })
    }

    async fn presence_event(&self, diff: &PresenceDiff) -> BackendResult<()> {
        if let Some(sink) = self.sink() {
            sink.presence(diff);
        }
        Ok(())
    }

    async fn broadcast(&self, message: SystemMessage) -> BackendResult<()> {
        if let Some(sink) = self.sink() {
            sink.system(Arc::new(message));
        }
        Ok(())
    }

    async fn send_direct(&self, to: &UserId, new: NewDirect) -> BackendResult<DirectOutcome> {
        let now = Instant::now();
        let mut shard = self.inboxes.shard(to);
        let inbox = shard.entry(to.clone()).or_default();
        while inbox.messages.front().is_some_and(|m| m.expires <= now) {
            inbox.messages.pop_front();
        }
        if let Some(id) = &new.id
            && let Some(seen) = inbox.dedup.get(id)
            && seen.expires > now
        {
            return Ok(DirectOutcome {
                seq: seen.item,
                duplicate: true,
            });
        }
        if inbox.messages.len() >= self.settings.inbox_max {
            return Err(BackendError::InboxFull {
                user: to.to_string(),
                limit: self.settings.inbox_max,
            });
        }
        inbox.next_seq += 1;
        inbox.touched = now;
        let seq = inbox.next_seq;
        if let Some(id) = &new.id {
            inbox.dedup.insert(
                id.clone(),
                Stored {
                    item: seq,
                    expires: now + Self::secs(self.settings.dedup_window_secs),
                },
            );
        }
        let message = Arc::new(DirectMessage {
            to: to.clone(),
            from: new.from,
            data: new.data,
            ts: unix_ms(),
            seq,
            id: new.id,
        });
        inbox.messages.push_back(Stored {
            item: message.clone(),
            expires: now + Self::secs(self.settings.inbox_ttl_secs),
        });
        if let Some(sink) = self.sink() {
            sink.direct(message);
        }
        Ok(DirectOutcome {
            seq,
            duplicate: false,
        })
    }

    async fn inbox(&self, user: &UserId) -> BackendResult<Vec<Arc<DirectMessage>>> {
        let now = Instant::now();
        let shard = self.inboxes.shard(user);
        Ok(shard
            .get(user)
            .map(|inbox| {
                inbox
                    .messages
                    .iter()
                    .filter(|m| m.expires > now)
                    .map(|m| m.item.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn inbox_ack(&self, user: &UserId, upto: u64) -> BackendResult<()> {
        if let Some(inbox) = self.inboxes.shard(user).get_mut(user) {
            inbox.messages.retain(|m| m.item.seq > upto);
        }
        Ok(())
    }

    async fn disconnect(&self, target: &DisconnectTarget) -> BackendResult<()> {
        if let Some(sink) = self.sink() {
            sink.disconnect(target);
        }
        Ok(())
    }

    async fn check(&self) -> BackendResult<()> {
        Ok(())
    }
}

#[async_trait]
impl SessionStore for MemoryBackend {
    async fn create(&self, id: &str, record: &SessionRecord) -> BackendResult<Session> {
        let ttl = self.settings.session_ttl_secs;
        let expires = Instant::now() + Self::secs(ttl);
        self.sessions.lock().insert(
            id.to_string(),
            Stored {
                item: record.clone(),
                expires,
            },
        );
        Ok(Session {
            id: id.to_string(),
            record: record.clone(),
            expires_in: ttl,
        })
    }

    async fn get(&self, id: &str) -> BackendResult<Option<Session>> {
        let now = Instant::now();
        let sessions = self.sessions.lock();
        Ok(sessions.get(id).filter(|s| s.expires > now).map(|s| Session {
            id: id.to_string(),
            record: s.item.clone(),
            expires_in: s.expires.duration_since(now).as_secs(),
        }))
    }

    async fn validate(&self, id: &str) -> BackendResult<Option<Session>> {
        let now = Instant::now();
        let ttl = self.settings.session_ttl_secs;
        let mut sessions = self.sessions.lock();
        let Some(stored) = sessions
            .get_mut(id)
            .filter(|s| s.expires > now && s.item.resumable())
        else {
            return Ok(None);
        };
        stored.item.status = STATUS_ACTIVE.to_string();
        stored.expires = now + Self::secs(ttl);
        Ok(Some(Session {
            id: id.to_string(),
            record: stored.item.clone(),
            expires_in: ttl,
        }))
    }

    async fn set_status(&self, id: &str, status: &str) -> BackendResult<bool> {
        let now = Instant::now();
        let mut sessions = self.sessions.lock();
        match sessions.get_mut(id).filter(|s| s.expires > now) {
            Some(stored) => {
                stored.item.status = status.to_string();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn delete(&self, id: &str) -> BackendResult<bool> {
        let now = Instant::now();
        Ok(self.sessions.lock().remove(id).is_some_and(|s| s.expires > now))
    }

    async fn connection_opened(&self, id: &str) -> BackendResult<()> {
        *self.session_connections.lock().entry(id.to_string()).or_default() += 1;
        Ok(())
    }

    async fn connection_closed(&self, id: &str) -> BackendResult<bool> {
        let last = {
            let mut counts = self.session_connections.lock();
            match counts.get_mut(id) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                _ => {
                    counts.remove(id);
                    true
                }
            }
        };
        if last {
            self.set_status(id, STATUS_DISCONNECTED).await?;
        }
        Ok(last)
    }
}

#[async_trait]
impl PresenceStore for MemoryBackend {
    async fn add(&self, room: &RoomName, user: &UserId, conn: u64) -> BackendResult<bool> {
        let mut shard = self.presence.shard(room);
        let conns = shard
            .entry(room.clone())
            .or_default()
            .entry(user.clone())
            .or_default();
        let first = conns.is_empty();
        conns.insert(conn);
        Ok(first)
    }

    async fn remove(&self, room: &RoomName, user: &UserId, conn: u64) -> BackendResult<bool> {
        let mut shard = self.presence.shard(room);
        let Some(users) = shard.get_mut(room) else {
            return Ok(false);
        };
        let Some(conns) = users.get_mut(user) else {
            return Ok(false);
        };
        let removed = conns.remove(&conn);
        let last = removed && conns.is_empty();
        if conns.is_empty() {
            users.remove(user);
        }
        if users.is_empty() {
            shard.remove(room);
        }
        Ok(last)
    }

    async fn list(&self, room: &RoomName) -> BackendResult<Vec<PresenceEntry>> {
        let shard = self.presence.shard(room);
        Ok(shard
            .get(room)
            .map(|users| {
                users
                    .iter()
                    .map(|(user, conns)| PresenceEntry {
                        user_id: user.clone(),
                        connections: u32::try_from(conns.len()).unwrap_or(u32::MAX),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}
